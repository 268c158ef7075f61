"""llavakit and transformers side by side on the same checkpoint, inputs and machine, in one run.

    python bench/compare.py --preset llava-onevision-qwen2-0.5b --dtype bfloat16
    python bench/compare.py --device cuda --preset llava-1.5-7b --runs 3 --time-limit 240

Builds the preset with random weights (cached under bench/.cache), measures this machine's limits
(CPU: memory read bandwidth and matmul peak; CUDA: the GPU's copy and read bandwidth and matmul
peak), reads the checkpoint once so that every load starts from a warm page cache, then runs each engine in its own process (on CPU with the same thread count): llavakit,
llavakit with `quantize="int8"` (skip it with --no-int8) and transformers, and writes
<out>/<preset>[-<layers>l]-<dtype>[-cuda].json and .md. Random weights never stop by themselves,
so output lengths are forced (llavakit: `ignore_eos`; transformers: `min_new_tokens`). Every number
is the median of --runs runs after a warm-up. The int8 model's last-position logits on three
prompts are compared with the unquantised model's (cosine similarity, worst of the three).

--time-limit bounds the whole run: each worker stops starting measurements near its share of the
time and is killed at its end; whatever was measured is still written (missing rows show "—").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent


def portable_args(args: dict) -> dict:
    """A run's arguments for its results file: paths as strings, relative to the repository when inside it
    and reduced to their last part when not, so that a committed result names no machine's folders."""
    repo = ROOT.parent

    def text(v):
        if not isinstance(v, (Path, str)) or (isinstance(v, str) and not os.path.isabs(v)):
            return v
        path = Path(v).resolve()
        try:
            return str(path.relative_to(repo))
        except ValueError:
            return f"(outside the repository)/{path.name}"

    return {k: text(v) for k, v in args.items()}


QUESTIONS = ["What is in the picture?", "Describe the image in detail.", "What colours do you see?",
             "How many objects are there?", "Is it day or night?", "What is on the left?",
             "What is the main subject?", "Write a caption for it."]
LLAVAKIT_SHARE = 0.4  # of the time left when the llavakit worker starts; transformers gets the rest


def _sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer read afterwards covers it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _median(fn, runs: int, device: str = "cpu", deadline: float | None = None) -> tuple[float, int]:
    """(median seconds of `runs` calls of fn after one warm-up call, calls timed).

    Past `deadline` (time.time()), no further call starts once one has been timed.
    """
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(runs):
        if times and deadline is not None and time.time() > deadline:
            break
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


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


def machine_limits(device: str = "cpu") -> dict:
    """Bandwidth (GB/s) and matmul peak (GFLOP/s, bf16 and fp32) of this machine or its GPU, medians.

    CPU: read_bandwidth_gbs is a 1 GiB sum. CUDA: read_bandwidth_gbs is a 1 GiB device-to-device copy
    counted as bytes read plus bytes written (what a kernel streaming weights can reach), and
    read_only_bandwidth_gbs a 1 GiB sum; matmuls are 8192² (fp32 without TF32).
    """
    import torch

    if device != "cuda":
        a = np.ones(256 << 20, dtype=np.float32)  # 1 GiB
        read, _ = _median(lambda: a.sum(), 5)
        out = {"read_bandwidth_gbs": a.nbytes / read / 1e9}
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(2048, 2048, dtype=dtype)
            t, _ = _median(lambda: x @ x, 5)
            out[f"matmul_gflops_{str(dtype)[6:]}"] = 2 * 2048**3 / t / 1e9
        return out

    def repeat(fn, n):  # one timed call is too short for the host clock: time n in a row
        return lambda: [fn() for _ in range(n)]

    def copy_gbs() -> float:
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t, _ = _median(repeat(lambda: dst.copy_(src), 10), 5, "cuda")
        return 2 * src.nbytes * 10 / t / 1e9

    def sum_gbs() -> float:
        x = torch.ones(256 << 20, dtype=torch.float32, device="cuda")
        t, _ = _median(repeat(lambda: x.sum(), 10), 5, "cuda")
        return x.nbytes * 10 / t / 1e9

    out = {"read_bandwidth_gbs": copy_gbs(), "read_only_bandwidth_gbs": sum_gbs()}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype, n in ((torch.bfloat16, 20), (torch.float32, 3)):
        x = torch.randn(8192, 8192, dtype=dtype, device="cuda")
        t, _ = _median(repeat(lambda: x @ x, n), 5, "cuda")
        out[f"matmul_gflops_{str(dtype)[6:]}"] = 2 * 8192**3 * n / t / 1e9
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.cuda.empty_cache()
    out["gpu"] = torch.cuda.get_device_name()
    return out


# ───────────────────────────── workers (one process per engine) ─────────────────────────────


class Recorder:
    """A worker's results, written to `path` after every entry: a worker killed at its deadline
    leaves everything it measured. A failing measurement is recorded under "errors", not raised."""

    def __init__(self, path: Path, device: str, deadline: float | None, only: set[str] | None = None):
        self.path, self.device, self.deadline, self.only = path, device, deadline, only
        self.res: dict = {"errors": {}, "runs_used": {}, "skipped": []}
        self.used: int | None = None  # calls the current measurement timed (set by median)

    def late(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def median(self, fn, runs: int) -> float:
        t, n = _median(fn, runs, self.device, self.deadline)
        self.used = n
        return t

    def measure(self, key: str, thunk, always: bool = False) -> None:
        """res[key] = thunk(), unless the deadline has passed (and not `always`) or it fails."""
        if self.only is not None and key not in self.only and not always:
            return  # not asked for (--only)
        if self.late() and not always:
            self.res["skipped"].append(key)
            self.write()
            return
        self.used = None
        try:
            self.res[key] = thunk()
        except Exception as e:  # one broken measurement must not lose the others
            self.res["errors"][key] = f"{type(e).__name__}: {e}"[:400]
            print(f"  {key}: {self.res['errors'][key]}", file=sys.stderr)
        if self.used is not None:
            self.res["runs_used"][key] = self.used
        self.write()

    def write(self) -> None:
        self.res["peak_rss_mb"] = _rss_mb()
        if self.device == "cuda":
            import torch

            self.res["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        tmp = self.path.with_suffix(".part")
        tmp.write_text(json.dumps(self.res))
        os.replace(tmp, self.path)


def worker_llavakit(ckpt: Path, args, rec: Recorder) -> None:
    import torch

    import llavakit

    device = args.device
    vlm = None
    quantize = "int8" if args.worker == "llavakit-int8" else "none"

    def load():
        nonlocal vlm
        t = time.perf_counter()
        vlm = llavakit.load(ckpt, dtype=args.dtype, device=device, quantize=quantize)
        _sync(device)
        return time.perf_counter() - t

    rec.measure("load_s", load, always=True)
    if vlm is None:
        return
    rec.res["rss_after_load_mb"] = _rss_mb()
    if device == "cuda":
        rec.res["gpu_mem_after_load_mb"] = torch.cuda.memory_allocated() / 2**20
    img384, img1000 = _image(0, 384, 384), _image(1, 1000, 700)
    rec.measure("preprocess_s", lambda: rec.median(lambda: vlm.processor.encode(_conv(img384, QUESTIONS[0])), args.runs))

    def vision():
        tiles = torch.from_numpy(vlm.processor.encode(_conv(img1000, QUESTIONS[0])).pixel_values).to(device)
        with torch.inference_mode():
            return rec.median(lambda: vlm.model.encode_tiles(tiles), args.runs) / tiles.shape[0]

    rec.measure("vision_per_tile_s", vision)

    def last_logits():  # for the int8 accuracy check: last-position logits of three prompts
        out = [vlm.forward(vlm.prepare([_conv(img384, q)]), last_only=True).reshape(-1).cpu() for q in QUESTIONS[:3]]
        torch.save(torch.stack(out), rec.path.with_suffix(".logits.pt"))
        return True

    if not args.no_int8:  # three cold prefills: only worth it when the int8 run is compared
        rec.measure("logits_saved", last_logits, always=True)

    def fresh():  # no image or prefix cache carried over: a cold request
        vlm.engine.clear_caches()

    one = llavakit.SamplingParams(max_new_tokens=1, ignore_eos=True)
    rec.measure("ttft_384_s", lambda: rec.median(
        lambda: (fresh(), vlm.chat(_conv(img384, QUESTIONS[0]), sampling=one)), args.runs))
    rec.measure("ttft_1000x700_s", lambda: rec.median(
        lambda: (fresh(), vlm.chat(_conv(img1000, QUESTIONS[0]), sampling=one)), args.runs))

    def same_image():
        fresh()
        vlm.chat(_conv(img384, QUESTIONS[0]), sampling=one)  # the image is now in the cache
        questions = iter(QUESTIONS[1:] * (args.runs + 2))
        return rec.median(lambda: vlm.chat(_conv(img384, next(questions)), sampling=one), args.runs)

    rec.measure("ttft_same_image_new_question_s", same_image)
    rec.res["prompt_tokens_384"] = len(vlm.processor.encode(_conv(img384, QUESTIONS[0])).input_ids)

    def decode_rate():
        fresh()
        engine = vlm.engine
        engine.add_request("d", vlm.processor.encode(_conv(img384, QUESTIONS[0])),
                           llavakit.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
        stamps = []
        while engine.has_unfinished():
            if engine.step():  # each step ends with its tokens on the host: the GPU is done with it
                stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def decode():
        decode_rate()
        rates = []
        for _ in range(args.runs):
            if rates and rec.late():
                break
            rates.append(decode_rate())
        rec.used = len(rates)
        return statistics.median(rates)

    rec.measure("decode_tok_s", decode)
    params = llavakit.SamplingParams(max_new_tokens=args.concurrent_new_tokens, ignore_eos=True)
    same = [_conv(img384, q) for q in QUESTIONS]
    unique = [_conv(_image(10 + i, 384, 384), q) for i, q in enumerate(QUESTIONS)]
    rec.measure("eight_same_image_s", lambda: rec.median(lambda: (fresh(), vlm.generate(same, params)),
                                                         args.throughput_runs))
    rec.measure("eight_unique_images_s", lambda: rec.median(lambda: (fresh(), vlm.generate(unique, params)),
                                                            args.throughput_runs))


def warm_page_cache(ckpt: Path) -> None:
    """Read the checkpoint's files once, so every engine's load time starts from the same warm page cache
    (otherwise the first worker pays the disk reads and the later ones do not)."""
    for path in sorted(ckpt.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass


def logits_cosine(a: Path, b: Path) -> float | None:
    """The lowest cosine similarity between matching rows of two saved logits files (None if missing)."""
    import torch

    if not (a.is_file() and b.is_file()):
        return None
    x, y = torch.load(a, weights_only=True).double(), torch.load(b, weights_only=True).double()
    return float(torch.nn.functional.cosine_similarity(x, y, dim=-1).min())


def _transformers_class(model_type: str):
    import transformers

    return {"llava": transformers.LlavaForConditionalGeneration,
            "llava_next": transformers.LlavaNextForConditionalGeneration,
            "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration}[model_type]


def worker_transformers(ckpt: Path, args, rec: Recorder) -> None:
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")  # generate() repeats its advice on every call
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    sys.path.insert(0, str(ROOT.parent / "tests"))
    from reference import onevision_reference_processor

    device = args.device
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    model_type = json.loads((ckpt / "config.json").read_text())["model_type"]
    img384, img1000 = _image(0, 384, 384), _image(1, 1000, 700)
    model = proc = None

    def inputs(convs):
        out = proc.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", padding=True)
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}

    def load():
        nonlocal model, proc
        cls = _transformers_class(model_type)
        t = time.perf_counter()
        try:
            model = cls.from_pretrained(ckpt, dtype=dtype)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            model = cls.from_pretrained(ckpt, torch_dtype=dtype)
        model = model.to(device).eval()
        candidates = [lambda: transformers.AutoProcessor.from_pretrained(ckpt)]
        if model_type == "llava_onevision":  # its AutoProcessor wants torchvision for videos
            candidates.insert(0, lambda: onevision_reference_processor(ckpt))
        for i, make in enumerate(candidates):
            try:
                proc = make()
                proc.tokenizer.padding_side = "left"
                inputs(_conv(img384, QUESTIONS[0]))  # fails here if this version needs something else
                break
            except Exception:
                if i == len(candidates) - 1:
                    raise
        _sync(device)
        return time.perf_counter() - t

    rec.measure("load_s", load, always=True)
    if model is None:
        return
    rec.res["rss_after_load_mb"] = _rss_mb()
    if device == "cuda":
        rec.res["gpu_mem_after_load_mb"] = torch.cuda.memory_allocated() / 2**20
    rec.measure("preprocess_s", lambda: rec.median(lambda: inputs(_conv(img384, QUESTIONS[0])), args.runs))

    def vision():
        x = inputs(_conv(img1000, QUESTIONS[0]))
        n_tiles = int(x["pixel_values"].shape[1]) if x["pixel_values"].ndim == 5 else int(x["pixel_values"].shape[0])
        kw = {k: x[k] for k in ("pixel_values", "image_sizes") if k in x}
        inner = getattr(model, "model", model)  # transformers < 4.52 has no inner model
        with torch.inference_mode():
            return rec.median(lambda: inner.get_image_features(**kw), args.runs) / n_tiles

    rec.measure("vision_per_tile_s", vision)

    def gen(convs, n):
        with torch.inference_mode():
            model.generate(**inputs(convs), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    rec.measure("ttft_384_s", lambda: rec.median(lambda: gen(_conv(img384, QUESTIONS[0]), 1), args.runs))
    rec.measure("ttft_1000x700_s", lambda: rec.median(lambda: gen(_conv(img1000, QUESTIONS[0]), 1), args.runs))
    if "ttft_384_s" in rec.res:
        rec.res["ttft_same_image_new_question_s"] = rec.res["ttft_384_s"]  # no cache: every question starts cold
    n = args.new_tokens

    def decode():  # (n - 1) tokens in the time n tokens take beyond one; paired runs, so noise cannot flip the sign
        conv = _conv(img384, QUESTIONS[0])
        gen(conv, n)
        extra = []
        for _ in range(args.runs):
            if extra and rec.late():
                break
            t = time.perf_counter()
            gen(conv, 1)
            _sync(device)
            t1 = time.perf_counter()
            gen(conv, n)
            _sync(device)
            extra.append(time.perf_counter() - t1 - (t1 - t))
        rec.used = len(extra)
        if statistics.median(extra) <= 0:
            raise ValueError(f"{n} tokens took no longer than 1; use more --new-tokens")
        return (n - 1) / statistics.median(extra)

    rec.measure("decode_tok_s", decode)
    m = args.concurrent_new_tokens
    same = [_conv(img384, q) for q in QUESTIONS]
    unique = [_conv(_image(10 + i, 384, 384), q) for i, q in enumerate(QUESTIONS)]
    rec.measure("eight_unique_images_padded_batch_s", lambda: rec.median(lambda: gen(unique, m), args.throughput_runs))
    rec.measure("eight_same_image_s", lambda: rec.median(lambda: [gen(c, m) for c in same], args.throughput_runs))
    rec.measure("eight_unique_images_s", lambda: rec.median(lambda: [gen(c, m) for c in unique], args.throughput_runs))


# ───────────────────────────── report ─────────────────────────────


def weight_bytes(ckpt: Path) -> dict:
    """Bytes of the decoder weights one decode step reads (embedding rows excluded, the head included)."""
    from safetensors import safe_open

    from llavakit.weights import canonical_key, weight_files

    total, decode, vision, decode_int8 = 0, 0, 0, 0
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
                    shape = sl.get_shape()
                    linear = len(shape) == 2 and not name.endswith("norm.weight")
                    decode_int8 += (int(np.prod(shape)) + shape[0] * 2) if linear else n
    # int8: one byte per decoder/head weight plus one scale (in the compute dtype) per output channel.
    return {"total": total, "decode": decode, "vision": vision, "decode_int8": decode_int8}


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
GPU_ROWS = [
    ("gpu_mem_after_load_mb", "GPU memory after load (MB)", "lower"),
    ("peak_gpu_mem_mb", "peak GPU memory allocated (MB)", "lower"),
]


def _num(x, fine: bool = False) -> str:
    """Three decimals; with `fine` (GPU timings are milliseconds), three significant digits below 1."""
    if x is None:
        return "—"
    if fine and abs(x) < 1:
        return f"{x:.3g}"
    return f"{x:.0f}" if fine and abs(x) >= 1000 else f"{x:.3f}"


def _ratio(a, b) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def report(results: dict, machine: dict, weights: dict, args, ckpt: Path) -> str:
    import torch

    ours, hf = results.get("llavakit", {}), results.get("transformers", {})
    q8 = results.get("llavakit-int8")
    cuda = args.device == "cuda"
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    where = (f"{machine.get('gpu', 'CUDA GPU')}, CUDA {torch.version.cuda}" if cuda
             else f"{os.cpu_count()} CPU threads")
    lines = [f"`{args.preset}`{f' ({args.layers} layers)' if args.layers else ''}, {args.dtype}, "
             f"{where}, torch {torch.__version__}, transformers "
             f"{hf_version}; medians of {args.runs} runs "
             f"({args.throughput_runs} for the 8-request rows); {args.new_tokens} tokens for decode, "
             f"{args.concurrent_new_tokens} per request for the 8-request rows; the 8 requests run on llavakit's engine "
             "and one by one on transformers.", "",
             *_table_head(q8 is not None)]
    for key, label, _ in ROWS[:3] + (GPU_ROWS if cuda else []) + ROWS[3:]:
        cells = [_num(ours.get(key), cuda)] + ([_num(q8.get(key), cuda)] if q8 is not None else [])
        ratios = [_ratio(ours.get(key), hf.get(key))] + ([_ratio(q8.get(key), hf.get(key))] if q8 is not None else [])
        lines.append(f"| {label} | {' | '.join(cells)} | {_num(hf.get(key), cuda)} | {' | '.join(ratios)} |")
    padded = hf.get("eight_unique_images_padded_batch_s")
    blank = " |" if q8 is not None else ""
    lines.append(f"| 8 requests, unique images: transformers padded batch (s) | |{blank} {_num(padded, cuda)} | "
                 f"{_ratio(ours.get('eight_unique_images_s'), padded)} |"
                 + (f" {_ratio(q8.get('eight_unique_images_s'), padded)} |" if q8 is not None else ""))
    bw = machine["read_bandwidth_gbs"]
    pct = {}
    engines = [("llavakit", ours, weights["decode"]), ("transformers", hf, weights["decode"])]
    if q8 is not None:
        engines.append(("llavakit int8", q8, weights["decode_int8"]))
    for name, r, nbytes in engines:
        r.pop("decode_bandwidth_pct", None)
        if r.get("decode_tok_s") is not None:
            r["decode_bandwidth_pct"] = 100 * nbytes * r["decode_tok_s"] / 1e9 / bw
        pct[name] = "—" if r.get("decode_bandwidth_pct") is None else f"{r['decode_bandwidth_pct']:.0f}%"
    if cuda:
        limits = (f"GPU: memory bandwidth {bw:.0f} GB/s (device-to-device copy, read + write), "
                  f"{machine['read_only_bandwidth_gbs']:.0f} GB/s read-only (sum); matmul peak "
                  f"{machine['matmul_gflops_bfloat16'] / 1e3:.0f} TFLOP/s (bf16) / "
                  f"{machine['matmul_gflops_float32'] / 1e3:.0f} TFLOP/s (fp32, no TF32).")
    else:
        limits = (f"Machine: read bandwidth {bw:.1f} GB/s, matmul peak {machine['matmul_gflops_bfloat16']:.0f} GFLOP/s "
                  f"(bf16) / {machine['matmul_gflops_float32']:.0f} GFLOP/s (fp32).")
    lines += ["", f"{limits} Decode reads {weights['decode'] / 1e9:.2f} GB of weights per token: llavakit reaches "
              f"{pct['llavakit']} of the {'copy' if cuda else 'read'} bandwidth, transformers {pct['transformers']}."]
    if q8 is not None:
        cos = results.get("int8_logits_cosine")
        lines += ["", f"int8 (weight-only, one scale per output channel) reads {weights['decode_int8'] / 1e9:.2f} GB per "
                  f"token and reaches {pct['llavakit int8']} of the read bandwidth; its last-position logits have a "
                  f"cosine similarity of {'—' if cos is None else f'{cos:.5f}'} (worst of three prompts) with the "
                  "unquantised model's."]
    notes = []
    for name, r in [("llavakit", ours)] + ([("llavakit int8", q8)] if q8 is not None else []) + [("transformers", hf)]:
        if not r:
            notes.append(f"{name}: no results (the worker failed before writing any; see the log).")
            continue
        short = {k: n for k, n in r.get("runs_used", {}).items()
                 if n < (args.throughput_runs if k.startswith("eight") else args.runs)}
        if short:
            notes.append(f"{name}: time limit reached, fewer runs for " + ", ".join(f"{k} ({n})" for k, n in short.items()))
        if r.get("skipped"):
            notes.append(f"{name}: time limit reached, not measured: {', '.join(r['skipped'])}")
        for k, e in r.get("errors", {}).items():
            notes.append(f"{name}: {k} failed: {e}")
        if r.get("killed"):
            notes.append(f"{name}: stopped at its time limit ({r['killed']:.0f} s).")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def _table_head(int8: bool) -> list[str]:
    if not int8:
        return ["| measure | llavakit | transformers | ratio (llavakit / transformers) |", "|---|---|---|---|"]
    return ["| measure | llavakit | llavakit int8 | transformers | ratio (llavakit / transformers) | "
            "ratio (int8 / transformers) |", "|---|---|---|---|---|---|"]


def checkpoint_dir(cache: Path, preset: str, layers: int | None, dtype: str) -> Path:
    """Where the random checkpoint of these settings is cached (built on first use)."""
    return cache / f"{preset}-{layers or 'all'}-{dtype}"


def cached_checkpoint(cache: Path, preset: str, layers: int | None, dtype: str) -> Path:
    """The random checkpoint of these settings (`checkpoint_dir`), built the first time. It is
    built beside its place and renamed when complete, so an interrupted build is redone."""
    ckpt = checkpoint_dir(cache, preset, layers, dtype)
    if not (ckpt / "config.json").is_file():
        import torch

        from llavakit.random_init import make_random_checkpoint

        print(f"building {ckpt.name} ...", file=sys.stderr)
        building = ckpt.with_name(ckpt.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        make_random_checkpoint(building, preset, layers=layers, dtype=getattr(torch, dtype))
        shutil.rmtree(ckpt, ignore_errors=True)
        building.rename(ckpt)
    return ckpt


def _flags(args) -> list[str]:
    out = []
    for flag in ("preset", "dtype", "runs", "throughput_runs", "new_tokens", "concurrent_new_tokens", "threads",
                 "device"):
        out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return out + (["--only", args.only] if args.only else []) + (["--no-int8"] if args.no_int8 else [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b", help="a llavakit.random_init preset")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", type=int, help="truncate depth for quick runs")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (the median is reported)")
    p.add_argument("--throughput-runs", type=int, default=5, help="timed runs of the 8-request rows")
    p.add_argument("--new-tokens", "--output-tokens", type=int, default=32, help="tokens for the decode rate")
    p.add_argument("--concurrent-new-tokens", type=int, default=128, help="tokens per request in the 8-request rows")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU only)")
    p.add_argument("--time-limit", type=float, help="seconds for the whole run; partial results are still written")
    p.add_argument("--out", type=Path, default=ROOT / "results", help="folder for the .json and .md results")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache", help="folder for random checkpoints")
    p.add_argument("--no-int8", action="store_true", help="skip the llavakit int8 (weight-only) run")
    p.add_argument("--only", help="comma-separated measurement keys to run (e.g. decode_tok_s,ttft_384_s); "
                   "default: all")
    p.add_argument("--worker", choices=["llavakit", "llavakit-int8", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # time.time() a worker stops measuring at
    args = p.parse_args()
    started = time.time()

    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device.", file=sys.stderr)
        return 2
    if args.worker:
        rec = Recorder(Path(args.json_out), args.device, args.deadline,
                       set(args.only.split(",")) if args.only else None)
        rec.write()
        fn = worker_transformers if args.worker == "transformers" else worker_llavakit
        fn(Path(args.ckpt), args, rec)
        rec.write()
        return 0

    end = None if args.time_limit is None else started + args.time_limit
    ckpt = cached_checkpoint(args.cache, args.preset, args.layers, args.dtype)
    machine = machine_limits(args.device)
    weights = weight_bytes(ckpt)
    warm_page_cache(ckpt)
    name = (f"{args.preset}{f'-{args.layers}l' if args.layers else ''}-{args.dtype}"
            f"{'-cuda' if args.device == 'cuda' else ''}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    def save() -> str:
        meta = portable_args(vars(args))
        (args.out / f"{name}.json").write_text(json.dumps({"args": meta, "machine": machine, "weights": weights,
                                                           "results": results}, indent=2))
        table = report(results, machine, weights, args, ckpt)
        (args.out / f"{name}.md").write_text(table + "\n")
        return table

    engines = ["llavakit"] + ([] if args.no_int8 else ["llavakit-int8"]) + ["transformers"]
    shares = {"llavakit": LLAVAKIT_SHARE if args.no_int8 else LLAVAKIT_SHARE * 0.6,
              "llavakit-int8": LLAVAKIT_SHARE * 0.5, "transformers": 1.0}  # of the time left when each starts
    for engine in engines:
        out = args.cache / f"{name}.{engine}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", engine, "--ckpt", str(ckpt), "--json-out", str(out)] + _flags(args)
        timeout = None
        if end is not None:
            left = end - time.time() - 3  # room to write the report
            timeout = max(1.0, left * shares[engine])
            cmd += ["--deadline", str(time.time() + timeout - max(5.0, 0.1 * timeout))]
        print(f"running {engine}{'' if timeout is None else f' (at most {timeout:.0f} s)'} ...", file=sys.stderr)
        t = time.time()
        try:
            code = subprocess.run(cmd, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "killed"
        results[engine] = json.loads(out.read_text()) if out.is_file() else {}
        if code == "killed" and results[engine]:
            results[engine]["killed"] = time.time() - t
        elif code != 0:
            print(f"{engine} worker exited with {code}", file=sys.stderr)
        if engine == "llavakit-int8":
            results["int8_logits_cosine"] = logits_cosine(args.cache / f"{name}.llavakit.logits.pt",
                                                          args.cache / f"{name}.llavakit-int8.logits.pt")
        save()
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
