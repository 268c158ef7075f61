"""Drive a running `llavakit serve` like vLLM's benchmark_serving: TTFT, TPOT, ITL, throughput.

    python bench/serve.py --base-url http://127.0.0.1:8000 --num-prompts 64 --max-concurrency 1,4,8,16
    python bench/serve.py --model DIR --num-prompts 32 --request-rate 2      # starts the server itself
    python bench/serve.py --model llava-shapes --replicas 1,2 --num-prompts 64  # one process against Ray Serve

Requests are synthetic: `--images` random images of `--image-size` plus a question, streamed
with `ignore_eos` so every answer has exactly `--max-tokens` tokens (random weights never stop by
themselves). Arrivals follow a Poisson process at `--request-rate` (inf: all at once), capped at
`--max-concurrency` in flight; a comma list of concurrencies runs one pass each. Vision tokens
(the prompt tokens images add) are measured once with a text-only twin and reported apart.

`--replicas 1,2` starts one server per count (1: the one-process server; more: `--replicas N` on
a local Ray cluster, once with media affinity and once without) and sends each the same mixed
requests: text alone, one or two images drawn from a pool of `--distinct-images` (default 8, so
pictures repeat as in conversations), answers of several lengths, streamed and whole. It reports
throughput, latency, the image-cache hit rate and the resident memory of every process.

The HTTP client is a small asyncio one (one connection per request, chunked SSE parsed by hand),
so client overhead stays small next to the server's on the same 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from compare import portable_args  # bench/compare.py: results name no machine's folders

QUESTIONS = ["What is in the picture?", "Describe the image in detail.", "What colours do you see?",
             "How many objects are there?", "Is it day or night?", "Write a caption for it."]


# ───────────────────────────── a minimal streaming HTTP client ─────────────────────────────


@dataclass
class Result:
    """One request as the client saw it. Times in seconds from sending."""

    status: int = 0
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content-bearing chunk
    latency: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    error: str | None = None  # transport failure, timeout, non-200 status or an error event


async def _read_body(reader: asyncio.StreamReader, headers: dict) -> bytes | None:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return None
    return await reader.readexactly(int(headers.get("content-length", "0")))


async def chat(host: str, port: int, body: dict, timeout: float) -> Result:
    """POST one chat completion (streamed or not) and time it; never raises."""
    r = Result()
    start = time.perf_counter()
    conn = {}

    async def exchange():
        reader, writer = conn["rw"] = await asyncio.open_connection(host, port)
        payload = json.dumps(body).encode()
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                     + payload)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        r.status = int(head[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        whole = await _read_body(reader, headers)
        if whole is not None:  # not streamed (or an error before streaming)
            _take_whole(r, whole)
        else:
            await _take_stream(r, reader, start)

    try:
        await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        r.error = f"timeout after {timeout:g} s"
    except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        r.latency = time.perf_counter() - start
        if "rw" in conn:
            conn["rw"][1].close()
    if r.error is None and r.status != 200:
        r.error = f"HTTP {r.status}"
    return r


def _take_whole(r: Result, raw: bytes) -> None:
    data = json.loads(raw)
    if "error" in data:
        r.error = f"HTTP {r.status}: {data['error'].get('message')}"
        return
    r.text = "".join(c["message"]["content"] or "" for c in data["choices"])
    r.prompt_tokens, r.completion_tokens = data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]


async def _take_stream(r: Result, reader: asyncio.StreamReader, start: float) -> None:
    buffer, texts, done = b"", [], False
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        buffer += (await reader.readexactly(size + 2))[:-2]
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            data = event.decode().removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            obj = json.loads(data)
            if "error" in obj:
                r.error = obj["error"].get("message")
                continue
            if obj.get("usage"):
                r.prompt_tokens, r.completion_tokens = obj["usage"]["prompt_tokens"], obj["usage"]["completion_tokens"]
            for choice in obj.get("choices", []):
                content = choice["delta"].get("content")
                if content:
                    now = time.perf_counter() - start
                    r.ttft = now if r.ttft is None else r.ttft
                    r.chunk_times.append(now)
                    texts.append(content)
    r.text = "".join(texts)
    if not done and r.error is None:
        r.error = "stream ended without [DONE]"


# ───────────────────────────── requests and statistics ─────────────────────────────


def png_data_url(width: int, height: int, seed: int) -> str:
    """A random RGB PNG as a data URL."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_request(model: str, question: str, images: list[str], max_tokens: int, stream: bool = True,
                 **sampling) -> dict:
    """A chat-completions body: images first, then the question."""
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": question}]
    body = {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
            "stream": stream, "temperature": 0.0, **sampling}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def summary(values: list[float], scale: float = 1000.0) -> dict:
    """mean, p50, p90, p99 (milliseconds by default) of a list; zeros when empty."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def report(results: list[Result], wall: float, vision_tokens_per_request: int) -> dict:
    """vLLM-style numbers for one pass."""
    ok = [r for r in results if r.error is None]
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    vision = vision_tokens_per_request * len(ok)
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok if r.ttft and r.completion_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": wall,
        "request_throughput": len(ok) / wall, "output_tok_s": out_tokens / wall,
        "total_tok_s": (prompt_tokens + out_tokens) / wall, "text_prompt_tok_s": (prompt_tokens - vision) / wall,
        "vision_tok_s": vision / wall, "prompt_tokens": prompt_tokens, "vision_tokens": vision,
        "output_tokens": out_tokens, "ttft_ms": summary([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": summary(tpot), "itl_ms": summary(itl), "e2e_ms": summary([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def print_report(title: str, rep: dict) -> None:
    """The report as aligned text."""
    print(f"\n=== {title} ===")
    print(f"completed {rep['completed']}, failed {rep['failed']}, duration {rep['duration_s']:.2f} s")
    print(f"request throughput {rep['request_throughput']:.2f} req/s | output {rep['output_tok_s']:.1f} tok/s | "
          f"total {rep['total_tok_s']:.1f} tok/s (text prompt {rep['text_prompt_tok_s']:.1f}, "
          f"vision {rep['vision_tok_s']:.1f}, output {rep['output_tok_s']:.1f})")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = rep[key]
        print(f"{key:>8}: mean {s['mean']:9.2f}  p50 {s['p50']:9.2f}  p90 {s['p90']:9.2f}  p99 {s['p99']:9.2f}")
    for e in rep["errors"]:
        print("error:", e)


# ───────────────────────────── a server of our own ─────────────────────────────


def launch(model: str, flags: list[str], timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Start `llavakit serve --model DIR` on a free port; returns (process, base URL) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llavakit", "serve", "--model", model, "--port", str(port), "--log-level",
           "warning", *flags]
    proc = subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if b" 200 " in c.recv(100):
                    return proc, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {timeout:g} s")


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM and wait; the exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def served_model(host: str, port: int) -> str:
    """The id in /v1/models."""
    with socket.create_connection((host, port), timeout=10) as c:
        c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        raw = b""
        while piece := c.recv(65536):
            raw += piece
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])["data"][0]["id"]


# ───────────────────────────── the benchmark ─────────────────────────────


async def run_pass(host: str, port: int, bodies: list[dict], rate: float, concurrency: int, timeout: float,
                   seed: int) -> tuple[list[Result], float]:
    """Send every body (Poisson arrivals at `rate`, at most `concurrency` in flight); results and wall time."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)

    async def one(body):
        async with gate:
            return await chat(host, port, body, timeout)

    start = time.perf_counter()
    tasks = []
    for body in bodies:
        tasks.append(asyncio.create_task(one(body)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


# ───────────────────────────── replicas: one process against Ray Serve ─────────────────────────────


def mixed_bodies(model: str, n: int, pool: list[str], max_tokens: int, seed: int) -> list[dict]:
    """n requests: a quarter text alone, half one image, a quarter two images, the images drawn from
    `pool`; answers of max_tokens / 2, max_tokens and 1.5 x max_tokens; every other one streamed."""
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        kind = i % 4
        images = [] if kind == 0 else rng.sample(pool, 2) if kind == 3 else [rng.choice(pool)]
        bodies.append(make_request(model, QUESTIONS[i % len(QUESTIONS)], images, max_tokens * (1 + i % 3) // 2,
                                   stream=i % 2 == 0, ignore_eos=True))
    return bodies


def scrape(host: str, port: int, timeout: float = 30) -> dict[str, float]:
    """The server's /metrics as {'name{label="v",...}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with socket.create_connection((host, port), timeout=timeout) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        raw = b""
        while piece := c.recv(65536):
            raw += piece
    out = {}
    for family in text_string_to_metric_families(raw.split(b"\r\n\r\n", 1)[1].decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def replica_memory(metrics: dict[str, float]) -> list[float]:
    """Resident memory of each replica in MB, from the replicated server's /metrics."""
    return sorted(v / 2**20 for k, v in metrics.items() if k.startswith("llavakit_replica_resident_memory_bytes{"))


def run_replicas(args, counts: list[int]) -> dict:
    """One server per replica count (and affinity setting), the same mixed requests to each; the reports."""
    import psutil

    w, h = (int(x) for x in args.image_size.lower().split("x"))
    concurrency = int(args.max_concurrency.split(",")[0])
    runs = {}
    for n in counts:
        for affinity in ((True, False) if n > 1 else (True,)):
            flags = list(args.server_flag)
            if n > 1:
                flags += ["--replicas", str(n)] + ([] if affinity else ["--no-media-affinity"])
            name = "one process" if n == 1 else f"{n} replicas, {'media affinity' if affinity else 'by load only'}"
            started = time.perf_counter()
            proc, base = launch(args.model, flags)
            startup = time.perf_counter() - started
            try:
                url = urlsplit(base)
                host, port = url.hostname, url.port
                model = served_model(host, port)
                # warm-up: the first request of each replica pays for lazy initialisation
                warm = [make_request(model, QUESTIONS[0], [png_data_url(w, h, 10**6 + i)], 4, False)
                        for i in range(2 * n)]
                asyncio.run(run_pass(host, port, warm, float("inf"), 2 * n, args.timeout, args.seed))
                before = scrape(host, port)
                results, wall = [], 0.0
                for rerun in range(args.repeat):  # each pass with pictures of its own: caches start cold
                    pool = [png_data_url(w, h, (args.seed * 1000 + rerun) * 100_003 + i)
                            for i in range(args.distinct_images or 8)]
                    bodies = mixed_bodies(model, args.num_prompts, pool, args.max_tokens, args.seed + rerun)
                    got, took = asyncio.run(run_pass(host, port, bodies, args.request_rate, concurrency, args.timeout,
                                                     args.seed))
                    results, wall = results + got, wall + took
                time.sleep(1.5)  # the replicas' last requests finish their bookkeeping
                after = scrape(host, port)
                rep = report(results, wall, 0)

                def grew(name: str) -> float:
                    return after.get(name, 0.0) - before.get(name, 0.0)

                hits, misses = grew("llavakit_image_cache_hits_total"), grew("llavakit_image_cache_misses_total")
                rep.update(startup_s=startup, image_cache_hits=hits, image_cache_misses=misses,
                           image_cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
                           vision_s=grew("llavakit_vision_seconds_total"),
                           prefix_hit_tokens=grew("llavakit_prefix_cache_hit_tokens_total"),
                           server_rss_mb=psutil.Process(proc.pid).memory_info().rss / 2**20,
                           replica_rss_mb=replica_memory(after))
            finally:
                status = stop(proc)
            rep["exit_status"] = status
            runs[name] = rep
            print_report(f"{name}: {args.repeat} x {args.num_prompts} mixed requests, max concurrency {concurrency}",
                         rep)
            print(f"image cache {hits:.0f} hits / {misses:.0f} misses ({rep['image_cache_hit_rate']:.0%}); vision "
                  f"{rep['vision_s']:.2f} s; prefix-cache hits {rep['prefix_hit_tokens']:.0f} tokens; "
                  f"server RSS {rep['server_rss_mb']:.0f} MB; replicas "
                  f"{', '.join(f'{m:.0f}' for m in rep['replica_rss_mb']) or '-'} MB; ready in {startup:.1f} s; "
                  f"exit status {status}")
    print("\n| server | requests/s | output tok/s | TTFT p50 (ms) | E2E p50 (ms) | image-cache hit rate | "
          "vision (s) | prefix-cache hit tokens | RSS (MB): front or server + replicas |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rep in runs.items():
        memory = " + ".join([f"{rep['server_rss_mb']:.0f}"] + [f"{m:.0f}" for m in rep["replica_rss_mb"]])
        print(f"| {name} | {rep['request_throughput']:.2f} | {rep['output_tok_s']:.1f} | {rep['ttft_ms']['p50']:.0f} | "
              f"{rep['e2e_ms']['p50']:.0f} | {rep['image_cache_hit_rate']:.0%} | {rep['vision_s']:.2f} | "
              f"{rep['prefix_hit_tokens']:.0f} | {memory} |")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="a checkpoint folder: start `llavakit serve` on it instead of using --base-url")
    p.add_argument("--server-flag", action="append", default=[], help="extra flag for the started server")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (inf: at once)")
    p.add_argument("--max-concurrency", default="16", help="in-flight cap, or a comma list for one pass each")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--image-size", default="336x336", help="WxH of the synthetic images")
    p.add_argument("--distinct-images", type=int, default=0, help="0: every request its own image; n: reuse n")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the reports here")
    p.add_argument("--replicas", help="with --model: a comma list of replica counts, one server each, mixed requests "
                   "(see above)")
    p.add_argument("--repeat", type=int, default=1, help="--replicas: passes per server, each with new pictures")
    args = p.parse_args(argv)
    if args.replicas:
        if not args.model:
            raise SystemExit("--replicas starts its own servers: give --model")
        runs = run_replicas(args, [int(c) for c in args.replicas.split(",")])
        if args.json:
            Path(args.json).write_text(json.dumps({"args": portable_args(vars(args)), "reports": runs}, indent=2, default=str))
        return 1 if any(r["failed"] or r["exit_status"] for r in runs.values()) else 0

    proc = None
    base = args.base_url
    if args.model:
        proc, base = launch(args.model, args.server_flag)
    try:
        url = urlsplit(base)
        host, port = url.hostname, url.port or 80
        model = served_model(host, port)
        w, h = (int(x) for x in args.image_size.lower().split("x"))
        pool = max(args.distinct_images, 0)
        urls = [png_data_url(w, h, args.seed * 100_003 + i) for i in range(pool)] if pool else []

        def images_for(i: int, run: int = 0) -> list[str]:
            # Without a pool every request of every pass has fresh images: no pass warms the next one's caches.
            return [urls[(i * args.images + k) % pool] if pool else
                    png_data_url(w, h, (args.seed * 1000 + run) * 100_003 + i * args.images + k)
                    for k in range(args.images)]

        # vision tokens: the prompt tokens an image adds (same question with and without images)
        probe = asyncio.run(chat(host, port, make_request(model, QUESTIONS[0], images_for(0), 1, False), args.timeout))
        plain = asyncio.run(chat(host, port, make_request(model, QUESTIONS[0], [], 1, False), args.timeout))
        if probe.error or plain.error:
            raise SystemExit(f"probe request failed: {probe.error or plain.error}")
        vision = probe.prompt_tokens - plain.prompt_tokens
        reports = {}
        for run, conc in enumerate(int(c) for c in args.max_concurrency.split(",")):
            bodies = [make_request(model, QUESTIONS[i % len(QUESTIONS)], images_for(i, run + 1), args.max_tokens, True,
                                   ignore_eos=True) for i in range(args.num_prompts)]
            results, wall = asyncio.run(run_pass(host, port, bodies, args.request_rate, conc, args.timeout, args.seed))
            rep = report(results, wall, vision)
            reports[f"concurrency={conc}"] = rep
            print_report(f"{args.num_prompts} requests, {args.images} image(s) {args.image_size} "
                         f"(+{vision} vision tokens each), {args.max_tokens} output tokens, rate {args.request_rate}, "
                         f"max concurrency {conc}", rep)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": portable_args(vars(args)), "reports": reports}, indent=2, default=str))
        failed = sum(r["failed"] for r in reports.values())
    finally:
        if proc is not None:
            stop(proc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
