"""Writing an assembly's documents into size-bounded parts of zarr v3 shard groups."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import zarr

from data_pipeline.shard_format import (CHUNK_TOKENS, CODECS, FORMAT_VERSION, SHARD_TOKENS,
                                        SPLITS, encode_shard)
from data_pipeline.token_reader import TokenReader
from megatron_geno.vocab import EOD


class PartWriter:
    """Appends tokens to one part group a shard file at a time; can roll back to an earlier length.

    zarr creates the group and the array metadata; shard files are encoded here, in zarr's own
    sharding format, because zarr-python's per-chunk async overhead made writing 5x slower than
    compressing. zarr reads the result like any array it wrote (tests/unit/test_preprocess.py).
    """

    def __init__(self, path: Path, chunk_tokens: int, shard_tokens: int, level: int,
                 codec: str = "dna2bit"):
        self.path = path
        self.group = zarr.open_group(str(path), mode="w", zarr_format=3)
        self.chunk_tokens, self.shard_tokens, self.level = chunk_tokens, shard_tokens, level
        self.tokens = self.group.create_array(
            "tokens", shape=(0,), dtype="uint8", chunks=(chunk_tokens,), shards=(shard_tokens,),
            fill_value=0, compressors=CODECS[codec][1](level))
        self.shard_dir = path / "tokens" / "c"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.codec, self.codec_name = CODECS[codec][0](level), codec
        self.buffer = np.empty(shard_tokens, dtype=np.uint8)
        self.fill = 0  # tokens in buffer, not yet written
        self.flushed = 0  # tokens in shard files (a multiple of shard_tokens until close)
        self.doc_offsets = [0]
        self.doc_contig: list[int] = []
        self.doc_source_start: list[int] = []
        self.doc_split: list[int] = []

    @property
    def length(self) -> int:
        return self.flushed + self.fill

    def append(self, ids: np.ndarray) -> None:
        start = 0
        while start < len(ids):
            take = min(len(ids) - start, self.shard_tokens - self.fill)
            self.buffer[self.fill:self.fill + take] = ids[start:start + take]
            self.fill += take
            start += take
            if self.fill == self.shard_tokens:
                self._flush()

    def truncate(self, length: int) -> None:
        """Drops tokens from `length` on, rereading at most one shard that was already written."""
        if length >= self.flushed:
            self.fill = length - self.flushed
            return
        aligned = length - length % self.shard_tokens
        first = aligned // self.shard_tokens
        reader = TokenReader.for_layout(self.path / "tokens", self.flushed, self.shard_tokens,
                                        self.chunk_tokens, self.codec_name)
        self.buffer[:length - aligned] = reader.read(aligned, length)
        reader.close()
        for s in range(first, self.flushed // self.shard_tokens):
            (self.shard_dir / str(s)).unlink()
        self.fill, self.flushed = length - aligned, aligned

    def _flush(self) -> None:
        if not self.fill:
            return
        shard = self.flushed // self.shard_tokens
        whole = -(-self.fill // self.chunk_tokens) * self.chunk_tokens
        self.buffer[self.fill:whole] = 0  # pad the last inner chunk in place, not in a copy
        data = encode_shard(self.buffer[:whole], self.chunk_tokens,
                            self.shard_tokens // self.chunk_tokens, self.codec)
        (self.shard_dir / str(shard)).write_bytes(data)
        self.flushed, self.fill = self.flushed + self.fill, 0

    def close(self) -> dict:
        """Writes the remaining tokens and the document arrays; returns the part's summary."""
        self._flush()
        self.tokens.resize((self.length,))  # metadata only: growing from 0 deletes no shard
        arrays = {
            "doc_offsets": np.asarray(self.doc_offsets, dtype=np.int64),
            "doc_contig": np.asarray(self.doc_contig, dtype=np.int32),
            "doc_source_start": np.asarray(self.doc_source_start, dtype=np.int64),
            "doc_split": np.asarray(self.doc_split, dtype=np.uint8),
        }
        for name, data in arrays.items():
            self.group.create_array(name, data=data, chunks=(max(len(data), 1),))
        split = arrays["doc_split"]
        lengths = np.diff(arrays["doc_offsets"])
        summary = {
            "name": self.path.name,
            "tokens": self.length,
            "documents": len(split),
            "split_tokens": {s: int(lengths[split == i].sum()) for i, s in enumerate(SPLITS)},
            "split_documents": {s: int((split == i).sum()) for i, s in enumerate(SPLITS)},
        }
        self.group.attrs.update({"format_version": FORMAT_VERSION, **summary})
        return summary


class AssemblyWriter:
    """The document sink of one assembly: documents go into parts of at most ~part_tokens tokens.

    A part is closed at a document boundary once it holds part_tokens; a single document larger
    than that gets a part of its own. Use set_contig() before each contig's documents.
    """

    def __init__(self, path: Path, part_tokens: int, chunk_tokens: int = CHUNK_TOKENS,
                 shard_tokens: int = SHARD_TOKENS, level: int = 1, codec: str = "dna2bit"):
        self.path = path
        self.codec = codec
        self.root = zarr.open_group(str(path), mode="w", zarr_format=3)
        self.part_tokens, self.chunk_tokens = part_tokens, chunk_tokens
        self.shard_tokens, self.level = shard_tokens, level
        self.part: Optional[PartWriter] = None
        self.parts: list[dict] = []
        self.contig, self.split = 0, 0
        self.doc_start = 0

    def set_contig(self, contig_index: int, split: int) -> None:
        self.contig, self.split = contig_index, split

    def start_document(self, source_start: int) -> None:
        if self.part is not None and self.part.length >= self.part_tokens:
            self._close_part()
        if self.part is None:
            self.part = PartWriter(self.path / f"part-{len(self.parts):05d}", self.chunk_tokens,
                                   self.shard_tokens, self.level, self.codec)
        self.doc_start = self.part.length
        self.part.doc_contig.append(self.contig)
        self.part.doc_source_start.append(source_start)
        self.part.doc_split.append(self.split)

    def extend(self, ids: np.ndarray) -> None:
        self.part.append(ids)

    def finish_document(self) -> None:
        self.part.append(np.array([EOD], dtype=np.uint8))
        self.part.doc_offsets.append(self.part.length)

    def discard_document(self) -> None:
        part = self.part
        part.truncate(self.doc_start)
        for column in (part.doc_contig, part.doc_source_start, part.doc_split):
            column.pop()

    def _close_part(self) -> None:
        part, self.part = self.part, None
        if len(part.doc_offsets) == 1:  # every document of the part was discarded
            shutil.rmtree(part.path)
            return
        self.parts.append(part.close())

    def close(self, attrs: dict) -> list[dict]:
        """Closes the last part and writes the assembly's attributes; returns the part summaries."""
        if self.part is not None:
            self._close_part()
        self.root.attrs.update({**attrs, "format_version": FORMAT_VERSION, "parts": self.parts})
        return self.parts
