"""Reading token ranges of a written part fast (training, verify, export, geno-eval)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import google_crc32c
import numpy as np
import zarr

from data_pipeline.errors import ShardError
from data_pipeline.shard_format import DECODERS, EMPTY, ZARR_NAMES, fast_layout


class TokenReader:
    """Reads token ranges of a part: direct shard-index reads for our layout, zarr otherwise.

    zarr-python spends ~1.5 ms per random 8K window on its async machinery (60x this reader;
    benchmarks/loader_throughput.py); a random 8K window here is one pread of a compressed
    chunk or two and one decode each.
    """

    def __init__(self, array_dir: Path, meta: Optional[dict] = None):
        self.dir = array_dir
        meta = meta or json.loads((array_dir / "zarr.json").read_text())
        self.size = int(meta["shape"][0])
        self.layout = fast_layout(meta)
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
        if offset == EMPTY:
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
        used = index[:, 0] != EMPTY
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
