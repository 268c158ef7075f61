"""One status line for long jobs (training, evaluation, batch): shared by every command that reports progress.

On a terminal the line is redrawn in place (carriage return) at most a few times a second; into a
file or pipe a plain line is written every `log_every_s` seconds, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    """A duration as H:MM:SS."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StatusLine:
    """Writes the caller's status text; the caller decides what the text says."""

    def __init__(self, stream: TextIO | None = None, log_every_s: float = 10.0):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.2 if self.tty else log_every_s
        self._shown = time.monotonic()

    def due(self) -> bool:
        """Whether a new status would be shown now (lets callers skip building the text)."""
        return time.monotonic() - self._shown >= self.every

    def show(self, text: str, force: bool = False) -> None:
        """Show `text` if it is time to (or `force`)."""
        if not (force or self.due()):
            return
        self._shown = time.monotonic()
        self.stream.write("\r" + text + "\x1b[K" if self.tty else text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own, below the status line."""
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()

    def update(self, text: str, last: bool) -> None:
        """`close(text)` for the last status of a job, else `show(text)`."""
        if last:
            self.close(text)
        else:
            self.show(text)

    def close(self, text: str) -> None:
        """The final status, always shown, and the end of the line."""
        self.stream.write(("\r" + text + "\x1b[K" if self.tty else text) + "\n")
        self.stream.flush()
