"""Building blocks shared by the towers and the decoders: norms, activations, rotary embeddings.

Dimension letters: B batch, T query tokens, S key tokens, H query heads, Hkv key/value heads,
hd head dim, D model width.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeConfig


def activation(name: str):
    """The activation function transformers' `ACT2FN[name]` denotes, as a plain callable."""
    if name == "gelu":
        return F.gelu  # exact erf form
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")  # config parsing rejects these first


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, weight applied in the input dtype (as Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (hd/2,) float32 on the CPU for the configured rope type.

    Always on the CPU, even while a model is built on the meta device: arithmetic on meta tensors
    imports torch._dynamo, which costs about 1 s of a model load.
    """
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        # Llama-3.1's scaling: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, hd) for integer positions (B, T), computed in float32."""
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) queries or keys by their positions."""
    return x * cos + _rotate_half(x) * sin


CHUNK_QUERIES = 128  # query rows per block: a block's scores stay small enough for the shared cache
BLOCK_MAX_KEYS = 16384  # a block's half-precision scores: 128 x keys x heads x 2 bytes (59 MB for 14 heads)


@functools.cache
def bf16_matmul_is_native() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's AVX512-BF16 or AMX path).

    Without it (AVX2-only CPUs), oneDNN's bfloat16 matmul ran at 4.6 GFLOP/s against 29-48 for
    float32 on a 2-core AMD EPYC (Zen 1).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def widens(x: torch.Tensor) -> bool:
    """Whether products with `x` run through float32: bfloat16 inference on a CPU without native
    bfloat16. The results are the same numbers within bfloat16 rounding (bfloat16 products are exact
    in float32, and both accumulate in float32), at float32 speed."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not bf16_matmul_is_native())


def uses_block_attention(q: torch.Tensor, keys: int) -> bool:
    """Whether `block_attention` replaces SDPA: half-precision inference on the CPU, up to BLOCK_MAX_KEYS keys.

    PyTorch's CPU flash-attention kernel reaches about 130 GFLOP/s in bfloat16 on the development
    machine, where its bfloat16 matmuls reach about 800. Float32 keeps SDPA (exact parity with
    transformers' default path), training keeps SDPA's fused backward, GPUs keep their kernels.
    """
    return keys <= BLOCK_MAX_KEYS and uses_dense_attention(q)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of (B, H, T, hd) queries over (B, Hkv, S, hd) keys/values, CHUNK_QUERIES rows at a time.

    The numerics of transformers' "eager" attention: scores from a half-precision matmul, softmax in
    float32, probabilities back in half precision for the values. The queries are the last T of the
    S positions (S > T: a prefill after a cached prefix); each block reads only the keys it may see.
    Query heads that share a key/value head are multiplied against it together, without repeating it.
    Scores stay in half precision (scaled, masked and normalised in place), so a block of 5.4k keys
    fits the shared cache. Against SDPA on the same (B, T, H, hd)-transposed bfloat16 inputs,
    2 threads, a 14-head, 2-key-head layer: 18.4 against 35.8 ms at 1.5k tokens, 201 against 360 ms
    at 5.4k; the 0.5B decoder's whole prefill: 2.70 against 3.37 s at 2k tokens, 9.76 against
    13.06 s at 5k. Vision towers use `dense_attention`.
    """
    if widens(q):  # no native bfloat16 matmul on this CPU: the same blocks in float32
        return block_attention(q.float(), k.float(), v.float()).to(q.dtype)
    b, h, t, hd = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.reshape(b, hkv, g, t, hd)  # (B, Hkv, G, T, hd)
    kt = k.transpose(-1, -2).unsqueeze(2)  # (B, Hkv, 1, hd, S)
    vg = v.unsqueeze(2)  # (B, Hkv, 1, S, hd)
    out = torch.empty_like(qg)
    scale = hd**-0.5
    rows = min(t, CHUNK_QUERIES)
    # Within a block, query i may not see the block's own keys after i; a ragged last block uses the corner.
    future = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu(1)
    for start in range(0, t, CHUNK_QUERIES):
        stop = min(t, start + CHUNK_QUERIES)
        keys = s - t + stop  # the block sees keys up to its last query's position
        n = stop - start
        scores = torch.matmul(qg[:, :, :, start:stop], kt[..., :keys]).mul_(scale)  # (B, Hkv, G, n, keys)
        scores[..., keys - n:].masked_fill_(future[:n, :n], float("-inf"))
        # In place and in the input's dtype: PyTorch's CPU softmax accumulates half precision in float32
        # and rounds once, as eager's float32 softmax cast back does, without a float32 copy of the block.
        torch.softmax(scores, -1, out=scores)
        out[:, :, :, start:stop] = torch.matmul(scores, vg[..., :keys, :])
    return out.view(b, h, t, hd)


def uses_dense_attention(q: torch.Tensor) -> bool:
    """Whether a vision tower's attention runs through `dense_attention`: half-precision inference on the CPU
    (the condition `uses_block_attention` shares)."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled()


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention of (N, H, L, hd) queries, keys and values, one image at a time.

    A vision tower's layer: every patch sees every patch of its own image. One image's scores
    (H, L, L) in half precision (16 MB for SigLIP's 16 heads and 729 patches) stay in the shared
    cache while they are scaled, normalised in place and multiplied by the values; the numerics
    are transformers' "eager" ones, as in `block_attention`. Against SDPA's CPU kernel on the same
    transposed bfloat16 inputs, 2 threads: 8.6 against 16.4 ms per image and layer.
    """
    if widens(q):  # no native bfloat16 matmul on this CPU: the same product in float32
        return dense_attention(q.float(), k.float(), v.float()).to(q.dtype)
    out = torch.empty_like(q)  # keeps q's (N, L, H, hd) memory order, so the caller's transpose back is free
    scale = q.shape[-1] ** -0.5
    for i in range(q.shape[0]):
        scores = torch.matmul(q[i], k[i].transpose(-1, -2)).mul_(scale)  # (H, L, L)
        torch.softmax(scores, -1, out=scores)
        out[i] = torch.matmul(scores, v[i])
    return out


def embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised: its weights always come from a checkpoint.

    nn.Embedding's own random init calls normal_, which on the meta device imports torch._dynamo:
    about 1 s of a 1.4 s model load.
    """
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
