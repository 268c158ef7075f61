"""Video decoding and frame sampling on real files written with PyAV."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from llavakit.errors import VideoError
from llavakit.processing.video import FrameSampling, load_video

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
    expected = np.linspace(0, N_FRAMES - 1, 8, dtype=int).tolist()  # [0, 5, 11, 16, 22, 27, 33, 39]
    assert [_index_of(f) for f in frames] == expected
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)


def test_animated_gif(tmp_path):
    path = tmp_path / "anim.gif"
    images = [Image.fromarray(_frame(i)) for i in range(12)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    frames = load_video(path, FrameSampling(num_frames=4))
    assert [_index_of(f) for f in frames] == [0, 3, 7, 11]


def test_bytes_and_fps_sampling(tmp_path):
    path = _write(tmp_path / "clip.mp4", "libx264", n=40, fps=10)  # 4 seconds
    frames = load_video(path.read_bytes(), FrameSampling(num_frames=None, fps=1.0))
    assert [_index_of(f) for f in frames] == [0, 13, 26, 39]
    capped = load_video(str(path), FrameSampling(num_frames=None, fps=5.0, max_frames=6))
    assert len(capped) == 6


def test_fewer_frames_than_asked_gives_each_frame_once(tmp_path):
    path = _write(tmp_path / "short.mp4", "libx264", n=5)
    frames = load_video(str(path), FrameSampling(num_frames=32))
    assert [_index_of(f) for f in frames] == [0, 1, 2, 3, 4]


def test_frames_given_directly():
    arr = np.stack([_frame(i) for i in range(10)])
    assert [_index_of(f) for f in load_video(arr, FrameSampling(num_frames=3))] == [0, 4, 9]
    pil = [Image.fromarray(a) for a in arr]
    assert [_index_of(f) for f in load_video(pil, FrameSampling(num_frames=10))] == list(range(10))


@pytest.mark.parametrize("source, message", [
    ("/no/such/video.mp4", "no video file"),
    (b"definitely not a video file", "cannot decode video"),
    (np.zeros((4, 8, 8), dtype=np.uint8), "uint8 of shape"),
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
    with pytest.raises(VideoError, match="uint8 of shape \\(height, width, 3\\)"):
        load_video([np.zeros((8, 8, 3), dtype=np.float32)])
