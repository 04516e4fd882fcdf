"""The token store's on-disk format: zarr v3 shard groups, their codecs and shard files.

Written by data_pipeline.shard_writer, read by data_pipeline.token_reader.

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
from pathlib import Path
from typing import Optional

import google_crc32c
import numcodecs
import numpy as np
import zarr
import zarr.codecs

from data_pipeline import dna2bit
from data_pipeline.errors import ShardError

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
CHUNK_TOKENS = 1 << 14  # a random window decodes one or two chunks: small chunks keep it cheap
SHARD_TOKENS = 1 << 26
EMPTY = np.uint64(2**64 - 1)



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
    index = np.full((per_shard, 2), EMPTY, dtype="<u8")
    index[:len(pieces), 0] = np.cumsum(sizes) - sizes
    index[:len(pieces), 1] = sizes
    raw_index = index.tobytes()
    return b"".join(pieces) + raw_index + np.uint32(google_crc32c.value(raw_index)).astype("<u4").tobytes()


def fast_layout(meta: dict) -> Optional[tuple[int, int, int, str]]:
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
