"""dna2bit: exact round trips for every id and run layout, its zarr codec, and clear errors."""

import struct
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import dna2bit
from megatron_geno.vocab import VOCAB


def genome_like(rng, n: int) -> np.ndarray:
    """Upper-case bases with soft-masked blocks, N runs, EODs and a few of every other id."""
    ids = rng.integers(5, 9, n).astype(np.uint8)
    if n == 0:
        return ids
    for start in rng.integers(0, n, max(n // 3000, 1)):
        ids[start:start + int(rng.integers(1, 4000))] += 5  # a/c/g/t
    for start in rng.integers(0, n, max(n // 20000, 1)):
        ids[start:start + int(rng.integers(1, 300))] = VOCAB.index("N")
    ids[rng.integers(0, n, max(n // 5000, 1))] = rng.integers(0, 128, max(n // 5000, 1))
    return ids


@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 4095, 4096, 4097, 100_003])
def test_single_chunk_round_trip(n):
    ids = genome_like(np.random.default_rng(n), n)
    np.testing.assert_array_equal(dna2bit.decode(dna2bit.encode(ids)), ids)


def test_every_id_in_every_position():
    ids = np.arange(128, dtype=np.uint8).repeat(3)
    for shift in range(8):  # each id at each byte of a packed word
        rolled = np.roll(ids, shift)
        np.testing.assert_array_equal(dna2bit.decode(dna2bit.encode(rolled)), rolled)


def test_shard_encoding_splits_runs_at_chunk_and_block_ends(monkeypatch):
    monkeypatch.setattr(dna2bit, "_BLOCK", 1 << 13)  # several numpy blocks per call
    rng = np.random.default_rng(0)
    ids = genome_like(rng, 1 << 16)
    ids[4000:9000] = VOCAB.index("N")  # one run across chunk ends at 4096 and 8192 (a block end)
    ids[12000:20000] = rng.integers(10, 14, 8000)  # a soft-masked run across two chunk ends
    chunks = dna2bit.encode_chunks(ids, 4096)
    assert len(chunks) == 16
    out = np.empty(4096, dtype=np.uint8)
    for c, buf in enumerate(chunks):
        np.testing.assert_array_equal(dna2bit.decode(buf, out=out), ids[c * 4096:(c + 1) * 4096])
        assert buf == dna2bit.encode(ids[c * 4096:(c + 1) * 4096])  # one format, whatever the path


def test_bases_cost_two_bits():
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 9, 1 << 16).astype(np.uint8)
    ids[100:3000] += 5  # one soft-masked run
    ids[5000:6000] = VOCAB.index("N")  # one N run
    size = len(dna2bit.encode(ids))
    assert size == 16 + 8 + 9 + (1 << 14)  # header, one mask run, one other run, 2 bits per base


def test_many_runs_take_the_scatter_path():
    ids = np.full(4096, VOCAB.index("A"), dtype=np.uint8)
    ids[::3] = VOCAB.index("N")
    ids[1::3] = VOCAB.index("c")
    np.testing.assert_array_equal(dna2bit.decode(dna2bit.encode(ids)), ids)


def test_zarr_writes_and_reads_through_the_codec(tmp_path):
    import zarr

    ids = genome_like(np.random.default_rng(2), 50_000)
    array = zarr.create_array(str(tmp_path / "a"), shape=ids.shape, dtype="uint8",
                              chunks=(4096,), compressors=dna2bit.DNA2BitCodec(), fill_value=0)
    array[:] = ids
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[:], ids)
    # a fresh interpreter finds the codec through the package's zarr.codecs entry point
    code = ("import sys, zarr; a = zarr.open_array(sys.argv[1], mode='r'); "
            "print(int(a[:].astype('int64').sum()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], capture_output=True,
                         text=True, check=True)
    assert int(out.stdout) == int(ids.astype(np.int64).sum())


def test_bad_chunks_are_clear_errors():
    good = dna2bit.encode(np.full(100, VOCAB.index("N"), dtype=np.uint8))
    with pytest.raises(dna2bit.CodecError, match="bad magic"):
        dna2bit.decode(b"ZSTD" + good[4:])
    with pytest.raises(dna2bit.CodecError, match="no header"):
        dna2bit.decode(good[:5])
    with pytest.raises(dna2bit.CodecError, match="inconsistent"):
        dna2bit.decode(good[:-1])
    lying = good[:4] + struct.pack("<I", 50) + good[8:]  # a run reaching past n
    with pytest.raises(dna2bit.CodecError, match="inconsistent"):
        dna2bit.decode(lying)
    with pytest.raises(dna2bit.CodecError, match="outside the 128-id vocabulary"):
        dna2bit.encode(np.array([5, 200], dtype=np.uint8))
