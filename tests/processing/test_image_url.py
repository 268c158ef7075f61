"""`load_image(url)` goes through llavakit's one fetcher with its SSRF guard on (public hosts only).

Nothing here touches the network: the fetcher's resolver and connect are replaced by stubs, and a
stub remote answers from a socketpair.
"""

from __future__ import annotations

import io
import ipaddress
import socket

import pytest
from PIL import Image

from llavakit.errors import ImageError, MediaFetchFailed, MediaURLNotAllowed
from llavakit.processing import image as image_module
from llavakit.processing.image import load_image

PUBLIC = "93.184.216.34"  # what the stub resolver answers for a "public" host; never connected to


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def remote(monkeypatch):
    """Stub DNS and connect on load_image's fetcher; `remote.answer` is what the 'server' sends."""

    class Remote:
        def __init__(self):
            self.answer = b""
            self.resolved: list[str] = []
            self.connects: list[tuple[str, int]] = []
            self.peers: list[socket.socket] = []

        def resolve(self, host, port):
            self.resolved.append(host)
            return {"images.example.org": [PUBLIC], "intranet.example.org": ["192.168.1.10"]}[host]

        def connect(self, address, timeout):
            self.connects.append(address)
            ours, theirs = socket.socketpair()
            theirs.sendall(self.answer)
            self.peers.append(theirs)  # kept open until the test ends: our request must not hit a closed pipe
            return ours

    stub = Remote()
    monkeypatch.setattr(image_module._URL_FETCHER, "resolve", stub.resolve)
    monkeypatch.setattr(image_module._URL_FETCHER, "connect", stub.connect)
    yield stub
    for peer in stub.peers:
        peer.close()


def test_the_url_fetcher_keeps_its_limits_and_the_guard():
    fetcher = image_module._URL_FETCHER
    assert (fetcher.timeout_s, fetcher.max_bytes, fetcher.allow_private) == (30.0, 64 << 20, False)


def test_a_public_url_loads(remote):
    png = _png(7, 5)
    remote.answer = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(png) + png
    image = load_image("http://images.example.org/cat.png")
    assert (image.mode, image.size) == ("RGB", (7, 5))
    assert remote.connects == [(PUBLIC, 80)]


@pytest.mark.parametrize("url, address", [
    ("http://127.0.0.1:8000/x.png", "127.0.0.1"), ("http://2130706433/x.png", "127.0.0.1"),
    ("http://0177.0.0.1/x.png", "127.0.0.1"), ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ("http://[::ffff:10.0.0.1]/x.png", "::ffff:10.0.0.1"), ("http://intranet.example.org/x.png", "192.168.1.10"),
])
def test_internal_urls_are_refused_before_connecting(remote, url, address):
    with pytest.raises(ImageError, match="private, loopback or otherwise internal") as e:
        load_image(url)
    assert isinstance(e.value.__cause__, MediaURLNotAllowed)
    assert f"({ipaddress.ip_address(address)})" in str(e.value)  # as this Python spells it
    assert remote.connects == []


def test_a_redirect_to_an_internal_address_is_refused_at_the_hop(remote):
    remote.answer = b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/x.png\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(ImageError, match=r"internal address \(10.0.0.1\)"):
        load_image("http://images.example.org/x.png")
    assert remote.connects == [(PUBLIC, 80)]


def test_a_failed_fetch_is_an_image_error(remote):
    remote.answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(ImageError, match="HTTP 404") as e:
        load_image("http://images.example.org/x.png")
    assert isinstance(e.value.__cause__, MediaFetchFailed)
