"""`make-random`: real architectures with random weights, loadable by llavakit and transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import llavakit
from llavakit.random_init import PRESETS
from reference import load_reference


@pytest.fixture(scope="module")
def onevision_05b(tmp_path_factory):
    out = tmp_path_factory.mktemp("ov05b") / "ckpt"
    res = subprocess.run([sys.executable, "-m", "llavakit", "make-random", "--preset", "llava-onevision-qwen2-0.5b",
                          "--layers", "1", "--dtype", "bfloat16", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out


def test_shapes_are_the_presets(onevision_05b):
    vlm = llavakit.load(onevision_05b, dtype="bfloat16")
    preset = PRESETS["llava-onevision-qwen2-0.5b"]
    text, vision = vlm.config.text, vlm.config.vision
    assert (text.hidden_size, text.num_heads, text.num_kv_heads, text.vocab_size, text.num_layers) == (
        preset["text"]["hidden_size"], 14, 2, 152000, 1)
    assert (vision.hidden_size, vision.image_size, vision.patch_size, vision.num_layers) == (1152, 384, 14, 1)
    assert vlm.model.language_model.embed_tokens.weight.shape == (152000, 896)
    assert vlm.model.lm_head.weight is vlm.model.language_model.embed_tokens.weight  # 0.5B ties them
    assert vlm.dtype == torch.bfloat16
    tok = vlm.processor.tokenizer
    assert tok.tok.get_vocab_size() == 152000
    assert (tok.token_id("<image>"), tok.token_id("<video>"), tok.token_id("<|im_end|>")) == (151646, 151647, 151645)
    assert json.loads((onevision_05b / "config.json").read_text())["vision_aspect_ratio"] == "anyres_max_9"


def test_transformers_loads_it_with_the_same_numbers(onevision_05b):
    ref, proc = load_reference(onevision_05b)
    vlm = llavakit.load(onevision_05b, dtype=torch.float32)
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8))
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    inputs = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    batch = vlm.prepare([conv])
    assert batch.input_ids.tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        want = ref.float()(**inputs).logits
    assert float((vlm.forward(batch) - want).abs().max()) <= 1e-4


def test_unknown_preset_is_refused(tmp_path):
    res = subprocess.run([sys.executable, "-m", "llavakit", "make-random", "--preset", "llava-13b", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "invalid choice: 'llava-13b'" in res.stderr
