"""A progress line on stderr, rows done and rows per second, with no dependency: the runtime extra
(``romebert[runtime]``) has no tqdm, and a long batch job should still say how fast it goes."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``update(n)`` after each piece of work; ``close()`` prints the last line.

    On a terminal the line is redrawn in place (at most every ``every`` seconds); elsewhere (a log
    file, a batch scheduler's output) a new line is printed every ``log_every`` seconds, so a log does
    not fill up with redraws. ``enabled=False`` prints nothing.
    """

    def __init__(self, what: str, total: int | None = None, enabled: bool = True, stream: TextIO | None = None,
                 every: float = 0.5, log_every: float = 30.0, initial: int = 0) -> None:  # fmt: skip
        self.what, self.total, self.enabled, self.initial = what, total, enabled, initial
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if self.tty else log_every
        self.done = initial  # ``initial``: rows done before (a resumed run); not in the rate
        self.start = self.last = time.perf_counter()

    @property
    def rate(self) -> float:
        """Rows per second since the start."""
        return (self.done - self.initial) / max(time.perf_counter() - self.start, 1e-9)

    def line(self) -> str:
        of = f"/{self.total:,}" if self.total is not None else ""
        return f"{self.what}: {self.done:,}{of} rows, {self.rate:,.0f} rows/s"

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self._show()

    def close(self) -> None:
        if self.enabled:
            self._show()
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()

    def _show(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
