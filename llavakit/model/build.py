"""Build a LlavaModel from a checkpoint folder: construct on the meta device, fill from the weights.

Moved here from weights.py so that the weight reader (keys, files, tensors) knows nothing of the
architecture (DESIGN.md, "Never": Load → Model); this is the one place that builds a loaded model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import LlavaConfig
from ..runtime import HugePageArena, huge_pages_available
from ..weights import KeyMap, assign_weights, canonical_key, load_state
from .layers import rope_inv_freq
from .llava import LlavaModel
from .quant import GROUP_SIZE, TILE, loading_converter, quantized_names
from .quant_cache import QuantizedCache

HUGE_MIN_NUMEL = 2**16  # smaller tensors (norms, biases) are not worth a copy


def _into_huge_pages(model: LlavaModel, dtype: torch.dtype):
    """weights.py's converter that copies the decoder's and the head's large float weights into huge pages."""
    arena, known = HugePageArena(), set(model.state_dict())

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if (not name.startswith(("language_model.", "lm_head.")) or name not in known
                or not tensor.is_floating_point() or tensor.numel() < HUGE_MIN_NUMEL):
            return None
        return {name: arena.copy(tensor.to(dtype))}

    return convert


def _as_named(key: str) -> str:
    """The cache's key map: it stores llavakit names."""
    return key


def load_model(folder: Path, cfg: LlavaConfig, dtype: torch.dtype,
               sources: list[tuple[Path, KeyMap]] | None = None, quantize: str = "none",
               stored_group_size: int | None = None, split=None, huge_pages: bool = False) -> LlavaModel:
    """Build the architecture of `cfg` without allocating it, then fill it from `folder` in `dtype`.

    quantize: "none", "int8" or "int4": the decoder's linear layers and the output head are quantised
    tensor by tensor as they are read (see llavakit/model/quant.py); with stored_group_size, the
    checkpoint already holds them in that form, in groups of stored_group_size. Quantised on load, they
    are kept in a disk cache and mapped from it (llavakit/model/quant_cache.py): a later load reads
    them from there instead of quantising again.
    split: one tensor-parallel rank's share (llavakit/parallel/shard.py's Split): its `localize` gives
    the meta model that rank's layer widths before anything is read, and its `take` says which slice
    of each stored tensor the rank reads. The model file itself stays single-device.
    huge_pages: place the decoder's and the head's weights in 2 MB pages where the system offers
    them (llavakit/runtime.py, HugePageArena): faster CPU decoding; their file pages are dropped.
    """
    with torch.device("meta"):
        model = LlavaModel(cfg)
    if split is not None:
        split.localize(model)
    cache = None
    if quantize != "none" and stored_group_size is None and split is None:
        cache = QuantizedCache.for_load([src for src, _ in sources] if sources else [folder], quantize, GROUP_SIZE,
                                        TILE, quantized_names(model))
    cached = cache is not None and cache.ready()
    convert = loading_converter(model, quantize, dtype, stored_group_size, cached)
    if convert is None and huge_pages and huge_pages_available():
        convert = _into_huge_pages(model, dtype)
    if cached:
        sources = [*(sources or [(folder, canonical_key)]), (cache.folder, _as_named)]
    state = load_state(folder, model, dtype, sources, convert, None if split is None else split.take)
    if cache is not None and not cached:
        cache.store(state)  # the quantised weights move from memory to the mapped cache files
    assign_weights(model, state)
    model.tie_weights()
    # Non-persistent buffers are not in the checkpoint; rebuild them on the CPU.
    model.language_model.inv_freq = rope_inv_freq(cfg.text.rope, cfg.text.head_dim)
    return model.eval()
