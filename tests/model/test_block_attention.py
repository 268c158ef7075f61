"""Blockwise causal attention of half-precision CPU prefills: SDPA's results, transformers' eager numerics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llavakit.model import layers
from llavakit.model.layers import (BLOCK_MAX_KEYS, block_attention, dense_attention, uses_block_attention,
                                   uses_dense_attention)


def _inputs(t: int, s: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    b, h, hkv, hd = 2, 6, 2, 16
    # As the decoder hands them over: transposed views of (B, T, H, hd) projections.
    q = torch.randn(b, t, h, hd, generator=g).transpose(1, 2)
    k = torch.randn(b, s, hkv, hd, generator=g).transpose(1, 2)
    v = torch.randn(b, s, hkv, hd, generator=g).transpose(1, 2)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sdpa(q, k, v):
    """Float32 reference: the T queries are the last T of the S positions."""
    t, s = q.shape[2], k.shape[2]
    allowed = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, enable_gqa=True)


def _eager(q, k, v):
    """transformers' eager attention on the whole matrix: half-precision scores, float32 softmax."""
    t, s, g = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    future = torch.arange(s)[None, :] > torch.arange(s - t, s)[:, None]
    probs = scores.masked_fill(future, float("-inf")).softmax(-1).to(q.dtype)
    return probs @ v


@pytest.mark.parametrize("t,s", [(1, 1), (7, 7), (300, 300), (256, 256), (100, 350), (129, 400)])
def test_float32_matches_sdpa(t, s, monkeypatch):
    monkeypatch.setattr(layers, "CHUNK_QUERIES", 64)  # several blocks, one ragged, and a cached prefix
    q, k, v = _inputs(t, s, torch.float32)
    out = block_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert (out - _sdpa(q, k, v)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_eager_numerics(dtype, monkeypatch):
    monkeypatch.setattr(layers, "CHUNK_QUERIES", 64)
    q, k, v = _inputs(200, 260, dtype)
    out = block_attention(q, k, v)
    assert out.dtype == dtype
    # Blocks change only the order of float32 reductions against the whole-matrix formula.
    assert (out.float() - _eager(q, k, v).float()).abs().max().item() <= 1e-2
    assert (out.float() - _sdpa(q, k, v)).abs().max().item() <= 3e-2


def test_used_only_for_half_precision_cpu_inference_up_to_the_key_limit():
    bf16 = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert uses_block_attention(bf16, BLOCK_MAX_KEYS)
        assert not uses_block_attention(bf16, BLOCK_MAX_KEYS + 1)  # very long prompts: SDPA holds no score block
        assert not uses_block_attention(bf16.float(), 16)  # float32 keeps SDPA, for exact parity
    with torch.enable_grad():
        assert not uses_block_attention(bf16, 16)  # training keeps SDPA's fused backward


def _vision_inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    # As a vision tower hands them over: (N, L, H, hd) projections, transposed to (N, H, L, hd).
    q, k, v = (torch.randn(3, 50, 4, 16, generator=g).transpose(1, 2).to(dtype) for _ in range(3))
    return q, k, v


def test_dense_attention_float32_matches_sdpa():
    q, k, v = _vision_inputs(torch.float32)
    out = dense_attention(q, k, v)
    assert out.shape == q.shape and out.stride() == q.stride()  # the caller's transpose back stays a view
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_attention_half_precision_follows_eager_numerics(dtype):
    q, k, v = _vision_inputs(dtype)
    out = dense_attention(q, k, v)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    eager = scores.softmax(-1).to(dtype) @ v
    assert out.dtype == dtype and (out.float() - eager.float()).abs().max().item() <= 1e-2
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.float() - exact).abs().max().item() <= 3e-2


def test_dense_attention_only_for_half_precision_cpu_inference():
    bf16 = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert uses_dense_attention(bf16)
        assert not uses_dense_attention(bf16.float())
    with torch.enable_grad():
        assert not uses_dense_attention(bf16)


def test_vision_tower_in_bfloat16_uses_it_and_agrees_with_sdpa(monkeypatch):
    from llavakit.config import VisionConfig
    from llavakit.model import vision

    cfg = VisionConfig.from_hf({"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64,
                                  "patch_size": 16})
    torch.manual_seed(0)
    tower = vision.VisionTower(cfg)
    for p in tower.parameters():
        torch.nn.init.normal_(p, std=0.05)
    tower = tower.to(torch.bfloat16).eval()
    pixels = torch.randn(2, 3, 64, 64)
    calls = []
    monkeypatch.setattr(vision, "dense_attention", lambda q, k, v: calls.append(q.shape) or dense_attention(q, k, v))
    with torch.inference_mode():
        dense = tower(pixels, (-1,))
        assert calls == [(2, 4, 16, 16)] * 2  # every layer, all images
        monkeypatch.setattr(vision, "uses_dense_attention", lambda q: False)
        sdpa = tower(pixels, (-1,))
    assert (dense.float() - sdpa.float()).abs().max().item() <= 5e-2 * sdpa.float().abs().max().item()
