"""transformers' LLaVA video processors as the reference, on a machine without torchvision.

transformers' video processors (`BaseVideoProcessor`) run on its torchvision backend, and no
torchvision build installs beside this project's torch. `video_processor(cls, monkeypatch, **kw)`
builds the real transformers class and gives its modules the five torchvision functions they call
(`transforms.v2.functional`: resize, normalize, grayscale_to_rgb, crop, pad), transcribed from
torchvision's source below; everything else (frame sampling, the order of the steps, sizes, the fused
rescale and normalisation, the centre crop's offsets) is transformers' own code. Where torchvision
is importable, torchvision itself is used instead.
"""

from __future__ import annotations

import enum
import importlib.util

import torch
from torch.nn.functional import interpolate, pad as torch_pad


class InterpolationMode(enum.Enum):
    """torchvision's InterpolationMode (its values are torch's interpolate modes)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _native_uint8(interpolation: InterpolationMode) -> bool:
    # torchvision's _do_native_uint8_resize_on_cpu
    if interpolation == InterpolationMode.BILINEAR:
        return "AVX2" in torch.backends.cpu.get_cpu_capability()
    return interpolation == InterpolationMode.BICUBIC


def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    """torchvision.transforms.v2.functional.resize_image for a tensor and an explicit (h, w) size."""
    antialias = False if antialias is None else antialias
    if interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
        align_corners = False
    else:
        align_corners = None
        antialias = False
    shape = image.shape
    num_channels, old_height, old_width = shape[-3:]
    new_height, new_width = size
    if (new_height, new_width) == (old_height, old_width):
        return image
    dtype = image.dtype
    acceptable = [torch.float32, torch.float64]
    if interpolation in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT):
        acceptable.append(torch.uint8)
    elif image.device.type == "cpu" and _native_uint8(interpolation):
        acceptable.append(torch.uint8)
    image = image.reshape(-1, num_channels, old_height, old_width)
    need_cast = dtype not in acceptable
    if need_cast:
        image = image.to(dtype=torch.float32)
    image = interpolate(image, size=[new_height, new_width], mode=interpolation.value, align_corners=align_corners,
                        antialias=antialias)
    if need_cast:
        if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
            image = image.clamp_(min=0, max=255)
        if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            image = image.round_()
        image = image.to(dtype=dtype)
    return image.reshape(shape[:-3] + (num_channels, new_height, new_width))


def normalize(image, mean, std, inplace=False):
    """torchvision's normalize_image."""
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def grayscale_to_rgb(image):
    """torchvision's grayscale_to_rgb_image."""
    if image.shape[-3] >= 3:
        return image
    return image.repeat_interleave(3, dim=-3) if image.shape[-3] == 1 else image


def crop(image, top, left, height, width):
    """torchvision's crop_image, for a crop inside the image (all the centre crop asks for)."""
    assert top >= 0 and left >= 0 and top + height <= image.shape[-2] and left + width <= image.shape[-1]
    return image[..., top : top + height, left : left + width]


def pad(image, padding, fill=0, padding_mode="constant"):
    """torchvision's pad_image for a constant fill and [left, top, right, bottom] padding."""
    left, top, right, bottom = padding
    return torch_pad(image, [left, right, top, bottom], mode=padding_mode, value=float(fill or 0))


_PIL_TO_MODE = {0: InterpolationMode.NEAREST_EXACT, 4: InterpolationMode.BOX, 2: InterpolationMode.BILINEAR,
                5: InterpolationMode.HAMMING, 3: InterpolationMode.BICUBIC, 1: InterpolationMode.LANCZOS}


def video_processor(cls_name: str, monkeypatch, **kwargs):
    """transformers' video processor `cls_name` ("LlavaOnevisionVideoProcessor", ...) built with kwargs;
    `cls_name.from_pretrained` when kwargs hold `pretrained=path`."""
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling

    if importlib.util.find_spec("torchvision") is None:
        import sys
        import types

        tvF = types.SimpleNamespace(InterpolationMode=InterpolationMode, resize=resize, normalize=normalize,
                                    grayscale_to_rgb=grayscale_to_rgb, crop=crop, pad=pad)
        mapping = {PILImageResampling(k): v for k, v in _PIL_TO_MODE.items()}
        for module in (backends, video_utils):
            monkeypatch.setattr(module, "tvF", tvF, raising=False)
        monkeypatch.setattr(backends, "pil_torch_interpolation_mapping", mapping, raising=False)
        assert "torchvision" not in sys.modules
    module = {
        "LlavaOnevisionVideoProcessor": "transformers.models.llava_onevision.video_processing_llava_onevision",
        "LlavaNextVideoVideoProcessor": "transformers.models.llava_next_video.video_processing_llava_next_video",
    }[cls_name]
    cls = getattr(importlib.import_module(module), cls_name)
    path = kwargs.pop("pretrained", None)
    return cls.from_pretrained(path, **kwargs) if path is not None else cls(**kwargs)
