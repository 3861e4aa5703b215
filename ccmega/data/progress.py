"""A one-line progress report on stderr: docs/s, tokens/s, MB/s and ETA; a new line every few seconds
when stderr is not a terminal (logs), an in-place update when it is."""
from __future__ import annotations

import sys
import time


def _rate(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, label: str, stream=None, enabled: bool = True):
        self.label, self.stream, self.enabled = label, stream or sys.stderr, enabled
        self.tty = self.stream.isatty()
        self.start = self._last = time.monotonic()
        self.docs = self.tokens = self.bytes = 0

    def update(self, docs: int = 0, tokens: int = 0, nbytes: int = 0, fraction: float | None = None) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self._last >= (0.5 if self.tty else 5.0):
            self._last = now
            self._print(self.line(fraction), end="\r" if self.tty else "\n")

    def line(self, fraction: float | None = None) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        eta = "?"
        if fraction:
            eta = format_seconds(elapsed * (1 - fraction) / fraction)
        done = f" {100 * fraction:5.1f}%" if fraction is not None else ""
        return (f"{self.label}:{done} {self.docs} docs {_rate(self.docs / elapsed)} docs/s "
                f"{_rate(self.tokens / elapsed)} tokens/s {self.bytes / elapsed / 1e6:.1f} MB/s ETA {eta}")

    def close(self) -> None:
        if self.enabled and self.tty:
            self._print(self.line(1.0), end="\n")

    def _print(self, text: str, end: str) -> None:
        print(text.ljust(100) if self.tty else text, end=end, file=self.stream, flush=True)
