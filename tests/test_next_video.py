"""LLaVA-NeXT-Video against transformers' LlavaNextVideoForConditionalGeneration, float32.

Checkpoints (tests/conftest.py): the published settings (average pooling by 2, CLIP "default",
layer -2, Llama); max pooling by 3 with two feature layers (Mistral); a learned conv (tied Qwen2);
SigLIP "full" pooled by 4. Images go through transformers' own processor; video frames through
ours, whose pixels are checked against transformers' video processor (tests/video_reference.py).
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit.errors import ConfigError

LOGITS_ATOL = 1e-4
PIXELS_ATOL = 1e-5
VARIANTS = ["next_video", "next_video_max3_list", "next_video_conv_qwen2_tied", "next_video_siglip_full"]
UNTIED = ["next_video", "next_video_max3_list", "next_video_siglip_full"]


def _image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _frames(n: int, seed: int = 0, w: int = 60, h: int = 44) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _conv(text, images=(), videos=()):
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "video", "video": v} for v in videos]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


CASES = {
    "image": _conv("What is in the picture?", [_image(0, 90, 40)]),
    "video": _conv("What happens in the video?", videos=[_frames(4, seed=1)]),
    "image_and_video": _conv("Compare the picture with the clip.", [_image(2, 30, 70)], [_frames(3, seed=2)]),
    "text": _conv("The quick brown fox jumps over the lazy dog."),
}


def _images_of(conv):
    return [p["image"] for m in conv for p in m["content"] if p["type"] == "image"]


def _ref_inputs(proc, conv, batch) -> dict:
    """The reference's inputs: our ids (checked against its processor below), its own image pixels,
    our video frames (checked against its video processor below)."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    images = _images_of(conv)
    if images:
        im = proc.image_processor(images, return_tensors="pt")
        inputs.update(pixel_values=im["pixel_values"], image_sizes=im["image_sizes"])
    if batch.video_pixels is not None:
        frames = batch.video_frames
        assert len(set(frames)) == 1  # the reference stacks videos: equal lengths only
        inputs["pixel_values_videos"] = batch.video_pixels.view(len(frames), frames[0], *batch.video_pixels.shape[1:])
    return inputs


def _ref_ids(proc, conv, frames: int | None) -> list[int]:
    """transformers' processor's ids; its video expansion assumes a pool stride of 2."""
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    images = _images_of(conv)
    if frames is not None:
        tile = proc.image_processor.crop_size["height"]
        text = text.replace("<video>", proc.replace_video_token({"pixel_values_videos": [np.zeros((frames, 3, tile, tile))]}, 0))
    if images:
        video_token, proc.video_token = proc.video_token, None  # its <video> check wants the videos themselves
        try:
            return proc(images=images, text=text, return_tensors="pt")["input_ids"][0].tolist()
        finally:
            proc.video_token = video_token
    return proc.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("case", ["image", "video", "image_and_video", "text"])
def test_input_ids_and_image_pixels_match_transformers(models, case):
    vlm, _, proc = models("next_video")  # stride 2: the one transformers' processor counts right
    conv = CASES[case]
    batch = vlm.prepare([conv])
    frames = batch.video_frames[0] if batch.video_frames else None
    assert batch.input_ids[0].tolist() == _ref_ids(proc, conv, frames)
    if _images_of(conv):
        want = proc.image_processor(_images_of(conv), return_tensors="pt")
        n = batch.pixel_values.shape[0]
        assert float((batch.pixel_values - want["pixel_values"][0, :n]).abs().max()) <= PIXELS_ATOL


@pytest.mark.parametrize("name", VARIANTS)
def test_video_tokens_are_what_the_model_emits(models, name):
    """Where transformers' processor miscounts (stride 3 and 4), we count the reference model's features."""
    vlm, ref, _ = models(name)
    batch = vlm.prepare([CASES["video"]])
    with torch.no_grad():
        feats = ref.model.get_video_features(batch.video_pixels[None]).pooler_output
    emitted = sum(f.shape[0] for f in feats)
    assert int((batch.input_ids == vlm.config.video_token_id).sum()) == emitted == batch.video_layouts[0].tokens
    p, stride = vlm.config.vision.patches_per_side, vlm.config.video_pool_stride
    assert emitted == 4 * (p // stride) ** 2


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match(models, name, case):
    vlm, ref, proc = models(name)
    batch = vlm.prepare([CASES[case]])
    with torch.no_grad():
        want = ref(**_ref_inputs(proc, CASES[case], batch)).logits
    got = vlm.forward(batch)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= LOGITS_ATOL


def test_mixed_batch_rows_match_alone(models):
    vlm, ref, proc = models("next_video_max3_list")
    convs = [CASES["image"], CASES["video"], CASES["text"], CASES["image_and_video"]]
    got = vlm.forward(vlm.prepare(convs))
    for i, conv in enumerate(convs):
        alone = vlm.prepare([conv])
        with torch.no_grad():
            want = ref(**_ref_inputs(proc, conv, alone)).logits[0]
        n = want.shape[0]
        assert float((got[i, -n:] - want).abs().max()) <= LOGITS_ATOL


@pytest.mark.parametrize("name", UNTIED)
@pytest.mark.parametrize("case", ["video", "image_and_video"])
def test_greedy_tokens_match(models, name, case):
    vlm, ref, proc = models(name)
    conv = CASES[case]
    inputs = _ref_inputs(proc, conv, vlm.prepare([conv]))
    want = ref.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    got = vlm.chat(conv, max_new_tokens=20).token_ids
    assert got == want
    assert len(got) == 20 and len(set(got)) > 3  # a real answer, not EOS or one repeated token


def test_batched_generation_mixes_media(models):
    vlm, _, _ = models("next_video")
    convs = [CASES["image"], CASES["video"], CASES["image_and_video"]]
    params = llavakit.SamplingParams(max_new_tokens=12)
    assert [o.token_ids for o in vlm.generate(convs, params)] == [vlm.chat(c, sampling=params).token_ids for c in convs]


def _write_video(path, n: int = 24, fps: int = 8, w: int = 64, h: int = 48):
    frames = _frames(n, seed=5, w=w, h=h)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_a_video_file_end_to_end(models, monkeypatch, tmp_path):
    """A real file: frames sampled and processed as transformers' PyAV reader and video processor do them."""
    from transformers.video_utils import load_video as hf_load_video
    from video_reference import video_processor

    vlm, ref, proc = models("next_video")
    path = _write_video(tmp_path / "clip.mp4")
    conv = [{"role": "user", "content": [{"type": "video", "video": str(path), "num_frames": 6},
                                         {"type": "text", "text": "What happens?"}]}]
    batch = vlm.prepare([conv])
    assert batch.video_frames == (6,)
    frames, _ = hf_load_video(str(path), backend="pyav", num_frames=6)
    reference = video_processor("LlavaNextVideoVideoProcessor", monkeypatch, pretrained=vlm.folder)
    want = reference(videos=frames, return_tensors="pt")["pixel_values_videos"][0]
    assert float((batch.video_pixels - want).abs().max()) <= PIXELS_ATOL
    with torch.no_grad():
        want_logits = ref(**_ref_inputs(proc, conv, batch)).logits
    assert float((vlm.forward(batch) - want_logits).abs().max()) <= LOGITS_ATOL


def test_family_facts_and_bad_pooling_configs():
    from llavakit.config import LlavaConfig

    cfg = LlavaConfig.from_hf({"model_type": "llava_next_video"})
    assert (cfg.family.display_name, cfg.video_pool_mode, cfg.video_pool_stride) == ("LLaVA-NeXT-Video", "average", 2)
    assert (cfg.image_token_id, cfg.video_token_id, cfg.geometry.video_side) == (32001, 32000, 12)
    with pytest.raises(ConfigError, match="spatial_pool_mode 'bilinear' is not supported"):
        LlavaConfig.from_hf({"model_type": "llava_next_video", "spatial_pool_mode": "bilinear"})
    with pytest.raises(ConfigError, match="spatial_pool_stride must be an integer from 1 to the tower's 24"):
        LlavaConfig.from_hf({"model_type": "llava_next_video", "spatial_pool_stride": 0})
    with pytest.raises(ConfigError, match="spatial_pool_mode 'conv' needs one vision_feature_layer"):
        LlavaConfig.from_hf({"model_type": "llava_next_video", "spatial_pool_mode": "conv",
                             "vision_feature_layer": [-2, -1]})


def test_without_a_chat_template_the_published_one_is_used(checkpoint, models, tmp_path):
    import shutil

    vlm, _, _ = models("next_video")
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint("next_video"), bare)
    (bare / "chat_template.json").unlink()
    other = llavakit.load(bare, dtype=torch.float32)
    conv = CASES["image_and_video"]
    assert other.prepare([conv]).input_ids.tolist() == vlm.prepare([conv]).input_ids.tolist()


def test_cli_info_and_chat_with_a_video(checkpoint, tmp_path):
    import json
    import subprocess
    import sys

    path = checkpoint("next_video")
    video = _write_video(tmp_path / "clip.mp4")
    run = dict(capture_output=True, text=True, timeout=120)
    info = json.loads(subprocess.run([sys.executable, "-m", "llavakit", "info", "--model", str(path), "--json"],
                                     **run).stdout)
    assert info["model_type"] == "llava_next_video"
    _image(7, 50, 40).save(tmp_path / "x.png")
    out = subprocess.run([sys.executable, "-m", "llavakit", "chat", "--model", str(path), "--video", str(video),
                          "--image", str(tmp_path / "x.png"), "--num-frames", "3", "--max-new-tokens", "4",
                          "--dtype", "float32", "What happens?"], **run)
    assert out.returncode == 0, out.stderr
    vlm = llavakit.load(path, dtype=torch.float32)
    conv = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "x.png")},
                                         {"type": "video", "video": str(video), "num_frames": 3},
                                         {"type": "text", "text": "What happens?"}]}]
    assert out.stdout.strip() == vlm.chat(conv, max_new_tokens=4).text.strip()
