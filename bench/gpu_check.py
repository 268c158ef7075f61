"""The one prepared command for a short turn on a GPU machine: versions, a CUDA correctness smoke,
then bench/compare.py on the GPU for a small and a 7B preset, all inside a wall-clock budget.

    PYTHONPATH=. python3 bench/gpu_check.py --out "$OUT"                       # the GPU run, about 7 minutes
    PYTHONPATH=. python3 bench/gpu_check.py --device cpu --quick --out out-cpu  # the same logic on a CPU
    PYTHONPATH=. python3 bench/gpu_check.py --tensor-parallel 2 --out "$OUT"   # only the tensor-parallel check

Steps, each printed in a line or two (the log of everything is <out>/gpu_check.log):
  1. versions: torch, CUDA, transformers, the GPU;
  2. the big preset's random checkpoint starts building in the background (bf16, full depth; ~14 GB
     for llava-1.5-7b), while
  3. the smoke runs: a `tiny` random checkpoint loaded on the CPU and on the device, both float32
     with TF32 off, must agree: logits of a padded two-image batch (max |diff| <= 1e-3), greedy
     `chat` tokens, an engine batch (prefix cache, padded decode), seeded sampling (repeatable on the
     device), a batch mixing greedy and CPU-sampled rows; then "auto" (bf16) and float16 run, and
     one decode step is audited for host syncs and for work left on the CPU;
  4. compare.py --device <device> for the small preset, then for the big one (full depth if its
     build finished in time, else --layers 8, said in the output and the table);
  5. bench/graph_decode.py: the small preset's batch-1 decode with the step captured as a CUDA
     graph against the same step run eagerly (tokens/s, same tokens).
Results go to <out> as they are made: smoke.json, <preset>-...-cuda.json/.md, gpu_check.log. The
whole run ends within --budget seconds; a benchmark stopped by its limit still writes what it measured.

With --tensor-parallel N (a machine with N GPUs; with fewer it says so and stops) the run is only the
tensor-parallel check instead: the `tiny` checkpoint in float32 (TF32 off) on one GPU against N ranks
(NCCL, one GPU each): logits of a padded two-image batch (max |diff| <= 1e-3), greedy engine tokens;
then the small preset in bf16, batch-1 decode and a 1,024-token prefill, 1 GPU against N. Written to
<out>/tensor_parallel.json.
Needs torch, transformers, tokenizers, safetensors, jinja2, pillow, numpy; not pytest, fastapi or av.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import compare  # noqa: E402  (bench/compare.py: its helpers and checkpoint naming)

START = time.time()
LOG: Path | None = None


def say(line: str) -> None:
    """Print one progress line (with seconds since start) and append it to the log."""
    text = f"[{time.time() - START:5.0f}s] {line}"
    print(text, flush=True)
    if LOG is not None:
        with LOG.open("a") as f:
            f.write(text + "\n")


# ───────────────────────────── 1. versions ─────────────────────────────


def versions(device: str) -> dict:
    import torch

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
         "cpus": os.cpu_count()}
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except ImportError as e:
        v["transformers"] = f"missing ({e})"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        v.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                 gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    return v


# ───────────────────────────── 2. background build ─────────────────────────────


def start_build(ckpt: Path, preset: str, layers: int | None, log: Path) -> subprocess.Popen | None:
    """Build a random checkpoint in a child process (bf16), into a side folder renamed when complete."""
    if (ckpt / "config.json").is_file():
        return None
    code = (
        "import shutil, sys, torch; from pathlib import Path\n"
        "from llavakit.random_init import make_random_checkpoint\n"
        "torch.set_num_threads(4)  # leave the other cores to the benchmarks running meanwhile\n"
        "out, tmp = Path(sys.argv[1]), Path(sys.argv[1] + '.building')\n"
        "shutil.rmtree(tmp, ignore_errors=True)\n"
        f"make_random_checkpoint(tmp, {preset!r}, layers={layers!r}, dtype=torch.bfloat16)\n"
        "shutil.rmtree(out, ignore_errors=True); tmp.rename(out)\n"
    )
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        return subprocess.Popen([sys.executable, "-c", code, str(ckpt)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, env=_env())


def _env() -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# ───────────────────────────── tensor parallel (--tensor-parallel N) ─────────────────────────────


def tensor_parallel_check(n: int, device: str, work: Path, cache: Path, small: str, layers: int | None) -> dict:
    """One device against N tensor-parallel ranks: the same numbers, and the speed of each; nothing raised."""
    import torch

    import llavakit
    from llavakit.random_init import make_random_checkpoint
    from llamacpp import LlavakitEngine

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    r: dict = {"size": n, "checks": {}}
    have = torch.cuda.device_count() if device == "cuda" else os.cpu_count()
    if have < n:
        say(f"  tensor parallel {n} needs {n} {'GPUs' if device == 'cuda' else 'cores'}; this machine has {have}")
        return {**r, "ok": None, "skipped": f"{have} devices"}
    ck = make_random_checkpoint(work / "tiny", "tiny")  # float32
    convs = [compare._conv(compare._image(0, 384, 384), "What is in the picture?"),
             compare._conv(compare._image(1, 640, 480), "Describe the image in detail, please, with every colour.")]
    try:
        one = llavakit.load(ck, dtype="float32", device=device)
        tp = llavakit.load(ck, dtype="float32", device=device, tensor_parallel_size=n)
        batch = one.prepare(convs)
        valid = batch.attention_mask.bool()
        diff = float((one.forward(batch) - tp.forward(batch)).abs()[valid].max())
        params = llavakit.SamplingParams(max_new_tokens=24, ignore_eos=True)
        same = [o.token_ids for o in one.generate(convs, params)] == [o.token_ids for o in tp.generate(convs, params)]
        r["checks"] = {"logits_fp32": {"ok": diff <= 1e-3, "detail": f"max |diff| {diff:.2e}"},
                       "greedy_engine": {"ok": same,
                                         "detail": "2 requests x 24 tokens " + ("equal" if same else "DIFFER")}}
        tp.close()
        del one, tp
        ckpt = compare.cached_checkpoint(cache, small, layers, "bfloat16")
        vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
        prompt = [300 + (i * 7919) % min(vocab - 300, 20000) for i in range(1024)]
        for size in (1, n):
            vlm = llavakit.load(ckpt, dtype="bfloat16", device=device, tensor_parallel_size=size)
            engine = LlavakitEngine(vlm)
            engine.decode(prompt[:64], 8)  # warm-up
            r[f"decode_tok_s_{size}"] = 1 / engine.decode(prompt[:64], 128)
            r[f"prefill_1024_s_{size}"] = engine.prefill(prompt)
            vlm.close()
            del vlm, engine
            torch.cuda.empty_cache()
        say(f"  {small} bf16: decode {r['decode_tok_s_1']:.1f} tok/s in one process, {r[f'decode_tok_s_{n}']:.1f} on "
            f"{n} ranks; 1,024-token prefill {r['prefill_1024_s_1']:.3f} s against {r[f'prefill_1024_s_{n}']:.3f} s")
    except Exception as e:
        r["error"] = traceback.format_exc()[-3000:]
        say(f"  tensor parallel crashed: {type(e).__name__}: {e}")
    for name, c in r["checks"].items():
        say(f"  {'PASS' if c['ok'] else 'FAIL'} {name}: {c['detail']}")
    r["ok"] = bool(r["checks"]) and all(c["ok"] for c in r["checks"].values()) and "error" not in r
    return r


# ───────────────────────────── 3. smoke ─────────────────────────────


def smoke(device: str, work: Path) -> dict:
    """CPU float32 against `device` float32 on a tiny random checkpoint; every check recorded, none raised."""
    import torch

    import llavakit
    from llavakit.random_init import make_random_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 must mean float32 for a 1e-3 comparison
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding is a convolution
    r: dict = {"checks": {}}

    def check(name: str, fn) -> None:
        try:
            ok, detail = fn()
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
            r.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
        r["checks"][name] = {"ok": bool(ok), "detail": detail}
        say(f"  {'PASS' if ok else 'FAIL'} {name}: {detail}")

    ck = make_random_checkpoint(work / "tiny", "tiny")  # float32
    img_a, img_b = compare._image(0, 384, 384), compare._image(1, 640, 480)
    convs = [compare._conv(img_a, "What is in the picture?"),
             compare._conv(img_b, "Describe the image in detail, please, with every colour.")]
    cpu = llavakit.load(ck, dtype="float32")
    dev = llavakit.load(ck, dtype="float32", device=device)

    def placement():
        where = {str(dev.device), str(dev.model.language_model.inv_freq.device), str(dev.engine.keys[0].device)}
        return all(w.startswith(device) for w in where), f"weights, rope table, KV pool on {sorted(where)}"

    check("placement", placement)

    def logits():
        batch = cpu.prepare(convs)
        a, b = cpu.forward(batch), dev.forward(batch)
        valid = batch.attention_mask.bool()
        diff = float((a - b.cpu()).abs()[valid].max())
        return diff <= 1e-3, f"max |diff| {diff:.2e} over {int(valid.sum())} positions (|logits| up to {float(a.abs().max()):.1f})"

    check("logits_fp32", logits)

    def greedy():
        a, b = cpu.chat(convs[0], max_new_tokens=24).token_ids, dev.chat(convs[0], max_new_tokens=24).token_ids
        return a == b, f"{len(a)} tokens, {'equal' if a == b else f'first difference at {_first_diff(a, b)}'}"

    check("greedy_chat", greedy)

    def engine_batch():  # the same image twice: the prefix cache and a masked prefill; 3 rows: padded decode
        many = convs + [compare._conv(img_a, "What colours do you see?")]
        params = llavakit.SamplingParams(max_new_tokens=16, ignore_eos=True)
        a = [o.token_ids for o in cpu.generate(many, params)]
        b = [o.token_ids for o in dev.generate(many, params)]
        hits = dev.engine.stats()["prefix_cache_hit_tokens"]
        return a == b and hits > 0, f"3 requests x 16 tokens {'equal' if a == b else 'DIFFER'}, prefix-cache hit tokens {hits}"

    check("engine_batch", engine_batch)

    def seeded():
        sp = llavakit.SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
        s1, s2 = dev.chat(convs[1], sampling=sp).token_ids, dev.chat(convs[1], sampling=sp).token_ids
        s_cpu = cpu.chat(convs[1], sampling=sp).token_ids
        return s1 == s2 and len(s1) == 16, (f"repeatable {'yes' if s1 == s2 else 'NO'}, same draws as on the CPU "
                                             f"{'yes' if s1 == s_cpu else 'no (logits differ in the last bits)'}")

    check("seeded_sampling", seeded)

    def mixed():  # greedy rows by argmax on the device, the other rows on the CPU, in one step
        ps = [llavakit.SamplingParams(max_new_tokens=8, ignore_eos=True),
              llavakit.SamplingParams(max_new_tokens=8, repetition_penalty=1.3, logprobs=True, top_logprobs=3,
                                      ignore_eos=True)]
        a, b = cpu.generate(convs, ps), dev.generate(convs, ps)
        same = [x.token_ids for x in a] == [x.token_ids for x in b]
        return same, f"greedy + penalty/logprobs rows {'equal' if same else 'DIFFER'}"

    check("mixed_sampling", mixed)

    for dtype in ("auto", "float16"):
        def half(dtype=dtype):
            m = llavakit.load(ck, dtype=dtype, device=device)
            batch = cpu.prepare(convs)
            diff = float((cpu.forward(batch) - m.forward(batch).cpu()).abs()[batch.attention_mask.bool()].max())
            out = m.generate(convs, llavakit.SamplingParams(max_new_tokens=8, ignore_eos=True))
            finite = all(len(o.token_ids) == 8 for o in out) and diff == diff
            return finite, f"runs as {str(m.dtype)[6:]}, logits max |diff| to fp32 {diff:.3f}, 2 requests answered"

        check(f"dtype_{dtype}", half)
    check("decode_step_audit", lambda: _audit_decode(dev, convs, llavakit, device))
    r["ok"] = all(c["ok"] for c in r["checks"].values())
    return r


def _first_diff(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _audit_decode(vlm, convs, llavakit, device: str) -> tuple[bool, str]:
    """Host syncs (CUDA sync debug mode) and torch calls that produce CPU tensors during 4 decode steps of 3 rows.

    On a GPU, expected: two syncs per step (the one host-to-device copy of the step's indices, the
    one copy of the picked ids back) and CPU tensors only where the engine packs those indices.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    engine = vlm.engine
    params = llavakit.SamplingParams(max_new_tokens=12, ignore_eos=True)
    for i, c in enumerate(convs + [convs[0]]):
        engine.add_request(f"audit-{i}", vlm.processor.encode(c), params)
    while any(not s.state.ids for s in engine.running) or engine.waiting:
        engine.step()  # prefill until every row decodes
    cpu_sites: dict[str, int] = {}

    class CpuOutputs(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.device.type == "cpu":
                frames = [f for f in traceback.extract_stack()[:-1] if "llavakit" in f.filename]
                if frames:
                    site = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"
                    cpu_sites[site] = cpu_sites.get(site, 0) + 1
            return out

    steps = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with CpuOutputs():
                for _ in range(steps):
                    engine.step()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    for i in range(3):
        engine.abort(f"audit-{i}")
    engine.step()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites: dict[str, int] = {}
    for w in syncs:
        site = f"{Path(w.filename).name}:{w.lineno}"
        sites[site] = sites.get(site, 0) + 1
    per_step = len(syncs) / steps
    cpu_per_step = {k: v // steps for k, v in cpu_sites.items()}
    if device != "cuda":  # everything is a CPU tensor here: this only exercises the audit itself
        return True, f"(CPU run: no sync audit) {len(cpu_sites)} call sites made CPU tensors"
    return per_step <= 3, (f"{per_step:g} host syncs per step ({', '.join(f'{k} x{v // steps}' for k, v in sites.items())}); "
                           f"CPU tensors made per step: {cpu_per_step or 'none'}")


# ───────────────────────────── 4. benchmarks ─────────────────────────────


def run_compare(preset: str, layers: int | None, device: str, limit: float, opts: list[str], out: Path,
                cache: Path, log: Path) -> bool:
    cmd = [sys.executable, str(BENCH / "compare.py"), "--device", device, "--preset", preset, "--time-limit",
           f"{limit:.0f}", "--out", str(out), "--cache", str(cache)] + opts
    if layers:
        cmd += ["--layers", str(layers)]
    say(f"== compare {preset}{f' --layers {layers}' if layers else ''} (at most {limit:.0f} s)")
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_env(),
                                  timeout=limit + 30).returncode
        except subprocess.TimeoutExpired:
            code = "killed"
    name = f"{preset}{f'-{layers}l' if layers else ''}-bfloat16{'-cuda' if device == 'cuda' else ''}"
    md = out / f"{name}.md"
    if md.is_file():
        print(md.read_text(), flush=True)
    if code != 0:
        say(f"compare exited with {code}; the log's last lines:")
        print("\n".join(log.read_text().splitlines()[-15:]), flush=True)
    return code == 0


def run_graph_decode(device: str, layers: int | None, limit: float, out: Path, cache: Path) -> dict | None:
    """Step 5: bench/graph_decode.py in its own process, within `limit` seconds."""
    if limit < 20:
        say(f"no time left for the graph decode ({limit:.0f} s)")
        return None
    cmd = [sys.executable, str(BENCH / "graph_decode.py"), "--device", device, "--out", str(out / "graph_decode.json"),
           "--cache", str(cache)] + (["--layers", str(layers), "--tokens", "16", "--runs", "2"] if layers else [])
    say(f"== graph decode (at most {limit:.0f} s)")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=limit)
    except subprocess.TimeoutExpired:
        say("  graph decode ran out of time")
        return None
    with LOG.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n" + done.stdout + done.stderr)
    if done.returncode != 0:
        say(f"  graph decode exited with {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    say("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


def main() -> int:
    global LOG
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or BENCH / "results" / "gpu_check"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="1-layer presets, 2 runs, few tokens: a test of this script")
    p.add_argument("--budget", type=float, default=500, help="seconds for the whole run")
    p.add_argument("--cache", type=Path, default=BENCH / ".cache", help="folder for the random checkpoints")
    p.add_argument("--small", default="llava-onevision-qwen2-0.5b")
    p.add_argument("--big", default="llava-1.5-7b")
    p.add_argument("--skip-smoke", action="store_true")
    p.add_argument("--tensor-parallel", type=int, default=0, metavar="N",
                   help="run only the tensor-parallel check over N devices (see above)")
    args = p.parse_args()
    end = START + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    LOG = args.out / "gpu_check.log"
    LOG.write_text("")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        say("torch sees no CUDA device; nothing to check.")
        return 2
    v = versions(args.device)
    say("== versions: " + ", ".join(f"{k} {v[k]}" for k in v))
    if args.tensor_parallel:
        say(f"== tensor parallel: {args.tensor_parallel} ranks against one {args.device}")
        result = tensor_parallel_check(args.tensor_parallel, args.device, args.cache / "gpu_check_tp", args.cache,
                                       args.small, 1 if args.quick else None)
        (args.out / "tensor_parallel.json").write_text(json.dumps({"versions": v, **result}, indent=2))
        say(f"== done: tensor parallel {'PASS' if result['ok'] else 'skipped' if result['ok'] is None else 'FAIL'}")
        return 0

    if args.quick:  # enough to run every line of this script and of compare.py, quickly
        small_layers, big_layers = 1, 1
        small_opts = big_opts = ["--runs", "2", "--throughput-runs", "1", "--new-tokens", "8",
                                 "--concurrent-new-tokens", "8"]
    else:
        small_layers, big_layers = None, None
        small_opts = ["--runs", "5", "--throughput-runs", "2", "--new-tokens", "64", "--concurrent-new-tokens", "64"]
        big_opts = ["--runs", "3", "--throughput-runs", "1", "--new-tokens", "64", "--concurrent-new-tokens", "64"]
    big_ckpt = compare.checkpoint_dir(args.cache, args.big, big_layers, "bfloat16")
    build = start_build(big_ckpt, args.big, big_layers, LOG)
    say(f"building {big_ckpt.name} in the background" if build else f"{big_ckpt.name} already built")

    summary = {"versions": v}
    if not args.skip_smoke:
        say(f"== smoke: {args.device} float32 against cpu float32 (TF32 off), tiny random checkpoint")
        work = args.cache / "gpu_check_smoke"
        shutil.rmtree(work, ignore_errors=True)
        try:
            summary["smoke"] = smoke(args.device, work)
        except Exception as e:
            summary["smoke"] = {"ok": False, "error": traceback.format_exc()[-3000:]}
            say(f"  smoke crashed: {type(e).__name__}: {e}")
        (args.out / "smoke.json").write_text(json.dumps(summary, indent=2))

    # The big preset needs the most time: the small one gets what is left beyond the big one's share.
    big_share = 0.55 if build else 0.5
    small_limit = max(30.0, (end - time.time()) * (1 - big_share))
    summary["small_ok"] = run_compare(args.small, small_layers, args.device, small_limit, small_opts, args.out,
                                      args.cache, LOG)

    if build is not None:
        # Wait for the full-depth build while enough time would remain to benchmark it; else fall back.
        while build.poll() is None and end - time.time() > 170:
            time.sleep(2)
        if build.poll() is None or build.returncode != 0:
            if build.poll() is None:
                build.kill()
                build.wait()
            say(f"{big_ckpt.name} was not ready in time (or failed): the big preset runs with --layers 8")
            big_layers = big_layers or 8
        else:
            say(f"{big_ckpt.name} built")
    graph_reserve = 75  # seconds kept for step 5
    limit = end - time.time() - 10 - graph_reserve
    if limit > 60:
        summary["big_ok"] = run_compare(args.big, big_layers, args.device, limit, big_opts, args.out, args.cache, LOG)
    else:
        say(f"no time left for {args.big} ({limit:.0f} s)")
    summary["graph_decode"] = run_graph_decode(args.device, small_layers, end - time.time() - 5, args.out, args.cache)
    (args.out / "smoke.json").write_text(json.dumps(summary, indent=2))
    smoke_ok = summary.get("smoke", {}).get("ok")
    say(f"== done: smoke {'PASS' if smoke_ok else 'FAIL' if smoke_ok is False else 'skipped'}, "
        f"files in {args.out.name}/: {', '.join(sorted(f.name for f in args.out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
