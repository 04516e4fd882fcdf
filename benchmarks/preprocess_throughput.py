"""geno-preprocess throughput against the decompression floor and a Biopython baseline, and its
peak memory on one long contig, as tables.

    python benchmarks/preprocess_throughput.py                  # 200 Mbp gzip FASTA, 300 Mbp contig
    python benchmarks/preprocess_throughput.py --mbp 20 --contig-mbp 30   # quicker

One generated gzip FASTA (chromosome-like contigs, soft-masked stretches, N gaps) is read three
ways, each in its own process so CPU time and peak RSS are its own (ru_maxrss / ru_utime+stime of
the child):
- floor: the fastest decompressor available (isal igzip, else zlib) reading the file in 4 MiB
  chunks and doing nothing else;
- pipeline: `geno-preprocess run` on it (tokens to a zarr shard group), with each --codec
  (dna2bit is the default);
- baseline: Biopython SeqIO records, one numpy table lookup per record, megatron-core's
  IndexedDatasetBuilder (.bin/.idx), i.e. the straightforward script.
Bases per CPU-second is the per-core rate. Each reader also runs on a 100-base file first, and its
CPU time there (interpreter, imports: about 5 s for the baseline's torch and megatron-core) is
subtracted: the rate is the cost per base of a long run, as on a 3 Gbp assembly. The rate with
start-up included is printed too. Goals: pipeline >= 0.6x floor and >= 10x baseline.
The memory table runs the pipeline on a file holding one contig of --contig-mbp Mbp
(goal: peak RSS < 1 GiB at 300 Mbp).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def synthetic_bases(rng: np.random.Generator, m: int) -> np.ndarray:
    """m ASCII bases: order-1 Markov-ish (the previous base repeats 30% of the time, so it
    compresses like real DNA, ~2 bits/base), 3 kb soft-masked blocks (~6% of bases) and, above
    1 Mbp, one 50 kb N gap."""
    seq = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, m)]
    repeat = rng.random(m) < 0.3
    seq[1:][repeat[1:]] = seq[:-1][repeat[1:]]
    for s in rng.integers(0, m - 5000, m // 50_000):
        seq[s:s + 3000] |= 32  # lower case
    if m > 1_000_000:
        g = int(rng.integers(0, m - 100_000))
        seq[g:g + 50_000] = ord("N")
    return seq


def write_genome(path: Path, contig_mbp: list[float], seed: int = 0) -> int:
    """Writes a gzip FASTA of chromosome-like contigs; returns the number of bases."""
    try:
        from isal import igzip as gz
    except ImportError:
        import gzip as gz
    rng = np.random.default_rng(seed)
    total = 0
    with gz.open(path, "wb", compresslevel=1) as f:
        for i, mbp in enumerate(contig_mbp):
            n = int(mbp * 1e6)
            f.write(f">chr{i + 1} synthetic\n".encode())
            for start in range(0, n, 10_000_000):  # 10 Mbp at a time keeps the generator small
                m = min(10_000_000, n - start)
                text = synthetic_bases(rng, m).tobytes()
                f.write(b"\n".join(text[k:k + 60] for k in range(0, len(text), 60)) + b"\n")
                total += m
    return total


FLOOR = """
import sys
try:
    from isal import igzip as gz
    name = "isal igzip"
except ImportError:
    import gzip as gz
    name = "zlib"
n = 0
with gz.open(sys.argv[1], "rb") as f:
    while chunk := f.read(4 << 20):
        n += len(chunk)
print(name)
"""

BASELINE = """
import gzip, sys
import numpy as np, torch
from Bio import SeqIO
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron_geno.vocab import EOD, encoding_table
table = encoding_table("upper")
builder = IndexedDatasetBuilder(sys.argv[2] + ".bin", dtype=np.uint8)
with gzip.open(sys.argv[1], "rt") as handle:
    for record in SeqIO.parse(handle, "fasta"):
        ids = table[np.frombuffer(str(record.seq).encode(), dtype=np.uint8)]
        doc = np.append(ids, EOD).astype(np.uint8)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
builder.finalize(sys.argv[2] + ".idx")
print("biopython")
"""

MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
out = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
if out.returncode:
    sys.exit(out.stderr[-3000:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "cpu": r.ru_utime + r.ru_stime, "rss_kib": r.ru_maxrss,
                  "stdout": out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""}))
"""


def measure(cmd: list[str]) -> dict:
    """Runs cmd as a grandchild and returns its wall s, CPU s and peak RSS (its own only)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout)


CODECS = ("dna2bit", "zstd", "blosc")


def preprocess_cmd(fasta: Path, out: Path, codec: str = "dna2bit") -> list[str]:
    return [sys.executable, "-m", "data_pipeline.cli", "run", str(fasta), "--out", str(out),
            "--codec", codec]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbp", type=float, default=200, help="genome size for the rate table")
    parser.add_argument("--contig-mbp", type=float, default=300, help="single contig for memory")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        sizes = [min(50.0, args.mbp - 50.0 * k) for k in range(int(np.ceil(args.mbp / 50)))]
        bases = write_genome(tmp / "genome.fa.gz", sizes)
        write_genome(tmp / "tiny.fa.gz", [1e-4])  # 100 bases: what each reader costs to start
        gz_mb = (tmp / "genome.fa.gz").stat().st_size / 1e6
        readers = [("floor", lambda fa, out: [sys.executable, "-c", FLOOR, str(fa)])]
        readers += [(f"geno-preprocess run --codec {codec}",
                     lambda fa, out, codec=codec: preprocess_cmd(fa, out, codec))
                    for codec in CODECS]
        if not args.skip_baseline:
            readers.append(("baseline", lambda fa, out: [sys.executable, "-c", BASELINE, str(fa),
                                                         str(out)]))
        rows = []
        for i, (name, cmd) in enumerate(readers):
            start_up = measure(cmd(tmp / "tiny.fa.gz", tmp / f"tiny_{i}"))["cpu"]
            r = measure(cmd(tmp / "genome.fa.gz", tmp / f"out_{i}"))
            rows.append((name, r, start_up, bases / (r["cpu"] - start_up)))
        floor_rate = rows[0][3]
        base_rate = rows[-1][3] if not args.skip_baseline else None
        print(f"\n{bases / 1e6:.0f} Mbp in {len(sizes)} contigs, gzip {gz_mb:.0f} MB "
              f"(floor decompressor: {rows[0][1]['stdout']})\n")
        print("| reader | wall s | CPU s | start-up CPU s | Mbp/s per core | x floor | x baseline "
              "| Mbp/s per core with start-up | peak RSS MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r, start_up, rate in rows:
            vs_base = f"{rate / base_rate:.2f}" if base_rate else "n/a"
            print(f"| {name} | {r['wall']:.1f} | {r['cpu']:.2f} | {start_up:.2f} | {rate / 1e6:.1f} "
                  f"| {rate / floor_rate:.2f} | {vs_base} | {bases / r['cpu'] / 1e6:.1f} "
                  f"| {r['rss_kib'] / 1024:.0f} |")

        (tmp / "genome.fa.gz").unlink()
        contig = write_genome(tmp / "contig.fa.gz", [args.contig_mbp], seed=1)
        r = measure(preprocess_cmd(tmp / "contig.fa.gz", tmp / "contig_corpus"))
        print("\n| one contig | wall s | peak RSS MiB | goal |\n|---|---:|---:|---|")
        print(f"| {contig / 1e6:.0f} Mbp | {r['wall']:.1f} | {r['rss_kib'] / 1024:.0f} | "
              f"< 1024 MiB: {'met' if r['rss_kib'] < 1 << 20 else 'NOT met'} |")


if __name__ == "__main__":
    main()
