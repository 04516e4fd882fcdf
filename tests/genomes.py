"""Small FASTA files for tests: random contigs written plain, gzip, BGZF, xz or bz2."""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import numpy as np


def random_bases(rng: np.random.Generator, n: int, alphabet: bytes = b"ACGT") -> bytes:
    return np.frombuffer(alphabet, dtype=np.uint8)[rng.integers(0, len(alphabet), n)].tobytes()


def fasta_bytes(records: dict[str, bytes], width: int = 60, newline: bytes = b"\n") -> bytes:
    out = []
    for name, seq in records.items():
        out.append(b">" + name.encode() + b" test record" + newline)
        lines = [seq[i:i + width] for i in range(0, len(seq), width)] if width else [seq]
        out.extend(line + newline for line in lines)
    return b"".join(out)


def write_fasta(path: Path, records: dict[str, bytes], width: int = 60,
                compression: str = "plain", newline: bytes = b"\n") -> Path:
    """Writes records; compression is plain, gzip, bgzf (BGZF blocks), xz or bz2."""
    data = fasta_bytes(records, width, newline)
    path = Path(path)
    if compression == "plain":
        path.write_bytes(data)
    elif compression == "gzip":
        path.write_bytes(gzip.compress(data))
    elif compression == "bgzf":  # what bgzip writes: 64 KiB gzip members with a BC extra field
        from Bio import bgzf

        with bgzf.BgzfWriter(str(path), "wb") as f:
            f.write(data)
    elif compression == "xz":
        path.write_bytes(lzma.compress(data))
    elif compression == "bz2":
        path.write_bytes(bz2.compress(data))
    else:
        raise ValueError(compression)
    return path


def genome(seed: int, contigs: dict[str, int], alphabet: bytes = b"ACGTacgt") -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {name: random_bases(rng, n, alphabet) for name, n in contigs.items()}
