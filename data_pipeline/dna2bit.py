"""dna2bit: the token chunk codec of the store, after UCSC's .2bit layout.

A chunk of token ids is stored as A/C/G/T at 2 bits per base plus two lists of runs: the runs of
soft-masked a/c/g/t (kept only with ``soft_mask="keep"``) and the runs of any other id (N, n, EOD,
padding, tags), each with its value. Genomes are almost all A/C/G/T, so a chunk costs 0.25 bytes
per token plus a few runs, less than zstd gets (~0.31), and both directions are table lookups and
shifts (no entropy coder), several times faster than zstd at level 1.

Encoded chunk (all little-endian)::

    magic b"G2B1" | n u32 | m u32 | k u32
    mask_start u32[m] | mask_end u32[m]                    soft-masked runs [start, end)
    other_start u32[k] | other_length u32[k] | other_value u8[k]
    packed u8[ceil(n / 4)]                                 base i in bits 2*(i % 4) of byte i // 4

``encode_chunks`` encodes a whole shard buffer at once (numpy over 64 Mi tokens, one Python step
per chunk); ``decode`` is the per-chunk reader. ``DNA2BitCodec`` is the same codec for zarr v3
(name ``megatron_geno.dna2bit``, registered on import and through the ``zarr.codecs`` entry point),
so ``zarr.open_array`` reads these shards wherever this package is installed.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.registry import register_codec

from megatron_geno.vocab import VOCAB

NAME = "megatron_geno.dna2bit"
MAGIC = b"G2B1"
_HEADER = struct.Struct("<4sIII")
_UPPER = [VOCAB.index(b) for b in "ACGT"]
_LOWER = [VOCAB.index(b) for b in "acgt"]
_CASE_SHIFT = _LOWER[0] - _UPPER[0]  # a = A + 5, ..., t = T + 5
# the word arithmetic of _codes_and_flags is written for these ids (the vocabulary never renumbers)
assert _UPPER == [5, 6, 7, 8] and _LOWER == [10, 11, 12, 13] and len(VOCAB) <= 128

# id -> run key: 0 upper A/C/G/T (no run), 1 soft-masked, 0x80 | id any other id
_KEY = np.array([0x80 | i for i in range(128)] * 2, dtype=np.uint8)
for _up, _lo in zip(_UPPER, _LOWER):
    _KEY[_up], _KEY[_lo] = 0, 1
# packed byte -> its 4 upper-case ids, as one little-endian uint32 (a lookup yields 4 tokens)
_UNPACK = np.array([[_UPPER[(b >> (2 * i)) & 3] for i in range(4)] for b in range(256)],
                   dtype=np.uint8).view("<u4").ravel()


class CodecError(ValueError):
    pass


_BLOCK = 1 << 22  # tokens encoded per numpy pass: bounds temporaries to a few times this


def _bytes(value: int) -> np.uint64:
    return np.uint64(int.from_bytes(bytes([value]) * 8, "little"))


_B = {v: _bytes(v) for v in (0x01, 0x03, 0x76, 0x77, 0x7B, 0x80)}
_S = {v: np.uint64(v) for v in (6, 7, 12)}


def _codes_and_flags(words: np.ndarray, codes: np.ndarray, flags: np.ndarray) -> None:
    """Per byte of uint64 words of ids (all < 128, so no byte carries into the next), writes the
    2-bit code into `codes` and sets bit 7 of `flags` where the id is not upper-case A/C/G/T (it
    belongs to a run). In place on preallocated words: fresh temporaries cost page faults."""
    np.add(words, _B[0x76], out=flags)  # bit 7: id >= 10 (a/c/g/t are A/C/G/T + 5)
    flags >>= _S[7]
    flags &= _B[0x01]
    flags *= np.uint64(3)
    np.add(words, _B[0x03], out=codes)  # A..T = 5..8 -> 0..3 (mod 4); a..t need 3 more
    codes += flags
    codes &= _B[0x03]
    np.add(words, _B[0x7B], out=flags)  # bit 7 clear: id < 5
    np.invert(flags, out=flags)
    scratch = np.add(words, _B[0x77])  # bit 7 set: id > 8
    flags |= scratch
    flags &= _B[0x80]


def pack(codes: np.ndarray) -> np.ndarray:
    """Packs uint64 words of 2-bit codes (one per byte) 4 per byte: base i in bits 2*(i % 4)."""
    codes |= codes >> _S[6]  # byte j: code j | code j+1 << 2
    codes |= codes >> _S[12]  # bytes 0 and 4 of each word: 4 codes each
    return codes.view(np.uint8).reshape(-1, 8)[:, ::4].ravel()


def _runs(data: np.ndarray, flags: np.ndarray, chunk: int):
    """Returns (start, end, key) of the runs of equal nonzero key, split at chunk boundaries."""
    words = np.flatnonzero(flags)
    if not len(words):
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.uint8)
    pos = (words[:, None] * 8 + np.arange(8)).ravel()
    keys = _KEY[data[pos]]
    pos, keys = pos[keys != 0], keys[keys != 0]
    new = np.ones(len(pos), dtype=bool)
    new[1:] = (pos[1:] != pos[:-1] + 1) | (keys[1:] != keys[:-1]) | (pos[1:] % chunk == 0)
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(pos)) - 1
    return pos[first], pos[last] + 1, keys[first]


def encode_chunks(data: np.ndarray, chunk: int) -> list[bytes]:
    """Encodes uint8 ids, a whole number of chunks of `chunk` tokens (a multiple of 8), per chunk."""
    if len(data) % chunk or chunk % 8:
        raise CodecError(f"dna2bit: {len(data)} tokens are not whole chunks of {chunk} (a multiple of 8)")
    if len(data) and data.max() >= 128:  # the word arithmetic needs every byte below 128
        raise CodecError(f"dna2bit: id {int(data.max())} is outside the 128-id vocabulary")
    out: list[bytes] = []
    step = max(chunk, _BLOCK - _BLOCK % chunk)
    codes = np.empty(min(step, len(data)) // 8, dtype=np.uint64)
    flags = np.empty_like(codes)
    for at in range(0, len(data), step):
        block = data[at:at + step]
        n = len(block) // 8
        _codes_and_flags(np.ascontiguousarray(block).view("<u8"), codes[:n], flags[:n])
        out.extend(_encode_block(block, chunk, codes[:n], flags[:n]))
    return out


def _encode_block(data: np.ndarray, chunk: int, codes: np.ndarray, flags: np.ndarray) -> list[bytes]:
    packed = pack(codes)
    starts, ends, keys = _runs(data, flags, chunk)
    bounds = np.searchsorted(starts // chunk, np.arange(len(data) // chunk + 1))
    is_mask = keys == 1
    out = []
    for c in range(len(data) // chunk):
        lo, hi = bounds[c], bounds[c + 1]
        body = packed[c * (chunk // 4):(c + 1) * (chunk // 4)]
        if lo == hi:
            out.append(_HEADER.pack(MAGIC, chunk, 0, 0) + body.tobytes())
            continue
        s, e, k, m = starts[lo:hi] - c * chunk, ends[lo:hi] - c * chunk, keys[lo:hi], is_mask[lo:hi]
        out.append(b"".join([
            _HEADER.pack(MAGIC, chunk, int(m.sum()), int((~m).sum())),
            s[m].astype("<u4").tobytes(), e[m].astype("<u4").tobytes(),
            s[~m].astype("<u4").tobytes(), (e[~m] - s[~m]).astype("<u4").tobytes(),
            (k[~m] & 0x7F).astype(np.uint8).tobytes(), body.tobytes(),
        ]))
    return out


def encode(data: np.ndarray) -> bytes:
    """Encodes one chunk of any length."""
    data = np.ascontiguousarray(data, dtype=np.uint8).ravel()
    n = len(data)
    if n == 0:
        return _HEADER.pack(MAGIC, 0, 0, 0)
    # pad with upper-case A (code 0, no run) to whole words; runs never reach into the padding
    padded = np.full(-(-n // 8) * 8, _UPPER[0], dtype=np.uint8)
    padded[:n] = data
    (buf,) = encode_chunks(padded, len(padded))
    extra = len(padded) // 4 - -(-n // 4)
    return _HEADER.pack(MAGIC, n, *_HEADER.unpack_from(buf)[2:]) + buf[_HEADER.size:len(buf) - extra]


def _sections(buf, m: int, k: int):
    at = _HEADER.size
    view = np.frombuffer(buf, dtype=np.uint8)
    need = at + 8 * m + 9 * k
    if len(view) < need:
        raise CodecError(f"dna2bit: chunk of {len(view)} bytes is shorter than its header says ({need})")
    words = view[at:at + 8 * m + 8 * k].view("<u4").astype(np.int64)
    starts, ends = words[:m], words[m:2 * m]
    ostart, olen = words[2 * m:2 * m + k], words[2 * m + k:]
    return starts, ends, ostart, olen, view[need - k:need], view[need:]


def decode(buf, out: np.ndarray | None = None) -> np.ndarray:
    """Decodes one chunk into `out` (uint8, at least n long) or a new array; returns it."""
    if len(buf) < _HEADER.size:
        raise CodecError(f"dna2bit: chunk of {len(buf)} bytes has no header")
    magic, n, m, k = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise CodecError(f"dna2bit: bad magic {magic!r} (not a dna2bit chunk)")
    starts, ends, ostart, olen, oval, packed = _sections(buf, m, k)
    if len(packed) != -(-n // 4) or (m and (ends.max() > n or (starts >= ends).any())) or (
            k and (ostart + olen).max() > n):
        raise CodecError(f"dna2bit: chunk of {n} tokens is inconsistent with its {len(buf)} bytes")
    if out is None:
        out = np.empty(n, dtype=np.uint8)
    out = out[:n]
    words = _UNPACK[packed].view(np.uint8)
    out[:] = words[:n]
    if m + k > 64:  # many runs: scatter them at once
        if m:
            index, _ = _expand(starts, ends - starts)
            out[index] += _CASE_SHIFT
        if k:
            index, which = _expand(ostart, olen)
            out[index] = oval[which]
    else:
        for s, e in zip(starts.tolist(), ends.tolist()):
            out[s:e] += _CASE_SHIFT
        for s, length, v in zip(ostart.tolist(), olen.tolist(), oval.tolist()):
            out[s:s + length] = v
    return out


def _expand(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every position covered by the runs, and the run each belongs to."""
    which = np.repeat(np.arange(len(starts)), lengths)
    first = np.cumsum(lengths) - lengths
    return starts[which] + np.arange(len(which)) - first[which], which


@dataclass(frozen=True)
class DNA2BitCodec(BytesBytesCodec):
    """dna2bit as a zarr v3 bytes -> bytes codec (for uint8 token arrays)."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data):
        name = data.get("name") if isinstance(data, dict) else data
        if name != NAME or (isinstance(data, dict) and data.get("configuration")):
            raise ValueError(f"expected the codec {NAME!r} without configuration, got {data!r}")
        return cls()

    def to_dict(self):
        return {"name": NAME}

    # zarr's public Buffer methods only: as_numpy_array() in, prototype.buffer.from_bytes() out
    def _decode_sync(self, chunk_bytes, chunk_spec):
        return chunk_spec.prototype.buffer.from_bytes(decode(chunk_bytes.as_numpy_array()).tobytes())

    async def _decode_single(self, chunk_bytes, chunk_spec):
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_bytes, chunk_spec):
        return chunk_spec.prototype.buffer.from_bytes(bytes(encode(chunk_bytes.as_numpy_array())))

    async def _encode_single(self, chunk_bytes, chunk_spec):
        return await asyncio.to_thread(self._encode_sync, chunk_bytes, chunk_spec)

    def compute_encoded_size(self, _input_byte_length, _chunk_spec):
        raise NotImplementedError


register_codec(NAME, DNA2BitCodec)
