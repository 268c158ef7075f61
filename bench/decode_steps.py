"""What each piece of llavakit's CPU decode path gives, measured side by side.

    python bench/decode_steps.py                  # the 0.5B OneVision preset, bf16 / int8 / int4, 2 threads
    python bench/decode_steps.py --pairs int4 --runs 3

For each format it times batch-1 decoding (--decode-tokens tokens after a --prompt-tokens prompt,
end-of-sequence ignored, prefill excluded) in three configurations, alternating run by run:

- pytorch: no native library (LLAVAKIT_NATIVE=0): PyTorch's kernels, one operation at a time
  (bf16 only: without the library a quantised layer dequantises its weight for every product,
  which no one would choose for decoding);
- kernels: llavakit's native matrix-vector kernels for every linear layer, the rest of the step
  in PyTorch operations;
- fused: the whole single-token step of the decoder in one native call (the default).

Each configuration runs in its own worker process; medians are written to
bench/results/decode-steps-<preset>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from compare import portable_args  # noqa: E402
from llamacpp import LlavakitEngine, machine_info  # noqa: E402

CONFIGS = ("pytorch", "kernels", "fused")


def worker(args) -> int:
    engine = LlavakitEngine.load(Path(args.ckpt), args.pair, args.threads)
    if args.worker == "kernels":
        engine.vlm.model.language_model.fused_decode = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        print(json.dumps({"result": engine.decode(cmd["ids"], cmd["n"])}), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b")
    p.add_argument("--pairs", default="bf16,int8,int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--pair", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from llamacpp import Worker

    ckpt = args.cache / f"{args.preset}-all-bfloat16"
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"{ckpt} is missing: run bench/llamacpp.py once (it builds the preset)")
    vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    prompt = np.random.default_rng(0).integers(300, min(vocab, 20000), args.prompt_tokens).tolist()
    results, machine = {}, machine_info(args.threads)
    for pair in [x.strip() for x in args.pairs.split(",") if x.strip()]:
        configs = CONFIGS if pair == "bf16" else CONFIGS[1:]
        workers = {}
        for config in configs:
            argv = [sys.executable, __file__, "--worker", config, "--pair", pair, "--ckpt", str(ckpt),
                    "--threads", str(args.threads)]
            env = dict(os.environ, **({"LLAVAKIT_NATIVE": "0"} if config == "pytorch" else {}))
            workers[config] = Worker(argv, env=env)
        times = {c: [] for c in configs}
        for w in workers.values():
            w.ask(ids=prompt, n=args.decode_tokens)  # warm-up
        for i in range(args.runs):
            order = configs if i % 2 == 0 else configs[::-1]
            for config in order:
                times[config].append(workers[config].ask(ids=prompt, n=args.decode_tokens))
        for w in workers.values():
            w.close()
        results[pair] = {c: {"tok_s": 1 / statistics.median(t), "step_s_all": t} for c, t in times.items()}
        print(pair, {c: round(r["tok_s"], 1) for c, r in results[pair].items()}, file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decode-steps-{args.preset}"
    stem.with_name(stem.name + ".json").write_text(json.dumps({"machine": machine, "args": portable_args(vars(args)),
                                                               "results": results}, indent=2, default=str))
    lines = [f"Batch-1 decode, tokens/s — {machine['cpu']}, {args.threads} threads; medians of {args.runs} "
             "alternating runs", "", "| format | pytorch | kernels | fused |", "|---|---|---|---|"]
    for pair, r in results.items():
        cells = [f"{r[c]['tok_s']:.1f}" if c in r else "—" for c in CONFIGS]
        lines.append(f"| {pair} | {' | '.join(cells)} |")
    stem.with_name(stem.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
