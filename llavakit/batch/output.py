"""What a batch job writes: one JSON line per item, durable as it goes, and a progress line.

A record is

    {"id": "cats/01.jpg", "answer": "A cat.", "prompt_tokens": 590, "completion_tokens": 4,
     "finish_reason": "stop", "seconds": 0.41, "error": null}

and, for an item that failed, `answer`, `completion_tokens` and `finish_reason` are null and
`error` says why (`prompt_tokens` is kept when the prompt was built). Lines are written whole and
flushed one by one, so a killed job leaves every finished item on disk; `fsync` runs every few
seconds so a machine crash costs at most those seconds. `--resume` reads a file back with
`read_done`, which drops a last line cut short mid-write.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

from ..errors import LlavakitError
from ..progress import StatusLine, clock

# Output columns, in order; a Parquet output has exactly these (see ray_job.SCHEMA).
FIELDS = ("id", "answer", "prompt_tokens", "completion_tokens", "finish_reason", "seconds", "error")


class OutputError(LlavakitError):
    """The output of a batch job cannot be written, or exists and would be overwritten."""


def record(item_id: str, answer: str | None = None, prompt_tokens: int | None = None,
           completion_tokens: int | None = None, finish_reason: str | None = None,
           seconds: float = 0.0, error: str | None = None) -> dict[str, Any]:
    """One output record, with every field present and in FIELDS' order."""
    return {"id": item_id, "answer": answer, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "finish_reason": finish_reason, "seconds": round(seconds, 4), "error": error}


def dumps(rec: dict[str, Any]) -> str:
    """A record as one JSONL line (with its newline); answers with odd characters stay on one line."""
    return json.dumps(rec, ensure_ascii=False) + "\n"


class JsonlWriter:
    """Appends records to a JSONL file: each line flushed at once, fsync'd every `fsync_every_s` seconds."""

    def __init__(self, path: Path, fsync_every_s: float = 2.0):
        self.path = path
        self.fsync_every_s = fsync_every_s
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file: TextIO = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write the batch output {str(path)!r} ({e}).") from e
        self._synced = time.monotonic()

    def write(self, rec: dict[str, Any]) -> None:
        """Append one record; it is in the file (though maybe not yet on disk) when this returns."""
        self.write_line(dumps(rec))

    def write_line(self, line: str) -> None:
        """Append one already-serialized line (ending in a newline)."""
        self._file.write(line)  # one write per line: a kill leaves whole lines, or one cut-off last line
        self._file.flush()
        if time.monotonic() - self._synced >= self.fsync_every_s:
            self.sync()

    def sync(self) -> None:
        """Force what was written onto the disk."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_done(path: Path) -> set[str]:
    """The ids already in an output file, after repairing it for appending.

    A line cut short by a kill (no newline, or not JSON) is dropped: the file is truncated
    before it, so the item runs again and its new line is the only one. Lines without an id and
    repeated ids (possible only if the file was edited) are dropped by rewriting the file.
    """
    if not path.is_file():
        return set()
    done: set[str] = set()
    keep_until, clean, offset = 0, True, 0
    with open(path, "rb") as f:
        for raw in f:
            offset += len(raw)
            rid = _line_id(raw) if raw.endswith(b"\n") else None
            if rid is None or rid in done:
                clean = clean and not raw.endswith(b"\n")  # only a cut-off last line can be fixed by truncating
                continue
            done.add(rid)
            keep_until = offset
    if clean:
        if keep_until != offset:
            with open(path, "rb+") as f:
                f.truncate(keep_until)
        return done
    _rewrite_valid(path)
    return read_done(path)


def _line_id(raw: bytes) -> str | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    rid = rec.get("id") if isinstance(rec, dict) else None
    return rid if isinstance(rid, str) else None


def _rewrite_valid(path: Path) -> None:
    """Rewrite `path` keeping the first complete, valid line of each id (atomically, via a temporary file)."""
    seen: set[str] = set()
    tmp = path.with_name(path.name + ".repair")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for raw in src:
            rid = _line_id(raw) if raw.endswith(b"\n") else None
            if rid is not None and rid not in seen:
                seen.add(rid)
                dst.write(raw)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


def prepare_output(path: Path, resume: bool, overwrite: bool) -> set[str]:
    """Check the output path before a job starts; return the ids to skip (those already done when resuming)."""
    if resume and overwrite:
        raise OutputError("give --resume or --overwrite, not both.")
    if path.is_dir():
        raise OutputError(f"the batch output {str(path)!r} is a folder; give a file name such as out.jsonl.")
    if resume:
        return read_done(path)
    if path.exists() and path.stat().st_size > 0:
        if not overwrite:
            raise OutputError(f"{str(path)!r} already exists; pass --resume to continue that job, or --overwrite "
                              "to start over.")
        path.unlink()
    return set()


class Progress:
    """Batch progress on one status line (see llavakit.progress): items done, items/s, ETA, errors so far."""

    def __init__(self, total: int | None, skipped: int = 0, stream: TextIO | None = None, log_every_s: float = 10.0):
        self.total, self.skipped = total, skipped
        self.status = StatusLine(stream, log_every_s)
        self.done = self.errors = 0
        self.started = time.monotonic()

    def update(self, n: int = 1, errors: int = 0) -> None:
        """Count `n` finished items, `errors` of which failed."""
        self.done += n
        self.errors += errors
        if self.status.due():
            self.status.show(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        count = self.done + self.skipped
        text = f"[batch] {count}/{self.total}" if self.total is not None else f"[batch] {count}"
        if self.skipped:
            text += f" ({self.skipped} from before)"
        text += f"  {rate:.2f} items/s"
        if self.total is not None and rate > 0:
            text += f"  ETA {clock(max(self.total - count, 0) / rate)}"
        return text + f"  errors {self.errors}"

    def finish(self) -> None:
        """The final line, with the total time."""
        self.status.close(self.line() + f"  in {time.monotonic() - self.started:.1f} s")
