"""Who may call, and from where: the checks every request passes before any route runs.

    Host header ─► a loopback name or --allowed-hosts? (DNS rebinding: a web page on evil.example
                   that resolves to 127.0.0.1 reaches a loopback server, but its requests still say
                   `Host: evil.example`)
    /v1/*       ─► `Authorization: Bearer <--api-key>` (constant-time compare), else 401
    POST        ─► `Content-Type: application/json`, else 415 (a web page may POST text/plain,
                   form-urlencoded or multipart bodies cross-origin without asking; JSON it may not)

/health and /metrics stay open to monitors; the web page and its files need no key (the page asks
for the key when the API answers 401).
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi.responses import JSONResponse

from .config import ServerConfig
from .errors import APIError

_LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost", "ip6-loopback")


class Unauthorized(APIError):
    """401: the server wants an API key and the request has none or a wrong one."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class InvalidHost(APIError):
    """400: the Host header names a host this server does not answer for."""

    code = "invalid_host"


class UnsupportedMediaType(APIError):
    """415: a request body that is not JSON."""

    status = 415
    code = "unsupported_media_type"


def is_loopback_host(host: str) -> bool:
    """True for names and addresses of this machine's loopback interface (what `--host` binds to)."""
    host = host.strip().strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a Host header, without port or IPv6 brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header[1:]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(header: str | None, allowed: tuple[str, ...], loopback: bool) -> bool:
    """Whether a request with this Host header may be answered.

    `allowed` entries are host names (a leading dot admits subdomains) or "*" (any host);
    `loopback` admits the loopback names and addresses too (the server listens on loopback).
    """
    if header is None:  # HTTP/1.0 without Host: not a browser, nothing to rebind
        return True
    host = host_name(header)
    if loopback and is_loopback_host(host):
        return True
    for entry in allowed:
        if entry == "*" or host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:])):
            return True
    return False


def bearer_token_matches(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries `Bearer <key>`, compared in constant time."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8"))


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """Pure ASGI middleware applying the host, key and content-type rules before any route."""

    def __init__(self, app, config: ServerConfig, loopback: bool):
        """loopback: the server listens on a loopback address, so the Host check is on."""
        self.app = app
        self.config = config
        self.check_host = loopback or bool(config.allowed_hosts)
        self.loopback = loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.refusal(scope)
            if err is not None:
                response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, scope) -> APIError | None:
        """The error to answer instead of running the route, or None to let the request in."""
        cfg = self.config
        if self.check_host and not host_allowed(_header(scope, b"host"), cfg.allowed_hosts, self.loopback):
            return InvalidHost("the Host header names a host this server does not answer for; use "
                               "http://127.0.0.1:<port> or start the server with --allowed-hosts NAME.")
        path = scope["path"]
        if cfg.api_key is not None and path.startswith("/v1/") and \
                not bearer_token_matches(_header(scope, b"authorization"), cfg.api_key):
            return Unauthorized("this server needs an API key: send the header 'Authorization: Bearer <key>' "
                                "(the key the server was started with, --api-key or LLAVAKIT_API_KEY).",
                                headers={"WWW-Authenticate": 'Bearer realm="llavakit"'})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            kind = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if kind != "application/json":
                return UnsupportedMediaType(
                    f"request bodies must be JSON sent with 'Content-Type: application/json', got "
                    f"{(kind or 'no content type')[:80]!r}.")
        return None
