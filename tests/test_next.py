"""LLaVA-NeXT (any-resolution) against transformers' LlavaNextForConditionalGeneration, float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit.errors import ConfigError, PromptError

LOGITS_ATOL = 1e-4
PIXELS_ATOL = 1e-5

VARIANTS = ["next_mistral", "next_llama_layers_list", "next_qwen2_tied", "next_siglip_full"]
# Tied random embeddings make greedy decoding repeat the last input token; compare answers on untied ones.
UNTIED = ["next_mistral", "next_llama_layers_list", "next_siglip_full"]


def _image(seed: int, w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return im.convert(mode) if mode != "RGB" else im


IMAGES = [  # sizes that pick every pinpoint, odd paddings, extreme ratios, several modes
    _image(0, 50, 33), _image(1, 20, 90), _image(2, 1, 1), _image(3, 400, 3), _image(4, 3, 400),
    _image(5, 57, 57, "L"), _image(6, 90, 61, "RGBA"), _image(7, 31, 29, "P"), _image(8, 300, 120, "CMYK"),
]


def _conv(text, images=()):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]}]




def _ref_inputs(proc, conv):
    return proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")


def _ref_pixels(ref_inputs):
    """The reference pads tiles per image to the batch maximum; keep each image's real tiles."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pv, sizes = ref_inputs["pixel_values"], ref_inputs["image_sizes"]
    pins = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
    return torch.cat([pv[i, : image_size_to_num_patches(s.tolist(), pins, 28)] for i, s in enumerate(sizes)])


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_processor_matches_transformers(models, index):
    vlm, _, proc = models("next_mistral")
    conv = _conv("What is in the picture?", [IMAGES[index]])
    ref = _ref_inputs(proc, conv)
    batch = vlm.prepare([conv])
    assert batch.input_ids.tolist() == ref["input_ids"].tolist()
    assert batch.image_sizes == tuple(tuple(s) for s in ref["image_sizes"].tolist())
    got, want = batch.pixel_values, _ref_pixels(ref)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= PIXELS_ATOL


CASES = {
    "one_image": _conv("What is in the picture?", [IMAGES[0]]),
    "two_sizes": _conv("Describe the image in detail.", [IMAGES[1], IMAGES[3]]),
    "no_image": _conv("The quick brown fox jumps over the lazy dog."),
}


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match(models, name, case):
    vlm, ref, proc = models(name)
    inputs = _ref_inputs(proc, CASES[case])
    with torch.no_grad():
        want = ref(**inputs).logits
    got = vlm.forward(vlm.prepare([CASES[case]]))
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= LOGITS_ATOL


def test_batch_logits_match_each_row_alone(models):
    vlm, ref, proc = models("next_mistral")
    convs = [CASES["no_image"], CASES["one_image"], CASES["two_sizes"]]
    batch = vlm.prepare(convs)
    got = vlm.forward(batch)
    for i, conv in enumerate(convs):
        inputs = _ref_inputs(proc, conv)
        with torch.no_grad():
            want = ref(**inputs).logits[0]
        n = want.shape[0]
        assert int(batch.attention_mask[i].sum()) == n
        assert float((got[i, -n:] - want).abs().max()) <= LOGITS_ATOL


@pytest.mark.parametrize("name", UNTIED)
@pytest.mark.parametrize("case", ["one_image", "two_sizes"])
def test_greedy_tokens_match(models, name, case):
    vlm, ref, proc = models(name)
    conv = CASES[case]
    inputs = _ref_inputs(proc, conv)
    want = ref.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    got = vlm.chat(conv, max_new_tokens=24).token_ids
    assert got == want
    assert len(got) == 24 and len(set(got)) > 3  # a real answer, not EOS or one repeated token


def test_batch_greedy_matches_transformers_row_by_row(models):
    """A batch of 0, 1 and 2 images of different sizes: each row is what transformers generates alone."""
    vlm, ref, proc = models("next_mistral")
    convs = [CASES["no_image"], CASES["one_image"], CASES["two_sizes"]]
    outs = vlm.generate(convs, llavakit.SamplingParams(max_new_tokens=24))
    for conv, out in zip(convs, outs):
        inputs = _ref_inputs(proc, conv)
        want = ref.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(want) if t in vlm.eos_ids), len(want))
        assert out.token_ids == want[:cut]
    assert sum(len(o.token_ids) for o in outs) >= 40


def test_batch_generation_equals_alone(models):
    vlm, _, _ = models("next_mistral")
    convs = [CASES["no_image"], CASES["one_image"], CASES["two_sizes"]]
    params = llavakit.SamplingParams(max_new_tokens=22)
    batched = vlm.generate(convs, params)
    assert [o.token_ids for o in batched] == [vlm.chat(c, sampling=params).token_ids for c in convs]


def test_placeholder_count_mismatch_raises(models):
    vlm, _, _ = models("next_mistral")
    text, _ = vlm.processor.render(CASES["one_image"])
    with pytest.raises(PromptError, match="1 <image> placeholder\\(s\\) but 2 image\\(s\\)"):
        vlm.processor.encode_prompt(text, [IMAGES[0], IMAGES[1]])


def test_full_strategy_with_a_class_token_tower_is_refused():
    from llavakit.config import LlavaConfig

    with pytest.raises(ConfigError, match="needs vision_feature_select_strategy 'default'"):
        LlavaConfig.from_hf({"model_type": "llava_next", "vision_feature_select_strategy": "full"})


def test_pinpoints_must_be_whole_tiles():
    from llavakit.config import LlavaConfig

    with pytest.raises(ConfigError, match="not positive multiples"):
        LlavaConfig.from_hf({"model_type": "llava_next", "image_grid_pinpoints": [[336, 600]]})


def test_info_shows_pinpoints_and_image_layout(models, tmp_path):
    import json
    import subprocess
    import sys

    vlm, _, _ = models("next_mistral")
    path = tmp_path / "wide.png"
    IMAGES[0].save(path)
    res = subprocess.run([sys.executable, "-m", "llavakit", "info", "--model", str(vlm.folder), "--image", str(path),
                          "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["model_type"] == "llava_next"
    assert info["image_grid_pinpoints"] == [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
    layout = info["images"][str(path)]
    # 33x50 fits 56x56 without downscaling: a 2x2 grid plus the base view; tokens = what the prompt holds
    assert layout["size"] == [33, 50] and layout["grid"] == [2, 2] and layout["tiles"] == 5
    batch = vlm.prepare([_conv("hi", [IMAGES[0]])])
    assert layout["tokens"] == int((batch.input_ids == vlm.config.image_token_id).sum())
