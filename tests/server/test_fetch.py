"""Remote media fetching: address policy on every hop, redirects, byte cap, deadline; data URLs; local files.

A tiny HTTP server on 127.0.0.1 plays the remote host. The production policy refuses loopback,
so these tests pass a policy that admits loopback only; redirects to any other internal address
must still be refused before a connection is made (no traffic leaves this machine).
"""

from __future__ import annotations

import http.server
import ipaddress
import threading
import time

import pytest

from llavakit.server.config import ServerConfig
from llavakit.server.errors import BadRequest, MediaFetchError
from llavakit.server.fetch import RemoteFetcher, is_blocked_address
from llavakit.server.media import MediaResolver, check_image, decode_data_url
from server_helpers import data_url, png_bytes

IMAGE = png_bytes(12, 10)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        routes = {
            "/img.png": (200, {"Content-Type": "image/png"}, IMAGE),
            "/to-img": (302, {"Location": "/img.png"}, b""),
            "/to-private": (302, {"Location": "http://10.255.0.1/img.png"}, b""),
            "/to-metadata": (307, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
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


def _loopback_only(ip) -> bool:
    """Test policy: the local origin server is 'public', everything else internal stays blocked."""
    return not ip.is_loopback or isinstance(ip, ipaddress.IPv6Address)


def _fetcher(**kw) -> RemoteFetcher:
    args = dict(timeout_s=3.0, max_bytes=1 << 20, max_redirects=3, blocked=_loopback_only)
    args.update(kw)
    return RemoteFetcher(**args)


@pytest.mark.parametrize("address, blocked", [
    ("10.0.0.1", True), ("172.16.5.4", True), ("192.168.1.1", True), ("127.0.0.1", True), ("169.254.169.254", True),
    ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True), ("255.255.255.255", True), ("::1", True),
    ("fe80::1", True), ("fc00::1", True), ("::ffff:10.0.0.1", True), ("2002:7f00:1::1", True), ("::", True),
    ("8.8.8.8", False), ("1.1.1.1", False), ("2606:4700:4700::1111", False),
])
def test_address_policy(address, blocked):
    assert is_blocked_address(ipaddress.ip_address(address)) is blocked


def test_fetch_follows_checked_redirects(origin):
    assert _fetcher().fetch(origin + "/img.png") == IMAGE
    assert _fetcher().fetch(origin + "/to-img") == IMAGE


@pytest.mark.parametrize("path", ["/to-private", "/to-metadata"])
def test_redirect_to_an_internal_address_is_refused_before_connecting(origin, path):
    with pytest.raises(BadRequest, match="internal address"):
        _fetcher().fetch(origin + path)


def test_default_policy_refuses_loopback(origin):
    with pytest.raises(BadRequest, match="internal address"):
        RemoteFetcher(3.0, 1 << 20).fetch(origin + "/img.png")


@pytest.mark.parametrize("path, message", [
    ("/loop", "redirected more than 3 times"), ("/missing", "HTTP 404"), ("/big-declared", "limit"),
    ("/big-undeclared", "limit"),
])
def test_fetch_failures_are_422(origin, path, message):
    with pytest.raises(MediaFetchError, match=message):
        _fetcher().fetch(origin + path)


def test_slow_server_hits_the_whole_download_deadline(origin):
    start = time.monotonic()
    with pytest.raises(MediaFetchError, match="longer than 1 s"):
        _fetcher(timeout_s=1.0).fetch(origin + "/trickle")
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("url, message", [
    ("ftp://example.invalid/x.png", "only http and https"), ("http://user:pw@10.0.0.1/x.png", "credentials"),
    ("http:///x.png", "no host"), ("http://10.0.0.1:99999/x.png", "invalid port"),
])
def test_malformed_or_forbidden_urls(url, message):
    with pytest.raises(BadRequest, match=message):
        _fetcher().fetch(url)


def test_domain_allow_list_is_checked_before_resolving():
    resolved = []
    f = _fetcher(domains=("images.example.org",), resolve=lambda host, port: resolved.append(host) or ["8.8.8.8"])
    with pytest.raises(BadRequest, match="not on this server's --remote-media-domains"):
        f.fetch("http://evil.example.net/x.png")
    with pytest.raises(BadRequest, match="not on this server's"):
        f.fetch("http://images.example.org.evil.net/x.png")
    assert resolved == []


def test_every_resolved_address_must_be_public():
    f = _fetcher(blocked=is_blocked_address, resolve=lambda host, port: ["8.8.8.8", "10.0.0.7"])
    with pytest.raises(BadRequest, match="10.0.0.7"):
        f.fetch("http://mixed.example.org/x.png")


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
