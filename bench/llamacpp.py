"""llavakit against llama.cpp on the same decoder, the same weights and the same CPU threads.

    pip install -e ".[bench]"          # llama-cpp-python, built from source with native CPU flags
    python bench/llamacpp.py           # the 0.5B OneVision preset's Qwen2 decoder, 2 threads
    python bench/llamacpp.py --pairs int4 --runs 3 --layers 4

What it does:
1. builds the preset with random bfloat16 weights (cached under bench/.cache) and writes its
   language model as GGUF files for llama.cpp (the `gguf` package): BF16, and Q8_0 / Q4_0 made from
   llavakit's own int8 / int4 quantisation of the same weights, byte for byte (llavakit's groups of
   32 with a float16 scale are exactly those blocks), so both engines multiply identical numbers;
2. starts one worker process per engine and pair (bf16↔BF16, int8↔Q8_0, int4↔Q4_0), each with
   --threads threads, and checks that both engines' greedy tokens agree for the first 16 tokens
   of the decode prompt;
3. times, alternating the two engines run by run, the median of --runs runs of: decoding
   --decode-tokens tokens after a --prompt-tokens prompt (end-of-sequence ignored, the prefill not
   counted), and prefilling a --prefill-tokens prompt (no prefix cache);
4. writes bench/results/llamacpp-<preset>[-<layers>l].json and .md with the machine (CPU model and
   flags, threads, read bandwidth) and every version.

Decode tokens/s are also given as the share of the measured read bandwidth they reach
(weight bytes read per token x tokens/s / bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from compare import _rss_mb, cached_checkpoint, portable_args  # noqa: E402  (bench/compare.py: VmRSS/VmHWM in MB; the random checkpoint)
PAIRS = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
AGREE_TOKENS = 16


# ───────────────────────────── GGUF ─────────────────────────────

def _gguf_name(name: str) -> str | None:
    """llama.cpp's tensor name for a llavakit decoder weight name; None for tensors it does not take."""
    if name == "language_model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "language_model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    if not name.startswith("language_model.layers."):
        return None
    rest = name.removeprefix("language_model.layers.")
    i, _, part = rest.partition(".")
    table = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    return f"blk.{i}.{table[part]}" if part in table else None


def _blocks(weight, bits: int) -> np.ndarray:
    """A (N, K) weight as GGUF Q8_0 / Q4_0 bytes (N, K/32 * block bytes), from llavakit's quantisation."""
    from llavakit.model.quant import quantize_weight

    q, s = quantize_weight(weight, bits, 32)
    n = q.shape[0]
    scales = s.numpy().view(np.uint8).reshape(n, -1, 2)  # (N, K/32, 2): the block's float16 d
    values = q.numpy().view(np.uint8).reshape(n, scales.shape[1], -1)  # (N, K/32, 32 or 16)
    return np.concatenate([scales, values], axis=-1).reshape(n, -1)


def write_gguf(ckpt: Path, out: Path, kind: str) -> Path:
    """Write the checkpoint's language model (Qwen2 / Llama layout) as a GGUF file of `kind` (BF16, Q8_0, Q4_0)."""
    import gguf
    import torch
    from tokenizers import Tokenizer

    from llavakit.config import LlavaConfig
    from llavakit.weights import canonical_key, read_raw_config, read_tensors

    raw = read_raw_config(ckpt)
    cfg = LlavaConfig.from_hf(raw).text
    arch = {"qwen2": "qwen2", "llama": "llama", "mistral": "llama"}[cfg.model_type]
    if arch != "qwen2":
        raise SystemExit("this benchmark converts Qwen2 decoders only (the OneVision presets)")
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"{ckpt.name}-{kind}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type({"BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    # The vocabulary, so that llama.cpp can load the file; both engines are fed token ids directly.
    tok = json.loads(Tokenizer.from_file(str(ckpt / "tokenizer.json")).to_str())
    vocab = dict(tok["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab.update(specials)
    size = cfg.vocab_size
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        if i < size:
            tokens[i] = text
            types[i] = gguf.TokenType.CONTROL if text in specials else gguf.TokenType.NORMAL
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    gen = raw["text_config"]
    for key, add in (("eos_token_id", w.add_eos_token_id), ("bos_token_id", w.add_bos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        if gen.get(key) is not None:
            add(int(gen[key]))
    w.add_add_bos_token(False)
    for key, t in read_tensors(ckpt):
        name = _gguf_name(canonical_key(key))
        if name is None:
            continue
        if t.dim() == 2:
            if kind == "BF16":
                w.add_tensor(name, t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                             raw_shape=list(t.shape), raw_dtype=qtype)
            else:
                w.add_tensor(name, _blocks(t, 8 if kind == "Q8_0" else 4), raw_dtype=qtype)
        else:
            w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


# ───────────────────────────── workers ─────────────────────────────

class LlavakitEngine:
    """llavakit's engine fed token ids: the path `chat`, `generate` and the server take."""

    def __init__(self, vlm):
        self.vlm, self.engine = vlm, vlm.engine

    @classmethod
    def load(cls, ckpt: Path, pair: str, threads: int, dtype=None) -> LlavakitEngine:
        """The checkpoint in bfloat16 (or `dtype`), quantised as `pair` says (bf16: not at all)."""
        import torch

        import llavakit

        torch.set_num_threads(threads)
        return cls(llavakit.load(ckpt, dtype=dtype or torch.bfloat16, quantize="none" if pair == "bf16" else pair))

    def _request(self, ids: list[int], n: int):
        from llavakit import SamplingParams
        from llavakit.processing.processor import Encoded

        enc = Encoded(prompt="", input_ids=list(ids), pixel_values=None, image_layouts=(),
                      video_pixels=None, video_layouts=())
        self.engine.clear_caches()
        self.engine.add_request("bench", enc, SamplingParams(max_new_tokens=n, ignore_eos=True))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self._request(ids, n)
        out = []
        while self.engine.has_unfinished():
            out += [d.token_id for _, d in self.engine.step() if d.token_id is not None]
        return out

    def decode(self, ids: list[int], n: int) -> float:
        self._request(ids, n)
        self.engine.step()  # prefill and the first token
        t = time.perf_counter()
        steps = 0
        while self.engine.has_unfinished():
            self.engine.step()
            steps += 1
        return (time.perf_counter() - t) / steps

    def prefill(self, ids: list[int]) -> float:
        self._request(ids, 1)
        t = time.perf_counter()
        while self.engine.has_unfinished():
            self.engine.step()
        return time.perf_counter() - t


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, fed token ids; greedy picks by argmax of the last logits."""

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)

    def _next(self) -> int:
        # The last position's logits as llama.cpp left them (Llama.eval no longer copies them out).
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = [self._next()]
        while len(out) < n:
            self.llm.eval([out[-1]])
            out.append(self._next())
        return out

    def decode(self, ids: list[int], n: int) -> float:
        self.llm.reset()
        self.llm.eval(ids)
        token = self._next()
        t = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([token])
            token = self._next()
        return (time.perf_counter() - t) / (n - 1)

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        self._next()
        return time.perf_counter() - t


def decode_logits_cosine(ckpt: Path, method: str, prompt: list[int], n: int, threads: int) -> dict:
    """Cosine similarity of `method`'s decode-step logits with float32's, step by step while both
    greedy answers agree (the same context, so the same logits up to rounding): the numbers the
    native decode kernels produce, not a prefill's."""
    import torch

    runs = {}
    for name, pair, dtype in (("float32", "bf16", torch.float32), (method, method, torch.bfloat16)):
        engine = LlavakitEngine.load(ckpt, pair, threads, dtype)
        captured = []
        head = engine.vlm.model.lm_head
        hook = head.register_forward_hook(lambda _m, _i, out: captured.append(out.float().reshape(-1, out.shape[-1])[-1]))
        tokens = engine.greedy(prompt, n)
        hook.remove()
        runs[name] = (tokens, captured[-n:])  # the last n heads: the prompt's last position, then each decode step
        del engine
    (ft, fl), (qt, ql) = runs["float32"], runs[method]
    cosines = []
    for i in range(n):
        cosines.append(float(torch.nn.functional.cosine_similarity(fl[i].double(), ql[i].double(), dim=0)))
        if ft[i] != qt[i]:
            break
    return {"steps_compared": len(cosines), "min_cosine": min(cosines), "cosines": cosines}


def worker(args) -> int:
    """Serve commands from the parent, one JSON line each, until stdin closes."""
    if args.worker.startswith("cosine-"):
        result = decode_logits_cosine(Path(args.ckpt), args.worker.removeprefix("cosine-"),
                                      json.loads(args.prompt), AGREE_TOKENS, args.threads)
        print(json.dumps({"ready": True, "rss_mb": _rss_mb("VmRSS"), "cosine": result}), flush=True)
        return 0
    if args.worker == "llama.cpp":
        engine = LlamaCppEngine(Path(args.gguf), args.threads, args.prefill_tokens + 64)
    else:
        engine = LlavakitEngine.load(Path(args.ckpt), args.worker, args.threads)
    print(json.dumps({"ready": True, "rss_mb": _rss_mb("VmRSS")}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "greedy":
            result = engine.greedy(cmd["ids"], cmd["n"])
        elif op == "decode":
            result = engine.decode(cmd["ids"], cmd["n"])
        else:
            result = engine.prefill(cmd["ids"])
        print(json.dumps({"result": result}), flush=True)
    return 0


class Worker:
    """A worker process answering one JSON line per command."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self._line())

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[-1]} died (exit {self.proc.wait()})")
        return line

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())["result"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ───────────────────────────── the run ─────────────────────────────

def machine_info(threads: int) -> dict:
    """CPU model and flags, thread count, read bandwidth (1 GiB sum, median of 5) and versions."""
    import torch

    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags") and key not in cpu:
                cpu[key] = value.strip()
    except OSError:
        pass
    flags = set(cpu.get("flags", "").split())
    interesting = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                   "avx_vnni"]
    torch.set_num_threads(threads)
    a = torch.ones(256 << 20, dtype=torch.float32)  # 1 GiB, summed by `threads` threads
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    bandwidth = a.numel() * 4 / statistics.median(times) / 1e9
    del a
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("llama-cpp-python", "gguf", "numpy", "llavakit"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu.get("model name", platform.processor()), "flags": [f for f in interesting if f in flags],
            "cores": os.cpu_count(), "threads": threads, "read_bandwidth_gbs": bandwidth,
            "versions": versions}


def decoder_bytes(ckpt: Path) -> dict:
    """Weight bytes one decoded token reads per format: every decoder matrix and the output head."""
    from safetensors import safe_open

    from llavakit.weights import canonical_key, weight_files

    raw = json.loads((ckpt / "config.json").read_text())
    tied = bool(raw.get("tie_word_embeddings"))
    matrices = small = 0
    for path in weight_files(ckpt):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name = canonical_key(key)
                shape = f.get_slice(key).get_shape()
                if name.startswith("language_model.layers.") or name == "language_model.norm.weight":
                    if len(shape) == 2:
                        matrices += shape[0] * shape[1]
                    else:
                        small += shape[0] * 4
                if name == "lm_head.weight" or (tied and name == "language_model.embed_tokens.weight"):
                    matrices += shape[0] * shape[1]
    return {"bf16": matrices * 2 + small, "int8": matrices * 34 // 32 + small, "int4": matrices * 18 // 32 + small}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b", help="a OneVision (Qwen2) preset")
    p.add_argument("--layers", type=int, help="truncate the decoder's depth for quick runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement and engine (median reported)")
    p.add_argument("--pairs", default="bf16,int8,int4", help="comma-separated: bf16, int8, int4")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=1536)
    p.add_argument("--no-prefill", action="store_true", help="time decode only")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    p.add_argument("--no-cosine", action="store_true", help="skip the logits check against float32")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    ckpt = cached_checkpoint(args.cache, args.preset, args.layers, "bfloat16")
    stem = ckpt.name
    pairs = [x.strip() for x in args.pairs.split(",") if x.strip()]
    unknown = [x for x in pairs if x not in PAIRS]
    if unknown:
        raise SystemExit(f"unknown pair(s) {unknown}; choose from {', '.join(PAIRS)}")
    ggufs = {}
    for pair in pairs:
        path = args.cache / f"{stem}.{PAIRS[pair]}.gguf"
        if not path.is_file():
            print(f"writing {path.name} ...", file=sys.stderr)
            write_gguf(ckpt, path, PAIRS[pair])
        ggufs[pair] = path
    machine = machine_info(args.threads)
    weights = decoder_bytes(ckpt)
    vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    rng = np.random.default_rng(0)
    prompt = rng.integers(300, min(vocab, 20000), args.prompt_tokens).tolist()
    long_prompt = rng.integers(300, min(vocab, 20000), args.prefill_tokens).tolist()
    results: dict = {}
    name = f"llamacpp-{args.preset}{f'-{args.layers}l' if args.layers else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, __file__, "--threads", str(args.threads), "--prefill-tokens", str(args.prefill_tokens)]
    for pair in pairs:
        print(f"{pair} <-> {PAIRS[pair]} ...", file=sys.stderr)
        ours = Worker(me + ["--ckpt", str(ckpt), "--worker", pair])
        theirs = Worker(me + ["--gguf", str(ggufs[pair]), "--worker", "llama.cpp"])
        row = {"llavakit_rss_mb": ours.info["rss_mb"], "llamacpp_rss_mb": theirs.info["rss_mb"]}
        a, b = ours.ask(op="greedy", ids=prompt, n=AGREE_TOKENS), theirs.ask(op="greedy", ids=prompt, n=AGREE_TOKENS)
        row["greedy_llavakit"], row["greedy_llamacpp"] = a, b
        row["greedy_agree_tokens"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), AGREE_TOKENS)
        ops = [("decode", dict(op="decode", ids=prompt, n=args.decode_tokens))]
        if not args.no_prefill:
            ops.append(("prefill", dict(op="prefill", ids=long_prompt)))
        for key, cmd in ops:
            ours.ask(**cmd), theirs.ask(**cmd)  # warm-up
            times = {"llavakit": [], "llamacpp": []}
            for i in range(args.runs):  # alternate, and alternate who goes first
                order = [("llavakit", ours), ("llamacpp", theirs)]
                for who, w in (order if i % 2 == 0 else order[::-1]):
                    times[who].append(w.ask(**cmd))
            for who, ts in times.items():
                row[f"{key}_{who}_s"] = statistics.median(ts)
                row[f"{key}_{who}_all_s"] = ts
        ours.close()
        theirs.close()
        if not args.no_cosine:
            check = Worker(me + ["--ckpt", str(ckpt), "--worker", f"cosine-{pair}", "--prompt", json.dumps(prompt)])
            row["decode_logits_vs_float32"] = check.info["cosine"]
            check.close()
        results[pair] = row
        write(args.out / name, machine, weights, results, vars(args))
    print((args.out / f"{name}.md").read_text())
    return 0


def _cosine_cell(check: dict | None) -> str:
    if not check:
        return "—"
    return f"{check['min_cosine']:.5f} ({check['steps_compared']} steps)"


def _seconds(s: float | None) -> str:
    return f"{s:.2f}" if s else "—"  # "—": not measured (--no-prefill)


def write(stem: Path, machine: dict, weights: dict, results: dict, args: dict) -> None:
    """The .json with everything and the .md table."""
    meta = portable_args(args)
    stem.with_name(stem.name + ".json").write_text(json.dumps({"args": meta, "machine": machine, "decoder_bytes_per_token": weights,
                                                    "results": results}, indent=2))
    bw = machine["read_bandwidth_gbs"]
    lines = [f"llavakit against llama.cpp — {machine['cpu']}, {machine['threads']} threads, flags "
             f"{' '.join(machine['flags'])}, read bandwidth {bw:.1f} GB/s; medians of {args['runs']} alternating runs",
             "", "| pair | decode llama.cpp tok/s | decode llavakit tok/s | ratio | share of read bandwidth "
             "(llama.cpp / llavakit) | prefill llama.cpp s | prefill llavakit s | prefill ratio | greedy tokens agree | "
             "llavakit decode logits vs float32 (cosine, worst step) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for pair, r in results.items():
        dl, do = r.get("decode_llamacpp_s"), r.get("decode_llavakit_s")
        pl, po = r.get("prefill_llamacpp_s"), r.get("prefill_llavakit_s")
        tl, to = (1 / dl if dl else None), (1 / do if do else None)
        share = (f"{weights[pair] * tl / 1e9 / bw:.0%} / {weights[pair] * to / 1e9 / bw:.0%}" if tl and to else "—")
        lines.append(f"| {pair} ↔ {PAIRS[pair]} | {tl or 0:.1f} | {to or 0:.1f} | {to / tl if tl and to else 0:.2f}× | "
                     f"{share} | {_seconds(pl)} | {_seconds(po)} | {f'{pl / po:.2f}× faster' if pl and po else '—'} | "
                     f"{r['greedy_agree_tokens']}/{AGREE_TOKENS} | {_cosine_cell(r.get('decode_logits_vs_float32'))} |")
    lines += ["", f"versions: {json.dumps(machine['versions'])}"]
    stem.with_name(stem.name + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
