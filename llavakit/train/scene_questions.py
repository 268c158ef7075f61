"""The free shapes world's language: wordings, answer sentences, and conversations that never repeat a fact.

Pure Python over a scene's metadata (anything with `width`, `height` and `shapes` whose items have
`color`, `kind`, `box` and `center`, as `scenes.Scene`); scenes.py draws the pictures and writes the
files. The answer sentences are the contract with the scorer (llavakit/train/scoring.py) and the
spec's independent test renderer, so each is built in one place: `describe`, `count_answer`,
`compare_answer`, `motion_answer` and, for the rest, `asks_for`.

A conversation keeps `Known`: what its turns have told a reader, and what follows from that, so a
later question is asked only when its answer cannot be copied or worked out from earlier turns
(the rule is spelled out in scenes.py's docstring).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Protocol, Sequence


class Shape(Protocol):
    """What a question needs of a shape (scenes.Shape has it): no import of the drawing code."""

    color: str
    kind: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]: ...


class Scene(Protocol):
    """What a question needs of a picture (scenes.Scene has it)."""

    width: int
    height: int
    shapes: Sequence[Shape]

QUESTION_TYPES = ("describe", "count", "colour", "position", "where", "compare", "motion")
PICTURE_TYPES = QUESTION_TYPES[:5]  # the types one picture answers, alone or in a conversation
# How often a training conversation opens with each type. Finding a named shape and its place is
# what small models learn slowest (see shapes.py), so those come more often.
TRAIN_WEIGHTS = {"describe": 1, "count": 1, "colour": 2, "position": 3, "where": 3}
POSITION_GAP = 0.03  # "left of"/"above" only across a gap of this share of the picture's side
WHERE_MARGIN = 0.04  # "where" only this share of the side away from every thirds boundary
HELD_OUT = 3  # the last wordings of each list: test only
NUMBERS = ("one", "two", "three", "four", "five")
# (row, column) of thirds -> the phrase an answer uses
REGIONS = (("in the top left", "at the top", "in the top right"),
           ("on the left", "in the centre", "on the right"),
           ("in the bottom left", "at the bottom", "in the bottom right"))
RELATIONS = {"x": ("left of", "right of"), "y": ("above", "below")}

# The last HELD_OUT of each list are only asked in test.jsonl (tagged "paraphrase").
WORDINGS = {
    "describe": (
        "Describe the picture.", "What is in the picture?", "What do you see?", "List the shapes in the picture.",
        "Which shapes are in the picture?", "Name every shape you can see.", "What shapes does this image contain?",
        "Tell me what the picture shows.", "Describe the image.", "What can you see in this image?",
        "Give a short description of the picture.", "What does this picture contain?",
        "Please list every shape that is shown."),
    "count": (
        "How many shapes are there?", "How many shapes are in the picture?", "Count the shapes.",
        "How many shapes can you see?", "What is the number of shapes in the image?",
        "How many objects are in the picture?", "Count the shapes in this image.",
        "How many shapes does the picture contain?", "How many shapes are shown?",
        "Can you count the shapes for me?", "What is the total number of shapes?", "How many figures are drawn here?"),
    "colour": (
        "What colour is the {name}?", "What color is the {name}?", "Which colour does the {name} have?",
        "Which color is the {name}?", "What is the colour of the {name}?", "What is the color of the {name}?",
        "Tell me the colour of the {name}.", "What colour has the {name} been painted?", "Name the color of the {name}.",
        "The {name} is which colour?", "What colour do you see on the {name}?", "Say the color of the {name}."),
    "position_x": (
        "Is the {a} left or right of the {b}?", "Is the {a} to the left or to the right of the {b}?",
        "Is the {a} on the left or the right side of the {b}?", "Relative to the {b}, is the {a} left or right?",
        "Does the {a} lie left or right of the {b}?", "Is the {a} left of the {b} or right of it?",
        "Which side of the {b} is the {a} on, left or right?", "Is the {a} further left or further right than the {b}?",
        "Compared with the {b}, is the {a} to the left or to the right?",
        "Horizontally, is the {a} left or right of the {b}?", "Would you say the {a} sits left or right of the {b}?",
        "Looking across the picture, is the {a} left or right of the {b}?"),
    "position_y": (
        "Is the {a} above or below the {b}?", "Is the {a} above the {b} or below it?",
        "Is the {a} higher or lower than the {b}?", "Relative to the {b}, is the {a} above or below?",
        "Does the {a} lie above or below the {b}?", "Is the {a} over or under the {b}?",
        "Which is it: is the {a} above or below the {b}?", "Is the {a} placed above or below the {b}?",
        "Compared with the {b}, is the {a} higher up or lower down?",
        "Vertically, is the {a} above or below the {b}?", "Would you say the {a} sits above or below the {b}?",
        "Looking up and down the picture, is the {a} above or below the {b}?"),
    "where": (
        "Where is the {name}?", "Where is the {name} in the picture?", "In which part of the picture is the {name}?",
        "Where can you see the {name}?", "Where in the image is the {name}?", "Which part of the image holds the {name}?",
        "Where is the {name} located?", "Tell me where the {name} is.", "In what region of the picture is the {name}?",
        "Whereabouts is the {name}?", "Can you point out where the {name} sits?",
        "Which area of the picture contains the {name}?"),
    "compare": (
        "Which picture has more shapes, the first or the second?", "Which image has more shapes, the first or the second?",
        "Which of the two pictures shows more shapes?", "Does the first or the second picture have more shapes?",
        "Which picture contains more shapes, the first one or the second one?",
        "Compare the two pictures: which has more shapes?",
        "Which of these images holds more shapes, the first or the second?",
        "Are there more shapes in the first picture or in the second?",
        "Which picture has the larger number of shapes?",
        "Looking at both pictures, which one has more shapes?",
        "Between the first and the second image, which shows more shapes?",
        "Where are there more shapes, in the first or the second picture?"),
    "motion": (
        "Which way does the {name} move?", "In which direction does the {name} move?", "Where is the {name} moving?",
        "Which direction is the {name} moving in?", "Does the {name} move left, right, up or down?",
        "How does the {name} move?", "In what direction does the {name} travel?", "Which way is the {name} going?",
        "Tell me the direction the {name} moves in.",
        "Where does the {name} head during the clip?", "Which way is the {name} travelling in the video?",
        "What direction does the {name} go?"),
}


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(items: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def describe(scene: Scene) -> str:
    """'A red circle, a blue square and a green triangle.': every shape, left to right by centre (ties: top first)."""
    shapes = sorted(scene.shapes, key=lambda s: s.center)  # scenes.Scene keeps them so; a hand-built one may not
    return _sentence(_join([_a(f"{s.color} {s.kind}") for s in shapes]))


def count_answer(n: int) -> str:
    """'There is one shape.' / 'There are three shapes.'"""
    return "There is one shape." if n == 1 else f"There are {NUMBERS[n - 1]} shapes."


def compare_answer(more: str) -> str:
    """'The first picture has more shapes.' (`more`: "first" or "second")."""
    return f"The {more} picture has more shapes."


def motion_answer(name: str, direction: str) -> str:
    """'The red circle moves left.'"""
    return f"The {name} moves {direction}."


def names(scene: Scene) -> list[str]:
    """How questions name each shape: its kind alone when the picture holds one of that kind, else colour and kind."""
    kinds = Counter(s.kind for s in scene.shapes)
    return [s.kind if kinds[s.kind] == 1 else f"{s.color} {s.kind}" for s in scene.shapes]


def region(scene: Scene, shape: Shape) -> tuple[int, int] | None:
    """(row, column) of thirds holding the shape's centre, or None when the centre is near a boundary."""
    cell = []
    for c, side in ((shape.center[1], scene.height), (shape.center[0], scene.width)):
        if min(abs(c - side / 3), abs(c - 2 * side / 3)) < WHERE_MARGIN * side:
            return None
        cell.append(0 if c < side / 3 else 1 if c < 2 * side / 3 else 2)
    return cell[0], cell[1]


def relation(scene: Scene, a: Shape, b: Shape, axis: str) -> str | None:
    """'left of'/'right of' (axis x) or 'above'/'below' (y) for a relative to b, or None when their
    boxes are not apart along the axis by POSITION_GAP of that side."""
    lo, side = (0, scene.width) if axis == "x" else (1, scene.height)
    gap = POSITION_GAP * side
    if b.box[lo] - a.box[lo + 2] >= gap:
        return RELATIONS[axis][0]
    if a.box[lo] - b.box[lo + 2] >= gap:
        return RELATIONS[axis][1]
    return None


@dataclass(frozen=True)
class Ask:
    """One question about one picture: its wording list, the shapes it names, its answer."""

    qtype: str
    key: str  # WORDINGS key
    about: tuple[int, ...]  # indices into scene.shapes
    slots: tuple[tuple[str, str], ...]  # wording placeholders
    answer: str
    value: str  # what the answer says, for balancing the test split


def asks_for(scene: Scene) -> list[Ask]:
    """Every question the picture answers well: "colour" only for a shape named by kind alone,
    "where" and "position" only away from the thresholds."""
    named = names(scene)
    n = len(scene.shapes)
    asks = [Ask("describe", "describe", (), (), describe(scene), str(n)),
            Ask("count", "count", (), (), count_answer(n), str(n))]
    for i, s in enumerate(scene.shapes):
        if named[i] == s.kind:
            asks.append(Ask("colour", "colour", (i,), (("name", named[i]),), f"The {named[i]} is {s.color}.", s.color))
    for i, s in enumerate(scene.shapes):
        cell = region(scene, s)
        if cell is not None:
            phrase = REGIONS[cell[0]][cell[1]]
            asks.append(Ask("where", "where", (i,), (("name", named[i]),), f"The {named[i]} is {phrase}.", phrase))
    for axis in ("x", "y"):
        for i, a in enumerate(scene.shapes):
            for j, b in enumerate(scene.shapes):
                rel = relation(scene, a, b, axis) if i != j else None
                if rel is not None:
                    asks.append(Ask("position", f"position_{axis}", (i, j), (("a", named[i]), ("b", named[j])),
                                    f"The {named[i]} is {rel} the {named[j]}.", rel.split()[0]))
    return asks


# Training-only questions (never in test.jsonl, never scored) that name two or three shapes and are
# answered with each one's value right after its name: "the circle red; the square blue". The test
# questions need a shape found by its name among several ("What colour is the circle?" -> "The
# circle is red.": at "is" the decoder must carry "circle" along and look it up): the previous
# model answered them right 94-100% with one shape in the picture and 6-68% with two to five. In
# the grid world (docs/shapes-world.md) this answer form taught the lookup at the name's own token
# within a few hundred steps, and the plain questions then reused it (colour 67% -> 100%).
HELPER_TYPES = ("colours", "places")
HELPER_WORDINGS = {
    "colours": ("What colours are {names}?", "Which colours do {names} have?", "Give the colours of {names}.",
                "Tell me the colours of {names}.", "Name the colours of {names}."),
    "places": ("Where are {names}?", "In which parts of the picture are {names}?", "Give the places of {names}.",
               "Tell me where {names} are.", "Say where {names} sit in the picture."),
}
# A region in an answer of its own kind: the REGIONS phrase without its preposition.
PLACES = tuple(tuple(phrase.split(" ", 2)[-1] for phrase in row) for row in REGIONS)
HELPER_SHARE = 0.5  # share of training pictures that get one helper line besides their conversations


def helper_line(rng: random.Random, scene: Scene, varied: bool = True) -> tuple[str, str, str] | None:
    """(helper type, question, answer) about two or three of the picture's shapes, in a random order,
    or None when it has too few that fit: "colours" names shapes named by kind alone (a name with a
    colour in it tells the answer), "places" shapes whose place `region` can tell."""
    named = names(scene)
    cells = [region(scene, s) for s in scene.shapes]
    options = {"colours": [i for i, s in enumerate(scene.shapes) if named[i] == s.kind],
               "places": [i for i, cell in enumerate(cells) if cell is not None]}
    types = [t for t in HELPER_TYPES if len(options[t]) >= 2]
    if not types:
        return None
    kind = rng.choice(types)
    chosen = rng.sample(options[kind], rng.randint(2, min(3, len(options[kind]))))
    template = rng.choice(HELPER_WORDINGS[kind])
    if varied and rng.random() < VARY_SHARE:
        template = vary(rng, template)
    text = template.format(names=_join([f"the {named[i]}" for i in chosen]))
    if kind == "colours":
        parts = [f"the {named[i]} {scene.shapes[i].color}" for i in chosen]
    else:
        parts = [f"the {named[i]} {PLACES[cells[i][0]][cells[i][1]]}" for i in chosen]
    return kind, text, "; ".join(parts)


class Known:
    """What a conversation's turns so far have told about one picture (see the module docstring)."""

    def __init__(self, scene: Scene):
        self.scene = scene
        self.count = False
        self.colours: set[int] = set()
        self.bins: dict[str, dict[int, int]] = {"x": {}, "y": {}}  # shape -> column (x) / row (y) of thirds
        self.before: dict[str, set[tuple[int, int]]] = {"x": set(), "y": set()}  # (i, j): i left of / above j

    def copy(self) -> "Known":
        other = Known(self.scene)
        other.count, other.colours = self.count, set(self.colours)
        other.bins = {k: dict(v) for k, v in self.bins.items()}
        other.before = {k: set(v) for k, v in self.before.items()}
        return other

    def answered(self, ask: Ask) -> bool:
        """Whether anything `ask`'s answer states is known already."""
        if ask.qtype == "describe":
            return self.count or bool(self.colours) or bool(self.before["x"])
        if ask.qtype == "count":
            return self.count
        if ask.qtype == "colour":
            return ask.about[0] in self.colours
        if ask.qtype == "where":
            return ask.about[0] in self.bins["x"] or ask.about[0] in self.bins["y"]
        i, j = ask.about
        return bool({(i, j), (j, i)} & self.before[ask.key[-1]])

    def tell(self, ask: Ask) -> None:
        """Add what `ask` (its question and its answer) states, and what follows from it."""
        shapes = self.scene.shapes
        named = names(self.scene)
        self.colours.update(i for i in ask.about if named[i] != shapes[i].kind)  # "the red circle"
        if ask.qtype in ("describe", "count"):
            self.count = True
        if ask.qtype == "describe":
            self.colours.update(range(len(shapes)))
            self.before["x"].update((i, j) for i, a in enumerate(shapes) for j, b in enumerate(shapes)
                                    if a.center[0] < b.center[0])
        elif ask.qtype == "colour":
            self.colours.add(ask.about[0])
        elif ask.qtype == "where":
            row, col = region(self.scene, shapes[ask.about[0]])
            self.bins["x"][ask.about[0]], self.bins["y"][ask.about[0]] = col, row
        elif ask.qtype == "position":
            i, j = ask.about
            first = ask.value in ("left", "above")
            self.before[ask.key[-1]].add((i, j) if first else (j, i))
        for axis in ("x", "y"):
            self._infer(self.bins[axis], self.before[axis])

    @staticmethod
    def _infer(bins: dict[int, int], before: set[tuple[int, int]]) -> None:
        """Close one axis under what a reader can work out; `before` is a strict order of centres."""
        changed = True
        while changed:
            size = (len(bins), len(before))
            before.update((i, k) for i, j in list(before) for j2, k in list(before) if j == j2)
            before.update((i, j) for i in bins for j in bins if bins[i] < bins[j])
            for i, j in list(before):  # ahead of a shape in the first third: in it too (last third alike)
                if bins.get(j) == 0:
                    bins.setdefault(i, 0)
                if bins.get(i) == 2:
                    bins.setdefault(j, 2)
            changed = size != (len(bins), len(before))


def _weighted_type(rng: random.Random, options: list[Ask]) -> str:
    types = sorted({a.qtype for a in options}, key=PICTURE_TYPES.index)
    return rng.choices(types, weights=[TRAIN_WEIGHTS[t] for t in types])[0]


def plan_turns(rng: random.Random, scene: Scene, asks: list[Ask], turns: int, first: str | None = None,
               last: Ask | None = None) -> list[Ask]:
    """Up to `turns` questions, each answering something not yet told; the first of type `first` if
    given. With `last`, the questions lead up to it: none of them may tell its answer, and it is appended."""
    known, plan = Known(scene), []
    for t in range(turns):
        options = [a for a in asks if not known.answered(a)]
        if last is not None:
            options = [a for a in options if a != last and not _told(known, a, last)]
        if t == 0 and first is not None:
            options = [a for a in options if a.qtype == first]
        if not options:
            break
        qtype = _weighted_type(rng, options)
        ask = rng.choice([a for a in options if a.qtype == qtype])
        plan.append(ask)
        known.tell(ask)
    return plan + ([last] if last is not None else [])


def _told(known: Known, ask: Ask, target: Ask) -> bool:
    """Whether asking `ask` now would tell (or let a reader work out) `target`'s answer."""
    after = known.copy()
    after.tell(ask)
    return after.answered(target)


# Surface variety for training questions. A decoder trained from scratch on nine wordings per type
# learns the wordings, not the words that matter: asked in a new one, it answered another type's
# question about a third of the time. Varying the words around the content (synonyms, a lead-in, a
# tail, case, punctuation) teaches it to read "how many", "colour", "where", "left or right".
VARY_SHARE = 0.6  # share of training questions that get varied
SYNONYMS = (("picture", "image", "photo", "scene", "drawing"), ("pictures", "images", "photos"),
            ("shapes", "objects", "figures", "items"), ("shape", "object", "figure", "item"),
            ("colour", "color", "shade"), ("move", "go"), ("moving", "going"), ("moves", "goes"),
            ("Describe", "Summarise", "Summarize"), ("Tell me", "Say", "Show me"))
LEAD_INS = ("Please tell me: ", "Quick question: ", "Look at it closely. ", "Now, ", "And ", "OK, ", "Next: ",
            "One more thing: ", "Hey, ", "I would like to know: ", "Question: ", "So, ", "Alright. ", "Well, ")
TAILS = (" Answer briefly.", " Thanks.", " Be precise.", " One sentence, please.", " Please answer.",
         " Keep it short.")
_SWAP = {word: group for group in SYNONYMS for word in group}
_WORD = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _SWAP), key=len, reverse=True)) + r")\b")


def vary(rng: random.Random, template: str) -> str:
    """`template` in other words around its content: synonyms, maybe a lead-in or a tail, case, punctuation.

    Works on the unformatted template, so a shape's name in `{name}` is never touched.
    """
    text = _WORD.sub(lambda m: rng.choice(_SWAP[m.group(1)]) if rng.random() < 0.5 else m.group(1), template)
    if rng.random() < 0.4:
        lead = rng.choice(LEAD_INS)
        text = lead + (text if lead.endswith(". ") or text.startswith("I ") else text[0].lower() + text[1:])
    if rng.random() < 0.2:
        text += rng.choice(TAILS)
    if rng.random() < 0.15:
        text = text.lower()
    if rng.random() < 0.15:
        text = text.rstrip("?.")
    return text


def question(rng: random.Random, ask: Ask, held_out: bool, varied: bool = False) -> str:
    """`ask` in one of its wordings: a held-out one (test only) or one of the others.

    `varied` (training only) words a share of them differently (see `vary`); a varied wording that
    happens to equal a held-out one is not used, so held-out wordings stay unseen in training.
    """
    options = WORDINGS[ask.key]
    options = options[-HELD_OUT:] if held_out else options[:-HELD_OUT]
    template = rng.choice(options)
    if varied and rng.random() < VARY_SHARE:
        other = vary(rng, template)
        if other not in WORDINGS[ask.key][-HELD_OUT:]:
            template = other
    return template.format(**dict(ask.slots))


class Balance:
    """Picks, among the values available now, the one picked least often so far."""

    def __init__(self):
        self.counts: Counter = Counter()

    def pick(self, rng: random.Random, available) -> str:
        available = sorted(set(available))
        low = min(self.counts[v] for v in available)
        choice = rng.choice([v for v in available if self.counts[v] == low])
        self.counts[choice] += 1
        return choice
