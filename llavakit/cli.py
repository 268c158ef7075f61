"""Command line: one plain function per subcommand.

    llavakit chat [--model DIR] [--image PATH ...] [--video PATH] ["question"]   one answer, or a chat
    llavakit info [--model DIR] [--image PATH]                    architecture, sizes, token ids, template
    llavakit convert --to hf|original SRC DST                     between checkpoint formats
    llavakit make-random --out DIR [--preset tiny]                a checkpoint with random weights
    llavakit serve [--model DIR] [--host H] [--port P] [limits]   an OpenAI-compatible HTTP server
    llavakit serve --replicas N [--ray-address ADDR]            the same over N engine replicas on Ray Serve
    llavakit make-shapes --out DIR --n N [--world grid|free] [--seed S]  the synthetic shapes world (train/test JSONL)
    llavakit pretrain-tower --vision SPEC --out DIR               a vision tower pretrained on the shapes world
    llavakit init --family F --vision DIR|SPEC --text DIR|SPEC --out DIR   a new checkpoint to train
    llavakit train [--model DIR] --data FILE.jsonl --stage projector|full|lora --out DIR   visual instruction tuning
    torchrun --nproc-per-node N -m llavakit train ... [--fsdp]    the same, data-parallel on N processes
    llavakit merge-lora --model DIR --adapter DIR --out DIR      fold a LoRA adapter into a checkpoint
    llavakit eval --model DIR --data test.jsonl                  accuracy per question type (--score shapes: per tag)
    llavakit batch --input DIR|FILE --output out.jsonl [--resume] [--ray]  answer many requests offline
    llavakit --version

Wherever a model is read, --model takes a folder, a hub id (org/name) or `llava-shapes`, the tiny
model shipped in the package (the default). Building the parser imports no torch, so `--help` and
`--version` answer at once: imports that need torch live inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .errors import LlavakitError
from .families import FAMILIES

SHIPPED_MODEL_NAME = "llava-shapes"  # what --model and llavakit.load() call the shipped model
SHIPPED_MODEL = Path(__file__).parent / "assets" / SHIPPED_MODEL_NAME

# Copies of defaults defined next to torch code (random_init.PRESETS, train.loop's STAGES and
# TrainConfig), so that building the parser imports no torch; tests/test_cli.py checks they agree.
RANDOM_PRESETS = ("tiny", "llava-1.5-7b", "llava-v1.6-mistral-7b", "llava-next-video-7b", "llava-onevision-qwen2-0.5b",
                  "llava-onevision-qwen2-7b")
TRAIN_STAGES = ("projector", "full", "lora")
TRAIN_DEFAULTS = dict(stage="full", epochs=1.0, batch_size=8, grad_accum=1, lr=2e-5, warmup_ratio=0.03,
                      weight_decay=0.0, max_grad_norm=1.0, max_length=2048, lora_r=8, lora_alpha=16,
                      lora_dropout=0.0, save_every=0, eval_every=0, keep_checkpoints=2, on_bad_data="fail",
                      group_by_length=False, share_media=False, seed=0)

# --threads auto: one thread for models this small. A step of theirs is mostly Python, so a second
# thread gains nothing, and when another process holds a core every parallel op waits for the
# descheduled thread. Measured on 2 cores, 1 vs 2 threads (medians of 3): the shipped model (3.8M
# parameters) decoded 348 vs 363 tok/s idle but 317 vs 109 tok/s with one core busy, and trained 12
# steps in 5.8 vs 5.4 s idle but 6.9 vs 47 s busy. A random OneVision-0.5B (0.9B parameters) decoded
# 4.8 vs 7.8 tok/s idle and 2.6 vs 4.1 busy: a token's weight reads outlast the waits, so bigger
# models keep torch's default (OMP_NUM_THREADS, else one thread per core). The bound between is a
# judgement: at 50M bfloat16 parameters a token reads ~100 MB, several times a step's Python time.
TINY_MODEL_PARAMETERS = 50_000_000


def default_model_dir() -> Path:
    """The model used when --model is not given: llava-shapes (SHIPPED_MODEL_NAME, a name every --model and
    llavakit.load() accept), the tiny OneVision model shipped in the package.

    It was trained by llavakit (scripts/train_shapes_model.sh) on the synthetic shapes world, so it
    answers questions about flat coloured shapes and their motion, and nothing else.
    """
    if not (SHIPPED_MODEL / "model.safetensors").is_file():
        raise LlavakitError(f"the shipped model is missing from {SHIPPED_MODEL}; reinstall llavakit, or pass --model.")
    return SHIPPED_MODEL


def default_threads(parameters: int) -> int | None:
    """--threads auto: 1 for a model of under TINY_MODEL_PARAMETERS parameters, else None (torch's default).

    An OMP_NUM_THREADS or TORCH_NUM_THREADS set in the environment is a choice too, and wins over auto.
    """
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("TORCH_NUM_THREADS"):
        return None
    return 1 if parameters < TINY_MODEL_PARAMETERS else None


def set_threads(threads: int | None, parameters: int | None = None) -> None:
    """Apply --threads to torch (and llavakit's native kernels, which share its OpenMP pool).

    threads: a count, or None for auto (see default_threads; needs the model's parameter count).
    Call before the model runs and before any engine or server thread starts: OpenMP threads that
    already ran keep the count they started with.
    """
    if threads is not None and threads < 1:
        raise LlavakitError(f"--threads must be 1 or more, got {threads}.")
    if threads is None and parameters is not None:
        threads = default_threads(parameters)
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        # Inter-op threads run independent ops side by side (one per core by default); llavakit hardly
        # uses them, but capping them too means --threads N is the most torch work running at once.
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # settable once per process, before any inter-op work: keep what is there
        pass


def _parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _load(args):
    import llavakit

    threads = getattr(args, "threads", None)  # `info` has no --threads
    if threads is not None:
        set_threads(threads)  # before loading, which runs torch ops too
    model = args.model or default_model_dir()
    parallel = getattr(args, "tensor_parallel_size", 1)  # `info` has no --tensor-parallel-size
    # Tensor-parallel ranks are placed when they start (batch's --device), not moved after.
    placed = {"device": args.device} if parallel > 1 and getattr(args, "device", None) else {}
    vlm = llavakit.load(model, dtype=args.dtype, vision_tower=args.vision_tower, conv_template=args.conv_template,
                        quantize=args.quantize, image_detail=args.image_detail,
                        max_image_tokens=args.max_image_tokens, tensor_parallel_size=parallel, **placed)
    if threads is None:
        set_threads(None, _parameters(vlm.model))  # auto goes by the model's size
    return vlm


def _stop_on_rank_failure(vlm) -> None:
    """With tensor-parallel ranks: when one dies or hangs, print one line and stop this program (a server
    drains first: its requests fail at once instead of hanging)."""
    if vlm.parallel is None:
        return

    def stop(reason: str) -> None:
        print(f"error: {reason}; stopping.", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    vlm.parallel.on_failure = stop


def _user_message(text: str, media: list[tuple[str, str]], args) -> dict:
    """A user turn with its attachments: (kind, path) pairs, kind "image" or "video"."""
    parts = []
    for kind, path in media:
        if kind == "image":
            parts.append({"type": "image", "image": path})
        else:
            parts.append({"type": "video", "video": path, "num_frames": args.num_frames, "fps": args.fps})
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _answer(vlm, messages, args) -> str:
    """Stream one answer to stdout and return its full text."""
    pieces = []
    for piece in vlm.chat(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=tuple(args.stop), stream=True):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    return "".join(pieces)


def cmd_chat(args) -> int:
    """Answer one question (prompt given) or hold an interactive multi-turn chat (no prompt)."""
    vlm = _load(args)
    _stop_on_rank_failure(vlm)
    system = [{"role": "system", "content": [{"type": "text", "text": args.system}]}] if args.system else []
    attached = [("image", p) for p in args.image] + [("video", p) for p in args.video]
    if args.fps is not None and args.num_frames is not None:
        raise LlavakitError("give --num-frames or --fps, not both.")
    if args.prompt is not None:
        _answer(vlm, system + [_user_message(args.prompt, attached, args)], args)
        return 0
    from .engine.sampling import SamplingParams
    from .repl import run

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                              stop=tuple(args.stop))
    return run(vlm, sampling, system, attached, lambda text, media: _user_message(text, media, args))


_FAMILY_NAMES = {k: f.display_name for k, f in FAMILIES.items()}


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def info_summary(info: dict) -> list[str]:
    """A checkpoint's `VLM.info()` record as a few aligned lines a person reads at a glance."""
    text, vision, tokens = info["text"], info["vision"], info["tokens"]
    heads = f"{text['heads']} heads" + (f" ({text['kv_heads']} KV)" if text["kv_heads"] != text["heads"] else "")
    decoder = (f"{info['text_model']}: {text['layers']} layers, hidden {text['hidden_size']}, {heads}, "
               f"vocab {text['vocab_size']}, rope {text['rope']} (theta {text['rope_theta']:g})")
    if text["sliding_window"]:
        decoder += f", sliding window {text['sliding_window']}"
    if text["tied_embeddings"]:
        decoder += ", tied embeddings"
    tower = (f"{info['vision_model']}: {vision['layers']} layers, hidden {vision['hidden_size']}, "
             f"{vision['image_size']} px tiles of {vision['patch_size']} px patches, features of layer(s) "
             f"{', '.join(map(str, vision['feature_layers']))} ({vision['select_strategy']})")
    grids = info["image_grid_pinpoints"]
    tiling = "one tile per image" if not grids else (
        f"any-resolution over {len(grids)} grids, {'x'.join(map(str, min(grids)))} to {'x'.join(map(str, max(grids)))} px")
    def token(name, value) -> str:  # [text, id] pairs, id lists (eos), or a bare id (pad)
        if isinstance(value, list) and len(value) == 2 and (value[0] is None or isinstance(value[0], str)):
            return f"{name} none" if value[0] is None else f"{name} {value[0]!r} = {value[1]}"
        return f"{name} {', '.join(map(str, value)) if isinstance(value, list) else value}"

    named = [token(name, value) for name, value in tokens.items()]
    template = info["chat_template"] or ""
    rows = [
        ("model", info["folder"]),
        ("family", f"{_FAMILY_NAMES.get(info['model_type'], info['model_type'])} ({info['model_type']})"),
        ("parameters", f"{_count(info['parameters'])}, {info['dtype']}"),
        ("decoder", decoder),
        ("vision tower", tower),
        ("image tiling", tiling),
        ("image tokens", str(info["image_tokens_per_image"])),
        ("tokens", "; ".join(named)),
        ("chat template", f"{len(template)} characters (--json prints it)" if template else "none"),
    ]
    for path, layout in info.get("images", {}).items():
        grid = f"grid {layout['grid'][0]}x{layout['grid'][1]}, " if layout.get("grid") else ""
        tiles = f"{layout['tiles']} tiles, " if "tiles" in layout else ""
        rows.append((f"image {path}", f"{layout['size'][0]}x{layout['size'][1]} px: {grid}{tiles}"
                     f"{layout['tokens']} tokens"))
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows]


def cmd_info(args) -> int:
    """Print what a checkpoint is: a short summary, or with --json the whole record (template included)."""
    vlm = _load(args)
    info = vlm.info()
    if args.image:
        info["images"] = {path: vlm.image_layout(path) for path in args.image}
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        print("\n".join(info_summary(info)))
    return 0


def cmd_make_random(args) -> int:
    """Write a checkpoint with random weights (for demos, tests and benchmarks)."""
    from .random_init import make_random_checkpoint

    from .api import resolve_dtype

    dtype = resolve_dtype(args.dtype, {})
    out = make_random_checkpoint(Path(args.out), preset=args.preset, layers=args.layers, seed=args.seed, dtype=dtype)
    print(out)
    return 0


def cmd_serve(args) -> int:
    """Serve a checkpoint over an OpenAI-compatible HTTP API until SIGTERM or Ctrl-C."""
    try:
        from .server import ServerConfig, serve
    except ImportError as e:  # fastapi, uvicorn, prometheus-client, llguidance
        raise LlavakitError(f"the server needs its extra dependencies: pip install 'llavakit[serve]' ({e}).") from e
    local = Path(args.allowed_local_media_path) if args.allowed_local_media_path else None
    # Read here, not as the parser's default, so that `serve --help` never prints the key.
    api_key = args.api_key or os.environ.get("LLAVAKIT_API_KEY") or None
    config = ServerConfig(
        served_model_name=args.served_model_name or Path(str(args.model or SHIPPED_MODEL_NAME)).name,
        max_body_bytes=args.max_body_bytes, max_images_per_request=args.max_images_per_request,
        max_videos_per_request=args.max_videos_per_request, max_image_pixels=args.max_image_pixels,
        max_video_frames=args.max_video_frames, max_video_seconds=args.max_video_seconds, max_n=args.max_n,
        max_image_aspect_ratio=args.max_image_aspect_ratio, max_video_pixels=args.max_video_pixels,
        default_max_tokens=args.default_max_tokens, max_concurrent_requests=args.max_concurrent_requests,
        media_workers=args.media_workers, shutdown_timeout_s=args.shutdown_timeout,
        max_messages=args.max_messages, max_text_chars=args.max_text_chars, max_connections=args.max_connections,
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
        keep_alive_timeout_s=args.keep_alive_timeout, api_key=api_key,
        allowed_hosts=tuple(h for entry in args.allowed_hosts for h in entry.split(",")),
        allow_remote_media=args.allow_remote_media, remote_media_domains=tuple(args.remote_media_domain),
        remote_media_timeout_s=args.remote_media_timeout, remote_media_max_bytes=args.remote_media_max_bytes,
        allow_private_media=args.allow_private_media, allowed_local_media_path=local)
    if _replicated(args):
        return _serve_replicas(args, config)
    vlm = _load(args)
    _stop_on_rank_failure(vlm)
    try:
        status = serve(vlm, config, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                       kv_cache_bytes=args.kv_cache_bytes, image_cache_bytes=args.image_cache_bytes,
                       log_level=args.log_level)
    finally:
        vlm.close()
    return 1 if vlm.parallel is not None and vlm.parallel.failed else status


def _replicated(args) -> bool:
    """Whether `serve` runs engine replicas on Ray Serve: more than one, autoscaling bounds, or a cluster."""
    replicated = (args.replicas != 1 or args.ray_address is not None or args.min_replicas is not None
                  or args.max_replicas is not None)
    if not replicated and (args.num_cpus_per_replica is not None or args.num_gpus_per_replica is not None
                           or args.no_media_affinity):
        raise LlavakitError("--num-cpus-per-replica, --num-gpus-per-replica and --no-media-affinity apply to "
                            "replicas on Ray Serve: add --replicas N (N > 1), --max-replicas N or --ray-address.")
    return replicated


def _serve_replicas(args, config) -> int:
    """`serve` with replicas: this process serves the HTTP front; each replica loads the model with the
    same flags (so it must find --model too: a hub id, or a folder that exists where it runs). With
    --tensor-parallel-size N each replica is rank 0 of its own N ranks, which it starts on its node."""
    import functools

    try:
        from .server.replicas import ReplicaOptions, serve_replicas
    except ImportError as e:  # fastapi, uvicorn, prometheus-client
        raise LlavakitError(f"the server needs its extra dependencies: pip install 'llavakit[serve]' ({e}).") from e
    options = ReplicaOptions(
        replicas=args.replicas, ray_address=args.ray_address,
        num_cpus_per_replica=1.0 if args.num_cpus_per_replica is None else args.num_cpus_per_replica,
        num_gpus_per_replica=args.num_gpus_per_replica or 0.0, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, media_affinity=not args.no_media_affinity,
        tensor_parallel_size=args.tensor_parallel_size)
    # The replicas get the loading flags (not the key: config carries it); a local folder travels as an
    # absolute path, since they may not share this working directory.
    replica_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("func", "api_key")})
    if args.model and Path(args.model).expanduser().exists():
        replica_args.model = str(Path(args.model).expanduser().absolute())
    if options.tensor_parallel_size > 1 and options.num_gpus_per_replica > 0:
        replica_args.device = "cuda"  # ranks are placed as they start (rank r on the replica's GPU r), not moved after
    return serve_replicas(functools.partial(_load, replica_args), args.model or SHIPPED_MODEL_NAME, config, options,
                          host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                          kv_cache_bytes=args.kv_cache_bytes, image_cache_bytes=args.image_cache_bytes,
                          log_level=args.log_level)


def cmd_convert(args) -> int:
    """Rewrite a checkpoint in the other format (llava-hf <-> original LLaVA)."""
    from .convert import convert
    from .weights import resolve_model_dir

    print(convert(resolve_model_dir(args.src), Path(args.dst), args.to, vision_tower=args.vision_tower,
                  conv_template=args.conv_template))
    return 0


def cmd_make_shapes(args) -> int:
    """Write a synthetic shapes world (pictures, clips, JSONL conversations) and print its counts:
    the grid world (96x96 pictures, a 3x3 grid) or the free world (any size, shapes anywhere)."""
    if args.world == "free":
        from .train.scenes import ScenesError, make_scenes

        if args.size is not None:
            raise ScenesError(f"--size {args.size} sets the grid world's canvas; the free world draws pictures of "
                              "every size from 64 to 1024 px: leave --size out with --world free.")
        summary = make_scenes(Path(args.out), args.n, seed=args.seed, n_test=args.n_test, n_videos=args.n_videos,
                              n_compare=args.n_compare, per_image=args.per_image,
                              workers=1 if args.workers is None else args.workers)
    else:
        from .train.shapes import ShapesError, make_shapes

        if args.workers is not None:
            raise ShapesError(f"--workers {args.workers} applies to --world free; the grid world is drawn in one "
                              "process: leave --workers out.")
        summary = make_shapes(Path(args.out), args.n, seed=args.seed, n_test=args.n_test, n_videos=args.n_videos,
                              n_compare=args.n_compare, size=96 if args.size is None else args.size,
                              per_image=args.per_image)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_batch(args) -> int:
    """Answer every image of a folder, or every request of a JSONL/Parquet file, into a JSONL file."""
    from .batch.inputs import JobConfig

    job = JobConfig(prompt=args.prompt, prompt_field=args.prompt_field, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.ray:
        from .batch.ray_job import run_ray

        if args.threads is not None:
            raise LlavakitError("--threads applies to local runs; with --ray, size replicas with --cpus-per-replica.")
        model = args.model or str(default_model_dir())
        load_kwargs = dict(dtype=args.dtype, vision_tower=args.vision_tower, conv_template=args.conv_template,
                           quantize=args.quantize, image_detail=args.image_detail,
                           max_image_tokens=args.max_image_tokens,
                           **({"device": args.device} if args.device else {}),
                           **({"tensor_parallel_size": args.tensor_parallel_size}
                              if args.tensor_parallel_size != 1 else {}))
        summary = run_ray(model, args.input, args.output, job, load_kwargs, resume=args.resume,
                          overwrite=args.overwrite, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                          gpus_per_replica=args.gpus_per_replica, address=args.ray_address,
                          max_batch_size=args.max_batch_size, batch_size=args.batch_size,
                          progress=not args.no_progress)
    else:
        from .batch.inputs import input_kind
        from .batch.local import run_local
        from .batch.output import prepare_output

        input_kind(Path(args.input))  # a missing input or an existing output fails before the model loads
        if not (args.resume or args.overwrite):
            prepare_output(Path(args.output), False, False)
        vlm = _load(args)
        _stop_on_rank_failure(vlm)
        if args.device and vlm.parallel is None:
            vlm.model.to(args.device)
        summary = run_local(vlm, args.input, args.output, job, resume=args.resume, overwrite=args.overwrite,
                            max_batch_size=args.max_batch_size, workers=args.workers, progress=not args.no_progress)
    print(f"[llavakit] {summary.done} items ({summary.errors} errors) written to {args.output}"
          + (f"; {summary.skipped} were already there" if summary.skipped else ""), file=sys.stderr)
    return 0


def cmd_pretrain_tower(args) -> int:
    """Pretrain a vision tower on the shapes world's token labels and write it as a SigLIP/CLIP folder."""
    from .train.tower import pretrain_tower

    summary = pretrain_tower(Path(args.out), args.vision, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, world=args.world, workers=args.workers, min_tiles=args.min_tiles,
                             max_grid=args.max_grid)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_init(args) -> int:
    """Assemble a new checkpoint from a vision tower and a language model (folders or size specs)."""
    from .train.assemble import init_checkpoint

    out = init_checkpoint(Path(args.out), args.family, args.vision, args.text,
                          corpus=[Path(c) for c in args.tokenizer_corpus], vocab_size=args.vocab_size,
                          seed=args.seed, max_tiles=args.max_tiles, vision_init=args.vision_init,
                          min_tiles=args.min_tiles, max_grid=args.max_grid)
    import llavakit

    info = llavakit.load(out, dtype="float32").info()
    print(json.dumps({k: info[k] for k in ("folder", "model_type", "parameters", "text", "vision")}, indent=2))
    return 0


def _checkpoint_parameters(name_or_path: str) -> int:
    """Parameters stored in a checkpoint's safetensors files, from their headers (no tensor is read)."""
    from safetensors import safe_open

    from .weights import resolve_model_dir

    total = 0
    for path in sorted(resolve_model_dir(name_or_path).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def cmd_train(args) -> int:
    """Train a checkpoint on a JSONL file (stage projector, full or lora); under torchrun, on every process."""
    from .train.distributed import rank
    from .train.loop import TrainConfig, train

    cfg = TrainConfig(stage=args.stage, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, lr=args.lr, warmup_ratio=args.warmup_ratio,
                      weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, max_length=args.max_length,
                      bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                      train_vision=args.train_vision, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, save_every=args.save_every, eval_every=args.eval_every,
                      keep_checkpoints=args.keep_checkpoints, on_bad_data=args.on_bad_data,
                      group_by_length=args.group_by_length, share_media=args.share_media, seed=args.seed)
    model = args.model or SHIPPED_MODEL_NAME
    set_threads(args.threads, None if args.threads is not None else _checkpoint_parameters(model))
    resume = True if args.resume == "latest" else (Path(args.resume) if args.resume else False)
    summary = train(model, Path(args.data), Path(args.out), cfg,
                    eval_data=Path(args.eval_data) if args.eval_data else None, resume=resume,
                    image_folder=Path(args.image_folder) if args.image_folder else None, device=args.device,
                    overwrite=args.overwrite, fsdp=args.fsdp)
    if rank() == 0:  # every process of a torchrun launch has the summary; one prints it
        print(json.dumps(summary, indent=2))
    return 0


def cmd_merge_lora(args) -> int:
    """Fold a LoRA adapter (PEFT format) into its base checkpoint."""
    from .train.lora import merge_lora

    print(merge_lora(args.model, Path(args.adapter), Path(args.out)))
    return 0


def cmd_eval(args) -> int:
    """Accuracy per question type (and, scored by shapes, per tag) on a held-out JSONL file."""
    from .train.evaluate import evaluate_file

    vlm = _load(args)
    _stop_on_rank_failure(vlm)
    result = evaluate_file(vlm, Path(args.data), limit=args.limit, max_new_tokens=args.max_new_tokens,
                           score=args.score)
    if args.json:
        # One JSON document on stdout, wrong answers inside it, so that it parses as a whole.
        print(json.dumps(result.to_json(wrong=args.show_wrong), indent=1))
        return 0
    print(result.category_table() if args.score == "shapes" else result.table())
    if args.show_wrong:
        for w in result.wrong[: args.show_wrong]:
            print(json.dumps(w))
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, plus "(default: X)" after options whose help does not already speak of a default.

    Options without a value to show (None, False, []) get nothing, and secrets are never defaults:
    serve's --api-key reads $LLAVAKIT_API_KEY in cmd_serve, not in the parser.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if not _shows_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _shows_default(action: argparse.Action) -> bool:
    # Identity, not ==: a default of 0 or 0.0 is worth showing, and 0 == False.
    return bool(action.option_strings) and not (action.default is None or action.default is False
                                                or action.default == [] or action.default is argparse.SUPPRESS)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; subcommands inherit it through parser_class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and _shows_default(action):  # argparse prints nothing for options without help
            action.help = "default: %(default)s"
        return action


class _Version(argparse.Action):
    """--version: `llavakit <version>`, read only when asked (the package metadata takes ~0.1 s to import)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        print(f"llavakit {__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llavakit", description="Run LLaVA-family vision-language models.")
    p.add_argument("--version", action=_Version, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def threads_arg(sp):
        sp.add_argument("--threads", type=int, metavar="N",
                        help=f"torch threads (default: auto: 1 for models under {TINY_MODEL_PARAMETERS // 10**6}M "
                        "parameters, which gain nothing from more and collapse when another process holds a core: "
                        "llava-shapes decodes 348 vs 363 tok/s on 1 vs 2 idle cores, 317 vs 109 with one busy; "
                        "bigger models get torch's default, $OMP_NUM_THREADS or one per core)")

    def parallel_arg(sp):
        sp.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="split the model over N processes (ranks) that run each step together, each holding "
                        "about 1/N of the weights and KV cache; started here, or torchrun's under torchrun (on a CPU "
                        "the ranks share --threads); with serve --replicas, each replica starts its own N ranks")

    def model_args(sp):
        sp.add_argument("--model", help=f"checkpoint folder, hub id (org/name) or {SHIPPED_MODEL_NAME} (default: "
                        f"{SHIPPED_MODEL_NAME}, the tiny shipped model that knows coloured shapes; a folder of that "
                        "name in the working directory is used instead)")
        sp.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
        sp.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                        help="weight-only int8 or int4 (groups of 32) for the decoder and output head: 2x / 4x "
                        "fewer bytes per decoded token than bfloat16, faster decoding on CPU")
        sp.add_argument("--image-detail", "--default-image-detail", dest="image_detail", default="auto",
                        choices=("auto", "low", "high"),
                        help="images without their own detail: auto = the checkpoint's any-res tiling (default), "
                        "low = one tile (fewest tokens, fastest), high = any-res even among several images")
        sp.add_argument("--max-image-tokens", type=int, metavar="N",
                        help="an image's token budget: an auto image over it is sent as low, a high one is refused")
        sp.add_argument("--vision-tower", help="original-format checkpoints: the CLIP/SigLIP folder when not stored")
        sp.add_argument("--conv-template", help="original-format checkpoints: conversation template "
                        "(llava_v1, vicuna_v1, mistral_instruct, chatml_direct, llava_llama_3, qwen_1_5)")

    chat = sub.add_parser("chat", help="chat about images")
    model_args(chat)
    chat.add_argument("prompt", nargs="?", help="the question; without it, an interactive chat starts")
    chat.add_argument("--image", action="append", default=[], help="image path, URL or data URL (repeatable)")
    chat.add_argument("--video", action="append", default=[], help="video file (repeatable; OneVision models)")
    chat.add_argument("--num-frames", type=int, help="frames sampled evenly from each video (default 32)")
    chat.add_argument("--fps", type=float, help="sample videos at this many frames per second instead")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--repetition-penalty", type=float, default=1.0)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    threads_arg(chat)
    parallel_arg(chat)
    chat.set_defaults(func=cmd_chat)

    info = sub.add_parser("info", help="describe a checkpoint")
    model_args(info)
    info.add_argument("--image", action="append", default=[],
                      help="also show this image's tile grid and token count (repeatable)")
    info.add_argument("--json", action="store_true", help="print the whole record as JSON (chat template included)")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="convert between the llava-hf and the original LLaVA format")
    conv.add_argument("--to", required=True, choices=["hf", "original"])
    conv.add_argument("src", help=f"checkpoint folder, hub id or {SHIPPED_MODEL_NAME}")
    conv.add_argument("dst")
    conv.add_argument("--vision-tower", help="original sources: the CLIP/SigLIP folder when not stored")
    conv.add_argument("--conv-template", help="original sources: the template to write as chat template")
    conv.set_defaults(func=cmd_convert)

    rand = sub.add_parser("make-random", help="write a checkpoint with random weights")
    rand.add_argument("--out", required=True)
    rand.add_argument("--preset", default="tiny", choices=RANDOM_PRESETS)
    rand.add_argument("--layers", type=int, help="decoder depth (default: the preset's)")
    rand.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    rand.add_argument("--seed", type=int, default=0)
    rand.set_defaults(func=cmd_make_random)

    from .server.config import ServerConfig  # torch-free: only the defaults

    d = ServerConfig()
    srv = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name",
                     help=f"model id in /v1/models (default: the folder's name; {SHIPPED_MODEL_NAME} without --model)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    srv.add_argument("--kv-cache-bytes", type=int, help="KV cache budget (default: sized from the batch)")
    srv.add_argument("--image-cache-bytes", type=int, default=256 << 20, help="image-feature cache budget")
    srv.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                     help="choices admitted at once, running or queued; more get 429")
    srv.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    srv.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request)
    srv.add_argument("--max-videos-per-request", type=int, default=d.max_videos_per_request)
    srv.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                     help="width x height, read from the header before decoding")
    srv.add_argument("--max-image-aspect-ratio", type=float, default=d.max_image_aspect_ratio,
                     help="longer side / shorter side of an image or video frame, from the header")
    srv.add_argument("--max-video-frames", type=int, default=d.max_video_frames)
    srv.add_argument("--max-video-pixels", type=int, default=d.max_video_pixels,
                     help="sampled frames x frame pixels of one video, from the header before decoding")
    srv.add_argument("--max-video-seconds", type=float, default=d.max_video_seconds)
    srv.add_argument("--max-n", type=int, default=d.max_n, help="choices per request")
    srv.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                     help="answer length when a request sets none (the context still caps it)")
    srv.add_argument("--media-workers", type=int, default=d.media_workers,
                     help="threads decoding media and tokenizing")
    srv.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout_s,
                     help="seconds in-flight requests get after SIGTERM")
    srv.add_argument("--max-messages", type=int, default=d.max_messages,
                     help="messages per request, counted before anything is validated")
    srv.add_argument("--max-text-chars", type=int, default=d.max_text_chars,
                     help="characters of text per request, checked before tokenizing (default: 8 per token "
                          "of the model's context)")
    srv.add_argument("--max-connections", type=int, default=d.max_connections,
                     help="open connections; more are answered 503 and closed")
    srv.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                     help="seconds a connection has to send a request's headers (slow clients are closed)")
    srv.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                     help="seconds a request has to send its body (408 beyond)")
    srv.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout_s,
                     help="seconds an idle kept-alive connection stays open")
    srv.add_argument("--api-key",
                     help="require 'Authorization: Bearer KEY' on /v1/* (default: $LLAVAKIT_API_KEY; "
                          "/health, /metrics and the page stay open)")
    srv.add_argument("--allowed-hosts", action="append", default=[],
                     help="Host header names accepted besides the loopback ones (comma-separated or repeated; "
                          "a leading dot admits subdomains, '*' any host). Checked when listening on loopback, "
                          "or whenever given")
    srv.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image and video URLs")
    srv.add_argument("--allow-private-media", action="store_true",
                     help="let --allow-remote-media fetch from private and loopback addresses too (10.0.0.0/8, "
                          "127.0.0.1, fc00::/7, ...); for tests and trusted networks only, as it lets clients "
                          "reach internal hosts; link-local and reserved addresses stay refused")
    srv.add_argument("--remote-media-domain", action="append", default=[],
                     help="only fetch from this domain and its subdomains (repeatable)")
    srv.add_argument("--remote-media-timeout", type=float, default=d.remote_media_timeout_s)
    srv.add_argument("--remote-media-max-bytes", type=int, default=d.remote_media_max_bytes)
    srv.add_argument("--allowed-local-media-path", help="serve file:// media URLs from below this folder")
    srv.add_argument("--replicas", type=int, default=1,
                     help="engine replicas, each with its own model, engine and caches; more than 1 runs them on "
                          "Ray Serve (pip install 'llavakit[ray]') behind this process, which keeps the HTTP side")
    srv.add_argument("--ray-address", help="run the replicas on this Ray cluster (auto, ray://head:10001, ...); "
                     "default: start a local one, stopped on exit")
    srv.add_argument("--num-cpus-per-replica", "--cpus-per-replica", type=float, metavar="N",
                     help="Ray's CPU share per replica, also its torch threads unless --threads says (default 1); "
                     "with --tensor-parallel-size T it is per rank: each replica reserves T x N CPUs, and each "
                     "rank gets N threads (at least 1)")
    srv.add_argument("--num-gpus-per-replica", "--gpus-per-replica", type=float, metavar="N",
                     help="GPUs per replica (default 0); above 0 each replica runs the model on cuda; with "
                     "--tensor-parallel-size T it is per rank (0 or 1): each replica reserves T GPUs on one node, "
                     "one per rank, as vLLM on Ray Serve does")
    srv.add_argument("--min-replicas", type=int, metavar="N",
                     help="autoscaling: Ray Serve keeps between --min-replicas (default 1) and --max-replicas")
    srv.add_argument("--max-replicas", type=int, metavar="N", help="autoscaling: the most replicas")
    srv.add_argument("--no-media-affinity", action="store_true",
                     help="route by load alone (default: requests about the same first image or video go to the "
                          "replica that has it cached, while its batch has room)")
    threads_arg(srv)
    parallel_arg(srv)
    srv.set_defaults(func=cmd_serve)

    shp = sub.add_parser("make-shapes", help="write the synthetic shapes world used to train and test tiny models")
    shp.add_argument("--out", required=True, help="folder for images/, videos/ and the JSONL files")
    shp.add_argument("--world", choices=("grid", "free"), default="grid",
                     help="grid: 96x96 pictures, one shape per cell of a 3x3 grid (default); free: pictures of "
                          "64-1024 px a side, aspect up to 4:1, shapes anywhere, multi-turn conversations")
    shp.add_argument("--n", type=int, required=True, help="train pictures (one caption and --per-image lines each)")
    shp.add_argument("--per-image", type=int, default=2,
                     help="train lines per picture (default 2): one question each (grid), a conversation each (free)")
    shp.add_argument("--n-test", type=int,
                     help="test lines (default max(100 per type, n/10): 900 for grid, 700 for free)")
    shp.add_argument("--n-videos", type=int, help="train clips (default n/4)")
    shp.add_argument("--n-compare", type=int, help="train picture pairs (default n/4)")
    shp.add_argument("--size", type=int, help="grid world only: canvas side in pixels (default 96)")
    shp.add_argument("--workers", type=int,
                     help="free world only: processes drawing and encoding the media (default 1; same files either way)")
    shp.add_argument("--seed", type=int, default=0)
    shp.set_defaults(func=cmd_make_shapes)

    bat = sub.add_parser("batch", help="answer a folder of images or a JSONL/Parquet file of requests offline")
    model_args(bat)
    bat.add_argument("--input", required=True, help="a folder of images/videos (recursive), a .jsonl or a .parquet file")
    bat.add_argument("--output", required=True, help="JSONL file of results, one line per item (.parquet with --ray)")
    bat.add_argument("--prompt", default="Describe the picture.",
                     help="the question for folder inputs and for requests that carry none")
    bat.add_argument("--prompt-field", default="prompt", help="the JSONL/Parquet field holding the question")
    bat.add_argument("--max-new-tokens", type=int, default=256)
    bat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    bat.add_argument("--top-p", type=float, default=1.0)
    bat.add_argument("--top-k", type=int, default=0)
    bat.add_argument("--seed", type=int, default=0, help="with each id, the seed of items that set none")
    bat.add_argument("--resume", action="store_true", help="skip the ids already in the output and append")
    bat.add_argument("--overwrite", action="store_true", help="replace an existing output")
    bat.add_argument("--device", help="cpu (default), cuda, cuda:1, ... (with --ray: cuda when --gpus-per-replica)")
    bat.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together per engine")
    bat.add_argument("--workers", type=int, default=2, help="threads loading images ahead of the engine")
    bat.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    bat.add_argument("--ray", action="store_true", help="run on Ray Data (pip install 'llavakit[ray]')")
    bat.add_argument("--ray-address", help="join this Ray cluster (e.g. auto, ray://head:10001); default: start one")
    bat.add_argument("--replicas", type=int, default=1, help="--ray: model replicas (actors)")
    bat.add_argument("--cpus-per-replica", type=float, default=1.0, help="--ray: CPUs per replica")
    bat.add_argument("--gpus-per-replica", type=float, default=0.0, help="--ray: GPUs per replica")
    bat.add_argument("--batch-size", type=int, default=64, help="--ray: items per Ray batch at most")
    threads_arg(bat)
    parallel_arg(bat)
    bat.set_defaults(func=cmd_batch)

    ptw = sub.add_parser("pretrain-tower", help="pretrain a vision tower on the shapes world (what and where per patch)")
    ptw.add_argument("--vision", required=True,
                     help="a spec such as siglip:image_size=96,patch_size=32,hidden_size=128,num_hidden_layers=4,"
                          "num_attention_heads=4,intermediate_size=512")
    ptw.add_argument("--out", required=True, help="folder for the SigLIP/CLIP checkpoint (llavakit init --vision takes it)")
    ptw.add_argument("--steps", type=int, default=400, help="AdamW steps (warm-up, then cosine decay)")
    ptw.add_argument("--batch-size", type=int, default=64, help="pictures per step, drawn on the fly")
    ptw.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ptw.add_argument("--seed", type=int, default=0, help="the same seed gives the same weights")
    ptw.add_argument("--world", choices=["grid", "free"], default="grid",
                     help="grid: 96-px grid pictures; free: the processor's views of free-world pictures (default grid)")
    ptw.add_argument("--workers", type=int, choices=[0, 1], default=1,
                     help="processes drawing the pictures beside the training: 1 (default) uses a second core, 0 none")
    ptw.add_argument("--min-tiles", type=int, default=1,
                     help="free world: cut tiles from grids of at least N x N, as `init --min-tiles N` (default 1)")
    ptw.add_argument("--max-grid", type=int, default=6,
                     help="free world: and of at most N x N, as `init --max-grid N` (default 6)")
    ptw.set_defaults(func=cmd_pretrain_tower)

    ini = sub.add_parser("init", help="assemble a new checkpoint from a vision tower and a language model")
    ini.add_argument("--family", required=True, choices=list(FAMILIES))
    ini.add_argument("--vision", required=True,
                     help="a CLIP/SigLIP folder, or a spec such as siglip:image_size=96,patch_size=16,hidden_size=128,"
                          "num_hidden_layers=4,num_attention_heads=4,intermediate_size=512")
    ini.add_argument("--text", required=True,
                     help="a Llama/Mistral/Qwen2 folder, or a spec such as qwen2:hidden_size=256,num_hidden_layers=4,"
                          "num_attention_heads=4,num_key_value_heads=2,intermediate_size=768")
    ini.add_argument("--out", required=True)
    ini.add_argument("--tokenizer-corpus", action="append", default=[],
                     help="text spec: JSONL/text files to learn the vocabulary from (repeatable)")
    ini.add_argument("--vocab-size", type=int, default=1000, help="text spec: vocabulary size at most")
    ini.add_argument("--max-tiles", type=int, default=9, help="OneVision: anyres_max_N")
    ini.add_argument("--min-tiles", type=int, default=1,
                     help="OneVision: tiles a side of the smallest grid (1-6); above 1 a small picture is scaled up")
    ini.add_argument("--max-grid", type=int, default=6,
                     help="OneVision: tiles a side of the largest grid (--min-tiles to 6, default 6 as published)")
    ini.add_argument("--vision-init", default="random", choices=["random", "structured"],
                     help="vision spec: random weights, or patch embeddings that average sub-block colours and "
                          "2-D sine-cosine position codes")
    ini.add_argument("--seed", type=int, default=0)
    ini.set_defaults(func=cmd_init)

    t = argparse.Namespace(**TRAIN_DEFAULTS)  # TrainConfig's defaults, without importing torch
    trn = sub.add_parser("train", help="visual instruction tuning on a JSONL file")
    trn.add_argument("--model", help=f"checkpoint folder, hub id or {SHIPPED_MODEL_NAME} to start from "
                     f"(default: {SHIPPED_MODEL_NAME})")
    trn.add_argument("--data", required=True, help="JSONL: LLaVA 'conversations' or HF 'messages' records")
    trn.add_argument("--out", required=True, help="output folder (checkpoint-N folders and the final model)")
    trn.add_argument("--stage", default=t.stage, choices=TRAIN_STAGES)
    trn.add_argument("--eval-data", help="held-out JSONL: loss at --eval-every steps and at the end")
    trn.add_argument("--image-folder", help="media paths are relative to this folder (default: the JSONL's)")
    trn.add_argument("--epochs", type=float, default=t.epochs)
    trn.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    trn.add_argument("--batch-size", type=int, default=t.batch_size,
                     help="conversations per micro-batch, per process (under torchrun the global batch is "
                     "batch size x grad accum x processes)")
    trn.add_argument("--grad-accum", type=int, default=t.grad_accum, help="micro-batches per optimizer step")
    trn.add_argument("--lr", type=float, default=t.lr)
    trn.add_argument("--warmup-ratio", type=float, default=t.warmup_ratio)
    trn.add_argument("--weight-decay", type=float, default=t.weight_decay)
    trn.add_argument("--max-grad-norm", type=float, default=t.max_grad_norm)
    trn.add_argument("--max-length", type=int, default=t.max_length, help="tokens per conversation, images included")
    trn.add_argument("--bf16", action="store_true", help="bfloat16 autocast (float32 weights and optimizer)")
    trn.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward: less memory")
    trn.add_argument("--compile", action="store_true", help="torch.compile the layers (about 2x faster on CPU "
                     "after a minute of compiling)")
    trn.add_argument("--train-vision", action="store_true", help="stage full: train the vision tower too")
    trn.add_argument("--lora-r", type=int, default=t.lora_r)
    trn.add_argument("--lora-alpha", type=int, default=t.lora_alpha)
    trn.add_argument("--lora-dropout", type=float, default=t.lora_dropout)
    trn.add_argument("--save-every", type=int, default=t.save_every, help="steps between checkpoints (0: end only)")
    trn.add_argument("--eval-every", type=int, default=t.eval_every, help="steps between evaluations (0: end only)")
    trn.add_argument("--keep-checkpoints", type=int, default=t.keep_checkpoints)
    trn.add_argument("--on-bad-data", default=t.on_bad_data, choices=["fail", "skip"],
                     help="a bad record (missing image, too long, marker count): stop (default) or skip it")
    trn.add_argument("--group-by-length", action="store_true",
                     help="fill each step with conversations of about one length, so less of it is padding "
                          "(the order stays a function of --seed)")
    trn.add_argument("--share-media", action="store_true",
                     help="train the records of one picture or video together, as one sequence that holds the "
                          "media's tokens once and each conversation after them; the same loss for less compute")
    trn.add_argument("--resume", nargs="?", const="latest",
                     help="continue from the newest checkpoint-N in --out, or from the folder given")
    trn.add_argument("--overwrite", action="store_true",
                     help="start a new run in a non-empty --out: its files are replaced and its checkpoint-N "
                     "folders removed (without this or --resume, a non-empty --out is refused)")
    threads_arg(trn)
    trn.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...; under torchrun, cuda is the "
                     "GPU of each process's LOCAL_RANK")
    trn.add_argument("--fsdp", action="store_true", help="under torchrun, stage full: shard the model, gradients and "
                     "optimizer over the processes (FSDP2) instead of a whole copy in each (DDP)")
    trn.add_argument("--seed", type=int, default=t.seed)
    trn.set_defaults(func=cmd_train)

    mrg = sub.add_parser("merge-lora", help="fold a LoRA adapter (PEFT format) into a full checkpoint")
    mrg.add_argument("--model", required=True, help="the base checkpoint the adapter was trained on")
    mrg.add_argument("--adapter", required=True, help="folder with adapter_config.json and adapter_model.safetensors")
    mrg.add_argument("--out", required=True)
    mrg.set_defaults(func=cmd_merge_lora)

    evl = sub.add_parser("eval", help="accuracy per question type (and per tag) on a JSONL file")
    model_args(evl)
    evl.add_argument("--data", required=True, help="JSONL records; each record's last answer is the reference")
    evl.add_argument("--limit", type=int, help="only the first N records")
    evl.add_argument("--max-new-tokens", type=int, default=48)
    evl.add_argument("--score", choices=("exact", "shapes"), default="exact",
                     help="exact: the answer equals the reference (case and a final period aside); shapes: it "
                     "states the same fact in any wording (the shapes world's scorer, llavakit/train/scoring.py), "
                     "reported per question type and per tag, with describe's shape recall")
    evl.add_argument("--json", action="store_true", help="print the report as one JSON document")
    evl.add_argument("--show-wrong", type=int, default=0, help="print up to N wrong answers")
    threads_arg(evl)
    parallel_arg(evl)
    evl.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llavakit` command; errors print one line and exit with status 2."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except LlavakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
