"""The independent shapes test set (tests/shapes_independent.py): determinism, the spec's facts re-derived
from the pixels and boxes, references the scorer reads, honest conversations, wordings of its own."""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavakit.train.scoring import answer_key
from shapes_independent import PALETTE, QUESTIONS, TYPES, write_independent_set

N = 70  # ten lines per type
SPEC_TAGS = {"size:small", "size:medium", "size:large", "aspect:wide", "jpeg", "paraphrase", "multi-turn"}
ROWS = (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("independent")
    path = write_independent_set(out, N, seed=7)
    assert path == out / "independent.jsonl"
    return out, [json.loads(s) for s in path.read_text().splitlines()]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = write_independent_set(tmp_path / "a", 14, seed=3).parent
    b = write_independent_set(tmp_path / "b", 14, seed=3).parent
    c = write_independent_set(tmp_path / "c", 14, seed=4).parent
    assert digest(a) == digest(b) and len(digest(a)) > 14
    assert digest(a)["independent.jsonl"] != digest(c)["independent.jsonl"]
    # Each line has its own generator, so a longer set starts with the shorter one.
    longer = write_independent_set(tmp_path / "d", 16, seed=3).read_text().splitlines()
    assert longer[:14] == (a / "independent.jsonl").read_text().splitlines()


def test_balanced_types_and_every_tag(made):
    _, lines = made
    assert Counter(line["type"] for line in lines) == {t: N // len(TYPES) for t in TYPES}
    tags = Counter(t for line in lines for t in line["tags"])
    assert set(tags) == SPEC_TAGS
    for line in lines:
        assert sum(t.startswith("size:") for t in line["tags"]) == 1
        assert ("multi-turn" in line["tags"]) == (len(line["conversations"]) > 2)
        assert len(line["conversations"]) in (2, 4, 6, 8)
    assert 0.1 < tags["jpeg"] / N < 0.5 and tags["multi-turn"] >= 5


def media(line: dict) -> list[str]:
    value = line.get("image", line.get("video"))
    return value if isinstance(value, list) else [value]


def shape_lists(line: dict) -> list[list[dict]]:
    return line["shapes"] if line["type"] == "compare" else [line["shapes"]]


def test_world_facts(made):
    out, lines = made
    for line in lines:
        w, h = line["width"], line["height"]
        long, short = max(w, h), min(w, h)
        if line["type"] == "motion":
            assert 96 <= short <= long <= 256 and long / short <= 2
            assert len(line["boxes"]) == 8
        else:
            assert 64 <= short <= long <= 1024 and long / short <= 4
        for shapes in shape_lists(line):
            assert 1 <= len(shapes) <= 5
            assert len({(s["color"], s["kind"]) for s in shapes}) == len(shapes)
            gap = max(2, 0.02 * short)
            for i, s in enumerate(shapes):
                x0, y0, x1, y1 = s["bbox"]
                assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
                assert s["color"] in PALETTE and s["kind"] in ("circle", "square", "triangle")
                if line["type"] != "motion":
                    assert max(8, math.floor(0.08 * short)) <= x1 - x0 <= max(8, 0.40 * short)
                for t in shapes[i + 1:]:
                    a, b = s["bbox"], t["bbox"]
                    assert a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
        for name in media(line):
            assert (out / name).is_file()
        if line["type"] != "motion":
            for name in media(line):
                assert Image.open(out / name).size == (w, h)
                assert name.endswith(".jpg") == ("jpeg" in line["tags"]) or line["type"] == "compare"


def inside_point(shape: dict) -> tuple[int, int]:
    """A pixel well inside the shape: the box centre, or for a triangle two thirds of the way down."""
    x0, y0, x1, y1 = shape["bbox"]
    y = y0 + 2 * (y1 - y0) / 3 if shape["kind"] == "triangle" else (y0 + y1) / 2
    return int((x0 + x1) / 2), int(y)


def nearest_colour(rgb: np.ndarray) -> tuple[str, float]:
    dist = {c: float(np.linalg.norm(rgb - np.array(v))) for c, v in PALETTE.items()}
    best = min(dist, key=dist.get)
    return best, dist[best]


def check_picture(pixels: np.ndarray, shapes: list[dict], jpeg: bool) -> None:
    """Each shape's colour at its inside point; nothing but background outside the boxes."""
    h, w = pixels.shape[:2]
    for s in shapes:
        x, y = inside_point(s)
        patch = pixels[max(0, y - 1):y + 2, max(0, x - 1):x + 2].reshape(-1, 3)
        colour, dist = nearest_colour(np.median(patch, axis=0))
        assert colour == s["color"], (s, colour, dist)
        assert dist < (70 if jpeg else 30)
    # JPEG rings around edges: leave a wider border around each box out of the background check.
    margin = 8 if jpeg else 1
    outside = np.ones((h, w), bool)
    for s in shapes:
        x0, y0, x1, y1 = s["bbox"]
        outside[max(0, y0 - margin):y1 + margin, max(0, x0 - margin):x1 + margin] = False
    if outside.sum() < 50:
        return
    rest = pixels[outside].astype(float)
    spread = np.abs(rest - np.median(rest, axis=0)).max()
    assert spread <= (60 if jpeg else 12 * 2 + 8 * 2 + 2), spread


def test_pixels_agree_with_the_records(made):
    out, lines = made
    for line in lines:
        if line["type"] == "motion":
            continue
        for name, shapes in zip(media(line), shape_lists(line)):
            pixels = np.asarray(Image.open(out / name).convert("RGB"))
            check_picture(pixels, shapes, name.endswith(".jpg"))


def test_clips_move_the_way_the_answer_says(made):
    import av

    out, lines = made
    clips = [line for line in lines if line["type"] == "motion"]
    assert clips
    for line in clips:
        with av.open(str(out / line["video"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 8 and frames[0].shape == (line["height"], line["width"], 3)
        (shape,) = line["shapes"]
        centres = []
        for frame, box in zip(frames, line["boxes"]):
            check_picture(frame, [{**shape, "bbox": box}], jpeg=False)
            # Where the shape's colour is, found from the pixels alone.
            target = np.array(PALETTE[shape["color"]])
            ys, xs = np.nonzero(np.linalg.norm(frame.astype(float) - target, axis=-1) < 40)
            centres.append((xs.mean(), ys.mean()))
        dx, dy = np.subtract(centres[-1], centres[0])
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == line["direction"] == answer_key("motion", line["conversations"][-1]["value"])
        assert max(abs(dx), abs(dy)) >= 8 and min(abs(dx), abs(dy)) < 1


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[a-z ]+?)" for i, p in enumerate(parts))
    return re.compile(pattern + "$")


def asked_about(qtype: str, question: str, shapes: list[dict]) -> dict[str, dict]:
    """Which shapes a question names ({"n": shape} or {"a": ..., "b": ...}), read back through its wording."""
    keys = [k for k in QUESTIONS if k.split("-")[0] == qtype]
    for key in keys:
        for template in QUESTIONS[key][0] + QUESTIONS[key][1]:
            m = _template_regex(template).match(question)
            if m:
                named = {}
                for slot, name in m.groupdict().items():
                    words = name.split()
                    hits = [s for s in shapes if (s["kind"] == words[-1] and
                                                  (len(words) == 1 or s["color"] == words[0]))]
                    assert len(hits) == 1, (question, shapes)  # a name is never ambiguous
                    if len(words) == 1:
                        assert sum(s["kind"] == words[0] for s in shapes) == 1  # kind alone only when unique
                    elif qtype != "motion":  # a clip's one shape is named by colour and kind, as in the spec
                        assert sum(s["kind"] == words[-1] for s in shapes) > 1  # colour only when needed
                    named[slot] = hits[0]
                return named
    raise AssertionError(f"{question!r} is none of the {qtype} wordings")


def expected_key(qtype: str, named: dict, line: dict):
    """The answer's key derived from the boxes with the spec's rules, not from the module's functions."""
    w, h = line["width"], line["height"]
    if qtype == "describe":
        return tuple(sorted((s["color"], s["kind"]) for s in line["shapes"]))
    if qtype == "count":
        return len(line["shapes"])
    if qtype == "colour":
        return named["n"]["color"]
    if qtype == "where":
        x0, y0, x1, y1 = named["n"]["bbox"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for c, side in ((cx, w), (cy, h)):
            assert min(abs(c - side / 3), abs(c - 2 * side / 3)) >= 0.04 * side  # never on a boundary
        return ROWS[int(3 * cy / h)][int(3 * cx / w)]
    if qtype == "position":
        a, b = named["a"]["bbox"], named["b"]["bbox"]
        found = []
        for lo, hi, side, words in ((0, 2, w, ("left", "right")), (1, 3, h, ("above", "below"))):
            if a[hi] + 0.03 * side <= b[lo]:
                found.append(words[0])
            elif b[hi] + 0.03 * side <= a[lo]:
                found.append(words[1])
        return found  # the answer must be one of them (both axes may be separated)
    if qtype == "compare":
        counts = [len(s) for s in line["shapes"]]
        assert counts[0] != counts[1]
        return "first" if counts[0] > counts[1] else "second"
    return line["direction"]


def test_every_reference_parses_to_the_right_key(made):
    _, lines = made
    for line in lines:
        conv = line["conversations"]
        assert len(line["turn_types"]) * 2 == len(conv) and line["turn_types"][-1] == line["type"]
        shapes = line["shapes"] if line["type"] not in ("compare",) else []
        for qtype, (q, a) in zip(line["turn_types"], zip(conv[::2], conv[1::2])):
            question = re.sub(r"^(<image>\n)+|^<video>\n", "", q["value"])
            named = asked_about(qtype, question, shapes) if qtype not in ("compare",) else {}
            key, want = answer_key(qtype, a["value"]), expected_key(qtype, named, line)
            assert key is not None, a["value"]
            if qtype == "position":
                assert key in want and len(want) >= 1, (a["value"], want)
                # the question's axis is the answer's
                axis_x = "left" in question or "Horizontally" in question
                assert (key in ("left", "right")) == axis_x
            else:
                assert key == want, (qtype, a["value"], want)
            assert a["value"][0].isupper() and a["value"].endswith(".")


def test_conversations_never_give_the_answer_away(made):
    _, lines = made
    multi = [line for line in lines if len(line["conversations"]) > 2]
    assert {line["type"] for line in multi} == {"count", "colour", "position", "where"}
    for line in multi:
        conv, types = line["conversations"], line["turn_types"]
        humans = [t["value"] for t in conv[::2]]
        assert humans[0].startswith("<image>\n") and not any("<image>" in q for q in humans[1:])
        earlier_types, last = types[:-1], types[-1]
        if "describe" in earlier_types:
            assert earlier_types[0] == "describe" and types.count("describe") == 1
            assert last in ("where", "position")  # describe states every colour and the count
        if last == "count":
            assert "count" not in earlier_types
        last_q, last_a = conv[-2]["value"], conv[-1]["value"]
        assert last_q not in humans[:-1] and all(last_a != t["value"] for t in conv[1:-2:2])
        if last == "colour":
            named = asked_about("colour", last_q, line["shapes"])["n"]
            said = " ".join(t["value"].lower() for t in conv[:-1])
            assert f"{named['color']} {named['kind']}" not in said
            assert not any(t == "colour" and named["kind"] in q for t, q in zip(earlier_types, humans))


# The spec's canonical sentences (docs/shapes-world.md): this set must use others.
SPEC_QUESTIONS = {"describe the picture.", "how many shapes are there?", "what colour is the {}?",
                  "is the {} left or right of the {}?", "is the {} above or below the {}?", "where is the {}?",
                  "which picture has more shapes, the first or the second?", "which way does the {} move?"}


def _normal(text: str) -> str:
    return re.sub(r"\{\w*\}", "{}", text.strip().lower())


def _canonical_answer(line: dict) -> str:
    """What the generator's spec would answer to the line's last question (only some types need names)."""
    qtype = line["type"]
    if qtype == "count":
        n = len(line["shapes"])
        return "There is one shape." if n == 1 else f"There are {('two', 'three', 'four', 'five')[n - 2]} shapes."
    if qtype == "compare":
        return f"The {expected_key('compare', {}, line)} picture has more shapes."
    if qtype == "describe":
        names = [f"a {s['color']} {s['kind']}" for s in line["shapes"]]
        text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return text[0].upper() + text[1:] + "."
    return ""


def test_own_wordings_and_answers_against_the_spec(made):
    _, lines = made
    mine = {_normal(t) for pair in QUESTIONS.values() for group in pair for t in group}
    assert not mine & SPEC_QUESTIONS
    for line in lines:
        question = re.sub(r"^(<image>\n)+|^<video>\n", "", line["conversations"][-2]["value"])
        assert _normal(question) not in SPEC_QUESTIONS
        assert line["conversations"][-1]["value"] != _canonical_answer(line)


def _strings(value, depth: int = 0):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict) and depth < 4:
        for v in value.values():
            yield from _strings(v, depth + 1)
    elif isinstance(value, (list, tuple)) and depth < 4:
        for v in value:
            yield from _strings(v, depth + 1)


def test_wordings_differ_from_the_generators():
    scenes = pytest.importorskip("llavakit.train.scenes")
    # The generator may keep its wordings in a module of its own beside scenes.py: read every one loaded.
    modules = [scenes] + [m for name, m in sys.modules.items()
                          if name.startswith("llavakit.train.scene") and m is not scenes]
    theirs = {_normal(s) for m in modules for v in vars(m).values() if isinstance(v, (dict, list, tuple))
              for s in _strings(v) if "?" in s or s.endswith(".")}
    assert len(theirs) >= 7 * 12  # found the generator's lists: at least 12 wordings per type
    mine = {_normal(t) for pair in QUESTIONS.values() for group in pair for t in group}
    assert not mine & theirs, mine & theirs
