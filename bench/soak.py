"""A bounded soak of `llavakit serve`: thousands of mixed requests at rising concurrency, then a health check.

    python bench/soak.py --model DIR --requests 2000 --concurrency 1,2,4,8,16      # starts the server itself
    python bench/soak.py --base-url http://127.0.0.1:8000 --server-pid PID --requests 500

The requests are split evenly over the concurrency levels, run one level after the other. Each is
one of: text only, one image (from a small pool, so the image cache is hit), two images, n=2
seeded sampling, stop strings, logprobs, JSON output, streamed or not; `--bad-fraction` of them
are malformed on purpose and must get their 4xx. Reports unexpected outcomes (must be 0), the
server's RSS before, at its peak and after, latency percentiles, and, for a server it started,
its exit status after SIGTERM. Bounded: every request has a timeout and the whole run
`--max-seconds`; it exits non-zero when anything was unexpected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

from compare import portable_args
from serve import QUESTIONS, chat, launch, png_data_url, scrape, served_model, stop, summary


def _kinds(model: str, images: list[str], max_tokens: int) -> dict:
    """name -> (builder(rng) -> body, expected status)."""

    def msg(rng, k: int):
        parts = [{"type": "image_url", "image_url": {"url": rng.choice(images)}} for _ in range(k)]
        return [{"role": "user", "content": parts + [{"type": "text", "text": rng.choice(QUESTIONS)}]}]

    def body(rng, k=1, **extra):
        b = {"model": model, "messages": msg(rng, k), "max_tokens": rng.randint(1, max_tokens), "temperature": 0.0}
        b.update(extra)
        if b.get("stream"):
            b["stream_options"] = {"include_usage": True}
        return b

    return {
        "text": (lambda rng: body(rng, 0), 200),
        "image_stream": (lambda rng: body(rng, 1, stream=True), 200),
        "two_images": (lambda rng: body(rng, 2), 200),
        "n2_sampled_stream": (lambda rng: body(rng, 1, n=2, temperature=0.9, seed=rng.randrange(1 << 30),
                                               stream=True), 200),
        "stop": (lambda rng: body(rng, 1, stop=["e", "a"]), 200),
        "logprobs": (lambda rng: body(rng, 1, logprobs=True, top_logprobs=2), 200),
        "json": (lambda rng: body(rng, 0, response_format={"type": "json_object"}), 200),
        "bad_base64": (lambda rng: dict(body(rng, 0), messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]), 400),
        "bad_field": (lambda rng: dict(body(rng, 0), temprature=1), 400),
        "too_long": (lambda rng: dict(body(rng, 0), max_tokens=10**9), 400),
    }


def rss_of(pid: int | None) -> int | None:
    """Resident memory of the server process in bytes (None without psutil or a pid)."""
    if pid is None:
        return None
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:
        return None


def metrics(host: str, port: int) -> dict[str, float]:
    """Unlabelled samples of /metrics."""
    return {name: value for name, value in scrape(host, port, timeout=10).items() if "{" not in name}


async def soak(host: str, port: int, plan: list[tuple[int, str, dict, int]], timeout: float, deadline: float,
               pid: int | None) -> dict:
    """Run the plan (concurrency, kind, body, expected status) level by level; sample RSS meanwhile."""
    peak = {"rss": rss_of(pid) or 0}
    outcomes, lat, ttft, unexpected = Counter(), [], [], []

    async def sample_rss():
        while True:
            peak["rss"] = max(peak["rss"], rss_of(pid) or 0)
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_rss())
    try:
        for level in sorted({c for c, *_ in plan}):
            todo = [(k, b, s) for c, k, b, s in plan if c == level]
            gate = asyncio.Semaphore(level)
            start = time.perf_counter()

            async def one(kind, body, expected):
                async with gate:
                    if time.monotonic() > deadline:
                        outcomes["skipped (time limit)"] += 1
                        return
                    r = await chat(host, port, body, timeout)
                ok = r.status == expected and (expected != 200 or r.error is None)
                outcomes[f"{kind}: {'ok' if ok else 'UNEXPECTED'}"] += 1
                if not ok:
                    unexpected.append(f"{kind}: status {r.status}, {r.error}")
                elif expected == 200:
                    lat.append(r.latency)
                    if r.ttft is not None:
                        ttft.append(r.ttft)

            await asyncio.gather(*(one(*t) for t in todo))
            print(f"concurrency {level:>3}: {len(todo)} requests in {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        sampler.cancel()
    return {"outcomes": dict(sorted(outcomes.items())), "unexpected": unexpected, "e2e_ms": summary(lat),
            "ttft_ms": summary(ttft), "rss_peak": peak["rss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--server-pid", type=int, help="pid of the server at --base-url, for its memory")
    p.add_argument("--model", help="a checkpoint folder: start `llavakit serve` on it instead")
    p.add_argument("--server-flag", action="append", default=[], help="extra flag for the started server")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma list; requests are split evenly")
    p.add_argument("--max-tokens", type=int, default=24, help="each request asks for 1..this many")
    p.add_argument("--bad-fraction", type=float, default=0.05, help="share of deliberately malformed requests")
    p.add_argument("--image-size", default="96x72")
    p.add_argument("--timeout", type=float, default=120, help="per request, seconds")
    p.add_argument("--max-seconds", type=float, default=1800, help="the whole soak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)

    deadline = time.monotonic() + args.max_seconds
    proc, base, pid = None, args.base_url, args.server_pid
    if args.model:
        proc, base = launch(args.model, args.server_flag)
        pid = proc.pid
    exit_status = None
    try:
        url = urlsplit(base)
        host, port = url.hostname, url.port or 80
        model = served_model(host, port)
        w, h = (int(x) for x in args.image_size.lower().split("x"))
        images = [png_data_url(w, h, args.seed * 1000 + i) for i in range(8)]
        kinds = _kinds(model, images, args.max_tokens)
        good = [k for k, (_, s) in kinds.items() if s == 200]
        bad = [k for k, (_, s) in kinds.items() if s != 200]
        rng = random.Random(args.seed)
        levels = [int(c) for c in args.concurrency.split(",")]
        plan = []
        for i in range(args.requests):
            kind = rng.choice(bad if rng.random() < args.bad_fraction else good)
            build, expected = kinds[kind]
            plan.append((levels[i * len(levels) // args.requests], kind, build(rng), expected))
        # warm up (allocator pools, caches) before the memory baseline
        async def warm_up():
            return await asyncio.gather(*(chat(host, port, kinds[k][0](rng), args.timeout) for k in good))

        warm = asyncio.run(warm_up())
        if any(r.error for r in warm):
            raise SystemExit(f"warm-up failed: {[r.error for r in warm if r.error]}")
        rss_before = rss_of(pid)
        start = time.perf_counter()
        rep = asyncio.run(soak(host, port, plan, args.timeout, deadline, pid))
        rep["duration_s"] = time.perf_counter() - start
        time.sleep(1.0)  # let the last aborts and frees land
        rep["rss_before"], rep["rss_after"] = rss_before, rss_of(pid)
        m = metrics(host, port)
        rep["in_flight_after"] = m.get("llavakit_choices_in_flight")
        rep["running_after"] = m.get("llavakit_running_requests")
        if rep["in_flight_after"] or rep["running_after"]:
            rep["unexpected"].append(f"after the soak: {rep['in_flight_after']} choices in flight, "
                                     f"{rep['running_after']} running")
    finally:
        if proc is not None:
            exit_status = stop(proc)
    if proc is not None:
        rep["server_exit_status"] = exit_status
        if exit_status != 0:
            rep["unexpected"].append(f"server exit status {exit_status} after SIGTERM")

    mib = lambda b: f"{b / 2**20:.0f} MiB" if b else "n/a"  # noqa: E731
    print(f"\n{args.requests} requests in {rep['duration_s']:.1f} s at concurrency {args.concurrency}")
    for name, count in rep["outcomes"].items():
        print(f"  {name:<32} {count}")
    print(f"unexpected: {len(rep['unexpected'])}")
    for line in rep["unexpected"][:20]:
        print("  ", line)
    print(f"server RSS: before {mib(rep['rss_before'])}, peak {mib(rep['rss_peak'])}, after {mib(rep['rss_after'])}")
    for key in ("e2e_ms", "ttft_ms"):
        s = rep[key]
        print(f"{key:>7}: mean {s['mean']:9.2f}  p50 {s['p50']:9.2f}  p90 {s['p90']:9.2f}  p99 {s['p99']:9.2f}")
    if proc is not None:
        print(f"server exit status after SIGTERM: {exit_status}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": portable_args(vars(args)), **rep}, f, indent=2)
    return 1 if rep["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
