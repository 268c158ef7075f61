"""The decoder's single-token step in one native call (llavakit/native, `lk_decode_layers`).

A decode step of a small decoder is hundreds of small operations per layer when run op by op
(norms, rotary embeddings, cache writes, attention, residuals): on a 2-core CPU their dispatch
costs more than the matrix products of Qwen2-0.5B themselves. The native step runs every layer of
a decode step, reading the engine's paged key/value pool in place, with the same arithmetic as
text.py (bfloat16 intermediates rounded where PyTorch rounds them), so a model gives the same
tokens on either path.

`install(model)` attaches the step to a loaded model's TextModel, which hands it every cached
single-token forward it can take; anything it cannot take (training, other devices or dtypes,
non-SiLU MLPs, adapters wrapping the linears, no C compiler) runs on the PyTorch path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from .. import native
from .layers import rope_cos_sin
from .linear import FastLinear
from .quant import QuantLinear
from .text import PagedStep, TextModel


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("kind", ctypes.c_int), ("group", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int)]


_PROJ = ("q", "k", "v", "o", "gate", "up", "down")
_PROJ_MODULES = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                 ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


class _Layer(ctypes.Structure):
    _fields_ = [(name, _Linear) for name in _PROJ] + [
        ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("kpool", ctypes.c_void_p),
        ("vpool", ctypes.c_void_p), ("window", ctypes.c_int)]


def _describe(linear: nn.Module, dtype: torch.dtype) -> _Linear | None:
    """The kernel's view of a linear layer; None when unsupported."""
    if isinstance(linear, QuantLinear):
        if linear.compute_dtype != dtype:
            return None
        desc = _Linear(linear.qweight.data_ptr(), linear.scales.data_ptr(), 0, linear.bits, linear.group_size,
                       linear.out_features, linear.in_features)
    elif type(linear) is nn.Linear or type(linear) is FastLinear:
        w = linear.weight
        if w.dtype != dtype or not w.is_contiguous() or (dtype == torch.bfloat16 and linear.in_features % 16):
            return None
        desc = _Linear(w.data_ptr(), 0, 0, 32 if dtype == torch.float32 else 16, 0, linear.out_features,
                       linear.in_features)
    else:
        return None  # an adapter (LoRA) or another wrapper: its forward is not a plain product
    if linear.bias is not None:
        if linear.bias.dtype != dtype or not linear.bias.is_contiguous():
            return None
        desc.bias = linear.bias.data_ptr()
    return desc


# Every parameter, buffer or submodule assigned anywhere in the process bumps this: the structs
# are rebuilt when it moved since they were built. Walking the ~700 weights a step cost half a
# millisecond a token (cold caches after the weights stream by); this check costs nothing.
_assigned = 0


def _bump(*_) -> None:
    global _assigned
    _assigned += 1


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_bump)


class FusedDecoder:
    """The native decode step of one TextModel; built from its current weights, rebuilt if they change."""

    def __init__(self, text: TextModel):
        self.text = text
        # ((dtype, assignments so far, the TextModel's moves so far) when built, the structs)
        self._built: tuple | None = None

    def _build(self, dtype: torch.dtype):
        """The layers' structs for `dtype`, or None when a layer is not one the native step takes."""
        text, layers = self.text, (_Layer * len(self.text.layers))()
        for i, layer in enumerate(text.layers):
            for name, (parent, attr) in zip(_PROJ, _PROJ_MODULES):
                described = _describe(getattr(getattr(layer, parent), attr), dtype)
                if described is None:
                    return None
                setattr(layers[i], name, described)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if norm.weight.dtype != dtype or not norm.weight.is_contiguous():
                    return None
            layers[i].attn_norm = layer.input_layernorm.weight.data_ptr()
            layers[i].mlp_norm = layer.post_attention_layernorm.weight.data_ptr()
            layers[i].window = text.cfg.sliding_windows[i] or 0
        return layers

    def _layers(self, dtype: torch.dtype):
        """The structs, rebuilt when a weight they point into may have been replaced or moved.

        Replaced: any module, parameter or buffer assignment (a load, a swapped layer). Moved: the
        TextModel's `_apply` (`.to()`, `.float()`, ...), which gives parameters new storage in place.
        A weight's storage swapped by hand (`param.data = t`) is not seen: call `invalidate()`.
        """
        key = (dtype, _assigned, self.text.weights_moved)
        if self._built is not None and self._built[0] == key:
            return self._built[1]
        layers = self._build(dtype)
        self._built = None if layers is None else (key, layers)
        return layers

    def invalidate(self) -> None:
        """Rebuild the structs before the next step (after changing a weight's storage by hand)."""
        self._built = None

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, cache: PagedStep) -> torch.Tensor | None:
        """Final-normed hidden states (B, 1, D) of a single-token step, or None to run the PyTorch path."""
        dtype, cfg = embeds.dtype, self.text.cfg
        if (embeds.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled()
                or embeds.shape[1] != 1 or cfg.hidden_act != "silu" or cfg.head_dim > 512):
            return None
        if cache.keys[0].dtype != dtype:
            return None
        lib = native.library()
        if lib is None:
            return None
        layers = self._layers(dtype)
        if layers is None:
            return None
        for i in range(len(layers)):
            layers[i].kpool = cache.keys[i].data_ptr()
            layers[i].vpool = cache.values[i].data_ptr()
        b = embeds.shape[0]
        cos, sin = rope_cos_sin(self.text.inv_freq, positions, dtype)  # (B, 1, 1, hd), rounded like text.py's
        cos = cos.reshape(b, -1).float().contiguous()
        sin = sin.reshape(b, -1).float().contiguous()
        x = embeds.reshape(b, -1).contiguous().clone()
        read = cache.read_slots.contiguous()
        write = cache.write_slots.contiguous()
        pos = positions.reshape(b).contiguous()
        code = 1 if dtype == torch.bfloat16 else 0
        rc = lib.lk_decode_layers(ctypes.addressof(layers), len(layers), self.text.norm.weight.data_ptr(), x.data_ptr(), b,
                                  cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                  cfg.intermediate_size, ctypes.c_float(cfg.rms_norm_eps), cos.data_ptr(),
                                  sin.data_ptr(), write.data_ptr(), read.data_ptr(), pos.data_ptr(), read.shape[1],
                                  code, code)
        if rc != 0:
            return None
        return x.view(b, 1, -1)


def install(model: nn.Module) -> bool:
    """Give `model`'s decoder the native single-token step; returns whether the library is available."""
    if native.library() is None:
        return False
    text = model.language_model
    text.fused_decode = FusedDecoder(text)
    return True
