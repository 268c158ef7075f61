"""`image_url` / `video_url` parts → sources the processor accepts, under the server's limits.

    data:image/png;base64,...  ─► strict base64 decode ─────────────┐
    http(s)://...              ─► llavakit.fetch (--allow-remote-media) ─► bytes ─► header check ─► processor
    file:///...                ─► below --allowed-local-media-path ─┘    (images: pixels from the
                                                                          header, before decoding;
                                                                          videos: stream, frames, length)

A user string is never handed to the processor as such: `load_image` would read a path or fetch
a URL on its own, so the server turns every URL into bytes (or a checked path) first. All of
this is blocking work, run in the server's media threads, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from ..errors import InvalidMediaURL, MediaFetchFailed, MediaURLNotAllowed
from ..fetch import RemoteFetcher
from .config import ServerConfig
from .errors import BadRequest, MediaFetchError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),", re.ASCII)
_MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
_VIDEO_MIME_PREFIXES = ("video/", "image/gif", "application/octet-stream")


def decode_data_url(url: str, kind: str, param: str) -> bytes:
    """Bytes of a base64 data URL whose media type fits `kind` ("image" or "video")."""
    m = _DATA_URL.match(url[:256])
    if not m:
        raise BadRequest(f"{param}: malformed data URL; expected data:<type>;base64,<payload>.", param=param,
                         code="invalid_data_url")
    mime = (m.group("mime") or "").lower()
    allowed = ("image/",) if kind == "image" else _VIDEO_MIME_PREFIXES
    if not mime.startswith(allowed):
        raise BadRequest(f"{param}: the data URL's media type must be {kind}/*, got {mime or 'none'!r}.",
                         param=param, code="invalid_data_url")
    if ";base64" not in m.group("params").lower():
        raise BadRequest(f"{param}: only base64 data URLs are accepted (data:{mime};base64,...).", param=param,
                         code="invalid_data_url")
    payload = url[m.end():]
    # Line breaks and spaces are tolerated (some encoders wrap); every other non-alphabet byte is an error.
    payload = re.sub(r"[\s]+", "", payload)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{param}: the data URL payload is not valid base64 ({e}).", param=param,
                         code="invalid_base64") from None
    if not data:
        raise BadRequest(f"{param}: the data URL is empty.", param=param, code="invalid_data_url")
    return data


def check_image(data: bytes, cfg: ServerConfig, param: str) -> None:
    """Refuse bytes that are not an image, or whose header announces more pixels than allowed.

    `Image.open` reads only the header, so a decompression bomb (a small file that decodes to a
    huge bitmap) is refused before a single pixel is decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError:  # Pillow's own guard fires on absurd headers first
        raise BadRequest(f"{param}: the image has more pixels than this server accepts "
                         f"({cfg.max_image_pixels}).", param=param, code="image_too_large") from None
    except Image.UnidentifiedImageError:
        raise BadRequest(f"{param}: the bytes are not an image in any format this server reads (PNG, JPEG, WebP, "
                         "GIF, BMP, TIFF, ...).", param=param, code="invalid_image") from None
    except Exception as e:  # SyntaxError, struct.error, OSError...: a header Pillow recognised but cannot parse
        raise BadRequest(f"{param}: the image header is corrupt ({type(e).__name__}: {e}).", param=param,
                         code="invalid_image") from None
    if width * height > cfg.max_image_pixels:
        raise BadRequest(f"{param}: the image is {width}x{height} = {width * height} pixels, more than this "
                         f"server's limit of {cfg.max_image_pixels}; send a smaller image.", param=param,
                         code="image_too_large")
    _check_aspect(width, height, cfg, param, "the image", "image_too_large")


# Decoding a clip decodes every frame up to the last sampled one: the work of the longest clip
# allowed, at 30 frames per second of 1080p, bounds it.
_DECODE_PIXELS_PER_SECOND = 30 * 1920 * 1080


def _check_aspect(width: int, height: int, cfg: ServerConfig, param: str, what: str, code: str) -> None:
    """Refuse an empty or extremely elongated picture (a 1 x 16,000,000 strip passes a pixel cap)."""
    if min(width, height) < 1 or max(width, height) / min(width, height) > cfg.max_image_aspect_ratio:
        raise BadRequest(f"{param}: {what} is {width}x{height}, an aspect ratio beyond this server's limit of "
                         f"{cfg.max_image_aspect_ratio:g}:1 (--max-image-aspect-ratio); crop or pad it.",
                         param=param, code=code)


def check_video(source: bytes | Path, cfg: ServerConfig, param: str) -> None:
    """Refuse a video without a stream, with frames larger than an image may be, or longer than allowed."""
    try:
        import av
    except ImportError:
        raise BadRequest("this server cannot read video: PyAV is not installed (pip install 'llavakit[video]').",
                         param=param, code="video_unsupported") from None
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with av.open(handle) as container:
            if not container.streams.video:
                raise BadRequest(f"{param}: the file holds no video stream.", param=param, code="invalid_video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            seconds = None
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / 1_000_000
            total = stream.frames or None  # what the container announces; else estimated from the rate
            if total is None and seconds is not None and stream.average_rate:
                total = int(seconds * float(stream.average_rate)) + 1
    except BadRequest:
        raise
    except Exception as e:  # av.error.FFmpegError and friends: not a video FFmpeg reads
        raise BadRequest(f"{param}: the bytes are not a video FFmpeg can read ({type(e).__name__}: {e}).",
                         param=param, code="invalid_video") from None
    if width * height > cfg.max_image_pixels:
        raise BadRequest(f"{param}: video frames are {width}x{height}, more pixels than this server accepts "
                         f"({cfg.max_image_pixels}).", param=param, code="video_too_large")
    _check_aspect(width, height, cfg, param, "a video frame", "video_too_large")
    if seconds is not None and seconds > cfg.max_video_seconds:
        raise BadRequest(f"{param}: the video lasts {seconds:.0f} s, longer than this server's limit of "
                         f"{cfg.max_video_seconds:g} s.", param=param, code="video_too_long")
    # Checked from the header, before a frame is decoded: what the sampled frames will hold, and
    # how much decoding reaching them takes.
    sampled = min(cfg.max_video_frames, total or cfg.max_video_frames)
    if sampled * width * height > cfg.max_video_pixels:
        raise BadRequest(f"{param}: {sampled} frames of {width}x{height} would be {sampled * width * height} pixels, "
                         f"more than this server's limit of {cfg.max_video_pixels} (--max-video-pixels); send a "
                         "smaller video or ask for fewer frames.", param=param, code="video_too_large")
    if total is not None and total * width * height > cfg.max_video_seconds * _DECODE_PIXELS_PER_SECOND:
        raise BadRequest(f"{param}: the video holds {total} frames of {width}x{height}, more to decode than this "
                         f"server does for one request (the work of {cfg.max_video_seconds:g} s of 1080p at 30 "
                         "frames per second); send a shorter or smaller video.", param=param,
                         code="video_too_large")


class MediaResolver:
    """Turns the URLs of one server's requests into checked media sources."""

    def __init__(self, cfg: ServerConfig, fetcher: RemoteFetcher | None = None):
        self.cfg = cfg
        self.fetcher = fetcher or RemoteFetcher(cfg.remote_media_timeout_s, cfg.remote_media_max_bytes,
                                                cfg.remote_media_max_redirects, cfg.remote_media_domains,
                                                allow_private=cfg.allow_private_media)

    def image(self, url: str, param: str) -> bytes:
        """Encoded image bytes, checked; raises BadRequest (400) or MediaFetchError (422)."""
        data = self._bytes(url, "image", param)
        check_image(data, self.cfg, param)
        return data

    def video(self, url: str, param: str) -> bytes | Path:
        """Video bytes or a checked local path, probed; raises BadRequest (400) or MediaFetchError (422)."""
        if url.startswith("file:"):
            path = self._local(url, param)
            check_video(path, self.cfg, param)
            return path
        data = self._bytes(url, "video", param)
        check_video(data, self.cfg, param)
        return data

    def _bytes(self, url: str, kind: str, param: str) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
        if scheme == "data":
            return decode_data_url(url, kind, param)
        if scheme in ("http", "https"):
            if not self.cfg.allow_remote_media:
                raise BadRequest(f"{param}: remote {kind} URLs are disabled on this server (start it with "
                                 "--allow-remote-media), send the file as a data: URL instead.", param=param,
                                 code="remote_media_disabled")
            try:
                return self.fetcher.fetch(url, kind)
            except InvalidMediaURL as e:
                raise BadRequest(str(e), param=param, code="invalid_media_url") from None
            except MediaURLNotAllowed as e:
                raise BadRequest(str(e), param=param, code="media_url_not_allowed") from None
            except MediaFetchFailed as e:
                raise MediaFetchError(str(e), param=param) from None
        if scheme == "file":
            path = self._local(url, param)
            try:
                with open(path, "rb") as f:
                    data = f.read(self.cfg.remote_media_max_bytes + 1)
            except OSError as e:
                raise MediaFetchError(f"{param}: cannot read the local file: {e.strerror}.", param=param) from None
            if len(data) > self.cfg.remote_media_max_bytes:
                raise BadRequest(f"{param}: the file is larger than {self.cfg.remote_media_max_bytes} bytes.",
                                 param=param, code="media_too_large")
            return data
        raise BadRequest(f"{param}: unsupported URL {url[:40]!r}; send a data:{kind}/...;base64,... URL"
                         + (", an http(s) URL" if self.cfg.allow_remote_media else "")
                         + (", or a file:// URL" if self.cfg.allowed_local_media_path else "") + ".",
                         param=param, code="invalid_media_url")

    def _local(self, url: str, param: str) -> Path:
        """A file:// URL as a real path inside the allowed folder (symlinks and `..` resolved first)."""
        root = self.cfg.allowed_local_media_path
        if root is None:
            raise BadRequest(f"{param}: local files are disabled on this server (start it with "
                             "--allowed-local-media-path DIR).", param=param, code="local_media_disabled")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise BadRequest(f"{param}: file URLs must not name a host.", param=param, code="invalid_media_url")
        raw = unquote(parts.path)
        shown = repr(raw if len(raw) <= 80 else raw[:77] + "...")
        if "\x00" in raw or len(raw) > _MAX_PATH_CHARS:
            raise BadRequest(f"{param}: the file URL {shown} is not a usable path (a NUL byte, or longer than "
                             f"{_MAX_PATH_CHARS} characters).", param=param, code="invalid_media_url")
        try:
            path = Path(os.path.realpath(raw))
            inside = path.is_relative_to(root)
            found = inside and path.is_file()
        except (OSError, ValueError):  # a name too long for the file system, and the like
            raise BadRequest(f"{param}: the file URL {shown} is not a usable path.", param=param,
                             code="invalid_media_url") from None
        if not inside:
            raise BadRequest(f"{param}: {shown} is outside the folder this server may read.",
                             param=param, code="media_url_not_allowed")
        if not found:
            raise MediaFetchError(f"{param}: no file at {shown}.", param=param)
        return path

