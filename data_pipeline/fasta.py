"""Streaming FASTA reading: plain, gzip/bgzip, xz and bz2, in bounded chunks, with an md5 of the file."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

try:  # isal's igzip decompresses gzip/bgzip about twice as fast as zlib
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    _gzip = gzip

CHUNK_SIZE = 4 << 20
MAX_HEADER = 1 << 20


class FastaError(ValueError):
    """Bad input: the message names the file, and the line or record at fault."""


@dataclass
class Header:
    name: str  # up to the first whitespace
    offset: int  # byte offset of '>' in the decompressed stream


@dataclass
class Sequence:
    data: bytes  # sequence bytes, newlines included
    offset: int  # byte offset of data[0] in the decompressed stream


class HashingReader(io.RawIOBase):
    """A raw file wrapper that feeds every byte read into an md5 and counts them."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.md5 = hashlib.md5()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            view = memoryview(buffer)[:n]
            self.md5.update(view)
            self.bytes_read += n
        return n or 0

    def close(self) -> None:
        self.raw.close()
        super().close()


def compression_of(path: Path) -> str:
    """Returns 'gzip' (also bgzip), 'xz', 'bz2' or 'plain' from the file's magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"\xfd7zXZ\x00":
        return "xz"
    if magic[:3] == b"BZh":
        return "bz2"
    return "plain"


def open_decompressed(path: Path, hashing: HashingReader) -> BinaryIO:
    """Returns a stream of the decompressed bytes of path, reading through `hashing`."""
    kind = compression_of(path)
    buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
    if kind == "gzip":
        return _gzip.GzipFile(fileobj=buffered, mode="rb")
    if kind == "xz":
        return lzma.LZMAFile(buffered)
    if kind == "bz2":
        return bz2.BZ2File(buffered)
    return buffered


UTF8_BOM = b"\xef\xbb\xbf"


def read_chunks(path: Path, hashing: HashingReader, chunk_size: int) -> Iterator[bytes]:
    """Yields decompressed chunks; a truncated or corrupt archive is a FastaError."""
    stream = open_decompressed(path, hashing)
    try:
        while True:
            try:
                chunk = stream.read(chunk_size)
            except Exception as err:  # zlib / isal / lzma / bz2 errors, EOFError, OSError
                raise FastaError(f"{path}: corrupt or truncated {compression_of(path)} file "
                                 f"({err})") from None
            if not chunk:
                return
            yield chunk
    finally:
        stream.close()


def open_source(path: Union[str, Path]) -> HashingReader:
    """Opens a FASTA file for read_fasta; its md5 and byte count fill in as it is read."""
    try:
        return HashingReader(open(path, "rb"))
    except OSError as err:
        raise FastaError(f"{path}: cannot read ({err.strerror})") from None


def read_fasta(path: Union[str, Path], chunk_size: int = CHUNK_SIZE,
               source: HashingReader | None = None) -> Iterator[Union[Header, Sequence]]:
    """Yields Header and Sequence events of a FASTA file in stream order, memory bounded by chunk_size.

    A record's sequence arrives as one or more Sequence events (newlines included, never a
    whole contig at once). Raises FastaError for an unreadable file, no header, or sequence
    before the first header. Pass `source` (open_source) to read the file's md5 afterwards.
    """
    path = Path(path)
    hashing = source or open_source(path)
    in_header = False
    header = bytearray()
    header_offset = 0
    at_line_start = True
    seen_header = False
    offset = 0  # decompressed offset of the current chunk
    for chunk in _bom_whole(read_chunks(path, hashing, chunk_size)):
        if offset == 0 and chunk.startswith(UTF8_BOM):  # written by some Windows editors
            chunk, offset = chunk[len(UTF8_BOM):], len(UTF8_BOM)
        p, n = 0, len(chunk)
        while p < n:
            if in_header:
                nl = chunk.find(b"\n", p)
                end = n if nl < 0 else nl
                header += chunk[p:end]
                if len(header) > MAX_HEADER:
                    raise FastaError(f"{path}: header at byte {header_offset} is longer than "
                                     f"{MAX_HEADER} bytes (is this a FASTA file?)")
                if nl < 0:
                    p = n
                    break
                yield Header(_header_name(path, header, header_offset), header_offset)
                in_header, p = False, nl + 1
                continue
            # '>' is rare, so a memchr-speed find of it beats searching for "\n>"
            q = chunk.find(b">", p)
            while q >= 0 and not (chunk[q - 1:q] == b"\n" if q else at_line_start):
                q = chunk.find(b">", q + 1)
            end = n if q < 0 else q
            if end > p:
                if not seen_header and chunk[p:end].strip():
                    raise FastaError(f"{path}: line {line_of_offset(path, offset + p)}: "
                                     f"sequence before the first '>' header")
                if seen_header:
                    yield Sequence(chunk[p:end], offset + p)
            if q < 0:
                break
            in_header, seen_header = True, True
            header, header_offset = bytearray(), offset + q
            p = q + 1
        if chunk:  # (empty after a byte-order mark that was the whole chunk)
            at_line_start = chunk.endswith(b"\n")
        offset += n
    if in_header:  # a header on the last line without a newline
        yield Header(_header_name(path, header, header_offset), header_offset)
    if not seen_header:
        raise FastaError(f"{path}: no FASTA header ('>') found; is this a FASTA file?")


def _bom_whole(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks, the first one joined with the next until it is as long as a byte-order mark
    (so that a mark split across tiny chunks is still seen whole)."""
    head = b""
    for chunk in chunks:
        if head is None:
            yield chunk
            continue
        head += chunk
        if len(head) >= len(UTF8_BOM):
            yield head
            head = None
    if head:
        yield head


def _header_name(path: Path, header: bytes, offset: int) -> str:
    """The record name (up to the first whitespace) of a header line, decoded as UTF-8."""
    try:
        fields = bytes(header).decode("utf-8").split()
    except UnicodeDecodeError as err:
        raise FastaError(f"{path}: line {line_of_offset(path, offset)}: header is not valid UTF-8 "
                         f"(byte {bytes(header)[err.start:err.start + 1]!r} at column "
                         f"{err.start + 2})") from None
    return fields[0] if fields else ""


def line_of_offset(path: Path, offset: int) -> int:
    """Returns the 1-based line number of a decompressed byte offset (rereads the file; errors only)."""
    lines, seen = 1, 0
    try:
        for chunk in read_chunks(path, HashingReader(open(path, "rb")), CHUNK_SIZE):
            take = min(len(chunk), offset - seen)
            lines += chunk.count(b"\n", 0, take)
            seen += take
            if seen >= offset:
                break
    except FastaError:
        pass
    return lines
