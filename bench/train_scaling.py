"""Training throughput on one process against two (torchrun, DDP and FSDP2), on the CPU, same global batch.

    python bench/train_scaling.py                        # llava-shapes, stage full, 12 steps of 16, 3 runs
    python bench/train_scaling.py --model path/to/ckpt --global-batch 8 --steps 6 --runs 1

Trains the same run (same checkpoint, data, seed and global batch) in four ways, each in fresh processes:

    1 process × 1 thread      --batch-size G
    1 process × 2 threads     --batch-size G
    2 ranks × 1 thread (DDP)  torchrun --nproc-per-node 2, --batch-size G/2
    2 ranks × 1 thread (FSDP) the same with --fsdp

and reports samples/s of the training loop (train_summary.json: steps × G / the loop's seconds, first
step included, loading and startup excluded), the wall time of the whole command, and the final
loss (equal across the four up to float summation order: the global batches hold the same examples).
Configurations alternate run by run and each figure is the median of --runs. The data is the shapes
world (make-shapes), so the default model is the shipped one trained the way it was made. Results go
to <out>/train-scaling-<model>.json and .md, with the machine's load average before and after: on a
shared machine other work skews the figures, and the file says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent

CONFIGS = {  # name -> (processes, threads each, extra flags)
    "1 process × 1 thread": (1, 1, ()),
    "1 process × 2 threads": (1, 2, ()),
    "2 ranks × 1 thread, DDP": (2, 1, ()),
    "2 ranks × 1 thread, FSDP": (2, 1, ("--fsdp",)),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(name: str, args, data: Path, out: Path) -> dict:
    """One training command; its loop throughput, wall time and losses."""
    processes, threads, extra = CONFIGS[name]
    batch = args.global_batch // processes
    train = ["train", "--model", args.model, "--data", str(data), "--out", str(out), "--overwrite",
             "--stage", args.stage, "--max-steps", str(args.steps), "--batch-size", str(batch), "--threads",
             str(threads), "--lr", "5e-4", "--seed", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    if processes == 1:
        cmd = [sys.executable, "-m", "llavakit", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "llavakit", *train]
    started = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    return {"samples_per_s": summary["samples"] / summary["seconds"], "loop_s": summary["seconds"], "wall_s": wall,
            "first_loss": summary["first_loss"], "final_loss": summary["final_loss"]}


def table(results: dict, args, load: dict) -> str:
    """The markdown report."""
    base = results["1 process × 1 thread"]["samples_per_s"]
    rows = [f"# Training throughput: 1 process against 2 ranks ({args.model}, stage {args.stage})", "",
            f"Global batch {args.global_batch} conversations, {args.steps} optimizer steps, medians of {args.runs} "
            f"run(s); CPU: {load['cpu']}, {os.cpu_count()} logical cores; torch {load['torch']}. Load average "
            f"before {load['before']}, after {load['after']} (other work on the machine skews the figures).", "",
            "| configuration | samples/s (loop) | vs 1×1 | loop s | whole command s | final loss |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base:.2f}× | {r['loop_s']:.1f} | "
                    f"{r['wall_s']:.1f} | {r['final_loss']:.6f} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-shapes", help="checkpoint to train (default: the shipped model)")
    p.add_argument("--stage", default="full", choices=("full", "lora", "projector"))
    p.add_argument("--global-batch", type=int, default=16, help="conversations per step, over all processes")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--pictures", type=int, default=96, help="shapes-world train pictures to write")
    p.add_argument("--timeout", type=float, default=900, help="seconds per command at most")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()
    if args.global_batch % 2:
        raise SystemExit("--global-batch must be even: two ranks take half each.")
    import torch

    from llavakit.train.shapes import make_shapes

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    load = {"cpu": cpu, "torch": torch.__version__, "before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    work = Path(tempfile.mkdtemp(prefix="train-scaling-"))
    try:
        make_shapes(work / "data", n=args.pictures, n_test=0, seed=0)
        samples: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        for run in range(args.runs):
            for name in CONFIGS:  # alternate, so that a slow minute hits every configuration alike
                r = run_once(name, args, work / "data" / "train.jsonl", work / "out")
                samples[name].append(r)
                print(f"run {run + 1} {name}: {r['samples_per_s']:.2f} samples/s, loop {r['loop_s']:.1f} s, "
                      f"wall {r['wall_s']:.1f} s, final loss {r['final_loss']:.6f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load["after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in samples.items()}
    stem = f"train-scaling-{Path(args.model).name}"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "stage": args.stage, "global_batch": args.global_batch, "steps": args.steps,
              "runs": args.runs, "machine": load, "results": results, "all_runs": samples}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(results, args, load)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
