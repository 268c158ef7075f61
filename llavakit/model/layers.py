"""Building blocks shared by the towers and the decoders: norms, activations, rotary embeddings.

Dimension letters: B batch, T query tokens, S key tokens, H query heads, Hkv key/value heads,
hd head dim, D model width.
"""

from __future__ import annotations

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


CHUNK_QUERIES = 128  # query rows per block: a block's float32 scores stay small enough for the caches
BLOCK_MAX_KEYS = 2048  # beyond this a block's scores outgrow the caches and SDPA's kernel is as fast


def uses_block_attention(q: torch.Tensor, keys: int) -> bool:
    """Whether `block_attention` replaces SDPA: half-precision inference on the CPU, up to BLOCK_MAX_KEYS keys.

    PyTorch's CPU flash-attention kernel reaches about 130 GFLOP/s in bfloat16 on the development
    machine, where its bfloat16 matmuls reach about 800. Float32 keeps SDPA (exact parity with
    transformers' default path), training keeps SDPA's fused backward, GPUs keep their kernels.
    """
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and keys <= BLOCK_MAX_KEYS
            and not torch.is_grad_enabled())


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of (B, H, T, hd) queries over (B, Hkv, S, hd) keys/values, CHUNK_QUERIES rows at a time.

    The numerics of transformers' "eager" attention: scores from a half-precision matmul, softmax in
    float32, probabilities back in half precision for the values. The queries are the last T of the
    S positions (S > T: a prefill after a cached prefix); each block reads only the keys it may see.
    Query heads that share a key/value head are multiplied against it together, without repeating it.
    Against SDPA on the same (B, T, H, hd)-transposed bfloat16 inputs, 2 threads: a 1.5k-token
    prefill of a 14-head, 2-key-head layer takes 19.5 against 33.5 ms; a 5.4k-token one 340 against
    355 ms alone but no faster inside a whole prefill (hence BLOCK_MAX_KEYS). For a vision tower's
    729 patches, with as many key as query heads, it is no faster than SDPA (16.5 against 16.6 ms),
    so towers keep SDPA.
    """
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
        scores = torch.matmul(qg[:, :, :, start:stop], kt[..., :keys]).float().mul_(scale)  # (B, Hkv, G, n, keys)
        scores[..., keys - n:].masked_fill_(future[:n, :n], float("-inf"))
        torch.softmax(scores, -1, out=scores)
        out[:, :, :, start:stop] = torch.matmul(scores.to(q.dtype), vg[..., :keys, :])
    return out.view(b, h, t, hd)


def embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised: its weights always come from a checkpoint.

    nn.Embedding's own random init calls normal_, which on the meta device imports torch._dynamo:
    about 1 s of a 1.4 s model load.
    """
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
