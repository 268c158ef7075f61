"""The single-query attention of decoding: equal to SDPA in float32, close to it in bfloat16."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llavakit.model.text import _decode_attention


def _inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    b, h, hkv, s, hd = 3, 6, 2, 50, 16
    # Keys and values as the paged cache hands them over: a transposed view of (B, S, Hkv, hd).
    q = torch.randn(b, h, 1, hd, generator=g)
    k = torch.randn(b, s, hkv, hd, generator=g).transpose(1, 2)
    v = torch.randn(b, s, hkv, hd, generator=g).transpose(1, 2)
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
    mask[1, ..., 40:] = False  # a shorter row: padding at the end
    mask[2, ..., :5] = False  # and padding in front
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)


def test_float32_matches_sdpa():
    q, k, v, mask = _inputs(torch.float32)
    out = _decode_attention(q, k, v, mask)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert (out - _sdpa(q, k, v, mask)).abs().max().item() <= 1e-5


def test_bfloat16_stays_close_to_float32_and_keeps_its_dtype():
    q, k, v, mask = _inputs(torch.bfloat16)
    out = _decode_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    want = _sdpa(q, k, v, mask)  # the same bfloat16 inputs, computed in float32
    assert (out.float() - want).abs().max().item() <= 2e-2  # bfloat16 rounding of probabilities and output
    mask_none = _decode_attention(q, k, v, None)  # no mask: every key counts
    assert (mask_none.float() - _sdpa(q, k, v, None)).abs().max().item() <= 2e-2
