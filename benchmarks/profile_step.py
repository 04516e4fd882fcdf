"""Where a training micro-batch spends its time: torch.profiler's top ops as a markdown table.

    python benchmarks/profile_step.py --preset genos-1.2b --layers 12 --seq 8192   # one GPU
    python benchmarks/profile_step.py --preset tiny --seq 256                       # CPU

Forward + backward of one micro-batch (after two warm-up passes), --steps times, on the device
geno-train would use (bf16 on CUDA, fp32 on CPU). Rows are ops by self time on the device (CUDA
kernels time on a GPU, CPU time otherwise), with host time beside the device time: a step whose
host time exceeds its device time is launch-bound.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="genos-1.2b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a geno-train config override (repeatable)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_geno import distributed
    from megatron_geno.config import load_config
    from megatron_geno.model import build_model_chunks
    from megatron_geno.runtime import for_config
    from megatron_geno.tokenizer import VOCAB_SIZE

    logging.disable(logging.WARNING)
    cfg = load_config(None, [f"model.preset={args.preset}", f"model.num_layers={args.layers}",
                             f"data.seq_length={args.seq}", f"data.micro_batch_size={args.mbs}",
                             f"data.global_batch_size={args.mbs}", *args.set])
    distributed.initialize(cfg, seed=1234)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    try:
        (model,) = build_model_chunks(cfg, VOCAB_SIZE)
        tokens = torch.randint(5, 9, (args.mbs, args.seq), device=device)
        positions = torch.arange(args.seq, device=device)[None].expand(args.mbs, -1)

        def step():
            model.zero_grad(set_to_none=True)
            loss = model(tokens, positions, None, labels=tokens).float().mean()
            loss.backward()

        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.steps
        averages = prof.key_averages()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in averages) or 1.0
        host = sum(e.self_cpu_time_total for e in averages)
        print(f"\n{for_config(cfg).line()}; {args.preset} L={args.layers} seq={args.seq} mbs={args.mbs}, "
              f"{args.steps} micro-batches (forward + backward)")
        print(f"per micro-batch: wall {wall * 1e3:.1f} ms, host op time {host / args.steps / 1e3:.1f}"
              f" ms, {'device' if cuda else 'CPU'} op time {total / args.steps / 1e3:.1f} ms\n")
        print(f"| op | calls per micro-batch | self {'device' if cuda else 'CPU'} ms per "
              f"micro-batch | share |")
        print("|---|---:|---:|---:|")
        for e in sorted(averages, key=lambda e: -getattr(e, key))[:args.top]:
            print(f"| `{e.key[:60]}` | {e.count / args.steps:,.0f} | "
                  f"{getattr(e, key) / args.steps / 1e3:.2f} | {getattr(e, key) / total:.1%} |")
        if cuda:
            print(f"\npeak allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    finally:
        distributed.destroy()


if __name__ == "__main__":
    main()
