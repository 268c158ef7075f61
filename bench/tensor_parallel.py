"""Tensor parallelism on a CPU, measured: one process against N ranks sharing the same cores.

    python bench/tensor_parallel.py speed                    # the 0.5B OneVision preset, bf16, 2 cores
    python bench/tensor_parallel.py speed --layers 8 --runs 3
    python bench/tensor_parallel.py memory --ckpt DIR        # resident memory after load, 1 process vs 2 ranks
    python bench/tensor_parallel.py sizes                    # docs/multiple-devices.md's table (no weights read)

speed: batch-1 decode (--decode-tokens after a --prompt-tokens prompt, prefill excluded, tokens/s)
and a --prefill-tokens prefill (seconds) through llavakit's engine, for `1x2` (one process, 2
threads: the native fused decode step) and `2x1` (2 ranks of 1 thread: gloo all-reduces, the
PyTorch step with the native linear kernels); each configuration in its own process, runs
alternating, medians. Results: bench/results/tensor-parallel-<preset>.json and .md.

memory: each configuration loads --ckpt in a fresh process and reports VmRSS after load (and after
one 16-token forward, when every weight page has been touched) for rank 0 and each other rank.
Results: bench/results/tensor-parallel-memory.json and .md.

sizes: for published checkpoints (their config.json values, below), what each rank of a
tensor-parallel split holds, from the model built on the meta device and split by llavakit's own
plan: weights, KV cache per 1,000 tokens, image tokens of a 1024x768 photo, and the fewest ranks
that fit on GPUs of 24, 48 and 80 GB (see `fits`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent), str(ROOT)]

from compare import cached_checkpoint, portable_args  # noqa: E402
from llamacpp import LlavakitEngine, Worker, machine_info  # noqa: E402

from llavakit.families.base import CLIP_L14_336  # noqa: E402
from llavakit.families.llava_onevision import SIGLIP_SO400M_MINUS_ONE  # noqa: E402

SPEED_CONFIGS = {"1x2": (1, 2), "2x1": (2, 1)}  # name -> (ranks, threads per rank)


def _rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """Resident (VmRSS) or peak resident (VmHWM) memory of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def speed_worker(args) -> int:
    import torch

    import llavakit

    torch.set_num_threads(args.threads * args.tp)  # load() gives each of the tp ranks its share
    vlm = llavakit.load(args.ckpt, dtype=torch.bfloat16, tensor_parallel_size=args.tp)
    engine = LlavakitEngine(vlm)
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["what"] == "ping":
            result = _ping_s(vlm.parallel) if vlm.parallel is not None else None
        elif cmd["what"] == "decode":
            result = engine.decode(cmd["ids"], cmd["n"])
        else:
            result = engine.prefill(cmd["ids"])
        print(json.dumps({"result": result}), flush=True)
    vlm.close()
    return 0


def _ping_s(driver, n: int = 200) -> float:
    """Median seconds of one heartbeat (a command header broadcast and a one-number all-reduce): the
    latency each of a decode step's collectives pays, about 2 per layer."""
    from llavakit.parallel import channel

    times = []
    with driver.lock:
        for _ in range(n):
            t = time.perf_counter()
            channel.send(driver.comm, channel.PING)
            driver.comm.ping()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_worker(args) -> int:
    import torch

    import llavakit

    vlm = llavakit.load(args.ckpt, tensor_parallel_size=args.tp)
    pids = [os.getpid()] + [p.pid for p in (vlm.parallel.workers if vlm.parallel else [])]
    after_load = [_rss_mb(p) for p in pids]
    ids = torch.tensor([[300 + i for i in range(16)]])
    vlm.forward(llavakit.Batch(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=None,
                               image_counts=(0,)))
    after_forward = [_rss_mb(p) for p in pids]
    peak = [_rss_mb(p, "VmHWM") for p in pids]
    print(json.dumps({"after_load_mb": after_load, "after_forward_mb": after_forward, "peak_mb": peak}), flush=True)
    vlm.close()
    return 0


def run_speed(args) -> int:
    ckpt = cached_checkpoint(args.cache, args.preset, args.layers, "bfloat16")
    vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    rng = np.random.default_rng(0)
    prompt = rng.integers(300, min(vocab, 20000), args.prompt_tokens).tolist()
    long_prompt = rng.integers(300, min(vocab, 20000), args.prefill_tokens).tolist()
    machine = machine_info(2)
    workers = {}
    for name, (tp, threads) in SPEED_CONFIGS.items():
        argv = [sys.executable, __file__, "_speed", "--ckpt", str(ckpt), "--tp", str(tp), "--threads", str(threads)]
        workers[name] = Worker(argv, env=dict(os.environ, OMP_NUM_THREADS=str(tp * threads)))
    decode = {c: [] for c in workers}
    prefill = {c: [] for c in workers}
    load_before = os.getloadavg()[0]  # other processes on the cores change both sides' numbers
    for w in workers.values():  # warm-up
        w.ask(what="decode", ids=prompt, n=4)
        w.ask(what="prefill", ids=long_prompt[:64])
    for i in range(args.runs):
        for name in (list(workers) if i % 2 == 0 else list(workers)[::-1]):
            decode[name].append(workers[name].ask(what="decode", ids=prompt, n=args.decode_tokens))
            prefill[name].append(workers[name].ask(what="prefill", ids=long_prompt))
    ping = workers["2x1"].ask(what="ping")
    for w in workers.values():
        w.close()
    load_after = os.getloadavg()[0]
    results = {c: {"decode_tok_s": 1 / statistics.median(decode[c]), "prefill_s": statistics.median(prefill[c]),
                   "decode_step_s_all": decode[c], "prefill_s_all": prefill[c]} for c in workers}
    stem = args.out / f"tensor-parallel-{args.preset}{'-' + str(args.layers) + 'l' if args.layers else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(
        {"machine": machine, "args": portable_args(vars(args)),
         "load_average": [load_before, load_after], "heartbeat_s": ping, "results": results}, indent=2))
    lines = [f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}, bf16 — {machine['cpu']}; medians "
             f"of {args.runs} alternating runs; 1-minute load average {load_before:.1f} before, {load_after:.1f} after; "
             f"one gloo heartbeat between the 2 ranks (a broadcast and an all-reduce) {ping * 1e3:.2f} ms", "",
             f"| configuration | decode, tok/s (batch 1, {args.prompt_tokens}-token prompt) | "
             f"prefill of {args.prefill_tokens} tokens, s |", "|---|---|---|"]
    for name, r in results.items():
        tp, threads = SPEED_CONFIGS[name]
        label = "1 process, 2 threads" if tp == 1 else f"{tp} ranks x {threads} thread"
        lines.append(f"| {label} | {r['decode_tok_s']:.2f} | {r['prefill_s']:.2f} |")
    stem.with_name(stem.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


_LLAMA = dict(model_type="llama", rms_norm_eps=1e-5)
_QWEN2 = dict(model_type="qwen2", rms_norm_eps=1e-6)
_CLIP = CLIP_L14_336  # the towers as the families define them
_SIGLIP = SIGLIP_SO400M_MINUS_ONE
_VIDEO = dict(model_type="llava_next_video", spatial_pool_mode="average", spatial_pool_stride=2)
# name -> (top-level config, text config); the published checkpoints' values
PUBLISHED = {
    "llava-1.5-7b-hf": ({"model_type": "llava", "vision_config": _CLIP},
                        dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)),
    "llava-1.5-13b-hf": ({"model_type": "llava", "vision_config": _CLIP},
                         dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40, vocab_size=32064)),
    "llava-v1.6-mistral-7b-hf": ({"model_type": "llava_next", "vision_config": _CLIP},
                                 dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      vocab_size=32064, sliding_window=None)),
    "llama3-llava-next-8b-hf": ({"model_type": "llava_next", "vision_config": _CLIP},
                                dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128320)),
    "llava-v1.6-34b-hf": ({"model_type": "llava_next", "vision_config": _CLIP},
                          dict(_LLAMA, hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                               num_attention_heads=56, num_key_value_heads=8, vocab_size=64064)),
    "llava-next-72b-hf": ({"model_type": "llava_next", "vision_config": _CLIP},
                          dict(_QWEN2, hidden_size=8192, intermediate_size=24576, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=64, vocab_size=152064)),
    "llava-next-110b-hf": ({"model_type": "llava_next", "vision_config": _CLIP},
                           dict(_QWEN2, hidden_size=8192, intermediate_size=49152, num_hidden_layers=80,
                                num_attention_heads=64, num_key_value_heads=8, vocab_size=152064)),
    "LLaVA-NeXT-Video-7B-hf": ({**_VIDEO, "vision_config": _CLIP},
                               dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)),
    "llava-onevision-qwen2-0.5b-ov-hf": ({"model_type": "llava_onevision", "vision_config": _SIGLIP},
                                         dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                              tie_word_embeddings=True)),
    "llava-onevision-qwen2-7b-ov-hf": ({"model_type": "llava_onevision", "vision_config": _SIGLIP},
                                       dict(_QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152128)),
    "llava-onevision-qwen2-72b-ov-hf": ({"model_type": "llava_onevision", "vision_config": _SIGLIP},
                                        dict(_QWEN2, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                             num_attention_heads=64, num_key_value_heads=8, vocab_size=152064)),
}
GPUS_GB = (24, 48, 80)
HEADROOM_GB = 2.0  # per GPU: CUDA context, NCCL buffers, activations of a 2k-token prefill chunk
CONTEXT_TOKENS = 16_000  # KV cache each GPU must hold besides its weights (a few conversations with pictures)


def fits(rank_weights: float, kv_per_token: float, gpu_gb: float) -> bool:
    """Whether one rank's weights, CONTEXT_TOKENS of its KV cache and HEADROOM_GB fit a GPU of gpu_gb (GB = 1e9)."""
    return rank_weights + CONTEXT_TOKENS * kv_per_token + HEADROOM_GB * 1e9 <= gpu_gb * 1e9


def run_sizes(args) -> int:
    import torch

    from llavakit import anyres
    from llavakit.config import LlavaConfig
    from llavakit.errors import ConfigError
    from llavakit.model.llava import LlavaModel
    from llavakit.parallel.plan import make_plan
    from llavakit.parallel.shard import Split

    def rank_bytes(cfg, size: int) -> tuple[float, float]:
        """(rank 0's weight bytes, its KV bytes per token), bf16."""
        plan = make_plan(cfg, size, 64, "GPUs")
        with torch.device("meta"):
            model = LlavaModel(cfg)
            if size > 1:
                Split(plan, 0).localize(model)
        model.tie_weights()
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        kv_heads = plan.kv_heads if size > 1 else cfg.text.num_kv_heads
        return params * 2, 2 * cfg.text.num_layers * kv_heads * cfg.text.head_dim * 2

    rows = []
    for name, (top, text) in PUBLISHED.items():
        cfg = LlavaConfig.from_hf({**top, "text_config": text})
        weights, kv = rank_bytes(cfg, 1)
        photo = anyres.image_layout((768, 1024), cfg.geometry, True).tokens
        need = []
        for gb in GPUS_GB:
            n = next((n for n in (1, 2, 4, 8, 16) if _fits_split(cfg, n, gb, rank_bytes, ConfigError)), None)
            need.append("—" if n is None else str(n))
        rows.append(f"| {name} | {weights / 1e9:.1f} GB | {kv * 1000 / 1e6:.0f} MB | {photo:,} | "
                    + " | ".join(need) + " |")
    lines = ["| checkpoint (llava-hf) | weights, bf16 | KV cache per 1k tokens | tokens of a 1024x768 photo | "
             + " | ".join(f"{gb} GB GPUs" for gb in GPUS_GB) + " |", "|---|---|---|---|" + "---|" * len(GPUS_GB)]
    print("\n".join(lines + rows))
    return 0


def _fits_split(cfg, n: int, gb: float, rank_bytes, config_error) -> bool:
    try:
        weights, kv = rank_bytes(cfg, n)
    except config_error:  # a size this model cannot be split into
        return False
    return fits(weights, kv, gb)


def run_memory(args) -> int:
    results = {}
    for tp in (1, 2):
        out = subprocess.run([sys.executable, __file__, "_memory", "--ckpt", str(args.ckpt), "--tp", str(tp)],
                             capture_output=True, text=True, check=True)
        results[tp] = json.loads(out.stdout.strip().splitlines()[-1])
        print(tp, results[tp], file=sys.stderr)
    one = results[1]["after_forward_mb"][0]
    size = sum(f.stat().st_size for f in Path(args.ckpt).glob("*.safetensors"))
    lines = [f"Resident memory (MiB) of `{Path(args.ckpt).name}` ({size / 1e9:.1f} GB of weights), bf16. One process "
             "maps the files and reads a page when a forward first touches it, so its memory after load is "
             "small; after a forward it holds every weight the text path uses.", "",
             "| process | VmRSS after load | VmRSS after a 16-token forward | ratio to one process | peak (VmHWM) |",
             "|---|---|---|---|---|",
             f"| one process | {results[1]['after_load_mb'][0]:.0f} | {one:.0f} | 1.00 | "
             f"{results[1]['peak_mb'][0]:.0f} |"]
    for rank, (load, fwd, peak) in enumerate(zip(results[2]["after_load_mb"], results[2]["after_forward_mb"],
                                                 results[2]["peak_mb"])):
        lines.append(f"| tensor_parallel_size=2, rank {rank} | {load:.0f} | {fwd:.0f} | {fwd / one:.2f} | {peak:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tensor-parallel-memory.json").write_text(json.dumps(
        {"checkpoint": Path(args.ckpt).name, "bytes": size, "results": results}, indent=2))
    (args.out / "tensor-parallel-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "memory", "sizes", "_speed", "_memory"])
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b")
    p.add_argument("--layers", type=int, help="decoder depth (default: the preset's)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--ckpt", help="memory: the checkpoint folder (e.g. make-random --preset "
                   "llava-onevision-qwen2-7b --layers 12 --dtype bfloat16)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    return {"speed": run_speed, "memory": run_memory, "sizes": run_sizes, "_speed": speed_worker,
            "_memory": memory_worker}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
