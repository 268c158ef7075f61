"""Weight-only int8 quantisation of the language model (`--quantize int8`).

Decoding one token reads every decoder weight once, so on a CPU its speed is set by memory
bandwidth, and int8 weights are half the bytes of bfloat16 ones. Each output channel gets one
scale (symmetric: its largest magnitude maps to 127); activations stay in the compute dtype.

Per phase: a few rows at a time (decode) run PyTorch's int8 weight kernel, which reads the int8
bytes directly; many rows at once (prefill) dequantise the weight once and run the ordinary
matmul, which is compute-bound and fastest in the compute dtype. The vision tower and the
projector run once per image and stay unquantised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

QUANTIZE_CHOICES = ("none", "int8")
# At or below this many rows the int8 kernel wins; above it dequantise-then-matmul does. Measured
# on a 2-core CPU, bf16, a 4864x896 weight: one row 0.09 ms (bf16 matmul 0.20 ms); the kernel's cost
# grows with the rows (32 rows 0.92 ms) while dequantising costs 0.5 ms once and the bf16 matmul
# then 0.44 ms.
INT8_KERNEL_MAX_ROWS = 32

_DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (N, K), float32 scales (N,)) with weight ~= int8 * scales[:, None]."""
    w = weight.detach()
    scales = w.abs().amax(dim=1).float().clamp(min=1e-12) / 127.0  # the max is exact in any float dtype
    # In place after one float32 copy: a load quantises half a billion weights of a 0.5B model.
    q = w.to(torch.float32, copy=True).mul_((1.0 / scales)[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 with one scale per output channel."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise `linear`'s weight; the bias and the compute dtype are kept."""
        q, s = quantize_weight(linear.weight)
        return cls(q.to(linear.weight.device), s.to(linear.weight.device), linear.bias, linear.weight.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def dequantized(self) -> torch.Tensor:
        """The weight in the compute dtype, (out_features, in_features)."""
        return self.qweight * self.scales[:, None]  # one pass: int8 * float promotes to the float dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= INT8_KERNEL_MAX_ROWS and x.device.type == "cpu" and x.dtype == self.dtype:
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scales)
        else:
            y = F.linear(rows.to(self.dtype), self.dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check_method(method: str) -> None:
    """Raise ConfigError unless `method` is one of QUANTIZE_CHOICES."""
    if method not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZE_CHOICES)}.")


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantise `model`'s decoder linear layers and output head in place; returns `model`.

    method: "none" (a no-op) or "int8". The input embeddings keep their dtype: a lookup reads one
    row per token, so their size does not slow decoding. Raises ConfigError on an unknown method.
    """
    check_method(method)
    if method == "none":
        return model
    for layer in model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in _DECODER_LINEARS:
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(linear))
    model.lm_head = Int8Linear.from_linear(model.lm_head)
    return model
