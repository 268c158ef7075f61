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
from torch.utils.checkpoint import checkpoint

from ..model.llava import LlavaModel
from .data import IGNORE, TrainBatch


def loss_sum(model: LlavaModel, batch: TrainBatch) -> tuple[torch.Tensor, int]:
    """Summed float32 cross-entropy over the batch's targets, and their number."""
    device = model.device
    mask = batch.attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    valid = mask.bool() if bool((mask == 0).any()) else None
    embeds = model.embed_inputs(batch.input_ids, batch.pixel_values, batch.image_sizes, batch.image_tiled,
                                batch.video_pixels, batch.video_frames)  # (B, T, D)
    hidden = model.language_model(embeds, positions, valid, None)  # (B, T, D)
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
