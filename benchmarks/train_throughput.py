"""Training throughput per preset: tokens/s, TFLOP/s per device, MFU and peak memory, as a table.

    python benchmarks/train_throughput.py                      # CPU: tiny (and a 1-layer 1.2b)
    python benchmarks/train_throughput.py --preset genos-1.2b --seq 8192 --layers 12   # one GPU
    python benchmarks/train_throughput.py --preset genos-1.2b --seq 8192 --layers 12 \\
        --set model.moe_grouped_gemm=off                       # the old experts path

Each row runs geno-train for --steps steps in a fresh process and averages the steps after the
first two (warm-up). The baseline row is the tiny preset measured in the same run, so ratios
compare like with like on the same machine. On a GPU, the peak allocated memory is printed beside
the memory plan's estimate for the same config (launch/plan.py, one GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.functional.launcher import geno_train  # noqa: E402


def plan_gib(overrides: list[str]) -> float:
    """The memory plan's estimate (GiB per GPU) for this config on one GPU."""
    from launch.plan import memory_per_gpu
    from megatron_geno.config import load_config

    args, preset = list(overrides), None
    if "--preset" in args:
        i = args.index("--preset")
        preset = args[i + 1]
        del args[i:i + 2]
    cfg = load_config(None, ([f"model.preset={preset}"] if preset else []) + args)
    return sum(memory_per_gpu(cfg, 1, 1).values()) / 2**30


def measure(preset: str, seq: int, layers: int | None, mbs: int, gbs: int, steps: int,
            extra: list[str]) -> dict:
    overrides = ["--preset", preset, f"data.seq_length={seq}", f"data.micro_batch_size={mbs}",
                 f"data.global_batch_size={gbs}", f"schedule.train_iters={steps}",
                 "schedule.warmup_iters=1", "data.synthetic_genome_length=2000000", *extra]
    if layers:
        overrides.append(f"model.num_layers={layers}")
    with tempfile.TemporaryDirectory() as tmp:
        records = geno_train(Path(tmp) / "run", *overrides)
    timed = records[2:] or records
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    peak = max((r.get("peak_memory_gib") or 0.0 for r in records), default=0.0)
    return {"tokens_per_s": mean("tokens_per_s"), "tflops": mean("tflops_per_gpu"),
            "mfu": sum(mfu) / len(mfu) if mfu else None, "loss": timed[-1]["loss"],
            "peak_gib": peak or None, "plan_gib": plan_gib(overrides)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="genos-1.2b")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument("--gbs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a geno-train override for the measured row (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the tiny baseline row")
    args = parser.parse_args()
    rows = [] if args.no_baseline else [("tiny (baseline)", measure("tiny", 256, None, 2, 8,
                                                                    args.steps, []))]
    label = f"{args.preset} L={args.layers} seq={args.seq} mbs={args.mbs}" + "".join(
        f" {s}" for s in args.set)
    rows.append((label, measure(args.preset, args.seq, args.layers, args.mbs, args.gbs,
                                args.steps, args.set)))
    base = rows[0][1]["tflops"]
    print("\n| run | tokens/s | TFLOP/s per device | MFU | peak GiB | plan GiB | x first row TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (CPU)"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] else "n/a"
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tflops']:.4f} | {mfu} | {peak} | "
              f"{r['plan_gib']:.1f} | {r['tflops'] / base:.2f} |")


if __name__ == "__main__":
    main()
