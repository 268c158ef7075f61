"""Video decoding, frame sampling and pixel values, on arrays and real files written with PyAV,
against transformers' frame sampling, its PyAV reader and its LLaVA video processors."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from llavakit.errors import VideoError
from llavakit.processing.video import FrameSampling, load_frames, load_video, video_pixels, video_processor_config

N_FRAMES = 40


def _frame(i: int, w: int = 64, h: int = 48) -> np.ndarray:
    """A flat colour that encodes the frame index, robust to lossy codecs."""
    return np.full((h, w, 3), (i * 6, 255 - i * 6, 128), dtype=np.uint8)


def _index_of(frame: Image.Image) -> int:
    a = np.asarray(frame).astype(float)
    # red rises and green falls with the index: their difference halves a lossy codec's colour drift
    return int(round((a[..., 0].mean() + 255 - a[..., 1].mean()) / 12))


def _write(path, codec: str, n: int = N_FRAMES, fps: int = 10):
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p" if codec not in ("ffv1", "mjpeg") else ("yuv444p" if codec == "ffv1" else "yuvj420p")
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.mark.parametrize("name, codec", [("clip.mp4", "libx264"), ("clip.webm", "libvpx"), ("clip.mkv", "ffv1"),
                                         ("clip.avi", "mjpeg")])
def test_container_formats_sample_the_expected_frames(tmp_path, name, codec):
    path = _write(tmp_path / name, codec)
    frames = load_video(str(path), FrameSampling(num_frames=8))
    expected = [0, 5, 10, 15, 20, 25, 30, 35]  # arange(8) * 40 // 8, as transformers samples
    assert [_index_of(f) for f in frames] == expected
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)


def test_animated_gif(tmp_path):
    path = tmp_path / "anim.gif"
    images = [Image.fromarray(_frame(i)) for i in range(12)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    frames = load_video(path, FrameSampling(num_frames=4))
    assert [_index_of(f) for f in frames] == [0, 3, 6, 9]


def test_bytes_and_fps_sampling(tmp_path):
    path = _write(tmp_path / "clip.mp4", "libx264", n=40, fps=10)  # 4 seconds
    frames = load_video(path.read_bytes(), FrameSampling(num_frames=None, fps=1.0))
    assert [_index_of(f) for f in frames] == [0, 10, 20, 30]  # 40 / 10 * 1 = 4 frames, arange(4) * 40 // 4
    capped = load_video(str(path), FrameSampling(num_frames=None, fps=5.0, max_frames=6))
    assert [_index_of(f) for f in capped] == [0, 6, 13, 20, 26, 33]


def test_fewer_frames_than_asked_gives_each_frame_once(tmp_path):
    path = _write(tmp_path / "short.mp4", "libx264", n=5)
    frames = load_video(str(path), FrameSampling(num_frames=32))
    assert [_index_of(f) for f in frames] == [0, 1, 2, 3, 4]


def test_frames_given_directly():
    arr = np.stack([_frame(i) for i in range(10)])
    assert [_index_of(f) for f in load_video(arr, FrameSampling(num_frames=3))] == [0, 3, 6]
    pil = [Image.fromarray(a) for a in arr]
    assert [_index_of(f) for f in load_video(pil, FrameSampling(num_frames=10))] == list(range(10))


@pytest.mark.parametrize("source, message", [
    ("/no/such/video.mp4", "no video file"),
    (b"definitely not a video file", "cannot decode video"),
    (np.zeros((4, 8, 8), dtype=np.uint8), "must be \\(frames, height, width, 3\\)"),
    ([], "at least one frame"),
    (12, "unsupported video source"),
])
def test_bad_sources_raise_video_error(source, message):
    with pytest.raises(VideoError, match=message):
        load_video(source)


def test_truncated_file_raises_or_keeps_what_decodes(tmp_path):
    path = _write(tmp_path / "clip.mp4", "libx264")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    try:
        frames = load_video(str(cut), FrameSampling(num_frames=8))
    except VideoError as e:
        assert "cut.mp4" in str(e)
    else:
        assert 1 <= len(frames) <= 8


def test_sampling_arguments_are_checked():
    with pytest.raises(VideoError, match="exactly one of num_frames and fps"):
        FrameSampling(num_frames=8, fps=1.0)
    with pytest.raises(VideoError, match="num_frames must be >= 1"):
        FrameSampling(num_frames=0)


def test_sampling_argument_types_and_frame_arrays_are_checked():
    with pytest.raises(VideoError, match="num_frames must be an integer"):
        FrameSampling(num_frames="2")
    with pytest.raises(VideoError, match="fps must be a number"):
        FrameSampling(num_frames=None, fps="1")
    with pytest.raises(VideoError, match="video frame 0 array of dtype int16 is not supported"):
        load_video([np.zeros((8, 8, 3), dtype=np.int16)])
    with pytest.raises(VideoError, match="video frame 1 array holds float values in \\[2.0, 2.0\\]"):
        load_video([np.zeros((8, 8, 3), dtype=np.float32), np.full((8, 8, 3), 2.0, dtype=np.float32)])
    with pytest.raises(VideoError, match="share one size and dtype"):
        load_video([np.zeros((8, 8, 3), dtype=np.uint8), np.zeros((8, 9, 3), dtype=np.uint8)])
    with pytest.raises(VideoError, match="fps sampling needs the video's frame rate"):
        load_video(np.zeros((4, 8, 8, 3), dtype=np.uint8), FrameSampling(num_frames=None, fps=1.0))


# ───────────────────────────── against transformers ─────────────────────────────


def test_num_frames_and_fps_pick_transformers_frames():
    """Every setting where transformers samples (it refuses more frames than the clip has) picks its frames."""
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    settings = 0
    for total in (1, 7, 24, 40, 97, 300):
        for n in range(1, min(total, 40) + 1):
            want = default_sample_indices_fn(VideoMetadata(total_num_frames=total), num_frames=n).tolist()
            assert FrameSampling(num_frames=n).indices(total, None) == want, (total, n)
            settings += 1
        for video_fps in (10.0, 24.0, 25.0, 30000 / 1001, 60.0):
            for fps in (0.1, 0.5, 1.0, 2.0, 3.3, 8.0):
                meta = VideoMetadata(total_num_frames=total, fps=video_fps)
                if int(total / video_fps * fps) > total:
                    continue
                want = default_sample_indices_fn(meta, fps=fps).tolist()
                assert FrameSampling(num_frames=None, fps=fps, max_frames=10_000).indices(total, video_fps) == want
                settings += 1
    assert settings == 332


@pytest.mark.parametrize("name, codec", [("clip.mp4", "libx264"), ("clip.avi", "mjpeg")])
@pytest.mark.parametrize("sampling", [dict(num_frames=8), dict(num_frames=None, fps=2.5)])
def test_file_frames_equal_transformers_pyav_reader(tmp_path, name, codec, sampling):
    from transformers.video_utils import load_video as hf_load_video

    path = _write(tmp_path / name, codec, n=37, fps=12)
    want, meta = hf_load_video(str(path), backend="pyav", num_frames=sampling["num_frames"], fps=sampling.get("fps"))
    got = load_frames(str(path), FrameSampling(max_frames=1000, **sampling))
    assert got.dtype == np.uint8 and got.shape == want.shape and np.array_equal(got, want)
    assert len(meta.frames_indices) == len(got)


VIDEO_PROCESSORS = {  # transformers class, its settings (odd sizes: a stretch, a crop, a crop larger than the frame)
    "onevision": ("LlavaOnevisionVideoProcessor", dict(size={"height": 35, "width": 35}, image_mean=[0.5] * 3,
                                                       image_std=[0.5] * 3)),
    "next_video": ("LlavaNextVideoVideoProcessor", dict(size={"shortest_edge": 28}, crop_size={"height": 28,
                                                                                               "width": 28})),
    "next_video_wide_crop": ("LlavaNextVideoVideoProcessor", dict(size={"shortest_edge": 20},
                                                                  crop_size={"height": 24, "width": 36})),
    "onevision_bilinear": ("LlavaOnevisionVideoProcessor", dict(size={"height": 21, "width": 26}, resample=2)),
}


def _reference_pixels(monkeypatch, name, frames, **kwargs):
    from video_reference import video_processor

    cls, settings = VIDEO_PROCESSORS[name]
    return video_processor(cls, monkeypatch, **settings)(videos=frames, return_tensors="np", **kwargs)[
        "pixel_values_videos"][0]


@pytest.mark.parametrize("name", list(VIDEO_PROCESSORS))
def test_pixels_equal_transformers_video_processor(monkeypatch, name):
    frames = np.random.default_rng(3).integers(0, 256, (5, 30, 44, 3), dtype=np.uint8)
    cfg = video_processor_config(VIDEO_PROCESSORS[name][1], VIDEO_PROCESSORS[name][0])
    want = _reference_pixels(monkeypatch, name, frames)
    got = video_pixels(frames, cfg)
    assert got.shape == want.shape and float(np.abs(got - want).max()) <= 1e-5
    # float frames in [0, 1] are already scaled: transformers' do_rescale=False
    scaled = frames.astype(np.float32) / 255
    want = _reference_pixels(monkeypatch, name, scaled, do_rescale=False)
    assert float(np.abs(video_pixels(scaled, cfg) - want).max()) <= 1e-5


def test_sampled_file_pixels_equal_transformers(monkeypatch, tmp_path):
    """A real file end to end: transformers' PyAV reader and video processor against load_frames + video_pixels."""
    from transformers.video_utils import load_video as hf_load_video

    path = _write(tmp_path / "clip.mp4", "libx264", n=30, fps=10)
    want_frames, _ = hf_load_video(str(path), backend="pyav", num_frames=6)
    want = _reference_pixels(monkeypatch, "next_video", want_frames)
    cls, settings = VIDEO_PROCESSORS["next_video"]
    got = video_pixels(load_frames(str(path), FrameSampling(num_frames=6)), video_processor_config(settings, cls))
    assert float(np.abs(got - want).max()) <= 1e-5


def test_frames_in_every_spelling_are_the_same_video():
    import torch

    arr = np.random.default_rng(4).integers(0, 256, (6, 20, 26, 3), dtype=np.uint8)
    want = load_frames(arr, FrameSampling(num_frames=3))
    spellings = [list(arr), [Image.fromarray(f) for f in arr], torch.from_numpy(arr).permute(0, 3, 1, 2),
                 [torch.from_numpy(f).permute(2, 0, 1) for f in arr]]
    for source in spellings:
        assert np.array_equal(load_frames(source, FrameSampling(num_frames=3)), want)
    floats = load_frames(arr.astype(np.float64) / 255, FrameSampling(num_frames=3))
    assert floats.dtype == np.float64 and np.array_equal(np.round(floats * 255).astype(np.uint8), want)
