"""Server limits and media options: one frozen dataclass, with defaults that protect a small machine.

Every limit here is enforced before the expensive work it guards: the body size before parsing,
image counts before decoding, image pixels from the file header before the pixels are decoded,
prompt length before the request reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

MIB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    """What one server accepts. `llavakit serve` maps each field to a `--flag-name`."""

    served_model_name: str = "llavakit"  # the id in /v1/models; requests may name it or the folder
    # -- request shape -------------------------------------------------------------------------
    max_body_bytes: int = 16 * MIB  # whole request body, base64 media included (413 beyond)
    max_images_per_request: int = 8
    max_videos_per_request: int = 1
    max_image_pixels: int = 16_000_000  # width * height from the header, checked before decoding
    max_video_frames: int = 32  # frames sampled from one video (num_frames or fps * duration)
    max_video_seconds: float = 600.0  # clips are decoded up to the last sampled frame: bound the length
    max_n: int = 8  # choices per request
    max_stop: int = 8  # stop strings per request
    default_max_tokens: int = 1024  # when the request gives none (still capped by the context length)
    # -- load ----------------------------------------------------------------------------------
    max_concurrent_requests: int = 64  # choices admitted at once (running + waiting); 429 beyond
    retry_after_s: int = 1  # Retry-After on 429 and 503
    media_workers: int = 2  # threads that decode media and tokenize (the event loop never does)
    shutdown_timeout_s: float = 30.0  # on SIGTERM: in-flight requests get this long, then are cancelled
    # -- media sources -------------------------------------------------------------------------
    allow_remote_media: bool = False  # http(s) URLs in image_url / video_url
    remote_media_domains: tuple[str, ...] = ()  # allow-list (a domain admits its subdomains); empty = any public host
    remote_media_timeout_s: float = 10.0  # whole download, redirects included
    remote_media_max_bytes: int = 32 * MIB
    remote_media_max_redirects: int = 3
    allowed_local_media_path: Path | None = None  # file:// URLs only below this folder; None refuses them

    def __post_init__(self):
        positive = ("max_body_bytes", "max_images_per_request", "max_image_pixels", "max_video_frames",
                    "max_video_seconds", "max_n", "default_max_tokens", "max_concurrent_requests", "media_workers",
                    "remote_media_timeout_s", "remote_media_max_bytes")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"server option {name} must be a positive number, got {value!r}.")
        for name in ("max_videos_per_request", "max_stop", "retry_after_s", "shutdown_timeout_s",
                     "remote_media_max_redirects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"server option {name} must be >= 0, got {value!r}.")
        domains = tuple(d.strip().lower().lstrip(".") for d in self.remote_media_domains if d.strip())
        object.__setattr__(self, "remote_media_domains", domains)
        if self.allowed_local_media_path is not None:
            folder = Path(self.allowed_local_media_path).expanduser().resolve()
            if not folder.is_dir():
                raise ConfigError(f"--allowed-local-media-path {self.allowed_local_media_path} is not a folder.")
            object.__setattr__(self, "allowed_local_media_path", folder)
