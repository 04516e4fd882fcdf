"""Random training windows per second from zarr shards vs mmap .bin/.idx, and bytes on disk, as a table.

    python benchmarks/loader_throughput.py              # 200 Mbp corpus
    python benchmarks/loader_throughput.py --mbp 50     # quicker

A generated genome (benchmarks/preprocess_throughput.py's generator) is preprocessed into a zarr
corpus, which `export-megatron` writes as a Megatron .bin/.idx pair with megatron-core's builder;
the .bin/.idx read back through megatron-core's mmap IndexedDataset is the baseline. Two rates per
window length:
- samples: GenoGPTDataset[i] for random i, what the training loop gets (window, torch tensors,
  loss mask, position ids), built by megatron-core over each store;
- raw: the same random (document, offset) windows through each low-level dataset's
  `get(doc, offset, length)`, copied into a new array (an mmap view is free until it is read).
The page cache is warm for both (the files were just written), so this compares decode cost, not
disk speed. Goals: zarr at least 0.5x the windows/s of mmap, and at most 0.5x its bytes.
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
        for cmd in (["run", str(tmp / "g.fa.gz"), "--out", str(tmp / "zarr")],
                    ["export-megatron", str(tmp / "zarr"), "--prefix", str(tmp / "mmap")]):
            subprocess.run([sys.executable, "-m", "data_pipeline.cli", *cmd], env=env, check=True,
                           capture_output=True)
        zarr_ds = CorpusSplit(tmp / "zarr", "train")
        mmap_ds = IndexedDataset(str(tmp / "mmap_train"), mmap=True)
        lengths = zarr_ds.sequence_lengths
        assert np.array_equal(lengths, mmap_ds.sequence_lengths)
        z_bytes = disk_bytes([tmp / "zarr" / "shards"])
        m_bytes = disk_bytes([tmp / "mmap_train.bin", tmp / "mmap_train.idx"])
        print(f"\n{lengths.sum() / 1e6:.0f} M tokens in {len(lengths)} documents; "
              f"{args.windows} random windows per length, best of 3\n")
        print("| window | read | mmap .bin/.idx windows/s | zarr windows/s | zarr / mmap |")
        print("|---|---|---:|---:|---:|")
        rng = np.random.default_rng(0)
        for length in (8192, 32768):
            docs = rng.choice(len(lengths), size=args.windows, p=lengths / lengths.sum())
            windows = [(int(d), int(rng.integers(0, lengths[d] - length)), length + 1)
                       for d in docs]
            for d, o, n in windows[:50]:  # same bytes from both
                assert np.array_equal(zarr_ds.get(d, o, n), mmap_ds.get(d, offset=o, length=n))
            m, z = windows_per_s(mmap_ds, windows), windows_per_s(zarr_ds, windows)
            print(f"| {length // 1024}K | raw get + copy | {m:,.0f} | {z:,.0f} | {z / m:.2f} |")
            gm = gpt_dataset("megatron", tmp / "mmap_train", length, args.windows, tmp / "cm")
            gz = gpt_dataset("zarr", tmp / "zarr", length, args.windows, tmp / "cz")
            m, z = samples_per_s(gm, args.windows), samples_per_s(gz, args.windows)
            print(f"| {length // 1024}K | GenoGPTDataset sample | {m:,.0f} | {z:,.0f} | "
                  f"{z / m:.2f} |")
        print("\n| store | bytes on disk | x mmap |\n|---|---:|---:|")
        print(f"| mmap .bin/.idx | {m_bytes:,d} | 1.00 |")
        print(f"| zarr shards | {z_bytes:,d} | {z_bytes / m_bytes:.2f} |")


if __name__ == "__main__":
    main()
