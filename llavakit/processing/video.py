"""Videos to frames: decoding with PyAV, uniform frame sampling, frames given directly.

A video source is a file path (mp4, webm, mkv, avi, animated gif: whatever FFmpeg reads), the
file's bytes, a list of images (PIL, paths, arrays), or an array (F, H, W, 3) of uint8 RGB.
Sampling picks `num_frames` indices spread evenly over the whole clip (np.linspace, truncated,
as lmms-eval and vLLM sample for OneVision), or `fps` frames per second capped by `max_frames`.
A clip with fewer frames than asked gives all its frames, each once.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import VideoError
from .image import load_image

DEFAULT_NUM_FRAMES = 32


@dataclass(frozen=True)
class FrameSampling:
    """How many frames to take from a clip."""

    num_frames: int | None = DEFAULT_NUM_FRAMES  # evenly spread over the clip; None with fps
    fps: float | None = None  # frames per second of video instead of a fixed count
    max_frames: int = 64  # cap for fps sampling

    def __post_init__(self):
        for name in ("num_frames", "max_frames"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise VideoError(f"{name} must be an integer, got {value!r}.")
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))):
            raise VideoError(f"fps must be a number, got {self.fps!r}.")
        if (self.num_frames is None) == (self.fps is None):
            raise VideoError("give exactly one of num_frames and fps for video sampling.")
        if self.num_frames is not None and self.num_frames < 1:
            raise VideoError(f"num_frames must be >= 1, got {self.num_frames}.")
        if self.fps is not None and not self.fps > 0:
            raise VideoError(f"fps must be > 0, got {self.fps}.")
        if self.max_frames < 1:
            raise VideoError(f"max_frames must be >= 1, got {self.max_frames}.")

    def indices(self, total: int, duration_s: float | None) -> list[int]:
        """Frame indices to keep out of `total` decoded frames."""
        if total < 1:
            raise VideoError("the video has no frames.")
        if self.num_frames is not None:
            want = self.num_frames
        else:
            seconds = duration_s if duration_s and duration_s > 0 else total / 25.0
            want = min(self.max_frames, max(1, int(seconds * self.fps)))
        if want >= total:
            return list(range(total))
        return np.linspace(0, total - 1, want, dtype=int).tolist()


def _describe(source: Any) -> str:
    text = repr(source) if not isinstance(source, (bytes, bytearray)) else f"<{len(source)} bytes>"
    return text if len(text) <= 60 else text[:57] + "..."


def _open(source: Any):
    import av

    handle = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    return av.open(handle)


def _decode(source: Any, sampling: FrameSampling) -> list[Image.Image]:
    """The sampled frames of a video file (path or bytes) as RGB images.

    Only the kept frames are converted and held, so long clips decode in bounded memory: the
    frame count comes from the container when it knows it, otherwise from a first decoding pass.
    """
    try:
        import av
    except ImportError as e:  # an optional dependency: images work without it
        raise VideoError("reading video files needs PyAV: pip install 'llavakit[video]' (or pip install av).") from e
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise VideoError(f"no video file at {_describe(source)}.")
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise VideoError(f"{_describe(source)} holds no video stream.")
            stream = container.streams.video[0]
            total = stream.frames or sum(1 for _ in container.decode(stream))
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration:
                duration = container.duration / 1_000_000  # microseconds
        wanted = sampling.indices(total, duration)
        keep, last, frames = set(wanted), max(wanted), {}
        with _open(source) as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in keep:
                    frames[i] = frame.to_image().convert("RGB")
                if i >= last:
                    break
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot decode video {_describe(source)}: {e}. Is it a complete, supported video file?") from e
    if not frames:
        raise VideoError(f"{_describe(source)} decoded to no frames.")
    # A container may announce more frames than it decodes; keep what exists, in order.
    return [frames[i] for i in wanted if i in frames]


def _array_frame(frame: np.ndarray) -> Image.Image:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise VideoError(f"a video frame array must be uint8 of shape (height, width, 3), got {frame.dtype} {frame.shape}.")
    return Image.fromarray(frame)


def load_video(source: Any, sampling: FrameSampling = FrameSampling()) -> list[Image.Image]:
    """Sampled RGB frames of a video given as a file, bytes, a list of images, or an (F, H, W, 3) array."""
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise VideoError(f"a video array must be uint8 of shape (frames, height, width, 3), got "
                             f"{source.dtype} {source.shape}.")
        frames = [Image.fromarray(f) for f in source]
        duration = None
    elif isinstance(source, (list, tuple)):
        if not source:
            raise VideoError("a video given as a list of frames needs at least one frame.")
        frames = [load_image(f) if not isinstance(f, np.ndarray) else _array_frame(f) for f in source]
        duration = None
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        return _decode(source, sampling)
    else:
        raise VideoError(f"unsupported video source {_describe(source)}: give a path, bytes, a list of frames "
                         "or a (frames, height, width, 3) uint8 array.")
    return [frames[i] for i in sampling.indices(len(frames), duration)]
