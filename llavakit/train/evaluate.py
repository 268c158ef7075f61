"""`llavakit eval`: accuracy of greedy answers on a held-out JSONL file, per question type and per tag.

Each record's conversation is cut before its last answer; the model answers greedily and the
answer is scored against that reference in one of two ways:

    exact   equal after normalisation (case, surrounding space, a final period)
    shapes  the same fact: scoring.answer_key(type, answer) == answer_key(type, reference), so that
            "In the upper-left corner." answers "The circle is in the top left."; describe answers
            also get their shape recall and precision (types the scorer does not know, and references
            it cannot parse, fall back to exact)

Records run through the engine in windows, so continuous batching keeps the cores busy. Results
are grouped into categories: each question type, and each tag a record carries ("size:small",
"jpeg", "multi-turn", ...: see docs/shapes-world.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..progress import StatusLine
from . import scoring
from .data import DataError, read_records
from .scoring import normalize_answer

SCORES = ("exact", "shapes")
# Rows a shapes report always shows, in this order, so that reports on different models and sets
# line up; other types and tags found in the data follow them.
TYPE_ROWS = scoring.QUESTION_TYPES
CONDITION_ROWS = ("size:small", "size:medium", "size:large", "aspect:wide", "jpeg", "paraphrase", "multi-turn")


@dataclass(frozen=True)
class Outcome:
    """One scored question. recall/precision: describe questions scored by shapes only, else None."""

    id: str
    type: str
    tags: tuple[str, ...]
    reference: str
    got: str
    right: bool
    recall: float | None
    precision: float | None
    exact_fallback: bool  # scored by exact match because the shapes scorer could not read the reference


@dataclass(frozen=True)
class Category:
    """Counts of one row of the report: a question type or a tag."""

    name: str
    kind: str  # "type" or "tag"
    correct: int
    total: int
    describe_total: int  # describe questions in this category scored by their shapes
    fully_right: int  # of those, how many named every shape and nothing else
    recall_sum: float
    precision_sum: float

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def as_dict(self) -> dict:
        """The JSON form: counts, accuracy (None when empty), and describe's numbers (None without any)."""
        d = self.describe_total
        return {"category": self.name, "kind": self.kind, "correct": self.correct, "total": self.total,
                "accuracy": self.accuracy, "describe_total": d,
                "fully_right": self.fully_right / d if d else None,
                "shape_recall": self.recall_sum / d if d else None,
                "shape_precision": self.precision_sum / d if d else None}


def _category(name: str, kind: str, items: list[Outcome]) -> Category:
    described = [o for o in items if o.recall is not None]
    return Category(name, kind, sum(o.right for o in items), len(items), len(described),
                    sum(o.right for o in described), sum(o.recall for o in described),
                    sum(o.precision for o in described))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


@dataclass
class EvalResult:
    """Per-type counts, every scored question, and every wrong answer for inspection."""

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    wrong: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    score: str = "exact"
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / max(1, sum(self.total.values()))

    def table(self) -> str:
        """A markdown table: type, correct/total, accuracy; the overall row last."""
        rows = ["| question type | correct | accuracy |", "| --- | --- | --- |"]
        for t in sorted(self.total):
            rows.append(f"| {t} | {self.correct.get(t, 0)}/{self.total[t]} | {100 * self.correct.get(t, 0) / self.total[t]:.1f}% |")
        n, c = sum(self.total.values()), sum(self.correct.values())
        rows.append(f"| **overall** | {c}/{n} | **{100 * self.accuracy:.1f}%** |")
        return "\n".join(rows)

    def categories(self) -> list[Category]:
        """One row per question type, then one per tag; a record counts once in its type and once per tag.

        With the shapes scorer the seven types and the spec's conditions (CONDITION_ROWS) are always
        listed, empty or not, so that reports line up; other types and tags follow, sorted.
        """
        types = sorted({o.type for o in self.outcomes})
        tags = sorted({t for o in self.outcomes for t in o.tags})
        if self.score == "shapes":
            types = list(TYPE_ROWS) + [t for t in types if t not in TYPE_ROWS]
            tags = list(CONDITION_ROWS) + [t for t in tags if t not in CONDITION_ROWS]
        rows = [_category(t, "type", [o for o in self.outcomes if o.type == t]) for t in types]
        rows += [_category(t, "tag", [o for o in self.outcomes if t in o.tags]) for t in tags]
        return rows

    def category_table(self) -> str:
        """A markdown table of categories(): correct/total and accuracy, and for rows holding describe
        questions the share fully right and the mean shape recall; the overall row last."""
        rows = ["| category | correct | accuracy | describe fully right | describe shape recall |",
                "| --- | --- | --- | --- | --- |"]
        for cat in self.categories() + [_category("**overall**", "all", self.outcomes)]:
            d = cat.as_dict()
            described = cat.describe_total > 0
            accuracy = _percent(cat.accuracy)
            if cat.kind == "all":
                accuracy = f"**{accuracy}**"
            rows.append(f"| {cat.name} | {cat.correct}/{cat.total} | {accuracy} | "
                        f"{_percent(d['fully_right']) if described else ''} | "
                        f"{_percent(d['shape_recall']) if described else ''} |")
        return "\n".join(rows)

    def to_json(self, wrong: int = 0) -> dict:
        """The report as JSON-ready data: the numbers of category_table(), and up to `wrong` wrong answers."""
        return {"score": self.score, "questions": len(self.outcomes), "seconds": round(self.seconds, 3),
                "overall": _category("overall", "all", self.outcomes).as_dict(),
                "categories": [c.as_dict() for c in self.categories()],
                "exact_fallback": sum(o.exact_fallback for o in self.outcomes),
                "wrong": self.wrong[:wrong]}


def score_answer(score: str, qtype: str, got: str, reference: str) -> tuple[str, bool, float | None,
                                                                             float | None, bool]:
    """(type, right, recall, precision, exact_fallback) of one answer under `score` (see SCORES).

    The type comes back under the scorer's name ("color" → "colour" with shapes). Shapes scoring falls
    back to exact match for a type the scorer does not know, or a reference it cannot parse.
    """
    exact = normalize_answer(got) == normalize_answer(reference)
    if score == "exact":
        return qtype, exact, None, None, False
    name = scoring.canonical_type(qtype)
    if name is None:
        return qtype, exact, None, None, False
    expected = scoring.answer_key(name, reference)
    if expected is None:
        return name, exact, None, None, True
    right = scoring.answer_key(name, got) == expected
    if name != "describe":
        return name, right, None, None, False
    recall, precision = scoring.describe_recall(got, reference)
    return name, right, recall, precision, False


def evaluate_file(vlm, data: Path, limit: int | None = None, window: int = 32, max_new_tokens: int = 48,
                  progress: bool = True, score: str = "exact") -> EvalResult:
    """Answer every record of `data` greedily and score it (see the module docstring).

    vlm: what `llavakit.load` returns; its `generate` runs the engine. Training code never imports the
    engine (DESIGN.md, "Never": Train → Engine), so the engine's sampling parameters are made by the VLM.
    score: "exact" or "shapes" (SCORES). Raises ValueError for another score, DataError for a bad record.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}.")
    items = []
    for rec in read_records(Path(data)):
        if isinstance(rec, DataError):
            raise rec
        msgs = rec.messages
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        content = msgs[last]["content"]
        reference = content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content if p.get("type") == "text")
        items.append((rec.type or "all", msgs[:last], reference, rec.id, rec.tags))
        if limit and len(items) >= limit:
            break
    result = EvalResult(score=score)
    params = vlm.sampling_params(max_new_tokens=max_new_tokens, temperature=0.0)
    start = time.perf_counter()
    status = StatusLine() if progress else None
    for i in range(0, len(items), window):
        chunk = items[i:i + window]
        outs = vlm.generate([prompt for _, prompt, _, _, _ in chunk], params)
        for (qtype, _, reference, rid, tags), out in zip(chunk, outs):
            qtype, ok, recall, precision, fallback = score_answer(score, qtype, out.text, reference)
            result.outcomes.append(Outcome(rid, qtype, tags, reference, out.text, ok, recall, precision, fallback))
            result.total[qtype] = result.total.get(qtype, 0) + 1
            result.correct[qtype] = result.correct.get(qtype, 0) + ok
            if not ok:
                wrong = {"id": rid, "type": qtype, "expected": reference, "got": out.text}
                if tags:
                    wrong["tags"] = list(tags)
                result.wrong.append(wrong)
        if status is not None:
            done = min(i + window, len(items))
            text = (f"[{done}/{len(items)}] accuracy {100 * result.accuracy:.1f}% | "
                    f"{done / (time.perf_counter() - start):.1f} questions/s")
            status.update(text, last=done == len(items))
    result.seconds = time.perf_counter() - start
    return result
