"""Token chunk codecs of the store: encode and decode time and bytes per token, as a table.

    python benchmarks/codec_throughput.py            # one 64 Mi-token shard per policy
    python benchmarks/codec_throughput.py --mtokens 16

Tokens come from benchmarks/preprocess_throughput.py's genome generator, folded to upper case (the
default policy) or with soft-masking kept (`--soft-mask keep`; 3 kb masked blocks, ~6% of bases),
and, as the worst case for dna2bit's run lists, `keep` with the case flipped at every base
(`flip`; not what assemblies hold), EOD at the end. Each codec encodes
the whole buffer as geno-preprocess does (`encode_shard`: 16 Ki-token inner chunks in one shard
file) and decodes random inner chunks as the training reader does (`TokenReader`'s decoders). zstd
(level 1), the portable codec, is the baseline measured in the same run. Single process, best of 3.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.preprocess_throughput import synthetic_bases  # noqa: E402
from data_pipeline.shard_format import CHUNK_TOKENS, CODECS, DECODERS, ZARR_NAMES, encode_shard  # noqa: E402
from megatron_geno.vocab import EOD, encoding_table  # noqa: E402


def best_of(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mtokens", type=int, default=64, help="Mi tokens per policy (64)")
    parser.add_argument("--chunks", type=int, default=2000, help="random chunks decoded (2000)")
    args = parser.parse_args()
    n = args.mtokens << 20
    per_shard = -(-n // CHUNK_TOKENS)
    print(f"\n{args.mtokens} Mi tokens per policy, {CHUNK_TOKENS // 1024} Ki-token chunks, "
          f"best of 3\n")
    print("| policy | codec | encode s | encode ns/token | decode us/chunk | bytes/token "
          "| encode x zstd | decode x zstd |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for policy in ("upper", "keep", "flip"):
        bases = synthetic_bases(np.random.default_rng(0), n)
        if policy == "flip":
            bases[::2] |= 32  # every other base lower case (N stays N: 'n' folds to it)
        ids = encoding_table("upper" if policy == "upper" else "keep")[bases]
        ids[-1] = EOD
        rng = np.random.default_rng(1)
        picks = rng.integers(0, per_shard, args.chunks)
        rows = {}
        for codec in ("zstd", "dna2bit", "blosc"):
            encoder = CODECS[codec][0](1)
            enc_s, shard = best_of(lambda: encode_shard(ids, CHUNK_TOKENS, per_shard, encoder))
            index = np.frombuffer(shard[-(per_shard * 16 + 4):-4], dtype="<u8").reshape(-1, 2)
            pieces = [shard[int(o):int(o + b)] for o, b in index[picks]]
            decoder, out = DECODERS[ZARR_NAMES[codec]](), np.empty(CHUNK_TOKENS, np.uint8)
            for k, piece in zip(picks[:20], pieces):  # decodes to the same tokens
                decoder.decode(piece, out)
                assert np.array_equal(out, ids[k * CHUNK_TOKENS:(k + 1) * CHUNK_TOKENS])
            dec_s, _ = best_of(lambda: [decoder.decode(p, out) for p in pieces])
            rows[codec] = (enc_s, dec_s / len(pieces), len(shard) / n)
        for codec, (enc_s, dec_s, size) in rows.items():
            print(f"| {policy} | {codec} | {enc_s:.3f} | {enc_s / n * 1e9:.2f} | {dec_s * 1e6:.1f} "
                  f"| {size:.3f} | {enc_s / rows['zstd'][0]:.2f} | {dec_s / rows['zstd'][1]:.2f} |")


if __name__ == "__main__":
    main()
