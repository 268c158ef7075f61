"""The decoder's single-token step in one native call (llavakit/native, `lk_decode_layers`).

A decode step of a small decoder is hundreds of small operations per layer when run op by op
(norms, rotary embeddings, cache writes, attention, residuals): on a 2-core CPU their dispatch
costs more than the matrix products of Qwen2-0.5B themselves. The native step runs every layer of
a decode step, reading the engine's paged key/value pool in place, with the same arithmetic as
text.py (bfloat16 intermediates rounded where PyTorch rounds them), so a model gives the same
tokens on either path.

`install(model)` attaches the step to a loaded model's TextModel, which hands it every cached
single-token forward it can take; LlavaModel.decode first asks it for the logits (`logits`), the
output head run in the same call. Anything it cannot take (training, other devices or dtypes,
non-SiLU MLPs, adapters wrapping the linears, hooks on the head or the decoder, no C compiler)
runs on the PyTorch path.
"""

from __future__ import annotations

import ctypes
import weakref

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
        self._rope_tables: tuple | None = None  # (that key, cos (n, hd), sin (n, hd))
        self._head_built: tuple | None = None  # (that key and the head's id, its struct, the head)
        self._pools: tuple | None = None  # (weak refs to the pools last pointed at, their versions, the structs)

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
        self._built = self._head_built = self._rope_tables = self._pools = None

    def _rope(self, dtype: torch.dtype, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 (n, hd) cos and sin tables, row p for position p, covering every position asked for.

        Computed by rope_cos_sin itself, so each row is what text.py computes for that position;
        they grow by doubling, and follow the weights' key (inv_freq is a buffer).
        """
        need = int(positions.max()) + 1
        key = (dtype, _assigned, self.text.weights_moved)
        if self._rope_tables is None or self._rope_tables[0] != key or self._rope_tables[1].shape[0] < need:
            n = max(1024, 1 << (need - 1).bit_length())
            cos, sin = rope_cos_sin(self.text.inv_freq, torch.arange(n)[None], dtype)  # (1, 1, n, hd)
            self._rope_tables = (key, cos.reshape(n, -1).float().contiguous(), sin.reshape(n, -1).float().contiguous())
        return self._rope_tables[1], self._rope_tables[2]

    def _point_at(self, layers, cache: PagedStep) -> None:
        """Point the structs at the pool tensors, unless they point at these already.

        The engine's pools count replacements of their tensors (`version`); a plain list is
        pointed at every step.
        """
        keys, values = cache.keys, cache.values
        stamp = (getattr(keys, "version", None), getattr(values, "version", None))
        seen = self._pools
        if (stamp[0] is not None and stamp[1] is not None and seen is not None and seen[0]() is keys
                and seen[1]() is values and seen[2] == stamp and seen[3] is layers):
            return
        for i in range(len(layers)):
            layers[i].kpool = keys[i].data_ptr()
            layers[i].vpool = values[i].data_ptr()
        try:
            self._pools = (weakref.ref(keys), weakref.ref(values), stamp, layers)
        except TypeError:  # a plain list: no weak reference, pointed at again next step
            self._pools = None

    def _head(self, head: nn.Module, dtype: torch.dtype) -> _Linear | None:
        """The output head's struct, kept beside the layers' (same key); None when the kernel cannot take it
        or when the head or the decoder has hooks, which this call, made instead of theirs, would skip."""
        if any(m._forward_hooks or m._forward_pre_hooks for m in (head, self.text)) or _global_hooks():
            return None
        key = (dtype, _assigned, self.text.weights_moved, id(head))
        if self._head_built is None or self._head_built[0] != key:
            self._head_built = (key, _describe(head, dtype), head)  # the module kept: its id stays its own
        return self._head_built[1]

    def _run(self, embeds: torch.Tensor, positions: torch.Tensor, cache: PagedStep,
             head: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(final-normed hidden (B, 1, D), logits (B, 1, V) or None) of a single-token step, or None."""
        dtype, cfg = embeds.dtype, self.text.cfg
        if (embeds.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled()
                or embeds.shape[1] != 1 or cfg.hidden_act != "silu" or cfg.head_dim > 512):
            return None
        if cache.keys[0].dtype != dtype:
            return None
        lib = native.library()
        if lib is None:
            return None
        head_struct = None
        if head is not None:
            head_struct = self._head(head, dtype)
            if head_struct is None:
                return None
        layers = self._layers(dtype)
        if layers is None:
            return None
        self._point_at(layers, cache)
        b = embeds.shape[0]
        cos, sin = self._rope(dtype, positions)
        x = embeds.reshape(b, -1).contiguous().clone()
        read = cache.read_slots.contiguous()
        write = cache.write_slots.contiguous()
        pos = positions.reshape(b).contiguous()
        logits = None if head is None else torch.empty(b, 1, head_struct.n, dtype=dtype)
        code = 1 if dtype == torch.bfloat16 else 0
        rc = lib.lk_decode_layers(ctypes.addressof(layers), len(layers), self.text.norm.weight.data_ptr(), x.data_ptr(), b,
                                  cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                  cfg.intermediate_size, ctypes.c_float(cfg.rms_norm_eps), cos.data_ptr(),
                                  sin.data_ptr(), write.data_ptr(), read.data_ptr(), pos.data_ptr(), read.shape[1],
                                  code, code, None if head is None else ctypes.addressof(head_struct),
                                  None if logits is None else logits.data_ptr())
        if rc != 0:
            return None
        return x.view(b, 1, -1), logits

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, cache: PagedStep) -> torch.Tensor | None:
        """Final-normed hidden states (B, 1, D) of a single-token step, or None to run the PyTorch path."""
        out = self._run(embeds, positions, cache, None)
        return None if out is None else out[0]

    def logits(self, embeds: torch.Tensor, positions: torch.Tensor, cache: PagedStep,
               head: nn.Module) -> torch.Tensor | None:
        """Logits (B, 1, V) in the model dtype of a single-token step with `head` (the LM head) in the same
        native call, or None when the step or the head is not one it takes (then run layers and head apart)."""
        out = self._run(embeds, positions, cache, head)
        return None if out is None else out[1]


def _global_hooks() -> bool:
    """Whether module hooks registered for every module are present (a native head would skip them)."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def install(model: nn.Module) -> bool:
    """Give `model`'s decoder the native single-token step; returns whether the library is available."""
    if native.library() is None:
        return False
    text = model.language_model
    text.fused_decode = FusedDecoder(text)
    return True
