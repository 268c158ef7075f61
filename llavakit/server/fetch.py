"""Fetching remote media without SSRF: every hop resolved and checked by us, then connected to by address.

    url ─► scheme http(s)? no credentials? host on the allow-list?
        ─► resolve the host ─► every address public? (no private, loopback, link-local, reserved, ...)
        ─► connect to that checked address (never re-resolved: no DNS rebinding between check and use)
        ─► 3xx: the Location is a new hop, checked the same way, up to max_redirects
        ─► 2xx: read within the byte cap and the deadline

A refused URL is the client's mistake (BadRequest, 400); a URL that was allowed but could not be
fetched fails for good (MediaFetchError, 422). The deadline covers the whole fetch, redirects and
a server that trickles bytes included.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import socket
import ssl
import time
from typing import Callable
from urllib.parse import urljoin, urlsplit

from .errors import BadRequest, MediaFetchError

_REDIRECTS = (301, 302, 303, 307, 308)
_resolver_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="llavakit-dns")


def is_blocked_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for addresses a server must not be steered to: anything not globally routable.

    Covers private, loopback, link-local (cloud metadata at 169.254.169.254), carrier-grade NAT,
    multicast, reserved and unspecified ranges, and IPv6 forms that embed such an IPv4 address.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or (ip.sixtofour if ip.sixtofour else None) or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and is_blocked_address(embedded):
            return True
    return not ip.is_global or ip.is_multicast


def _host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    return not domains or any(host == d or host.endswith("." + d) for d in domains)


class RemoteFetcher:
    """Downloads http(s) media under a policy. Thread-safe; call it off the event loop."""

    def __init__(self, timeout_s: float, max_bytes: int, max_redirects: int = 3, domains: tuple[str, ...] = (),
                 blocked: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool] = is_blocked_address,
                 resolve: Callable[[str, int], list[str]] | None = None):
        """blocked, resolve: the address policy and the resolver (tests replace them; the defaults are the rule)."""
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.domains = tuple(d.lower() for d in domains)
        self.blocked = blocked
        self.resolve = resolve or _getaddrinfo

    def fetch(self, url: str, what: str = "media") -> bytes:
        """The body of `url` after at most max_redirects checked redirects."""
        deadline = time.monotonic() + self.timeout_s
        for hop in range(self.max_redirects + 1):
            status, location, body = self._hop(url, deadline, what)
            if status not in _REDIRECTS:
                return body
            if location is None:
                raise MediaFetchError(f"{what} URL {_short(url)} answered {status} without a Location header.")
            url = urljoin(url, location)
        raise MediaFetchError(f"{what} URL redirected more than {self.max_redirects} times; give the final URL.")

    # -- one hop ----------------------------------------------------------------------------------
    def _check(self, url: str, what: str) -> tuple[str, str, int, str, list[str] | None]:
        """(scheme, host, port, path, addresses if the host is an IP literal) of an allowed URL."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise BadRequest(f"{what} URL {_short(url)} has scheme {scheme!r}; only http and https are fetched.",
                             code="media_url_not_allowed")
        if parts.username or parts.password:
            raise BadRequest(f"{what} URL {_short(url)} carries credentials; they are not allowed.",
                             code="media_url_not_allowed")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise BadRequest(f"{what} URL {_short(url)} has no host.", code="invalid_media_url")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise BadRequest(f"{what} URL {_short(url)} has an invalid port.", code="invalid_media_url") from None
        if not _host_allowed(host, self.domains):
            raise BadRequest(f"{what} host {host!r} is not on this server's --remote-media-domains list.",
                             code="media_url_not_allowed")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        addresses = [str(literal)] if literal is not None else None
        return scheme, host, port, path, addresses

    def _addresses(self, host: str, port: int, deadline: float, what: str) -> list[str]:
        # getaddrinfo cannot be interrupted; waiting on it in a pool bounds our wait, not its own.
        future = _resolver_pool.submit(self.resolve, host, port)
        try:
            return future.result(timeout=max(0.01, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise MediaFetchError(f"resolving the {what} host {host!r} timed out.") from None
        except OSError as e:
            raise MediaFetchError(f"cannot resolve the {what} host {host!r}: {e}.") from None

    def _hop(self, url: str, deadline: float, what: str) -> tuple[int, str | None, bytes]:
        scheme, host, port, path, addresses = self._check(url, what)
        if addresses is None:
            addresses = self._addresses(host, port, deadline, what)
        if not addresses:
            raise MediaFetchError(f"the {what} host {host!r} has no address.")
        for address in addresses:  # all must pass: an attacker controls which one a client would pick
            if self.blocked(ipaddress.ip_address(address.split("%")[0])):
                raise BadRequest(f"{what} URL {_short(url)} points to a private, loopback or otherwise internal "
                                 f"address ({address}); only public addresses are fetched.",
                                 code="media_url_not_allowed")
        conn = sock = None
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock = socket.create_connection((addresses[0], port), timeout=remaining)
            if scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            conn = http.client.HTTPConnection(host, port, timeout=remaining)
            conn.sock = sock  # already connected to the checked address; http.client will not resolve again
            conn.request("GET", path, headers={"User-Agent": "llavakit", "Accept": "*/*",
                                               "Accept-Encoding": "identity"})
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                return response.status, response.getheader("Location"), b""
            if not 200 <= response.status < 300:
                raise MediaFetchError(f"{what} URL {_short(url)} answered HTTP {response.status} {response.reason}.")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise MediaFetchError(f"{what} at {_short(url)} is {int(length)} bytes, more than this server's "
                                      f"limit of {self.max_bytes}.")
            chunks, size = [], 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = response.read1(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise MediaFetchError(f"{what} at {_short(url)} is larger than this server's limit of "
                                          f"{self.max_bytes} bytes.")
                chunks.append(chunk)
            return response.status, None, b"".join(chunks)
        except (BadRequest, MediaFetchError):
            raise
        except (TimeoutError, socket.timeout):
            raise MediaFetchError(f"fetching {what} URL {_short(url)} took longer than {self.timeout_s:g} s.") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise MediaFetchError(f"cannot fetch {what} URL {_short(url)}: {type(e).__name__}: {e}.") from None
        finally:
            if conn is not None:
                conn.close()
            elif sock is not None:
                sock.close()


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _short(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")
