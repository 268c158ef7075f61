"""SIGTERM: the server stops accepting, lets in-flight streams finish within the timeout, cuts the rest with an
error event and [DONE], exits 0."""

from __future__ import annotations

import json
import socket
import threading
import time

from server_helpers import Server, image_message, png_bytes, stream_raw


def _stream(port: int, max_tokens: int, out: dict, started: threading.Event) -> None:
    body = json.dumps({"model": "shutdown", "messages": image_message("What is in the picture?", png_bytes(16, 16)),
                       "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    out["data"] = stream_raw(port, body, started, rb"data: ", 30)


def test_sigterm_finishes_short_streams_cancels_long_ones_and_exits_0(checkpoint, tmp_path):
    # 40 tokens take tens of milliseconds; 4,000 (the context's limit) at least 1.4 s with the native step on
    # this tiny model (it did at a timeout of 1.5 s): the timeout lies between.
    s = Server(checkpoint("llama"), "shutdown", ["--shutdown-timeout", "0.6"], tmp_path / "server.log")
    short, long_ = {}, {}
    events = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=_stream, args=(s.port, 40, short, events[0])),
               threading.Thread(target=_stream, args=(s.port, 4000, long_, events[1]))]
    for t in threads:
        t.start()
    assert all(e.wait(30) for e in events)
    start = time.monotonic()
    s.proc.send_signal(15)
    time.sleep(0.3)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=2):
            refused = False
    except OSError:
        refused = True
    assert s.proc.wait(30) == 0, s.log_tail()
    elapsed = time.monotonic() - start
    for t in threads:
        t.join(10)
    assert refused, "the server still accepted connections after SIGTERM"
    assert elapsed < 15
    text = short["data"].decode()  # chunked transfer encoding: the body ends with the empty last chunk
    assert '"finish_reason":"length"' in text and "data: [DONE]" in text and text.endswith("\r\n0\r\n\r\n")
    # Cut when the timeout ran out, and told so: an error event, then [DONE], then the stream's end.
    cut = long_["data"].decode()
    assert '"code":"overloaded"' in cut and "shutting down" in cut, cut[-500:]
    assert cut.index('"code":"overloaded"') < cut.index("data: [DONE]") and cut.endswith("\r\n0\r\n\r\n")
