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
    max_messages: int = 2048  # messages per request, counted before the request is validated
    # Characters of text (all messages) checked before tokenizing; None = 8 per token of the model's
    # context, more than any real prompt that fits the context needs.
    max_text_chars: int | None = None
    max_images_per_request: int = 8
    max_videos_per_request: int = 1
    max_image_pixels: int = 16_000_000  # width * height from the header, checked before decoding
    max_image_aspect_ratio: float = 50.0  # longer side / shorter side, from the header (a 1x16M strip is no picture)
    max_video_frames: int = 32  # frames sampled from one video (num_frames or fps * duration)
    max_video_pixels: int = 32 * 1920 * 1080  # sampled frames x frame pixels, from the header: what decoding keeps
    max_video_seconds: float = 600.0  # clips are decoded up to the last sampled frame: bound the length
    max_n: int = 8  # choices per request
    max_stop: int = 8  # stop strings per request
    default_max_tokens: int = 1024  # when the request gives none (still capped by the context length)
    # -- load ----------------------------------------------------------------------------------
    max_concurrent_requests: int = 64  # choices admitted at once (running + waiting); 429 beyond
    retry_after_s: int = 1  # Retry-After on 429 and 503
    media_workers: int = 2  # threads that decode media and tokenize (the event loop never does)
    shutdown_timeout_s: float = 30.0  # on SIGTERM: in-flight requests get this long, then are cancelled
    # -- connections ---------------------------------------------------------------------------
    max_connections: int = 1024  # open connections; more are answered 503 and closed
    header_timeout_s: float = 10.0  # a connection must deliver a request's headers within this (slowloris)
    body_timeout_s: float = 60.0  # and its body within this (408 beyond)
    keep_alive_timeout_s: float = 5.0  # an idle kept-alive connection is closed after this
    # -- who may call --------------------------------------------------------------------------
    api_key: str | None = None  # /v1/* needs "Authorization: Bearer <key>" (401 otherwise)
    # Host headers accepted besides the loopback names when bound to loopback (DNS rebinding);
    # when given, they are enforced whatever the address the server listens on.
    allowed_hosts: tuple[str, ...] = ()
    # -- media sources -------------------------------------------------------------------------
    allow_remote_media: bool = False  # http(s) URLs in image_url / video_url
    remote_media_domains: tuple[str, ...] = ()  # allow-list (a domain admits its subdomains); empty = any public host
    remote_media_timeout_s: float = 10.0  # whole download, redirects included
    remote_media_max_bytes: int = 32 * MIB
    remote_media_max_redirects: int = 3
    allow_private_media: bool = False  # also fetch from private/loopback addresses: tests and trusted networks only
    allowed_local_media_path: Path | None = None  # file:// URLs only below this folder; None refuses them

    def __post_init__(self):
        positive = ("max_body_bytes", "max_images_per_request", "max_image_pixels", "max_video_frames",
                    "max_video_seconds", "max_n", "default_max_tokens", "max_concurrent_requests", "media_workers",
                    "remote_media_timeout_s", "remote_media_max_bytes", "max_messages", "max_connections",
                    "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "max_image_aspect_ratio",
                    "max_video_pixels")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"server option {name} must be a positive number, got {value!r}.")
        for name in ("max_videos_per_request", "max_stop", "retry_after_s", "shutdown_timeout_s",
                     "remote_media_max_redirects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"server option {name} must be >= 0, got {value!r}.")
        if self.max_text_chars is not None and (isinstance(self.max_text_chars, bool)
                                                or not isinstance(self.max_text_chars, int) or self.max_text_chars < 1):
            raise ConfigError(f"server option max_text_chars must be a positive integer, got {self.max_text_chars!r}.")
        if self.api_key is not None and (not self.api_key or not self.api_key.isprintable() or " " in self.api_key):
            raise ConfigError("--api-key must be a non-empty string of printable characters without spaces.")
        hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h.strip())
        object.__setattr__(self, "allowed_hosts", hosts)
        domains = tuple(d.strip().lower().lstrip(".") for d in self.remote_media_domains if d.strip())
        object.__setattr__(self, "remote_media_domains", domains)
        if self.allowed_local_media_path is not None:
            folder = Path(self.allowed_local_media_path).expanduser().resolve()
            if not folder.is_dir():
                raise ConfigError(f"--allowed-local-media-path {self.allowed_local_media_path} is not a folder.")
            object.__setattr__(self, "allowed_local_media_path", folder)
