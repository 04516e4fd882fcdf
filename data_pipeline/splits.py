"""Deterministic, leak-aware train/valid/test assignment of assemblies and contigs."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from data_pipeline.manifest import Assembly, SPLIT_NAMES


class SplitError(ValueError):
    """An invalid split option; the message names it."""


def stable_unit(*parts: object) -> float:
    """Returns a number in [0, 1) from a SHA-256 of the parts: the same on every machine and run."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class SplitRules:
    """Hold-out rules, applied in order: the manifest's split column, samples, contig names.

    - A manifest split names the whole assembly's split.
    - sample_fractions hold out whole samples (both haplotypes) by a seeded hash of the sample id.
    - contig_patterns hold out contigs whose name matches a regex in every assembly (e.g. chr20),
      so a held-out chromosome leaks from no haplotype into training.
    """

    contig_patterns: tuple[tuple[str, str], ...] = ()  # (split, regex)
    sample_fractions: tuple[tuple[str, float], ...] = ()  # (split, fraction)
    seed: int = 0

    def __post_init__(self):
        for split, pattern in self.contig_patterns:
            if split not in SPLIT_NAMES[1:]:
                raise SplitError(f"--holdout-contigs: split must be valid or test, got {split!r}")
            try:
                re.compile(pattern)
            except re.error as err:
                raise SplitError(f"--holdout-contigs: bad regex {pattern!r} ({err})") from None
        total = 0.0
        for split, fraction in self.sample_fractions:
            if split not in SPLIT_NAMES[1:]:
                raise SplitError(f"--holdout-samples: split must be valid or test, got {split!r}")
            if not 0.0 <= fraction <= 1.0:
                raise SplitError(f"--holdout-samples: fraction {fraction} not in [0, 1]")
            total += fraction
        if total > 1.0:
            raise SplitError(f"--holdout-samples: fractions sum to {total} > 1")

    def to_dict(self) -> dict:
        return {"contig_patterns": [list(p) for p in self.contig_patterns],
                "sample_fractions": [list(f) for f in self.sample_fractions], "seed": self.seed}

    def assembly_split(self, assembly: Assembly) -> int | None:
        """Returns the split index of the whole assembly, or None when contigs decide."""
        if assembly.split:
            return SPLIT_NAMES.index(assembly.split)
        if self.sample_fractions:
            u, edge = stable_unit("sample", self.seed, assembly.sample), 0.0
            for split, fraction in self.sample_fractions:
                edge += fraction
                if u < edge:
                    return SPLIT_NAMES.index(split)
        return None

    def contig_split(self, name: str) -> int:
        for split, pattern in self.contig_patterns:
            if re.search(pattern, name):
                return SPLIT_NAMES.index(split)
        return 0


def parse_pairs(values: list[str], option: str, convert=str) -> tuple:
    """Returns ((split, value), ...) from ["valid=chr20", ...]; names the option on error."""
    pairs = []
    for text in values:
        split, sep, value = text.partition("=")
        if not sep or not value:
            raise SplitError(f"{option}: expected split=value, got {text!r}")
        try:
            pairs.append((split, convert(value)))
        except ValueError:
            raise SplitError(f"{option}: bad value in {text!r}") from None
    return tuple(pairs)
