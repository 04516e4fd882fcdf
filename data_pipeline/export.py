"""geno-preprocess export-megatron: a corpus split as Megatron .bin/.idx, by megatron-core's builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.corpus import Corpus
from data_pipeline.shard_format import SPLITS
from megatron_geno.files import write_files_atomic


def export_megatron(corpus_dir: str | Path, prefix: str, show_progress=None) -> dict[str, str]:
    """Writes PREFIX_<split>.bin/.idx for each non-empty split; returns {split: prefix}.

    Documents keep their EOD token and their manifest order; dtype uint8 (vocabulary < 256).
    Files are written under temporary names and renamed when whole.
    """
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    corpus = Corpus(corpus_dir)
    written = {}
    for code, split in enumerate(SPLITS):
        total = corpus.split_tokens(split)
        if not total:
            continue
        out = f"{prefix}_{split}"
        Path(out).parent.mkdir(parents=True, exist_ok=True)

        def write(temps: list[Path], code: int = code, split: str = split,
                  total: int = total) -> None:
            builder = IndexedDatasetBuilder(str(temps[0]), dtype=np.uint8)
            with tqdm(total=total, unit="tok", unit_scale=True, desc=f"export {split}",
                      disable=None if show_progress is None else not show_progress) as bar:
                for _, part in corpus.parts():
                    for i in np.flatnonzero(part.doc_split == code):
                        doc = part.document(int(i))
                        builder.add_document(torch.from_numpy(doc), [len(doc)])
                        bar.update(len(doc))
            builder.finalize(str(temps[1]))

        write_files_atomic([out + ".bin", out + ".idx"], write)
        written[split] = out
    return written
