"""Image loading and CLIP/SigLIP preprocessing, PIL-exact against transformers 5.24.

Two halves:

* `load_image(source)` turns a path, URL, bytes, base64 text, data URL, PIL object, numpy array
  or torch tensor into an RGB PIL image, with transformers' RGB rule for each kind of input.
* `preprocess(image, cfg)` turns one image into a normalized float32 CHW array, equal bit for
  bit to transformers' PIL backend (`PilBackend._preprocess`; `LlavaImageProcessorPil` for
  `do_pad`).

The RGB rules differ by input kind, so keep them straight:

    str / path / bytes ─► Image.open ─► exif_transpose ─► convert("RGB")     (alpha dropped)
    PIL.Image object   ─► no EXIF rotation ─► "A" band or info["transparency"]?
                              yes ─► alpha-composite onto opaque white ─► RGB
                              no  ─► convert("RGB")

So the same RGBA file gives different pixels as a path and as an opened PIL image. A palette
or RGB file with a transparent colour (PNG tRNS) keeps that colour in `info["transparency"]`
after `convert("RGB")`; `preprocess` then paints those pixels white, exactly as transformers'
processor does with the image its own `load_image` returned.

Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from .. import anyres
from ..errors import ConfigError, ImageError, MediaError, MediaURLNotAllowed
from ..families import tower
from ..fetch import RemoteFetcher
from ..jsonfile import read_json_object

URL_TIMEOUT_S = 30.0
URL_MAX_BYTES = 64 << 20  # images larger than this are refused, not read into memory
URL_MAX_REDIRECTS = 10  # as many as urllib followed before
_URL_FETCHER = RemoteFetcher(URL_TIMEOUT_S, URL_MAX_BYTES, URL_MAX_REDIRECTS)  # the guard on: public hosts only
# Tower normalisation statistics; the registry (llavakit.families.TOWERS) owns them.
OPENAI_CLIP_MEAN = tower("clip_vision_model").mean
OPENAI_CLIP_STD = tower("clip_vision_model").std
HALF_MEAN_STD = tower("siglip_vision_model").mean  # SigLIP's mean and std alike
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

_SOURCES_HINT = (
    "Pass a PIL image, a path to an image file, encoded image bytes, an http(s) URL, "
    "a data:image/...;base64,... URL, base64 text, or a numpy array or torch tensor of pixels."
)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ico", ".ppm", ".pgm", ".jfif"}


# ───────────────────────────── loading ─────────────────────────────


def _describe(source: Any) -> str:
    """A short printable description of `source` for error messages (long strings truncated)."""
    if isinstance(source, (bytes, bytearray)):
        return f"{type(source).__name__} of length {len(source)}"
    text = repr(os.fspath(source)) if isinstance(source, os.PathLike) else repr(source)
    return text if len(text) <= 60 else text[:57] + "..."


def _looks_like_path(text: str) -> bool:
    """Guess whether a string that named no file was meant as a path (only to word the error)."""
    if text.startswith("data:") or len(text) > 1024:
        return False
    return text.startswith(("/", "./", "../", "~")) or "\\" in text or Path(text).suffix.lower() in _IMAGE_SUFFIXES


def _decode(fp: str | io.BytesIO, given: Any) -> Image.Image:
    """Open, fully decode, EXIF-rotate and RGB-convert an encoded image: the rule for paths,
    URLs, bytes and base64 (transformers.image_utils.load_image)."""
    try:
        with Image.open(fp) as im:
            im.load()  # decode now, so truncated or corrupt data fails here and not mid-batch
            return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError as e:
        raise ImageError(f"Image file not found: {_describe(given)}. Check the path.") from e
    except Exception as e:  # PIL raises a zoo of types on bad data: OSError, SyntaxError, struct.error, ...
        raise ImageError(
            f"Could not decode {_describe(given)} as an image ({type(e).__name__}: {e}). "
            f"Check that it is a complete image file in a format Pillow reads. {_SOURCES_HINT}"
        ) from e


def _fetch(url: str) -> bytes:
    """GET `url` through llavakit's one fetcher: public addresses only (no private, loopback or
    cloud-metadata hosts, on any redirect hop), URL_TIMEOUT_S for the whole download, at most
    URL_MAX_BYTES. Every refusal or failure becomes an ImageError (its cause keeps the precise
    llavakit.errors.MediaError subclass)."""
    try:
        return _URL_FETCHER.fetch(url, "image")
    except MediaError as e:
        hint = ("Download the file and pass its path or bytes instead." if isinstance(e, MediaURLNotAllowed)
                else "Check the URL and the network, or download the file and pass its path.")
        raise ImageError(f"Could not fetch the image: {e} {hint}") from e


def _load_str(source: str) -> Image.Image:
    # Same precedence as transformers' load_image: URL, then an existing file, then base64.
    if source.startswith(("http://", "https://")):
        return _decode(io.BytesIO(_fetch(source)), source)
    if os.path.isfile(source):
        return _decode(source, source)
    if os.path.isdir(source):
        raise ImageError(f"{_describe(source)} is a directory, not an image file. {_SOURCES_HINT}")
    if source.startswith("data:image/"):
        parts = source.split(",")
        if len(parts) < 2:
            raise ImageError(f"Data URL {_describe(source)} has no ',' before its payload. {_SOURCES_HINT}")
        payload = parts[1]  # transformers takes the text between the first and second comma
    else:
        payload = source
    try:
        # decodebytes is lenient (skips non-alphabet characters), as in transformers; keep it so
        # that every string transformers accepts is accepted here too.
        data = base64.decodebytes(payload.encode())
        with Image.open(io.BytesIO(data)):  # identify only, to word the error; _decode decodes
            pass
    except Exception as e:  # binascii.Error, UnidentifiedImageError, DecompressionBombError, ...
        if _looks_like_path(source):
            raise ImageError(
                f"Image file not found: {_describe(source)} (no such file, and not an http(s) URL or base64 image "
                f"data). Check the path. {_SOURCES_HINT}"
            ) from e
        raise ImageError(
            f"Could not decode {_describe(source)} as base64 image data ({type(e).__name__}: {e}). "
            f"It is not an existing file or an http(s) URL either. {_SOURCES_HINT}"
        ) from e
    return _decode(io.BytesIO(data), source)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image by transformers' `convert_to_rgb` rule: an image with an "A" band
    or `info["transparency"]` is alpha-composited onto opaque white, anything else goes through
    `.convert("RGB")`. No EXIF rotation. Raises ImageError if the image cannot be decoded."""
    try:
        image.load()
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as e:  # a lazily opened PIL image may hold truncated or closed data
        raise ImageError(
            f"Could not convert PIL image (mode {image.mode!r}, size {image.size}) to RGB "
            f"({type(e).__name__}: {e}). Check that the image file is complete and still open."
        ) from e


def load_image(source: Any) -> Image.Image:
    """Load `source` as a fully decoded RGB `PIL.Image.Image`.

    `source` may be a PIL image, a path (str or os.PathLike), `bytes`/`bytearray` of an encoded
    image file, an http(s) URL (public hosts only, 30 s and 64 MiB at most), a
    `data:image/...;base64,...` URL or plain base64 text. Encoded inputs are EXIF-rotated and
    `convert("RGB")`-ed (alpha dropped); PIL objects are not rotated and have transparency
    composited onto white (see the module docstring). A numpy array or torch tensor is read by
    `image_array` (float values in [0, 1] are taken as already scaled). Raises `ImageError` on any failure.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    array = image_array(source)
    if array is not None:
        return Image.fromarray(quantize(array))
    if isinstance(source, (bytes, bytearray)):
        return _decode(io.BytesIO(bytes(source)), source)
    if isinstance(source, os.PathLike):
        return _decode(os.fspath(source), source)
    if isinstance(source, str):
        return _load_str(source)
    raise ImageError(f"Cannot load an image from a {type(source).__name__} ({_describe(source)}). {_SOURCES_HINT}")


_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported: no import here
    return torch is not None and isinstance(x, torch.Tensor)


def image_array(source: Any, what: str = "an image") -> np.ndarray | None:
    """(H, W, 3) RGB pixels of an image given as a numpy array or a torch tensor; None for anything else.

    numpy arrays are (H, W, C), torch tensors (C, H, W) (either is read the other way round when only
    that fits), C 1 (grey), 3 (RGB) or 4 (RGBA, composited onto white as transformers does), or (H, W)
    grey. uint8 holds 0..255; a float dtype holds values in [0, 1], already scaled, and is returned as
    float (see `quantize`). ImageError for other dtypes, shapes, NaN or values outside [0, 1].
    """
    if _is_tensor(source):
        torch = sys.modules["torch"]
        t = source.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            t = t.float()
        array, channels_first = t.numpy(), True
    elif isinstance(source, np.ndarray):
        array, channels_first = source, False
    else:
        return None
    kind = f"{what} {'tensor' if channels_first else 'array'}"
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise ImageError(f"{kind} of dtype {array.dtype} is not supported: give uint8 values (0..255) or floats "
                         "in [0, 1] (for example array.astype(np.uint8)).")
    if array.ndim == 2:
        array = array[:, :, None]
    layout = None
    if array.ndim == 3:
        first, last = array.shape[0] in _CHANNELS, array.shape[-1] in _CHANNELS
        if channels_first:
            layout = "CHW" if first else "HWC" if last else None
        else:
            layout = "HWC" if last else "CHW" if first else None
    if array.ndim != 3 or layout is None or 0 in array.shape:
        want = "(channels, height, width)" if channels_first else "(height, width, channels)"
        raise ImageError(f"{kind} of shape {tuple(array.shape)} is not an image: give {want} with 1, 3 or 4 "
                         "channels, or (height, width) grey.")
    hwc = np.moveaxis(array, 0, -1) if layout == "CHW" else array  # (H, W, C)
    if hwc.dtype != np.uint8:
        low, high = float(hwc.min()), float(hwc.max())
        if not (0.0 <= low and high <= 1.0):  # NaN fails both
            raise ImageError(f"{kind} holds float values in [{low}, {high}]; float pixels must lie in [0, 1] "
                             "(already scaled). For 0..255 values pass uint8, or divide by 255.")
    channels = hwc.shape[-1]
    if channels == 1:
        return np.repeat(hwc, 3, axis=-1)
    if channels == 4:  # transformers' convert_to_rgb for arrays: blend onto white, rounding integer pixels
        white = 255 if hwc.dtype == np.uint8 else 1.0
        alpha = hwc[..., 3:4] / white
        blended = alpha * hwc[..., :3] + (1 - alpha) * white
        return np.round(blended).astype(hwc.dtype) if white == 255 else blended.astype(hwc.dtype)
    return hwc


def quantize(hwc: np.ndarray) -> np.ndarray:
    """uint8 pixels of an `image_array` result. A float image becomes the uint8 image transformers'
    PIL backend resizes it as (x * 255 in float64, to float32, truncated): its first step on a float
    image, and one that its later ones undo exactly, so the pixel values equal transformers' with
    `do_rescale=False`."""
    if hwc.dtype == np.uint8:
        return np.ascontiguousarray(hwc)
    return (hwc.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)


# ───────────────────────────── config ─────────────────────────────

_CLIP_DEFAULTS: dict[str, Any] = dict(
    do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True, do_pad=False,
)
# Class-level defaults of transformers' PIL image processors, for the keys a file omits.
# Unknown types fall back to CLIPImageProcessor's.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CLIP_DEFAULTS,
    "LlavaImageProcessor": _CLIP_DEFAULTS,
    "LlavaNextImageProcessor": _CLIP_DEFAULTS,
    "LlavaOnevisionImageProcessor": {
        **_CLIP_DEFAULTS, "size": {"height": 384, "width": 384}, "do_center_crop": False, "crop_size": None,
    },
    "SiglipImageProcessor": {
        **_CLIP_DEFAULTS, "size": {"height": 224, "width": 224}, "do_center_crop": False, "crop_size": None,
        "image_mean": HALF_MEAN_STD, "image_std": HALF_MEAN_STD,
    },
}


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _parse_size(size: Any) -> tuple[int | None, int | None, int | None]:
    """`size` → (shortest_edge, height, width); an int means shortest edge (CLIP's default_to_square=False)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return _positive_int(size, "size"), None, None
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return None, _positive_int(size[0], "size[0]"), _positive_int(size[1], "size[1]")
    if isinstance(size, dict):
        keys = {k for k, v in size.items() if v is not None}  # transformers ignores None-valued keys
        if keys == {"shortest_edge"}:
            return _positive_int(size["shortest_edge"], "size.shortest_edge"), None, None
        if keys == {"height", "width"}:
            return None, _positive_int(size["height"], "size.height"), _positive_int(size["width"], "size.width")
    raise ConfigError(
        f"Image processor size = {size!r} is not supported; expected {{'shortest_edge': N}}, "
        "{'height': H, 'width': W}, [H, W] or an int."
    )


def _parse_crop(crop: Any) -> tuple[int | None, int | None]:
    """`crop_size` → (height, width); an int means a square (transformers' get_size_dict default)."""
    if crop is None:
        return None, None
    if isinstance(crop, int) and not isinstance(crop, bool):
        side = _positive_int(crop, "crop_size")
        return side, side
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return _positive_int(crop[0], "crop_size[0]"), _positive_int(crop[1], "crop_size[1]")
    if isinstance(crop, dict) and {k for k, v in crop.items() if v is not None} == {"height", "width"}:
        return _positive_int(crop["height"], "crop_size.height"), _positive_int(crop["width"], "crop_size.width")
    raise ConfigError(
        f"Image processor crop_size = {crop!r} is not supported; "
        "expected {'height': H, 'width': W}, [H, W] or an int."
    )


def _parse_stats(value: Any, name: str) -> tuple[float, float, float]:
    """Per-channel mean/std; a scalar is repeated per channel as transformers' normalize does."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    raise ConfigError(f"{name} = {value!r} is not supported; expected 3 numbers (one per RGB channel).")


def _processor_type(d: dict) -> str:
    """The processor class name without transformers' backend suffixes ("Pil", "Fast")."""
    name = d.get("image_processor_type")
    if not name and d.get("feature_extractor_type"):  # pre-2022 files, e.g. "CLIPFeatureExtractor"
        name = str(d["feature_extractor_type"]).replace("FeatureExtractor", "ImageProcessor")
    name = str(name or "CLIPImageProcessor")
    for suffix in ("Pil", "Fast"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class ImageProcessorConfig:
    """How one image becomes pixel values; the defaults are transformers' CLIPImageProcessor's.

    Steps, in order: RGB → pad to square → resize → center crop → rescale → normalize.
    Build it from a Hugging Face processor file with `from_hf`.
    """

    do_resize: bool = True
    size_shortest_edge: int | None = 224  # resize the short side to this; long side int()-truncated
    size_height: int | None = None  # ...or resize to exactly height × width (aspect ratio not kept)
    size_width: int | None = None
    resample: int = 3  # PIL filter id, see PIL_FILTERS; 3 = bicubic
    do_center_crop: bool = True
    crop_height: int | None = 224  # zero-padded when the image is smaller
    crop_width: int | None = 224
    do_rescale: bool = True
    rescale_factor: float = 1 / 255  # applied in float64, then cast to float32
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True  # composite transparency onto white (transformers' convert_to_rgb)
    do_pad: bool = False  # LlavaImageProcessor's pad-to-square with the mean colour, before resize
    image_processor_type: str = "CLIPImageProcessor"

    def __post_init__(self) -> None:
        if self.do_resize:
            by_edge = self.size_shortest_edge is not None
            by_box = self.size_height is not None or self.size_width is not None
            if by_edge == by_box:
                raise ConfigError(
                    "Resize needs either size_shortest_edge or both size_height and size_width, not "
                    f"{self.size_shortest_edge=}, {self.size_height=}, {self.size_width=}."
                )
            for name in ("size_shortest_edge",) if by_edge else ("size_height", "size_width"):
                _positive_int(getattr(self, name), name)
        if self.do_center_crop:
            _positive_int(self.crop_height, "crop_height")
            _positive_int(self.crop_width, "crop_width")
        if self.resample not in PIL_FILTERS:
            raise ConfigError(f"resample = {self.resample!r} is not a PIL filter id; expected one of {PIL_FILTERS}.")
        _parse_stats(self.image_mean, "image_mean")
        if 0.0 in _parse_stats(self.image_std, "image_std"):
            raise ConfigError(f"image_std = {self.image_std!r} has a zero; normalization would divide by zero.")

    @classmethod
    def from_hf(cls, d: dict) -> ImageProcessorConfig:
        """Read an image processor dict (`preprocessor_config.json`, or the "image_processor"
        section of a transformers-5 `processor_config.json`).

        Missing or null keys take the class defaults of the named processor (CLIPImageProcessor's
        for unknown names). `do_pad` is read only for LlavaImageProcessor, the one class where it
        means pad-to-square; elsewhere (LLaVA-NeXT, CLIP) it pads a batch and is not ours.
        Raises ConfigError on values that cannot be honoured exactly.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"An image processor config must be a JSON object, got {type(d).__name__}.")
        kind = _processor_type(d)
        defaults = _CLASS_DEFAULTS.get(kind, _CLIP_DEFAULTS)

        def get(key: str) -> Any:
            value = d.get(key)
            return defaults[key] if value is None else value  # transformers treats null as "use default"

        shortest, height, width = _parse_size(get("size"))
        crop_height, crop_width = _parse_crop(get("crop_size"))
        rescale_factor = get("rescale_factor")
        if isinstance(rescale_factor, bool) or not isinstance(rescale_factor, (int, float)):
            raise ConfigError(f"rescale_factor = {rescale_factor!r} is not a number.")
        return cls(
            do_resize=bool(get("do_resize")),
            size_shortest_edge=shortest,
            size_height=height,
            size_width=width,
            resample=get("resample"),
            do_center_crop=bool(get("do_center_crop")),
            crop_height=crop_height,
            crop_width=crop_width,
            do_rescale=bool(get("do_rescale")),
            rescale_factor=float(rescale_factor),
            do_normalize=bool(get("do_normalize")),
            image_mean=_parse_stats(get("image_mean"), "image_mean"),
            image_std=_parse_stats(get("image_std"), "image_std"),
            do_convert_rgb=bool(get("do_convert_rgb")),
            do_pad=kind == "LlavaImageProcessor" and bool(get("do_pad")),
            image_processor_type=kind,
        )


_read_json = read_json_object  # the one reader of checkpoint JSON files


def read_image_processor_dict(folder: Path) -> dict:
    """The image processor dict of a Hugging Face folder.

    Same priority as transformers 5 (`ImageProcessingMixin.get_image_processor_dict`): the
    "image_processor" section of `processor_config.json` when there is one, otherwise
    `preprocessor_config.json`. Raises ConfigError naming both files when neither has it.
    """
    folder = Path(folder)
    pre, proc = folder / "preprocessor_config.json", folder / "processor_config.json"
    if proc.is_file():
        nested = _read_json(proc).get("image_processor")
        if isinstance(nested, dict):
            return nested
    if pre.is_file():
        return _read_json(pre)
    raise ConfigError(
        f"No image processor config in {folder}: expected preprocessor_config.json, or processor_config.json "
        "with an 'image_processor' section. Use a complete Hugging Face checkpoint folder."
    )


# ───────────────────────────── preprocessing ─────────────────────────────


def _resize_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """Output (height, width): transformers' get_resize_output_image_size(default_to_square=False)."""
    if cfg.size_shortest_edge is None:
        return cfg.size_height, cfg.size_width  # type: ignore[return-value]
    size = cfg.size_shortest_edge
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # truncates, as transformers does (not round)
    return (new_long, size) if width <= height else (size, new_long)


def _pad_to_square(hwc: np.ndarray, mean: Sequence[float]) -> np.ndarray:
    """LlavaImageProcessor.pad_to_square: centre on a max(H, W) square of the mean colour."""
    height, width = hwc.shape[:2]
    if height == width:
        return hwc
    side = max(height, width)
    fill = np.array([int(m * 255) for m in mean], dtype=hwc.dtype)  # int() truncates: CLIP mean → (122, 116, 104)
    out = np.empty((side, side, 3), dtype=hwc.dtype)
    out[...] = fill
    start = (side - min(height, width)) // 2
    if width > height:
        out[start : start + height, :, :] = hwc
    else:
        out[:, start : start + width, :] = hwc
    return out


def _center_crop(hwc: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' center_crop: offset (H-c)//2; zero-pad first (extra pixel before) if too small."""
    height, width = hwc.shape[:2]
    if height < crop_h or width < crop_w:
        padded = np.zeros((max(height, crop_h), max(width, crop_w), 3), dtype=hwc.dtype)
        top, left = -(-(padded.shape[0] - height) // 2), -(-(padded.shape[1] - width) // 2)  # ceil
        padded[top : top + height, left : left + width] = hwc
        hwc, height, width = padded, padded.shape[0], padded.shape[1]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return hwc[top : top + crop_h, left : left + crop_w]


def _rgb_array(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """H×W×3 uint8 pixels of `image`, converted by the do_convert_rgb rule."""
    if not isinstance(image, Image.Image):
        raise ImageError(f"preprocess expects a PIL image, got {type(image).__name__}; call load_image first.")
    if cfg.do_convert_rgb:
        return np.asarray(to_rgb(image))
    if image.mode != "RGB":
        raise ImageError(
            f"do_convert_rgb is off but the image is mode {image.mode!r}; convert it to RGB first "
            "(load_image does) or enable do_convert_rgb."
        )
    return np.asarray(image)


def preprocess(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One PIL image → float32 (3, H, W) pixel values, equal to transformers' PIL backend.

    H, W are the crop size when `do_center_crop`, else the resize output size. Resizing runs
    on uint8 pixels with `PIL.Image.resize(..., reducing_gap=None)`, as transformers does.
    Raises ImageError if the image cannot be decoded.
    """
    return _pipeline(_rgb_array(image, cfg), cfg)


def _pipeline(hwc: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """(H, W, 3) uint8 RGB → float32 (3, H', W'): pad, resize, crop, rescale, normalize as configured."""
    if cfg.do_pad:
        hwc = _pad_to_square(hwc, cfg.image_mean)
    if cfg.do_resize:
        height, width = _resize_size(hwc.shape[0], hwc.shape[1], cfg)
        hwc = np.asarray(Image.fromarray(hwc).resize((width, height), cfg.resample, reducing_gap=None))
    if cfg.do_center_crop:
        hwc = _center_crop(hwc, cfg.crop_height, cfg.crop_width)  # type: ignore[arg-type]
    chw = hwc.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    if cfg.do_rescale:
        # float64 multiply then one cast, as transformers' rescale; a float32 multiply differs in the last bit
        chw = (chw.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        chw = chw.astype(np.float32)
    if cfg.do_normalize:
        mean = np.array(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.array(cfg.image_std, dtype=np.float32)[:, None, None]
        chw = (chw - mean) / std
    return np.ascontiguousarray(chw, dtype=np.float32)


def output_size(cfg: ImageProcessorConfig) -> tuple[int, int] | None:
    """(H, W) of every `preprocess` output under `cfg`, or None when it depends on the image."""
    if cfg.do_center_crop:
        return cfg.crop_height, cfg.crop_width  # type: ignore[return-value]
    if cfg.do_resize and cfg.size_shortest_edge is None:
        return cfg.size_height, cfg.size_width  # type: ignore[return-value]
    return None


def preprocess_batch(images: Sequence[Image.Image], cfg: ImageProcessorConfig) -> np.ndarray:
    """Images → float32 (N, 3, H, W). Raises ImageError when the outputs differ in size
    (no center crop and a shortest-edge or no resize) or when no size is known for N = 0."""
    arrays = [preprocess(image, cfg) for image in images]
    if not arrays:
        fixed = output_size(cfg)
        if fixed is None:
            raise ImageError("preprocess_batch got no images and the config gives no fixed output size.")
        return np.empty((0, 3, *fixed), dtype=np.float32)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ImageError(
            f"Cannot stack images of different processed sizes {sorted(shapes)}; enable center crop or a "
            "height/width resize, or preprocess them one at a time."
        )
    return np.stack(arrays)  # (N, 3, H, W)


def _resize_hwc(hwc: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize uint8 (H, W, 3) pixels to (h, w) with PIL, as transformers' PIL backend does."""
    h, w = size
    return np.asarray(Image.fromarray(hwc).resize((w, h), resample, reducing_gap=None))


def anyres_tiles(image: Image.Image, cfg: ImageProcessorConfig, pinpoints: tuple[tuple[int, int], ...],
                 tile: int) -> np.ndarray:
    """LLaVA-NeXT tiles of one image: float32 (1 + rows*cols, 3, tile, tile), base view first.

    Equal to transformers' LlavaNextImageProcessor (PIL backend): resize inside the best pinpoint
    keeping the aspect ratio, pad centred with black, cut row-major tiles; the base view is the
    whole image squashed to the processor's size. Every tile then runs the usual pipeline.
    """
    hwc = _rgb_array(image, cfg)  # (H, W, 3) uint8
    size = hwc.shape[:2]
    best = anyres.select_best_resolution(size, pinpoints)
    inner = anyres.resize_within(size, best)
    top, bottom, left, right = anyres.centre_padding(inner, best)
    canvas = np.pad(_resize_hwc(hwc, inner, cfg.resample), ((top, bottom), (left, right), (0, 0)))  # (bh, bw, 3)
    views = [_base_view_hwc(hwc, cfg)]
    views += [canvas[i : i + tile, j : j + tile] for i in range(0, best[0], tile) for j in range(0, best[1], tile)]
    return np.stack([_pipeline(np.ascontiguousarray(v), cfg) for v in views])


def _base_view_hwc(hwc: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    side = cfg.size_shortest_edge or cfg.size_height
    base_size = (cfg.size_height, cfg.size_width) if cfg.size_shortest_edge is None else (side, side)
    return _resize_hwc(hwc, base_size, cfg.resample)


def base_view(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """The any-res base view alone (the whole image squashed to the tile): float32 (3, S, S), equal to
    the first tile `anyres_tiles` makes. LLaVA-NeXT's one-tile encoding (`detail: low`)."""
    return _pipeline(np.ascontiguousarray(_base_view_hwc(_rgb_array(image, cfg), cfg)), cfg)


def square_tile(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image as a single tile (OneVision's multi-image mode): padded to a square with the mean
    colour, then the usual pipeline (resize to the tower's size). float32 (3, S, S)."""
    return _pipeline(_pad_to_square(_rgb_array(image, cfg), cfg.image_mean), cfg)
