"""What hostile requests cost `llavakit serve`: status, time to the answer, server RSS, /health latency.

    python bench/hostile.py                      # the shipped model, the server's default limits
    python bench/hostile.py --model DIR --out bench/results/hostile.md

Starts the server (with an API key, remote media allowed from private addresses so that a local
trickling server can be fetched, and file:// media from a temporary folder), warms it with one
ordinary request, then sends each attack while another thread polls /health on its own
connections. Every attack is bounded; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serve import launch, stop  # noqa: E402

KEY = "bench-key"


class Target:
    def __init__(self, url: str, pid: int):
        self.port = int(url.rsplit(":", 1)[1])
        self.proc = psutil.Process(pid)

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def request(self, method, path, body=None, headers=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def post(self, payload, headers=None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})}
        return self.request("POST", "/v1/chat/completions", body, h)


class Watch:
    """Polls /health every 50 ms on fresh connections, and samples RSS; records the worst of each."""

    def __init__(self, t: Target):
        self.t, self.worst_health, self.peak_rss, self.fail = t, 0.0, t.rss_mb(), 0
        self.base_rss = self.peak_rss
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._health, daemon=True),
                         threading.Thread(target=self._rss, daemon=True)]

    def _health(self):
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                self.fail += self.t.request("GET", "/health", timeout=30)[0] != 200
            except OSError:
                self.fail += 1
            self.worst_health = max(self.worst_health, time.monotonic() - start)
            self._stop.wait(0.05)

    def _rss(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.t.rss_mb())
            self._stop.wait(0.05)

    def __enter__(self):
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for th in self._threads:
            th.join(35)


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user(content) -> dict:
    return {"model": "bench", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": content}]}


def with_media(kind: str, url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}} if kind == "image" else \
        {"type": "video_url", "video_url": {"url": url}}
    return user([part, {"type": "text", "text": "What is this?"}])


def strip_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16_000_000, 1)).save(buf, "PNG")
    return buf.getvalue()


def huge_frame_video() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=1000)
        stream.width = stream.height = 4000
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast"}
        frame = av.VideoFrame.from_ndarray(np.zeros((4000, 4000, 3), np.uint8), format="rgb24")
        for _ in range(20):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def trickle_server() -> int:
    """A loopback HTTP server that sends its response headers one byte a second."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        while True:
            conn, _ = srv.accept()

            def one(c=conn):
                try:
                    c.recv(65536)
                    for b in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n" + b"X-Slow: y\r\n" * 100:
                        c.sendall(bytes([b]))
                        time.sleep(1)
                except OSError:
                    pass
                finally:
                    c.close()
            threading.Thread(target=one, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def slowloris(t: Target, n: int = 50) -> tuple[str, float]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", t.port), timeout=5)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    start, open_ = time.monotonic(), set(range(n))
    while open_ and time.monotonic() - start < 60:
        time.sleep(1)
        for i in list(open_):
            try:
                socks[i].sendall(b"X-a: b\r\n")
                socks[i].settimeout(0.01)
                if socks[i].recv(1) == b"":
                    open_.discard(i)
            except socket.timeout:
                pass
            except OSError:
                open_.discard(i)
    for s in socks:
        s.close()
    return f"{n - len(open_)}/{n} closed", time.monotonic() - start


def idle(t: Target, n: int = 300) -> tuple[str, float]:
    socks = [socket.create_connection(("127.0.0.1", t.port), timeout=5) for _ in range(n)]
    start = time.monotonic()
    status = t.request("GET", "/health", timeout=30)[0]
    took = time.monotonic() - start
    for s in socks:
        s.close()
    return f"/health {status} with {n} idle sockets", took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--out", help="also write the table (Markdown) here")
    args = ap.parse_args()
    if args.model is None:
        from llavakit.cli import default_model_dir

        args.model = str(default_model_dir())
    media = Path(tempfile.mkdtemp())
    proc, url = launch(args.model, ["--served-model-name", "bench", "--api-key", KEY, "--allow-remote-media",
                                    "--allow-private-media", "--remote-media-timeout", "3",
                                    "--allowed-local-media-path", str(media)])
    t = Target(url, proc.pid)
    rows = []
    try:
        picture = Path(__file__).parents[1] / "examples" / "picture.png"
        warm = with_media("image", data_url(picture.read_bytes(), "image/png"))
        assert t.post(warm)[0] == 200
        warm_rss = t.rss_mb()
        trickle = trickle_server()
        # Bodies are built before anything is timed: serializing them in this process would hold its
        # interpreter and delay the /health poller.
        body = lambda payload: json.dumps(payload).encode()  # noqa: E731
        bodies = [
            ("temperature 1e-40", body(dict(warm, temperature=1e-40)), None),
            ("repetition_penalty 1e-40", body(dict(warm, repetition_penalty=1e-40)), None),
            ("10 MB text message", body(user("ab " * 3_400_000)), None),
            ("450,000 small messages", body(dict(warm, messages=[{"role": "user", "content": "a"}] * 450_000)), None),
            ("1x16,000,000-pixel PNG", body(with_media("image", data_url(strip_png(), "image/png"))), None),
            ("4000x4000 video at 1000 fps", body(with_media("video", data_url(huge_frame_video(), "video/mp4"))), None),
            ("remote headers at 1 byte/s (3 s deadline)",
             body(with_media("image", f"http://127.0.0.1:{trickle}/x.png")), None),
            ("lone surrogate in JSON", json.dumps(user("x")).replace('"x"', '"\\ud800"').encode(), None),
            ("%00 in a file:// URL", body(with_media("image", f"file://{media}/a%00.png")), None),
            ("5,000-character file path", body(with_media("image", f"file://{media}/{'a' * 5000}")), None),
            ("1 MB model name", body(dict(warm, model="m" * 1_000_000)), None),
            ("a stop string of 5,000 characters", body(dict(warm, stop=["y" * 5000])), None),
            ("text/plain form post", body(warm), {"Content-Type": "text/plain"}),
            ("no API key", body(warm), {"Authorization": ""}),
            ("Host: evil.example", body(warm), {"Host": "evil.example"}),
        ]
        attacks = [(name, lambda b=b, h=h: t.post(b, h)) for name, b, h in bodies]
        attacks += [("50 slowloris sockets", lambda: slowloris(t)), ("300 idle sockets", lambda: idle(t))]
        for name, run in attacks:
            with Watch(t) as w:
                start = time.monotonic()
                result = run()
                took = time.monotonic() - start
            if isinstance(result[1], float):  # the socket attacks time themselves
                status, took = result
            else:
                status = str(result[0])
            rows.append((name, status, took, w.peak_rss - w.base_rss, w.worst_health, w.fail))
            print(f"{name:45s} {status:28s} {took:6.2f} s  RSS +{w.peak_rss - w.base_rss:6.0f} MB  "
                  f"/health worst {w.worst_health * 1000:6.0f} ms  failed {w.fail}", flush=True)
        time.sleep(5)  # the idle trim runs 2 s after the last request
        idle_rss = t.rss_mb()
    finally:
        code = stop(proc)
    lines = ["| attack | answer | seconds | server RSS growth (MB) | worst /health (ms) |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {s} | {took:.2f} | {grew:.0f} | {worst * 1000:.0f} |" for n, s, took, grew, worst, _ in rows]
    lines.append(f"\nRSS after warm-up {warm_rss:.0f} MB, idle after the attacks {idle_rss:.0f} MB "
                 f"({idle_rss / warm_rss:.2f}x); exit status after SIGTERM {code}.")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
