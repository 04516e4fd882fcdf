"""Context-parallel attention (megatron_geno.attention) against one process at the same total
length, printed as tables.

    python benchmarks/cp_attention.py                  # CPU: CP 1, 2, 4 over gloo processes
    python benchmarks/cp_attention.py --emulate 32768:8 --emulate 1048576:32   # one GPU

Default (any machine; CP ranks are gloo processes): one layer's attention with genos-1.2b's
shapes (16 heads, 8 key/value groups, head dim 64), fp32, micro batch 1, forward + backward at
--seq total tokens for CP 1, 2 and 4. Per rank: the time (median of --repeats), the peak memory
allocated above the start (torch.profiler's memory timeline), and the bytes the rank sends per
layer, counted from the collectives it runs (ring all-gather: (CP-1) x its chunk; ring
reduce-scatter: (CP-1)/CP x the whole tensor). On CPU the attention kernels are torch's CPU ones
(an explicit mask for each query chunk); times and memory say how the work is divided, not how a
GPU runs it.

--emulate S:CP (GPU; bf16): one CP rank of a phase of S tokens, alone: rank 0's two query chunks
(r and 2CP-1-r, S/(2 CP) positions each) over the keys and values of the whole sequence,
forward + backward, as megatron_geno.attention.attend_chunks runs once K and V are gathered.
Time, TFLOP/s and MFU of the attention (model FLOPs: 3 x the forward's 4 x heads x head_dim x
scored pairs; the bf16 dense peak of the GPU), peak memory beside the memory plan's gathered K/V
term, and, where the whole sequence fits (--reference-up-to), the largest difference from the
same rows of whole-sequence causal flash attention (bf16; differences up to 2e-2 are bf16
rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS, GROUPS, HEAD_DIM = 16, 8, 64  # genos-1.2b


def _inputs(s: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda heads: torch.randn(s, 1, heads, HEAD_DIM, generator=g).to(device, dtype)  # noqa: E731
    return make(HEADS), make(GROUPS), make(GROUPS), make(HEADS)  # q, k, v, output gradient


def _peak_bytes(fn) -> int:
    """Peak bytes allocated on the CPU while fn runs, above the start (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    now = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        now += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, now)
    return peak


def _rank(rank: int, world: int, seq: int, repeats: int, out: str) -> None:
    """One CP rank's forward + backward at CP = world (world 1: the whole sequence)."""
    from megatron.core.tensor_parallel import mappings

    from megatron_geno import attention
    from tests.ranks import cp_chunks

    sent = []  # bytes this rank sends per collective (ring model)
    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def counted_gather(x, group, *a, **k):
        sent.append((group.size() - 1) * x.numel() * x.element_size())
        return gather(x, group, *a, **k)

    def counted_scatter(x, group, *a, **k):
        sent.append((group.size() - 1) * x.numel() * x.element_size() // group.size())
        return scatter(x, group, *a, **k)

    mappings._gather_along_first_dim = counted_gather
    mappings._reduce_scatter_along_first_dim = counted_scatter
    group = torch.distributed.new_group(list(range(world)))
    q, k, v, go = _inputs(seq, torch.float32, "cpu")
    if world > 1:
        q, k, v, go = (cp_chunks(t, group) for t in (q, k, v, go))

    def step():
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        if world > 1:
            o = attention.context_parallel_attention(*inputs, group)
        else:
            o = attention.causal_attention(*(t.permute(1, 2, 0, 3) for t in inputs))
            o = o.permute(2, 0, 1, 3)
        torch.autograd.backward(o, go)

    step()  # warm-up (and the first-call allocations)
    sent.clear()
    step()
    per_layer = sum(sent)
    times = []
    for _ in range(repeats):
        torch.distributed.barrier(group)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _peak_bytes(step)
    result = torch.tensor([statistics.median(times), float(peak), float(per_layer)],
                          dtype=torch.float64)
    torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.MAX, group=group)
    if rank == 0:
        torch.save(result, out)


def cpu_table(seq: int, repeats: int) -> str:
    from tests.ranks import run_on_ranks

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cp in (1, 2, 4):
            out = str(Path(tmp) / f"cp{cp}.pt")
            run_on_ranks(_rank, cp, seq, repeats, out)
            rows.append((cp, *torch.load(out).tolist()))
    base_time, base_peak = rows[0][1], rows[0][2]
    lines = [f"CP attention, one layer, genos-1.2b shapes ({HEADS} heads, {GROUPS} groups, dim "
             f"{HEAD_DIM}), {seq:,d} tokens, micro batch 1, fp32, forward + backward, one "
             f"thread per rank, {repeats} repeats (median; the slowest rank)", "",
             "| CP | time per rank (ms) | x CP 1 | peak per rank (MiB) | x CP 1 | "
             "sent per rank per layer (MiB) |", "|---:|---:|---:|---:|---:|---:|"]
    for cp, seconds, peak, sent in rows:
        lines.append(f"| {cp} | {seconds * 1e3:.1f} | {seconds / base_time:.2f} | "
                     f"{peak / 2**20:.1f} | {peak / base_peak:.2f} | {sent / 2**20:.2f} |")
    return "\n".join(lines)


# ---- one CP rank alone, on a GPU ----------------------------------------------------------------

def _pairs(rank: int, cp: int, c: int) -> int:
    """Query-key pairs rank ``rank``'s two chunks score (bottom-right causal)."""
    total = 0
    for chunk in (rank, 2 * cp - 1 - rank):
        keys = (chunk + 1) * c
        total += c * keys - c * (c - 1) // 2
    return total


def emulate(seq: int, cp: int, reference_up_to: int, device: torch.device) -> dict:
    from launch.plan import context_parallel_gather
    from megatron_geno.attention import attend_chunks
    from megatron_geno.config import ModelConfig
    from megatron_geno.metrics import peak_flops
    from megatron_geno.config import get_preset

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model: ModelConfig = get_preset("genos-1.2b")
    c = seq // (2 * cp)
    q_all, k, v, go_all = _inputs(seq, dtype, device)
    rows = torch.cat([torch.arange(0, c), torch.arange((2 * cp - 1) * c, 2 * cp * c)]).to(device)
    q, go = q_all[rows].contiguous(), go_all[rows].contiguous()

    def step():
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend_chunks(*inputs, 0, cp)
        out.backward(go)
        return out.detach(), inputs

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    start = time.perf_counter()
    out, _ = step()
    sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else None
    flops = 3 * 4 * HEADS * HEAD_DIM * _pairs(0, cp, c)
    peak_device = peak_flops()
    result = {"seq": seq, "cp": cp, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
              "mfu": flops / seconds / peak_device if peak_device else None,
              "peak_gib": None if peak is None else peak / 2**30,
              "plan_gather_gib": context_parallel_gather(model, seq, 1, 1, cp) / 2**30,
              "max_diff": None}
    if seq <= reference_up_to:
        import torch.nn.functional as F

        with torch.no_grad():
            whole = F.scaled_dot_product_attention(
                *(t.permute(1, 2, 0, 3) for t in (q_all, k, v)), is_causal=True,
                enable_gqa=True).permute(2, 0, 1, 3)
        result["max_diff"] = (out.float() - whole[rows].float()).abs().max().item()
    return result


def emulate_table(results: list[dict], device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
    lines = [f"One CP rank alone (rank 0: query chunks 0 and 2CP-1), genos-1.2b attention "
             f"shapes, micro batch 1, {'bf16' if device.type == 'cuda' else 'fp32'}, forward + "
             f"backward, on {name}", "",
             "| tokens | CP | queries per rank | time (ms) | TFLOP/s | MFU | peak GiB | plan: "
             "gathered K/V GiB | max diff from whole-sequence flash |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['seq']:,d} | {r['cp']} | {r['seq'] // r['cp']:,d} | {r['ms']:.1f} | "
                     f"{r['tflops']:.1f} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_gib'], '.2f')} | "
                     f"{r['plan_gather_gib']:.2f} | {fmt(r['max_diff'], '.2e')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096, help="total tokens, CPU table (4096)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--emulate", action="append", metavar="S:CP",
                        help="one CP rank of S tokens alone, on this machine's GPU (or CPU)")
    parser.add_argument("--reference-up-to", type=int, default=32768,
                        help="compare with whole-sequence attention up to this length (32768)")
    args = parser.parse_args()
    if not args.emulate:
        print(cpu_table(args.seq, args.repeats))
        return
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    results = []
    for spec in args.emulate:
        seq, cp = (int(x) for x in spec.split(":"))
        if seq % (2 * cp):
            parser.error(f"--emulate {spec}: {seq} tokens are not divisible by 2 x CP")
        results.append(emulate(seq, cp, args.reference_up_to, device))
    print(emulate_table(results, device))


if __name__ == "__main__":
    main()
