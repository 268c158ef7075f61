"""The one http(s) fetcher of llavakit, with its SSRF guard: every hop resolved and checked by us,
then connected to by address. The server's media URLs and `load_image(url)` both go through it.

    url ─► scheme http(s)? no credentials? host on the allow-list?
        ─► host an IP literal, in any spelling the C resolver reads (0177.0.0.1, 2130706433, 127.1)?
               yes ─► that address        no ─► resolve the name (every answer counts)
        ─► every address public? (not private, loopback, link-local, reserved, multicast, nor an IPv6
           form embedding such an IPv4: mapped, NAT64, 6to4, Teredo, IPv4-compatible)
        ─► connect to that checked address (never re-resolved: no DNS rebinding between check and use)
        ─► 3xx: the Location is a new hop, checked the same way, up to max_redirects
        ─► 2xx: read within the byte cap and the deadline

Errors (llavakit.errors): a malformed URL is InvalidMediaURL, a refused one MediaURLNotAllowed
(both the caller's mistake), an allowed one that could not be fetched MediaFetchFailed. The
deadline covers the whole fetch: DNS, connect, TLS, headers and body of every hop, a server that
trickles bytes included. `allow_private` (the server's --allow-private-media) admits private and
loopback addresses, for tests and trusted networks; link-local (cloud metadata), multicast and
reserved addresses stay refused even then.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from typing import Callable
from urllib.parse import urljoin, urlsplit

from .errors import InvalidMediaURL, MediaError, MediaFetchFailed, MediaURLNotAllowed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], list[str]]  # (host, port) -> addresses, as getaddrinfo answers them
Connect = Callable[[tuple[str, int], float], socket.socket]  # ((address, port), timeout) -> a connected socket

_REDIRECTS = (301, 302, 303, 307, 308)
_resolver_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="llavakit-dns")

# Refused even with allow_private: nothing legitimate serves media there.
_NEVER = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",  # "this network": connecting to 0.0.0.0 reaches the local host on Linux
    "169.254.0.0/16",  # link-local, where clouds serve instance metadata (169.254.169.254)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, the broadcast address 255.255.255.255 included
    "::/96",  # :: and the deprecated IPv4-compatible ::a.b.c.d (::1 is decided before this list)
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): the network chooses where the IPv4 address sits
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local, deprecated, still routed inside some networks
    "ff00::/8",  # multicast
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are the IPv4 address
_IPV6_LOOPBACK = ipaddress.IPv6Address("::1")
# What inet_aton (and so the C resolver) reads as an IPv4 address: up to four dot-separated parts,
# each decimal, octal (leading 0) or hex (0x); "127.1" and "2130706433" are 127.0.0.1 too.
_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+))*", re.ASCII)


def is_blocked_address(ip: IPAddress, allow_private: bool = False) -> bool:
    """True for addresses a fetch must not be steered to.

    By default anything not globally routable is blocked: private, loopback, link-local (cloud
    metadata at 169.254.169.254), carrier-grade NAT, multicast, reserved and unspecified ranges, and
    IPv6 forms that embed such an IPv4 address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4, Teredo) or
    that are deprecated (IPv4-compatible ::a.b.c.d, site-local fec0::/10, local-use NAT64
    64:ff9b:1::/48). With allow_private, private, loopback and other non-global unicast addresses
    pass; link-local, multicast, reserved, unspecified and the deprecated forms stay blocked.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(int(ip))  # "fe80::1%eth0": the zone does not change what the address is
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            if is_blocked_address(embedded, allow_private):
                return True
            if ip.ipv4_mapped is not None or ip in _NAT64:
                return False  # these reach exactly the IPv4 address, which passed
        elif ip == _IPV6_LOOPBACK:
            return not allow_private
    if any(ip in net for net in _NEVER):
        return True
    return not (allow_private or ip.is_global)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that traffic to `ip` ends up at, for the IPv6 forms that embed one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # (server, client): the client is the host being reached
    return None


def ip_literal(host: str) -> IPAddress | None:
    """The address an IP-literal URL host stands for, or None when `host` is a name to resolve.

    Besides the dotted quad this reads every IPv4 spelling the C resolver accepts (octal
    `0177.0.0.1`, decimal `2130706433`, hex `0x7f.0.0.1`, short `127.1`), so that such a host is
    checked as the address it is and never handed to a resolver. Raises ValueError for a host that
    looks numeric (or IPv6) but is no address.
    """
    if ":" in host:
        return ipaddress.ip_address(host)
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise ValueError(f"{host!r} looks like a numeric IPv4 address but is not one") from None
    return None


def _host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    return not domains or any(host == d or host.endswith("." + d) for d in domains)


class RemoteFetcher:
    """Downloads http(s) media under a policy. Thread-safe and blocking: call it off any event loop."""

    def __init__(self, timeout_s: float, max_bytes: int, max_redirects: int = 3, domains: tuple[str, ...] = (),
                 allow_private: bool = False, resolve: Resolve | None = None, connect: Connect | None = None):
        """timeout_s: the whole fetch, redirects included; max_bytes: the body cap; domains: allow-list
        (a domain admits its subdomains; empty admits any host); allow_private: admit private and
        loopback addresses (tests, trusted networks). resolve, connect: the resolver and the TCP
        connect (tests replace them to run without a network; the defaults are getaddrinfo and
        socket.create_connection)."""
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.domains = tuple(d.lower() for d in domains)
        self.allow_private = allow_private
        self.resolve = resolve or _getaddrinfo
        self.connect = connect or socket.create_connection

    def fetch(self, url: str, what: str = "media") -> bytes:
        """The body of `url` after at most max_redirects checked redirects; `what` names it in messages.

        Raises InvalidMediaURL, MediaURLNotAllowed or MediaFetchFailed.
        """
        deadline = time.monotonic() + self.timeout_s
        for _ in range(self.max_redirects + 1):
            status, location, body = self._hop(url, deadline, what)
            if status not in _REDIRECTS:
                return body
            if location is None:
                raise MediaFetchFailed(f"{what} URL {_short(url)} answered {status} without a Location header.")
            url = urljoin(url, location)
        raise MediaFetchFailed(f"{what} URL redirected more than {self.max_redirects} times; give the final URL.")

    # -- one hop ----------------------------------------------------------------------------------
    def _check(self, url: str, what: str) -> tuple[str, str, int, str, IPAddress | None]:
        """(scheme, host, port, path, address if the host is an IP literal) of an allowed URL."""
        try:
            parts = urlsplit(url)
        except ValueError as e:  # an unbalanced or invalid [IPv6] host
            raise InvalidMediaURL(f"{what} URL {_short(url)} is malformed: {e}.") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaURLNotAllowed(f"{what} URL {_short(url)} has scheme {scheme!r}; only http and https are "
                                     "fetched.")
        if parts.username or parts.password:
            raise MediaURLNotAllowed(f"{what} URL {_short(url)} carries credentials; they are not allowed.")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise InvalidMediaURL(f"{what} URL {_short(url)} has no host.")
        if not host.isascii():
            try:  # the resolver would apply IDNA itself; do it first so "１２７.０.０.１" is seen as 127.0.0.1
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise InvalidMediaURL(f"{what} URL {_short(url)} has an invalid host name.") from None
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise InvalidMediaURL(f"{what} URL {_short(url)} has an invalid port.") from None
        if not _host_allowed(host, self.domains):
            raise MediaURLNotAllowed(f"{what} host {host!r} is not on this server's --remote-media-domains list.")
        try:
            literal = ip_literal(host)
        except ValueError as e:
            raise InvalidMediaURL(f"{what} URL {_short(url)} has an invalid host: {e}.") from None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return scheme, host, port, path, literal

    def _addresses(self, host: str, port: int, deadline: float, what: str) -> list[str]:
        # getaddrinfo cannot be interrupted; waiting on it in a pool bounds our wait, not its own.
        future = _resolver_pool.submit(self.resolve, host, port)
        try:
            return future.result(timeout=max(0.01, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise MediaFetchFailed(f"resolving the {what} host {host!r} timed out.") from None
        except OSError as e:
            raise MediaFetchFailed(f"cannot resolve the {what} host {host!r}: {e}.") from None

    def _hop(self, url: str, deadline: float, what: str) -> tuple[int, str | None, bytes]:
        scheme, host, port, path, literal = self._check(url, what)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = [ipaddress.ip_address(a) for a in self._addresses(host, port, deadline, what)]
            except ValueError as e:
                raise MediaFetchFailed(f"the resolver answered a non-address for {host!r}: {e}.") from None
        if not addresses:
            raise MediaFetchFailed(f"the {what} host {host!r} has no address.")
        for address in addresses:  # all must pass: an attacker controls which one a client would pick
            if is_blocked_address(address, self.allow_private):
                kinds = ("a link-local, multicast or reserved" if self.allow_private
                         else "a private, loopback or otherwise internal")
                raise MediaURLNotAllowed(f"{what} URL {_short(url)} points to {kinds} address ({address}); only "
                                         f"public{' and private' if self.allow_private else ''} addresses are "
                                         "fetched.")
        return self._get(url, scheme, host, port, path, str(addresses[0]), deadline, what)

    def _get(self, url: str, scheme: str, host: str, port: int, path: str, address: str, deadline: float,
             what: str) -> tuple[int, str | None, bytes]:
        """GET `path` from the checked `address`; (status, Location of a redirect, body)."""
        watchdog = _Watchdog(deadline)
        conn = sock = None
        try:
            # One address, so connect is one bounded call; the watchdog takes over from there.
            sock = self.connect((address, port), _left(deadline))
            watchdog.watch(sock)
            if scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host,
                                                                do_handshake_on_connect=False)
                watchdog.watch(sock)  # the TCP socket object is detached now; the TLS one owns the descriptor
                sock.do_handshake()
            conn = http.client.HTTPConnection(host, port)
            conn.sock = sock  # already connected to the checked address; http.client will not resolve again
            conn.request("GET", path, headers={"User-Agent": "llavakit", "Accept": "*/*",
                                               "Accept-Encoding": "identity"})
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                return response.status, response.getheader("Location"), b""
            if not 200 <= response.status < 300:
                raise MediaFetchFailed(f"{what} URL {_short(url)} answered HTTP {response.status} "
                                       f"{response.reason}.")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise MediaFetchFailed(f"{what} at {_short(url)} is {int(length)} bytes, more than the limit of "
                                       f"{self.max_bytes}.")
            chunks, size = [], 0
            while chunk := response.read1(1 << 16):
                size += len(chunk)
                if size > self.max_bytes:
                    raise MediaFetchFailed(f"{what} at {_short(url)} is larger than the limit of {self.max_bytes} "
                                           "bytes.")
                chunks.append(chunk)
            if watchdog.fired:  # a body without Content-Length ends at EOF, which the watchdog's shutdown fakes
                raise TimeoutError
            return response.status, None, b"".join(chunks)
        except MediaError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:  # socket.timeout and SSLError are OSErrors
            if watchdog.fired or isinstance(e, TimeoutError):
                raise MediaFetchFailed(f"fetching {what} URL {_short(url)} took longer than {self.timeout_s:g} s."
                                       ) from None
            raise MediaFetchFailed(f"cannot fetch {what} URL {_short(url)}: {type(e).__name__}: {e}.") from None
        finally:
            watchdog.stop()  # before closing: the timer must never shut down a descriptor that was reused
            if conn is not None:
                conn.close()
            elif sock is not None:
                sock.close()


class _Watchdog:
    """Shuts a socket down at a deadline, waking whatever call is blocked on it.

    A socket timeout bounds each recv, not their sum: a server trickling its headers one byte a
    second would hold http.client for as long as it likes. Shutting the socket down at the deadline
    bounds everything after connect (TLS handshake, request, headers, body) in one place.
    """

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.fired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None

    def watch(self, sock: socket.socket) -> None:
        """Guard `sock` (replacing the socket guarded so far); the timer starts on the first call."""
        with self._lock:
            self._sock = sock
        if self._timer is None:
            self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def stop(self) -> None:
        """Disarm; after this returns the timer touches no socket."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._sock = None

    def _fire(self) -> None:
        with self._lock:
            if self._sock is None:
                return
            self.fired = True
            try:
                # The base-class call: SSLSocket.shutdown would also drop its TLS state under the reader's feet.
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer


def _left(deadline: float) -> float:
    """Seconds until `deadline`; TimeoutError when it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _short(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")
