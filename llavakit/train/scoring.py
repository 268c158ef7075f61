"""Scoring free-form answers about the shapes world: an answer → a key that two phrasings share.

`answer_key(qtype, text)` reads the one fact a question type asks for out of a sentence, so that
"The circle is in the top left.", "top-left corner" and "It sits in the upper left part of the
image" all give "top left", and an answer is right when its key equals the reference's:

    describe  "A red circle and two blue squares."     -> (("blue", "square"), ("blue", "square"), ("red", "circle"))
    count     "There are three shapes." / "3"           -> 3
    colour    "The circle is red."                      -> "red"
    position  "The circle is left of the square."       -> "left"      (left, right, above, below)
    where     "in the top left" / "upper-left corner"   -> "top left"  (REGIONS)
    compare   "The first picture has more shapes."      -> "first"
    motion    "It moves to the left." / "leftwards"     -> "left"      (left, right, up, down)

A key is None when the text names no such fact, or names several different ones ("left or right"):
an answer that hedges is never right. Case, punctuation, "colour"/"color", "grey"/"gray" and
"centre"/"center" do not matter. Torch-free and pure; the world itself is in docs/shapes-world.md.
"""

from __future__ import annotations

import re
from collections import Counter

SHAPE_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
# Colour words a wrong answer may use: they parse (and so count as wrong, or as a second colour)
# instead of being ignored, which would let "a gray circle" pass as "a circle".
OTHER_COLOURS = ("gray", "white", "black", "pink", "brown", "beige", "cyan", "magenta", "violet", "navy",
                 "gold", "silver", "teal", "turquoise", "maroon", "indigo", "lime")
COLOURS = SHAPE_COLOURS + OTHER_COLOURS
KINDS = ("circle", "square", "triangle")
REGIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
QUESTION_TYPES = ("describe", "count", "colour", "position", "where", "compare", "motion")

NUMBERS = {"no": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
           "eight": 8, "nine": 9, "ten": 10, "single": 1}
_KIND_WORD = {**{k: (k, False) for k in KINDS}, **{k + "s": (k, True) for k in KINDS}}
# Words that may stand between a number and a shape without changing what is counted.
_FILLER = {"small", "large", "big", "tiny", "little", "medium", "sized", "solid", "filled", "flat", "bright", "light",
           "dark", "pale", "deep", "colored", "shaped", "single", "lone", "only", "just", "exactly", "of", "the",
           "more"}
_OBJECT_WORDS = {"shape", "shapes", "object", "objects", "item", "items", "thing", "things", "figure", "figures",
                 "form", "forms", "element", "elements"}
_COUNT_SKIP = _FILLER | set(COLOURS)  # "three small red shapes" counts three
# A conclusion ("...; so left") is the answer, whatever the reasoning before it named.
_CONCLUSION = re.compile(r"\b(?:so|therefore|thus|hence|answer is|answer)\b")


def normalize_answer(text: str) -> str:
    """Exact scoring's comparison: lower case, no surrounding whitespace, no final period."""
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def normalize(text: str) -> str:
    """Lower case, British/American and gray/grey spellings merged, punctuation and hyphens → spaces."""
    text = text.lower()
    text = re.sub(r"\bcolour", "color", text)
    text = re.sub(r"\bgrey(ish)?\b", "gray", text)
    text = re.sub(r"\bcent(?:er|re|ral|red|ered)\b", "centre", text)
    text = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1 \2", text)  # "1st" -> "1 st"
    text = re.sub(r"[^a-z0-9]+", " ", text)
    return " ".join(text.split())


def _words(text: str) -> list[str]:
    return normalize(text).split()


def _number(word: str) -> int | None:
    if word.isdigit():
        return int(word)
    return NUMBERS.get(word)


# -- describe ----------------------------------------------------------------------------------------
def _shapes(words: list[str]) -> list[tuple[str, str]]:
    """Every (colour, kind) named, repeated as often as counted; a kind without a colour gets ""."""
    found: list[tuple[str, str]] = []
    for i, w in enumerate(words):
        if w not in _KIND_WORD:
            continue
        kind, plural = _KIND_WORD[w]
        colours: list[str] = []
        count = None
        j = i - 1
        # Walk back over "red and blue", fillers and articles to the number that counts this shape.
        while j >= 0 and words[j] not in _KIND_WORD:
            word = words[j]
            if word in COLOURS:
                colours.append(word)
            elif word in ("a", "an") or _number(word) is not None:
                count = 1 if word in ("a", "an") else _number(word)
                break
            elif word not in _FILLER and word not in ("and", "or", "plus"):
                break
            j -= 1
        colours.reverse()
        if count == 0:
            continue  # "no red circle": named, but not there
        if len(colours) > 1:
            # "red and blue circles": one of each colour.
            found += [(c, kind) for c in colours]
            continue
        colour = colours[0] if colours else ""
        if count is None:
            count = 2 if plural else 1  # a bare plural is at least two
        found += [(colour, kind)] * count
    return found


def _describe(words: list[str]) -> tuple[tuple[str, str], ...] | None:
    found = _shapes(words)
    return tuple(sorted(found)) if found else None


def describe_recall(got: str, reference: str) -> tuple[float, float]:
    """(recall, precision) of the shapes `got` names against `reference`'s, as multisets of (colour, kind).

    Recall: the share of the reference's shapes the answer names; precision: the share of the
    answer's shapes that are in the reference. An answer naming no shape gives (0.0, 0.0).
    Raises ValueError when the reference names no shape (it cannot be a describe answer).
    """
    ref = _shapes(_words(reference))
    if not ref:
        raise ValueError(f"the reference {reference!r} names no shape; is it a describe answer?")
    mine = _shapes(_words(got))
    if not mine:
        return 0.0, 0.0
    hit = sum((Counter(mine) & Counter(ref)).values())
    return hit / len(ref), hit / len(mine)


# -- count ------------------------------------------------------------------------------------------
def _count(words: list[str]) -> int | None:
    if any(_number(a) is not None and _number(b) is not None and mid in ("or", "to")
           for a, mid, b in zip(words, words[1:], words[2:])):
        return None  # "two or three shapes", "3 to 4"
    attached: set[int] = set()
    for i, w in enumerate(words):
        if w not in _OBJECT_WORDS:
            continue
        j = i - 1
        while j >= 0 and words[j] in _COUNT_SKIP and _number(words[j]) is None:
            j -= 1
        if j >= 0:
            if _number(words[j]) is not None:
                attached.add(_number(words[j]))
            elif words[j] in ("a", "an") and w in ("shape", "object", "item", "thing", "figure", "form", "element"):
                attached.add(1)
    if attached:
        return attached.pop() if len(attached) == 1 else None
    # "3", "Three.", "I count 4": a single number anywhere. "no"/"single" only count next to a noun.
    numbers = {_number(w) for w in words if _number(w) is not None and w not in ("no", "single")}
    return numbers.pop() if len(numbers) == 1 else None


# -- colour ------------------------------------------------------------------------------------------
def _colour(words: list[str]) -> str | None:
    named = [(i, w) for i, w in enumerate(words) if w in COLOURS]
    # "on a white background" speaks of the background, not the shape asked about.
    named = [(i, w) for i, w in named if not (i + 1 < len(words) and words[i + 1] in ("background", "backdrop"))]
    # A colour inside a shape's name ("the red circle is blue") names the shape, unless it is the only one.
    free = {w for i, w in named if not (i + 1 < len(words) and words[i + 1] in _KIND_WORD)}
    colours = free or {w for _, w in named}
    return colours.pop() if len(colours) == 1 else None


# -- position, where, motion, compare ---------------------------------------------------------------
_RELATION = {"left": "left", "leftwards": "left", "leftward": "left", "right": "right", "rightwards": "right",
             "rightward": "right", "above": "above", "over": "above", "higher": "above", "atop": "above",
             "up": "above", "below": "below", "under": "below", "beneath": "below", "underneath": "below",
             "lower": "below", "down": "below"}


def _relation(words: list[str]) -> str | None:
    text = " ".join(words)
    text = re.sub(r"\bon top of\b", "above", text)
    found = {_RELATION[w] for w in text.split() if w in _RELATION}
    return found.pop() if len(found) == 1 else None


_ROW = {"top": "top", "upper": "top", "uppermost": "top", "topmost": "top", "bottom": "bottom", "lower": "bottom",
        "bottommost": "bottom", "lowest": "bottom"}
_COLUMN = {"left": "left", "leftmost": "left", "lefthand": "left", "right": "right", "rightmost": "right",
           "righthand": "right"}
_MIDDLE = {"centre", "middle", "mid"}


def _where(words: list[str]) -> str | None:
    rows = {_ROW[w] for w in words if w in _ROW}
    columns = {_COLUMN[w] for w in words if w in _COLUMN}
    middle = any(w in _MIDDLE for w in words)
    if len(rows) > 1 or len(columns) > 1:
        return None  # "top left and bottom right": two places
    if not rows and not columns:
        return "centre" if middle else None
    # "top centre" is the top; "centre left" is the left: the middle word only fills the other axis.
    return " ".join(sorted(rows) + sorted(columns))


_DIRECTION = {"left": "left", "leftwards": "left", "leftward": "left", "westward": "left", "west": "left",
              "right": "right", "rightwards": "right", "rightward": "right", "eastward": "right", "east": "right",
              "up": "up", "upward": "up", "upwards": "up", "top": "up", "upper": "up", "rises": "up", "rising": "up",
              "ascends": "up", "climbs": "up", "north": "up", "northward": "up",
              "down": "down", "downward": "down", "downwards": "down", "bottom": "down", "lower": "down",
              "falls": "down", "falling": "down", "drops": "down", "sinks": "down", "descends": "down",
              "south": "down", "southward": "down"}


def _motion(words: list[str]) -> str | None:
    text = " ".join(words)
    # "from left to right", "right to left": the end of the path is the direction.
    text = re.sub(r"\b(?:from )?(?:the )?(\w+) (?:side )?to (?:the )?(\w+)\b",
                  lambda m: m.group(2) if m.group(1) in _DIRECTION and m.group(2) in _DIRECTION else m.group(0), text)
    found = {_DIRECTION[w] for w in text.split() if w in _DIRECTION}
    return found.pop() if len(found) == 1 else None


_ORDINAL = {"first": "first", "1": "first", "one": "first", "former": "first", "left": "first",
            "second": "second", "2": "second", "two": "second", "latter": "second", "right": "second"}


def _compare(words: list[str]) -> str | None:
    text = " ".join(words)
    # "picture one", "image 2" name a picture; bare "one"/"two"/"left" do not.
    text = re.sub(r"\b(?:picture|image|photo|frame|pic) (one|two|1|2)\b", lambda m: _ORDINAL[m.group(1)], text)
    text = re.sub(r"\b(left|right) (?:picture|image|photo|one)\b", lambda m: _ORDINAL[m.group(1)], text)
    text = re.sub(r"\b(\d) st\b|\b(\d) nd\b", lambda m: _ORDINAL[m.group(1) or m.group(2)], text)
    # "more shapes than the first": the picture after "than" is the one with fewer.
    text = re.sub(r"\bthan (?:in )?(?:the )?(?:first|second|former|latter)\b", " ", text)
    found = {w for w in text.split() if w in ("first", "second", "former", "latter")}
    found = {_ORDINAL[w] for w in found}
    if len(found) != 1:
        return None
    pick = found.pop()
    fewer = re.search(r"\b(?:fewer|less|lower)\b", text) and not re.search(r"\bmore\b", text)
    return ("second" if pick == "first" else "first") if fewer else pick


_PARSERS = {"describe": _describe, "count": _count, "colour": _colour, "position": _relation, "where": _where,
            "compare": _compare, "motion": _motion}
# Spellings of the type names the shapes world's older files use.
_ALIASES = {"color": "colour"}


def canonical_type(qtype: str) -> str | None:
    """The scorer's name for a question type ("color" → "colour"), or None when it does not score it."""
    qtype = _ALIASES.get(qtype, qtype)
    return qtype if qtype in _PARSERS else None


def answer_key(qtype: str, text: str):
    """The fact `text` states for a question of type `qtype` (see the module docstring), or None.

    Raises ValueError for a type the scorer does not know (QUESTION_TYPES, and "color").
    """
    name = canonical_type(qtype)
    if name is None:
        raise ValueError(f"no scorer for question type {qtype!r}; expected one of {', '.join(QUESTION_TYPES)}.")
    parse = _PARSERS[name]
    words = _words(text)
    if name not in ("describe", "count"):
        # "the circle left; the square middle; so left": the part after the last "so" decides.
        marks = list(_CONCLUSION.finditer(" ".join(words)))
        if marks:
            tail = parse(" ".join(words)[marks[-1].end():].split())
            if tail is not None:
                return tail
    return parse(words)


def is_right(qtype: str, got: str, reference: str) -> bool:
    """Whether `got` states the reference's fact: its key is not None and equals the reference's."""
    key = answer_key(qtype, got)
    return key is not None and key == answer_key(qtype, reference)
