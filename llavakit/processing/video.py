"""Videos to frames and frames to pixel values, as transformers' video processors do it.

A video source is a file path (mp4, webm, mkv, avi, animated gif: whatever FFmpeg reads), the
file's bytes, a list of images (PIL, paths, numpy arrays, torch tensors), or one array of frames:
numpy (F, H, W, 3) or torch (F, 3, H, W), uint8 (0..255) or float (values in [0, 1], already scaled).

Sampling is transformers' (`default_sample_indices_fn`): `num_frames` N takes frames
`arange(N) * total // N`; `fps` takes N = max(1, int(total / video_fps * fps)) of them the same way,
with the clip's own frame rate (PyAV's `average_rate`), capped by `max_frames`. A clip with fewer
frames than asked gives all its frames, each once (transformers refuses it).

Pixel values are those of transformers' video processors (`BaseVideoProcessor`, torchvision
backend): uint8 frames resized by torch's antialiased interpolation on uint8 (what torchvision's
resize runs on the CPU; it differs from PIL's by 1 in some pixels), centre crop, then rescale and
normalise fused in float32 (mean and std divided by the rescale factor).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError, ImageError, VideoError
from ..jsonfile import read_json_object
from .image import ImageProcessorConfig, _is_tensor, _resize_size, image_array, load_image, quantize

# Frames sampled from a video when neither num_frames nor fps is given. transformers' LLaVA video
# processors sample nothing by default (every decoded frame is kept); vLLM's video loader takes 32.
DEFAULT_NUM_FRAMES = 32


@dataclass(frozen=True)
class FrameSampling:
    """How many frames to take from a clip."""

    num_frames: int | None = DEFAULT_NUM_FRAMES  # spread over the clip (arange(N) * total // N); None with fps
    fps: float | None = None  # frames per second of video instead of a fixed count (needs the clip's frame rate)
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

    def indices(self, total: int, video_fps: float | None) -> list[int]:
        """Frame indices to keep out of `total` frames of a clip of `video_fps` frames per second
        (None: unknown, as for frames given as arrays, which fps sampling then refuses)."""
        if total < 1:
            raise VideoError("the video has no frames.")
        if self.num_frames is not None:
            want = self.num_frames
        else:
            if not video_fps or video_fps <= 0:
                raise VideoError("fps sampling needs the video's frame rate, and frames given directly have none; "
                                 "pass num_frames instead (or the video file).")
            want = min(self.max_frames, max(1, int(total / video_fps * self.fps)))
        if want >= total:
            return list(range(total))
        return (np.arange(want) * total // want).tolist()


def _describe(source: Any) -> str:
    text = repr(source) if not isinstance(source, (bytes, bytearray)) else f"<{len(source)} bytes>"
    return text if len(text) <= 60 else text[:57] + "..."


def _open(source: Any):
    import av

    handle = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    return av.open(handle)


def _decode(source: Any, sampling: FrameSampling) -> np.ndarray:
    """The sampled frames of a video file (path or bytes): uint8 (F, H, W, 3) RGB.

    Only the kept frames are converted and held, so long clips decode in bounded memory: the
    frame count comes from the container when it knows it, otherwise from a first decoding pass.
    The frame rate is the stream's average rate, as transformers' PyAV reader takes it.
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
            video_fps = float(stream.average_rate) if stream.average_rate else None
            if video_fps is None and container.duration:  # no rate recorded: frames over the duration
                video_fps = total / (container.duration / 1_000_000)  # microseconds
        wanted = sampling.indices(total, video_fps)
        keep, last, frames = set(wanted), max(wanted), {}
        with _open(source) as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in keep:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot decode video {_describe(source)}: {e}. Is it a complete, supported video file?") from e
    if not frames:
        raise VideoError(f"{_describe(source)} decoded to no frames.")
    # A container may announce more frames than it decodes; keep what exists, in order.
    return np.stack([frames[i] for i in wanted if i in frames])


def _frame(frame: Any, k: int) -> np.ndarray:
    """(H, W, 3) pixels of the k-th frame of a list: an array or tensor as `image_array` reads it
    (float frames stay float), anything else through `load_image` (uint8)."""
    try:
        array = image_array(frame, what=f"video frame {k}")
        return array if array is not None else np.asarray(load_image(frame))
    except ImageError as e:
        raise VideoError(str(e)) from e


def _check_frames_array(source: Any) -> None:
    """A numpy (F, H, W, C) array or a torch (F, C, H, W) tensor of at least one frame, or VideoError."""
    if _is_tensor(source):
        if source.ndim != 4:
            raise VideoError("a video tensor must be (frames, channels, height, width), got shape "
                             f"{tuple(source.shape)}.")
    elif source.ndim != 4 or source.shape[-1] not in (1, 3, 4):
        raise VideoError(f"a video array must be (frames, height, width, 3) (or 1 or 4 channels), got shape "
                         f"{source.shape}.")
    if len(source) == 0:
        raise VideoError("a video given as frames needs at least one frame.")


def load_frames(source: Any, sampling: FrameSampling = FrameSampling()) -> np.ndarray:
    """Sampled RGB frames (F, H, W, 3) of a video given as a file, bytes, a list of images, or an array
    of frames (see the module docstring): uint8, or float in [0, 1] when the frames were given so.
    Only the sampled frames of a list or array are read."""
    if isinstance(source, (str, os.PathLike, bytes, bytearray)):
        return _decode(source, sampling)
    if isinstance(source, np.ndarray) or _is_tensor(source):
        _check_frames_array(source)
    elif isinstance(source, (list, tuple)):
        if not source:
            raise VideoError("a video given as frames needs at least one frame.")
    else:
        raise VideoError(f"unsupported video source {_describe(source)}: give a path, bytes, a list of frames "
                         "or an array of frames (numpy (frames, height, width, 3), torch (frames, 3, height, width)).")
    arrays = [_frame(source[i], i) for i in sampling.indices(len(source), None)]
    if len({(a.shape, a.dtype) for a in arrays}) > 1:
        raise VideoError("the frames of one video must share one size and dtype, got "
                         f"{sorted({f'{a.shape[1]}x{a.shape[0]} {a.dtype}' for a in arrays})}.")
    return np.stack(arrays)


def load_video(source: Any, sampling: FrameSampling = FrameSampling()) -> list[Image.Image]:
    """Sampled RGB frames of a video (see `load_frames`) as PIL images (float frames quantised to uint8)."""
    return [Image.fromarray(quantize(f)) for f in load_frames(source, sampling)]


# ───────────────────────────── pixel values ─────────────────────────────

# PIL filter ids -> torch interpolate modes, as transformers maps them for its torchvision backend
# (NEAREST -> NEAREST_EXACT). BOX, HAMMING and LANCZOS have no torch kernel: torchvision's own only.
_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def _resize(video, size: tuple[int, int], resample: int):
    """torchvision's resize_image on a (F, C, H, W) tensor, step for step: uint8 is resized natively
    on the CPU for bicubic (and bilinear where the CPU has AVX2), anything else in float32 and cast back
    (rounded, and clamped for bicubic); antialiasing on, except for nearest."""
    import torch
    import torch.nn.functional as F

    if tuple(video.shape[-2:]) == tuple(size):
        return video  # torchvision returns the frames untouched
    mode = _MODES.get(resample)
    if mode is None:
        raise ConfigError(f"the video processor's resample = {resample} has no torch kernel; llavakit resizes video "
                          f"frames with {sorted(_MODES)} (nearest, bilinear, bicubic).")
    dtype = video.dtype
    native = [torch.float32, torch.float64]
    if mode == "nearest-exact" or (video.device.type == "cpu" and (
            mode == "bicubic" or "AVX2" in torch.backends.cpu.get_cpu_capability())):
        native.append(torch.uint8)
    cast = dtype not in native
    x = video.to(torch.float32) if cast else video
    aligned = None if mode == "nearest-exact" else False
    x = F.interpolate(x, size=list(size), mode=mode, align_corners=aligned, antialias=mode != "nearest-exact")
    if cast:
        if mode == "bicubic" and dtype == torch.uint8:
            x = x.clamp_(min=0, max=255)
        if not dtype.is_floating_point:
            x = x.round_()
        x = x.to(dtype)
    return x


def _center_crop(video, height: int, width: int):
    """transformers' TorchvisionBackend.center_crop: zero-pad (the extra pixel after) when too small,
    then cut at int((H - h) / 2), int((W - w) / 2)."""
    import torch.nn.functional as F

    h, w = video.shape[-2:]
    if height > h or width > w:
        pad_w, pad_h = max(width - w, 0), max(height - h, 0)
        video = F.pad(video, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = video.shape[-2:]
        if (h, w) == (height, width):
            return video
    top, left = int((h - height) / 2.0), int((w - width) / 2.0)
    return video[..., top : top + height, left : left + width]


def video_pixels(frames: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """Pixel values float32 (F, 3, H', W') of frames (F, H, W, 3), equal to transformers' video
    processor (`BaseVideoProcessor._preprocess`) with `cfg` as its settings: resize, centre crop,
    then rescale and normalise fused. Float frames are taken as already scaled (transformers'
    `do_rescale=False`): they are resized in their own precision and not rescaled."""
    import torch

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # (F, 3, H, W)
    if cfg.do_resize:
        video = _resize(video, _resize_size(video.shape[-2], video.shape[-1], cfg), cfg.resample)
    if cfg.do_center_crop:
        video = _center_crop(video, cfg.crop_height, cfg.crop_width)
    rescale = cfg.do_rescale and video.dtype == torch.uint8
    mean, std = list(cfg.image_mean), list(cfg.image_std)
    if rescale and cfg.do_normalize:  # fused: the statistics scaled up instead of the pixels down
        mean_t = torch.tensor(mean) * (1.0 / cfg.rescale_factor)
        std_t = torch.tensor(std) * (1.0 / cfg.rescale_factor)
        video = (video.to(torch.float32) - mean_t.view(-1, 1, 1)) / std_t.view(-1, 1, 1)
    elif cfg.do_normalize:
        video = video.to(torch.float32)
        video = (video - torch.tensor(mean, dtype=video.dtype).view(-1, 1, 1)) / \
            torch.tensor(std, dtype=video.dtype).view(-1, 1, 1)
    elif rescale:
        video = video * cfg.rescale_factor
    return np.ascontiguousarray(video.to(torch.float32).numpy())


# ───────────────────────────── the video processor's settings ─────────────────────────────

# Class defaults of transformers' LLaVA video processors, for the keys a file omits.
VIDEO_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlavaOnevisionVideoProcessor": dict(size={"height": 384, "width": 384}, do_center_crop=False, crop_size=None),
    "LlavaNextVideoVideoProcessor": dict(size={"shortest_edge": 224}, do_center_crop=True,
                                         crop_size={"height": 224, "width": 224}),
}


def read_video_processor_dict(folder: Path) -> dict:
    """The video processor settings of a checkpoint folder, where transformers 5 looks for them: the
    "video_processor" section of processor_config.json, else video_preprocessor_config.json, else the
    image processor's preprocessor_config.json (which older checkpoints share with video); {} when none."""
    folder = Path(folder)
    nested = read_json_object(folder / "processor_config.json", missing_ok=True).get("video_processor")
    if isinstance(nested, dict):
        return nested
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            return read_json_object(folder / name)
    return {}


def video_processor_config(video_dict: dict, processor_type: str) -> ImageProcessorConfig:
    """The settings transformers' `processor_type` video processor (the family's) builds from a
    settings dict: its class defaults for the keys the dict omits. Image-processor keys such as
    `do_pad` or `image_grid_pinpoints` mean nothing to a video processor and are dropped."""
    defaults = VIDEO_PROCESSOR_DEFAULTS.get(processor_type)
    if defaults is None:
        raise ConfigError(f"no video processor defaults for {processor_type!r}; known: "
                          f"{', '.join(VIDEO_PROCESSOR_DEFAULTS)}.")
    keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    d = {"image_processor_type": "CLIPImageProcessor", **defaults}  # CLIP's defaults fill the rest (mean, std)
    d.update({k: video_dict[k] for k in keys if video_dict.get(k) is not None})
    if not d.get("do_center_crop"):
        d["crop_size"] = None
    return ImageProcessorConfig.from_hf(d)
