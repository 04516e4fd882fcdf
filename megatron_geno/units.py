"""Sizes written by people: '5GB', '500M', '2GiB', '1G', '4Mbp', '1e9'. One parser for every CLI."""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(ki|mi|gi|ti|k|m|g|t)?(?:b|bp)?\s*$",
                   re.IGNORECASE)


def parse_size(text: str) -> int:
    """Returns the count a size means: K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024; a
    trailing B (bytes) or bp (bases) is allowed. ValueError for anything else."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size like 5GB, 500M, 2GiB or 1e9")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def format_bytes(count: float) -> str:
    """A byte count for people: '512 B', '7.3 MiB', '15.2 GiB' (powers of 1024)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
