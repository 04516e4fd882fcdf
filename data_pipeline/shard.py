"""Zarr v3 shard groups: writing an assembly's documents in size-bounded parts, and reading them fast.

An assembly is one zarr group (directory ``shards/<assembly>``) with attributes and parts
``part-00000``, ``part-00001``, ... Each part is a zarr group holding:

- ``tokens``      uint8 [n]: documents back to back, each followed by EOD; compressed inner
                  chunks (16 Ki tokens; dna2bit, zstd or blosc-zstd with bit shuffling) inside
                  shard files (64 Mi tokens), so a random window costs one small read and one
                  small decode.
- ``doc_offsets`` int64 [d + 1]: document i is tokens[doc_offsets[i]:doc_offsets[i + 1]] (EOD last).
- ``doc_contig``  int32 [d]: index into the assembly's ``contigs`` attribute.
- ``doc_source_start`` int64 [d]: 0-based position of the document's first base in its contig.
- ``doc_split``   uint8 [d]: 0 train, 1 valid, 2 test.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import google_crc32c
import numcodecs
import numpy as np
import zarr
import zarr.codecs

from data_pipeline import dna2bit
from megatron_geno.vocab import EOD

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
CHUNK_TOKENS = 1 << 14  # a random window decodes one or two chunks: small chunks keep it cheap
SHARD_TOKENS = 1 << 26
_EMPTY = np.uint64(2**64 - 1)


class ShardError(ValueError):
    """A damaged or missing shard file; the message names the file (and chunk)."""


class _Numcodec:
    """A numcodecs codec as a shard encoder: one call per inner chunk."""

    def __init__(self, codec):
        self.codec = codec

    def encode_chunks(self, data: np.ndarray, chunk: int) -> list[bytes]:
        return [self.codec.encode(data[k:k + chunk]) for k in range(0, len(data), chunk)]

    def decode(self, buf, out: np.ndarray) -> None:
        self.codec.decode(buf, out=out)


class _DNA2Bit:
    """dna2bit as a shard encoder: the whole shard in a few numpy passes."""

    encode_chunks = staticmethod(dna2bit.encode_chunks)
    decode = staticmethod(dna2bit.decode)


# --codec: (shard encoder / chunk decoder for a level, the same codec in zarr's metadata).
# dna2bit: 2 bits per base plus runs (~0.25 bytes/base; fastest both ways; zarr reads it where this
# package is installed); zstd: ~0.3 bytes/base, readable by any zarr v3 reader; blosc: bit-shuffled
# zstd, ~0.47 bytes/base, faster to write than zstd.
CODECS = {
    "dna2bit": (lambda level: _DNA2Bit(), lambda level: dna2bit.DNA2BitCodec()),
    "zstd": (lambda level: _Numcodec(numcodecs.Zstd(level=level)),
             lambda level: zarr.codecs.ZstdCodec(level=level)),
    "blosc": (lambda level: _Numcodec(numcodecs.Blosc(cname="zstd", clevel=level,
                                                      shuffle=numcodecs.Blosc.BITSHUFFLE)),
              lambda level: zarr.codecs.BloscCodec(cname="zstd", clevel=level,
                                                   shuffle="bitshuffle", typesize=1)),
}
# --codec name -> the codec's name in zarr's metadata
ZARR_NAMES = {name: to_zarr(1).to_dict()["name"] for name, (_, to_zarr) in CODECS.items()}
# codec name in zarr's metadata -> chunk decoder (the level does not matter for decoding)
DECODERS = {ZARR_NAMES[name]: (lambda make=make: make(1)) for name, (make, _) in CODECS.items()}


def encode_shard(data: np.ndarray, chunk_tokens: int, per_shard: int, codec) -> bytes:
    """Returns one shard file in zarr v3's sharding_indexed format (inner codecs bytes + codec,
    index [offset, nbytes] uint64 little-endian at the end, then its crc32c).

    `data` holds whole inner chunks: zarr stores them whole, the last one padded with the fill
    value (PartWriter pads its buffer in place)."""
    if len(data) % chunk_tokens:
        raise ValueError(f"{len(data)} tokens are not whole chunks of {chunk_tokens}")
    pieces = codec.encode_chunks(np.ascontiguousarray(data), chunk_tokens)
    sizes = np.array([len(p) for p in pieces], dtype="<u8")
    index = np.full((per_shard, 2), _EMPTY, dtype="<u8")
    index[:len(pieces), 0] = np.cumsum(sizes) - sizes
    index[:len(pieces), 1] = sizes
    raw_index = index.tobytes()
    return b"".join(pieces) + raw_index + np.uint32(google_crc32c.value(raw_index)).astype("<u4").tobytes()


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


def _fast_layout(meta: dict) -> Optional[tuple[int, int, int, str]]:
    """Returns (shard, chunk, fill, codec) when `meta` is a layout PartWriter writes, else None."""
    try:
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        index = [c["name"] for c in conf["index_codecs"]]
        if (codec["name"] != "sharding_indexed" or inner[:1] != ["bytes"] or len(inner) != 2
                or inner[1] not in DECODERS
                or index != ["bytes", "crc32c"] or conf["index_location"] != "end"
                or meta["data_type"] != "uint8"
                or meta["chunk_key_encoding"]["configuration"]["separator"] != "/"):
            return None
        return (meta["chunk_grid"]["configuration"]["chunk_shape"][0], conf["chunk_shape"][0],
                int(meta["fill_value"]), inner[1])
    except (KeyError, TypeError, ValueError):
        return None


class TokenReader:
    """Reads token ranges of a part: direct shard-index reads for our layout, zarr otherwise.

    zarr-python spends ~1 ms per small read on its async machinery; a random 8K window here is one
    pread of a ~20 KB compressed chunk and one decode.
    """

    def __init__(self, array_dir: Path, meta: Optional[dict] = None):
        self.dir = array_dir
        meta = meta or json.loads((array_dir / "zarr.json").read_text())
        self.size = int(meta["shape"][0])
        self.layout = _fast_layout(meta)
        self._array = None if self.layout else zarr.open_array(str(array_dir), mode="r")
        self._indices: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}
        self._decoder = DECODERS[self.layout[3]]() if self.layout else None
        self._cached = (-1, None)

    @classmethod
    def for_layout(cls, array_dir: Path, size: int, shard_tokens: int, chunk_tokens: int,
                   codec: str):
        """A reader of shard files PartWriter is still writing (metadata not final yet)."""
        meta = {"shape": [size], "data_type": "uint8", "fill_value": 0,
                "chunk_grid": {"configuration": {"chunk_shape": [shard_tokens]}},
                "chunk_key_encoding": {"configuration": {"separator": "/"}},
                "codecs": [{"name": "sharding_indexed", "configuration": {
                    "chunk_shape": [chunk_tokens],
                    "codecs": [{"name": "bytes"}, {"name": ZARR_NAMES[codec]}],
                    "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}],
                    "index_location": "end"}}]}
        return cls(array_dir, meta)

    def __len__(self) -> int:
        return self.size

    def read(self, start: int, stop: int) -> np.ndarray:
        """Returns tokens[start:stop] as a uint8 array."""
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"{self.dir}: range [{start}, {stop}) outside [0, {self.size})")
        if self._array is not None:
            return self._array[start:stop]
        shard, chunk = self.layout[:2]
        first, last = start // chunk, (stop - 1) // chunk
        if stop == start:
            return np.empty(0, dtype=np.uint8)
        if first == last:
            base = first * chunk
            return self._chunk(first, shard, chunk)[start - base:stop - base].copy()
        out = np.empty(stop - start, dtype=np.uint8)
        for c in range(first, last + 1):
            data = self._chunk(c, shard, chunk)
            lo, hi = max(start, c * chunk), min(stop, c * chunk + len(data))
            out[lo - start:hi - start] = data[lo - c * chunk:hi - c * chunk]
        return out

    def _chunk(self, c: int, shard: int, chunk: int) -> np.ndarray:
        if self._cached[0] == c:
            return self._cached[1]
        per_shard = shard // chunk
        s, local = divmod(c, per_shard)
        fd = self._fds.get(s)
        if fd is None:
            if len(self._fds) >= 16:
                self.close()
            try:
                fd = self._fds[s] = os.open(self.dir / "c" / str(s), os.O_RDONLY)
            except OSError as err:
                raise ShardError(f"{self.dir / 'c' / str(s)}: cannot open ({err.strerror})") from None
        index = self._indices.get(s)
        if index is None:
            index = self._indices[s] = self._read_index(fd, s, per_shard)
        offset, nbytes = index[local]
        if offset == _EMPTY:
            data = np.full(min(chunk, self.size - c * chunk), self.layout[2], dtype=np.uint8)
        else:
            data = np.empty(chunk, dtype=np.uint8)
            raw = os.pread(fd, int(nbytes), int(offset))
            try:
                if len(raw) != int(nbytes):
                    raise ValueError(f"{len(raw)} of {int(nbytes)} bytes")
                self._decoder.decode(raw, out=data)
            except Exception as err:  # each codec raises its own type on damaged bytes
                raise ShardError(f"{self.dir / 'c' / str(s)}: chunk {local} is damaged "
                                 f"({type(err).__name__}: {str(err)[:120]})") from None
        self._cached = (c, data)
        return data

    def _read_index(self, fd: int, s: int, per_shard: int) -> np.ndarray:
        """The shard file's chunk index, checked: its crc32c and every chunk inside the file."""
        path = self.dir / "c" / str(s)
        nbytes = per_shard * 16 + 4
        end = os.fstat(fd).st_size
        if end < nbytes:
            raise ShardError(f"{path}: {end} bytes, shorter than its own index (truncated)")
        raw = os.pread(fd, nbytes, end - nbytes)
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise ShardError(f"{path}: the chunk index fails its crc32c (damaged or truncated)")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
        used = index[:, 0] != _EMPTY
        if np.any(index[used, 0] + index[used, 1] > end - nbytes):
            raise ShardError(f"{path}: the chunk index points past the data (truncated?)")
        return index

    def check(self) -> None:
        """Reads and checks every shard file's index (ShardError on damage); no chunk decoded."""
        if self._array is not None:
            return
        shard, chunk = self.layout[:2]
        for s in range(-(-self.size // shard)):
            try:
                fd = os.open(self.dir / "c" / str(s), os.O_RDONLY)
            except OSError as err:
                raise ShardError(f"{self.dir / 'c' / str(s)}: cannot open ({err.strerror})") from None
            try:
                self._read_index(fd, s, shard // chunk)
            finally:
                os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Part:
    """A written part: its document arrays (loaded) and a TokenReader."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            group = zarr.open_group(str(self.path), mode="r")
            self.doc_offsets = group["doc_offsets"][:]
            self.doc_contig = group["doc_contig"][:]
            self.doc_source_start = group["doc_source_start"][:]
            self.doc_split = group["doc_split"][:]
            self.tokens = TokenReader(self.path / "tokens")
        except ShardError:
            raise
        except Exception as err:  # zarr's errors on missing or damaged files vary
            raise ShardError(f"{self.path}: damaged or incomplete part ({type(err).__name__}: "
                             f"{str(err)[:160]})") from None

    def document(self, i: int) -> np.ndarray:
        return self.tokens.read(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))


def read_attrs(path: Path) -> dict:
    """Returns a zarr group's attributes (plain JSON read; no zarr machinery).

    ShardError naming the file when it is missing or damaged.
    """
    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
    except FileNotFoundError:
        raise ShardError(f"{meta} is missing") from None
    except (OSError, ValueError, AttributeError) as err:
        raise ShardError(f"{meta} is damaged ({type(err).__name__}: {str(err)[:120]})") from None
    if not isinstance(attrs, dict):
        raise ShardError(f"{meta} is damaged (attributes are not a mapping)")
    return attrs
