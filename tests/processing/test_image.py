"""Parity of llavakit.processing.image with transformers 5.24 (PIL backend), plus its errors.

transformers is the test-only reference. torchvision is absent, so its image processors fall
back to the PIL backend; `_hf_processor` asserts that, since the torchvision backend differs.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavakit.errors import ConfigError, ImageError, LlavakitError
from llavakit.processing.image import (
    ImageProcessorConfig,
    load_image,
    preprocess,
    preprocess_batch,
    read_image_processor_dict,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoImageProcessor  # noqa: E402
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ───────────────────────────── inputs ─────────────────────────────


def _rand(rng, h, w, c=3, dtype=np.uint8, high=256):
    shape = (h, w) if c == 1 else (h, w, c)
    return rng.integers(0, high, shape, dtype=dtype)


def _palette_image(rng, w, h, transparency):
    im = Image.frombytes("P", (w, h), _rand(rng, h, w, 1, high=16).tobytes())
    im.putpalette(_rand(rng, 1, 256, 3).tobytes())
    if transparency:
        im.info["transparency"] = 3
    return im


def _make_images() -> dict[str, Image.Image]:
    """Images of many sizes, aspect ratios and modes (sizes are W×H as PIL spells them)."""
    rng = np.random.default_rng(1234)
    rgba = _rand(rng, 61, 83, 4)
    rgba[:20, :, 3] = 0  # fully transparent band
    rgba[20:40, :, 3] = 128  # half transparent band
    rgb_trns = Image.fromarray(_rand(rng, 50, 40, 3, high=4) * 60)  # few colours, so the key colour is common
    rgb_trns.info["transparency"] = (60, 0, 120)
    return {
        "rgb_640x480": Image.fromarray(_rand(rng, 480, 640)),
        "rgb_337x335": Image.fromarray(_rand(rng, 335, 337)),
        "rgb_1x1": Image.fromarray(_rand(rng, 1, 1)),
        "rgb_4000x30": Image.fromarray(_rand(rng, 30, 4000)),
        "rgb_30x4000": Image.fromarray(_rand(rng, 4000, 30)),
        "rgb_trns_40x50": rgb_trns,
        "rgba_83x61": Image.fromarray(rgba),
        "la_70x45": Image.merge("LA", [Image.fromarray(_rand(rng, 45, 70, 1)), Image.fromarray(_rand(rng, 45, 70, 1))]),
        "p_97x64": _palette_image(rng, 97, 64, transparency=False),
        "p_trns_64x97": _palette_image(rng, 64, 97, transparency=True),
        "l_123x77": Image.fromarray(_rand(rng, 77, 123, 1)),
        "1_33x20": Image.fromarray(_rand(rng, 20, 33, 1, high=2).astype(bool)),
        "cmyk_90x120": Image.frombytes("CMYK", (90, 120), _rand(rng, 120, 90, 4).tobytes()),
        "i16_48x36": Image.frombytes("I;16", (48, 36), _rand(rng, 36, 48, 1, np.uint16, 65535).astype("<u2").tobytes()),
    }


IMAGES = _make_images()

# Preprocessor dicts as they appear in published files; both sides load the same file.
CONFIGS = {
    "clip336": dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 336},
                    crop_size={"height": 336, "width": 336}, resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD),
    "clip56": dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 56},
                   crop_size={"height": 56, "width": 56}),
    "hw_no_crop": dict(image_processor_type="CLIPImageProcessor", size={"height": 40, "width": 64},
                       do_center_crop=False, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    # crop larger than the resize: exercises center_crop's zero padding
    "crop_pads": dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 45},
                      crop_size={"height": 56, "width": 50}, resample=1),
    # the 2022 CLIP layout (openai/clip-vit-large-patch14-336): ints and feature_extractor_type
    "legacy_ints": dict(feature_extractor_type="CLIPFeatureExtractor", size=48, crop_size=48, do_center_crop=True,
                        do_normalize=True, do_resize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3),
    "llava_pad": dict(image_processor_type="LlavaImageProcessor", do_pad=True, size={"shortest_edge": 56},
                      crop_size={"height": 56, "width": 56}),
    # SigLIP omits do_center_crop; its class default (off) must apply, not CLIP's
    "siglip": dict(image_processor_type="SiglipImageProcessor", size={"height": 64, "width": 64}, resample=3,
                   image_mean=[0.5] * 3, image_std=[0.5] * 3, rescale_factor=1 / 255, do_normalize=True),
}


def _write(folder: Path, name: str, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """name → (transformers processor, llavakit config), both loaded from one preprocessor_config.json."""
    out = {}
    for name, d in CONFIGS.items():
        folder = _write(tmp_path_factory.mktemp(name), "preprocessor_config.json", d)
        hf = AutoImageProcessor.from_pretrained(folder)
        assert type(hf).__name__.endswith("Pil"), "torchvision backend in use; parity is with the PIL backend"
        out[name] = (hf, ImageProcessorConfig.from_hf(read_image_processor_dict(folder)))
    return out


def _hf_pixels(hf, image) -> np.ndarray:
    return hf(images=[image], return_tensors="np")["pixel_values"][0]


# ───────────────────────────── preprocessing parity ─────────────────────────────


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("image", list(IMAGES))
def test_preprocess_matches_transformers(processors, config, image):
    hf, cfg = processors[config]
    ours = preprocess(IMAGES[image], cfg)
    ref = _hf_pixels(hf, IMAGES[image])
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5


def test_preprocess_is_bit_exact_on_clip336(processors):
    hf, cfg = processors["clip336"]
    for name in ("rgb_640x480", "rgba_83x61", "p_trns_64x97", "rgb_337x335"):
        assert np.array_equal(preprocess(IMAGES[name], cfg), _hf_pixels(hf, IMAGES[name])), name


def test_preprocess_batch_stacks_and_matches(processors):
    hf, cfg = processors["clip56"]
    images = [IMAGES["rgb_640x480"], IMAGES["la_70x45"], IMAGES["cmyk_90x120"]]
    ours = preprocess_batch(images, cfg)
    ref = hf(images=images, return_tensors="np")["pixel_values"]
    assert ours.shape == (3, 3, 56, 56) and np.abs(ours - ref).max() <= 1e-6
    assert preprocess_batch([], cfg).shape == (0, 3, 56, 56)


def test_preprocess_batch_rejects_ragged_sizes():
    cfg = ImageProcessorConfig(size_shortest_edge=32, do_center_crop=False)
    with pytest.raises(ImageError, match="different processed sizes"):
        preprocess_batch([IMAGES["rgb_640x480"], IMAGES["rgb_30x4000"]], cfg)


# ───────────────────────────── loading parity ─────────────────────────────


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Encoded image files: EXIF-rotated JPEG, RGBA PNG, palette PNG with tRNS, grayscale PNG."""
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(7)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(_rand(rng, 24, 40)).save(d / "exif6.jpg", exif=exif.tobytes(), quality=90)
    IMAGES["rgba_83x61"].save(d / "rgba.png")
    IMAGES["p_trns_64x97"].save(d / "p_trns.png", transparency=3)
    IMAGES["l_123x77"].save(d / "gray.png")
    return {p.stem: p for p in d.iterdir()}


def _as_data_url(path: Path) -> str:
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("name", ["exif6", "rgba", "p_trns", "gray"])
@pytest.mark.parametrize("form", ["str", "pathlib", "bytes", "bytearray", "data_url", "base64"])
def test_load_image_matches_transformers(files, name, form):
    path = files[name]
    source = {
        "str": str(path), "pathlib": path, "bytes": path.read_bytes(), "bytearray": bytearray(path.read_bytes()),
        "data_url": _as_data_url(path), "base64": base64.b64encode(path.read_bytes()).decode(),
    }[form]
    ours, ref = load_image(source), hf_load_image(str(path))
    assert ours.mode == "RGB" and ours.size == ref.size
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    # tRNS survives convert("RGB") as info["transparency"]; preprocessing depends on it
    assert ours.info.get("transparency") == ref.info.get("transparency")


def test_load_image_applies_exif_rotation_to_files_only(files):
    assert load_image(str(files["exif6"])).size == (24, 40)  # rotated upright
    with Image.open(files["exif6"]) as im:
        assert load_image(im).size == (40, 24)  # PIL objects are taken as they are, as transformers does


def test_data_url_matches_transformers_string_path(files):
    url = _as_data_url(files["rgba"])
    assert np.array_equal(np.asarray(load_image(url)), np.asarray(hf_load_image(url)))


@pytest.mark.parametrize("name", list(IMAGES))
def test_load_image_of_pil_matches_convert_to_rgb(name):
    assert np.array_equal(np.asarray(load_image(IMAGES[name])), hf_convert_to_rgb(IMAGES[name], return_numpy=True))


@pytest.mark.parametrize("name", ["exif6", "rgba", "p_trns", "gray"])
def test_end_to_end_path_matches_processor_given_path(processors, files, name):
    """A path through load_image + preprocess equals transformers' processor handed the path."""
    hf, cfg = processors["clip56"]
    ours = preprocess(load_image(str(files[name])), cfg)
    assert np.array_equal(ours, _hf_pixels(hf, str(files[name])))


def test_rgba_file_and_rgba_object_differ_like_transformers(files):
    """Alpha is dropped for a path but composited onto white for a PIL object (transformers 5)."""
    from_path = np.asarray(load_image(str(files["rgba"])))
    from_object = np.asarray(load_image(IMAGES["rgba_83x61"]))
    assert not np.array_equal(from_path, from_object)
    assert (from_object[:20] == 255).all()  # the fully transparent band turned white


# ───────────────────────────── errors ─────────────────────────────


def test_missing_path(tmp_path):
    for source in (str(tmp_path / "nope.png"), tmp_path / "nope.png"):
        with pytest.raises(ImageError, match="not found") as info:
            load_image(source)
        assert "nope.png" in str(info.value)


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image at all\n")
    with pytest.raises(ImageError, match="Could not decode"):
        load_image(str(path))


def test_truncated_jpeg(files):
    data = files["exif6"].read_bytes()
    with pytest.raises(ImageError, match="Could not decode.*truncated"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize("text", ["this is not base64!!", base64.b64encode(b"hello, not an image").decode()])
def test_garbage_base64(text):
    with pytest.raises(ImageError, match="base64"):
        load_image(text)


def test_unsupported_type():
    with pytest.raises(ImageError, match="from a int"):
        load_image(42)


def test_long_source_is_truncated_in_message():
    text = "A" * 5001
    with pytest.raises(ImageError) as info:
        load_image(text)
    assert "..." in str(info.value) and len(str(info.value)) < 600


def test_image_error_hierarchy():
    assert issubclass(ImageError, LlavakitError) and issubclass(ImageError, ValueError)


def test_preprocess_rejects_non_rgb_without_conversion():
    cfg = ImageProcessorConfig(do_convert_rgb=False)
    with pytest.raises(ImageError, match="do_convert_rgb"):
        preprocess(IMAGES["l_123x77"], cfg)


# ───────────────────────────── config files ─────────────────────────────

_CLIP_FILE = CONFIGS["clip336"] | {"do_resize": True, "do_center_crop": True, "rescale_factor": 1 / 255}


def test_from_hf_preprocessor_config_layout(tmp_path):
    folder = _write(tmp_path, "preprocessor_config.json", _CLIP_FILE)
    cfg = ImageProcessorConfig.from_hf(read_image_processor_dict(folder))
    assert (cfg.size_shortest_edge, cfg.crop_height, cfg.crop_width, cfg.resample) == (336, 336, 336, 3)
    assert cfg.image_mean == tuple(CLIP_MEAN) and cfg.do_pad is False
    assert cfg.image_processor_type == "CLIPImageProcessor"


def test_from_hf_nested_processor_config_layout(tmp_path):
    # the layout transformers 5 LlavaProcessor.save_pretrained writes
    nested = {"image_processor": CONFIGS["hw_no_crop"], "patch_size": 14, "processor_class": "LlavaProcessor"}
    folder = _write(tmp_path, "processor_config.json", nested)
    cfg = ImageProcessorConfig.from_hf(read_image_processor_dict(folder))
    hf = AutoImageProcessor.from_pretrained(folder)
    assert (cfg.size_shortest_edge, cfg.size_height, cfg.size_width) == (None, hf.size.height, hf.size.width)
    assert cfg.do_center_crop is False and cfg.image_std == (0.5, 0.5, 0.5)


def test_nested_section_wins_like_transformers(tmp_path):
    _write(tmp_path, "preprocessor_config.json", CONFIGS["clip56"])
    _write(tmp_path, "processor_config.json", {"image_processor": CONFIGS["clip336"]})
    cfg = ImageProcessorConfig.from_hf(read_image_processor_dict(tmp_path))
    assert cfg.size_shortest_edge == AutoImageProcessor.from_pretrained(tmp_path).size.shortest_edge == 336


def test_processor_config_without_section_falls_back(tmp_path):
    _write(tmp_path, "preprocessor_config.json", CONFIGS["clip56"])
    _write(tmp_path, "processor_config.json", {"patch_size": 14})
    assert read_image_processor_dict(tmp_path)["size"] == {"shortest_edge": 56}


def test_missing_files_name_both(tmp_path):
    with pytest.raises(ConfigError, match="preprocessor_config.json.*processor_config.json"):
        read_image_processor_dict(tmp_path)


def test_from_hf_defaults_and_ints():
    cfg = ImageProcessorConfig.from_hf({"size": 336, "crop_size": 336})
    assert cfg == ImageProcessorConfig(size_shortest_edge=336, crop_height=336, crop_width=336)
    assert ImageProcessorConfig.from_hf({}) == ImageProcessorConfig()
    # LLaVA-NeXT's do_pad pads a batch of tiles, not the image to a square
    next_cfg = {"image_processor_type": "LlavaNextImageProcessor", "do_pad": True}
    assert ImageProcessorConfig.from_hf(next_cfg).do_pad is False
    assert ImageProcessorConfig.from_hf({"image_processor_type": "LlavaImageProcessorPil", "do_pad": True}).do_pad


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"size": {"longest_edge": 500}}, "size"),
        ({"size": {"shortest_edge": 336, "longest_edge": 500}}, "size"),
        ({"crop_size": {"shortest_edge": 336}}, "crop_size"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"resample": 9}, "resample"),
        ({"size": {"shortest_edge": 0}}, "positive"),
        ({"image_std": [0.5, 0.0, 0.5]}, "zero"),
    ],
)
def test_from_hf_rejects_unsupported(bad, words):
    with pytest.raises(ConfigError, match=words):
        ImageProcessorConfig.from_hf(bad)
