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
from .data import DataError, Example, Record, collate, encode_example, read_records
from .objective import enable_checkpointing, loss_sum

STAGES = ("projector", "full", "lora")
STATE_FILE = "trainer_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run (written to the output folder as train_config.json)."""

    stage: str = "full"
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # conversations per micro-batch
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
    seed: int = 0
    log_every: int = 1


class TrainError(LlavakitError):
    """A training run that cannot start or go on (bad data with on_bad_data="fail", bad options)."""


@dataclass
class _Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # examples of this epoch's order already consumed
    samples: int = 0


def load_dataset(path: Path, vlm, cfg: TrainConfig, image_folder: Path | None = None,
                 log=print) -> list[Record]:
    """Read and check every record (text, media, length) before training; report bad ones by line."""
    good, bad = [], []
    for rec in read_records(path, image_folder):
        if isinstance(rec, DataError):
            bad.append(str(rec))
            continue
        try:
            check_record(vlm.processor, rec, cfg.max_length)
            good.append(rec)
        except LlavakitError as e:
            bad.append(f"{rec.path.name} line {rec.line}: {e}")
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


def check_record(proc, rec: Record, max_length: int) -> None:
    """Raise a LlavakitError if a record cannot be trained on (cheap: image headers, no pixels)."""
    from PIL import Image

    from ..processing.image import load_image
    from ..processing.prompt import split_conversation
    from .data import assistant_spans

    text, _ = assistant_spans(proc, rec.messages)
    conv = split_conversation(rec.messages)
    tiled = proc.tiles_images(len(conv.images))
    n = 0
    for src in conv.images:
        if isinstance(src, str) and Path(src).is_file():
            try:
                with Image.open(src) as im:
                    w, h = im.size
            except Exception as e:
                raise DataError(f"image {src} cannot be read: {e}") from e
        else:
            im = load_image(src)
            w, h = im.size
        n += proc.image_tokens((h, w), tiled)
    for v in conv.videos:
        if isinstance(v.source, str) and not v.source.startswith(("http", "data:")) and not Path(v.source).is_file():
            raise DataError(f"video {v.source} does not exist")
        frames = v.num_frames or proc.num_frames
        n += proc.video_tokens(frames)
    length = len(proc.tokenizer.encode(text)) + n
    if length > max_length:
        raise DataError(f"about {length} tokens after tokenization, more than --max-length {max_length}")


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


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _encode(proc, rec: Record, cfg: TrainConfig, log) -> Example | None:
    try:
        return encode_example(proc, rec.messages, cfg.max_length)
    except LlavakitError as e:
        message = f"{rec.path.name} line {rec.line}: {e}"
        if cfg.on_bad_data == "fail":
            raise TrainError(f"bad record: {message}") from e
        log(f"[llavakit] skipping bad record: {message}")
        return None


def evaluate(vlm, records: list[Record], cfg: TrainConfig, adapters=None, progress: bool = False,
             label: str = "eval") -> float:
    """Mean loss per target token over `records` (no gradients).

    progress: a status line "[label done/total] loss so far | elapsed < remaining" on stderr, as the
    training loop shows, ended when the evaluation is (an evaluation of thousands of records takes
    minutes: the user sees it move).
    """
    model = vlm.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    status, started = StatusLine() if progress else None, time.perf_counter()
    with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        for i in range(0, len(records), cfg.batch_size):
            examples = [e for r in records[i:i + cfg.batch_size] if (e := _encode(vlm.processor, r, cfg, lambda _: None))]
            if examples:
                s, n = loss_sum(model, collate(examples, vlm.processor.pad_token_id))
                total, count = total + s.item(), count + n
            done = min(i + cfg.batch_size, len(records))
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
          device: str = "cpu", overwrite: bool = False) -> dict:
    """Run a training job; returns a summary (steps, losses, time). See the module docstring.

    resume: True continues from the newest checkpoint-N in `out`, a path from that checkpoint.
    overwrite: start a new run in a non-empty `out` (see `check_out`); ConfigError without it or resume.
    device: where the model trains ("cpu", "cuda", ...); weights and optimizer state stay float32.
    """
    from ..checkpoint import open_checkpoint
    from . import lora

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if cfg.stage not in STAGES:
        raise TrainError(f"--stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}.")
    out = Path(out)
    check_out(out, overwrite, resume)
    start_from = _resume_dir(out, resume)
    if start_from is not None:
        saved = json.loads((start_from / "train_config.json").read_text())
        if saved != _jsonable(cfg):
            raise TrainError(f"--resume: {start_from} was made with other options ({_diff(saved, _jsonable(cfg))}); "
                             "resume with the same options.")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    base = start_from if (start_from is not None and cfg.stage != "lora") else model_dir
    vlm = open_checkpoint(base, dtype=torch.float32, device=device)  # not llavakit.load: no engine in training
    model = vlm.model
    adapters = None
    if cfg.stage == "lora":
        adapters = lora.add_adapters(model, lora.LoraConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
        if start_from is not None:
            lora.load_adapter_weights(adapters, model, start_from)
    trainable = _set_trainable(model, cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if adapters is not None:
        named += [(f"lora.{n}", p) for n, p in adapters.named_parameters()]
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.compile:
        # Per layer and with dynamic shapes: conversations differ in length, one graph serves them all.
        for layer in list(model.language_model.layers) + list(model.vision_tower.encoder.layers):
            layer.compile(dynamic=True)

    records = load_dataset(data, vlm, cfg, image_folder, log)
    eval_records = load_dataset(eval_data, vlm, cfg, None, log) if eval_data else []
    micro = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = max(1, math.ceil(len(records) / micro))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = max(1, round(cfg.warmup_ratio * total))
    opt = torch.optim.AdamW(_param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    state = _Progress()
    if start_from is not None:
        state = _load_state(start_from, opt, sched)
        log(f"[llavakit] resuming from {start_from} at step {state.step}/{total}")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        # Only now, with the model and the data checked: an earlier run's checkpoint-N would be resumed
        # from, or kept by _prune over this run's own (higher step numbers win).
        for old in out.glob("checkpoint-*"):
            if (old / STATE_FILE).is_file():
                shutil.rmtree(old)
    log(f"[llavakit] stage {cfg.stage}: {sum(p.numel() for _, p in named):,} trainable parameters "
        f"({len(trainable)} tensors{', + LoRA' if adapters is not None else ''}), {len(records)} records, "
        f"{total} steps of {micro} conversations")

    model.train()
    order = _order(len(records), cfg.seed, state.epoch)
    history, started, last_eval = [], time.perf_counter(), None
    done_at_start, start_step = state.samples, state.step
    status = StatusLine() if progress else None
    while state.step < total:
        opt.zero_grad(set_to_none=True)
        batches = []
        for _ in range(cfg.grad_accum):
            picked = []
            while len(picked) < cfg.batch_size:
                if state.cursor >= len(order):
                    state.epoch, state.cursor = state.epoch + 1, 0
                    order = _order(len(records), cfg.seed, state.epoch)
                rec = records[order[state.cursor]]
                state.cursor += 1
                example = _encode(vlm.processor, rec, cfg, log)
                if example is not None:
                    picked.append(example)
            batches.append(collate(picked, vlm.processor.pad_token_id))
        targets = sum(b.target_tokens for b in batches)
        step_loss = 0.0
        for batch in batches:
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                s, _ = loss_sum(model, batch)
            (s / targets).backward()  # the mean over the targets of the whole accumulated step
            step_loss += s.item() / targets
        torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
        opt.step()
        sched.step()
        state.step += 1
        state.samples += micro
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
            last_eval = evaluate(vlm, eval_records, cfg, progress=progress, label=f"step {state.step}: eval")
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total:
            _save(vlm, adapters, out / f"checkpoint-{state.step}", cfg, state, opt, sched, model_dir)
            _prune(out, cfg.keep_checkpoints)
    if eval_records:
        last_eval = evaluate(vlm, eval_records, cfg, progress=progress)
        log(f"[llavakit] eval loss {last_eval:.4f} on {len(eval_records)} records")
    _save(vlm, adapters, out, cfg, state, opt, sched, model_dir)
    elapsed = time.perf_counter() - started
    summary = {"steps": state.step, "samples": state.samples, "seconds": round(elapsed, 1),
               "final_loss": history[-1] if history else None, "eval_loss": last_eval,
               "first_loss": history[0] if history else None}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# -- checkpoints --------------------------------------------------------------------------------------
def _jsonable(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _save(vlm, adapters, folder: Path, cfg: TrainConfig, state: _Progress, opt, sched, base_model) -> None:
    from . import lora

    folder.mkdir(parents=True, exist_ok=True)
    if adapters is not None:
        lora.save_adapter(adapters, vlm.model, folder, base_model)
    else:
        vlm.save_pretrained(folder)
    (folder / "train_config.json").write_text(json.dumps(_jsonable(cfg), indent=2) + "\n")
    torch.save({"progress": dataclasses.asdict(state), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state()}, folder / STATE_FILE)


def _load_state(folder: Path, opt, sched) -> _Progress:
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    opt.load_state_dict(saved["optimizer"])
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
