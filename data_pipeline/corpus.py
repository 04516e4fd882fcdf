"""Reading a finished corpus: its parts, per-split document views for training, a stats table."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.corpus_manifest import is_complete, read_manifest_json
from data_pipeline.errors import PipelineError
from data_pipeline.shard_format import SPLITS, read_attrs
from data_pipeline.token_reader import Part


class Corpus:
    """A corpus directory with manifest.json; parts open lazily.

    An incomplete corpus (an assembly failed or not written yet) is refused unless
    incomplete_ok, which `stats` uses to show what is there and what is missing.
    """

    def __init__(self, path: str | Path, incomplete_ok: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest_json(self.path, incomplete_ok)

    @property
    def complete(self) -> bool:
        return is_complete(self.manifest)

    @property
    def assemblies(self) -> list[dict]:
        return self.manifest["assemblies"]

    def parts(self) -> Iterator[tuple[dict, Part]]:
        """Yields (assembly entry, Part) in manifest order."""
        for entry in self.assemblies:
            for part in entry["parts"]:
                yield entry, Part(self.path / entry["path"] / part["name"])

    def split_tokens(self, split: str) -> int:
        return self.manifest["totals"]["split_tokens"][split]


class CorpusSplit:
    """One split of a corpus as megatron-core's low-level dataset (the IndexedDataset interface).

    Document i is the i-th document of the split in manifest order, EOD included; GPTDataset
    reads `sequence_lengths`, `document_indices` and `get(i, offset, length)`.
    """

    def __init__(self, corpus: str | Path, split: str):
        if split not in SPLITS:
            raise PipelineError(f"split must be one of {SPLITS}, got {split!r}")
        self.corpus = Corpus(corpus)
        self.split = split
        self.path_prefix = f"{self.corpus.path}::{split}"
        readers, lengths, starts, owners = [], [], [], []
        code = SPLITS.index(split)
        for _, part in self.corpus.parts():
            selected = np.flatnonzero(part.doc_split == code)
            if not len(selected):
                continue
            offsets = part.doc_offsets
            lengths.append((offsets[selected + 1] - offsets[selected]).astype(np.int32))
            starts.append(offsets[selected])
            owners.append(np.full(len(selected), len(readers), dtype=np.int32))
            readers.append(part.tokens)
        self.readers = readers
        self.sequence_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.owner = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        self.document_indices = np.arange(len(self.sequence_lengths) + 1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Returns tokens [offset, offset + length) of document idx."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        start = int(self.starts[idx]) + offset
        return self.readers[self.owner[idx]].read(start, start + length)

    @cached_property
    def content_hash(self) -> str:
        return self.corpus.manifest["content_hash"]


def stats_table(corpus: Corpus) -> str:
    """Returns a fixed-width table: one row per assembly, then the totals."""
    head = (f"{'assembly':<24} {'species':<16} {'hap':<4} {'tokens':>14} {'docs':>8} "
            f"{'valid':>12} {'test':>12} {'N%':>6} {'lower%':>7} {'GC%':>6} {'contigs':>8} "
            f"{'max contig':>12}")
    rows = [head, "-" * len(head)]
    total_bases = total_n = total_lower = total_gc = total_acgt = 0
    for entry in corpus.assemblies:
        s = entry["stats"]
        split = {k: sum(p["split_tokens"][k] for p in entry["parts"]) for k in SPLITS}
        attrs_lengths = _contig_lengths(corpus, entry)
        tokens = sum(p["tokens"] for p in entry["parts"])  # EOD included, as in the totals
        docs = sum(p["documents"] for p in entry["parts"])
        rows.append(
            f"{entry['assembly']:<24.24} {entry['species']:<16.16} {entry['haplotype']:<4.4} "
            f"{tokens:>14,d} {docs:>8,d} {split['valid']:>12,d} "
            f"{split['test']:>12,d} {100 * s['n_fraction']:>6.2f} {100 * s['lower_fraction']:>7.2f} "
            f"{100 * s['gc_fraction']:>6.2f} {len(attrs_lengths):>8,d} "
            f"{max(attrs_lengths, default=0):>12,d}")
        total_bases += s["bases"]
        total_n += s["n_fraction"] * s["bases"]
        total_lower += s["lower_fraction"] * s["bases"]
        acgt = s["bases"] - s["n_fraction"] * s["bases"]
        total_gc += s["gc_fraction"] * acgt
        total_acgt += acgt
    t = corpus.manifest["totals"]
    rows.append("-" * len(head))
    rows.append(
        f"{'total (' + str(len(corpus.assemblies)) + ' assemblies)':<46} {t['tokens']:>14,d} "
        f"{t['documents']:>8,d} {t['split_tokens']['valid']:>12,d} {t['split_tokens']['test']:>12,d} "
        f"{100 * total_n / max(total_bases, 1):>6.2f} {100 * total_lower / max(total_bases, 1):>7.2f} "
        f"{100 * total_gc / max(total_acgt, 1):>6.2f}")
    rows.append("tokens, valid, test: tokens written (one EOD per document included); N% and "
                "lower%: of the source bases (every base of the FASTA, dropped pieces too); GC%: "
                "of the source's A, C, G, T")
    if not corpus.complete:  # what is missing, each with why
        rows.append("")
        rows.extend(f"{f['assembly']:<24} FAILED: {f['message']}"
                    for f in corpus.manifest.get("failed", []))
        rows.extend(f"{name:<24} not written yet" for name in corpus.manifest.get("unwritten", []))
    return "\n".join(rows)


def _contig_lengths(corpus: Corpus, entry: dict) -> list[int]:
    return read_attrs(corpus.path / entry["path"]).get("contig_lengths", [])
