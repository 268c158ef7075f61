"""What `detail: low` saves on one 1024x768 picture: image tokens, time to first token, memory.

    python bench/detail.py                          # the 0.5B OneVision preset, random weights
    python bench/detail.py --model llava-shapes     # the shipped model (seconds, not minutes)

Each run is a cold request (feature and prefix caches cleared) asking one question about the
picture and generating one token, so the time is the tower plus the prefill. Runs alternate
auto, low, auto, low, ...; medians are reported. Writes <out>/detail-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from compare import _rss_mb, cached_checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or llava-shapes (default: the random preset below)")
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--runs", type=int, default=3, help="timed runs per detail (medians are reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--size", default="1024x768", help="picture width x height")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    args = p.parse_args()

    import torch
    from PIL import Image

    import llavakit
    torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        model = str(cached_checkpoint(args.cache, args.preset, None, args.dtype))
    vlm = llavakit.load(model, dtype=args.dtype)
    w, h = (int(x) for x in args.size.split("x"))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    params = llavakit.SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)

    def conv(detail):
        return [{"role": "user", "content": [{"type": "image", "image": picture, "detail": detail},
                                             {"type": "text", "text": "Describe the picture."}]}]

    def cold(detail) -> float:
        vlm.engine.clear_caches()
        start = time.perf_counter()
        vlm.chat(conv(detail), sampling=params)
        return time.perf_counter() - start

    details = ("auto", "low")
    res = {d: {"layout": vlm.image_layout(picture, d), "seconds": []} for d in details}
    for d in details:
        cold(d)  # warm-up
    for _ in range(args.runs):
        for d in details:
            res[d]["seconds"].append(cold(d))
    for d in details:
        res[d]["median_s"] = statistics.median(res[d]["seconds"])
    out = {
        "model": Path(model).name, "picture": args.size, "threads": args.threads, "dtype": args.dtype,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "runs": args.runs,
        "details": res, "speedup_low": res["auto"]["median_s"] / res["low"]["median_s"],
        "peak_rss_mb": _rss_mb(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"detail-{out['model']}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# `detail` on a {args.size} picture: {out['model']}, {args.dtype}, {args.threads} threads",
             "", "Cold request (caches cleared), one question, one generated token; medians of "
             f"{args.runs} alternating runs.", "",
             "| detail | tiles | image tokens | time to first token (s) |", "|---|---|---|---|"]
    for d in details:
        lay = res[d]["layout"]
        lines.append(f"| {d} | {lay['tiles']} | {lay['tokens']} | {res[d]['median_s']:.2f} |")
    lines += ["", f"`low` answers {out['speedup_low']:.1f}x sooner."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
