"""The training objective: next-token cross-entropy on the assistant tokens of a batch.

    batch ─► embed (tower ► projector ► features at placeholders) ─► decoder ─► hidden (B, T, D)
    hidden at positions whose next token is a target ─► lm_head ─► cross-entropy (summed)

Only target positions reach the output projection, so image tokens and prompts cost no vocabulary
matmul. The sum is returned with the number of targets, so gradient accumulation can divide by the
targets of the whole accumulated batch (as transformers does with num_items_in_batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.llava import LlavaModel
from .data import IGNORE, TrainBatch


def loss_sum(model: LlavaModel, batch: TrainBatch) -> tuple[torch.Tensor, int]:
    """Summed float32 cross-entropy over the batch's targets, and their number."""
    device = model.device
    mask = batch.attention_mask.to(device)
    if batch.positions is not None:  # conversations packed after a shared prefix (packing.py)
        positions = batch.positions.to(device)
    else:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    valid = mask.bool() if bool((mask == 0).any()) else None
    embeds = model.embed_inputs(batch.input_ids, batch.pixel_values, batch.image_layouts,
                                batch.video_pixels, batch.video_layouts)  # (B, T, D)
    hidden = model.language_model(embeds, positions, valid, None, batch.segments)  # (B, T, D)
    targets = batch.labels.to(device)[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])  # (n, V)
    n = int(keep.sum())
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, n


def mean_loss(model: LlavaModel, batch: TrainBatch) -> torch.Tensor:
    """Mean cross-entropy over the batch's targets (what transformers returns as `loss`)."""
    total, n = loss_sum(model, batch)
    return total / max(n, 1)


class Objective(nn.Module):
    """The loss of a batch as a module, so that DDP and FSDP can wrap it (they act around `forward`).

    Holds the model and, for LoRA, the adapters (whose parameters then train data-parallel too).
    forward(batch) returns loss_sum's (summed loss, target count). touch: name prefixes of trainable
    parameters added to the loss with weight 0, so that each gets a gradient (zeros when the batch
    leaves it out) whatever the batch; looked up at every call, where FSDP has put the gathered ones.
    """

    def __init__(self, model: LlavaModel, adapters: nn.Module | None = None, touch: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.adapters = adapters
        self.touch = touch

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, int]:
        total, n = loss_sum(self.model, batch)
        if self.touch and torch.is_grad_enabled():
            touched = [p.sum() for name, p in self.model.named_parameters()
                       if p.requires_grad and name.startswith(self.touch)]
            if touched:
                total = total + 0.0 * torch.stack(touched).sum()
        return total, n


def enable_checkpointing(model: LlavaModel) -> None:
    """Recompute each decoder and tower layer in the backward pass instead of storing its activations.

    The layers' `forward` is wrapped per instance, so parameter names (and saved checkpoints) stay as they are.
    """
    layers = list(model.language_model.layers) + list(model.vision_tower.encoder.layers)
    for layer in layers:
        inner = layer.forward

        def wrapped(*args, _inner=inner):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False)
            return _inner(*args)

        layer.forward = wrapped
