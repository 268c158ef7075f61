"""Remote media fetching: address policy on every hop, IP spellings, redirects, byte cap, deadline;
how the server answers each failure; data URLs; local files.

No traffic leaves this machine. Two kinds of remote host stand in for the internet:
* a tiny HTTP server on 127.0.0.1, reached only through the opt-in for private addresses
  (`allow_private=True`, the server's --allow-private-media), and with a connect that refuses any
  other address, so a bug in the guard fails a test instead of reaching a real host;
* canned answers on a socketpair behind a stub resolver and a stub connect: the default policy
  (public addresses only) runs end to end, and nothing is connected to at all.
"""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time

import pytest

from llavakit.errors import InvalidMediaURL, MediaFetchFailed, MediaURLNotAllowed
from llavakit.fetch import RemoteFetcher, ip_literal, is_blocked_address
from llavakit.server.config import ServerConfig
from llavakit.server.errors import BadRequest, MediaFetchError
from llavakit.server.media import MediaResolver, check_image, decode_data_url
from server_helpers import data_url, png_bytes

IMAGE = png_bytes(12, 10)
PUBLIC = "93.184.216.34"  # what the stub resolver answers for a "public" host; never connected to


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        routes = {
            "/img.png": (200, {"Content-Type": "image/png"}, IMAGE),
            "/to-img": (302, {"Location": "/img.png"}, b""),
            "/to-metadata": (307, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/to-octal-metadata": (302, {"Location": "http://0251.0376.0251.0376/latest/meta-data/"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/missing": (404, {}, b"no"),
            "/big-declared": (200, {"Content-Length": str(10 << 20)}, b""),
        }
        if self.path == "/big-undeclared":  # no Content-Length: the cap must hold while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
            return
        if self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.05)
            return
        if self.path == "/trickle-headers":  # each recv gets a byte in time; only a whole-fetch deadline ends it
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: " + b"x" * 120:
                self.wfile.write(bytes([byte]))
                time.sleep(1.0)
            return
        status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def origin():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, address: None  # clients hanging up on purpose are not news
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _loopback_connect(address, timeout):
    """The only real connect tests use: to our own 127.0.0.1 server, nothing else."""
    assert address[0] == "127.0.0.1", f"a test tried to connect to {address}"
    return socket.create_connection(address, timeout)


def _fetcher(**kw) -> RemoteFetcher:
    """A fetcher for the loopback origin: the opt-in on, connections to 127.0.0.1 only."""
    args = dict(timeout_s=3.0, max_bytes=1 << 20, max_redirects=3, allow_private=True, connect=_loopback_connect)
    args.update(kw)
    return RemoteFetcher(**args)


def _no_resolve(host, port):
    raise AssertionError(f"{host!r} was resolved; an IP literal must be checked as such")


def _no_connect(address, timeout):
    raise AssertionError(f"a refused URL led to a connection attempt to {address}")


class _Canned:
    """A stub remote: connect() records the address and returns a socketpair end whose peer has
    already written the canned HTTP answer for that address. Nothing touches the network."""

    def __init__(self, answers: dict[str, bytes]):
        self.answers = answers
        self.connects: list[tuple[str, int]] = []
        self._peers: list[socket.socket] = []

    def __call__(self, address, timeout):
        self.connects.append(address)
        ours, theirs = socket.socketpair()
        theirs.sendall(self.answers[address[0]])
        self._peers.append(theirs)  # kept open: our request must not hit a closed pipe
        return ours

    def close(self):
        for peer in self._peers:
            peer.close()


@pytest.fixture
def canned():
    stubs = []

    def make(answers):
        stubs.append(_Canned(answers))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.close()


def _http(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": str(len(body))}.items())
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


# -- the address policy ---------------------------------------------------------------------------
@pytest.mark.parametrize("address, blocked", [
    ("10.0.0.1", True), ("172.16.5.4", True), ("192.168.1.1", True), ("127.0.0.1", True), ("169.254.169.254", True),
    ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True), ("255.255.255.255", True), ("::1", True),
    ("fe80::1", True), ("fe80::1%eth0", True), ("fc00::1", True), ("::ffff:10.0.0.1", True),
    ("2002:7f00:1::1", True), ("::", True), ("ff02::1", True),
    ("64:ff9b::7f00:1", True), ("64:ff9b::a9fe:a9fe", True), ("64:ff9b::a00:1", True),  # NAT64 of internal IPv4
    ("64:ff9b:1::808:808", True),  # local-use NAT64: refused whatever it embeds
    ("::127.0.0.1", True), ("::10.0.0.1", True), ("::8.8.8.8", True),  # deprecated IPv4-compatible, all of ::/96
    ("fec0::1", True),  # site-local
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", True),  # Teredo whose client is 127.0.0.1
    ("8.8.8.8", False), ("1.1.1.1", False), ("2606:4700:4700::1111", False), ("64:ff9b::808:808", False),
    ("::ffff:8.8.8.8", False),
])
def test_address_policy(address, blocked):
    assert is_blocked_address(ipaddress.ip_address(address)) is blocked


@pytest.mark.parametrize("address, blocked", [
    ("127.0.0.1", False), ("10.0.0.1", False), ("192.168.1.1", False), ("::1", False), ("fc00::1", False),
    ("::ffff:127.0.0.1", False), ("100.64.0.1", False), ("8.8.8.8", False),
    ("169.254.169.254", True), ("fe80::1", True), ("0.0.0.0", True), ("224.0.0.1", True), ("::", True),
    ("::127.0.0.1", True), ("fec0::1", True), ("64:ff9b::a9fe:a9fe", True), ("::ffff:169.254.169.254", True),
])
def test_the_opt_in_admits_private_and_loopback_only(address, blocked):
    assert is_blocked_address(ipaddress.ip_address(address), allow_private=True) is blocked


@pytest.mark.parametrize("host, address", [
    ("0177.0.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"), ("10.1", "10.0.0.1"), ("8.8.8.8", "8.8.8.8"), ("::1", "::1"),
    ("example.com", None), ("cafe", None), ("1e5.example", None),
])
def test_ip_literals_in_every_spelling_the_resolver_reads(host, address):
    assert ip_literal(host) == (ipaddress.ip_address(address) if address else None)


# -- refused before anything is resolved or connected ---------------------------------------------
@pytest.mark.parametrize("url, address", [
    ("http://0177.0.0.1/x.png", "127.0.0.1"), ("http://2130706433/x.png", "127.0.0.1"),
    ("http://0x7f.0.0.1/x.png", "127.0.0.1"), ("http://127.1/x.png", "127.0.0.1"),
    ("http://0x7F.1:8080/x.png", "127.0.0.1"), ("http://127.0.0.1./x.png", "127.0.0.1"),
    ("http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/", "169.254.169.254"), ("http://2852039166/", "169.254.169.254"),
    ("http://012.0.0.1/x.png", "10.0.0.1"), ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/x.png", "127.0.0.1"),
    ("http://[::ffff:127.0.0.1]/x.png", "::ffff:127.0.0.1"), ("http://[64:ff9b::127.0.0.1]/x.png", "64:ff9b::7f00:1"),
    ("http://[64:ff9b::a9fe:a9fe]/x.png", "64:ff9b::a9fe:a9fe"), ("http://[64:ff9b:1::a00:1]/", "64:ff9b:1::a00:1"),
    ("http://[::127.0.0.1]/x.png", "::7f00:1"), ("http://[::8.8.8.8]/x.png", "::808:808"),
    ("http://[fec0::1]/x.png", "fec0::1"), ("http://[2002:7f00:1::1]/x.png", "2002:7f00:1::1"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "2001:0:4136:e378:8000:63bf:80ff:fffe"),
    ("http://[fe80::1%25eth0]/x.png", "fe80::1%25eth0"), ("http://[::1]:8080/x.png", "::1"),
    ("http://0.0.0.0/x.png", "0.0.0.0"), ("http://0/x.png", "0.0.0.0"),
])
def test_internal_addresses_in_any_spelling_are_refused_without_resolving_or_connecting(url, address):
    f = RemoteFetcher(3.0, 1 << 20, resolve=_no_resolve, connect=_no_connect)
    with pytest.raises(MediaURLNotAllowed, match="private, loopback or otherwise internal") as e:
        f.fetch(url, "image")
    assert f"({ipaddress.ip_address(address)})" in str(e.value)  # as this Python spells it


@pytest.mark.parametrize("url, message", [
    ("http://999.1.1.1/x.png", "looks like a numeric IPv4 address"), ("http://1.2.3.4.5/", "numeric IPv4"),
    ("http://0x/x.png", "numeric IPv4"), ("http://[::zz]/x.png", "malformed"), ("http://[::1/x.png", "malformed"),
    ("http:///x.png", "no host"), ("http://10.0.0.1:99999/x.png", "invalid port"),
])
def test_malformed_urls_are_invalid(url, message):
    with pytest.raises(InvalidMediaURL, match=message):
        RemoteFetcher(3.0, 1 << 20, resolve=_no_resolve, connect=_no_connect).fetch(url)


@pytest.mark.parametrize("url, message", [
    ("ftp://example.invalid/x.png", "only http and https"), ("file:///etc/passwd", "only http and https"),
    ("http://user:pw@example.org/x.png", "credentials"),
])
def test_forbidden_urls_are_not_allowed(url, message):
    with pytest.raises(MediaURLNotAllowed, match=message):
        RemoteFetcher(3.0, 1 << 20, resolve=_no_resolve, connect=_no_connect).fetch(url)


def test_domain_allow_list_is_checked_before_resolving():
    resolved = []
    f = RemoteFetcher(3.0, 1 << 20, domains=("images.example.org",), connect=_no_connect,
                      resolve=lambda host, port: resolved.append(host) or [PUBLIC])
    with pytest.raises(MediaURLNotAllowed, match="not on this server's --remote-media-domains"):
        f.fetch("http://evil.example.net/x.png")
    with pytest.raises(MediaURLNotAllowed, match="not on this server's"):
        f.fetch("http://images.example.org.evil.net/x.png")
    with pytest.raises(MediaURLNotAllowed, match="not on this server's"):
        f.fetch("http://2130706433/x.png")
    assert resolved == []


@pytest.mark.parametrize("answers, address", [
    (["10.0.0.7"], "10.0.0.7"), ([PUBLIC, "10.0.0.7"], "10.0.0.7"), (["127.0.0.1"], "127.0.0.1"),
    ([PUBLIC, "::1"], "::1"), (["169.254.169.254"], "169.254.169.254"), (["::ffff:192.168.0.1"], "::ffff:192.168.0.1"),
    (["64:ff9b::a00:1"], "64:ff9b::a00:1"),
])
def test_every_resolved_address_must_be_public(answers, address):
    f = RemoteFetcher(3.0, 1 << 20, resolve=lambda host, port: answers, connect=_no_connect)
    with pytest.raises(MediaURLNotAllowed, match="private, loopback or otherwise internal") as e:
        f.fetch("http://mixed.example.org/x.png")
    assert f"({ipaddress.ip_address(address)})" in str(e.value)


# -- the default policy end to end, on canned answers ---------------------------------------------
def test_the_connection_goes_to_the_address_that_was_checked(canned):
    answers = iter([[PUBLIC], ["10.0.0.1"]])  # a rebinding resolver: public when checked, internal after
    resolved = []
    remote = canned({PUBLIC: _http("200 OK", {"Content-Type": "image/png"}, IMAGE)})
    f = RemoteFetcher(3.0, 1 << 20, resolve=lambda host, port: resolved.append(host) or next(answers), connect=remote)
    assert f.fetch("http://rebind.example.org/x.png") == IMAGE
    assert resolved == ["rebind.example.org"] and remote.connects == [(PUBLIC, 80)]


@pytest.mark.parametrize("location", [
    "http://10.0.0.1/x.png", "http://0177.0.0.1/x.png", "http://2130706433/", "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "http://internal.example.org/x.png",
])
def test_redirect_to_an_internal_address_is_refused_at_the_hop(canned, location):
    resolve = {"public.example.org": [PUBLIC], "internal.example.org": ["192.168.0.5"]}
    remote = canned({PUBLIC: _http("302 Found", {"Location": location})})
    f = RemoteFetcher(3.0, 1 << 20, resolve=lambda host, port: resolve[host], connect=remote)
    with pytest.raises(MediaURLNotAllowed, match="private, loopback or otherwise internal"):
        f.fetch("http://public.example.org/x.png")
    assert remote.connects == [(PUBLIC, 80)]  # the hop to the internal address was never connected


# -- the loopback origin, through the opt-in ------------------------------------------------------
def test_fetch_follows_checked_redirects(origin):
    assert _fetcher().fetch(origin + "/img.png") == IMAGE
    assert _fetcher().fetch(origin + "/to-img") == IMAGE


def test_the_opt_in_resolves_once_and_connects_to_the_checked_address(origin):
    port = int(origin.rsplit(":", 1)[1])
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])
    connects = []

    def connect(address, timeout):
        connects.append(address)
        return _loopback_connect(address, timeout)

    f = _fetcher(resolve=lambda host, port: next(answers), connect=connect)
    assert f.fetch(f"http://origin.test:{port}/img.png") == IMAGE
    assert connects == [("127.0.0.1", port)]


@pytest.mark.parametrize("path", ["/to-metadata", "/to-octal-metadata"])
def test_link_local_stays_refused_with_the_opt_in(origin, path):
    with pytest.raises(MediaURLNotAllowed, match=r"link-local, multicast or reserved address \(169.254.169.254\)"):
        _fetcher().fetch(origin + path)


def test_default_policy_refuses_loopback(origin):
    with pytest.raises(MediaURLNotAllowed, match=r"internal address \(127.0.0.1\)"):
        RemoteFetcher(3.0, 1 << 20, connect=_no_connect).fetch(origin + "/img.png")


@pytest.mark.parametrize("path, message", [
    ("/loop", "redirected more than 3 times"), ("/missing", "HTTP 404"), ("/big-declared", "limit"),
    ("/big-undeclared", "limit"),
])
def test_fetch_failures(origin, path, message):
    with pytest.raises(MediaFetchFailed, match=message):
        _fetcher().fetch(origin + path)


def test_slow_body_hits_the_whole_download_deadline(origin):
    start = time.monotonic()
    with pytest.raises(MediaFetchFailed, match="longer than 1 s"):
        _fetcher(timeout_s=1.0).fetch(origin + "/trickle")
    assert time.monotonic() - start < 2


def test_headers_trickled_a_byte_a_second_hit_the_deadline(origin):
    # Each recv gets its byte within any per-recv timeout; only the watchdog ends this fetch.
    start = time.monotonic()
    with pytest.raises(MediaFetchFailed, match="took longer than 2 s"):
        _fetcher(timeout_s=2.0).fetch(origin + "/trickle-headers")
    assert time.monotonic() - start < 3


# -- how the server answers ------------------------------------------------------------------------
@pytest.mark.parametrize("url, status, code, words", [
    ("http://0177.0.0.1/x.png", 400, "media_url_not_allowed", "private"),
    ("http://[64:ff9b::a9fe:a9fe]/x.png", 400, "media_url_not_allowed", "private"),
    ("http://999.1.1.1/x.png", 400, "invalid_media_url", "numeric IPv4"),
    ("http:///x.png", 400, "invalid_media_url", "no host"),
])
def test_server_maps_refusals_to_400(url, status, code, words):
    resolver = MediaResolver(ServerConfig(allow_remote_media=True),
                             RemoteFetcher(3.0, 1 << 20, resolve=_no_resolve, connect=_no_connect))
    with pytest.raises(BadRequest) as e:
        resolver.image(url, "messages[0].content[1].image_url")
    assert (e.value.status, e.value.code, e.value.param) == (status, code, "messages[0].content[1].image_url")
    assert words in e.value.message


def test_server_opt_in_fetches_from_loopback_and_maps_failures_to_422(origin):
    private = MediaResolver(ServerConfig(allow_remote_media=True, allow_private_media=True))
    assert private.fetcher.allow_private
    assert private.image(origin + "/img.png", "p") == IMAGE
    with pytest.raises(MediaFetchError) as e:
        private.image(origin + "/missing", "p")
    assert (e.value.status, e.value.code, e.value.param) == (422, "media_fetch_failed", "p")
    assert "HTTP 404" in e.value.message
    with pytest.raises(BadRequest) as e:  # without the opt-in the same URL is the client's mistake
        MediaResolver(ServerConfig(allow_remote_media=True)).image(origin + "/img.png", "p")
    assert (e.value.status, e.value.code) == (400, "media_url_not_allowed")


# -- data URLs and local files ---------------------------------------------------------------------
def test_data_urls_and_image_headers():
    assert decode_data_url(data_url(IMAGE), "image", "p") == IMAGE
    wrapped = "data:image/png;base64," + data_url(IMAGE)[22:].replace("A", "A\n", 3)  # line breaks are tolerated
    assert decode_data_url(wrapped, "image", "p") == IMAGE
    for bad, code in [("data:image/png,rawbytes", "invalid_data_url"), ("data:;base64,AAAA", "invalid_data_url"),
                      ("data:image/png;base64,", "invalid_data_url"), ("data:image/png;base64,A===", "invalid_base64"),
                      ("data:video/mp4;base64,AAAA", "invalid_data_url")]:
        with pytest.raises(BadRequest) as e:
            decode_data_url(bad, "image", "p")
        assert e.value.code == code, bad
    cfg = ServerConfig(max_image_pixels=100)
    check_image(png_bytes(10, 10), cfg, "p")
    with pytest.raises(BadRequest, match="11x10"):
        check_image(png_bytes(11, 10), cfg, "p")


def test_local_files_only_below_the_allowed_folder(tmp_path):
    inside = tmp_path / "media"
    inside.mkdir()
    (inside / "a.png").write_bytes(IMAGE)
    (tmp_path / "secret.png").write_bytes(IMAGE)
    (inside / "link.png").symlink_to(tmp_path / "secret.png")
    resolver = MediaResolver(ServerConfig(allowed_local_media_path=inside))
    assert resolver.image(f"file://{inside}/a.png", "p") == IMAGE
    for url in (f"file://{inside}/../secret.png", f"file://{inside}/link.png", "file://host/etc/passwd"):
        with pytest.raises(BadRequest):
            resolver.image(url, "p")
    with pytest.raises(BadRequest, match="local files are disabled"):
        MediaResolver(ServerConfig()).image(f"file://{inside}/a.png", "p")
