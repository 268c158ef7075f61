"""Linear layers for CPU inference: a few rows through llavakit's kernels, many rows through PyTorch.

Decoding multiplies one row (per running request) by every weight matrix, which streams the whole
matrix from memory for very little arithmetic; prefill multiplies thousands of rows, which is
arithmetic-bound. The two want different kernels, so the layers here pick by row count:

- up to NATIVE_MAX_ROWS rows on a CPU: llavakit/native's matrix-vector kernels, which read the
  stored weight once at the machine's read bandwidth (bfloat16 weights here, int8/int4 blocks in
  quant.py). PyTorch's own bfloat16 single-row product reads about half as fast.
- more rows: PyTorch's matmul. On a CPU without native bfloat16 arithmetic (no AVX512-BF16/AMX,
  where oneDNN's bfloat16 GEMM is several times slower than float32), a bfloat16 weight is widened
  to float32 for the product and the result rounded back: the same numbers (bfloat16 products are
  exact in float32, and both accumulate in float32), at float32 speed.

Training (gradients on), other devices and other dtypes take plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .layers import widens

NATIVE_MAX_ROWS = 8  # above this, the kernel's per-row cost passes a matmul's
WIDEN_MIN_ROWS = 4  # below this, widening the weight costs more than the slow bfloat16 product


def widens_product(x: torch.Tensor) -> bool:
    """Whether `dense` computes its product with `x` through float32: `widens(x)`, and at least
    WIDEN_MIN_ROWS rows (one or two rows, a decode step without the native kernels, stay in
    bfloat16: converting the whole weight would cost more than the product)."""
    return widens(x) and x.numel() >= WIDEN_MIN_ROWS * x.shape[-1]


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`, computed through float32 where `widens_product(x)` says so."""
    if widens_product(x):
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(torch.bfloat16)
    return F.linear(x, weight, bias)


def kernel_for(x: torch.Tensor, in_features: int, multiple: int, max_rows: int = NATIVE_MAX_ROWS):
    """The native library when it can take `x` ((..., in_features) float32/bfloat16, at most
    `max_rows` rows, CPU, inference, in_features a multiple of `multiple`), else None."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled()
            or in_features % multiple or x.numel() > max_rows * in_features):
        return None
    return native.library()


def dtype_code(dtype: torch.dtype) -> int:
    """The kernels' activation/output dtype code: 0 float32, 1 bfloat16."""
    return 1 if dtype == torch.bfloat16 else 0


def native_out(x: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x as contiguous rows (M, K), an empty output (M, N) in x's dtype, M)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return rows, torch.empty(rows.shape[0], out_features, dtype=x.dtype), rows.shape[0]


def bias32_ptr(layer: nn.Module) -> int | None:
    """Address of a float32 copy of `layer.bias` (what the kernels add), refreshed when the bias changes."""
    bias = layer.bias
    if bias is None:
        return None
    version, copy = layer._bias32
    if version != bias._version or copy is None:
        copy = bias.detach().float().contiguous()
        layer._bias32 = (bias._version, copy)
    return copy.data_ptr()


class FastLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose few-row bfloat16 products run natively."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> FastLinear:
        """A FastLinear sharing `linear`'s weight and bias (tied weights stay tied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new._bias32 = (-1, None)  # (the bias's version counter, its float32 copy for the kernel)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        lib = kernel_for(x, self.in_features, 16) if w.dtype == torch.bfloat16 and w.is_contiguous() else None
        if lib is None:
            return dense(x, w, self.bias)
        rows, y, m = native_out(x, self.out_features)
        lib.lk_linear_bf16(rows.data_ptr(), dtype_code(x.dtype), w.data_ptr(), bias32_ptr(self), y.data_ptr(),
                           dtype_code(x.dtype), m, self.out_features, self.in_features)
        return y.view(*x.shape[:-1], self.out_features)


def speed_up_linears(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear of `model` a FastLinear, in place; returns `model`.

    A rewrite after loading (the model files stay plain PyTorch): the decoder and the output head
    gain the native single-row path, and every layer the float32 route for bfloat16 on CPUs
    without native bfloat16.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, FastLinear.wrap(child))
    return model
