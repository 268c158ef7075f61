"""The free shapes world: flat shapes anywhere on pictures of any size, with questions about them.

The grid world (shapes.py) draws 96x96 pictures with one shape per cell of a 3x3 grid; a model
trained there answers about nothing else. Here a picture is 64..1024 px a side with an aspect up
to 4:1 either way, on a plain light or dark background (pure white and black included) with a
mild gradient and grain; 1 to 5 shapes (circle, square, triangle, in 6 colours that vary around
their names) sit anywhere, 8-40% of the short side, apart by a small gap; edges are hard or
antialiased; a quarter of the pictures are JPEG. The facts, the wordings' rules and the answer
sentences are fixed by a spec shared with an independent test renderer and the scorer
(llavakit/train/scoring.py); scene_questions.py builds the wordings and the answer sentences.

Questions name a shape by its kind ("the circle") when the picture holds one shape of that kind,
else by colour and kind ("the red circle"). "position" is asked only when the two boxes are apart
along the axis by 3% of that side, "where" (the picture's thirds) only when the shape's centre is
4% of each side away from every thirds boundary, so no answer hangs on a pixel.

Conversations: a line holds 1 to 4 turns. A later question must not be answerable by copying
from earlier turns, or the model learns to read its own transcript instead of the picture. So a
conversation keeps what its turns have told (`scene_questions.Known`): the count; each shape's colour (also when
a question names it "the red circle"); each shape's column and row of thirds; and, per axis, which
shape's centre comes first. From these it infers what a reader could: orders chain (a left of b,
b left of c: a left of c), two known columns order their shapes, and a shape left of one in the
left third is in the left third too. A question is asked only when nothing its answer states is
known yet. "describe" states the count, every colour and the left-to-right order, so after it
only "where" and above/below "position" questions remain; after "Where is the circle?" its colour
may still be asked. Pairs and clips are asked about in one turn.

    out/
    ├── images/train-000000.png|.jpg ...  images/test-000000.png|.jpg ...   (never shared)
    ├── videos/train-motion-000000.mkv ...  videos/test-000006.mkv ...     (FFV1: lossless)
    ├── captions.jsonl   stage 1: one "describe" line per train picture
    ├── train.jsonl      stage 2: `per_image` conversations per picture (and, for half the pictures,
    │                    one "helper-colours" or "helper-places" line), picture pairs, clips
    └── test.jsonl       one conversation per line, the 7 types (of its last question) in turn

Lines use the original LLaVA conversation format; media paths are relative to the JSONL file.
Each line: "id", "type" (of the last question), "tags", "image" (a list of two for "compare") or
"video", "conversations", then what was drawn: "width", "height", "background", "shapes"
([{"color", "kind", "bbox": [x0, y0, x1, y1]}], x1/y1 exclusive, left to right by centre); for
"compare" each of these is a list of two, clips add per-frame "boxes". Tags: size:small (short
side < 128), size:medium, size:large (long side >= 512), aspect:wide (>= 2:1), jpeg, paraphrase
(the last question uses a held-out wording: the last 3 of each list, only ever in test.jsonl) and
multi-turn (the last question is turn 2 or later).

Every item draws from its own `random.Random` seeded by a string (its name and `seed`), so the
same arguments give byte-identical files and an item does not depend on how many came before it.
(Over 600 lines: drawing and writing share the Scene and that seeding; the language is in
scene_questions.py.)
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import LlavakitError
from .scene_questions import WORDINGS  # noqa: F401  (re-exported: the wordings are part of the world)
from .scene_questions import (HELPER_SHARE, PICTURE_TYPES, QUESTION_TYPES, TRAIN_WEIGHTS, Ask, Balance, asks_for,
                              compare_answer, helper_line, motion_answer, plan_turns, question)
from .shapes import COLORS, DIRECTIONS, FRAMES, KINDS, _conversation, _dump, write_video

SIDE = (64, 1024)  # picture sides in px, inclusive
MAX_ASPECT = 4.0  # long side / short side
SQUARE_SHARE = 0.3  # pictures drawn square
CLIP_SIDE, CLIP_ASPECT = (96, 256), 2.0
MAX_SHAPES = 5
SHAPE_SIDE = (0.08, 0.40)  # bbox side as a share of the short picture side ...
MIN_SHAPE = 8  # ... and at least this many px: below that a triangle is a smudge
GAP, MIN_GAP = 0.02, 2  # empty space between two shapes' boxes: share of the short side, px
COLOR_JITTER = 15  # each shape's colour moves by up to this per channel, one offset per shape
GRADIENT = 12  # a background's linear gradient reaches at most +-this many levels
GRAIN = 8  # a background's grain amplitude is drawn from 0..GRAIN levels
JPEG_SHARE, JPEG_QUALITY = 0.25, (50, 95)
SUPERSAMPLE = 4  # antialiased shapes are drawn this many times larger, then box-filtered down

# name -> (darkest, lightest) RGB; one draw between them per picture, so grays stay gray.
BACKGROUNDS = {
    "white": ((255, 255, 255), (255, 255, 255)),
    "black": ((0, 0, 0), (0, 0, 0)),
    "light gray": ((200, 200, 200), (235, 235, 235)),
    "dark gray": ((35, 35, 35), (70, 70, 70)),
    "beige": ((230, 215, 185), (240, 225, 195)),
    "dark navy": ((15, 20, 40), (25, 30, 50)),
}


class ScenesError(LlavakitError):
    """The free shapes world was asked for with impossible arguments."""


@dataclass(frozen=True)
class Shape:
    """One flat shape: `box` is (x0, y0, x1, y1) in px, x1/y1 exclusive, square; `rgb` the colour drawn."""

    color: str
    kind: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_json(self) -> dict:
        return {"color": self.color, "kind": self.kind, "bbox": list(self.box)}


@dataclass(frozen=True)
class Scene:
    """Everything a picture's pixels follow from; `render_scene` draws it.

    `shapes` run left to right by box centre (ties: top first), the order "describe" lists them in.
    The background is `background_rgb` plus a linear gradient reaching +-`gradient[0]` levels at
    the far corners (direction `gradient[1]`, radians) plus grain of +-`grain` levels, the same on
    all channels, drawn from `noise_seed`.
    """

    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]
    background_rgb: tuple[int, int, int]
    gradient: tuple[float, float]
    grain: int
    antialias: bool
    noise_seed: int

    def to_json(self) -> dict:
        """What the records carry: width, height, background name and shapes."""
        return {"width": self.width, "height": self.height, "background": self.background,
                "shapes": [s.to_json() for s in self.shapes]}


# ---- drawing ----------------------------------------------------------------------------------

def sample_size(rng: random.Random, side: tuple[int, int] = SIDE, max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """(width, height): long side log-uniform in `side`, aspect 1 or uniform up to `max_aspect`, either way round."""
    lo, hi = side
    long = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    aspect = 1.0 if rng.random() < SQUARE_SHARE else rng.uniform(1.0, max_aspect)
    # rounding may not push the aspect past its cap
    short = max(lo, round(long / aspect), math.ceil(long / max_aspect))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _apart(a: tuple, b: tuple, gap: int) -> bool:
    """Whether boxes a and b leave at least `gap` px between them along x or along y."""
    return a[0] >= b[2] + gap or b[0] >= a[2] + gap or a[1] >= b[3] + gap or b[1] >= a[3] + gap


def _side_range(short: int) -> tuple[int, int]:
    lo = max(MIN_SHAPE, round(SHAPE_SIDE[0] * short))
    return lo, max(lo, round(SHAPE_SIDE[1] * short))


def _fit(rng: random.Random, width: int, height: int, side: int, lo: int, gap: int, boxes: list) -> tuple | None:
    """A box of `side` px (shrunk towards `lo` while it finds no room) apart from `boxes`, or None."""
    while True:
        for _ in range(30):
            x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, b, gap) for b in boxes):
                return box
        if side == lo:
            return None
        side = max(lo, int(side * 0.8))


def _place(rng: random.Random, width: int, height: int, n: int) -> list[tuple[int, int, int, int]]:
    """`n` square boxes inside the picture, pairwise apart by the gap."""
    short = min(width, height)
    lo, hi = _side_range(short)
    gap = max(MIN_GAP, math.ceil(GAP * short))
    for _ in range(100):  # a whole new layout when even the smallest box finds no room (rare)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            box = _fit(rng, width, height, rng.randint(lo, hi), lo, gap, boxes)
            if box is None:
                break
            boxes.append(box)
        else:
            return boxes
    raise ScenesError(f"could not place {n} shapes on a {width}x{height} picture.")  # pragma: no cover


def _background(rng: random.Random) -> tuple[str, tuple[int, int, int]]:
    name = rng.choice(sorted(BACKGROUNDS))
    dark, light = BACKGROUNDS[name]
    t = rng.random()
    return name, tuple(d + round(t * (l - d)) for d, l in zip(dark, light))


def _look(rng: random.Random) -> tuple[tuple[float, float], int, bool, int]:
    """Gradient (half the pictures), grain, antialiasing (half) and the grain's seed."""
    gradient = (rng.uniform(0, GRADIENT), rng.uniform(0, 2 * math.pi)) if rng.random() < 0.5 else (0.0, 0.0)
    return gradient, rng.randint(0, GRAIN), rng.random() < 0.5, rng.getrandbits(64)


def _order(shapes) -> tuple[Shape, ...]:
    return tuple(sorted(shapes, key=lambda s: (s.center[0], s.center[1])))


def _tint(rng: random.Random, color: str) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[color])


def sample_scene(rng: random.Random, n_shapes: int | None = None, width: int | None = None,
                 height: int | None = None) -> Scene:
    """A random picture's content: size (sampled unless given), background, look and 1..5 shapes.

    No two shapes share a (colour, kind) pair; kinds may repeat. Raises ScenesError for a count
    outside 1..5.
    """
    if n_shapes is not None and not (isinstance(n_shapes, int) and 1 <= n_shapes <= MAX_SHAPES):
        raise ScenesError(f"a picture holds 1 to {MAX_SHAPES} shapes, got {n_shapes!r}.")
    if width is None or height is None:
        width, height = sample_size(rng)
    n_shapes = rng.randint(1, MAX_SHAPES) if n_shapes is None else n_shapes
    background, rgb = _background(rng)
    gradient, grain, antialias, noise_seed = _look(rng)
    pairs = rng.sample([(c, k) for c in COLORS for k in KINDS], n_shapes)
    boxes = _place(rng, width, height, n_shapes)
    shapes = _order(Shape(c, k, box, _tint(rng, c)) for (c, k), box in zip(pairs, boxes))
    return Scene(width, height, background, shapes, rgb, gradient, grain, antialias, noise_seed)


def _canvas(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8: the background with its gradient and grain (one offset for all channels)."""
    h, w = scene.height, scene.width
    # Offsets are kept shifted by `low` so they index a table of the clipped colours: one gather
    # makes the picture, instead of widening, adding, clipping and narrowing 3 channels.
    low = GRADIENT + scene.grain
    offset = np.full((h, w), low, np.uint8)
    levels, angle = scene.gradient
    if levels:
        c, s = math.cos(angle), math.sin(angle)
        # scaled so the offset reaches +-levels exactly at the picture's farthest corners
        reach = abs(c) * (w - 1) / 2 + abs(s) * (h - 1) / 2 or 1.0
        gx = (np.arange(w, dtype=np.float32) - (w - 1) / 2) * np.float32(levels * c / reach)
        gy = (np.arange(h, dtype=np.float32) - (h - 1) / 2) * np.float32(levels * s / reach)
        offset += np.rint(gy[:, None] + gx[None, :]).astype(np.int8).view(np.uint8)  # wraps back into 0..2*low
    if scene.grain:
        offset += np.random.default_rng(scene.noise_seed).integers(0, 2 * scene.grain + 1, (h, w), np.uint8)
        offset -= np.uint8(scene.grain)
    table = np.clip(np.array(scene.background_rgb) + np.arange(-low, low + 1)[:, None], 0, 255).astype(np.uint8)
    return table[offset]  # (2*low+1, 3)[(H, W)] -> (H, W, 3)


@lru_cache(maxsize=512)
def _coverage(kind: str, side: int, antialias: bool) -> np.ndarray:
    """(side, side) float32 share of each pixel the shape covers: 0/1 for hard edges.

    Antialiased masks are drawn SUPERSAMPLE times larger and box-filtered down; only the shape's own
    box is supersampled, never the picture. Cached: sides repeat across pictures.
    """
    scale = SUPERSAMPLE if antialias else 1
    n = side * scale
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse((0, 0, n - 1, n - 1), fill=255)
    elif kind == "square":
        draw.rectangle((0, 0, n - 1, n - 1), fill=255)
    else:  # upright: base along the bottom, apex at the top centre
        draw.polygon([(0, n - 1), (n - 1, n - 1), ((n - 1) / 2, 0)], fill=255)
    if antialias:
        mask = mask.resize((side, side), Image.Resampling.BOX)
    return np.asarray(mask, np.float32) / 255


def _paint(pixels: np.ndarray, shape: Shape, antialias: bool) -> None:
    """Blend `shape` into `pixels` (H, W, 3) uint8 in place, touching only its box."""
    x0, y0, x1, y1 = shape.box
    alpha = _coverage(shape.kind, x1 - x0, antialias)[:, :, None]  # (s, s, 1)
    region = pixels[y0:y1, x0:x1].astype(np.float32)
    region += (np.array(shape.rgb, np.float32) - region) * alpha
    pixels[y0:y1, x0:x1] = np.rint(region).astype(np.uint8)


def render_scene(scene: Scene) -> Image.Image:
    """The picture of `scene` as an RGB image."""
    pixels = _canvas(scene)
    for shape in scene.shapes:
        _paint(pixels, shape, scene.antialias)
    return Image.fromarray(pixels)


def _check_size(width, height, side=SIDE, max_aspect=MAX_ASPECT) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or not side[0] <= value <= side[1]:
            raise ScenesError(f"{name} must be an integer in {side[0]}..{side[1]}, got {value!r}.")
    if max(width, height) > max_aspect * min(width, height):
        raise ScenesError(f"the aspect {width}x{height} is past {max_aspect:g}:1; give a squarer size.")


def sample_picture(rng: random.Random, width: int | None = None, height: int | None = None) -> tuple[Image.Image, Scene]:
    """Draw one random picture of the free world in memory: (RGB image, its Scene).

    For training on the fly (a vision tower's crops) without files. Width and height are both
    given (64..1024, aspect up to 4:1) or both left out and sampled as the generator does; the
    shapes' boxes are in `scene.shapes`. Pictures are never JPEG-compressed here.
    Raises ScenesError on a bad size or a generator that is not a `random.Random`.
    """
    if not isinstance(rng, random.Random):
        raise ScenesError(f"rng must be a random.Random, got {type(rng).__name__}.")
    if (width is None) != (height is None):
        raise ScenesError(f"give both width and height or neither, got width={width!r}, height={height!r}.")
    if width is not None:
        _check_size(width, height)
    scene = sample_scene(rng, width=width, height=height)
    return render_scene(scene), scene


def sample_clip(rng: random.Random, direction: str) -> tuple[Scene, list[tuple[int, int, int, int]]]:
    """A clip: its Scene (size, background, the shape as in frame 0) and the shape's box in each of FRAMES frames.

    Sides are 96..256 px and even (video codecs that subsample colour want even sides), aspect up
    to 2:1; the shape travels a quarter to half of the picture along `direction`.
    """
    # up to even: the cap 256 is even, and the aspect cannot pass 2:1 (short >= ceil(long / 2))
    width, height = (v + v % 2 for v in sample_size(rng, CLIP_SIDE, CLIP_ASPECT))
    background, rgb = _background(rng)
    gradient, grain, antialias, noise_seed = _look(rng)
    color, kind = rng.choice(sorted(COLORS)), rng.choice(KINDS)
    side = rng.randint(*_side_range(min(width, height)))
    along, across = (width, height) if direction in ("left", "right") else (height, width)
    travel = rng.randint(round(0.25 * along), round(0.5 * along))
    backwards = direction in ("left", "up")
    start = rng.randint(travel, along - side) if backwards else rng.randint(0, along - side - travel)
    fixed = rng.randint(0, across - side)
    boxes = []
    for t in range(FRAMES):
        a = start + (-1 if backwards else 1) * round(travel * t / (FRAMES - 1))
        x, y = (a, fixed) if direction in ("left", "right") else (fixed, a)
        boxes.append((x, y, x + side, y + side))
    shape = Shape(color, kind, boxes[0], _tint(rng, color))
    return Scene(width, height, background, (shape,), rgb, gradient, grain, antialias, noise_seed), boxes


def render_clip(scene: Scene, boxes: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
    """The clip's frames, (H, W, 3) uint8: the same background in each (a still camera), the shape at `boxes`."""
    canvas = _canvas(scene)
    frames = []
    for box in boxes:
        frame = canvas.copy()
        _paint(frame, Shape(scene.shapes[0].color, scene.shapes[0].kind, box, scene.shapes[0].rgb), scene.antialias)
        frames.append(frame)
    return frames


# ---- files ------------------------------------------------------------------------------------

def size_tags(width: int, height: int) -> list[str]:
    """size:small (short side < 128), size:large (long side >= 512) or size:medium; aspect:wide from 2:1."""
    short, long = sorted((width, height))
    tags = ["size:small" if short < 128 else "size:large" if long >= 512 else "size:medium"]
    return tags + (["aspect:wide"] if long >= 2 * short else [])


def _line(id_: str, qtype: str, tags, media_key: str, media, marker: str, turns, drawn: dict) -> dict:
    return {"id": id_, "type": qtype, "tags": sorted(set(tags)), media_key: media,
            "conversations": _conversation(marker, turns), **drawn}


def _pair_fields(scenes: list[Scene]) -> dict:
    return {key: [s.to_json()[key] for s in scenes] for key in ("width", "height", "background", "shapes")}


def _save_picture(scene: Scene, path: Path, quality: int | None) -> None:
    """Draw and save one picture: JPEG at `quality`, or PNG when None."""
    image = render_scene(scene)
    if quality is not None:
        image.save(path, format="JPEG", quality=quality)
    else:
        # level 1: grain barely compresses at any level, and higher levels cost several times the time
        image.save(path, format="PNG", compress_level=1)


def _save_clip(scene: Scene, boxes, path: Path) -> None:
    write_video(path, render_clip(scene, boxes))


class _Writer:
    """Saves media under `out`, counting what it saved per split.

    Everything random is drawn here, in order, before a picture is handed on; drawing and encoding
    (most of the time) are pure functions of the Scene, so `workers` processes may do them in any
    order and the files come out the same.
    """

    def __init__(self, out: Path, seed: int, workers: int):
        self.out, self.seed = out, seed
        self.counts = {"images": {"train": 0, "test": 0}, "videos": {"train": 0, "test": 0}}
        self.pool = ProcessPoolExecutor(workers) if workers > 1 else None
        self.window = 64 * workers  # jobs in flight at most: memory stays flat however many pictures
        self.pending: deque = deque()

    def rng(self, name: str) -> random.Random:
        # Seeded by a string (hashed with SHA-512: stable across runs and platforms), so an item's
        # content does not depend on how many items came before it.
        return random.Random(f"scenes/{self.seed}/{name}")

    def _run(self, job, *args) -> None:
        if self.pool is None:
            job(*args)
            return
        self.pending.append(self.pool.submit(job, *args))
        while len(self.pending) > self.window:
            self.pending.popleft().result()  # re-raises a worker's error here

    def close(self, failed: bool) -> None:
        """Wait for every job (or, when `failed`, drop those not started) and stop the workers."""
        if self.pool is not None:
            if not failed:
                while self.pending:
                    self.pending.popleft().result()
            self.pool.shutdown(cancel_futures=failed)

    def picture(self, name: str, scene: Scene, rng: random.Random, split: str) -> tuple[str, bool]:
        """Save the picture, as JPEG for JPEG_SHARE of them; (path relative to out, whether JPEG)."""
        quality = rng.randint(*JPEG_QUALITY) if rng.random() < JPEG_SHARE else None
        rel = f"images/{name}.{'png' if quality is None else 'jpg'}"
        self._run(_save_picture, scene, self.out / rel, quality)
        self.counts["images"][split] += 1
        return rel, quality is not None

    def clip(self, name: str, scene: Scene, boxes, split: str) -> str:
        rel = f"videos/{name}.mkv"
        self._run(_save_clip, scene, boxes, self.out / rel)
        self.counts["videos"][split] += 1
        return rel


def _picture_line(id_: str, image: str, jpeg: bool, scene: Scene, plan: list[Ask], questions: list[str],
                  held_out: bool) -> dict:
    tags = size_tags(scene.width, scene.height) + (["jpeg"] if jpeg else []) + (["paraphrase"] if held_out else [])
    tags += ["multi-turn"] if len(plan) > 1 else []
    turns = [(q, a.answer) for q, a in zip(questions, plan)]
    return _line(id_, plan[-1].qtype, tags, "image", image, "<image>\n", turns, scene.to_json())


def _compare_line(id_: str, images: list[str], jpegs: list[bool], scenes: list[Scene], rng, held_out: bool,
                  varied: bool = False) -> dict:
    more = "first" if len(scenes[0].shapes) > len(scenes[1].shapes) else "second"
    text = question(rng, Ask("compare", "compare", (), (), "", more), held_out, varied)
    tags = [t for s in scenes for t in size_tags(s.width, s.height)] + (["jpeg"] if any(jpegs) else [])
    tags += ["paraphrase"] if held_out else []
    return _line(id_, "compare", tags, "image", images, "<image>\n<image>\n",
                 [(text, compare_answer(more))], _pair_fields(scenes))


def _motion_line(id_: str, video: str, scene: Scene, boxes, direction: str, rng, held_out: bool,
                 varied: bool = False) -> dict:
    shape = scene.shapes[0]
    name = f"{shape.color} {shape.kind}"  # as the spec's example: the clip's one shape by colour and kind
    text = question(rng, Ask("motion", "motion", (), (("name", name),), "", direction), held_out, varied)
    tags = size_tags(scene.width, scene.height) + (["paraphrase"] if held_out else [])
    return _line(id_, "motion", tags, "video", video, "<video>\n", [(text, motion_answer(name, direction))],
                 {**scene.to_json(), "boxes": [list(b) for b in boxes]})


def _turns(rng: random.Random, one: float) -> int:
    """1 turn with probability `one`, else 2..4. Training asks for 1 a quarter of the time: a
    picture's tokens cost far more than a turn's, so a longer conversation teaches more per step
    (each of its answers is trained on); tests, half the time."""
    return 1 if rng.random() < one else rng.randint(2, 4)


def _write_train(w: _Writer, n: int, n_compare: int, n_videos: int, per_image: int, stats: dict) -> dict:
    """captions.jsonl and train.jsonl with their media; counts into `stats`."""
    master = w.rng("train")
    counts = [1 + i % MAX_SHAPES for i in range(n)]  # shape counts exactly balanced, order shuffled
    master.shuffle(counts)
    scenes, images, jpegs = [], [], []
    lines = 0
    with open(w.out / "captions.jsonl", "w") as caps, open(w.out / "train.jsonl", "w") as train:
        for i in range(n):
            name = f"train-{i:06d}"
            rng = w.rng(name)
            scene = sample_scene(rng, counts[i])
            image, jpeg = w.picture(name, scene, rng, "train")
            scenes.append(scene)
            images.append(image)
            jpegs.append(jpeg)
            asks = asks_for(scene)
            first = asks[0]
            caption = question(rng, first, False, varied=True)
            _dump(caps, _picture_line(name, image, jpeg, scene, [first], [caption], False))
            # each line opens with a different type, so one picture's lines are not the same question
            openers = sorted({a.qtype for a in asks}, key=PICTURE_TYPES.index)
            for k in range(min(per_image, len(openers))):
                opener = rng.choices(openers, weights=[TRAIN_WEIGHTS[t] for t in openers])[0]
                openers.remove(opener)
                plan = plan_turns(rng, scene, asks, _turns(rng, 0.25), first=opener)
                questions = [question(rng, a, False, varied=True) for a in plan]
                _dump(train, _picture_line(f"{name}-{k}", image, jpeg, scene, plan, questions, False))
                stats["questions"][plan[-1].qtype] += 1
                stats["turns"][str(len(plan))] += 1
                lines += 1
            helper = helper_line(rng, scene) if rng.random() < HELPER_SHARE else None
            if helper is not None:  # training only: see scene_questions.HELPER_WORDINGS
                kind, text, answer = helper
                tags = size_tags(scene.width, scene.height) + (["jpeg"] if jpeg else [])
                _dump(train, _line(f"{name}-helper", f"helper-{kind}", tags, "image", image, "<image>\n",
                                   [(text, answer)], scene.to_json()))
                stats["questions"][f"helper-{kind}"] += 1
                stats["turns"]["1"] += 1
                lines += 1

        by_count: dict[int, list[int]] = {}
        for i, c in enumerate(counts):
            by_count.setdefault(c, []).append(i)
        for k in range(n_compare):
            name = f"train-compare-{k:06d}"
            rng = w.rng(name)
            i = rng.randrange(n)
            others = [c for c in sorted(by_count) if c != counts[i]]
            other = rng.choices(others, weights=[len(by_count[c]) for c in others])[0]
            j = rng.choice(by_count[other])
            if (counts[i] > counts[j]) != (k % 2 == 0):  # alternate: "first" and "second" balanced
                i, j = j, i
            _dump(train, _compare_line(name, [images[i], images[j]], [jpegs[i], jpegs[j]], [scenes[i], scenes[j]],
                                       rng, False, varied=True))
        directions = [DIRECTIONS[k % 4] for k in range(n_videos)]
        master.shuffle(directions)
        for k, direction in enumerate(directions):
            name = f"train-motion-{k:06d}"
            rng = w.rng(name)
            scene, boxes = sample_clip(rng, direction)
            video = w.clip(name, scene, boxes, "train")
            _dump(train, _motion_line(name, video, scene, boxes, direction, rng, False, varied=True))
    stats["questions"]["compare"] += n_compare
    stats["questions"]["motion"] += n_videos
    stats["turns"]["1"] += n_compare + n_videos
    return {"captions.jsonl": n, "train.jsonl": lines + n_compare + n_videos}


def _test_picture(w: _Writer, name: str, qtype: str, j: int, rng: random.Random, balance: Balance,
                  held_out: bool) -> dict:
    """One test conversation whose last question is of `qtype` (the j-th of that type)."""
    for _ in range(100):  # pictures without such a question (all kinds repeat, no clear place) miss
        n_shapes = 1 + j % MAX_SHAPES if qtype == "count" else rng.randint(2 if qtype == "position" else 1, MAX_SHAPES)
        scene = sample_scene(rng, n_shapes)
        asks = asks_for(scene)
        finals = [a for a in asks if a.qtype == qtype]
        if finals:
            break
    else:  # pragma: no cover
        raise ScenesError(f"no picture answers a {qtype!r} question after 100 tries.")
    value = balance.pick(rng, [a.value for a in finals])
    last = rng.choice([a for a in finals if a.value == value])
    plan = plan_turns(rng, scene, asks, _turns(rng, 0.5) - 1, last=last)
    questions = [question(rng, a, False) for a in plan[:-1]] + [question(rng, last, held_out)]
    image, jpeg = w.picture(name, scene, rng, "test")
    return _picture_line(name, image, jpeg, scene, plan, questions, held_out)


def _write_test(w: _Writer, n_test: int, stats: dict) -> int:
    """test.jsonl with its own media; the last questions' types in turn, their answers balanced."""
    balance = {t: Balance() for t in QUESTION_TYPES}
    with open(w.out / "test.jsonl", "w") as test:
        for k in range(n_test):
            qtype = QUESTION_TYPES[k % len(QUESTION_TYPES)]
            j = k // len(QUESTION_TYPES)  # how many lines of this type came before
            name = f"test-{k:06d}"
            rng = w.rng(name)
            held_out = rng.random() < 1 / 3
            if qtype == "motion":
                direction = DIRECTIONS[j % 4]
                scene, boxes = sample_clip(rng, direction)
                line = _motion_line(name, w.clip(name, scene, boxes, "test"), scene, boxes, direction, rng, held_out)
            elif qtype == "compare":
                fewer, more = sorted(rng.sample(range(1, MAX_SHAPES + 1), 2))
                scenes = [sample_scene(rng, c) for c in ((more, fewer) if j % 2 == 0 else (fewer, more))]
                saved = [w.picture(f"{name}-{m}", s, rng, "test") for m, s in zip((1, 2), scenes)]
                line = _compare_line(name, [p for p, _ in saved], [jp for _, jp in saved], scenes, rng, held_out)
            else:
                line = _test_picture(w, name, qtype, j, rng, balance[qtype], held_out)
            _dump(test, line)
            stats["questions"][qtype] += 1
            stats["turns"][str(len(line["conversations"]) // 2)] += 1
            stats["tags"].update(line["tags"])
    return n_test


def _check(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ScenesError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


def make_scenes(out: Path, n: int, seed: int = 0, n_test: int | None = None, n_videos: int | None = None,
                n_compare: int | None = None, per_image: int = 2, workers: int = 1) -> dict:
    """Write the free shapes world under `out` and return what was written, as counts.

    `n` train pictures give `n` "describe" lines (captions.jsonl) and up to `per_image`
    conversations each, opening with different types (train.jsonl), which also holds `n_compare`
    picture pairs drawn from the train pictures (default n // 4) and `n_videos` clips (default
    n // 4). test.jsonl holds `n_test` conversations (default max(700, n // 10): 100 per type) on
    pictures and clips of its own. Files of the same names are overwritten; nothing else under
    `out` is touched. `workers` > 1 draws and encodes the media in that many processes; the files
    are the same either way. Raises ScenesError on bad arguments (and when PyAV, needed for the
    clips, is missing).
    """
    _check("n", n, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ScenesError(f"seed must be an integer, got {seed!r}.")
    n_test = _check("n_test", max(100 * len(QUESTION_TYPES), n // 10) if n_test is None else n_test, 0)
    n_videos = _check("n_videos", n // 4 if n_videos is None else n_videos, 0)
    n_compare = _check("n_compare", n // 4 if n_compare is None else n_compare, 0)
    _check("per_image", per_image, 1)
    _check("workers", workers, 1)
    if n_compare and n < 2:
        raise ScenesError(f"compare pairs need at least 2 train pictures, got n={n}; pass n_compare=0.")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    writer = _Writer(out, seed, workers)
    train = {"questions": Counter({t: 0 for t in QUESTION_TYPES}), "turns": Counter()}
    test = {"questions": Counter({t: 0 for t in QUESTION_TYPES}), "turns": Counter(), "tags": Counter()}
    failed = True
    try:
        lines = _write_train(writer, n, n_compare, n_videos, per_image, train)
        lines["test.jsonl"] = _write_test(writer, n_test, test)
        failed = False
    finally:
        writer.close(failed)
    return {"out": str(out), "world": "free", "lines": lines, **writer.counts,
            "train_questions": dict(train["questions"]), "test_questions": dict(test["questions"]),
            "train_turns": dict(sorted(train["turns"].items())), "test_turns": dict(sorted(test["turns"].items())),
            "test_tags": dict(sorted(test["tags"].items()))}
