"""geno-eval variants throughput: variants/s at several batch sizes, against batch size 1 measured
in the same run (random weights: speed does not depend on them).

    python benchmarks/eval_throughput.py                          # tiny, window 512, 256 SNVs
    python benchmarks/eval_throughput.py --preset genos-1.2b --layers 2 --window 1024 --variants 64

The model is built in this process at TP = PP = 1 (fp32 on CPU, the precision setting on GPU);
the VCF and reference are synthetic, written to a temporary directory. Each row scores every
variant once (REF and ALT windows, one strand); the first row also pays the lazy set-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_inputs(root: Path, n: int, window: int, seed: int = 0) -> tuple[Path, Path]:
    import numpy as np

    rng = np.random.default_rng(seed)
    length = max(4 * window, n * 8 + 2 * window)
    seq = "".join("ACGT"[i] for i in rng.integers(0, 4, length))
    ref = root / "ref.fa"
    ref.write_text(f">chr1\n{seq}\n")
    lines = ["##fileformat=VCFv4.2", f"##contig=<ID=chr1,length={length}>",
             "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    positions = np.linspace(window, length - window - 1, n).astype(int)
    for i, p in enumerate(positions):
        alt = "ACGT"[("ACGT".index(seq[p]) + 1) % 4]
        lines.append(f"chr1\t{p + 1}\tv{i}\t{seq[p]}\t{alt}\t.\t.\t.")
    vcf = root / "snvs.vcf"
    vcf.write_text("\n".join(lines) + "\n")
    return vcf, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--variants", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,8,32")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from megatron_geno import distributed
    from megatron_geno.config import load_config
    from megatron_geno.evaluation.models import MegatronModel
    from megatron_geno.evaluation.variants import prepare_variants, score_variants
    from megatron_geno.model import build_model_chunks
    from megatron_geno.runtime import for_config
    from megatron_geno.tokenizer import VOCAB_SIZE

    overrides = [f"model.preset={args.preset}", "model.fusions=off"]
    if args.layers:
        overrides.append(f"model.num_layers={args.layers}")
    cfg = load_config(None, overrides)
    distributed.initialize(cfg, seed=0)
    chunks = build_model_chunks(cfg, VOCAB_SIZE)
    for chunk in chunks:
        chunk.eval()
    model = MegatronModel(chunks, cfg, f"random {args.preset}", "upper")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vcf, ref = synthetic_inputs(Path(tmp), args.variants, args.window)
        prepared = prepare_variants(vcf, ref, args.window, "upper")
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            start = time.perf_counter()
            result = score_variants(model, vcf, ref, args.window, batch_size=batch,
                                    prepared=prepared)
            elapsed = time.perf_counter() - start
            assert result["counts"] == {"ok": args.variants}, result["counts"]
            rows.append((batch, args.variants / elapsed, 2 * args.variants * args.window / elapsed))
    print(f"\n{for_config(cfg).line()}\n{args.variants} SNVs, window {args.window}, one strand "
          f"(2 windows per variant)\n")
    print("| batch size (windows) | variants/s | tokens/s | x batch size 1 |")
    print("|---:|---:|---:|---:|")
    for batch, rate, tokens in rows:
        print(f"| {batch} | {rate:,.1f} | {tokens:,.0f} | {rate / rows[0][1]:.2f} |")
    distributed.destroy()


if __name__ == "__main__":
    main()
