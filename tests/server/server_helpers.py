"""Shared by the server tests: a `llavakit serve` subprocess, and media and message builders."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

START_TIMEOUT_S = 90
REQUEST_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `llavakit serve` process."""

    def __init__(self, model: Path, name: str, flags: list[str], log: Path, start_timeout: float = START_TIMEOUT_S):
        self.model, self.name, self.log = model, name, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "llavakit", "serve", "--model", str(model), "--dtype", "float32",
               "--port", str(self.port), "--served-model-name", name, "--log-level", "warning", *flags]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"server did not start within {start_timeout} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    # -- raw HTTP (for bodies the openai client would never send) -----------------------------
    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, bytes, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, bytes]:
        status, body, _ = self.request("GET", path, timeout=10)
        return status, body

    def post(self, payload: dict | bytes, headers: dict | None = None) -> tuple[int, dict | bytes, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, raw, hdrs = self.request("POST", "/v1/chat/completions", body,
                                         {"Content-Type": "application/json", **(headers or {})})
        try:
            return status, json.loads(raw), hdrs
        except ValueError:
            return status, raw, hdrs

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="test", max_retries=0, timeout=REQUEST_TIMEOUT_S)

    def async_client(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="test", max_retries=0, timeout=REQUEST_TIMEOUT_S)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{label="v"}': value}."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"server ignored SIGTERM for {timeout} s:\n{self.log_tail()}")
        return self.proc.returncode



# ───────────────────────────── media helpers ─────────────────────────────


def wait_for_metrics(server: Server, condition, timeout: float = 20.0, poll: float = 0.05) -> dict[str, float]:
    """The server's metrics once `condition(metrics)` holds, or the last reading after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if condition(m) or time.monotonic() > deadline:
            return m
        time.sleep(poll)


def png_bytes(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def mp4_bytes(n: int = 12, w: int = 64, h: int = 48) -> bytes:
    """A small H.264 clip whose frames change colour, written with PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = np.full((h, w, 3), (i * 20 % 255, 255 - i * 20 % 255, 128), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def image_message(text: str, *images: bytes) -> list[dict]:
    """An OpenAI user message with data-URL images first, then the text."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def local_message(text: str, *images: bytes) -> list[dict]:
    """The same conversation in llavakit's format, for vlm.chat and the processor."""
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def start_replicated(model, name: str, flags: list[str], log: Path, start_timeout: float) -> Server:
    """`llavakit serve --replicas ...` on its own local Ray cluster; skips the test where Ray cannot start."""
    import pytest

    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'llavakit[ray]')")
    try:
        return Server(model, name, flags, log, start_timeout=start_timeout)
    except RuntimeError:
        text = log.read_text(errors="replace")
        if "Ray could not start" in text:
            pytest.skip(f"Ray could not start on this machine: {text[-600:]}")
        raise


def stream_raw(port: int, body: bytes, started, started_on: bytes, timeout: float) -> bytes:
    """POST `body` (JSON) to /v1/chat/completions on a plain socket and return the raw response, read
    until the body's last chunk or the connection's end; `started` (a threading.Event) is set once the
    bytes so far match the regex `started_on`."""
    import re

    raw = b""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        while True:
            try:
                piece = sock.recv(65536)
            except OSError:
                break
            if not piece:
                break
            raw += piece
            if not started.is_set() and re.search(started_on, raw):
                started.set()
            if raw.endswith(b"\r\n0\r\n\r\n"):
                break
    return raw
