"""Operator counts per transformer layer per micro-batch, forward + backward, on CPU.

    python benchmarks/op_count.py                        # genos-1.2b shapes, seq 128
    python benchmarks/op_count.py --preset tiny --top 25

The CPU-side measure of GPU launch overhead (issue "GPU throughput"): on a GPU every aten call
is at least one kernel launch, every GEMM call one GEMM kernel, and every `item` /
`_local_scalar_dense` / `nonzero` a host synchronisation. Each count is the difference between a
2-layer and a 1-layer model, so embedding, output layer and loss cancel out.

Counts are of what a GPU launches: an op that is one kernel there (`_grouped_mm`, scaled-dot-
product attention) counts once, and what CPU runs inside it (CPU's `_grouped_mm` loops over groups
with `item`, `slice` and `mm`) is not counted. GEMMs: `mm`, `addmm`, `bmm`, `baddbmm`,
`_grouped_mm`. The model alone: the optimizer step, DDP and the training loop are not included.

Columns, measured in the same run: the baseline (`model.moe_grouped_gemm=off`, `model.fusions=off`:
megatron-core's SequentialMLP, eager elementwise work), grouped experts alone, and the path a GPU
runs by default (GroupedExperts and `model.fusions=on`). A compiled region's kernels are counted as
launches (`cpp_fused_*` on CPU, one Triton kernel each on a GPU) together with the aten calls it
still makes (GEMMs it leaves to aten, buffer allocations); the ops it replaces (RMSNorm, RoPE,
SwiGLU) no longer appear as aten calls. The fused cross-entropy runs only in bf16 (its gradient
is bf16), so these fp32 counts keep the unfused one; it is outside the per-layer count anyway.
All use the allgather
token dispatcher: megatron-core's alltoall dispatcher (the GPU default) waits on a CUDA event for
its split sizes, which CPU cannot run at EP=1; on a GPU it adds that one host synchronisation per
layer and micro-batch.
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"}
SYNCS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}
OPAQUE = ("aten::_grouped_mm", "scaled_dot_product")  # count these, not what runs inside
FUSED_KERNELS = "fused kernels (compiled)"


def _inside_opaque(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(OPAQUE) or "scaled_dot_product" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def count_ops(preset: str, layers: int, grouped: str, dispatcher: str, seq: int,
              fusions: str = "off") -> collections.Counter:
    """aten op counts of one forward + backward of one micro-batch (the second of two)."""
    import torch
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    inductor_config.cpp.enable_kernel_profile = True  # each compiled C++ kernel is an event

    from megatron_geno import distributed
    from megatron_geno.config import load_config
    from megatron_geno.model import build_model_chunks, describe
    from megatron_geno.tokenizer import VOCAB_SIZE

    cfg = load_config(None, [f"model.preset={preset}", f"model.num_layers={layers}",
                             f"model.moe_grouped_gemm={grouped}",
                             f"model.moe_token_dispatcher={dispatcher}",
                             f"model.fusions={fusions}",
                             f"data.seq_length={seq}", "data.micro_batch_size=1",
                             "data.global_batch_size=1"])
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()  # sized by the previous model's layer count
    distributed.initialize(cfg, seed=1234)
    try:
        (model,) = build_model_chunks(cfg, VOCAB_SIZE)
        line = describe(cfg)
        torch.manual_seed(0)
        tokens = torch.randint(5, 9, (1, seq))
        positions = torch.arange(seq)[None]

        def step():
            model.zero_grad(set_to_none=True)
            loss = model(tokens, positions, None, labels=tokens).float().mean()
            loss.backward()

        step()  # warm-up: lazy initialisation is not per-step work
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        counts = collections.Counter()
        for event in prof.events():
            if "cpp_fused" in event.name:  # one kernel of a compiled region
                counts[FUSED_KERNELS] += 1
                counts["aten calls"] += 1
                continue
            # a GPU runs an opaque op as one kernel: what CPU runs inside it is not counted
            if not event.name.startswith("aten::") or _inside_opaque(event):
                continue
            counts["aten calls"] += 1
            counts[event.name] += 1
            if event.name in GEMMS:
                counts["GEMM calls"] += 1
            if event.name in SYNCS:
                counts["host syncs (item, _local_scalar_dense, nonzero)"] += 1
        counts["_line"] = line  # type: ignore[assignment]
        return counts
    finally:
        distributed.destroy()


def per_layer(preset: str, grouped: str, dispatcher: str, seq: int,
              fusions: str = "off") -> tuple[dict, str]:
    one = count_ops(preset, 1, grouped, dispatcher, seq, fusions)
    two = count_ops(preset, 2, grouped, dispatcher, seq, fusions)
    line = two.pop("_line")
    one.pop("_line")
    return {key: two[key] - one.get(key, 0) for key in two}, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="genos-1.2b")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--top", type=int, default=20, help="ops listed by count (20)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    columns = {"baseline": per_layer(args.preset, "off", "allgather", args.seq, "off"),
               "grouped": per_layer(args.preset, "auto", "allgather", args.seq, "off"),
               "fast": per_layer(args.preset, "auto", "allgather", args.seq, "on")}
    print(f"\n{args.preset}, seq {args.seq}, 1 micro-batch, forward + backward, per layer "
          f"(2-layer minus 1-layer), CPU, allgather dispatcher")
    for name, (_, line) in columns.items():
        print(f"{name + ':':10s}{line}")
    base, grouped, fast = (counts for counts, _ in columns.values())
    headline = ["GEMM calls", "host syncs (item, _local_scalar_dense, nonzero)", "aten::item",
                FUSED_KERNELS, "aten calls"]
    print("\n| per layer per micro-batch | baseline (grouped off, fusions off) | grouped experts "
          "| fast path (grouped, fusions on) | fast / baseline |")
    print("|---|---:|---:|---:|---:|")
    for key in headline:
        b, g, f = base.get(key, 0), grouped.get(key, 0), fast.get(key, 0)
        ratio = f"{f / b:.2f}" if b else ""
        print(f"| {key} | {b:,d} | {g:,d} | {f:,d} | {ratio} |")
    ops = [k for k in set(base) | set(grouped) | set(fast) if k.startswith("aten::")]
    ops.sort(key=lambda k: -max(base.get(k, 0), grouped.get(k, 0), fast.get(k, 0)))
    print(f"\n| op (top {args.top} by count) | baseline | grouped | fast |")
    print("|---|---:|---:|---:|")
    for key in ops[:args.top]:
        print(f"| `{key}` | {base.get(key, 0):,d} | {grouped.get(key, 0):,d} | "
              f"{fast.get(key, 0):,d} |")

if __name__ == "__main__":
    main()
