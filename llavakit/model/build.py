"""Build a LlavaModel from a checkpoint folder: construct on the meta device, fill from the weights.

Moved here from weights.py so that the weight reader (keys, files, tensors) knows nothing of the
architecture (DESIGN.md, "Never": Load → Model); this is the one place that builds a loaded model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import LlavaConfig
from ..weights import KeyMap, assign_weights, load_state
from .layers import rope_inv_freq
from .llava import LlavaModel
from .quant import loading_converter


def load_model(folder: Path, cfg: LlavaConfig, dtype: torch.dtype,
               sources: list[tuple[Path, KeyMap]] | None = None, quantize: str = "none",
               stored_group_size: int | None = None, split=None) -> LlavaModel:
    """Build the architecture of `cfg` without allocating it, then fill it from `folder` in `dtype`.

    quantize: "none", "int8" or "int4": the decoder's linear layers and the output head are quantised
    tensor by tensor as they are read (see llavakit/model/quant.py); with stored_group_size, the
    checkpoint already holds them in that form, in groups of stored_group_size.
    split: one tensor-parallel rank's share (llavakit/parallel/shard.py's Split): its `localize` gives
    the meta model that rank's layer widths before anything is read, and its `take` says which slice
    of each stored tensor the rank reads. The model file itself stays single-device.
    """
    with torch.device("meta"):
        model = LlavaModel(cfg)
    if split is not None:
        split.localize(model)
    convert = loading_converter(model, quantize, dtype, stored_group_size)
    assign_weights(model, load_state(folder, model, dtype, sources, convert, None if split is None else split.take))
    model.tie_weights()
    # Non-persistent buffers are not in the checkpoint; rebuild them on the CPU.
    model.language_model.inv_freq = rope_inv_freq(cfg.text.rope, cfg.text.head_dim)
    return model.eval()
