"""A table of bad requests: each gets its 4xx and an OpenAI-style error naming the problem; afterwards
the server still answers correctly and its memory is back near where it started.

Remote-media cases only ever name internal addresses (10.x, loopback, link-local), which the
server must refuse before connecting: no test traffic leaves this machine.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
import zlib

import pytest

from server_helpers import data_url, image_message, jpeg_bytes, local_message, png_bytes, wait_for_metrics

QUESTION = "What is in the picture?"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims width x height (8-bit; grayscale) followed by `idat` as its pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_bomb(side: int = 10_000) -> bytes:
    """A valid PNG of side x side black pixels: ~100 kB on the wire, 100 MB once decoded."""
    row = b"\x00" * (side + 1)  # filter byte + pixels
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return png_header(side, side, data)


def ok_request(**overrides) -> dict:
    body = {"model": "llama", "messages": image_message(QUESTION, png_bytes(16, 16)), "max_tokens": 3,
            "temperature": 0}
    body.update(overrides)
    return body


def with_image_url(url: str, text: str = QUESTION) -> dict:
    return ok_request(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": text}]}])


def user(content) -> dict:
    return ok_request(messages=[{"role": "user", "content": content}])


# (id, server, body, status, error code, words the message must hold)
CASES = [
    ("malformed_json", "llama", b'{"model": "llama", "messages": [', 400, "invalid_json", "not valid JSON"),
    ("empty_body", "llama", b"", 400, "empty_body", "empty"),
    ("json_array", "llama", b"[1, 2]", 400, "invalid_json", "JSON object"),
    ("invalid_utf8", "llama", b'{"model": "\xff\xfe"}', 400, "invalid_json", "not valid JSON"),
    ("deep_nesting", "llama", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", "not valid JSON"),
    ("missing_messages", "llama", {"model": "llama"}, 400, "missing", "messages"),
    ("empty_messages", "llama", ok_request(messages=[]), 400, "too_short", "messages"),
    ("temperature_string", "llama", ok_request(temperature="hot"), 400, "float_type", "temperature"),
    ("max_tokens_string", "llama", ok_request(max_tokens="5"), 400, "int_type", "max_tokens"),
    ("unknown_role", "llama", ok_request(messages=[{"role": "tool", "content": "hi"}]), 400, "union_tag_invalid",
     "'tool'"),
    ("role_not_string", "llama", ok_request(messages=[{"role": 3, "content": "hi"}]), 400, None, "messages[0]"),
    ("content_not_list", "llama", user({"text": "hi"}), 400, None, "messages[0].content"),
    ("unknown_part_type", "llama", user([{"type": "input_audio", "input_audio": {}}]), 400, "union_tag_invalid",
     "input_audio"),
    ("unknown_parameter", "llama", ok_request(temprature=0.5), 400, "extra_forbidden", "temprature"),
    ("invalid_base64", "llama", with_image_url("data:image/png;base64,@@not*base64@@"), 400, "invalid_base64",
     "base64"),
    ("not_an_image", "llama", with_image_url(data_url(b"hello, I am plain text and no picture")), 400,
     "invalid_image", "not an image"),
    ("truncated_png", "llama", with_image_url(data_url(png_bytes(64, 64)[:600])), 400, "invalid_image", "image"),
    ("truncated_jpeg", "llama", with_image_url(data_url(jpeg_bytes(64, 64)[:700], "image/jpeg")), 400,
     "invalid_image", "image"),
    ("one_by_one_image_is_fine", "llama", with_image_url(data_url(png_bytes(1, 1))), 200, None, None),
    ("huge_header_refused_before_decode", "llama", with_image_url(data_url(png_header(20_000, 20_000))), 400,
     "image_too_large", "pixels"),
    ("png_decompression_bomb", "llama", with_image_url(data_url(png_bomb())), 400, "image_too_large",
     "10000x10000"),
    ("wrong_media_type", "llama", with_image_url(data_url(png_bytes(8, 8), "text/plain")), 400, "invalid_data_url",
     "image/*"),
    ("too_many_images", "llama", ok_request(messages=image_message(QUESTION, *[png_bytes(8, 8)] * 5)), 400,
     "too_many_images", "at most 4"),
    ("negative_max_tokens", "llama", ok_request(max_tokens=-1), 400, "greater_than_equal", "max_tokens"),
    ("zero_max_tokens", "llama", ok_request(max_completion_tokens=0), 400, "greater_than_equal",
     "max_completion_tokens"),
    ("absurd_max_tokens", "llama", ok_request(max_tokens=10**12), 400, "context_length_exceeded", "max_tokens"),
    ("prompt_too_long", "llama", user("cat dog sky tree " * 2500), 400, "context_length_exceeded", "context"),
    ("temperature_out_of_range", "llama", ok_request(temperature=7), 400, "less_than_equal", "temperature"),
    ("top_p_zero", "llama", ok_request(top_p=0), 400, "greater_than", "top_p"),
    ("n_too_large", "llama", ok_request(n=100), 400, "invalid_value", "at most 8"),
    ("top_logprobs_too_many", "llama", ok_request(logprobs=True, top_logprobs=50), 400, "less_than_equal",
     "top_logprobs"),
    ("top_logprobs_without_logprobs", "llama", ok_request(top_logprobs=2), 400, "value_error", "logprobs"),
    ("negative_seed", "llama", ok_request(seed=-1), 400, "greater_than_equal", "seed"),
    ("too_many_stops", "llama", ok_request(stop=[str(i) for i in range(20)]), 400, "invalid_value", "stop"),
    ("empty_stop", "llama", ok_request(stop=[""]), 400, "invalid_value", "stop"),
    ("tools_unsupported", "llama", ok_request(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "unsupported_parameter", "tools"),
    ("presence_penalty_unsupported", "llama", ok_request(presence_penalty=1.0), 400, "unsupported_parameter",
     "presence_penalty"),
    ("stream_options_without_stream", "llama", ok_request(stream_options={"include_usage": True}), 400,
     "value_error", "stream"),
    ("invalid_json_schema", "llama", ok_request(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "no-such-type"}}}), 400, "invalid_json_schema", "schema"),
    ("json_schema_missing", "llama", ok_request(response_format={"type": "json_schema"}), 400, "value_error",
     "json_schema"),
    ("unknown_model", "llama", ok_request(model="gpt-4o"), 404, "model_not_found", "gpt-4o"),
    ("video_on_image_model", "llama", user([{"type": "video_url", "video_url": {
        "url": data_url(b"\x00" * 16, "video/mp4")}}, {"type": "text", "text": "hi"}]), 400, "video_unsupported",
     "video"),
    ("raw_path_as_url", "llama", with_image_url("/etc/passwd"), 400, "invalid_media_url", "unsupported URL"),
    ("bare_base64_as_url", "llama", with_image_url(base64.b64encode(png_bytes(8, 8)).decode()), 400,
     "invalid_media_url", "unsupported URL"),
    ("file_url_outside_allowed_dir", "llama", with_image_url("file:///etc/passwd"), 400, "media_url_not_allowed",
     "outside"),
    ("file_url_missing_inside_allowed_dir", "llama", None, 422, "media_fetch_failed", "no file"),  # built below
    ("remote_url_without_flag", "next_mistral", dict(with_image_url("http://10.0.0.1/cat.png"), model="next_mistral"),
     400, "remote_media_disabled", "--allow-remote-media"),
    ("private_address_with_flag", "llama", with_image_url("http://10.1.2.3/cat.png"), 400, "media_url_not_allowed",
     "private"),
    ("loopback_name_with_flag", "llama", with_image_url("http://localhost:9/cat.png"), 400, "media_url_not_allowed",
     "private"),
    ("metadata_address_with_flag", "llama", with_image_url("http://169.254.169.254/latest/meta-data"), 400,
     "media_url_not_allowed", "private"),
    ("ipv6_mapped_loopback_with_flag", "llama", with_image_url("http://[::ffff:127.0.0.1]:9/x.png"), 400,
     "media_url_not_allowed", "private"),
    ("ftp_scheme", "llama", with_image_url("ftp://10.0.0.1/cat.png"), 400, "invalid_media_url", "unsupported URL"),
]


def _body_for(case_id: str, body, media_dir):
    if case_id == "file_url_missing_inside_allowed_dir":
        return with_image_url(f"file://{media_dir}/no-such-file.png")
    return body


def _check_error(status, body, headers, want_status, code, words):
    assert status == want_status, body
    if want_status == 200:
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        return
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["type"] == ("invalid_request_error" if want_status < 429 else "server_error"), err
    if code is not None:
        assert err["code"] == code, err
    if words is not None:
        assert words in err["message"], err


def send_raw(port: int, head: bytes, body: bytes, timeout: float = 30) -> tuple[int, dict]:
    """Send a request whose body the server may refuse before reading it all; return (status, json)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed early, as it should
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    head_part, _, rest = data.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(rest)


def _expected_length(data: bytes) -> int:
    """Bytes of a whole response whose head is in `data` (head + Content-Length)."""
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(head) + 4


def test_bad_input_battery_then_healthy_and_memory_back(server, local_vlm, media_dir):
    assert len(CASES) >= 25
    s, plain = server("llama"), server("next_mistral")
    vlm = local_vlm("llama")
    good = image_message(QUESTION, png_bytes(40, 40, seed=11))
    want = vlm.chat(local_message(QUESTION, png_bytes(40, 40, seed=11)), max_new_tokens=8, temperature=0).text
    client = s.client()
    for _ in range(3):  # warm up allocator pools before measuring
        assert client.chat.completions.create(model="llama", messages=good, max_tokens=8,
                                              temperature=0).choices[0].message.content == want
    rss_before = s.rss()
    failures = []
    for case_id, target, body, status, code, words in CASES:
        srv = s if target == "llama" else plain
        start = time.monotonic()
        got_status, got, headers = srv.post(_body_for(case_id, body, media_dir))
        try:
            _check_error(got_status, got, headers, status, code, words)
            assert time.monotonic() - start < 10, "took too long"
        except AssertionError as e:
            failures.append(f"{case_id}: {e}")
    # 10 MB of text against an 8 MB body limit, refused from the declared length
    big = json.dumps(user("x" * 10_000_000)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(big)}\r\n\r\n").encode()
    got_status, got = send_raw(s.port, head, big)
    try:
        _check_error(got_status, got, {}, 413, "request_too_large", "8000000")
    except AssertionError as e:
        failures.append(f"ten_megabytes: {e}")
    # the same without a declared length (chunked): refused once the count passes the limit
    chunked = b"".join(b"%x\r\n" % len(big[i:i + (1 << 20)]) + big[i:i + (1 << 20)] + b"\r\n"
                       for i in range(0, len(big), 1 << 20)) + b"0\r\n\r\n"
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    got_status, got = send_raw(s.port, head, chunked)
    try:
        _check_error(got_status, got, {}, 413, "request_too_large", "larger than")
    except AssertionError as e:
        failures.append(f"ten_megabytes_chunked: {e}")
    assert not failures, "\n".join(failures)

    # still serving, with the same answers
    for _ in range(3):
        assert client.chat.completions.create(model="llama", messages=good, max_tokens=8,
                                              temperature=0).choices[0].message.content == want
    rss_after = s.rss()
    print(f"server RSS before the battery {rss_before >> 20} MiB, after {rss_after >> 20} MiB")
    assert rss_after - rss_before < 100 << 20, (rss_before >> 20, rss_after >> 20)
    metrics = s.metrics()
    assert metrics['llavakit_http_requests_total{route="/v1/chat/completions",status="400"}'] >= 30
    assert metrics["llavakit_choices_in_flight"] == 0


def _open_stream(port: int, body: dict) -> socket.socket:
    """Send a streaming request and return its socket once the first event has arrived."""
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw)
    seen = b""
    while b"data: " not in seen:
        piece = sock.recv(4096)
        assert piece, "the server closed the stream before its first event"
        seen += piece
    return sock


def test_overload_answers_429_with_retry_after(server):
    s = server("llama")
    # --max-concurrent-requests is 64 choices: eight long streams of n=8 fill it
    socks = [_open_stream(s.port, ok_request(max_tokens=3000, n=8, stream=True, ignore_eos=True)) for _ in range(8)]
    try:
        assert wait_for_metrics(s, lambda m: m["llavakit_choices_in_flight"] == 64)["llavakit_choices_in_flight"] == 64
        status, body, headers = s.post(ok_request())
        assert status == 429, body
        assert body["error"]["type"] == "rate_limit_error" and headers["retry-after"] == "1"
        assert "64" in body["error"]["message"]
    finally:
        for sock in socks:
            sock.close()
    m = wait_for_metrics(s, lambda m: m["llavakit_choices_in_flight"] == 0 and m["llavakit_running_requests"] == 0)
    assert m["llavakit_choices_in_flight"] == 0 and m["llavakit_running_requests"] == 0
    assert s.post(ok_request())[0] == 200


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_mid_request_aborts_it(server, stream):
    s = server("llama")
    before = s.metrics().get("llavakit_engine_requests_aborted", 0)
    body = ok_request(max_tokens=3000, stream=stream, ignore_eos=True)
    if stream:
        sock = _open_stream(s.port, body)  # the stream has started
    else:
        raw = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw)
        wait_for_metrics(s, lambda m: m["llavakit_running_requests"] > 0)  # generating
    sock.close()
    m = wait_for_metrics(s, lambda m: m.get("llavakit_engine_requests_aborted", 0) > before
                  and m["llavakit_choices_in_flight"] == 0 and m["llavakit_running_requests"] == 0)
    assert m.get("llavakit_engine_requests_aborted", 0) > before
    assert m["llavakit_choices_in_flight"] == 0 and m["llavakit_running_requests"] == 0
    assert s.get("/health")[0] == 200
