"""Image `detail` as a token budget: low = one tile, high = any-res always, auto = the checkpoint's choice.

Token counts are checked against the processor's arithmetic and, where transformers has the same
layout (OneVision's one tile per image of a several-image prompt, any image alone), against it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit.errors import ConfigError, PromptError

PIXELS_ATOL = 1e-5


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


A, B = _image(0, 90, 40), _image(1, 33, 70)


def _conv(images, details, text="What is in the picture?"):
    parts = [{"type": "image", "image": im, **({"detail": d} if d else {})} for im, d in zip(images, details)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _image_tokens(vlm, batch) -> int:
    return int((batch.input_ids == vlm.config.image_token_id).sum())


def _ref_image_tokens(proc, image) -> int:
    """Image tokens transformers' processor gives one image alone in a prompt."""
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    ids = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")["input_ids"]
    return int((ids == proc.tokenizer.convert_tokens_to_ids(proc.image_token)).sum())


def test_onevision_low_is_the_several_image_tile_and_high_is_any_res(models):
    vlm, _, proc = models("onevision")
    base = vlm.config.image_features_per_tile
    low = vlm.prepare([_conv([A], ["low"])])
    assert _image_tokens(vlm, low) == base + 1 == low.image_layouts[0].tokens
    assert low.image_tiled == (False,) and low.pixel_values.shape[0] == 1
    # The tile is the one OneVision makes for each image of a several-image prompt (checked against
    # transformers in test_onevision.py), with the same features.
    pair = vlm.prepare([_conv([A, B], [None, None])])
    assert pair.image_tiled == (False, False)
    assert torch.equal(low.pixel_values[0], pair.pixel_values[0])
    with torch.inference_mode():
        one = vlm.model.image_features(low.pixel_values, low.image_layouts)
        two = vlm.model.image_features(pair.pixel_values, pair.image_layouts)
    assert torch.equal(one, two[: base + 1])
    # high tiles each image of a several-image prompt as if it were alone; auto keeps the reference's one tile.
    high = vlm.prepare([_conv([A, B], ["high", "high"])])
    assert high.image_tiled == (True, True)
    assert _image_tokens(vlm, high) == _ref_image_tokens(proc, A) + _ref_image_tokens(proc, B)
    alone = vlm.prepare([_conv([A], [None])])
    assert _image_tokens(vlm, alone) == _ref_image_tokens(proc, A) > base + 1
    assert vlm.processor.image_layout((A.height, A.width), True).tokens == _ref_image_tokens(proc, A)


def test_next_low_is_the_base_view_with_its_newline(models):
    vlm, _, _ = models("next_mistral")
    base = vlm.config.image_features_per_tile
    auto = vlm.prepare([_conv([A], [None])])
    low = vlm.prepare([_conv([A], ["low"])])
    assert _image_tokens(vlm, low) == base + 1 and low.pixel_values.shape[0] == 1
    assert float((low.pixel_values[0] - auto.pixel_values[0]).abs().max()) <= PIXELS_ATOL  # the base view
    with torch.inference_mode():
        full = vlm.model.image_features(auto.pixel_values, auto.image_layouts)
        one = vlm.model.image_features(low.pixel_values, low.image_layouts)
    assert torch.allclose(one[:base], full[:base], atol=1e-5)
    assert torch.equal(one[base], vlm.model.image_newline.to(one.dtype))
    # The whole model runs on it.
    out = vlm.chat(_conv([A], ["low"]), max_new_tokens=3, temperature=0)
    assert out.completion_tokens == 3 or out.finish_reason == "stop"


def test_llava_1_5_has_one_layout_whatever_the_detail(models):
    vlm, _, _ = models("llama")
    got = [vlm.prepare([_conv([A], [d])]) for d in (None, "low", "high")]
    for b in got[1:]:
        assert b.input_ids.tolist() == got[0].input_ids.tolist()
        assert torch.equal(b.pixel_values, got[0].pixel_values)


def test_max_image_tokens_lowers_auto_and_refuses_high(checkpoint):
    path = checkpoint("onevision")
    full = llavakit.load(path, dtype=torch.float32)
    auto_tokens = full.image_layout(A)["tokens"]
    low_tokens = full.image_layout(A, "low")["tokens"]
    assert low_tokens < auto_tokens
    capped = llavakit.load(path, dtype=torch.float32, max_image_tokens=auto_tokens - 1)
    assert capped.image_layout(A)["tokens"] == low_tokens
    assert _image_tokens(capped, capped.prepare([_conv([A], [None])])) == low_tokens
    with pytest.raises(PromptError) as e:
        capped.prepare([_conv([A], ["high"])])
    assert str(e.value) == (f"image 0 (90x40) costs {auto_tokens} tokens with detail 'high', more than the limit of "
                            f"{auto_tokens - 1} image tokens; send it with detail 'low' or 'auto', or raise the limit.")
    low_default = llavakit.load(path, dtype=torch.float32, image_detail="low")
    assert low_default.image_layout(A)["tokens"] == low_tokens
    assert low_default.image_layout(A, "high")["tokens"] == auto_tokens


def test_bad_detail_values_are_named():
    with pytest.raises(ConfigError, match="image_detail 'medium' is not one of auto, low, high"):
        llavakit.load("llava-shapes", image_detail="medium")
    with pytest.raises(ConfigError, match="max_image_tokens must be a positive integer or None, got 0"):
        llavakit.load("llava-shapes", max_image_tokens=0)
    vlm = llavakit.load("llava-shapes")
    with pytest.raises(PromptError, match="image detail 'tiny' is not one of auto, low, high"):
        vlm.prepare([_conv([A], ["tiny"])])


def test_the_shipped_model_still_answers_about_a_low_detail_picture():
    from pathlib import Path

    picture = Path(__file__).resolve().parents[2] / "examples" / "picture.png"
    vlm = llavakit.load("llava-shapes")

    def ask(question, detail):
        conv = [{"role": "user", "content": [{"type": "image", "image": str(picture), "detail": detail},
                                             {"type": "text", "text": question}]}]
        return vlm.chat(conv, max_new_tokens=24, temperature=0)

    low = ask("Describe the picture in one sentence.", "low")
    assert low.text == "A red circle, a green triangle and a blue square on a white background."
    assert low.prompt_tokens < ask("Describe the picture in one sentence.", "auto").prompt_tokens
    assert ask("What colour is the square?", "low").text == "blue"
