"""`llavakit serve --replicas 2` on Ray Serve, with the shipped model: the same answers, streams, errors
and page as one process; requests about one image stay on one replica; a replica killed with SIGKILL
costs only its own requests and is replaced; SIGTERM cuts streams and stops the local Ray cluster.

One server (and the local Ray cluster it starts and stops) serves the whole module: Ray is slow to
start on two cores. The tests run in file order: the SIGKILL test leaves a replica to be replaced
while the next ones run, and the last one stops the server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from server_helpers import Server, image_message, start_replicated, stream_raw, local_message, png_bytes, wait_for_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAME = "llava-shapes"
START_TIMEOUT_S = 300  # Ray and two replicas on a busy 2-core machine
REPLACE_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """A `llavakit serve --replicas 2` of the shipped model on its own local Ray cluster."""
    log = tmp_path_factory.mktemp("replicas") / "server.log"
    # A drain shorter than _long_stream: the shipped model writes its 1,900 tokens in about a second now.
    s = start_replicated(NAME, NAME, ["--replicas", "2", "--shutdown-timeout", "0.3"], log, START_TIMEOUT_S)
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.fixture(scope="module")
def shipped():
    """The shipped model in this process, for reference answers."""
    import llavakit
    import torch

    return llavakit.load(NAME, dtype=torch.float32)


def _replicas(s: Server) -> dict[str, int]:
    """{replica id: pid} of the replicas reporting in /metrics."""
    status, body = s.get("/metrics")
    assert status == 200
    return {m[1]: int(m[0]) for m in re.findall(
        r'llavakit_replica_resident_memory_bytes\{node="[^"]*",pid="(\d+)",replica="([^"]+)"\}', body.decode())}


def _stream(s: Server, body: dict, out: dict, started: threading.Event) -> None:
    """POST a streamed request; out["text"] is the raw body, `started` is set at the first content event."""
    out["text"] = stream_raw(s.port, json.dumps(body).encode(), started, rb'"content":"[^"]', 60).decode(errors="replace")
    started.set()


def _long_stream(image: bytes) -> dict:
    return {"model": NAME, "messages": image_message("Describe the picture in one sentence.", image),
            "max_tokens": 1900, "ignore_eos": True, "temperature": 0, "stream": True}  # about a second of decoding


# ───────────────────────────── routing, metrics and flags, without Ray ─────────────────────────────


def test_rank_is_stable_and_a_removed_replica_moves_only_its_own_keys():
    from llavakit.server.replicas import rank

    keys = [f"key{i}" for i in range(300)]
    three = {k: rank(k, ["a", "b", "c"]) for k in keys}
    assert all(sorted(r) == ["a", "b", "c"] and rank(k, ["c", "a", "b"]) == r for k, r in three.items())
    firsts = [r[0] for r in three.values()]
    assert all(firsts.count(x) > 60 for x in "abc")  # spread, not piled on one replica
    for k, r in three.items():
        without_b = rank(k, ["a", "c"])
        assert without_b == [x for x in r if x != "b"]  # b's keys go to their second choice, no other key moves


def test_affinity_key_is_a_hash_of_the_first_image_or_video_url():
    from llavakit.server.front import affinity_key

    def body(*parts, text="Hi"):
        return json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            *parts, {"type": "text", "text": text}]}]}).encode()

    one = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    two = {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}}
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    assert affinity_key(body(one)) == affinity_key(body(one, two, text="Other")) != affinity_key(body(two, one))
    assert len(affinity_key(body(one))) == 32 and affinity_key(body(video)) != affinity_key(body(one))
    assert affinity_key(body()) == affinity_key(b"{not json") == affinity_key(b'{"messages": 3}') == ""


def test_merged_metrics_add_replicas_up_and_drop_gone_replicas_gauges():
    from prometheus_client.parser import text_string_to_metric_families

    from llavakit.server.front import FrontMetrics, ReplicaReport
    from llavakit.server.metrics import Metrics

    def replica(hits, misses, running, requests):
        m = Metrics(lambda: {"image_cache_hits": hits, "image_cache_misses": misses, "requests_running": running})
        m.ttft.observe(0.2)
        m.requests.labels("/v1/chat/completions", "200").inc(requests)
        return m.render().decode()

    front = FrontMetrics()
    front.requests.labels("/v1/chat/completions", "200").inc(7)
    reports = [ReplicaReport("r1", 11, "10.0.0.1", 300 << 20, replica(3, 1, 2, 4), 0.5),
               ReplicaReport("r2", 12, "10.0.0.2", 200 << 20, replica(1, 3, 5, 3), 0.5),
               ReplicaReport("gone", 13, "10.0.0.3", 100 << 20, replica(4, 0, 9, 9), 60.0)]
    samples = {}
    for family in text_string_to_metric_families(front.render(reports).decode()):
        for x in family.samples:
            samples[x.name + json.dumps(x.labels, sort_keys=True)] = x.value
    assert samples['llavakit_image_cache_hits_total{}'] == 8  # counters: every replica, the gone one too
    assert samples['llavakit_image_cache_hit_rate{}'] == 8 / 12
    assert samples['llavakit_running_requests{}'] == 7  # gauges: replicas that still report
    assert samples['llavakit_time_to_first_token_seconds_count{}'] == 3
    assert samples['llavakit_http_requests_total{"route": "/v1/chat/completions", "status": "200"}'] == 7  # the front's
    assert samples['llavakit_replicas{}'] == 2
    assert samples['llavakit_replica_resident_memory_bytes{"node": "10.0.0.1", "pid": "11", "replica": "r1"}'] == \
        300 << 20
    assert not any('"gone"' in k for k in samples)


def test_replica_options_and_serve_flags_refuse_what_cannot_run(capsys):
    from llavakit.cli import main
    from llavakit.errors import ConfigError
    from llavakit.server.replicas import ReplicaOptions

    for kwargs, message in [
            (dict(replicas=0), "--replicas must be 1 or more, got 0."),
            (dict(min_replicas=1), "--min-replicas needs --max-replicas"),
            (dict(replicas=3, max_replicas=2), "autoscaling needs --min-replicas <= --replicas <= --max-replicas"),
            (dict(num_cpus_per_replica=0), "--num-cpus-per-replica must be > 0")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            ReplicaOptions(**kwargs)
    assert ReplicaOptions(replicas=2, min_replicas=0, max_replicas=4).most == 4
    assert main(["serve", "--num-gpus-per-replica", "1"]) == 2
    assert "apply to replicas on Ray Serve: add --replicas N" in capsys.readouterr().err


# ───────────────────────────── a live replicated server ─────────────────────────────


def test_greedy_answers_equal_one_process(replicated, shipped):
    picture, two = (EXAMPLES / "picture.png").read_bytes(), (EXAMPLES / "two-shapes.png").read_bytes()
    client = replicated.client()
    for text, images in [("Describe the picture in one sentence.", [picture]),
                         ("Are the two pictures the same?", [picture, two]),
                         ("How many shapes are there?", [two])]:
        r = client.chat.completions.create(model=NAME, messages=image_message(text, *images), max_tokens=24,
                                           temperature=0)
        want = shipped.chat(local_message(text, *images), max_new_tokens=24, temperature=0)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want.text, want.finish_reason)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
                                       temperature=0)  # no media: routed by load
    want = shipped.chat([{"role": "user", "content": "Hello"}], max_new_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text


def test_stream_equals_whole_answer_and_ends_with_done(replicated):
    messages = image_message("What colour is the square?", (EXAMPLES / "picture.png").read_bytes())
    client = replicated.client()
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    status, raw, headers = replicated.request("POST", "/v1/chat/completions", json.dumps(
        {"model": NAME, "messages": messages, "max_tokens": 3, "stream": True}).encode(),
        {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_requests_about_one_image_stay_on_one_replica(replicated):
    def cache(m: dict) -> tuple[float, float]:
        return m["llavakit_image_cache_hits_total"], m["llavakit_image_cache_misses_total"]

    assert len(_replicas(replicated)) == 2
    hits, misses = cache(replicated.metrics())
    image = png_bytes(40, 30, seed=1234)
    for question in ("What is in the picture?", "What colours do you see?", "How many shapes?", "Where is it?"):
        status, body, _ = replicated.post({"model": NAME, "messages": image_message(question, image), "max_tokens": 2})
        assert status == 200, body
    # Four requests, one image: encoded once, by the replica all four went to (metrics are read from the
    # replicas on each scrape; one slow to answer keeps its last report a moment).
    want = (hits + 3, misses + 1)
    assert cache(wait_for_metrics(replicated, lambda m: cache(m) == want)) == want


def test_errors_limits_guard_page_and_metrics_as_one_process(replicated):
    s = replicated
    assert s.get("/health") == (200, b'{"status":"ok"}')
    status, body = s.get("/v1/models")
    card = json.loads(body)["data"][0]
    assert (status, card["id"], card["family"]) == (200, NAME, "LLaVA-OneVision")
    status, body = s.get("/")
    assert status == 200 and b"<!doctype html>" in body
    status, body, _ = s.post({"model": NAME, "messages": image_message("Hi", b"not an image"), "max_tokens": 2})
    assert (status, body["error"]["code"]) == (400, "invalid_image")
    status, body, _ = s.post({"model": "other", "messages": [{"role": "user", "content": "Hi"}]})
    assert (status, body["error"]["code"]) == (404, "model_not_found")
    status, body, _ = s.post({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "tools": []})
    assert status == 400 and body["error"]["param"] == "tools"
    status, raw, _ = s.request("POST", "/v1/chat/completions", b"{}", {"Content-Type": "application/json",
                                                                       "Content-Length": str(64 << 20)})
    assert (status, json.loads(raw)["error"]["code"]) == (413, "request_too_large")  # refused by the front
    status, raw, _ = s.request("GET", "/v1/models", headers={"Host": "evil.example"})
    assert (status, json.loads(raw)["error"]["code"]) == (400, "invalid_host")
    status, raw, _ = s.request("POST", "/v1/chat/completions", b"x", {"Content-Type": "text/plain"})
    assert status == 415
    m = s.metrics()
    assert m["llavakit_replicas"] == 2
    assert m['llavakit_http_requests_total{route="/v1/chat/completions",status="413"}'] == 1
    assert m['llavakit_http_requests_total{route="/v1/chat/completions",status="400"}'] >= 2
    assert m["llavakit_time_to_first_token_seconds_count"] > 0  # the replicas' own metrics, added up
    assert "llavakit_image_cache_hit_rate" in m and "llavakit_running_requests" in m


def test_sigkill_costs_only_the_requests_of_that_replica(replicated):
    from llavakit.server.front import affinity_key
    from llavakit.server.replicas import rank

    before = _replicas(replicated)
    assert len(before) == 2
    # One long stream on each replica (the router's choice for each image, computed as it computes it).
    bodies = {}
    for seed in range(100):
        body = _long_stream(png_bytes(32, 32, seed=seed))
        first = rank(affinity_key(json.dumps(body).encode()), list(before))[0]
        bodies.setdefault(first, body)
        if len(bodies) == 2:
            break
    victim, survivor = list(bodies)
    bodies[survivor]["max_tokens"] = 200  # it only has to outlive the kill
    outs, events, threads = {}, {}, []
    for replica, body in bodies.items():
        outs[replica], events[replica] = {}, threading.Event()
        threads.append(threading.Thread(target=_stream, args=(replicated, body, outs[replica], events[replica])))
        threads[-1].start()
    assert all(e.wait(60) for e in events.values()), outs
    os.kill(before[victim], signal.SIGKILL)
    for t in threads:
        t.join(90)
    cut, whole = outs[victim]["text"], outs[survivor]["text"]
    assert '"code":"overloaded"' in cut and "replica answering this request stopped" in cut, cut[-400:]
    assert cut.index('"code":"overloaded"') < cut.index("data: [DONE]")
    assert '"finish_reason":"length"' in whole and "data: [DONE]" in whole and '"error":' not in whole, whole[-400:]
    # The router has dropped the dead replica: new requests, with or without images, are answered.
    for messages in [image_message("Hi", png_bytes(20, 20, seed)) for seed in range(3)] + [
            [{"role": "user", "content": "Hi"}]]:
        status, body, _ = replicated.post({"model": NAME, "messages": messages, "max_tokens": 2})
        assert status == 200, body


def test_killed_replica_is_replaced_and_sigterm_stops_everything(replicated):
    s = replicated
    deadline = time.monotonic() + REPLACE_TIMEOUT_S
    while True:
        running = _replicas(s)
        fresh = [pid for pid in running.values() if psutil.pid_exists(pid)]
        if len(fresh) == 2:
            break
        assert time.monotonic() < deadline, f"no replacement replica within {REPLACE_TIMEOUT_S} s: {running}"
        time.sleep(1)
    status, body, _ = s.post({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert status == 200, body

    ray_processes = psutil.Process(s.proc.pid).children(recursive=True)  # gcs, raylet, the replicas, ...
    assert {p.pid for p in ray_processes} >= set(fresh)
    out, started = {}, threading.Event()
    stream = threading.Thread(target=_stream, args=(s, _long_stream(png_bytes(24, 24, seed=7)), out, started))
    stream.start()
    assert started.wait(60)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0, s.log_tail()
    stream.join(10)
    cut = out["text"]
    assert '"code":"overloaded"' in cut and "shutting down" in cut, cut[-400:]
    assert cut.index('"code":"overloaded"') < cut.index("data: [DONE]") and cut.endswith("\r\n0\r\n\r\n")
    gone_by = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ray_processes) \
            and time.monotonic() < gone_by:
        time.sleep(0.2)
    left = [p.pid for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after SIGTERM: {left}"
    assert time.monotonic() - t0 < 30
