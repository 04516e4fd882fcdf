"""Progress for long work: a tqdm bar on a terminal; elsewhere (a SLURM or CI log) a plain line
every 30 seconds and one at the end, instead of carriage-return bar updates."""

from __future__ import annotations

import sys
import time


def progress(iterable=None, total=None, desc: str = "", unit: str = "it", every: float = 30.0,
             **tqdm_options):
    """tqdm(iterable, total=..., desc=...) on a terminal (stderr), a PlainProgress elsewhere."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, **tqdm_options)
    return PlainProgress(iterable, total, desc, unit, every)


class PlainProgress:
    """The part of tqdm's interface this project uses (iterate, update, close, context manager),
    printing ``desc: n/total unit (p%), s s`` at most every `every` seconds, and at close."""

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it",
                 every: float = 30.0) -> None:
        self.iterable, self.desc, self.unit, self.every = iterable, desc, unit, every
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, 0
        self.started = self.last = time.monotonic()
        self.closed, self.said = False, None

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._say(now)

    def set_postfix_str(self, text: str) -> None:  # tqdm's; the plain line has no postfix
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.said != self.n:  # the end, unless the last line already said it
                self._say(time.monotonic())

    def _say(self, now: float) -> None:
        self.said = self.n
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        of = f"/{self.total:,}" if self.total else ""
        print(f"{self.desc}: {self.n:,}{of} {self.unit}{share}, {now - self.started:.0f} s",
              file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
