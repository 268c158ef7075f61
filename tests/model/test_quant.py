"""Weight-only int8: the kernel and the dequantised path agree, and a quantised model stays close."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import llavakit
from llavakit.engine.sampling import SamplingParams
from llavakit.errors import ConfigError
from llavakit.model.quant import INT8_KERNEL_MAX_ROWS, Int8Linear, quantize_weight


def test_quantize_weight_round_trip_error_is_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]  # channels of very different sizes
    before = w.clone()
    q, s = quantize_weight(w)
    assert torch.equal(w, before)  # the model's own weight (tied to the embeddings, maybe) is left alone
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert int(q.abs().max()) == 127
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_and_dequantised_matmul_agree(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(128, 72, bias=True).to(dtype).requires_grad_(False)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(3, INT8_KERNEL_MAX_ROWS + 5, 128, dtype=dtype)
    few = q(x[:, :2])  # 6 rows: the int8 kernel
    many = q(x)  # 63 rows: dequantise, then matmul
    assert few.shape == (3, 2, 72) and many.shape == (3, INT8_KERNEL_MAX_ROWS + 5, 72)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert float((few.float() - many[:, :2].float()).abs().max()) <= tol * float(many.abs().max())
    exact = x.float() @ (q.qweight.float() * q.scales.float()[:, None]).T + linear.bias.float()
    assert float((many.float() - exact).abs().max()) <= tol * float(exact.abs().max())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("name", ["qwen2_siglip", "next_mistral", "onevision"])
def test_int8_model_logits_and_greedy_answer(checkpoint, models, name):
    vlm, _, _ = models(name)
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 140, 3), dtype=np.uint8))
    q = llavakit.load(checkpoint(name), dtype=torch.float32, quantize="int8")
    layer = q.model.language_model.layers[0]
    assert isinstance(layer.mlp.down_proj, Int8Linear) and isinstance(q.model.lm_head, Int8Linear)
    assert q.dtype == torch.float32 and q.model.vision_tower.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32
    conv = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "What is it?"}]}]
    batch = vlm.prepare([conv])
    want, got = vlm.forward(batch), q.forward(batch)
    assert _cosine(want, got) >= 0.999
    assert float((q.forward(batch, last_only=True)[:, 0] - got[:, -1]).abs().max()) <= 1e-5  # only the head's last row
    # Decode steps run the int8 kernel (one row each) on the KV cache; a full forward over the
    # answer runs the dequantised weights. Both must pick the same greedy tokens.
    out = q.generate([conv], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    n = batch.input_ids.shape[1]
    ids = torch.cat([batch.input_ids, torch.tensor([out.token_ids[:-1]])], dim=1)
    forced = dataclasses.replace(batch, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert q.forward(forced)[0, n - 1:].argmax(-1).tolist() == out.token_ids


def test_unknown_quantization_is_refused(checkpoint):
    with pytest.raises(ConfigError, match="unknown quantization 'int4'; choose one of none, int8"):
        llavakit.load(checkpoint("onevision"), quantize="int4")
