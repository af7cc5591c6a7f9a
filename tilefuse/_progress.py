"""Progress reporting for the command line tools (``tilefuse autotune``, ``tilefuse bench``).

On a terminal: a tqdm bar when tqdm is installed. Anywhere else (CI logs, ``> file``, pipes):
plain lines, the first step, then at most one every ``PLAIN_INTERVAL_S`` seconds, and the last,
so a log never fills with carriage-return redraws.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Optional

PLAIN_INTERVAL_S = 10.0


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _tqdm(total, desc, unit):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, unit=unit)


class Progress:
    """``update(i)`` reports ``i`` of ``total`` steps done; ``close()`` ends the bar.

    ``plain=None`` picks by stderr: a bar on a terminal, plain lines otherwise."""

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "it",
                 plain: Optional[bool] = None, interval_s: float = PLAIN_INTERVAL_S):
        self.desc, self.total, self.unit, self.interval_s = desc, total, unit, interval_s
        use_bar = is_terminal() if plain is None else not plain
        self.bar = _tqdm(total, desc, unit) if use_bar else None  # no tqdm: plain lines
        self.n, self._last, self._shown, self.closed = 0, None, None, False

    def _line(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}", file=sys.stderr, flush=True)
        self._last, self._shown = time.monotonic(), self.n

    def update(self, i: int) -> None:
        if self.closed:
            return
        self.n = i
        if self.bar is not None:
            self.bar.update(i - self.bar.n)
        elif self._last is None or time.monotonic() - self._last >= self.interval_s:
            self._line()
        if self.total is not None and i >= self.total:
            self.close()

    def close(self) -> None:
        """End the bar; in plain mode print the final count unless it was the last line."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self._shown != self.n:
            self._line()


def callback(desc: str, unit: str = "it", plain: Optional[bool] = None
             ) -> Callable[[int, int], None]:
    """A ``cb(i, total)`` progress callback (the total is learned on the first call)."""
    state = {}

    def cb(i: int, total: int) -> None:
        p = state.get("p")
        if p is None:
            p = state["p"] = Progress(desc, total, unit, plain)
        p.update(i)
    return cb


def iterate(iterable: Iterable, desc: str, total: Optional[int] = None, unit: str = "it",
            plain: Optional[bool] = None):
    """Yield from ``iterable`` while reporting progress."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    p = Progress(desc, total, unit, plain)
    try:
        p.update(0)
        for i, item in enumerate(iterable, 1):
            yield item
            p.update(i)
    finally:
        p.close()
