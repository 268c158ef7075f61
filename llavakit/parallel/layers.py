"""The collectives of a tensor-parallel model, added after loading (a post-hoc rewrite, as quantisation is).

Column-split layers (q/k/v, gate/up, the tower's q/k/v and fc1, the projector's linear_1) need none:
each rank keeps its own heads or rows. The layers below wrap the others:

    RowParallel      o_proj, down_proj, out_proj, fc2, linear_2: local product, all-reduce, then the bias
    VocabEmbedding   embed_tokens: each rank looks up the ids in its rows, zeros elsewhere, all-reduce
    VocabHead        lm_head: each rank's logits for its rows, gathered on rank 0 and cut to the vocabulary

The wrapped layer keeps whatever it is (FastLinear with the native kernels, a QuantLinear), so
decoding on a CPU still reads each rank's weights through llavakit's kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import Comm
from .shard import Split


class RowParallel(nn.Module):
    """A linear layer split by input features: each rank multiplies its columns, one all-reduce adds
    the partial sums, and the bias (whole on every rank) is added once, after."""

    def __init__(self, linear: nn.Module, comm: Comm):
        super().__init__()
        bias = linear.bias
        linear.bias = None  # the local product must not add it N times
        self.linear, self.comm = linear, comm
        if isinstance(bias, nn.Parameter) or bias is None:
            self.bias = bias
        else:
            self.register_buffer("bias", bias)  # a QuantLinear keeps its bias as a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x).contiguous()
        self.comm.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabEmbedding(nn.Module):
    """Input embeddings split by vocabulary rows [start, start + rows): ids outside give zeros, and the
    all-reduce leaves each id its one row (x + 0 is exact, so the result equals a whole lookup)."""

    def __init__(self, embedding: nn.Embedding, start: int, comm: Comm):
        super().__init__()
        self.weight = embedding.weight  # `model.dtype` and `model.device` read it, and a tied head shares it
        self.start, self.comm = start, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (..., D)
        out = out.masked_fill(outside[..., None], 0).contiguous()
        self.comm.all_reduce(out)
        return out


class VocabHead(nn.Module):
    """The output head split by vocabulary rows: rank 0 gets the logits of the whole vocabulary (the
    ranks' parts in order, padding rows cut off); the other ranks get their own part back."""

    def __init__(self, linear: nn.Module, vocab: int, comm: Comm):
        super().__init__()
        self.linear, self.vocab, self.comm = linear, vocab, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear(x).contiguous()  # (..., V/N)
        parts = self.comm.gather(local)
        if parts is None:
            return local
        return torch.cat(parts, dim=-1)[..., : self.vocab]  # (..., V)


def connect(model: nn.Module, split: Split, comm: Comm) -> nn.Module:
    """Add the collectives to a model loaded with `split`'s shapes; returns `model`.

    The native fused decode step (llavakit/model/fused_decode.py) runs a whole step in one call and
    cannot stop for an all-reduce, so it is switched off: decoding takes the PyTorch path, whose
    linear layers still use the native kernels.
    """
    plan = split.plan
    text = model.language_model
    text.fused_decode = None
    for layer in text.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, comm)
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, comm)
    text.embed_tokens = VocabEmbedding(text.embed_tokens, plan.vocab_range(split.rank)[0], comm)
    model.lm_head = VocabHead(model.lm_head, plan.vocab, comm)
    if plan.vision_split:
        for layer in model.vision_tower.encoder.layers:
            layer.self_attn.out_proj = RowParallel(layer.self_attn.out_proj, comm)
            layer.mlp.fc2 = RowParallel(layer.mlp.fc2, comm)
        proj = model.multi_modal_projector
        proj.linear_2 = RowParallel(proj.linear_2, comm)
    return model
