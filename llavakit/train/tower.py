"""`llavakit pretrain-tower`: a SigLIP (or CLIP) vision tower pretrained on the shapes world.

LLaVA's recipe starts from a *pretrained* vision tower; llava-shapes has none to download, so it
trains its own. A tower trained only through the language model's loss learns what is where
slowly and wears away what it has (a linear probe reads a shape's kind from a random tower 86% of
the time and from the tower after stage 2 60% of the time), so the tower gets its own task first,
dense like a segmentation model's: pictures and clip frames of the shapes world are drawn on the
fly, and two linear heads on every output token predict

    what the patch holds   nothing, or the colour and kind of the shape whose centre lies in it
    which patch it is      its row-major index, so the features keep their place

The heads are thrown away; the tower is written as a SigLIP/CLIP checkpoint folder (config.json,
model.safetensors with `vision_model.*` keys, preprocessor_config.json) that `llavakit init
--vision DIR` assembles into a LLaVA model and transformers' SiglipVisionModel / CLIPVisionModel
load. Stage 2 then keeps it frozen, as LLaVA does.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import VisionConfig
from ..errors import ConfigError
from ..families import TOWERS
from ..model.vision import VisionTower
from ..progress import StatusLine, clock
from ..weights import write_tensors
from . import shapes as S
from .assemble import _VISION, VISION_SIZE_KEYS, _init_random, parse_spec

CLASSES = [(c, k) for c in S.COLORS for k in S.KINDS]  # token class i + 1; 0 is "no shape's centre here"
_ARCH = {k: t.architecture for k, t in TOWERS.items()}
_STATS = {k: (t.mean, t.std) for k, t in TOWERS.items()}


def token_labels(shapes, size: int, patch: int) -> list[int]:
    """Per patch in row-major order: 1 + CLASSES index of the shape whose centre lies in it, else 0."""
    side = size // patch
    labels = [0] * (side * side)
    for shape in shapes:
        cx, cy = shape.center
        row, col = min(int(cy // patch), side - 1), min(int(cx // patch), side - 1)
        labels[row * side + col] = 1 + CLASSES.index((shape.color, shape.kind))
    return labels


def sample_batch(rng: random.Random, n: int, cfg: VisionConfig, clip_share: float = 0.25):
    """`n` normalised pictures (n, 3, S, S) and their token labels (n, P*P): shapes-world pictures,
    and with probability `clip_share` one frame of a motion clip (shapes off the grid, too)."""
    size, patch = cfg.image_size, cfg.patch_size
    geo = S.Geometry(size)
    mean, std = (torch.tensor(v)[:, None, None] for v in _STATS[cfg.model_type])
    pixels, labels = [], []
    for _ in range(n):
        if rng.random() < clip_share:
            background, track = S.sample_motion(rng, rng.choice(S.DIRECTIONS), geo)
            scene = S.Scene(background, (track[rng.randrange(len(track))],))
        else:
            scene = S.sample_scene(rng, rng.randint(1, S.MAX_SHAPES), geo)
        image = np.array(S.render_scene(scene, size, rng.getrandbits(64)))  # writable: torch shares it
        pixels.append((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std)
        labels.append(token_labels(scene.shapes, size, patch))
    return torch.stack(pixels), torch.tensor(labels)


def _features(tower: VisionTower, pixels: torch.Tensor) -> torch.Tensor:
    """The last layer's patch tokens (CLIP's class token dropped)."""
    feats = tower(pixels, (-1,))
    return feats[:, 1:] if tower.cfg.has_class_token else feats


def _accuracy(tower: VisionTower, head: torch.nn.Linear, test) -> dict:
    pixels, labels = test
    with torch.no_grad():
        pred = head(_features(tower, pixels)).argmax(-1)
    held = labels > 0
    kinds = len(S.KINDS)
    return {"token_accuracy": (pred == labels).float().mean().item(),
            "shape_accuracy": (pred[held] == labels[held]).float().mean().item(),
            "kind_accuracy": ((pred[held] > 0) & ((pred[held] - 1) % kinds == (labels[held] - 1) % kinds))
            .float().mean().item()}


def _check_spec(vision: str) -> dict:
    """The spec's config dict, or a ConfigError saying what to change."""
    if Path(vision).is_dir():
        raise ConfigError(f"pretrain-tower starts from a size spec such as siglip:image_size=96,patch_size=32,..., "
                          f"not from a folder ({vision}).")
    cfg = parse_spec(vision, _VISION)
    for key in VISION_SIZE_KEYS:
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ConfigError(f"the vision spec needs {key}=N with N a positive integer, got {cfg.get(key)!r}.")
    size, patch = cfg["image_size"], cfg["patch_size"]
    if size < 48:
        raise ConfigError(f"image_size must be at least 48 for the shapes world, got {size}.")
    if size % patch or patch > size // S.GRID:
        raise ConfigError(f"patch_size {patch} must divide image_size {size} and be at most {size // S.GRID}, "
                          f"so that no patch spans two cells of the {S.GRID}x{S.GRID} grid.")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConfigError(f"hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads "
                          f"{cfg['num_attention_heads']}.")
    return cfg


def pretrain_tower(out: Path, vision: str, steps: int = 400, batch_size: int = 64, lr: float = 1e-3,
                   seed: int = 0, progress: bool = True) -> dict:
    """Train a tower of spec `vision` ("siglip:image_size=96,patch_size=32,...") on the shapes
    world's token labels for `steps` AdamW steps and write it under `out`; returns the summary
    (also written as train_summary.json): losses and held-out token accuracies.

    The same arguments give the same weights (pictures come from a generator seeded by `seed`).
    """
    cfg_dict = _check_spec(vision)
    cfg = VisionConfig.from_hf(cfg_dict)
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"steps and batch size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}.")
    torch.manual_seed(seed)
    tower = VisionTower(cfg)
    _init_random(tower, cfg.hidden_size)  # transformers' initialisation, as init gives a spec tower
    tokens = cfg.patches_per_side ** 2
    what = torch.nn.Linear(cfg.hidden_size, 1 + len(CLASSES))
    where = torch.nn.Linear(cfg.hidden_size, tokens)
    params = [*tower.parameters(), *what.parameters(), *where.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = random.Random(f"tower/{seed}/train")
    test = sample_batch(random.Random(f"tower/{seed}/test"), 256, cfg)
    place = torch.arange(tokens)
    status = StatusLine() if progress else None
    start, first, loss = time.monotonic(), None, None
    for step in range(1, steps + 1):
        pixels, labels = sample_batch(rng, batch_size, cfg)
        feats = _features(tower, pixels)
        loss = (F.cross_entropy(what(feats).flatten(0, 1), labels.flatten())
                + F.cross_entropy(where(feats).flatten(0, 1), place.repeat(len(pixels))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        first = loss.item() if first is None else first
        if status is not None:
            elapsed = time.monotonic() - start
            status.show(f"[{step}/{steps}] loss {loss.item():.4f} | {clock(elapsed)} < "
                        f"{clock(elapsed / step * (steps - step))}", force=step == steps)
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
               "seconds": round(time.monotonic() - start, 1), "first_loss": first, "final_loss": loss.item(),
               **_accuracy(tower, what, test)}
    save_tower(tower, Path(out), cfg_dict)
    (Path(out) / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def save_tower(tower: VisionTower, out: Path, cfg_dict: dict) -> None:
    """Write `tower` as a SigLIP/CLIP vision checkpoint folder (the layout transformers publishes)."""
    out.mkdir(parents=True, exist_ok=True)
    write_tensors({"vision_model." + k: v.detach().contiguous() for k, v in tower.state_dict().items()}, out)
    model_type = cfg_dict["model_type"]
    config = {"architectures": [_ARCH[model_type]], **cfg_dict, "dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    mean, std = _STATS[model_type]
    side = cfg_dict["image_size"]
    processor = {"image_processor_type": TOWERS[model_type].image_processor_type, "do_resize": True,
                 "size": {"height": side, "width": side}, "resample": 3, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(mean), "image_std": list(std), "do_center_crop": False,
                 "crop_size": {"height": side, "width": side}}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
