"""Random training windows per second from zarr shards vs mmap .bin/.idx, and bytes on disk, as a table.

    python benchmarks/loader_throughput.py              # 200 Mbp corpus
    python benchmarks/loader_throughput.py --mbp 50     # quicker

A generated genome (benchmarks/preprocess_throughput.py's generator) is preprocessed into a zarr
corpus with each codec (dna2bit, the default, and zstd); `export-megatron` writes the same tokens
as a Megatron .bin/.idx pair with megatron-core's builder, and that pair read back through
megatron-core's mmap IndexedDataset is the baseline. Two rates per window length:
- samples: GenoGPTDataset[i] for random i, what the training loop gets (window, torch tensors,
  loss mask, position ids), built by megatron-core over each store;
- raw: the same random (document, offset) windows through each low-level dataset's
  `get(doc, offset, length)`, copied into a new array (an mmap view is free until it is read).
The page cache is warm for both (the files were just written), so this compares decode cost, not
disk speed. Goals: zarr at least 0.5x the windows/s of mmap, and at most 0.5x its bytes.
A last table reads the same raw windows of the dna2bit store through zarr-python's public API
(`zarr.open_array(...)[a:b]`), against this project's reader (data_pipeline/token_reader.py,
which exists because of this row).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.preprocess_throughput import write_genome  # noqa: E402

CODECS = ("dna2bit", "zstd")  # the default store codec, and the portable one


def disk_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for root in paths
               for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())


def windows_per_s(dataset, windows: list[tuple[int, int, int]], repeat: int = 3) -> float:
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for doc, offset, length in windows:
            np.array(dataset.get(doc, offset=offset, length=length))
        best = max(best, len(windows) / (time.perf_counter() - start))
    return best


def samples_per_s(dataset, count: int, repeat: int = 3) -> float:
    rng = np.random.default_rng(1)
    indices = rng.integers(0, len(dataset), count)
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for i in indices:
            dataset[int(i)]
        best = max(best, count / (time.perf_counter() - start))
    return best


class ZarrPythonReads:
    """A CorpusSplit's windows through zarr-python's public API (one array per part)."""

    def __init__(self, split) -> None:
        import zarr

        self.split = split
        self.arrays = [zarr.open_array(str(reader.dir), mode="r") for reader in split.readers]

    def get(self, doc: int, offset: int = 0, length: int = 0):
        start = int(self.split.starts[doc]) + offset
        return self.arrays[int(self.split.owner[doc])][start:start + length]


def gpt_dataset(source: str, path: Path, seq: int, count: int, cache: Path):
    from megatron_geno.config import load_config
    from megatron_geno.data import build_datasets
    from megatron_geno.tokenizer import GenoTokenizer

    cfg = load_config(None, [f"data.source={source}", f"data.blend=['{path}']", "data.split=100,0,0",
                             f"data.seq_length={seq}", "data.global_batch_size=1",
                             "data.micro_batch_size=1", f"schedule.train_iters={count}",
                             "schedule.warmup_iters=0", "schedule.eval_interval=0"])
    return build_datasets(cfg, GenoTokenizer(), cache)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbp", type=float, default=200)
    parser.add_argument("--windows", type=int, default=2000)
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from data_pipeline.corpus import CorpusSplit
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        sizes = [min(25.0, args.mbp - 25.0 * k) for k in range(int(np.ceil(args.mbp / 25)))]
        write_genome(tmp / "g.fa.gz", sizes)
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
        for cmd in (["run", str(tmp / "g.fa.gz"), "--out", str(tmp / "dna2bit")],
                    ["run", str(tmp / "g.fa.gz"), "--out", str(tmp / "zstd"), "--codec", "zstd"],
                    ["export-megatron", str(tmp / "dna2bit"), "--prefix", str(tmp / "mmap")]):
            subprocess.run([sys.executable, "-m", "data_pipeline.cli", *cmd], env=env, check=True,
                           capture_output=True)
        stores = {codec: CorpusSplit(tmp / codec, "train") for codec in CODECS}
        mmap_ds = IndexedDataset(str(tmp / "mmap_train"), mmap=True)
        lengths = mmap_ds.sequence_lengths
        for store in stores.values():
            assert np.array_equal(lengths, store.sequence_lengths)
        print(f"\n{lengths.sum() / 1e6:.0f} M tokens in {len(lengths)} documents; "
              f"{args.windows} random windows per length, best of 3\n")
        print("| window | read | mmap .bin/.idx windows/s | "
              + " | ".join(f"zarr {c} windows/s | x mmap" for c in CODECS) + " |")
        print("|---|---|---:|" + "---:|---:|" * len(CODECS))
        rng = np.random.default_rng(0)
        ours_vs_zarr = []
        for length in (8192, 32768):
            docs = rng.choice(len(lengths), size=args.windows, p=lengths / lengths.sum())
            windows = [(int(d), int(rng.integers(0, lengths[d] - length)), length + 1)
                       for d in docs]
            for store in stores.values():
                for d, o, n in windows[:50]:  # same bytes from every store
                    assert np.array_equal(store.get(d, o, n), mmap_ds.get(d, offset=o, length=n))
            m = windows_per_s(mmap_ds, windows)
            rates = [windows_per_s(store, windows) for store in stores.values()]
            through_zarr = ZarrPythonReads(stores["dna2bit"])
            for d, o, n in windows[:50]:
                assert np.array_equal(through_zarr.get(d, o, n), mmap_ds.get(d, offset=o, length=n))
            ours_vs_zarr.append((length, rates[0], windows_per_s(through_zarr, windows[:500])))
            print(f"| {length // 1024}K | raw get + copy | {m:,.0f} | "
                  + " | ".join(f"{z:,.0f} | {z / m:.2f}" for z in rates) + " |")
            m = samples_per_s(gpt_dataset("megatron", tmp / "mmap_train", length, args.windows,
                                          tmp / "cm"), args.windows)
            rates = [samples_per_s(gpt_dataset("zarr", tmp / codec, length, args.windows,
                                               tmp / f"c{codec}"), args.windows) for codec in CODECS]
            print(f"| {length // 1024}K | GenoGPTDataset sample | {m:,.0f} | "
                  + " | ".join(f"{z:,.0f} | {z / m:.2f}" for z in rates) + " |")
        m_bytes = disk_bytes([tmp / "mmap_train.bin", tmp / "mmap_train.idx"])
        print("\n| store | bytes on disk | x mmap |\n|---|---:|---:|")
        print(f"| mmap .bin/.idx | {m_bytes:,d} | 1.00 |")
        for codec in CODECS:
            z_bytes = disk_bytes([tmp / codec / "shards"])
            print(f"| zarr {codec} | {z_bytes:,d} | {z_bytes / m_bytes:.2f} |")
        print("\n| window | raw read, dna2bit store | windows/s | ms per window | x zarr-python |"
              "\n|---|---|---:|---:|---:|")
        for length, ours, theirs in ours_vs_zarr:
            for name, rate in (("zarr-python `array[a:b]` (baseline)", theirs),
                               ("data_pipeline TokenReader", ours)):
                print(f"| {length // 1024}K | {name} | {rate:,.0f} | {1e3 / rate:.3f} "
                      f"| {rate / theirs:.1f} |")


if __name__ == "__main__":
    main()
