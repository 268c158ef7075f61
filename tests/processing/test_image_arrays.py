"""Images given as numpy arrays and torch tensors: the pixel values of transformers' image processors.

uint8 arrays are compared with transformers' defaults; float arrays in [0, 1] are already scaled and
compared with transformers called with `do_rescale=False` (its default would scale them a second time).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.config import LlavaConfig
from llavakit.errors import ImageError
from llavakit.processing.image import image_array, load_image
from llavakit.processing.processor import Processor
from reference import onevision_reference_processor

PIXELS_ATOL = 1e-5
RGB = np.random.default_rng(11).integers(0, 256, (41, 67, 3), dtype=np.uint8)  # odd sizes: every step rounds
RGBA = np.concatenate([RGB, np.random.default_rng(12).integers(0, 256, (41, 67, 1), dtype=np.uint8)], axis=-1)

# name -> (array given to both, transformers' do_rescale)
ARRAYS = {
    "numpy uint8 HWC": (RGB, True),
    "numpy float32 HWC": (RGB.astype(np.float32) / 255, False),
    "numpy float64 HWC, not k/255": (np.random.default_rng(13).random((41, 67, 3)), False),
    "torch uint8 CHW": (torch.from_numpy(RGB).permute(2, 0, 1), True),
    "torch float32 CHW": (torch.from_numpy(RGB).permute(2, 0, 1).float() / 255, False),
    "numpy uint8 RGBA": (RGBA, True),
    "numpy uint8 grey (H, W, 1)": (RGB[..., :1], True),
}
# checkpoint -> how the image is cut: one CLIP crop, one SigLIP resize, NeXT tiles, OneVision tiles
CHECKPOINTS = ["llama", "qwen2_siglip", "next_mistral", "onevision"]


def _pair(checkpoint, name):
    from transformers import AutoProcessor

    path = checkpoint(name)
    ours = Processor.load(path, LlavaConfig.from_hf(json.loads((path / "config.json").read_text())))
    ref = onevision_reference_processor(path) if name == "onevision" else AutoProcessor.from_pretrained(path)
    return ours, ref


def _conv(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_array_pixels_equal_transformers(checkpoint, name):
    ours, ref = _pair(checkpoint, name)
    for label, (array, rescale) in ARRAYS.items():
        got = ours.encode(_conv(array))
        want = ref.image_processor(images=[array], do_rescale=rescale, return_tensors="pt")["pixel_values"]
        want = want.reshape(-1, *want.shape[-3:])[: got.pixel_values.shape[0]]  # NeXT/OneVision pad the tiles
        assert got.pixel_values.shape == tuple(want.shape), label
        assert float(np.abs(got.pixel_values - want.numpy()).max()) <= PIXELS_ATOL, label
        # the same tokens as the picture given as a PIL image
        assert got.input_ids == ours.encode(_conv(load_image(array))).input_ids, label


def test_float_arrays_are_taken_as_already_scaled(checkpoint):
    """transformers' default rescales a [0, 1] array a second time (a black picture); llavakit does not."""
    ours, ref = _pair(checkpoint, "llama")
    scaled = RGB.astype(np.float32) / 255
    got = ours.encode(_conv(scaled)).pixel_values
    assert float(np.abs(got - ours.encode(_conv(RGB)).pixel_values).max()) <= PIXELS_ATOL
    twice = ref.image_processor(images=[scaled], return_tensors="np")["pixel_values"]
    assert float(np.abs(got - twice).max()) > 1.0


def test_grey_and_channel_layouts():
    grey = RGB[..., 0]
    assert np.array_equal(image_array(grey), np.repeat(grey[..., None], 3, axis=-1))
    assert np.array_equal(image_array(np.ascontiguousarray(RGB.transpose(2, 0, 1))), RGB)  # a CHW numpy array
    assert np.array_equal(image_array(torch.from_numpy(RGB)), RGB)  # an HWC tensor
    assert image_array(torch.from_numpy(RGB).permute(2, 0, 1).to(torch.bfloat16) / 255).dtype == np.float32
    assert image_array("picture.png") is None and image_array(Image.fromarray(RGB)) is None


@pytest.mark.parametrize("array, message", [
    (RGB.astype(np.int16), "an image array of dtype int16 is not supported: give uint8 values \\(0..255\\) or floats "
                           "in \\[0, 1\\]"),
    (RGB.astype(bool), "an image array of dtype bool is not supported"),
    (RGB.astype(np.float32), "an image array holds float values in \\[0.0, 255.0\\]; float pixels must lie in "
                             "\\[0, 1\\] \\(already scaled\\). For 0..255 values pass uint8, or divide by 255."),
    (np.full((4, 5, 3), np.nan, dtype=np.float32), "holds float values in \\[nan, nan\\]"),
    (np.zeros((6, 7, 2), dtype=np.uint8), "an image array of shape \\(6, 7, 2\\) is not an image: give "
                                          "\\(height, width, channels\\) with 1, 3 or 4 channels, or "
                                          "\\(height, width\\) grey."),
    (np.zeros((1, 6, 7, 3), dtype=np.uint8), "of shape \\(1, 6, 7, 3\\) is not an image"),
    (np.zeros((0, 7, 3), dtype=np.uint8), "of shape \\(0, 7, 3\\) is not an image"),
    (torch.zeros((2, 6, 7)), "an image tensor of shape \\(2, 6, 7\\) is not an image: give \\(channels, height, "
                             "width\\)"),
])
def test_unsupported_arrays_raise_image_error(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)
