"""The shapes world: determinism, file layout, and answers re-derived from the pixels and metadata."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavakit.errors import LlavakitError
from llavakit.train.shapes import (BACKGROUNDS, COLORS, IMAGE_TYPES, QUESTION_TYPES, TRAIN_WEIGHTS, _pick_types,
                                   make_shapes, normalize_answer)

FILES = ("captions.jsonl", "train.jsonl", "test.jsonl")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def media(line: dict) -> list[str]:
    value = line.get("image", line.get("video"))
    return value if isinstance(value, list) else [value]


def turns(line: dict) -> list[tuple[str, str, str]]:
    """(type, question without markers, answer) per turn."""
    conv = line["conversations"]
    assert len(conv) == 2 and "turn_types" not in line  # one question per line
    return [(line["type"], conv[0]["value"].replace("<image>\n", "").replace("<video>\n", ""), conv[1]["value"])]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    summary = make_shapes(out, 40, seed=3, n_test=900)
    return out, summary, {name: read(out / name) for name in FILES}


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_question_types_and_normalize():
    assert QUESTION_TYPES == ("shapes", "color", "count", "position", "caption", "where", "colors", "compare", "motion")
    assert normalize_answer("  A red circle on a white background. ") == "a red circle on a white background"
    assert normalize_answer("Left\n") == "left"
    assert normalize_answer("the first") == "the first"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (make_shapes(tmp_path / name, 12, seed=seed, n_test=14) for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    assert a["lines"] == b["lines"] == c["lines"]
    files_a, files_b, files_c = (all_files(tmp_path / name) for name in "abc")
    assert files_a == files_b  # JSONL, PNG and MKV bytes alike
    for name in FILES + ("images/train-000000.png", "images/test-000000.png"):
        assert files_a[name] != files_c[name], name


def test_files_markers_and_split_disjoint(world):
    out, summary, data = world
    assert summary["lines"] == {name: len(lines) for name, lines in data.items()}
    assert summary["lines"] == {"captions.jsonl": 40, "train.jsonl": 100, "test.jsonl": 900}
    used = {"train": set(), "test": set()}
    for name, lines in data.items():
        assert len({line["id"] for line in lines}) == len(lines), f"{name}: ids not unique"
        for line in lines:
            split = "test" if name == "test.jsonl" else "train"
            assert line["id"].startswith(split + "-")
            paths = media(line)
            for path in paths:
                assert (out / path).is_file(), path
                assert Path(path).name.startswith(split + "-")
            used[split].update(paths)
            marker = "<video>" if "video" in line else "<image>"
            conv = line["conversations"]
            assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith((marker + "\n") * len(paths))
            assert conv[0]["value"].count(marker) == len(paths)
            assert all("<image>" not in c["value"] and "<video>" not in c["value"] for c in conv[1:])
            assert list(line)[:4] == ["id", "type", "video" if "video" in line else "image", "conversations"]
    assert not used["train"] & used["test"]
    digests = {split: {hashlib.sha256((out / p).read_bytes()).hexdigest() for p in paths}
               for split, paths in used.items()}
    assert not digests["train"] & digests["test"]
    assert summary["images"]["train"] == len([p for p in used["train"] if p.endswith(".png")]) == 40
    assert summary["videos"]["train"] == len([p for p in used["train"] if p.endswith(".mkv")]) == 10


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def cell(shape: dict) -> tuple[int, int]:
    """(row, column) of the 32 px grid cell holding the shape's centre."""
    x0, y0, x1, y1 = shape["bbox"]
    return int((y0 + y1) / 2 // 32), int((x0 + x1) / 2 // 32)


def place(shape: dict) -> str:
    row, col = cell(shape)
    return "centre" if (row, col) == (1, 1) else f"{('top', 'middle', 'bottom')[row]} {('left', 'middle', 'right')[col]}"


def listing(shapes: list[dict]) -> str:
    cells = [cell(s) for s in shapes]
    assert cells == sorted(cells), "shapes not in reading order"
    items = [article(f"{s['color']} {s['kind']}") for s in shapes]
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def check_pixels(image: np.ndarray, background: str, shapes: list[dict]) -> None:
    """Re-detect each shape from the pixels: its colour fills its box in the proportion its kind implies."""
    outside = np.ones(image.shape[:2], bool)
    fill = {"square": (0.97, 1.0), "circle": (0.70, 0.86), "triangle": (0.40, 0.62)}
    pairs = [(s["color"], s["kind"]) for s in shapes]
    assert len(set(pairs)) == len(pairs), "a (colour, kind) pair repeats"
    assert len({cell(s) for s in shapes}) == len(shapes), "two shapes share a cell"
    for s in shapes:
        x0, y0, x1, y1 = s["bbox"]
        assert 18 <= x1 - x0 == y1 - y0 <= 28 and 0 <= x0 and 0 <= y0 and x1 <= 96 and y1 <= 96
        row, col = cell(s)  # inside its cell, 2 px from the cell's borders, at most 3 px off its centre
        assert col * 32 + 2 <= x0 and x1 <= col * 32 + 30 and row * 32 + 2 <= y0 and y1 <= row * 32 + 30
        assert abs((x0 + x1) / 2 - (col * 32 + 16)) <= 4 and abs((y0 + y1) / 2 - (row * 32 + 16)) <= 4
        mask = np.all(image[y0:y1, x0:x1] == COLORS[s["color"]], axis=-1)
        lo, hi = fill[s["kind"]]
        assert lo <= mask.mean() <= hi, (s, mask.mean())
        ys, xs = np.nonzero(mask)  # the colour reaches the box's edges, so the box is tight
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (0, 0, x1 - x0 - 1, y1 - y0 - 1)
        outside[y0:y1, x0:x1] = False
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
            assert ax0 >= bx1 + 4 or bx0 >= ax1 + 4 or ay0 >= by1 + 4 or by0 >= ay1 + 4, (a, b)
    grain = image[outside].astype(int) - BACKGROUNDS[background]
    assert np.abs(grain).max() <= 6 and grain.std() > 1  # mild, not flat
    for rgb in COLORS.values():
        assert not np.all(image[outside] == rgb, axis=-1).any()


def expected(qtype: str, question: str, shapes: list[dict], background: str) -> str:
    """The answer worked out from the metadata alone."""
    kinds = Counter(s["kind"] for s in shapes)
    # Questions name shapes by kind, and only kinds the picture holds once.
    named = [(m.start(), m.group(1)) for m in re.finditer(r"the (circle|square|triangle)\b", question)]
    assert all(kinds[k] == 1 for _, k in named), (question, shapes)
    by_kind = {s["kind"]: s for s in shapes}
    asked = [by_kind[k] for _, k in named]
    if qtype == "shapes":
        return listing(shapes)
    if qtype == "count":
        return str(len(shapes))
    if qtype == "caption":
        text = f"{listing(shapes)} on {article(background)} background."
        return text[0].upper() + text[1:]
    if qtype == "color":
        (shape,) = asked
        return shape["color"]
    if qtype == "colors":
        assert len(asked) >= 2
        return "; ".join(f"the {s['kind']} {s['color']}" for s in asked)
    if qtype == "where":
        assert len(asked) >= 1
        return "; ".join(f"the {s['kind']} {place(s)}" for s in asked)
    if qtype == "position":
        a, b = asked
        (ra, ca), (rb, cb) = cell(a), cell(b)
        if "left" in question:
            assert ca != cb  # asked only along an axis where their columns (rows) differ
            words = ("left", "middle", "right")
            return f"the {a['kind']} {words[ca]}; the {b['kind']} {words[cb]}; so {'left' if ca < cb else 'right'}"
        assert ra != rb
        words = ("top", "middle", "bottom")
        return f"the {a['kind']} {words[ra]}; the {b['kind']} {words[rb]}; so {'above' if ra < rb else 'below'}"
    raise AssertionError(qtype)


def test_answers_match_pixels_and_metadata(world):
    out, _, data = world
    seen = Counter()
    for name, lines in data.items():
        for line in lines:
            if line["type"] == "motion":
                (qtype, question, answer), = turns(line)
                boxes = line["boxes"]
                dx, dy = boxes[-1][0] - boxes[0][0], boxes[-1][1] - boxes[0][1]
                assert 44 <= abs(dx) + abs(dy) <= 62 and (dx == 0 or dy == 0) and len(boxes) == 8
                want = ("left" if dx < 0 else "right") if dx else ("up" if dy < 0 else "down")
                shape = line["shapes"][0]
                assert f"the {shape['color']} {shape['kind']}" in question and answer == want
                assert all(0 <= v <= 96 for box in boxes for v in box)
            elif line["type"] == "compare":
                (qtype, question, answer), = turns(line)
                counts = [len(s) for s in line["shapes"]]
                assert counts[0] != counts[1]
                assert answer == ("the first" if counts[0] > counts[1] else "the second")
                for path, background, shapes in zip(line["image"], line["background"], line["shapes"]):
                    check_pixels(np.asarray(Image.open(out / path).convert("RGB")), background, shapes)
            else:
                image = np.asarray(Image.open(out / line["image"]).convert("RGB"))
                assert image.shape == (96, 96, 3)
                check_pixels(image, line["background"], line["shapes"])
                line_turns = turns(line)
                assert 1 <= len(line["shapes"]) <= 4 and len(line_turns) == 1
                for qtype, question, answer in line_turns:
                    assert answer == expected(qtype, question, line["shapes"], line["background"]), (line["id"], question)
            seen[name] += 1
    assert seen == {"captions.jsonl": 40, "train.jsonl": 100, "test.jsonl": 900}


CANONICAL = {
    "shapes": r"What shapes are in the picture\?",
    "color": r"What colour is the (circle|square|triangle)\?",
    "count": r"How many shapes are there\?",
    "position": r"Is the \w+ (to the left or to the right of|above or below) the \w+\?",
    "caption": r"Describe the picture in one sentence\.",
    "where": r"Where is the \w+\?|Where are the \w+(, the \w+)* and the \w+\?",
    "colors": r"What colours are the \w+(, the \w+)* and the \w+\?",
    "compare": r"Which image has more shapes, the first or the second\?",
    "motion": r"Which way does the \w+ \w+ move\?",
}


def test_test_split_is_balanced_and_canonical(world):
    _, summary, data = world
    test = data["test.jsonl"]
    types = Counter(line["type"] for line in test)
    assert set(types) == set(QUESTION_TYPES) and min(types.values()) >= 90
    assert summary["test_questions"] == dict(types)
    answers: dict[str, Counter] = {t: Counter() for t in QUESTION_TYPES}
    for line in test:
        (qtype, question, answer), = turns(line)
        assert re.fullmatch(CANONICAL[qtype], question), question
        assert answer == answer.strip() and (qtype == "caption") == answer.endswith(".")
        answers[qtype][answer] += 1
    answers["position"] = Counter(a.rsplit(" ", 1)[1] for a in answers["position"].elements())
    for qtype, keys in (("count", "1234"), ("position", ("left", "right", "above", "below")),
                        ("motion", ("left", "right", "up", "down")), ("compare", ("the first", "the second"))):
        mean = sum(answers[qtype].values()) / len(keys)
        assert set(answers[qtype]) == set(keys)
        assert all(0.7 * mean <= answers[qtype][k] <= 1.3 * mean for k in keys), (qtype, answers[qtype])


def test_train_split_mix(world):
    _, summary, data = world
    train = data["train.jsonl"]
    pictures = [line for line in train if line["type"] in IMAGE_TYPES]
    assert len(pictures) == 80 and Counter(line["type"] for line in train)["compare"] == 10
    by_picture = {}
    for line in pictures:  # two questions of different types about every picture
        by_picture.setdefault(line["image"], set()).add(line["type"])
        assert line["id"] == line["image"][len("images/"):-len(".png")] + "-" + line["type"]
    assert len(by_picture) == 40 and all(len(types) == 2 for types in by_picture.values())
    counts = Counter(len(line["shapes"]) for line in data["captions.jsonl"])
    assert counts == {1: 10, 2: 10, 3: 10, 4: 10}  # picture sizes exactly balanced
    directions = Counter(line["conversations"][1]["value"] for line in train if line["type"] == "motion")
    assert max(directions.values()) - min(directions.values()) <= 1 and len(directions) == 4
    per_turn = Counter(line["type"] for line in train)
    assert summary["train_questions"] == {t: per_turn[t] for t in QUESTION_TYPES}
    assert all(per_turn[t] >= 3 for t in QUESTION_TYPES)  # every type asked, the rarest ("colors") needs two named kinds
    assert all(line["type"] == "caption" for line in data["captions.jsonl"])


def test_training_asks_more_about_colour_and_position():
    rng = random.Random(0)
    options = list(IMAGE_TYPES)
    firsts = Counter(_pick_types(rng, options, 1)[0] for _ in range(4000))
    total = sum(TRAIN_WEIGHTS.values())
    for t in IMAGE_TYPES:  # drawn in proportion to TRAIN_WEIGHTS
        assert abs(firsts[t] / 4000 - TRAIN_WEIGHTS[t] / total) < 0.03, (t, firsts)
    assert sorted(_pick_types(rng, ["shapes", "count"], 5)) == ["count", "shapes"]  # no more than apply, no repeats


def test_video_decodes_with_exact_colours(world):
    av = pytest.importorskip("av")
    out, _, data = world
    line = next(line for line in data["test.jsonl"] if line["type"] == "motion")
    with av.open(str(out / line["video"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (96, 96, 3)
    rgb = np.array(COLORS[line["shapes"][0]["color"]])
    for frame, (x0, y0, x1, y1) in zip(frames, line["boxes"]):
        centre = frame[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
        assert np.abs(centre - rgb).max() <= 3
        corner = frame[y0:y1, x0:x1]  # the shape is where the metadata says, and nowhere else
        assert np.all(corner == rgb, axis=-1).sum() == np.all(frame == rgb, axis=-1).sum()


def test_bad_arguments_raise_typed_errors(tmp_path):
    for kwargs in ({"n": 0}, {"n": 4, "n_test": -1}, {"n": 4, "size": 20}, {"n": 1, "n_compare": 1},
                   {"n": 4, "per_image": 0}):
        with pytest.raises(LlavakitError):
            make_shapes(tmp_path / "x", **kwargs)


def test_cli(tmp_path, capsys):
    from llavakit.cli import main

    out = tmp_path / "cli"
    assert main(["make-shapes", "--out", str(out), "--n", "40", "--n-test", "90", "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lines"] == {"captions.jsonl": 40, "train.jsonl": 100, "test.jsonl": 90}
    assert all((out / name).is_file() for name in FILES)
    assert Counter(line["type"] for line in read(out / "test.jsonl")) == {t: 10 for t in QUESTION_TYPES}

    assert main(["make-shapes", "--out", str(tmp_path / "bad"), "--n", "0"]) == 2
    assert "n must be an integer >= 1" in capsys.readouterr().err
