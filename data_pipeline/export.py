"""geno-preprocess export-megatron: a corpus split as Megatron .bin/.idx, by megatron-core's builder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from data_pipeline.corpus import Corpus
from data_pipeline.shard_format import SPLITS
from megatron_geno.files import write_files_atomic


def write_bin_idx(prefix: str | Path, documents: Iterable[np.ndarray]) -> None:
    """Writes uint8 documents as PREFIX.bin/.idx with megatron-core's builder, published
    atomically (unique temporary names, fsynced, the .idx renamed last)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    def write(temps: list[Path]) -> None:
        builder = IndexedDatasetBuilder(str(temps[0]), dtype=np.uint8)
        for doc in documents:
            builder.add_document(torch.from_numpy(doc), [len(doc)])
        builder.finalize(str(temps[1]))

    write_files_atomic([f"{prefix}.bin", f"{prefix}.idx"], write)


def export_megatron(corpus_dir: str | Path, prefix: str, show_progress=None) -> dict[str, str]:
    """Writes PREFIX_<split>.bin/.idx for each non-empty split; returns {split: prefix}.

    Documents keep their EOD token and their manifest order; dtype uint8 (vocabulary < 256).
    Files are written under temporary names and renamed when whole.
    """
    corpus = Corpus(corpus_dir)

    def documents(code: int, bar) -> Iterator[np.ndarray]:
        for _, part in corpus.parts():
            for i in np.flatnonzero(part.doc_split == code):
                doc = part.document(int(i))
                bar.update(len(doc))
                yield doc

    written = {}
    for code, split in enumerate(SPLITS):
        total = corpus.split_tokens(split)
        if not total:
            continue
        out = f"{prefix}_{split}"
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with tqdm(total=total, unit="tok", unit_scale=True, desc=f"export {split}",
                  disable=None if show_progress is None else not show_progress) as bar:
            write_bin_idx(out, documents(code, bar))
        written[split] = out
    return written
