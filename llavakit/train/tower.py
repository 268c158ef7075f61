"""`llavakit pretrain-tower`: a SigLIP (or CLIP) vision tower pretrained on the shapes world.

LLaVA's recipe starts from a *pretrained* vision tower; llava-shapes has none to download, so it
trains its own. A tower trained only through the language model's loss learns what is where
slowly and wears away what it has (a linear probe reads a shape's kind from a random tower 86% of
the time and from the tower after stage 2 60% of the time), so the tower gets its own task first,
dense like a segmentation model's: pictures and clip frames of the shapes world are drawn on the
fly, and two linear heads on every output token predict

    what the patch holds   nothing, or the colour and kind of the shape whose centre lies in it
                           (free world: of the shape covering most of it)
    which patch it is      its row-major index, so the features keep their place
    where its shape is     free world: the centre of that shape in the view, so that every token
                           of a shape knows the whole shape's place (regions, left/right, motion)

The heads are thrown away; the tower is written as a SigLIP/CLIP checkpoint folder (config.json,
model.safetensors with `vision_model.*` keys, preprocessor_config.json) that `llavakit init
--vision DIR` assembles into a LLaVA model and transformers' SiglipVisionModel / CLIPVisionModel
load. Stage 2 then keeps it frozen, as LLaVA does.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import anyres
from ..config import VisionConfig
from ..errors import ConfigError
from ..families import TOWERS
from ..model.vision import VisionTower
from ..progress import StatusLine, clock
from ..weights import write_tensors
from . import scenes
from . import shapes as S
from .assemble import _VISION, MAX_GRID_SIDE, VISION_SIZE_KEYS, _init_random, _pinpoints, check_grids, parse_spec

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


# ---- the free world: any picture, seen as the processor shows it to the tower ---------------------

FRAME_SHARE = 0.12  # draws that are a clip's frames rather than a picture
SQUARE_SHARE = 0.3  # pictures that also give the padded square a picture among several becomes
TILES_PER_PICTURE = 3  # any-resolution tiles taken from one picture (drawing it costs more than the tower's step)
JPEG_SHARE, JPEG_QUALITY = 0.25, (50, 95)
MIN_VISIBLE = 3  # px: a shape narrower than this in a view is a smudge, labelled nowhere


def _jpeg(image: Image.Image, rng: random.Random) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=rng.randint(*JPEG_QUALITY))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _scaled(boxes, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0):
    return [(c, k, (x0 * sx + dx, y0 * sy + dy, x1 * sx + dx, y1 * sy + dy)) for c, k, (x0, y0, x1, y1) in boxes]


def free_views(rng: random.Random, side: int, pinpoints) -> list[tuple[np.ndarray, list]]:
    """Tower inputs drawn from the free world, as the processor would cut them: a list of (side,
    side, 3) uint8 pixels with [(colour, kind, (x0, y0, x1, y1))] of the shapes in view coordinates.

    Either two frames of a motion clip, or several views of one picture: its base view (squashed
    to the tile), sometimes the padded square a picture among several becomes, and up to
    TILES_PER_PICTURE of its any-resolution tiles (mostly tiles that show a shape).
    """
    if rng.random() < FRAME_SHARE:
        scene, boxes = scenes.sample_clip(rng, rng.choice(S.DIRECTIONS))
        shape = scene.shapes[0]
        times = rng.sample(range(len(boxes)), 2)
        frames = scenes.render_clip(scene, [boxes[t] for t in times])
        h, w = frames[0].shape[:2]
        return [(_resize(f, (side, side)), _scaled([(shape.color, shape.kind, boxes[t])], side / w, side / h))
                for f, t in zip(frames, times)]
    image, scene = scenes.sample_picture(rng)
    shapes = [(s.color, s.kind, s.box) for s in scene.shapes]
    if rng.random() < JPEG_SHARE:
        image = _jpeg(image, rng)
    w, h = image.size
    hwc = np.asarray(image)
    views = [(_resize(hwc, (side, side)), _scaled(shapes, side / w, side / h))]
    if rng.random() < SQUARE_SHARE:
        big = max(w, h)
        canvas = np.empty((big, big, 3), np.uint8)
        canvas[...] = 127  # SigLIP's mean colour (0.5), as the processor pads
        top, left = (big - h) // 2, (big - w) // 2
        canvas[top:top + h, left:left + w] = hwc
        views.append((_resize(canvas, (side, side)),
                      _scaled(shapes, side / big, side / big, left * side / big, top * side / big)))
    best = anyres.select_best_resolution((h, w), pinpoints)
    inner = anyres.resize_within((h, w), best)
    top, _, left, _ = anyres.centre_padding(inner, best)
    canvas = np.zeros((*best, 3), np.uint8)
    canvas[top:top + inner[0], left:left + inner[1]] = _resize(hwc, inner)
    moved = _scaled(shapes, inner[1] / w, inner[0] / h, left, top)
    tiles = [(i, j) for i in range(0, best[0], side) for j in range(0, best[1], side)]
    showing = [(i, j) for i, j in tiles if any(x0 < j + side and x1 > j and y0 < i + side and y1 > i
                                               for _, _, (x0, y0, x1, y1) in moved)]
    rest = [t for t in tiles if t not in showing]
    rng.shuffle(showing)
    rng.shuffle(rest)
    chosen = showing[:TILES_PER_PICTURE - 1] + rest[:1] if rest and rng.random() < 0.2 else showing[:TILES_PER_PICTURE]
    for i, j in chosen or tiles[:1]:
        views.append((canvas[i:i + side, j:j + side], _scaled(moved, 1, 1, -j, -i)))
    return views


def _resize(hwc: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    return np.asarray(Image.fromarray(hwc).resize((w, h), Image.BICUBIC, reducing_gap=None))


def patch_labels(shapes, side: int, patch: int) -> np.ndarray:
    """(P*P,) int64, row-major patches: 1 + CLASSES index of the shape covering most of the patch,
    among those covering a fifth of it or holding half of their visible part (a small shape inside
    it); 0 where no shape does."""
    return patch_targets(shapes, side, patch)[0]


def patch_targets(shapes, side: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """`patch_labels`, and (P*P, 2) float32: the centre (x, y) of each labelled patch's shape as a
    share of the view's side (outside 0..1 for a shape cut by the view's edge; 0 where unlabelled).

    The centre makes every token of a shape say where the whole shape is: a 4x4 grid of patches
    cannot tell the picture's thirds apart, and the tokens a shape spreads over agree on one place.
    """
    n = side // patch
    best = np.zeros(n * n)
    out = np.zeros(n * n, np.int64)
    centres = np.zeros((n * n, 2), np.float32)
    for color, kind, box in shapes:
        centre = ((box[0] + box[2]) / 2 / side, (box[1] + box[3]) / 2 / side)
        x0, y0, x1, y1 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(side)), min(box[3], float(side))
        if x1 - x0 < MIN_VISIBLE or y1 - y0 < MIN_VISIBLE:
            continue
        visible = (x1 - x0) * (y1 - y0)
        for r in range(int(y0 // patch), min(n, int(math.ceil(y1 / patch)))):
            for c in range(int(x0 // patch), min(n, int(math.ceil(x1 / patch)))):
                inter = max(0.0, min(x1, (c + 1) * patch) - max(x0, c * patch)) * \
                    max(0.0, min(y1, (r + 1) * patch) - max(y0, r * patch))
                if (inter >= 0.2 * patch * patch or inter >= 0.5 * visible) and inter > best[r * n + c]:
                    best[r * n + c] = inter
                    out[r * n + c] = 1 + CLASSES.index((color, kind))
                    centres[r * n + c] = centre
    return out, centres


def sample_free_batch(rng: random.Random, n: int, cfg: VisionConfig, pinpoints):
    """`n` normalised free-world views (n, 3, S, S), their patch labels (n, P*P) and their shapes'
    centres (n, P*P, 2) (see `patch_targets`)."""
    mean, std = (torch.tensor(v)[:, None, None] for v in _STATS[cfg.model_type])
    views, labels, centres = [], [], []
    while len(views) < n:
        for hwc, shapes in free_views(rng, cfg.image_size, pinpoints)[:n - len(views)]:
            views.append(hwc)
            label, centre = patch_targets(shapes, cfg.image_size, cfg.patch_size)
            labels.append(label)
            centres.append(centre)
    pixels = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float().div_(255)
    return (pixels - mean) / std, torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(centres))


class _Batches(torch.utils.data.IterableDataset):
    """Endless training batches drawn by `draw(rng, n)` from a generator seeded by `seed`, so that a
    DataLoader worker (on another core) draws the pictures while the tower learns."""

    def __init__(self, draw, seed: str, batch_size: int):
        self.draw, self.seed, self.batch_size = draw, seed, batch_size

    def __iter__(self):
        torch.set_num_threads(1)
        rng = random.Random(self.seed)
        while True:
            yield self.draw(rng, self.batch_size)


def _features(tower: VisionTower, pixels: torch.Tensor) -> torch.Tensor:
    """The last layer's patch tokens (CLIP's class token dropped)."""
    feats = tower(pixels, (-1,))
    return feats[:, 1:] if tower.cfg.has_class_token else feats


def _scores(tower: VisionTower, what: torch.nn.Linear, centre: torch.nn.Linear, test) -> dict:
    """Held-out token, shape and kind accuracies of the "what" head; with the free world's centres
    in `test`, also the mean distance (a share of the view's side) between predicted and true
    centres of labelled patches' shapes."""
    pixels, labels, *centres = test
    with torch.no_grad():
        feats = _features(tower, pixels)
        pred = what(feats).argmax(-1)
        held = labels > 0
        kinds = len(S.KINDS)
        out = {"token_accuracy": (pred == labels).float().mean().item(),
               "shape_accuracy": (pred[held] == labels[held]).float().mean().item(),
               "kind_accuracy": ((pred[held] > 0) & ((pred[held] - 1) % kinds == (labels[held] - 1) % kinds))
               .float().mean().item()}
        if centres:
            out["centre_error"] = (centre(feats)[held] - centres[0][held]).norm(dim=-1).mean().item()
    return out


def _check_spec(vision: str, world: str = "grid") -> dict:
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
    if world == "free" and size % patch:
        raise ConfigError(f"patch_size {patch} must divide image_size {size}.")
    if world == "grid" and (size % patch or patch > size // S.GRID):
        raise ConfigError(f"patch_size {patch} must divide image_size {size} and be at most {size // S.GRID}, "
                          f"so that no patch spans two cells of the {S.GRID}x{S.GRID} grid.")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConfigError(f"hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads "
                          f"{cfg['num_attention_heads']}.")
    return cfg


def pretrain_tower(out: Path, vision: str, steps: int = 400, batch_size: int = 64, lr: float = 1e-3,
                   seed: int = 0, progress: bool = True, world: str = "grid", workers: int = 1,
                   min_tiles: int = 1, max_grid: int = MAX_GRID_SIDE) -> dict:
    """Train a tower of spec `vision` ("siglip:image_size=96,patch_size=32,...") on the shapes
    world's token labels for `steps` AdamW steps and write it under `out`; returns the summary
    (also written as train_summary.json): losses and held-out token accuracies.

    world "grid": 96-px grid pictures, one class per patch (the shape whose centre it holds).
    world "free": the views the processor makes of free-world pictures (`free_views`), each patch
    labelled with the shape covering most of it (`patch_labels`).
    `workers` processes draw the pictures beside the training (0: in this process); the same
    arguments give the same weights (pictures come from a generator seeded by `seed`).
    min_tiles: the free world's tiles are cut from OneVision grids of at least min_tiles x min_tiles,
    as `init --min-tiles` makes the processor cut them; max_grid: and of at most max_grid x max_grid
    (`init --max-grid`).
    """
    if world not in ("grid", "free"):
        raise ConfigError(f"world must be grid or free, got {world!r}.")
    cfg_dict = _check_spec(vision, world)
    cfg = VisionConfig.from_hf(cfg_dict)
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"steps and batch size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}.")
    if workers not in (0, 1):
        raise ConfigError(f"workers must be 0 (draw pictures in this process) or 1, got {workers}.")
    check_grids("llava_onevision", min_tiles, max_grid)  # the free world's views are OneVision's
    torch.manual_seed(seed)
    tower = VisionTower(cfg)
    _init_random(tower, cfg.hidden_size)  # transformers' initialisation, as init gives a spec tower
    tokens = cfg.patches_per_side ** 2
    free = world == "free"
    what = torch.nn.Linear(cfg.hidden_size, 1 + len(CLASSES))
    where = torch.nn.Linear(cfg.hidden_size, tokens)
    centre = torch.nn.Linear(cfg.hidden_size, 2)  # free world: where the patch's shape is, as a whole
    params = [*tower.parameters(), *what.parameters(), *where.parameters(), *(centre.parameters() if free else ())]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / steps))))
    pins = _pinpoints("llava_onevision", cfg.image_size, min_tiles, max_grid)
    draw = (lambda r, n: sample_free_batch(r, n, cfg, pins)) if free else (lambda r, n: sample_batch(r, n, cfg))
    test = draw(random.Random(f"tower/{seed}/test"), 256)
    place = torch.arange(tokens)
    # one worker: a second one would only pay off with a third core, and keeps the order simple;
    # the tower's own threads leave the worker its core
    threads = torch.get_num_threads()
    if workers:
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    batches = iter(torch.utils.data.DataLoader(_Batches(draw, f"tower/{seed}/train", batch_size), batch_size=None,
                                               num_workers=workers, prefetch_factor=4 if workers else None))
    try:
        status = StatusLine() if progress else None
        start, first, loss = time.monotonic(), None, None
        for step in range(1, steps + 1):
            pixels, labels, *centres = next(batches)
            feats = _features(tower, pixels)
            loss = F.cross_entropy(what(feats).flatten(0, 1), labels.flatten()) + F.cross_entropy(where(feats).flatten(0, 1), place.repeat(len(pixels)))
            if centres:
                held = labels > 0
                # in tenths of the view, so that a miss of a tenth weighs about as much as a wrong class
                loss = loss + F.smooth_l1_loss(centre(feats)[held] * 10, centres[0][held] * 10)
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
                   "world": world, **_scores(tower, what, centre, test)}
    finally:  # a failed run leaves the caller its thread count
        torch.set_num_threads(threads)
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
