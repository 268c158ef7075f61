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


def _describe(linear: nn.Module, dtype: torch.dtype) -> tuple[_Linear, list[str]] | None:
    """The kernel's view of a linear layer and the names of the tensors it points into; None when unsupported."""
    if isinstance(linear, QuantLinear):
        if linear.compute_dtype != dtype:
            return None
        names = ["qweight", "scales"]
        desc = _Linear(linear.qweight.data_ptr(), linear.scales.data_ptr(), 0, linear.bits, linear.group_size,
                       linear.out_features, linear.in_features)
    elif type(linear) is nn.Linear or type(linear) is FastLinear:
        w = linear.weight
        if w.dtype != dtype or not w.is_contiguous() or (dtype == torch.bfloat16 and linear.in_features % 16):
            return None
        names = ["weight"]
        desc = _Linear(w.data_ptr(), 0, 0, 32 if dtype == torch.float32 else 16, 0, linear.out_features,
                       linear.in_features)
    else:
        return None  # an adapter (LoRA) or another wrapper: its forward is not a plain product
    if linear.bias is not None:
        if linear.bias.dtype != dtype or not linear.bias.is_contiguous():
            return None
        desc.bias = linear.bias.data_ptr()
    return desc, names + ["bias"]


def _entry(owner: nn.Module, name: str, value) -> tuple[dict, str, object, int | None]:
    """(the dict of `owner` that holds `name`, name, value, its data pointer if a tensor) for a cheap check."""
    for d in (owner._parameters, owner._buffers, owner._modules, owner.__dict__):
        if name in d:
            return d, name, value, value.data_ptr() if isinstance(value, torch.Tensor) else None
    return _Lookup(owner), name, value, None  # a property or class attribute: looked up each time


class _Lookup:
    """A module's attribute looked up as a dict would be (the slow way, for what no dict holds)."""

    def __init__(self, owner: nn.Module):
        self.owner = owner

    def get(self, name: str):
        return getattr(self.owner, name, None)


class FusedDecoder:
    """The native decode step of one TextModel; built from its current weights, rebuilt if they change."""

    def __init__(self, text: TextModel):
        self.text = text
        # (dtype, [(dict, key, value, data pointer)] for every module and tensor the structs were built
        # from, the structs): checked before every step, so it reads the modules' own dicts (nn.Module
        # attribute lookups for ~700 entries took about a millisecond a token)
        self._built: tuple | None = None

    def _build(self, dtype: torch.dtype):
        text, held, layers = self.text, [], (_Layer * len(self.text.layers))()
        for i, layer in enumerate(text.layers):
            for name, (parent, attr) in zip(_PROJ, _PROJ_MODULES):
                owner = getattr(layer, parent)
                linear = getattr(owner, attr)
                described = _describe(linear, dtype)
                if described is None:
                    return None
                setattr(layers[i], name, described[0])
                held.append((owner, attr, linear))
                held += [(linear, t, getattr(linear, t)) for t in described[1]]
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if norm.weight.dtype != dtype or not norm.weight.is_contiguous():
                    return None
                held.append((norm, "weight", norm.weight))
            layers[i].attn_norm = layer.input_layernorm.weight.data_ptr()
            layers[i].mlp_norm = layer.post_attention_layernorm.weight.data_ptr()
            layers[i].window = text.cfg.sliding_windows[i] or 0
        held.append((text.norm, "weight", text.norm.weight))
        return held, layers

    def _layers(self, dtype: torch.dtype):
        """The structs, rebuilt when any weight they point into was replaced or moved (a load, a `.to()`)."""
        if self._built is not None:
            built_dtype, held, layers = self._built
            if built_dtype == dtype and all(d.get(key) is value and (ptr is None or value.data_ptr() == ptr)
                                            for d, key, value, ptr in held):
                return layers
        built = self._build(dtype)
        self._built = None if built is None else (dtype, [_entry(*h) for h in built[0]], built[1])
        return None if built is None else built[1]

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
