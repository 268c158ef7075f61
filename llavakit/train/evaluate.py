"""`llavakit eval`: exact-match accuracy of greedy answers on a held-out JSONL file, per question type.

Each record's conversation is cut before its last answer; the model answers greedily and the
answer counts when it equals the reference after normalisation (case, surrounding space, a final
period). Records run through the engine in windows, so continuous batching keeps the cores busy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..progress import StatusLine
from .data import DataError, read_records


def normalize_answer(text: str) -> str:
    """Lower case, no surrounding whitespace, no final period."""
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


@dataclass
class EvalResult:
    """Per-type counts, and every wrong answer for inspection."""

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    wrong: list[dict] = field(default_factory=list)
    seconds: float = 0.0

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


def evaluate_file(vlm, data: Path, limit: int | None = None, window: int = 32, max_new_tokens: int = 48,
                  progress: bool = True) -> EvalResult:
    """Answer every record of `data` greedily and score it (see the module docstring).

    vlm: what `llavakit.load` returns; its `generate` runs the engine. Training code never imports the
    engine (DESIGN.md, "Never": Train → Engine), so the engine's sampling parameters are made by the VLM.
    """
    items = []
    for rec in read_records(Path(data)):
        if isinstance(rec, DataError):
            raise rec
        msgs = rec.messages
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        content = msgs[last]["content"]
        reference = content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content if p.get("type") == "text")
        items.append((rec.type or "all", msgs[:last], reference, rec.id))
        if limit and len(items) >= limit:
            break
    result = EvalResult()
    params = vlm.sampling_params(max_new_tokens=max_new_tokens, temperature=0.0)
    start = time.perf_counter()
    status = StatusLine() if progress else None
    for i in range(0, len(items), window):
        chunk = items[i:i + window]
        outs = vlm.generate([prompt for _, prompt, _, _ in chunk], params)
        for (qtype, _, reference, rid), out in zip(chunk, outs):
            ok = normalize_answer(out.text) == normalize_answer(reference)
            result.total[qtype] = result.total.get(qtype, 0) + 1
            result.correct[qtype] = result.correct.get(qtype, 0) + ok
            if not ok:
                result.wrong.append({"id": rid, "type": qtype, "expected": reference, "got": out.text})
        if status is not None:
            done = min(i + window, len(items))
            text = (f"[{done}/{len(items)}] accuracy {100 * result.accuracy:.1f}% | "
                    f"{done / (time.perf_counter() - start):.1f} questions/s")
            status.update(text, last=done == len(items))
    result.seconds = time.perf_counter() - start
    return result
