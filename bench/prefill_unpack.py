"""Prefill with int8/int4 weights: unpacking the tiles natively against PyTorch's unpacking.

A prompt of many rows multiplies by dequantised float32 weights (the tile kernels are for a few
rows); this times a --prefill-tokens prompt through the engine with each way of unpacking, the
two alternated, and writes the medians to bench/results/prefill-unpack-<preset>.md.

    python bench/prefill_unpack.py [--pairs int8,int4] [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from compare import cached_checkpoint  # noqa: E402
from llamacpp import LlavakitEngine, machine_info  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b")
    p.add_argument("--pairs", default="int8,int4")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill-tokens", type=int, default=1536)
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()

    import numpy as np

    from llavakit.model import quant

    ckpt = cached_checkpoint(args.cache, args.preset, None, "bfloat16")
    vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    ids = np.random.default_rng(0).integers(300, min(vocab, 20000), args.prefill_tokens).tolist()
    native = quant.native
    off = types.SimpleNamespace(library=lambda: None)  # quant.py's unpacking only: the kernels stay
    rows = []
    for pair in [x.strip() for x in args.pairs.split(",") if x.strip()]:
        engine = LlavakitEngine.load(ckpt, pair, args.threads)
        engine.prefill(ids[:64])  # warm-up
        times = {"pytorch": [], "native": []}
        for _ in range(args.runs):
            for way in times:
                quant.native = native if way == "native" else off
                times[way].append(engine.prefill(ids))
        quant.native = native
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"pair": pair, **{f"{k}_s": round(v, 3) for k, v in med.items()}, "runs": times,
               "speedup": round(med["pytorch"] / med["native"], 3)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del engine
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"prefill-unpack-{args.preset}"
    info = machine_info(args.threads)
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": info, "prefill_tokens": args.prefill_tokens,
                                                     "rows": rows}, indent=2) + "\n")
    lines = [f"# Prefill of {args.prefill_tokens} tokens, {args.preset}, {args.threads} threads "
             f"(medians of {args.runs}, alternated)", "",
             "| weights | PyTorch unpacking (s) | native unpacking (s) | speed-up |", "|---|---|---|---|"]
    lines += [f"| {r['pair']} | {r['pytorch_s']} | {r['native_s']} | {r['speedup']}x |" for r in rows]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
