"""The memory plan (launch/plan.py) against memory measured on CPU, and the recipes' sizing.

    python benchmarks/memory_plan.py                 # genos-1.2b shapes, seq 512, micro batch 2
    python benchmarks/memory_plan.py --seq 1024 --mbs 1

Table 1, per layer and micro-batch in bf16, for the fused path (model.fusions=on, the GPU
default) and the eager one: the bytes the layer keeps for backward (a 2-layer model less a
1-layer one; tests/memory_probe.py) against the plan's ``layer_activations``, and the peak
allocated during one forward + backward of the 2-layer model (torch.profiler's memory timeline)
against the plan's activations + backward working memory for it. On a GPU the same tensors are
kept; what CPU cannot show (CUDA context, NCCL/cuBLAS workspaces, allocator fragmentation) is
the plan's headroom, and benchmarks/gpu_suite.sh prints the plan beside the measured peak.

Table 2: the same per-layer measure for every setting the plan models (fused, eager,
SequentialMLP, each recomputation). Table 3: the plan for benchmarks/gpu_suite.sh's rows on one
GPU, on the fast path and on the old one (eager elementwise work, SequentialMLP).

Table 4: each bundled recipe at data-parallel size 8: the plan at its micro batch, and the
largest micro batch whose plan fits an 80 GiB GPU less the headroom (the recipe's own).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1 << 20


def layer_rows(seq: int, mbs: int) -> list[tuple]:
    from launch.plan import layer_activations, memory_per_gpu
    from megatron_geno.config import load_config
    from tests.memory_probe import peak_bytes, saved_bytes

    rows = []
    for fusions in ("on", "off"):
        overrides = ["model.preset=genos-1.2b", f"model.fusions={fusions}",
                     f"data.seq_length={seq}", f"data.micro_batch_size={mbs}",
                     f"data.global_batch_size={mbs}"]
        kept = saved_bytes(overrides, 2) - saved_bytes(overrides, 1)
        peak = peak_bytes(overrides, 2)
        cfg = load_config(None, overrides + ["model.num_layers=2"])
        parts = layer_activations(cfg.model, seq, mbs)
        memory = memory_per_gpu(cfg, 1, 1)
        planned_peak = memory["activations (estimate)"] + memory[
            "backward working memory (estimate)"]
        rows.append((fusions, kept, sum(parts.values()), parts, peak, planned_peak))
    return rows


def setting_rows(seq: int, mbs: int) -> list[tuple]:
    """(setting, kept per layer, plan per layer) in bytes per token x hidden, for every setting
    the plan models (tests/memory_probe.SETTINGS), at genos-1.2b's shape."""
    from launch.plan import layer_activations
    from megatron_geno.config import load_config
    from tests.memory_probe import SETTINGS, saved_bytes, setting_name

    rows = []
    for setting in SETTINGS:
        overrides = ["model.preset=genos-1.2b", f"data.seq_length={seq}",
                     f"data.micro_batch_size={mbs}", f"data.global_batch_size={mbs}", *setting]
        kept = saved_bytes(overrides, 2) - saved_bytes(overrides, 1)
        m = load_config(None, overrides).model
        planned = sum(layer_activations(m, seq, mbs, recomputed=m.recompute == "full").values())
        unit = seq * mbs * m.hidden_size
        rows.append((setting_name(setting), kept / unit, planned / unit))
    return rows


# benchmarks/gpu_suite.sh's rows (train_throughput.py on one GPU), and the old path's settings
SUITE_ROWS = [("genos-1.2b 12 layers 8K, micro batch 1", "genos-1.2b", 12, 8192, 1),
              ("genos-1.2b 12 layers 8K, micro batch 4", "genos-1.2b", 12, 8192, 4),
              ("genos-1.2b 12 layers 8K, micro batch 8", "genos-1.2b", 12, 8192, 8),
              ("genos-10b shapes 4 layers 8K, micro batch 1", "genos-10b", 4, 8192, 1),
              ("genos-1.2b 12 layers 32K, micro batch 1", "genos-1.2b", 12, 32768, 1)]
OLD_PATH = ["model.fusions=off", "model.moe_grouped_gemm=off"]


def suite_rows() -> list[tuple]:
    """(row, plan GiB on the fast path, plan GiB on the old path) on one GPU (DP 1)."""
    from launch.plan import memory_per_gpu
    from megatron_geno.config import load_config

    rows = []
    for name, preset, layers, seq, mbs in SUITE_ROWS:
        base = [f"model.preset={preset}", f"model.num_layers={layers}", f"data.seq_length={seq}",
                f"data.micro_batch_size={mbs}", f"data.global_batch_size={2 * mbs}"]
        rows.append((name, *(sum(memory_per_gpu(load_config(None, base + extra), 1, 1).values())
                             / 2**30 for extra in ([], OLD_PATH))))
    return rows


def recipe_rows() -> list[tuple]:
    import dataclasses

    from launch.plan import (RECIPE_DATA_PARALLEL, largest_micro_batch, memory_per_gpu,
                             validate_layout)
    from launch.recipe import RECIPE_DIR, load_recipe

    rows = []
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        cfg, _, _ = load_recipe(path.stem, [])
        p = cfg.parallel
        world = RECIPE_DATA_PARALLEL * p.tensor_parallel * p.pipeline_parallel * p.context_parallel
        dp, expert_dp = validate_layout(cfg, world)
        total = sum(memory_per_gpu(cfg, dp, expert_dp).values())
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size=1))
        rows.append((path.stem, world, cfg.data.micro_batch_size,
                     sum(memory_per_gpu(one, dp, expert_dp).values()), total,
                     largest_micro_batch(cfg, world)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--mbs", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    print(f"\ngenos-1.2b shapes, seq {args.seq}, micro batch {args.mbs}, bf16, CPU")
    print("| path | kept for backward per layer (MiB) | plan (MiB) | plan / measured | "
          "peak of 2 layers fwd+bwd (MiB) | plan (MiB) | plan / measured |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = layer_rows(args.seq, args.mbs)
    for fusions, kept, planned, _, peak, planned_peak in rows:
        print(f"| fusions {fusions} | {kept / MIB:.1f} | {planned / MIB:.1f} | "
              f"{planned / kept:.3f} | {peak / MIB:.1f} | {planned_peak / MIB:.1f} | "
              f"{planned_peak / peak:.3f} |")
    for fusions, _, _, parts, _, _ in rows:
        print(f"plan per layer, fusions {fusions} (MiB): "
              + ", ".join(f"{part} {size / MIB:.1f}" for part, size in parts.items()))
    print(f"\nper layer, every setting the plan models (genos-1.2b shapes, seq {args.seq}, "
          f"micro batch {args.mbs}, bf16, CPU), bytes per token x hidden")
    print("| setting | kept for backward | plan | plan / measured |")
    print("|---|---:|---:|---:|")
    for name, kept, planned in setting_rows(args.seq, args.mbs):
        print(f"| {name} | {kept:.2f} | {planned:.2f} | {planned / kept:.3f} |")
    print("\n| GPU suite row (one GPU, DP 1) | plan, fast path (GiB) | plan, old path (GiB) |")
    print("|---|---:|---:|")
    for name, fast, old in suite_rows():
        print(f"| {name} | {fast:.1f} | {old:.1f} |")
    print("\n| recipe | GPUs at DP 8 | micro batch | plan at micro batch 1 (GiB) | "
          "plan at the recipe's (GiB) | largest that fits 80 GiB less 15% |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, world, mbs, one, total, best in recipe_rows():
        print(f"| {name} | {world} | {mbs} | {one / 2**30:.1f} | {total / 2**30:.1f} | {best} |")


if __name__ == "__main__":
    main()
