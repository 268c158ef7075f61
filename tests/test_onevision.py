"""LLaVA-OneVision against transformers' LlavaOnevisionForConditionalGeneration, float32.

The tiny checkpoints use 35-pixel tiles of 5x5 patches: an odd grid, like the real 27x27, so
video pooling rounds up (5 -> 3) as it does there (27 -> 14).
"""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit import anyres
from llavakit.config import ONEVISION_PINPOINTS
from reference import ONEVISION_TILE

LOGITS_ATOL = 1e-4
PIXELS_ATOL = 1e-5


def _image(seed: int, w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return im.convert(mode) if mode != "RGB" else im


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 30, 44, 3), dtype=np.uint8)


def _conv(text, images=(), videos=()):
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "video", "video": v} for v in videos]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


# ───────────────────────────── geometry at the real sizes ─────────────────────────────


def _sizes():
    rng = random.Random(1)
    fixed = [(1, 1), (384, 384), (480, 640), (768, 1024), (2000, 3000), (4000, 30), (30, 4000), (5000, 5000),
             (899, 1024), (1152, 2304), (767, 768)]
    return fixed + [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(200)]


@pytest.mark.parametrize("max_tiles", [9, 4])
def test_token_counts_match_the_reference_processor(max_tiles):
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    class Stub:  # the reference count reads only these attributes
        image_processor = type("P", (), {"image_grid_pinpoints": [list(p) for p in ONEVISION_PINPOINTS]})()
        num_image_tokens = 729
        vision_aspect_ratio = f"anyres_max_{max_tiles}"
        _get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features

    downscaled = 0
    for size in _sizes():
        want = LlavaOnevisionProcessor._get_number_of_features(Stub(), size[0], size[1], 384, 384)
        got = anyres.image_token_count(size, ONEVISION_PINPOINTS, 384, 27, 729, max_tiles, tiled=True)
        assert got == want, size
        _, final = anyres.image_feature_shape(size, ONEVISION_PINPOINTS, 384, 27, max_tiles)
        bounds, _ = anyres.image_feature_shape(size, ONEVISION_PINPOINTS, 384, 27, None)
        downscaled += final != (bounds[1] - bounds[0], bounds[3] - bounds[2])
    assert downscaled > 50  # the cap really is exercised


@pytest.mark.parametrize("size, tokens", [((384, 384), 1485), ((480, 640), 2929), ((768, 1024), 4725),
                                          ((2000, 3000), 7329)])
def test_published_golden_numbers(size, tokens):
    assert anyres.image_token_count(size, ONEVISION_PINPOINTS, 384, 27, 729, 9, tiled=True) == tokens


def test_video_and_multi_image_counts():
    assert anyres.video_token_count(8, 27) == 1569
    assert anyres.image_token_count((480, 640), ONEVISION_PINPOINTS, 384, 27, 729, 9, tiled=False) == 730


# ───────────────────────────── tiny checkpoints ─────────────────────────────




def _ref_inputs(proc, conv):
    return proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")


IMAGES = [_image(0, 50, 33), _image(1, 20, 90), _image(2, 1, 1), _image(3, 400, 3), _image(4, 300, 200),
          _image(5, 57, 57, "L"), _image(6, 90, 61, "RGBA"), _image(7, 31, 29, "P"), _image(8, 210, 240, "CMYK")]


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_single_image_processing_matches(models, index):
    vlm, _, proc = models("onevision")
    conv = _conv("What is in the picture?", [IMAGES[index]])
    ref = _ref_inputs(proc, conv)
    batch = vlm.prepare([conv])
    assert batch.input_ids.tolist() == ref["input_ids"].tolist()
    n = batch.pixel_values.shape[0]
    assert float((batch.pixel_values - ref["pixel_values"][0, :n]).abs().max()) <= PIXELS_ATOL
    assert batch.image_tiled == (True,)


def test_multi_image_processing_matches(models):
    vlm, _, proc = models("onevision")
    conv = _conv("Compare them.", IMAGES[:3])
    ref = _ref_inputs(proc, conv)
    batch = vlm.prepare([conv])
    assert batch.input_ids.tolist() == ref["input_ids"].tolist()
    assert batch.image_tiled == (False, False, False) and batch.pixel_values.shape[0] == 3
    assert float((batch.pixel_values - ref["pixel_values"][:, 0]).abs().max()) <= PIXELS_ATOL


def _video_reference_ids(proc, conv, frames: int):
    """The reference's prompt: its template, its own `<video>` expansion, its tokenizer."""
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    expansion = proc.replace_video_token({"pixel_values_videos": [np.zeros((frames, 3, 35, 35))]}, 0)
    return proc.tokenizer(text.replace("<video>", expansion))["input_ids"]


def test_video_processing_matches_the_video_processor(models, monkeypatch):
    """transformers' LlavaOnevisionVideoProcessor, built from the checkpoint's files as AutoVideoProcessor
    builds it (its settings from preprocessor_config.json), sampling 6 of 8 frames its way."""
    from video_reference import video_processor

    vlm, _, proc = models("onevision")
    frames = _frames(8)
    conv = [{"role": "user", "content": [{"type": "video", "video": frames, "num_frames": 6},
                                         {"type": "text", "text": "What happens?"}]}]
    batch = vlm.prepare([conv])
    assert batch.input_ids[0].tolist() == _video_reference_ids(proc, conv, 6)
    assert batch.video_frames == (6,)
    reference = video_processor("LlavaOnevisionVideoProcessor", monkeypatch, pretrained=vlm.folder)
    want = reference(videos=frames, do_sample_frames=True, num_frames=6, return_tensors="pt")["pixel_values_videos"][0]
    assert float((batch.video_pixels - want).abs().max()) <= PIXELS_ATOL


def _ref_logits(ref, proc, conv, batch_row=None):
    """Reference logits for one conversation; videos take our (checked) frames as pixel_values_videos."""
    videos = [p for m in conv for p in m["content"] if p["type"] == "video"]
    if not videos:
        inputs = _ref_inputs(proc, conv)
    else:
        ids = torch.tensor([_video_reference_ids(proc, conv, batch_row.video_frames[0])])
        inputs = {"input_ids": ids, "pixel_values_videos": batch_row.video_pixels[None]}
    with torch.no_grad():
        return ref(**inputs).logits[0], inputs


CASES = {
    "one_image": _conv("What is in the picture?", [IMAGES[0]]),
    "downscaled_image": _conv("Describe the image in detail.", [_image(9, 500, 400)]),
    # Base view and the one grid tile are the same pixels: the tower encodes them once.
    "square_one_tile": _conv("What is it?", [_image(11, ONEVISION_TILE, ONEVISION_TILE)]),
    "three_images": _conv("Compare them.", IMAGES[:3]),
    "video": _conv("What happens in the video?", videos=[_frames(8, seed=3)]),
    "text_only": _conv("The quick brown fox jumps over the lazy dog."),
}
IMAGE_AND_VIDEO = _conv("Is the picture in the video?", [IMAGES[0]], [_frames(4, seed=5)])


@pytest.mark.parametrize("name", ["onevision", "onevision_cap4_list"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match(models, name, case):
    vlm, ref, proc = models(name)
    batch = vlm.prepare([CASES[case]])
    want, _ = _ref_logits(ref, proc, CASES[case], batch)
    got = vlm.forward(batch)[0]
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= LOGITS_ATOL


def test_mixed_batch_rows_match_alone(models):
    vlm, ref, proc = models("onevision")
    convs = [CASES["one_image"], CASES["video"], CASES["text_only"], CASES["three_images"]]
    batch = vlm.prepare(convs)
    got = vlm.forward(batch)
    for i, conv in enumerate(convs):
        want, _ = _ref_logits(ref, proc, conv, vlm.prepare([conv]))
        n = want.shape[0]
        assert int(batch.attention_mask[i].sum()) == n
        assert float((got[i, -n:] - want).abs().max()) <= LOGITS_ATOL


@pytest.mark.parametrize("case", ["one_image", "three_images", "video"])
def test_greedy_tokens_match(models, case):
    vlm, ref, proc = models("onevision")
    conv = CASES[case]
    _, inputs = _ref_logits(ref, proc, conv, vlm.prepare([conv]))
    out = ref.generate(**inputs, max_new_tokens=24, do_sample=False)
    want = out[0, inputs["input_ids"].shape[1]:].tolist()
    got = vlm.chat(conv, max_new_tokens=24).token_ids
    assert got == want
    assert len(got) == 24 and len(set(got)) > 3  # a real answer, not EOS or one repeated token


def test_image_and_video_in_one_prompt(models):
    """Images are merged first, then videos, each at its own placeholder."""
    vlm, ref, proc = models("onevision")
    batch = vlm.prepare([IMAGE_AND_VIDEO])
    image = IMAGE_AND_VIDEO[0]["content"][0]["image"]
    # The reference processor refuses text with video tokens when it has no video processor, so its
    # own pieces are assembled here: template, image and video expansions, tokenizer, image processor.
    text = proc.apply_chat_template(IMAGE_AND_VIDEO, add_generation_prompt=True, tokenize=False)
    n_image = proc._get_number_of_features(image.height, image.width, 35, 35)
    text = text.replace("<image>", "<image>" * n_image, 1)
    text = text.replace("<video>", proc.replace_video_token({"pixel_values_videos": [np.zeros((4, 3, 35, 35))]}, 0))
    ref_in = dict(proc.image_processor(images=[image], return_tensors="pt"))
    ref_in.pop("batch_num_images", None)
    ref_in["input_ids"] = proc.tokenizer(text, return_tensors="pt")["input_ids"]
    assert batch.input_ids.tolist() == ref_in["input_ids"].tolist()
    with torch.no_grad():
        want = ref(**ref_in, pixel_values_videos=batch.video_pixels[None]).logits
    assert float((vlm.forward(batch) - want).abs().max()) <= LOGITS_ATOL


def test_mixed_batch_generation_equals_alone(models):
    vlm, _, _ = models("onevision")
    convs = [CASES["one_image"], CASES["video"], CASES["text_only"]]
    params = llavakit.SamplingParams(max_new_tokens=20)
    assert [o.token_ids for o in vlm.generate(convs, params)] == [vlm.chat(c, sampling=params).token_ids for c in convs]


def test_video_placeholder_mismatch_raises(models):
    vlm, _, _ = models("onevision")
    text, parsed = vlm.processor.render(CASES["video"])
    with pytest.raises(llavakit.PromptError, match="1 <video> placeholder\\(s\\) but 2 video\\(s\\)"):
        vlm.processor.encode_prompt(text, [], parsed.videos * 2)


def test_llava_checkpoints_refuse_video(checkpoint):
    vlm = llavakit.load(checkpoint("llama"), dtype=torch.float32)
    with pytest.raises(llavakit.PromptError, match="images only, not video"):
        vlm.prepare([_conv("What happens?", videos=[_frames(2)])])


def test_cli_video(models, tmp_path):
    import av

    vlm, _, _ = models("onevision")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 44, 30, "yuv420p"
        for f in _frames(20):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    res = subprocess.run([sys.executable, "-m", "llavakit", "chat", "--model", str(vlm.folder), "--dtype", "float32",
                          "--video", str(path), "--num-frames", "6", "--max-new-tokens", "10", "What happens?"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    conv = [{"role": "user", "content": [{"type": "video", "video": str(path), "num_frames": 6},
                                         {"type": "text", "text": "What happens?"}]}]
    assert res.stdout == vlm.chat(conv, max_new_tokens=10).text + "\n"
    assert vlm.prepare([conv]).video_frames == (6,)
