"""llava-shapes, the model shipped as the default: its files, its answers, and transformers' agreement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llavakit
from llavakit.cli import SHIPPED_MODEL, default_model_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The example questions of docs/shapes-world.md and the answers the shipped model gives (all right; its
# accuracy table says how often it is right in general). The first is `make chat`'s.
README_QUESTIONS = [
    (["--image", "picture.png"], "Describe the picture in one sentence.",
     "A red circle, a green triangle and a blue square on a white background."),
    (["--image", "picture.png"], "What shapes are in the picture?", "a red circle, a green triangle and a blue square"),
    (["--image", "picture.png"], "How many shapes are there?", "3"),
    (["--image", "picture.png"], "What colour is the square?", "blue"),
    (["--image", "picture.png"], "Is the circle to the left or to the right of the square?",
     "the circle left; the square middle; so left"),
    (["--image", "picture.png"], "Is the triangle above or below the square?", "the triangle top; the square bottom; so above"),
    (["--image", "picture.png"], "What colours are the square and the circle?", "the square blue; the circle red"),
    (["--image", "picture.png"], "Where are the triangle and the circle?", "the triangle top right; the circle top left"),
    (["--image", "two-shapes.png"], "Describe the picture in one sentence.",
     "A purple triangle and an orange circle on a beige background."),
    (["--image", "two-shapes.png"], "What colour is the circle?", "orange"),
    (["--image", "two-shapes.png"], "Where is the triangle?", "the triangle middle left"),
    (["--image", "picture.png", "--image", "two-shapes.png"], "Which image has more shapes, the first or the second?",
     "the first"),
    (["--image", "two-shapes.png", "--image", "picture.png"], "Which image has more shapes, the first or the second?",
     "the second"),
    (["--video", "clip.mkv"], "Which way does the yellow square move?", "right"),
]
# Compared with transformers too: the two must agree on every answer, right or wrong.
MORE_QUESTIONS = [
    (["picture.png"], "What colour is the triangle?"),
    (["two-shapes.png"], "Is the triangle to the left or to the right of the circle?"),
]


def test_the_shipped_model_is_small_and_complete():
    assert default_model_dir() == SHIPPED_MODEL
    weights = SHIPPED_MODEL / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert config["model_type"] == "llava_onevision" and config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["text_config"]["model_type"] == "qwen2" and config["image_grid_pinpoints"]
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                 "chat_template.json", "generation_config.json"):
        assert (SHIPPED_MODEL / name).is_file(), name


@pytest.mark.parametrize("args,question,answer", README_QUESTIONS, ids=[q for _, q, _ in README_QUESTIONS])
def test_readme_questions_through_the_cli(args, question, answer):
    media = [a if a.startswith("--") else str(EXAMPLES / a) for a in args]
    res = subprocess.run([sys.executable, "-m", "llavakit", "chat", *media, question], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == answer


def _conv(question, images=(), video=None):
    content = [{"type": "image", "image": str(EXAMPLES / i)} for i in images]
    if video:
        content.append({"type": "video", "video": str(EXAMPLES / video)})
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def _reference_processor():
    """AutoProcessor when it can be built here (its video processor needs torchvision), else the same
    LlavaOnevisionProcessor assembled from AutoImageProcessor and AutoTokenizer."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(SHIPPED_MODEL)
    except ImportError:
        from reference import onevision_reference_processor

        return onevision_reference_processor(SHIPPED_MODEL)


def test_transformers_gives_the_same_greedy_answers():
    from transformers import LlavaOnevisionForConditionalGeneration

    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    proc = _reference_processor()
    vlm = llavakit.load(SHIPPED_MODEL, dtype="float32")
    convs = [_conv(q, [a for a in args if a.endswith(".png")]) for args, q, _ in README_QUESTIONS
             if "--video" not in args] + [_conv(q, images) for images, q in MORE_QUESTIONS]
    for conv in convs:
        inputs = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=24, do_sample=False)
        want = proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert vlm.chat(conv, max_new_tokens=24).text == want.strip()
