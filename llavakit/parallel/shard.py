"""Each rank's share of the weights: local shapes on the meta model, then only its slices read.

    Split(plan, rank).localize(model)   the meta-device LlavaModel gets this rank's layer widths
    Split(plan, rank).take(name)        how load_state reads `name`: whole, a slice, or not at all

`take` hands weights.load_state a reader of the stored tensor's lazy view (safetensors' `get_slice`):
a rank copies its rows or columns out of the file and nothing else, so no rank ever holds the whole
checkpoint. The layers stay plain nn.Linear / nn.Embedding of the local widths, with the parameter
names of the checkpoint; llavakit/parallel/layers.py adds the collectives after loading.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..weights import SKIP
from .plan import Plan

# llavakit parameter name -> how it is split: "rows" (output features), "columns" (input features),
# with the Plan range that applies. Everything not listed (norms, biases of row-split layers, the
# tower's embeddings, image_newline) is read whole by every rank that holds its module.
_DECODER = re.compile(r"language_model\.layers\.\d+\.(self_attn|mlp)\.(\w+)\.(weight|bias)")
_TOWER = re.compile(r"vision_tower\.encoder\.layers\.\d+\.(self_attn|mlp)\.(\w+)\.(weight|bias)")
_ROWS, _COLUMNS = "rows", "columns"
_DECODER_SPLIT = {"q_proj": (_ROWS, "head"), "k_proj": (_ROWS, "kv"), "v_proj": (_ROWS, "kv"),
                  "o_proj": (_COLUMNS, "head"), "gate_proj": (_ROWS, "mlp"), "up_proj": (_ROWS, "mlp"),
                  "down_proj": (_COLUMNS, "mlp")}
_TOWER_SPLIT = {"q_proj": (_ROWS, "vision_head"), "k_proj": (_ROWS, "vision_head"), "v_proj": (_ROWS, "vision_head"),
                "out_proj": (_COLUMNS, "vision_head"), "fc1": (_ROWS, "vision_mlp"), "fc2": (_COLUMNS, "vision_mlp")}
_PROJECTOR_SPLIT = {"linear_1": (_ROWS, "projector"), "linear_2": (_COLUMNS, "projector")}
_VOCAB = ("language_model.embed_tokens.weight", "lm_head.weight")


def _rows(start: int, stop: int, pad_to: int | None = None) -> Callable:
    """Reader of rows [start, stop) of a stored (N, ...) tensor; rows past its end read as zeros up to pad_to."""
    def read(view) -> torch.Tensor:
        have = _shape(view)[0]
        part = view[min(start, have):min(stop, have)]
        if pad_to is not None and part.shape[0] < pad_to:
            part = torch.cat([part, part.new_zeros((pad_to - part.shape[0], *part.shape[1:]))])
        return _copy(part)
    return read


def _columns(start: int, stop: int) -> Callable:
    """Reader of columns [start, stop) of a stored (N, K) matrix."""
    return lambda view: _copy(view[:, start:stop])


def _whole(view) -> torch.Tensor:
    """Reader of a whole stored tensor (one every rank holds)."""
    return _copy(view[...] if _shape(view) == () else view[:])


def _copy(part: torch.Tensor) -> torch.Tensor:
    """`part` in memory of its own. safetensors hands out slices of its file mapping without copying; one
    kept would keep the whole file mapped, and with it every page the rank read, the other ranks'
    columns included (a column slice reads every row): 5.6 instead of 3.6 GB for each of 2 ranks of a
    12-layer 7B OneVision after a forward."""
    return torch.empty_like(part, memory_format=torch.contiguous_format).copy_(part)


def _shape(view) -> tuple[int, ...]:
    return tuple(view.get_shape()) if hasattr(view, "get_shape") else tuple(view.shape)


class Split:
    """Rank `rank`'s part of a model split by `plan`: local shapes before loading, slices while loading."""

    def __init__(self, plan: Plan, rank: int):
        self.plan, self.rank = plan, rank

    @property
    def holds_vision(self) -> bool:
        """Whether this rank holds (a part of) the tower and the projector."""
        return self.plan.vision_split or self.rank == 0

    def _range(self, which: str) -> tuple[int, int]:
        return getattr(self.plan, f"{which}_range")(self.rank)

    def _reader(self, kind: str, which: str, leaf: str) -> Callable:
        start, stop = self._range(which)
        if kind == _ROWS:
            return _rows(start, stop)
        return _columns(start, stop) if leaf == "weight" else _whole  # a row-split layer's bias is added once, whole

    def take(self, name: str):
        """How this rank reads `name` (a llavakit parameter name): SKIP to leave it unread, or a reader of
        the stored tensor's lazy view returning this rank's part (a copy: see `_copy`)."""
        if name in _VOCAB:
            start, stop = self._range("vocab")
            return _rows(start, stop, pad_to=stop - start)
        match = _DECODER.fullmatch(name)
        if match and match.group(2) in _DECODER_SPLIT:
            kind, which = _DECODER_SPLIT[match.group(2)]
            return self._reader(kind, which, match.group(3))
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            if not self.holds_vision:
                return SKIP
            if not self.plan.vision_split:
                return _whole
            match = _TOWER.fullmatch(name)
            if match and match.group(2) in _TOWER_SPLIT:
                return self._reader(*_TOWER_SPLIT[match.group(2)], match.group(3))
            part, _, leaf = name.removeprefix("multi_modal_projector.").rpartition(".")
            if name.startswith("multi_modal_projector.") and part in _PROJECTOR_SPLIT:
                return self._reader(*_PROJECTOR_SPLIT[part], leaf)
        return _whole

    def localize(self, model: nn.Module) -> None:
        """Give a LlavaModel built on the meta device this rank's widths (plain layers, the same names)."""
        p = self.plan
        with torch.device("meta"):
            for layer in model.language_model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                attn.q_proj = _resized(attn.q_proj, out_features=p.heads * p.head_dim)
                attn.k_proj = _resized(attn.k_proj, out_features=p.kv_heads * p.head_dim)
                attn.v_proj = _resized(attn.v_proj, out_features=p.kv_heads * p.head_dim)
                attn.o_proj = _resized(attn.o_proj, in_features=p.heads * p.head_dim)
                mlp.gate_proj = _resized(mlp.gate_proj, out_features=p.intermediate)
                mlp.up_proj = _resized(mlp.up_proj, out_features=p.intermediate)
                mlp.down_proj = _resized(mlp.down_proj, in_features=p.intermediate)
            width = model.language_model.embed_tokens.embedding_dim
            model.language_model.embed_tokens = nn.Embedding(p.vocab_rows, width,
                                                             _weight=torch.empty(p.vocab_rows, width))
            model.lm_head = _resized(model.lm_head, out_features=p.vocab_rows)
            if not self.holds_vision:
                model.vision_tower = None  # rank 0 runs them alone: nothing to hold here
                model.multi_modal_projector = None
            elif p.vision_split:
                width = p.vision_heads * p.vision_head_dim
                for layer in model.vision_tower.encoder.layers:
                    attn, mlp = layer.self_attn, layer.mlp
                    attn.q_proj, attn.k_proj, attn.v_proj = (_resized(m, out_features=width)
                                                             for m in (attn.q_proj, attn.k_proj, attn.v_proj))
                    attn.out_proj = _resized(attn.out_proj, in_features=width)
                    mlp.fc1 = _resized(mlp.fc1, out_features=p.vision_intermediate)
                    mlp.fc2 = _resized(mlp.fc2, in_features=p.vision_intermediate)
                proj = model.multi_modal_projector
                proj.linear_1 = _resized(proj.linear_1, out_features=p.projector_rows)
                proj.linear_2 = _resized(proj.linear_2, in_features=p.projector_rows)


def _resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A meta nn.Linear like `linear` with other widths (call under torch.device("meta"))."""
    return nn.Linear(in_features or linear.in_features, out_features or linear.out_features,
                     bias=linear.bias is not None)
