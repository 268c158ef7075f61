"""An independent test set for the free shapes world: its own drawing, wordings and answer sentences.

The generator (llavakit/train/scenes.py) and this module both follow the world spec (sizes, colours,
kinds, thresholds: docs/shapes-world.md) but share no code: a model that only learned the generator's
drawing quirks or its sentences scores lower here than on the generator's own held-out split. So
this module imports nothing from llavakit's shapes code, draws with numpy signed-distance fields
(supersampled for antialiased edges) instead of PIL's ImageDraw, and asks and answers in its own
words, which llavakit.train.scoring.answer_key still reads.

    out/
    ├── independent.jsonl             one line per question set, types in turn (balanced)
    ├── images/ind-00000.png|.jpg     (compare lines: ind-00005-a.png, ind-00005-b.png)
    └── videos/ind-00006.mkv          8 frames, FFV1 in Matroska (lossless)

Lines use the LLaVA conversation format with the spec's fields ("id", "type", "tags", "image" or
"video", "conversations", "width", "height", "background", "shapes", per-frame "boxes" on clips),
and "turn_types", "edges", "wording" (near or far) and "jpeg_quality" of their own. "paraphrase" tags a last
question worded far from the spec's vocabulary ("objects", "image", "region"); every wording here is
unseen in training, but the near ones keep the spec's nouns ("shape", "picture").

Not a test module (its name does not start with test_); tests/test_shapes_independent.py checks it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TYPES = ("describe", "count", "colour", "position", "where", "compare", "motion")
PALETTE = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 210, 20),
           "purple": (140, 40, 180), "orange": (250, 130, 0)}
KINDS = ("circle", "square", "triangle")
JITTER = 15  # per channel, one offset per shape
JPEG_SHARE = 0.25
MULTI_TURN_SHARE = 0.4  # of the lines whose type can follow other questions
FRAMES = 8
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
REGION_NAMES = (("top left", "top", "top right"), ("left", "centre", "right"),
                ("bottom left", "bottom", "bottom right"))

# -- wordings: (near, far); {n} a shape's name, {a} {b} two names ------------------------------------
QUESTIONS = {
    "describe": (("What do you see in this picture? Name each shape and its colour.",
                  "Please go through the shapes in this picture one by one.",
                  "Give a short account of every shape in this picture."),
                 ("Tell me what you see in this image.",
                  "What objects does this image contain, and what colour is each?",
                  "Make an inventory of everything drawn in this image.")),
    "count": (("Could you count the shapes in this picture for me?",
               "What is the number of shapes in this picture?",
               "Count every shape you can find in this picture."),
              ("How many objects does the image contain?",
               "How many things are drawn in this image?",
               "What is the total number of objects in the image?")),
    "colour": (("Tell me the colour of the {n} in this picture.",
                "Which colour has the {n} in this picture been painted?",
                "In this picture, the {n} has which colour?"),
               ("Name the hue of the {n} in the image.",
                "The {n} in this image: what is its color?",
                "Which paint color was used for the {n} in the image?")),
    "position-x": (("In this picture, which side of the {b} is the {a} on, left or right?",
                    "Compared with the {b}, is the {a} further left or further right in this picture?"),
                   ("Looking at the image, does the {a} sit to the left or to the right of the {b}?",
                    "Horizontally, how is the {a} placed relative to the {b} in the image?")),
    "position-y": (("In this picture, is the {a} higher or lower than the {b}?",
                    "Compared with the {b}, is the {a} higher up or lower down in this picture?"),
                   ("Looking at the image, does the {a} sit above or below the {b}?",
                    "Vertically, how is the {a} placed relative to the {b} in the image?")),
    "where": (("Whereabouts in this picture would I find the {n}?",
               "Where in the picture can the {n} be found?",
               "Tell me where the {n} is in this picture."),
              ("Which region of the image holds the {n}?",
               "Locate the {n} in the image: which of the nine regions is it in?",
               "Point out the location of the {n} within the image.")),
    "compare": (("Of these two pictures, which one shows more shapes?",
                 "Count the shapes in both pictures: which picture has the larger number?"),
                ("Which of the two images contains more objects?",
                 "Between image one and image two, which holds more objects?")),
    "motion": (("In this clip, in which direction is the {n} moving?",
                "Tell me the direction the {n} travels in this clip."),
               ("Where is the {n} heading in the video?",
                "Watch the video: which direction does the {n} go?")),
}

# Where a region is, in words of this module's own (answer_key reads each back to the region).
REGION_PHRASES = {
    "top left": ("in the upper-left part of the image", "in the top-left corner"),
    "top": ("near the top edge, in the middle", "in the upper middle of the image"),
    "top right": ("in the upper-right part of the image", "in the top-right corner"),
    "left": ("on the left side, halfway down", "in the middle of the left edge"),
    "centre": ("in the middle of the image", "at the center of the image"),
    "right": ("on the right side, halfway down", "in the middle of the right edge"),
    "bottom left": ("in the lower-left part of the image", "in the bottom-left corner"),
    "bottom": ("near the bottom edge, in the middle", "in the lower middle of the image"),
    "bottom right": ("in the lower-right part of the image", "in the bottom-right corner"),
}
RELATION_PHRASES = {"left": ("The {a} is on the left side of the {b}.", "It sits to the left of the {b}."),
                    "right": ("The {a} is on the right side of the {b}.", "It sits to the right of the {b}."),
                    "above": ("The {a} is higher up than the {b}.", "It sits above the {b}."),
                    "below": ("The {a} is lower down than the {b}.", "It lies underneath the {b}.")}
MOTION_PHRASES = {"left": ("It is moving towards the left.", "The {n} travels leftwards."),
                  "right": ("It heads to the right.", "The {n} goes from left to right."),
                  "up": ("The {n} goes upwards.", "It rises toward the top."),
                  "down": ("It is moving downward.", "The {n} sinks towards the bottom.")}


@dataclass(frozen=True)
class Item:
    """A drawn shape: colour name, kind, bbox (x0, y0, x1, y1) in pixels with x1/y1 exclusive, and its RGB."""

    colour: str
    kind: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


# -- pictures ----------------------------------------------------------------------------------------
def canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): long side log-uniform in 64..1024, aspect 1 (30%) or uniform in 1..4, either way."""
    long = math.exp(rng.uniform(math.log(64), math.log(1024)))
    aspect = 1.0 if rng.random() < 0.3 else rng.uniform(1.0, 4.0)
    long_px = min(1024, max(64, round(long)))
    short_px = max(64, math.ceil(long_px / aspect))  # ceil: rounding never takes the aspect past 4
    return (long_px, short_px) if rng.random() < 0.5 else (short_px, long_px)


def backdrop(rng: np.random.Generator, width: int, height: int) -> tuple[str, np.ndarray]:
    """A plain light or dark background with an optional mild gradient and grain: (name, (H, W, 3) float)."""
    name = str(rng.choice(["white", "black", "light gray", "dark gray", "beige", "dark navy"]))
    base = {"white": (255, 255, 255), "black": (0, 0, 0), "beige": (235, 220, 190), "dark navy": (20, 25, 45)}
    if name == "light gray":
        rgb = (int(rng.integers(200, 236)),) * 3
    elif name == "dark gray":
        rgb = (int(rng.integers(35, 71)),) * 3
    else:
        rgb = base[name]
    img = np.broadcast_to(np.array(rgb, np.float64), (height, width, 3)).copy()
    if rng.random() < 0.5:
        # A linear ramp of at most +-12 levels, end to end along a random direction.
        angle, amount = rng.uniform(0, 2 * math.pi), rng.uniform(2, 12)
        ys, xs = np.mgrid[0:height, 0:width]
        t = (xs / max(1, width - 1) - 0.5) * math.cos(angle) + (ys / max(1, height - 1) - 0.5) * math.sin(angle)
        img += (2 * amount * t)[..., None]
    grain = int(rng.integers(0, 9))
    if grain:
        img += rng.integers(-grain, grain + 1, size=(height, width, 1))  # one offset for all three channels
    return name, np.clip(img, 0, 255)


def _signed_distance(kind: str, box: tuple[int, int, int, int], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) from sample points to the shape filling `box`."""
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "circle":
        return np.hypot(xs - cx, ys - cy) - half
    if kind == "square":
        return np.maximum(np.abs(xs - cx), np.abs(ys - cy)) - half
    # Upright triangle: apex at the top centre, base along the bottom edge. Each slanted side's
    # outward normal is (+-h, w/2) normalised, for a triangle of width w and height h.
    w, h = x1 - x0, y1 - y0
    norm = math.hypot(h, w / 2)
    side = (np.abs(xs - cx) * h - (ys - y0) * (w / 2)) / norm
    return np.maximum(side, ys - y1)


def paint(img: np.ndarray, item: Item, samples: int) -> None:
    """Blend `item` into `img` in place; `samples` per axis per pixel (1: hard edges, 4: antialiased)."""
    x0, y0, x1, y1 = item.box
    offsets = (np.arange(samples) + 0.5) / samples
    # Sample positions inside every pixel of the box: pixel (r, c) covers [c, c+1) x [r, r+1).
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)
    inside = _signed_distance(item.kind, item.box, xs[None, :], ys[:, None]) <= 0
    cover = inside.reshape(y1 - y0, samples, x1 - x0, samples).mean(axis=(1, 3))[..., None]
    region = img[y0:y1, x0:x1]
    region[:] = region * (1 - cover) + np.array(item.rgb, np.float64) * cover


def place(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[int, int, int, int]]:
    """`count` square boxes fully inside the picture, none closer than 2% of the short side to another.

    Sides are uniform in 8%..40% of the short side (at least 8 px); when boxes do not fit after many
    tries, the sides shrink towards that floor and placing starts again.
    """
    short = min(width, height)
    gap = max(2, math.ceil(0.02 * short))
    floor = max(8, math.ceil(0.08 * short))
    top = max(floor, int(0.40 * short))
    scale = 1.0
    while True:
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(count):
            side = max(floor, int(rng.integers(floor, top + 1) * scale))
            for _ in range(100):
                x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
                box = (x, y, x + side, y + side)
                if all(_apart(box, other, gap) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == count:
            return boxes
        scale *= 0.8


def _apart(a, b, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def scene(rng: np.random.Generator, width: int, height: int, count: int) -> list[Item]:
    """`count` shapes of distinct (colour, kind), placed apart, colours jittered; ordered left to right."""
    pairs = [(c, k) for c in PALETTE for k in KINDS]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    items = []
    for (colour, kind), box in zip([pairs[i] for i in chosen], place(rng, width, height, count)):
        jitter = rng.integers(-JITTER, JITTER + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(PALETTE[colour]) + jitter, 0, 255))
        items.append(Item(colour, kind, box, rgb))
    return sorted(items, key=lambda s: (s.centre[0], s.centre[1]))


def render(rng: np.random.Generator, width: int, height: int, items: list[Item], samples: int) -> tuple[str, np.ndarray]:
    """(background name, (H, W, 3) uint8 picture)."""
    name, img = backdrop(rng, width, height)
    for item in items:
        paint(img, item, samples)
    return name, np.round(img).astype(np.uint8)


def save_picture(rng: np.random.Generator, array: np.ndarray, stem: Path) -> tuple[str, int | None]:
    """Save as JPEG (JPEG_SHARE of pictures, quality 50..95) or PNG; (file name, JPEG quality or None)."""
    image = Image.fromarray(array)
    if rng.random() < JPEG_SHARE:
        quality = int(rng.integers(50, 96))
        path = stem.with_suffix(".jpg")
        image.save(path, quality=quality)
        return path.name, quality
    path = stem.with_suffix(".png")
    image.save(path)
    return path.name, None


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 8) -> None:
    """(H, W, 3) uint8 frames → FFV1 (lossless, BGRA planes) in Matroska, byte-identical for equal input."""
    import av

    with av.open(str(path), "w", format="matroska", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("ffv1", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgra"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(stream.encode())


# -- facts and questions -----------------------------------------------------------------------------
def name_of(item: Item, items: list[Item]) -> str:
    """The kind alone when the picture holds one shape of that kind, else colour and kind."""
    same = sum(s.kind == item.kind for s in items)
    return item.kind if same == 1 else f"{item.colour} {item.kind}"


def region(item: Item, width: int, height: int) -> str | None:
    """The third-by-third region of the box centre, or None when within 4% of a side from a boundary."""
    cx, cy = item.centre
    for c, side in ((cx, width), (cy, height)):
        if min(abs(c - side / 3), abs(c - 2 * side / 3)) < 0.04 * side:
            return None
    return REGION_NAMES[min(2, int(3 * cy / height))][min(2, int(3 * cx / width))]


def relation(a: Item, b: Item, axis: str, width: int, height: int) -> str | None:
    """left/right (axis "x") or above/below ("y") of a against b, or None when the gap is under 3%."""
    lo, hi, side = (0, 2, width) if axis == "x" else (1, 3, height)
    if a.box[hi] + 0.03 * side <= b.box[lo]:
        return "left" if axis == "x" else "above"
    if b.box[hi] + 0.03 * side <= a.box[lo]:
        return "right" if axis == "x" else "below"
    return None


def _listing(items: list[Item], rng: np.random.Generator) -> str:
    names = [f"{'one' if rng.random() < 0.5 else 'an' if s.colour == 'orange' else 'a'} {s.colour} {s.kind}"
             for s in items]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + (" plus " if rng.random() < 0.5 else " and ") + names[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def questions(items: list[Item], width: int, height: int, rng: np.random.Generator) -> list[dict]:
    """Every question this picture can answer: {type, fact (what the answer states), wording, question, answer}.

    wording: "near" or "far" (see the module docstring); the facts drive which questions may follow
    which in a conversation.
    """
    out = []

    def ask(qtype: str, key: str, fact, answer: str, **names):
        far = rng.random() < 0.5
        question = str(rng.choice(QUESTIONS[key][far])).format(**names)
        out.append({"type": qtype, "fact": fact, "wording": "far" if far else "near", "question": question,
                    "answer": answer})

    counted = len(items)
    listing = _listing(items, rng)
    ask("describe", "describe", ("all",), _sentence(str(rng.choice(
        [f"I can see {listing}.", f"The picture shows {listing}.", f"From left to right: {listing}."]))))
    word = NUMBER_WORDS[counted]
    if counted == 1:
        options = ["Just one shape.", "There's only a single object."]
    else:
        options = [f"I count {word} shapes.", f"The picture contains {counted} objects.", f"{_sentence(word)}."]
    ask("count", "count", ("count",), str(rng.choice(options)))
    for item in items:
        n = name_of(item, items)
        if n == item.kind:  # a colour question never names the colour it asks for
            ask("colour", "colour", ("colour", item.box), str(rng.choice(
                [f"It is {item.colour}.", f"The {n} is painted {item.colour}.", f"{_sentence(item.colour)}."])), n=n)
        place_ = region(item, width, height)
        if place_ is not None:
            phrase = str(rng.choice(REGION_PHRASES[place_]))
            ask("where", "where", ("place", item.box), str(rng.choice(
                [f"You can find the {n} {phrase}.", f"It is {phrase}."])), n=n)
    for a in items:
        for b in items:
            if a is b:
                continue
            for axis in ("x", "y"):
                rel = relation(a, b, axis, width, height)
                if rel is not None:
                    na, nb = name_of(a, items), name_of(b, items)
                    ask("position", f"position-{axis}", ("relation", a.box, b.box, axis),
                        str(rng.choice(RELATION_PHRASES[rel])).format(a=na, b=nb), a=na, b=nb)
    return out


def _states(question: dict, items: list[Item]) -> set:
    """The facts an answered question puts in the conversation (describe states every colour and the count)."""
    if question["type"] == "describe":
        return {("all",), ("count",)} | {("colour", s.box) for s in items}
    return {question["fact"]}


def _allowed(question: dict, stated: set) -> bool:
    fact = question["fact"]
    if question["type"] == "describe":
        return not stated  # it would repeat anything said before
    if fact in stated:
        return False
    if question["type"] == "position":
        # Both places stated make the relation a matter of reading them back.
        return not ({("place", fact[1]), ("place", fact[2])} <= stated)
    return True


def conversation(last: dict, pool: list[dict], items: list[Item], rng: np.random.Generator, turns: int) -> list[dict]:
    """`turns` questions ending with `last`; no answer is stated by an earlier turn (see _allowed)."""
    chosen: list[dict] = []
    stated: set = set()
    order = [pool[i] for i in rng.permutation(len(pool))]
    for q in order:
        if len(chosen) == turns - 1:
            break
        if q is last or not _allowed(q, stated):
            continue
        after = stated | _states(q, items)
        if _allowed(last, after):
            chosen.append(q)
            stated = after
    return chosen + [last]


def _conversations(turns: list[dict], marker: str) -> list[dict]:
    conv = []
    for i, q in enumerate(turns):
        conv.append({"from": "human", "value": (marker if i == 0 else "") + q["question"]})
        conv.append({"from": "gpt", "value": q["answer"]})
    return conv


def _size_tags(width: int, height: int) -> list[str]:
    long, short = max(width, height), min(width, height)
    # One size tag per line: a short side under 128 makes a picture small, even when it is long.
    size = "size:small" if short < 128 else "size:large" if long >= 512 else "size:medium"
    return [size] + (["aspect:wide"] if long / short >= 2 else [])


def _shapes_field(items: list[Item]) -> list[dict]:
    return [{"color": s.colour, "kind": s.kind, "bbox": list(s.box)} for s in items]


# -- lines -------------------------------------------------------------------------------------------
def _picture_line(out: Path, index: int, qtype: str, rng: np.random.Generator) -> dict:
    for _ in range(1000):
        width, height = canvas_size(rng)
        count = int(rng.integers(2 if qtype == "position" else 1, 6))
        items = scene(rng, width, height, count)
        pool = questions(items, width, height, rng)
        targets = [q for q in pool if q["type"] == qtype]
        if targets:
            break
    else:  # pragma: no cover - every type is askable about most scenes
        raise RuntimeError(f"no scene found for a {qtype} question")
    last = targets[int(rng.integers(len(targets)))]
    turns = 1
    if qtype != "describe" and rng.random() < MULTI_TURN_SHARE:
        turns = int(rng.integers(2, 5))
    asked = conversation(last, pool, items, rng, turns)
    samples = 4 if rng.random() < 0.5 else 1
    background, array = render(rng, width, height, items, samples)
    name, quality = save_picture(rng, array, out / "images" / f"ind-{index:05d}")
    tags = _size_tags(width, height) + (["jpeg"] if quality else [])
    tags += (["paraphrase"] if last["wording"] == "far" else []) + (["multi-turn"] if len(asked) > 1 else [])
    return {"id": f"ind-{index:05d}", "type": qtype, "tags": tags, "image": f"images/{name}",
            "conversations": _conversations(asked, "<image>\n"), "turn_types": [q["type"] for q in asked],
            "width": width, "height": height,
            "background": background, "shapes": _shapes_field(items),
            "edges": "antialiased" if samples > 1 else "hard", "wording": last["wording"], "jpeg_quality": quality}


def _compare_line(out: Path, index: int, rng: np.random.Generator) -> dict:
    width, height = canvas_size(rng)  # both pictures share a size, so the line has one size tag
    counts = [int(c) for c in rng.choice(np.arange(1, 6), size=2, replace=False)]
    names, shape_lists, backgrounds, jpeg = [], [], [], False
    for side, count in zip("ab", counts):
        items = scene(rng, width, height, count)
        background, array = render(rng, width, height, items, 4 if rng.random() < 0.5 else 1)
        name, quality = save_picture(rng, array, out / "images" / f"ind-{index:05d}-{side}")
        names.append(f"images/{name}")
        shape_lists.append(_shapes_field(items))
        backgrounds.append(background)
        jpeg = jpeg or quality is not None
    first = counts[0] > counts[1]
    far = rng.random() < 0.5
    question = str(rng.choice(QUESTIONS["compare"][far]))
    answer = str(rng.choice(["The first one has more.", "Picture one has more shapes than picture two.",
                             "The first image contains more objects."] if first else
                            ["The second one has more shapes.", "Image two contains more objects.",
                             "The second picture holds more of them."]))
    tags = _size_tags(width, height) + (["jpeg"] if jpeg else []) + (["paraphrase"] if far else [])
    return {"id": f"ind-{index:05d}", "type": "compare", "tags": tags, "image": names,
            "conversations": _conversations([{"question": question, "answer": answer}], "<image>\n<image>\n"),
            "turn_types": ["compare"],
            "width": width, "height": height, "background": backgrounds, "shapes": shape_lists,
            "wording": "far" if far else "near"}


def _motion_line(out: Path, index: int, rng: np.random.Generator) -> dict:
    width = int(rng.integers(96, 257))
    height = int(rng.integers(max(96, math.ceil(width / 2)), min(256, 2 * width) + 1))
    direction = str(rng.choice(["left", "right", "up", "down"]))
    side = int(rng.integers(max(8, round(0.12 * min(width, height))), round(0.30 * min(width, height)) + 1))
    along, across = (width, height) if direction in ("left", "right") else (height, width)
    room = along - side
    travel = int(rng.integers(max(8, round(0.3 * room)), room + 1))
    start = int(rng.integers(0, room - travel + 1))
    if direction in ("left", "up"):
        start += travel  # moving towards 0
    sign = -1 if direction in ("left", "up") else 1
    fixed = int(rng.integers(0, across - side + 1))
    colour, kind = str(rng.choice(list(PALETTE))), str(rng.choice(KINDS))
    jitter = rng.integers(-JITTER, JITTER + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(PALETTE[colour]) + jitter, 0, 255))
    samples = 4 if rng.random() < 0.5 else 1
    boxes, frames = [], []
    name_, base = backdrop(rng, width, height)
    for t in range(FRAMES):
        pos = start + sign * round(travel * t / (FRAMES - 1))
        x, y = (pos, fixed) if direction in ("left", "right") else (fixed, pos)
        item = Item(colour, kind, (x, y, x + side, y + side), rgb)
        frame = base.copy()
        paint(frame, item, samples)
        boxes.append(list(item.box))
        frames.append(np.round(frame).astype(np.uint8))
    (out / "videos").mkdir(parents=True, exist_ok=True)
    write_clip(out / "videos" / f"ind-{index:05d}.mkv", frames)
    far = rng.random() < 0.5
    n = f"{colour} {kind}"
    question = str(rng.choice(QUESTIONS["motion"][far])).format(n=n)
    answer = str(rng.choice(MOTION_PHRASES[direction])).format(n=n)
    tags = _size_tags(width, height) + (["paraphrase"] if far else [])
    return {"id": f"ind-{index:05d}", "type": "motion", "tags": tags, "video": f"videos/ind-{index:05d}.mkv",
            "conversations": _conversations([{"question": question, "answer": answer}], "<video>\n"),
            "turn_types": ["motion"],
            "width": width, "height": height, "background": name_,
            "shapes": [{"color": colour, "kind": kind, "bbox": boxes[0]}], "boxes": boxes,
            "direction": direction, "edges": "antialiased" if samples > 1 else "hard",
            "wording": "far" if far else "near"}


def write_independent_set(out: Path, n: int, seed: int) -> Path:
    """Write `n` lines (types in turn: TYPES) and their media under `out`; returns out/independent.jsonl.

    Line i draws from its own generator seeded by (seed, i), so equal arguments give byte-identical files
    and a larger n only appends lines. Existing files of the same names are overwritten.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "independent.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            qtype = TYPES[i % len(TYPES)]
            if qtype == "compare":
                line = _compare_line(out, i, rng)
            elif qtype == "motion":
                line = _motion_line(out, i, rng)
            else:
                line = _picture_line(out, i, qtype, rng)
            f.write(json.dumps(line) + "\n")
    return path
