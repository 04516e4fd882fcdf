"""Operator counts per transformer layer per micro-batch, forward + backward, on CPU.

    python benchmarks/op_count.py                        # genos-1.2b shapes, seq 128
    python benchmarks/op_count.py --preset tiny --top 25
    python benchmarks/op_count.py --whole-step           # host reads of whole training steps

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
All use megatron-core's alltoall token dispatcher (the default, on CPU as on GPU); on a GPU it
copies its split sizes to the host once per layer and micro-batch (an event wait), which the CPU
layer does without a stream.

--whole-step counts the host reads of whole training steps (TrainingRun: schedule, DDP,
optimizer, scheduler, metrics, stop signal, loop) at the default log interval: every `item`,
`tolist`, `float()` / `int()` / `bool()` and `numpy()` of a tensor, by the module that asks
(ours, megatron-core's, torch's). On CPU every tensor is a host tensor, so reads of tensors that a
GPU run keeps on the host (the stop signal's gloo flag, the dispatcher's split sizes after their
copy) are counted too and named as such. Per layer per micro-batch: the difference between a
2-layer and a 1-layer model divided by the micro-batches; per step outside the layers: the rest.
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
    from megatron_geno.model import build_model_chunks
    from megatron_geno.runtime import for_config
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
        line = for_config(cfg).line()
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


# reads of a tensor's value on the host: on a GPU each waits for the device (a synchronisation)
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "__index__")


def _asker(stack) -> str:
    """The first frame outside torch's own machinery: ours, megatron-core's or torch's."""
    for frame in reversed(stack[:-1]):  # the last frame is the mode's handler
        path = frame.filename
        if "/torch/overrides.py" in path or "/torch/_tensor.py" in path:
            continue
        if "megatron_geno" in path or "benchmarks" in path:
            return f"megatron_geno {Path(path).name}:{frame.name}"
        if "/megatron/core/" in path:
            return f"megatron-core {Path(path).name}:{frame.name}"
        return f"torch {Path(path).name}:{frame.name}"
    return "?"


# askers whose tensor a GPU run keeps on the host: reading it waits for nothing there
HOST_RESIDENT = {
    "megatron_geno train.py:close": "the stop signal's gloo flag (a CPU tensor)",
    "torch optimizer.py:_get_value": "Adam's step count (kept on the CPU, without_te._place_steps)",
    "megatron-core moe_utils.py:sort_chunks_by_idxs":
        "split sizes after the dispatcher's one copy to the host per layer",
}


def whole_step_reads(preset: str, layers: int, seq: int, steps: int) -> tuple[dict, int, str]:
    """{asker: host reads} over `steps` training steps after one warm-up step, the number of
    micro-batches per step, and the start-up line."""
    import tempfile
    import traceback

    import torch
    from torch.overrides import TorchFunctionMode

    from megatron_geno import distributed, train as train_module
    from megatron_geno.config import load_config

    reads: collections.Counter = collections.Counter()
    counting = [False]

    class HostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if counting[0] and name in HOST_READS and args and torch.is_tensor(args[0]):
                reads[_asker(traceback.extract_stack())] += 1
            return func(*args, **(kwargs or {}))

    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()  # sized by the previous model's layer count
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"model.preset={preset}", f"model.num_layers={layers}",
                                 f"data.seq_length={seq}", "data.micro_batch_size=1",
                                 "data.global_batch_size=4", f"schedule.train_iters={steps + 1}",
                                 "schedule.warmup_iters=0", "schedule.eval_interval=0",
                                 "logging.quiet=true", "logging.tensorboard=false",
                                 f"logging.log_interval={steps}", f"logging.run_dir={tmp}/run",
                                 f"data.cache_dir={tmp}/cache"])
        run = train_module.TrainingRun(cfg)
        line = run.runtime.line()
        original = run.step

        def step():  # counts from the second step on: the first initialises lazily
            result = original()
            counting[0] = True
            return result

        run.step = step
        with HostReads():
            run.run()
        micro = run.num_micro
        distributed.destroy()
    return dict(reads), micro, line


def whole_step(args) -> None:
    steps = args.steps
    one, micro, line = whole_step_reads(args.preset, 1, args.seq, steps)
    two, _, _ = whole_step_reads(args.preset, 2, args.seq, steps)
    print(f"\n{args.preset}, seq {args.seq}, {micro} micro-batches per step, {steps} steps after "
          f"one warm-up, logging.log_interval={steps}, CPU\n{line}")
    print("\n| host reads, by who asks | per layer per micro-batch | per step outside the "
          "layers | on a GPU |")
    print("|---|---:|---:|---|")
    totals = collections.Counter()
    for asker in sorted(set(one) | set(two)):
        layer = (two.get(asker, 0) - one.get(asker, 0)) / (steps * micro)
        rest = one.get(asker, 0) / steps - layer * micro
        where = HOST_RESIDENT.get(asker)
        kind = "host" if where else ("ours" if asker.startswith("megatron_geno") else "other")
        totals[kind, "layer"] += layer
        totals[kind, "rest"] += rest
        print(f"| {asker} | {layer:g} | {rest:g} | {'host tensor: ' + where if where else 'waits for the device'} |")
    # CPU cannot see it: the alltoall dispatcher waits on its copy's CUDA event once per layer
    print("| megatron-core token_dispatcher.py: the copy's event wait (GPU only) | 1 | 0 | waits "
          "for the device |")
    print(f"| **waits for the device: ours** | **{totals['ours', 'layer']:g}** | "
          f"**{totals['ours', 'rest']:g}** | |")
    print(f"| **waits for the device: megatron-core / torch** | **{totals['other', 'layer'] + 1:g}**"
          f" | **{totals['other', 'rest']:g}** | |")


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
    parser.add_argument("--whole-step", action="store_true",
                        help="host reads of whole training steps instead of per-layer op counts")
    parser.add_argument("--steps", type=int, default=10,
                        help="--whole-step: steps counted, and the log interval (10, the default)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    if args.whole_step:
        whole_step(args)
        return
    columns = {"baseline": per_layer(args.preset, "off", "alltoall", args.seq, "off"),
               "grouped": per_layer(args.preset, "auto", "alltoall", args.seq, "off"),
               "fast": per_layer(args.preset, "auto", "alltoall", args.seq, "on")}
    print(f"\n{args.preset}, seq {args.seq}, 1 micro-batch, forward + backward, per layer "
          f"(2-layer minus 1-layer), CPU, alltoall dispatcher")
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
