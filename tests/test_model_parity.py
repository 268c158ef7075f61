"""Logits of `VLM.forward` against transformers' LlavaForConditionalGeneration, every tiny checkpoint.

Tolerances are fixed: input_ids identical, pixel_values within 1e-5, float32 logits within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


NAMES = ["llama", "mistral", "qwen2", "llama_full_list", "qwen2_tied", "qwen2_siglip", "mistral_full_list_nobias",
         "qwen2_default_list"]
LOGITS_ATOL = 1e-4
PIXELS_ATOL = 1e-5


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


IMG_A = _image(0, 70, 40)  # wide
IMG_B = _image(1, 33, 90)  # tall
IMG_C = _image(2, 56, 56)  # exactly the tower's size


def _conv(text: str, images=()) -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


CASES = {
    "one_image": _conv("What is in the picture?", [IMG_A]),
    "two_images": _conv("Describe the image in detail. How many people are there?", [IMG_B, IMG_C]),
    "no_image": _conv("The quick brown fox jumps over the lazy dog 0123456789."),
    "system": [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe the image in detail."},
                                     {"type": "image", "image": IMG_A}]},
    ],
    "multi_turn": [
        {"role": "user", "content": [{"type": "image", "image": IMG_C}, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat sits on a red mat."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many people are there?"}]},
    ],
}




def _ref_inputs(proc, conv):
    return proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")


def _ref_logits(ref, inputs) -> torch.Tensor:
    # transformers 5.24 drops the vision hidden states when vision_feature_layer == 0 (the layer index is
    # passed on as a falsy `output_hidden_states`); asking for all hidden states sidesteps that bug.
    with torch.no_grad():
        return ref(**inputs, output_hidden_states=True).logits.float()


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, atol: float, what: str):
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(theirs.shape)}"
    diff = (ours.float() - theirs.float()).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_single_conversation_parity(models, name, case):
    vlm, ref, proc = models(name)
    conv = CASES[case]
    inputs = _ref_inputs(proc, conv)
    batch = vlm.prepare([conv])

    assert batch.input_ids.tolist() == inputs["input_ids"].tolist()
    assert batch.attention_mask.tolist() == inputs["attention_mask"].tolist()
    n_images = sum(1 for m in conv for p in m["content"] if p["type"] == "image")
    assert batch.image_counts == (n_images,)
    if n_images:
        assert batch.pixel_values is not None and batch.pixel_values.dtype == torch.float32
        _assert_close(batch.pixel_values, inputs["pixel_values"], PIXELS_ATOL, "pixel_values")
        # The prompt really holds image tokens, so the merge path is exercised.
        image_id = vlm.config.image_token_id
        assert int((batch.input_ids == image_id).sum()) == n_images * vlm.processor.features_per_image
    else:
        assert batch.pixel_values is None and "pixel_values" not in inputs

    ours = vlm.forward(batch)
    assert ours.dtype == torch.float32
    _assert_close(ours, _ref_logits(ref, inputs), LOGITS_ATOL, f"{name}/{case} logits")


@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_rows_match_alone(models, name):
    """Each row of a left-padded batch equals the reference run on that conversation alone."""
    vlm, ref, proc = models(name)
    convs = [CASES["one_image"], CASES["two_images"], CASES["no_image"]]
    batch = vlm.prepare(convs)
    lengths = batch.attention_mask.sum(-1).tolist()
    assert len(set(lengths)) == len(convs), "the conversations must differ in length to test padding"
    assert batch.image_counts == (1, 2, 0)
    logits = vlm.forward(batch)
    t = batch.input_ids.shape[1]

    for i, conv in enumerate(convs):
        inputs = _ref_inputs(proc, conv)
        n = inputs["input_ids"].shape[1]
        assert lengths[i] == n
        # Left padding: the first t - n positions are padding, the rest are the prompt.
        assert batch.attention_mask[i, : t - n].sum().item() == 0
        assert batch.input_ids[i, t - n :].tolist() == inputs["input_ids"][0].tolist()
        _assert_close(logits[i, t - n :], _ref_logits(ref, inputs)[0], LOGITS_ATOL, f"{name} row {i} logits")

    # Pixel values of the batch are the rows' images in order.
    pixels = torch.cat([_ref_inputs(proc, c)["pixel_values"] for c in convs if any(
        p["type"] == "image" for m in c for p in m["content"])])
    _assert_close(batch.pixel_values, pixels, PIXELS_ATOL, "batched pixel_values")
