"""llavakit and transformers side by side on the same checkpoint, inputs and machine, in one run.

    python bench/compare.py --preset llava-onevision-qwen2-0.5b --dtype bfloat16

Builds the preset with random weights (cached under bench/.cache), measures this machine's memory
read bandwidth and matmul peak, then runs each engine in its own process (same thread count) and
writes bench/results/<preset>.json and .md. Random weights never stop by themselves, so output
lengths are forced (llavakit: `ignore_eos`; transformers: `min_new_tokens`). Every number is the
median of --runs runs after a warm-up.
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
QUESTIONS = ["What is in the picture?", "Describe the image in detail.", "What colours do you see?",
             "How many objects are there?", "Is it day or night?", "What is on the left?",
             "What is the main subject?", "Write a caption for it."]


def _median(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, in MB.

    Not ru_maxrss: it survives exec, so a worker would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _image(seed: int, w: int, h: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _conv(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def machine_limits() -> dict:
    """Memory read bandwidth (GB/s) and matmul peak (GFLOP/s, bf16 and fp32) of this machine, medians."""
    import torch

    a = np.ones(256 << 20, dtype=np.float32)  # 1 GiB
    read = _median(lambda: a.sum(), 5)
    out = {"read_bandwidth_gbs": a.nbytes / read / 1e9}
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2048, 2048, dtype=dtype)
        t = _median(lambda: x @ x, 5)
        out[f"matmul_gflops_{str(dtype)[6:]}"] = 2 * 2048**3 / t / 1e9
    return out


# ───────────────────────────── workers (one process per engine) ─────────────────────────────


def worker_llavakit(ckpt: Path, args) -> dict:
    import torch

    import llavakit

    res = {}
    t = time.perf_counter()
    vlm = llavakit.load(ckpt, dtype=args.dtype)
    res["load_s"] = time.perf_counter() - t
    res["rss_after_load_mb"] = _rss_mb()
    img384, img1000 = _image(0, 384, 384), _image(1, 1000, 700)
    res["preprocess_s"] = _median(lambda: vlm.processor.encode(_conv(img384, QUESTIONS[0])), args.runs)
    tiles = torch.from_numpy(vlm.processor.encode(_conv(img1000, QUESTIONS[0])).pixel_values)
    with torch.inference_mode():
        res["vision_per_tile_s"] = _median(lambda: vlm.model.encode_tiles(tiles), args.runs) / tiles.shape[0]

    def fresh():  # no image or prefix cache carried over: a cold request
        vlm.engine.clear_caches()

    one = llavakit.SamplingParams(max_new_tokens=1, ignore_eos=True)
    res["ttft_384_s"] = _median(lambda: (fresh(), vlm.chat(_conv(img384, QUESTIONS[0]), sampling=one)), args.runs)
    res["ttft_1000x700_s"] = _median(lambda: (fresh(), vlm.chat(_conv(img1000, QUESTIONS[0]), sampling=one)), args.runs)
    fresh()
    vlm.chat(_conv(img384, QUESTIONS[0]), sampling=one)  # the image is now in the cache
    questions = iter(QUESTIONS[1:] * (args.runs + 2))
    res["ttft_same_image_new_question_s"] = _median(
        lambda: vlm.chat(_conv(img384, next(questions)), sampling=one), args.runs)
    res["prompt_tokens_384"] = len(vlm.processor.encode(_conv(img384, QUESTIONS[0])).input_ids)

    def decode_rate():
        fresh()
        engine = vlm.engine
        engine.add_request("d", vlm.processor.encode(_conv(img384, QUESTIONS[0])),
                           llavakit.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
        stamps = []
        while engine.has_unfinished():
            if engine.step():
                stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    decode_rate()
    res["decode_tok_s"] = statistics.median(decode_rate() for _ in range(args.runs))
    params = llavakit.SamplingParams(max_new_tokens=args.concurrent_new_tokens, ignore_eos=True)
    same = [_conv(img384, q) for q in QUESTIONS]
    unique = [_conv(_image(10 + i, 384, 384), q) for i, q in enumerate(QUESTIONS)]
    res["eight_same_image_s"] = _median(lambda: (fresh(), vlm.generate(same, params)), args.throughput_runs)
    res["eight_unique_images_s"] = _median(lambda: (fresh(), vlm.generate(unique, params)), args.throughput_runs)
    res["peak_rss_mb"] = _rss_mb()
    return res


def worker_transformers(ckpt: Path, args) -> dict:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT.parent / "tests"))
    from reference import onevision_reference_processor

    res = {}
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    model_type = json.loads((ckpt / "config.json").read_text())["model_type"]
    cls = {"llava": transformers.LlavaForConditionalGeneration,
           "llava_next": transformers.LlavaNextForConditionalGeneration,
           "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration}[model_type]
    t = time.perf_counter()
    model = cls.from_pretrained(ckpt, dtype=dtype).eval()
    proc = (onevision_reference_processor(ckpt) if model_type == "llava_onevision"
            else transformers.AutoProcessor.from_pretrained(ckpt))
    res["load_s"] = time.perf_counter() - t
    res["rss_after_load_mb"] = _rss_mb()
    img384, img1000 = _image(0, 384, 384), _image(1, 1000, 700)

    def inputs(convs):
        out = proc.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", padding=True)
        return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}

    res["preprocess_s"] = _median(lambda: inputs(_conv(img384, QUESTIONS[0])), args.runs)
    x = inputs(_conv(img1000, QUESTIONS[0]))
    n_tiles = int(x["pixel_values"].shape[1]) if x["pixel_values"].ndim == 5 else int(x["pixel_values"].shape[0])
    kw = {k: x[k] for k in ("pixel_values", "image_sizes") if k in x}
    with torch.inference_mode():
        res["vision_per_tile_s"] = _median(lambda: model.model.get_image_features(**kw), args.runs) / n_tiles

    def gen(convs, n):
        with torch.inference_mode():
            model.generate(**inputs(convs), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    proc.tokenizer.padding_side = "left"
    res["ttft_384_s"] = _median(lambda: gen(_conv(img384, QUESTIONS[0]), 1), args.runs)
    res["ttft_1000x700_s"] = _median(lambda: gen(_conv(img1000, QUESTIONS[0]), 1), args.runs)
    res["ttft_same_image_new_question_s"] = res["ttft_384_s"]  # no cache: every question starts cold
    n = args.new_tokens
    t_n = _median(lambda: gen(_conv(img384, QUESTIONS[0]), n), args.runs)
    res["decode_tok_s"] = (n - 1) / (t_n - res["ttft_384_s"])
    m = args.concurrent_new_tokens
    same = [_conv(img384, q) for q in QUESTIONS]
    unique = [_conv(_image(10 + i, 384, 384), q) for i, q in enumerate(QUESTIONS)]
    res["eight_same_image_s"] = _median(lambda: [gen(c, m) for c in same], args.throughput_runs)
    res["eight_unique_images_s"] = _median(lambda: [gen(c, m) for c in unique], args.throughput_runs)
    res["eight_unique_images_padded_batch_s"] = _median(lambda: gen(unique, m), args.throughput_runs)
    res["peak_rss_mb"] = _rss_mb()
    return res


# ───────────────────────────── report ─────────────────────────────


def weight_bytes(ckpt: Path) -> dict:
    """Bytes of the decoder weights one decode step reads (embedding rows excluded, the head included)."""
    from safetensors import safe_open

    from llavakit.weights import canonical_key, weight_files

    total, decode, vision = 0, 0, 0
    cfg = json.loads((ckpt / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings", False)
    for path in weight_files(ckpt):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = int(np.prod(sl.get_shape())) * {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()]
                total += n
                name = canonical_key(key)
                if name.startswith("vision_tower.") or name.startswith("multi_modal_projector."):
                    vision += n
                elif name != "language_model.embed_tokens.weight" or tied:
                    decode += n
    return {"total": total, "decode": decode, "vision": vision}


ROWS = [
    ("load_s", "load time (s)", "lower"),
    ("rss_after_load_mb", "RSS after load (MB)", "lower"),
    ("peak_rss_mb", "peak RSS (MB)", "lower"),
    ("preprocess_s", "preprocessing, 384×384 (s)", "lower"),
    ("vision_per_tile_s", "vision encode per tile (s)", "lower"),
    ("ttft_384_s", "TTFT, 384×384 image (s)", "lower"),
    ("ttft_1000x700_s", "TTFT, 1000×700 image (s)", "lower"),
    ("ttft_same_image_new_question_s", "TTFT, same image, new question (s)", "lower"),
    ("decode_tok_s", "decode tokens/s, batch 1", "higher"),
    ("eight_same_image_s", "8 requests, same image (s)", "lower"),
    ("eight_unique_images_s", "8 requests, unique images (s)", "lower"),
]


def report(results: dict, machine: dict, weights: dict, args, ckpt: Path) -> str:
    ours, hf = results["llavakit"], results["transformers"]
    lines = [f"`{args.preset}`{f' ({args.layers} layers)' if args.layers else ''}, {args.dtype}, "
             f"{os.cpu_count()} CPU threads, torch {__import__('torch').__version__}, transformers "
             f"{__import__('transformers').__version__}; medians of {args.runs} runs "
             f"({args.throughput_runs} for the 8-request rows); {args.new_tokens} tokens for decode, "
             f"{args.concurrent_new_tokens} per request for the 8-request rows; the 8 requests run on llavakit's engine "
             "and one by one on transformers.", "",
             "| measure | llavakit | transformers | ratio (llavakit / transformers) |", "|---|---|---|---|"]
    for key, label, _ in ROWS:
        lines.append(f"| {label} | {ours[key]:.3f} | {hf[key]:.3f} | {ours[key] / hf[key]:.2f} |")
    lines.append(f"| 8 requests, unique images: transformers padded batch (s) | | "
                 f"{hf['eight_unique_images_padded_batch_s']:.3f} | "
                 f"{ours['eight_unique_images_s'] / hf['eight_unique_images_padded_batch_s']:.2f} |")
    bw = machine["read_bandwidth_gbs"]
    for name, r in (("llavakit", ours), ("transformers", hf)):
        r["decode_bandwidth_pct"] = 100 * weights["decode"] * r["decode_tok_s"] / 1e9 / bw
    lines += ["", f"Machine: read bandwidth {bw:.1f} GB/s, matmul peak {machine['matmul_gflops_bfloat16']:.0f} GFLOP/s "
              f"(bf16) / {machine['matmul_gflops_float32']:.0f} GFLOP/s (fp32). Decode reads "
              f"{weights['decode'] / 1e9:.2f} GB of weights per token: llavakit reaches "
              f"{ours['decode_bandwidth_pct']:.0f}% of the read bandwidth, transformers "
              f"{hf['decode_bandwidth_pct']:.0f}%."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, help="truncate depth for quick runs")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--throughput-runs", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--concurrent-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--worker", choices=["llavakit", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        fn = worker_llavakit if args.worker == "llavakit" else worker_transformers
        Path(args.json_out).write_text(json.dumps(fn(Path(args.ckpt), args)))
        return 0

    from llavakit.random_init import make_random_checkpoint

    ckpt = ROOT / ".cache" / f"{args.preset}-{args.layers or 'all'}-{args.dtype}"
    if not (ckpt / "config.json").is_file():
        print(f"building {ckpt} ...", file=sys.stderr)
        make_random_checkpoint(ckpt, args.preset, layers=args.layers, dtype=getattr(torch, args.dtype))
    machine = machine_limits()
    results = {}
    for engine in ("llavakit", "transformers"):
        out = ROOT / ".cache" / f"{engine}.json"
        cmd = [sys.executable, __file__, "--worker", engine, "--ckpt", str(ckpt), "--json-out", str(out)]
        for flag in ("preset", "dtype", "runs", "throughput_runs", "new_tokens", "concurrent_new_tokens", "threads"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        print(f"running {engine} ...", file=sys.stderr)
        subprocess.run(cmd, check=True)
        results[engine] = json.loads(out.read_text())
    weights = weight_bytes(ckpt)
    table = report(results, machine, weights, args, ckpt)
    results_dir = ROOT / "results"
    results_dir.mkdir(exist_ok=True)
    name = f"{args.preset}{f'-{args.layers}l' if args.layers else ''}-{args.dtype}"
    (results_dir / f"{name}.json").write_text(json.dumps({"args": vars(args), "machine": machine, "weights": weights,
                                                          "results": results}, indent=2))
    (results_dir / f"{name}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
