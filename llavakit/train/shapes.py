"""The shapes world: synthetic pictures, clips and questions to train and evaluate tiny models on.

A picture is a plain background (white, black, gray or beige, with mild grain) split into a 3x3
grid; 1 to 4 of its cells hold a flat shape (circle, square, triangle) in one of 6 colours, of
its own size and a few pixels off the cell's centre. Within one picture no two shapes share a
(colour, kind) pair; questions about one shape name it by its kind, and only where the picture
holds one shape of that kind. Any two shapes are apart by whole cells, so "left of" and "above"
never hang on a pixel. A clip is 8 frames of one shape moving left, right, up or down. Every
answer follows from the drawing, so it is right by construction, and every line carries the
drawing's metadata to check it against.

    out/
    ├── images/train-000000.png ...  images/test-000000.png ...   (never shared between splits)
    ├── videos/train-motion-000000.mkv ...  videos/test-000006.mkv ...   (FFV1: lossless)
    ├── captions.jsonl   stage 1: one caption per train image
    ├── train.jsonl      stage 2: single questions about train pictures, picture pairs and clips
    └── test.jsonl       one single-turn question per line, the 9 types in turn

Lines use the original LLaVA conversation format; media paths are relative to the JSONL file.
After "id", "type", "image" (a list for two pictures) or "video", and "conversations", each line
carries what was drawn: "background" and "shapes" ({"color", "kind", "bbox": [x0, y0, x1, y1]},
x1/y1 exclusive, in reading order), and per-frame "boxes" on clips.
Every line holds one question: in a multi-turn conversation a later question can copy a name from
an earlier one ("What colour is the circle?" tells the kind), so the training loss falls while the
model learns less about the picture.
Everything is drawn from `random.Random` / numpy generators seeded from `seed`, so the same
arguments give byte-identical files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import LlavakitError
from .scoring import normalize_answer  # noqa: F401  (re-exported: the evaluator's comparison)

QUESTION_TYPES = ("shapes", "color", "count", "position", "caption", "where", "colors", "compare", "motion")
IMAGE_TYPES = QUESTION_TYPES[:7]  # the types one picture can answer
# How often training asks each picture question. Finding a shape by its name is what a small decoder
# trained from scratch learns slowest; "where" and "colors" teach it directly (see _ask).
TRAIN_WEIGHTS = {"shapes": 1, "color": 2, "count": 1, "position": 6, "caption": 1, "where": 4, "colors": 2}

# Saturated shape colours, far from each other and from every background (also after the grain).
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
# Not pure white/black, so the grain is symmetric instead of clipped at 0 or 255.
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (235, 220, 190),
}
KINDS = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
POSITIONS = ("left", "right", "above", "below")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")
NOISE = 6  # background grain: each pixel's brightness moves by at most this many levels
FRAMES = 8  # frames per clip
FPS = 8
MAX_SHAPES = 4
GRID = 3  # a picture is GRID x GRID cells; a shape sits inside one cell

# Canonical phrasings come first; only training questions use the others.
QUESTIONS = {
    "shapes": ("What shapes are in the picture?", "Which shapes do you see?", "List the shapes in the picture."),
    "color": ("What colour is the {kind}?", "What color is the {kind}?", "Which colour does the {kind} have?"),
    "count": ("How many shapes are there?", "How many shapes are in the picture?", "Count the shapes."),
    "position_x": ("Is the {a} to the left or to the right of the {b}?", "Is the {a} left or right of the {b}?"),
    "position_y": ("Is the {a} above or below the {b}?", "Is the {a} above the {b} or below it?"),
    "where": ("Where is {names}?", "Where is {names} in the picture?"),
    "where_many": ("Where are {names}?", "Where are {names} in the picture?"),
    "colors": ("What colours are {names}?", "What colors are {names}?", "Which colours do {names} have?"),
    "caption": ("Describe the picture in one sentence.", "Give a one-sentence description of the picture.",
                "What does the picture show? Answer in one sentence."),
    "compare": ("Which image has more shapes, the first or the second?",
                "Which of the two images shows more shapes, the first or the second?"),
    "motion": ("Which way does the {name} move?", "In which direction does the {name} move?"),
}


class ShapesError(LlavakitError):
    """The shapes world was asked for with impossible arguments."""


@dataclass(frozen=True)
class Shape:
    """One flat shape; `box` is (x0, y0, x1, y1) in pixels, x1 and y1 exclusive."""

    color: str
    kind: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    def to_json(self) -> dict:
        return {"color": self.color, "kind": self.kind, "bbox": list(self.box)}


@dataclass(frozen=True)
class Scene:
    """A picture's content: shapes in reading order (by grid cell: top row first, each row left to right)."""

    background: str
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Geometry:
    """Sizes in pixels for a square canvas of side `size`, split into GRID x GRID cells."""

    size: int

    def px(self, at96: float) -> int:
        return max(1, round(at96 * self.size / 96))

    @property
    def cell(self) -> int:  # side of one grid cell
        return self.size // GRID

    @property
    def side(self) -> tuple[int, int]:  # shape bounding-box side, inclusive range
        return self.px(18), self.cell - 2 * self.margin

    @property
    def margin(self) -> int:  # empty pixels at least between a shape and its cell's border
        return self.px(2)

    @property
    def jitter(self) -> int:  # how far a shape's centre may stray from its cell's centre
        return self.px(3)

    @property
    def travel(self) -> tuple[int, int]:  # how far a clip's shape moves in total
        return self.px(44), self.px(62)

    def cell_of(self, shape: "Shape") -> tuple[int, int]:
        """(row, column) of the cell holding `shape`."""
        cx, cy = shape.center
        return int(cy // self.cell), int(cx // self.cell)


class _Balance:
    """Picks, among the answers available now, the one given least often so far."""

    def __init__(self, options):
        self.counts = {o: 0 for o in options}

    def pick(self, rng: random.Random, available) -> str:
        low = min(self.counts[a] for a in available)
        choice = rng.choice(sorted(a for a in available if self.counts[a] == low))
        self.counts[choice] += 1
        return choice


# ---- drawing ----------------------------------------------------------------------------------

def sample_scene(rng: random.Random, n_shapes: int, geo: Geometry) -> Scene:
    """A random picture with `n_shapes` shapes in distinct grid cells, each (colour, kind) at most once.

    Each shape gets its own size and offset inside its cell, so shapes never touch and every
    shape has an unambiguous row and column.
    """
    if not 1 <= n_shapes <= GRID * GRID:
        raise ShapesError(f"a picture holds 1 to {GRID * GRID} shapes, got {n_shapes}.")
    background = rng.choice(sorted(BACKGROUNDS))
    pairs = [(c, k) for c in COLORS for k in KINDS]
    lo, hi = geo.side
    shapes = []
    for (color, kind), cell in zip(rng.sample(pairs, n_shapes), rng.sample(range(GRID * GRID), n_shapes)):
        row, col = divmod(cell, GRID)
        s = rng.randint(lo, hi)
        # off the cell's centre by at most the jitter, and never into the margin
        shift = min((geo.cell - s) // 2 - geo.margin, geo.jitter)
        x0 = col * geo.cell + (geo.cell - s) // 2 + rng.randint(-shift, shift)
        y0 = row * geo.cell + (geo.cell - s) // 2 + rng.randint(-shift, shift)
        shapes.append(Shape(color, kind, (x0, y0, x0 + s, y0 + s)))
    shapes.sort(key=geo.cell_of)
    return Scene(background, tuple(shapes))


def _canvas(background: str, size: int, noise_seed: int) -> np.ndarray:
    """(size, size, 3) uint8: the background colour with brightness grain of +-NOISE levels."""
    grain = np.random.default_rng(noise_seed).integers(-NOISE, NOISE + 1, size=(size, size, 1), dtype=np.int16)
    # The same offset on all three channels: grain, not colour noise, and PNG stores it in half the bytes.
    return np.clip(np.array(BACKGROUNDS[background], np.int16) + grain, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x0, y0, x1, y1 = shape.box
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:  # upright: base at the bottom, apex at the top centre
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)


def render_scene(scene: Scene, size: int, noise_seed: int) -> Image.Image:
    """The picture of `scene` as an RGB image, shapes drawn flat (no anti-aliasing) over the grain."""
    image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(_canvas(scene.background, size, noise_seed),
                                                                 (size, size, 3))))
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw(draw, shape)
    return image


def write_video(path: Path, frames: list[np.ndarray], fps: int = FPS) -> None:
    """Write (H, W, 3) uint8 RGB frames losslessly (FFV1 in Matroska) so colours decode exactly."""
    try:
        import av  # an optional extra: only videos need it
    except ImportError as e:
        raise ShapesError(f"writing the shapes videos needs PyAV: pip install 'llavakit[video]' ({e}).") from e
    height, width = frames[0].shape[:2]
    # bitexact: no encoder version or date in the file, so the same frames give the same bytes.
    with av.open(str(path), "w", format="matroska", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def sample_motion(rng: random.Random, direction: str, geo: Geometry) -> tuple[str, list[Shape]]:
    """A clip's background and its shape in each of FRAMES frames, moving straight in `direction`."""
    background = rng.choice(sorted(BACKGROUNDS))
    color, kind = rng.choice(sorted(COLORS)), rng.choice(KINDS)
    s, travel = rng.randint(*geo.side), rng.randint(*geo.travel)
    free = geo.size - 1 - s  # largest top-left coordinate that keeps the shape inside
    sign = -1 if direction in ("left", "up") else 1
    start = rng.randint(1 + travel, free) if sign < 0 else rng.randint(1, free - travel)
    across = rng.randint(1, free)
    track = []
    for t in range(FRAMES):
        along = start + sign * round(travel * t / (FRAMES - 1))
        x, y = (along, across) if direction in ("left", "right") else (across, along)
        track.append(Shape(color, kind, (x, y, x + s, y + s)))
    return background, track


def render_motion(path: Path, background: str, track: list[Shape], size: int, noise_seed: int) -> None:
    """Draw the clip (the same grain in every frame, as a still camera would see) and write it."""
    canvas = np.ascontiguousarray(np.broadcast_to(_canvas(background, size, noise_seed), (size, size, 3)))
    frames = []
    for shape in track:
        image = Image.fromarray(canvas)
        _draw(ImageDraw.Draw(image), shape)
        frames.append(np.asarray(image))
    write_video(path, frames)


# ---- language ---------------------------------------------------------------------------------

def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _join(items: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(shapes) -> str:
    """'a red circle, a blue square and an orange triangle': the shapes in the order given."""
    return _join([_a(s.name) for s in shapes])


def caption(scene: Scene) -> str:
    """'A red circle and a blue square on a white background.'"""
    text = f"{describe(scene.shapes)} on {_a(scene.background)} background."
    return text[0].upper() + text[1:]


def _phrase(rng: random.Random, key: str, train: bool) -> str:
    """Training questions use the canonical phrasing half the time and a variant otherwise."""
    options = QUESTIONS[key]
    if not train or len(options) == 1 or rng.random() < 0.5:
        return options[0]
    return rng.choice(options[1:])


def place(shape: Shape, geo: Geometry) -> str:
    """The grid cell holding `shape` in words: "top left", "middle right", ..., or "centre"."""
    row, col = geo.cell_of(shape)
    return "centre" if (row, col) == (GRID // 2, GRID // 2) else f"{ROWS[row]} {COLUMNS[col]}"


def _the(kinds) -> str:
    """'the circle', 'the circle and the square', 'the circle, the square and the triangle'."""
    return _join([f"the {k}" for k in kinds])


def _named(scene: Scene) -> list[Shape]:
    """The shapes a question can name by kind alone: those whose kind the picture holds once."""
    kinds = [s.kind for s in scene.shapes]
    return [s for s in scene.shapes if kinds.count(s.kind) == 1]


def _positions(scene: Scene, geo: Geometry) -> dict[str, list[tuple[Shape, Shape]]]:
    """Ordered pairs (a, b) of shapes named by kind, by the answer to "where is a relative to b":
    left/right when their columns differ, above/below when their rows differ (a pair can answer both)."""
    by_answer: dict[str, list] = {}
    named = _named(scene)
    for a in named:
        for b in named:
            if a is b:
                continue
            (ra, ca), (rb, cb) = geo.cell_of(a), geo.cell_of(b)
            if ca != cb:
                by_answer.setdefault("left" if ca < cb else "right", []).append((a, b))
            if ra != rb:
                by_answer.setdefault("above" if ra < rb else "below", []).append((a, b))
    return by_answer


def applicable(scene: Scene, qtype: str, geo: Geometry) -> bool:
    """Whether a single-picture question of `qtype` has a well-defined answer for `scene`."""
    if qtype in ("color", "where"):
        return bool(_named(scene))
    if qtype in ("position", "colors"):
        return len(_named(scene)) >= 2  # two shapes in distinct cells always differ in row or column
    return qtype in ("shapes", "count", "caption")


def _ask(scene: Scene, qtype: str, rng: random.Random, geo: Geometry, balance: _Balance, train: bool):
    """(question, answer) of `qtype` about one picture; position answers are balanced via `balance`.

    Questions name shapes by kind ("the circle"), which names one shape when the picture holds one
    circle. Finding the named shape is the step a small decoder trained from scratch learns slowest:
    asked "What colour is the circle?" it must carry "circle" from the question to the answer and
    then find the circle in the picture, two steps it only learns together, and slowly. Where an
    answer puts the looked-up value right after the name ("the circle red"), the model learns the
    lookup at the name's own token (the same token as in the question), and the plain questions
    then reuse it at the question's name. Only the first word after the name is read this way:
    in "the circle top left" the column came out wrong far more often than the row (stage 2 at
    lr 1e-3; at the shipped 5e-4 "where" reaches 98%, see docs/shapes-world.md). Hence the
    "where" and "colors" questions, and position answers that first give the one word that
    matters for each shape, its column or its row ("the circle left; the square middle; so left").
    """
    if qtype == "shapes":
        return _phrase(rng, "shapes", train), describe(scene.shapes)
    if qtype == "count":
        return _phrase(rng, "count", train), str(len(scene.shapes))
    if qtype == "caption":
        return _phrase(rng, "caption", train), caption(scene)
    if qtype == "color":
        shape = rng.choice(_named(scene))
        return _phrase(rng, "color", train).format(kind=shape.kind), shape.color
    if qtype == "position":
        by_answer = _positions(scene, geo)
        answer = balance.pick(rng, by_answer)
        a, b = rng.choice(by_answer[answer])
        across = answer in ("left", "right")
        key = "position_x" if across else "position_y"
        # One word each, the column or the row the question is about, read right after the name.
        side = COLUMNS if across else ROWS
        (ra, ca), (rb, cb) = geo.cell_of(a), geo.cell_of(b)
        wa, wb = (side[ca], side[cb]) if across else (side[ra], side[rb])
        return (_phrase(rng, key, train).format(a=a.kind, b=b.kind), f"the {a.kind} {wa}; the {b.kind} {wb}; so {answer}")
    if qtype == "where":
        named = _named(scene)
        shapes = rng.sample(named, rng.randint(1, len(named)))  # in random order: no reading-order shortcut
        key = "where" if len(shapes) == 1 else "where_many"
        return (_phrase(rng, key, train).format(names=_the(s.kind for s in shapes)),
                "; ".join(f"the {s.kind} {place(s, geo)}" for s in shapes))
    if qtype == "colors":
        named = _named(scene)
        shapes = rng.sample(named, rng.randint(2, len(named)))  # two at least: one is the "color" question
        return (_phrase(rng, "colors", train).format(names=_the(s.kind for s in shapes)),
                "; ".join(f"the {s.kind} {s.color}" for s in shapes))
    raise ShapesError(f"no single-picture question of type {qtype!r}; expected one of {IMAGE_TYPES}.")


# ---- files ------------------------------------------------------------------------------------

def _conversation(marker: str, turns: list[tuple[str, str]]) -> list[dict]:
    """LLaVA's conversation list; the media markers open the first human turn only."""
    out = []
    for i, (question, answer) in enumerate(turns):
        out.append({"from": "human", "value": (marker if i == 0 else "") + question})
        out.append({"from": "gpt", "value": answer})
    return out


def _image_line(id_: str, qtype: str, image: str, scene: Scene, turns) -> dict:
    line = {"id": id_, "type": qtype, "image": image, "conversations": _conversation("<image>\n", turns)}
    line["background"] = scene.background
    line["shapes"] = [s.to_json() for s in scene.shapes]
    return line


def _compare_line(id_: str, images: list[str], scenes: list[Scene], rng, train: bool) -> dict:
    more = "the first" if len(scenes[0].shapes) > len(scenes[1].shapes) else "the second"
    turns = [(_phrase(rng, "compare", train), more)]
    return {"id": id_, "type": "compare", "image": images, "conversations": _conversation("<image>\n<image>\n", turns),
            "background": [s.background for s in scenes], "shapes": [[x.to_json() for x in s.shapes] for s in scenes]}


def _motion_line(id_: str, video: str, background: str, track: list[Shape], direction: str, rng, train) -> dict:
    turns = [(_phrase(rng, "motion", train).format(name=track[0].name), direction)]
    return {"id": id_, "type": "motion", "video": video, "conversations": _conversation("<video>\n", turns),
            "background": background, "shapes": [track[0].to_json()], "boxes": [list(s.box) for s in track]}


class _Writer:
    """Draws and saves media under `out`, counting what it saved per split."""

    def __init__(self, out: Path, size: int, seed: int):
        self.out, self.size, self.seed = out, size, seed
        self.counts = {"images": {"train": 0, "test": 0}, "videos": {"train": 0, "test": 0}}

    def rng(self, name: str) -> random.Random:
        # One generator per item, seeded by a string (hashed with SHA-512, stable across runs and
        # platforms), so an item's content does not depend on how many items came before it.
        return random.Random(f"shapes/{self.seed}/{name}")

    def image(self, name: str, scene: Scene, rng: random.Random, split: str) -> str:
        rel = f"images/{name}.png"
        render_scene(scene, self.size, rng.getrandbits(64)).save(self.out / rel, format="PNG", compress_level=1)
        self.counts["images"][split] += 1
        return rel

    def video(self, name: str, background: str, track: list[Shape], rng: random.Random, split: str) -> str:
        rel = f"videos/{name}.mkv"
        render_motion(self.out / rel, background, track, self.size, rng.getrandbits(64))
        self.counts["videos"][split] += 1
        return rel


def _dump(handle, line: dict) -> None:
    handle.write(json.dumps(line, ensure_ascii=False) + "\n")


def _check(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ShapesError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


def _pick_types(rng: random.Random, options: list[str], k: int) -> list[str]:
    """Up to `k` distinct types from `options`, drawn by TRAIN_WEIGHTS."""
    options, picked = list(options), []
    while options and len(picked) < k:
        t = rng.choices(options, weights=[TRAIN_WEIGHTS[o] for o in options])[0]
        picked.append(t)
        options.remove(t)
    return picked


def _write_train(w: _Writer, geo: Geometry, n: int, n_compare: int, n_videos: int, per_image: int,
                 type_counts: dict) -> dict:
    """captions.jsonl and train.jsonl with their media; counts the questions asked into `type_counts` (all zero)."""
    master = w.rng("train")
    counts = [1 + i % MAX_SHAPES for i in range(n)]  # shape counts exactly balanced, order shuffled
    master.shuffle(counts)
    balance = _Balance(POSITIONS)
    scenes, images = [], []
    with open(w.out / "captions.jsonl", "w") as caps, open(w.out / "train.jsonl", "w") as train:
        for i in range(n):
            name = f"train-{i:06d}"
            rng = w.rng(name)
            scene = sample_scene(rng, counts[i], geo)
            image = w.image(name, scene, rng, "train")
            scenes.append(scene)
            images.append(image)
            _dump(caps, _image_line(name, "caption", image, scene, [(_phrase(rng, "caption", True), caption(scene))]))
            options = [t for t in IMAGE_TYPES if applicable(scene, t, geo)]
            for t in _pick_types(rng, options, per_image):
                turn = _ask(scene, t, rng, geo, balance, train=True)
                _dump(train, _image_line(f"{name}-{t}", t, image, scene, [turn]))
                type_counts[t] += 1

        by_count: dict[int, list[int]] = {}
        for i, c in enumerate(counts):
            by_count.setdefault(c, []).append(i)
        for k in range(n_compare):
            name = f"train-compare-{k:06d}"
            rng = w.rng(name)
            i = rng.randrange(n)
            others = [c for c in sorted(by_count) if c != counts[i]]
            other = rng.choices(others, weights=[len(by_count[c]) for c in others])[0]
            j = rng.choice(by_count[other])  # uniform over the pictures whose count differs
            # Alternate which image has more shapes, so "the first" and "the second" are balanced.
            if (counts[i] > counts[j]) != (k % 2 == 0):
                i, j = j, i
            _dump(train, _compare_line(name, [images[i], images[j]], [scenes[i], scenes[j]], rng, True))
        type_counts["compare"] += n_compare

        directions = [DIRECTIONS[k % 4] for k in range(n_videos)]
        master.shuffle(directions)
        for k, direction in enumerate(directions):
            name = f"train-motion-{k:06d}"
            rng = w.rng(name)
            background, track = sample_motion(rng, direction, geo)
            video = w.video(name, background, track, rng, "train")
            _dump(train, _motion_line(name, video, background, track, direction, rng, True))
        type_counts["motion"] += n_videos
    return {"captions.jsonl": n, "train.jsonl": sum(type_counts.values())}


def _write_test(w: _Writer, geo: Geometry, n_test: int, type_counts: dict) -> int:
    """test.jsonl with its own media, one question per line; adds the questions asked to `type_counts`."""
    balance = _Balance(POSITIONS)
    with open(w.out / "test.jsonl", "w") as test:
        for k in range(n_test):
            qtype = QUESTION_TYPES[k % len(QUESTION_TYPES)]  # round-robin: every type equally often
            turn = k // len(QUESTION_TYPES)  # how many questions of this type came before
            name = f"test-{k:06d}"
            rng = w.rng(name)
            if qtype == "motion":
                direction = DIRECTIONS[turn % 4]
                background, track = sample_motion(rng, direction, geo)
                video = w.video(name, background, track, rng, "test")
                line = _motion_line(name, video, background, track, direction, rng, False)
            elif qtype == "compare":
                fewer, more = sorted(rng.sample(range(1, MAX_SHAPES + 1), 2))
                order = (more, fewer) if turn % 2 == 0 else (fewer, more)
                scenes = [sample_scene(rng, c, geo) for c in order]
                images = [w.image(f"{name}-{m}", s, rng, "test") for m, s in zip((1, 2), scenes)]
                line = _compare_line(name, images, scenes, rng, False)
            else:
                lowest = 2 if qtype in ("position", "colors") else 1
                for _ in range(100):  # pictures whose kinds repeat miss; a few retries at most
                    n_shapes = 1 + turn % MAX_SHAPES if qtype == "count" else rng.randint(lowest, MAX_SHAPES)
                    scene = sample_scene(rng, n_shapes, geo)
                    if applicable(scene, qtype, geo):
                        break
                else:
                    raise ShapesError(f"no picture answers a {qtype!r} question after 100 tries.")
                image = w.image(name, scene, rng, "test")
                line = _image_line(name, qtype, image, scene, [_ask(scene, qtype, rng, geo, balance, train=False)])
            _dump(test, line)
            type_counts[qtype] += 1
    return n_test


def make_shapes(out: Path, n: int, seed: int = 0, n_test: int | None = None, n_videos: int | None = None,
                n_compare: int | None = None, size: int = 96, per_image: int = 2) -> dict:
    """Write the shapes world under `out` and return what was written, as counts.

    `n` train pictures give `n` caption lines (captions.jsonl) and `per_image` single-question
    lines each, of distinct types (train.jsonl; fewer when fewer types apply), which also holds
    `n_compare` picture pairs (default n // 4) and `n_videos` clips (default n // 4). test.jsonl
    holds `n_test` single-question lines (default max(900, n // 10): 100 per type) on pictures and clips of its
    own. Existing files of the same names are overwritten; nothing else under `out` is touched.
    Raises ShapesError on bad arguments.
    """
    _check("n", n, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ShapesError(f"seed must be an integer, got {seed!r}.")
    n_test = _check("n_test", max(100 * len(QUESTION_TYPES), n // 10) if n_test is None else n_test, 0)
    n_videos = _check("n_videos", n // 4 if n_videos is None else n_videos, 0)
    n_compare = _check("n_compare", n // 4 if n_compare is None else n_compare, 0)
    _check("per_image", per_image, 1)
    _check("size", size, 48)  # below that a grid cell is under 16 px: shapes of a few pixels, kinds unreadable
    if n_compare and n < 2:
        raise ShapesError(f"compare pairs need at least 2 train pictures, got n={n}; pass n_compare=0.")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    geo, writer = Geometry(size), _Writer(out, size, seed)
    train_types = {t: 0 for t in QUESTION_TYPES}
    test_types = {t: 0 for t in QUESTION_TYPES}
    lines = _write_train(writer, geo, n, n_compare, n_videos, per_image, train_types)
    lines["test.jsonl"] = _write_test(writer, geo, n_test, test_types)
    return {"out": str(out), "lines": lines, **writer.counts,
            "train_questions": train_types, "test_questions": test_types}
