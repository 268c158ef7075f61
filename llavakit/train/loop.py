"""`llavakit train`: LLaVA's visual instruction tuning on a checkpoint folder.

    stage "projector"  stage 1: only the projector (and the image newline) learn; captions
    stage "full"       stage 2: projector + language model (+ the tower with train_vision)
    stage "lora"       stage 2 with LoRA adapters on the language model's linear layers; the projector learns fully

    JSONL ─► validate every record (bad ones reported by line: skipped or fatal) ─► epochs of shuffled
    micro-batches ─► loss on assistant tokens ─► AdamW (warm-up + cosine), gradient accumulation,
    clipping ─► checkpoints (HF layout + trainer_state.pt) every save_every steps and at the end

A run is a pure function of its arguments and seed: the data order of each epoch comes from
(seed, epoch), so `resume` continues from a checkpoint to exactly the weights an uninterrupted run reaches.

A non-empty output folder is refused (before the model or the data are read) unless the run resumes
from it or is told to overwrite it: a finished model or a week's checkpoints are never lost to a
mistyped --out.

Under torchrun every process runs `train` (see distributed.py): batch_size is per process, a step's
global batch is batch_size × grad_accum × processes conversations, the same ones whatever the
number of processes, and only rank 0 writes checkpoints, logs and the summary. A checkpoint resumes
on another number of processes when the global batch is the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, LlavakitError
from ..progress import StatusLine, clock
from . import distributed, packing
from .data import DataError, Example, Record, collate, encode_example, read_records
from .distributed import SINGLE, World
from .objective import Objective, enable_checkpointing, loss_sum

STAGES = ("projector", "full", "lora")
STATE_FILE = "trainer_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run (written to the output folder as train_config.json)."""

    stage: str = "full"
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # conversations per micro-batch, per process (as transformers' per_device_train_batch_size)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048  # tokens per conversation, images included
    bf16: bool = False  # autocast matmuls to bfloat16 (weights and optimizer stay float32)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder and tower layer (fuses the small element-wise ops)
    train_vision: bool = False  # stage "full": the tower learns too (as in OneVision's later stages)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end)
    keep_checkpoints: int = 2
    on_bad_data: str = "fail"  # or "skip"
    group_by_length: bool = False  # each step's conversations of about one length (less padding)
    share_media: bool = False  # records of the same media trained together, the media once (packing.py)
    seed: int = 0
    log_every: int = 1


class TrainError(LlavakitError):
    """A training run that cannot start or go on (bad data with on_bad_data="fail", bad options)."""


@dataclass
class _Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # records of this epoch's order already consumed (by all processes together)
    samples: int = 0


def load_dataset(path: Path, vlm, cfg: TrainConfig, image_folder: Path | None = None,
                 log=print, world: World = SINGLE) -> list[Record]:
    """Read and check every record (text, media, length) before training; report bad ones by line.

    world: with several processes each checks its share of the records and all learn every verdict,
    so every rank ends with the same list.
    """
    parsed = list(read_records(path, image_folder))
    verdicts = {}  # index in `parsed` -> why the record is bad
    lengths = {}  # index in `parsed` -> about how many tokens, and how many of them its media's
    for i in range(world.rank, len(parsed), world.size):
        rec = parsed[i]
        if isinstance(rec, DataError):
            verdicts[i] = str(rec)
            continue
        try:
            lengths[i] = check_record(vlm.processor, rec, cfg.max_length)
        except LlavakitError as e:
            verdicts[i] = f"{rec.path.name} line {rec.line}: {e}"
    for bad_part, length_part in distributed.gather(world, (verdicts, lengths)):
        verdicts.update(bad_part)
        lengths.update(length_part)
    good = [dataclasses.replace(rec, tokens=lengths[i][0], media_tokens=lengths[i][1])
            for i, rec in enumerate(parsed) if i not in verdicts]
    bad = [verdicts[i] for i in sorted(verdicts)]
    for message in bad:
        log(f"[llavakit] bad record: {message}")
    if bad and cfg.on_bad_data == "fail":
        raise TrainError(f"{len(bad)} bad record(s) in {path} (first: {bad[0]}); fix them, or pass "
                         "--on-bad-data skip to train without them.")
    if not good:
        raise TrainError(f"no usable records in {path}.")
    if bad:
        log(f"[llavakit] skipping {len(bad)} bad record(s), training on {len(good)}.")
    return good


def check_record(proc, rec: Record, max_length: int) -> tuple[int, int]:
    """About how many tokens the record takes, images included, and how many of them are its media's;
    a LlavakitError if it cannot be trained on (cheap: image headers, no pixels)."""
    from PIL import Image

    from ..processing.image import load_image
    from ..processing.prompt import split_conversation
    from .data import assistant_spans

    text, _ = assistant_spans(proc, rec.messages)
    conv = split_conversation(rec.messages)
    n = 0
    for k, (src, detail) in enumerate(zip(conv.images, conv.image_details)):
        if isinstance(src, str) and Path(src).is_file():
            try:
                with Image.open(src) as im:
                    w, h = im.size
            except Exception as e:
                raise DataError(f"image {src} cannot be read: {e}") from e
        else:
            im = load_image(src)
            w, h = im.size
        n += proc.choose_layout((h, w), len(conv.images), detail, k).tokens
    for v in conv.videos:
        if isinstance(v.source, str) and not v.source.startswith(("http", "data:")) and not Path(v.source).is_file():
            raise DataError(f"video {v.source} does not exist")
        frames = v.num_frames or proc.num_frames
        n += proc.video_tokens(frames)
    length = len(proc.tokenizer.encode(text)) + n
    if length > max_length:
        raise DataError(f"about {length} tokens after tokenization, more than --max-length {max_length}")
    return length, n


def _set_trainable(model, cfg: TrainConfig) -> list[str]:
    """Freeze by stage; returns the names of the parameters that learn."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, p in model.named_parameters():
        learn = name.startswith("multi_modal_projector.") or name == "image_newline"
        if cfg.stage == "full":
            learn = learn or name.startswith(("language_model.", "lm_head."))
            learn = learn or (cfg.train_vision and name.startswith("vision_tower."))
        if learn:
            p.requires_grad_(True)
            names.append(name)
    return names


def _param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


LENGTH_WINDOW = 64  # group_by_length sorts this many batches' worth of shuffled records at a time


def _order(n: int, seed: int, epoch: int, lengths: list[int] | None = None, batch: int = 1,
           groups: list[list[int]] | None = None) -> list[int]:
    """Epoch `epoch`'s order of the records: a shuffle of (seed, epoch). With `lengths`, consecutive
    runs of `batch` hold records of about one length (padding to a batch's longest costs compute:
    the free shapes world's conversations span 50 to 300 tokens, and random batches of 16 were 44%
    padding): windows of LENGTH_WINDOW batches of the shuffle are sorted by length and cut into
    batches, whose order is shuffled again, as LLaVA's and transformers' group-by-length samplers do.
    The windows' leftovers, fewer than `batch` each, come last.
    groups: record indices that stay adjacent (the same media, see packing.py): the groups are
    shuffled and, with `lengths`, sorted by their total length; a group can still straddle two batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if groups is None:
        units = [[i] for i in torch.randperm(n, generator=g).tolist()]
    else:
        units = [groups[k] for k in torch.randperm(len(groups), generator=g).tolist()]
    if lengths is None or batch <= 1:
        return [i for unit in units for i in unit]
    window = batch * LENGTH_WINDOW
    batches, rest, start = [], [], 0
    while start < len(units):
        part, size = [], 0
        while start < len(units) and size < window:
            part.append(units[start])
            size += len(units[start])
            start += 1
        flat = [i for unit in sorted(part, key=lambda u: sum(lengths[i] for i in u)) for i in unit]
        full = len(flat) // batch * batch
        batches += [flat[j:j + batch] for j in range(0, full, batch)]
        rest += flat[full:]
    return [i for k in torch.randperm(len(batches), generator=g).tolist() for i in batches[k]] + rest


def _encode(proc, rec: Record, cfg: TrainConfig, log, media: Example | None = None) -> Example | None:
    try:
        return encode_example(proc, rec.messages, cfg.max_length, media)
    except LlavakitError as e:
        message = f"{rec.path.name} line {rec.line}: {e}"
        if cfg.on_bad_data == "fail":
            raise TrainError(f"bad record: {message}") from e
        log(f"[llavakit] skipping bad record: {message}")
        return None


def evaluate(vlm, records: list[Record], cfg: TrainConfig, adapters=None, progress: bool = False,
             label: str = "eval", objective=None, world: World = SINGLE, filler: Example | None = None) -> float:
    """Mean loss per target token over `records` (no gradients).

    progress: a status line "[label done/total] loss so far | elapsed < remaining" on stderr, as the
    training loop shows, ended when the evaluation is (an evaluation of thousands of records takes
    minutes: the user sees it move).
    objective, world, filler: with several processes, the wrapped Objective (FSDP gathers its sharded
    parameters around its forward) and this rank's place: rank r evaluates the r-th batch_size records
    of every world × batch_size, and the sums are added over the ranks. A rank left without records
    (at the end) runs `filler`, a good example, and drops its loss: every rank must run as many
    forward passes, since FSDP's are collective.
    """
    model = vlm.model
    run = objective or (lambda batch: loss_sum(model, batch))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    status, started = StatusLine() if progress else None, time.perf_counter()
    chunk, pad = cfg.batch_size * world.size, vlm.processor.pad_token_id
    with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        for i in range(0, len(records), chunk):
            mine = records[i + world.rank * cfg.batch_size:i + (world.rank + 1) * cfg.batch_size]
            examples = [e for r in mine if (e := _encode(vlm.processor, r, cfg, lambda _: None))]
            if examples:
                s, n = run(collate(examples, pad))
                total, count = total + s.item(), count + n
            elif world.size > 1:
                run(collate([filler], pad))
            done = min(i + chunk, len(records))
            if done == len(records):  # the whole loss, before the final status line shows it
                total, count = distributed.sum_over_ranks(world, [total, count], model.device)
            if status is not None and (status.due() or done == len(records)):
                elapsed = time.perf_counter() - started
                eta = elapsed / done * (len(records) - done)
                text = (f"[{label} {done}/{len(records)} {100 * done / len(records):5.1f}%] loss "
                        f"{total / max(count, 1):.4f} | {clock(elapsed)} < {clock(eta)}")
                status.update(text, last=done == len(records))
    model.train(was_training)
    return total / max(count, 1)


def check_out(out: Path, overwrite: bool = False, resume: bool | Path = False) -> None:
    """Refuse an output folder that would be clobbered; reads the folder's listing only, writes nothing.

    A missing or empty folder is fine; a non-empty one only with `overwrite` (this run's files
    replace the earlier run's, whose checkpoint-N folders are removed once training starts) or
    `resume`, and then only if `train` wrote it (it holds a trainer_state.pt of its own or in a
    checkpoint-N): resuming continues a run in its own folder, never in someone else's.
    """
    out = Path(out)
    if overwrite and resume:
        raise ConfigError(f"--overwrite and --resume contradict each other: --resume continues the run in --out "
                          f"{out}, --overwrite starts a new one there; pass one of them.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; give a folder (missing or empty) for the run.")
    if overwrite or not (out.is_dir() and any(out.iterdir())):
        return
    if not resume:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to start a new run there (its files are "
                          "replaced), or --resume to continue from its newest checkpoint, or choose another folder.")
    if not ((out / STATE_FILE).is_file() or any((c / STATE_FILE).is_file() for c in out.glob("checkpoint-*"))):
        raise ConfigError(f"--out {out} is not empty and no `llavakit train` run wrote it (no {STATE_FILE}); "
                          "--resume continues a run in its own folder: pass --overwrite to start a new run there, "
                          "or choose another folder.")


def train(model_dir: str | Path, data: Path, out: Path, cfg: TrainConfig, eval_data: Path | None = None,
          resume: bool | Path = False, image_folder: Path | None = None, log=None, progress: bool = True,
          device: str = "cpu", overwrite: bool = False, fsdp: bool = False) -> dict:
    """Run a training job; returns a summary (steps, losses, time). See the module docstring.

    resume: True continues from the newest checkpoint-N in `out`, a path from that checkpoint.
    overwrite: start a new run in a non-empty `out` (see `check_out`); ConfigError without it or resume.
    device: where the model trains ("cpu", "cuda", ...); weights and optimizer state stay float32.
    Under torchrun (see distributed.py) every process calls this and gets the same summary; only rank 0
    logs and writes. fsdp: shard the model, its gradients and optimizer state over the processes
    (FSDP2, stage "full") instead of keeping a whole copy in each (DDP).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if cfg.stage not in STAGES:
        raise TrainError(f"--stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}.")
    if fsdp and cfg.stage != "full":
        raise ConfigError(f"--fsdp shards full fine-tuning (--stage full); --stage {cfg.stage} trains few parameters "
                          "and keeps a whole model in each process: drop --fsdp.")
    world, device = distributed.start(device, fsdp)
    try:
        return _train(model_dir, Path(data), Path(out), cfg, eval_data, resume, image_folder,
                      log if world.main else _quiet, progress and world.main, device, overwrite, fsdp, world)
    finally:
        distributed.stop(world)


def _quiet(_message: str) -> None:
    pass


def _train(model_dir, data: Path, out: Path, cfg: TrainConfig, eval_data, resume, image_folder, log,
           progress: bool, device: str, overwrite: bool, fsdp: bool, world: World) -> dict:
    from ..checkpoint import open_checkpoint
    from . import lora

    start_from = None

    def check() -> None:
        nonlocal start_from
        check_out(out, overwrite, resume)
        start_from = _resume_dir(out, resume)
        if start_from is not None:
            _check_resume(start_from, cfg, world)

    distributed.together(world, check)  # every rank has looked at --out before rank 0 writes there
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    base = start_from if (start_from is not None and cfg.stage != "lora") else model_dir
    # With fsdp the model stays on the CPU until sharded: fully_shard moves each layer's shard to the
    # device, so no device ever holds the whole model (not llavakit.load: no engine in training).
    vlm = open_checkpoint(base, dtype=torch.float32, device="cpu" if fsdp else device)
    model = vlm.model
    adapters = None
    if cfg.stage == "lora":
        adapters = lora.add_adapters(model, lora.LoraConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
        if start_from is not None:
            lora.load_adapter_weights(adapters, model, start_from)
    if cfg.share_media and any(w is not None for w in model.cfg.text.sliding_windows):
        raise ConfigError("--share-media packs conversations by position, which sliding-window attention does not "
                          "allow; train this model without it.")
    trainable = _set_trainable(model, cfg)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.compile:
        # Per layer and with dynamic shapes: conversations differ in length, one graph serves them all.
        for layer in list(model.language_model.layers) + list(model.vision_tower.encoder.layers):
            layer.compile(dynamic=True)
    touch = distributed.MAYBE_UNUSED if fsdp else ()
    objective = distributed.wrap(Objective(model, adapters, touch), model, world, fsdp, device)
    # After wrapping: FSDP replaces the parameters by sharded ones, which the optimizer must hold.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if adapters is not None:
        named += [(f"lora.{n}", p) for n, p in adapters.named_parameters()]

    records = load_dataset(data, vlm, cfg, image_folder, log, world)
    eval_records = load_dataset(eval_data, vlm, cfg, None, log, world) if eval_data else []
    global_batch = cfg.batch_size * cfg.grad_accum * world.size
    steps_per_epoch = max(1, math.ceil(len(records) / global_batch))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = max(1, round(cfg.warmup_ratio * total))
    opt = torch.optim.AdamW(_param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    state = _Progress()
    if start_from is not None:
        state = _load_state(start_from, opt, sched, fsdp)
        log(f"[llavakit] resuming from {start_from} at step {state.step}/{total}")
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            # Only now, with the model and the data checked: an earlier run's checkpoint-N would be resumed
            # from, or kept by _prune over this run's own (higher step numbers win).
            for old in out.glob("checkpoint-*"):
                if (old / STATE_FILE).is_file():
                    shutil.rmtree(old)
    split = f" ({world.size} processes × {cfg.batch_size} × {cfg.grad_accum})" if world.size > 1 else ""
    log(f"[llavakit] stage {cfg.stage}: {sum(p.numel() for _, p in named):,} trainable parameters "
        f"({len(trainable)} tensors{', + LoRA' if adapters is not None else ''}), {len(records)} records, "
        f"{total} steps of {global_batch} conversations{split}")

    # A bad record found only now (the check before training estimates) leaves its batch smaller; a rank
    # left with an empty micro-batch runs a good example with weight 0, as its peers wait for it.
    note = log if world.main else (lambda msg: print(f"[rank {world.rank}] {msg}", file=sys.stderr, flush=True))
    filler = _filler(vlm.processor, records, cfg) if world.size > 1 else None
    pad = vlm.processor.pad_token_id
    objective.train()
    lengths = [rec.tokens for rec in records] if cfg.group_by_length else None
    keys = [packing.media_key(rec) for rec in records] if cfg.share_media else None
    groups = packing.media_groups(keys) if keys is not None else None
    if lengths is not None and groups is not None:
        for group in groups:  # packed, a group holds its media's tokens once: its length is the sum
            for i in group[1:]:
                lengths[i] -= records[i].media_tokens
    media_ids = {t for t in (model.cfg.image_token_id, model.cfg.video_token_id) if t is not None}
    order = _order(len(records), cfg.seed, state.epoch, lengths, global_batch, groups)
    history, started, last_eval = [], time.perf_counter(), None
    done_at_start, start_step = state.samples, state.step
    status = StatusLine() if progress else None
    while state.step < total:
        opt.zero_grad(set_to_none=True)
        picked, order = _take(state, order, len(records), cfg.seed, global_batch, lengths, groups)
        mine = distributed.share(picked, world)
        batches = []
        for m in range(cfg.grad_accum):
            chosen = mine[m * cfg.batch_size:(m + 1) * cfg.batch_size]
            if keys is None:
                examples = [e for i in chosen if (e := _encode(vlm.processor, records[i], cfg, note))]
            else:  # a picture's conversations: preprocessed once, then packed after its tokens
                encoded, seen = [], {}
                for i in chosen:
                    e = _encode(vlm.processor, records[i], cfg, note, seen.get(keys[i]))
                    if e is not None:
                        encoded.append((i, e))
                        if keys[i] is not None:
                            seen.setdefault(keys[i], e)
                examples = packing.pack_batch([e for _, e in encoded], [keys[i] for i, _ in encoded], media_ids)
            if not examples and filler is None:
                filler = _filler(vlm.processor, records, cfg)
            batches.append((collate(examples or [filler], pad), 1.0 if examples else 0.0))
        local = sum(b.target_tokens for b, weight in batches if weight)
        # The mean over every target of the global batch: DDP and FSDP average gradients over the ranks,
        # so each rank's sum is scaled by world / targets.
        targets = distributed.sum_over_ranks(world, [local], model.device)[0]
        step_sum = 0.0
        for k, (batch, weight) in enumerate(batches):
            with distributed.gradient_sync(objective, k == len(batches) - 1):
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    s, _ = objective(batch)
                (s * weight * world.size / max(targets, 1)).backward()
            step_sum += weight * s.item()
        step_loss = distributed.sum_over_ranks(world, [step_sum], model.device)[0] / max(targets, 1)
        distributed.clip_grad_norm([p for _, p in named], cfg.max_grad_norm)
        opt.step()
        sched.step()
        state.step += 1
        state.samples += global_batch
        history.append(step_loss)
        if status is not None and (status.due() or state.step == total):
            elapsed = time.perf_counter() - started
            rate = (state.samples - done_at_start) / elapsed
            eta = elapsed / (state.step - start_step) * (total - state.step)
            text = (f"[{state.step}/{total} {100 * state.step / total:5.1f}%] loss {step_loss:.4f} "
                    f"lr {sched.get_last_lr()[0]:.2e} {rate:.1f} samples/s | {clock(elapsed)} < {clock(eta)}")
            status.update(text, last=state.step == total)
        if cfg.eval_every and eval_records and state.step % cfg.eval_every == 0 and state.step < total:
            # Its own status line, ended with the loss, replaces the training's until the next step.
            last_eval = evaluate(vlm, eval_records, cfg, progress=progress, label=f"step {state.step}: eval",
                                 objective=objective, world=world, filler=filler)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total:
            _save(vlm, adapters, out / f"checkpoint-{state.step}", cfg, state, opt, sched, model_dir, world, fsdp)
            if world.main:
                _prune(out, cfg.keep_checkpoints)
    if eval_records:
        last_eval = evaluate(vlm, eval_records, cfg, progress=progress, objective=objective, world=world,
                             filler=filler)
        log(f"[llavakit] eval loss {last_eval:.4f} on {len(eval_records)} records")
    _save(vlm, adapters, out, cfg, state, opt, sched, model_dir, world, fsdp)
    elapsed = time.perf_counter() - started
    summary = {"steps": state.step, "samples": state.samples, "seconds": round(elapsed, 1),
               "final_loss": history[-1] if history else None, "eval_loss": last_eval,
               "first_loss": history[0] if history else None, "world_size": world.size}
    if world.main:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _take(state: _Progress, order: list[int], n_records: int, seed: int, count: int,
          lengths: list[int] | None = None, groups: list[list[int]] | None = None) -> tuple[list[int], list[int]]:
    """The next `count` indices of the epochs' record orders (a step's global batch), and the current order.

    Advances `state` (cursor, epoch); every rank computes the same, so they agree without talking.
    """
    picked = []
    while len(picked) < count:
        if state.cursor >= len(order):
            state.epoch, state.cursor = state.epoch + 1, 0
            order = _order(n_records, seed, state.epoch, lengths, count, groups)
        picked.append(order[state.cursor])
        state.cursor += 1
    return picked, order


def _filler(proc, records: list[Record], cfg: TrainConfig) -> Example:
    """The first record that encodes (see the training loop: a stand-in whose loss counts for nothing)."""
    for rec in records:
        try:
            return encode_example(proc, rec.messages, cfg.max_length)
        except LlavakitError:
            continue
    raise TrainError("no record of the training data can be encoded; check the data and --max-length.")


# -- checkpoints --------------------------------------------------------------------------------------
def _jsonable(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


# How a global batch is split may change between a run and its resumption; the global batch may not.
_SPLIT = ("batch_size", "grad_accum")


def _check_resume(start_from: Path, cfg: TrainConfig, world: World) -> None:
    """Refuse a checkpoint made with other options, or with another global batch (however split)."""
    saved = json.loads((start_from / "train_config.json").read_text())
    saved_world = saved.pop("world_size", 1)  # absent from runs of one process made before it was written
    saved.setdefault("group_by_length", False)  # absent from runs made before it existed
    saved.setdefault("share_media", False)
    mine = _jsonable(cfg)
    others = {k: v for k, v in saved.items() if k not in _SPLIT}
    if others != {k: v for k, v in mine.items() if k not in _SPLIT}:
        raise TrainError(f"--resume: {start_from} was made with other options "
                         f"({_diff(others, {k: v for k, v in mine.items() if k not in _SPLIT})}); "
                         "resume with the same options.")
    was = saved["batch_size"] * saved["grad_accum"] * saved_world
    now = cfg.batch_size * cfg.grad_accum * world.size
    if was != now:
        per = cfg.grad_accum * world.size
        hint = (f"pass --batch-size {was // per}" if was % per == 0 else
                f"choose --batch-size × --grad-accum × processes = {was}")
        raise TrainError(f"--resume: {start_from} was made with a global batch of {was} conversations (--batch-size "
                         f"{saved['batch_size']} × --grad-accum {saved['grad_accum']} × {saved_world} process(es)); "
                         f"this run's is {now} (--batch-size {cfg.batch_size} × --grad-accum {cfg.grad_accum} × "
                         f"{world.size} process(es)). A run resumes with the same global batch: {hint}.")


def _save(vlm, adapters, folder: Path, cfg: TrainConfig, state: _Progress, opt, sched, base_model,
          world: World = SINGLE, fsdp: bool = False) -> None:
    """Write a checkpoint; rank 0 writes, every rank takes part (with fsdp they gather the shards for it)."""
    from . import lora

    weights = distributed.full_tensors(world, vlm.model.state_dict()) if fsdp else None
    optimizer = distributed.full_optimizer_state(world, opt) if fsdp else opt.state_dict()
    if world.main:
        folder.mkdir(parents=True, exist_ok=True)
        if adapters is not None:
            lora.save_adapter(adapters, vlm.model, folder, base_model)
        elif weights is not None:
            _whole_model(vlm, weights).save_pretrained(folder)
        else:
            vlm.save_pretrained(folder)
        saved_cfg = {**_jsonable(cfg), "world_size": world.size}
        (folder / "train_config.json").write_text(json.dumps(saved_cfg, indent=2) + "\n")
        torch.save({"progress": dataclasses.asdict(state), "optimizer": optimizer, "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state()}, folder / STATE_FILE)
    distributed.barrier(world)  # nobody reads or prunes a checkpoint half written


def _whole_model(vlm, weights: dict[str, torch.Tensor]):
    """vlm with its model rebuilt unsharded from gathered `weights` (on the CPU), to be saved as usual."""
    from ..model.llava import LlavaModel

    with torch.device("meta"):
        model = LlavaModel(vlm.config)
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    return dataclasses.replace(vlm, model=model)


def _load_state(folder: Path, opt, sched, fsdp: bool = False) -> _Progress:
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    # Saved whole whatever the run: with fsdp each rank keeps its shard of every moment.
    opt.load_state_dict(distributed.shard_optimizer_state(saved["optimizer"], opt) if fsdp else saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return _Progress(**saved["progress"])


def _resume_dir(out: Path, resume: bool | Path) -> Path | None:
    """The checkpoint to resume from: a given folder, else the newest checkpoint-N under `out`."""
    if not resume:
        return None
    if resume is not True:
        folder = Path(resume)
        if not (folder / STATE_FILE).is_file():
            raise TrainError(f"--resume {folder}: no {STATE_FILE} there; give a checkpoint-N folder of a run.")
        return folder
    found = sorted((p for p in out.glob("checkpoint-*") if (p / STATE_FILE).is_file()),
                   key=lambda p: int(p.name.split("-")[-1]))
    if not found:
        raise TrainError(f"--resume: no checkpoint-N folder with {STATE_FILE} in {out}.")
    return found[-1]


def _prune(out: Path, keep: int) -> None:
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
