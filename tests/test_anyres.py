"""Any-resolution geometry against transformers' own helpers, over many sizes and pinpoint sets."""

import random

import pytest
import torch

from llavakit import anyres

NEXT_DEFAULT = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))
SMALL = ((28, 56), (56, 28), (56, 56), (28, 28), (84, 28))  # tiny test checkpoints: tile 28

PINPOINT_SETS = [(NEXT_DEFAULT, 336, 24), (ONEVISION, 384, 27), (SMALL, 28, 2)]


def _sizes():
    rng = random.Random(0)
    fixed = [(1, 1), (1, 5000), (5000, 1), (4000, 30), (30, 4000), (5000, 5000), (336, 336), (480, 640),
             (640, 480), (500, 500), (1000, 200), (768, 767), (767, 768), (337, 335), (2000, 3000), (899, 1024)]
    rand = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(150)]
    skinny = [(rng.randint(1, 60), rng.randint(1000, 5000)) for _ in range(20)] + \
             [(rng.randint(1000, 5000), rng.randint(1, 60)) for _ in range(20)]
    return fixed + rand + skinny


SIZES = _sizes()


def test_table_is_large_enough():
    assert len(SIZES) >= 200


@pytest.mark.parametrize("pinpoints, tile, patches", PINPOINT_SETS)
def test_geometry_matches_transformers(pinpoints, tile, patches):
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image,
    )

    pins = [list(p) for p in pinpoints]
    for size in SIZES:
        best = anyres.select_best_resolution(size, pinpoints)
        assert best == tuple(select_best_resolution(size, pins)), size
        fake = torch.empty(3, *size)  # only its shape is read
        assert anyres.resize_within(size, best) == tuple(get_patch_output_size(fake, best, "channels_first")), size
        assert anyres.grid_shape(size, pinpoints, tile) == tuple(get_anyres_image_grid_shape(list(size), pins, tile))
        assert anyres.num_tiles(size, pinpoints, tile) == image_size_to_num_patches(list(size), pins, tile)
        grid, (top, bottom, left, right) = anyres.next_layout(size, pinpoints, tile, patches)
        expected = unpad_image(torch.empty(1, *grid), list(size)).shape[1:]
        assert (bottom - top, right - left) == tuple(expected), size


def test_token_counts_match_the_next_processor():
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    class Stub:  # the processor's count only reads these attributes
        image_processor = type("P", (), {"image_grid_pinpoints": [list(p) for p in NEXT_DEFAULT]})()
        patch_size = 14
        num_additional_image_tokens = 1
        _get_unpadded_features = LlavaNextProcessor._get_unpadded_features

    for size in SIZES:
        ref = LlavaNextProcessor._get_number_of_features(Stub(), size[0], size[1], 336, 336) - 1  # "default"
        assert anyres.next_feature_count(size, NEXT_DEFAULT, 336, 24, 576) == ref, size


@pytest.mark.parametrize("size, tokens", [((480, 640), 2340), ((336, 336), 1176), ((500, 500), 2928),
                                          ((1000, 200), 1656)])
def test_published_golden_numbers(size, tokens):
    assert anyres.next_feature_count(size, NEXT_DEFAULT, 336, 24, 576) == tokens


def test_padding_puts_the_odd_pixel_bottom_right():
    assert anyres.centre_padding((767, 768), (768, 768)) == (0, 1, 0, 0)
    assert anyres.centre_padding((500, 671), (672, 672)) == (86, 86, 0, 1)
