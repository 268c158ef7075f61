"""Identical tower inputs are encoded once; the features are the same as encoding every tile."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from llavakit.model.llava import unique_tiles


def test_unique_tiles_groups_exact_copies_only():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    c = a.clone()
    c[0, 0, 0] += 1.0
    c[0, 0, 1] -= 1.0  # the same sum as `a`, different pixels
    pixels = torch.stack([a, b, a, c, b])
    unique, index = unique_tiles(pixels)
    assert index.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(unique, torch.stack([a, b, c])) and torch.equal(unique[index], pixels)
    same, none = unique_tiles(torch.stack([a, b, c]))
    assert none is None and same.shape == (3, 3, 8, 8)


def test_square_onevision_image_encodes_its_repeated_tile_once(models):
    # Logits parity with transformers for such an image: test_onevision.py, case "square_one_tile".
    vlm, _, _ = models("onevision")
    side = vlm.config.vision.image_size  # a square image of one tile's size: base view == the one grid tile
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (side, side, 3), dtype=np.uint8))
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    batch = vlm.prepare([conv])
    pixels = batch.pixel_values
    assert pixels.shape[0] == 2 and torch.equal(pixels[0], pixels[1])
    calls = []
    hook = vlm.model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            feats = vlm.model.encode_tiles(pixels)
            each = torch.cat([vlm.model.encode_tiles(p[None]) for p in pixels])
    finally:
        hook.remove()
    assert calls[0] == 1  # the tower saw one tile for the two
    assert float((feats - each).abs().max()) <= 1e-6
