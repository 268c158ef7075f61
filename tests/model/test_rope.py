"""Rotary embeddings with scaling (Llama-3's and linear) against transformers."""

import pytest
import torch

import llavakit
from reference import load_reference, make_llava

SCALINGS = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
}


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_scaled_rope_logits_match(kind, tmp_path):
    path = make_llava(tmp_path, family="llama", text_extra={"rope_parameters": SCALINGS[kind]})
    vlm = llavakit.load(path, dtype=torch.float32)
    assert vlm.config.text.rope.kind == kind
    ref, _ = load_reference(path)
    ids = torch.randint(5, 400, (1, 150), generator=torch.Generator().manual_seed(0))  # past 64 positions
    batch = llavakit.Batch(ids, torch.ones_like(ids), None, (0,))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    assert float((vlm.forward(batch) - expected).abs().max()) <= 1e-4
