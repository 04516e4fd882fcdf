"""Layout validation and the numbers a launch prints before any GPU is touched."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_geno.config import TrainConfig
from megatron_geno.layout import LayoutError, validate_layout  # noqa: F401 - launch's API
from megatron_geno.presets import count_parameters, resolve_padded_vocab
from megatron_geno.vocab import VOCAB_SIZE

GIB = 1 << 30


@dataclass
class Plan:
    world_size: int
    data_parallel: int
    expert_data_parallel: int
    microbatches: int  # per step, per data-parallel rank
    tokens_per_step: int
    steps: int | None  # for the token budget
    memory: dict[str, float]  # bytes per GPU (estimate), by part


def memory_per_gpu(cfg: TrainConfig, dp: int, expert_dp: int) -> dict[str, float]:
    """Returns an estimate of bytes per GPU on the busiest (first) pipeline stage, by part.

    Parameters bf16 (2 B), gradients fp32 (4 B, megatron-core DDP buffers), optimizer fp32 master
    + Adam moments (12 B) divided over DP (distributed optimizer; expert parameters over the
    expert-DP group). Activations per layer, bf16 with flash attention (no s^2 term), without
    recomputation: attention and norms ~15 x s x b x h, experts 2 x top-k x (h + 3 x ffn) x s x b,
    divided by TP x CP; the first stage holds PP micro-batches in flight under 1F1B, and
    1 + (PP - 1) / (PP x V) times that with V virtual stages (interleaved 1F1B). model.recompute:
    full keeps only each recomputed layer's input (2 x s x b x h) plus one layer being rebuilt;
    selective with moe drops the experts' share.
    """
    m, p, d = cfg.model, cfg.parallel, cfg.data
    tp, pp, cp, ep, etp = (p.tensor_parallel, p.pipeline_parallel, p.context_parallel,
                           p.expert_parallel, p.expert_tp())
    vocab = resolve_padded_vocab(m, VOCAB_SIZE, tp)
    counts = count_parameters(m, vocab)
    expert_params = m.num_layers * m.num_experts * counts["per_expert"]
    dense_params = counts["total"] - expert_params
    # the first stage holds the embedding; the output layer sits on the last (same size)
    layer_dense = (dense_params - counts["embeddings"]) / m.num_layers
    dense_here = (layer_dense * m.num_layers / pp + counts["embeddings"] / 2) / tp
    experts_here = expert_params / pp / (ep * etp)
    params = dense_here + experts_here
    optimizer_shards = dense_here / (dp if p.distributed_optimizer else 1) + experts_here / (
        expert_dp if p.distributed_optimizer else 1)
    s, b, h = d.seq_length, d.micro_batch_size, m.hidden_size
    experts_part = 2 * m.moe_router_topk * (h + 3 * m.moe_ffn_hidden_size) * s * b
    per_layer = 15 * s * b * h + experts_part
    layers_here = m.num_layers / pp
    in_flight = min(pp, max(1, d.global_batch_size // (d.micro_batch_size * dp)))
    if p.virtual_pipeline > 1:
        in_flight *= 1 + (pp - 1) / (pp * p.virtual_pipeline)
    if m.recompute == "full":  # a recomputed layer keeps its input (bf16); one layer is rebuilt
        recomputed = min(m.recompute_layers or layers_here, layers_here)
        stored = recomputed * 2 * s * b * h + (layers_here - recomputed) * per_layer
        activations = (stored * in_flight + per_layer) / (tp * cp)
    else:
        if m.recompute == "selective" and "moe" in m.recompute_modules:
            per_layer -= experts_part  # rebuilt from the layer's saved MoE input
        activations = per_layer / (tp * cp) * layers_here * in_flight
    logits = 4 * s * b * vocab / (tp * cp) if pp == 1 else 0.0  # fp32 logits for the loss
    return {"parameters (bf16)": 2 * params, "gradients (fp32)": 4 * params,
            "optimizer (fp32 master + Adam, sharded)": 12 * optimizer_shards,
            "activations (estimate)": activations + logits}


def plan(cfg: TrainConfig, world_size: int, have_te: bool, token_budget: float | None) -> Plan:
    dp, expert_dp = validate_layout(cfg, world_size, have_te)
    d = cfg.data
    tokens = d.global_batch_size * d.seq_length
    steps = math.ceil(token_budget / tokens) if token_budget else None
    return Plan(world_size, dp, expert_dp, d.global_batch_size // (d.micro_batch_size * dp),
                tokens, steps, memory_per_gpu(cfg, dp, expert_dp))


def format_plan(cfg: TrainConfig, result: Plan, token_budget: float | None) -> str:
    p = cfg.parallel
    lines = [
        f"layout     TP {p.tensor_parallel} x PP {p.pipeline_parallel}"
        f"{f' (virtual stages {p.virtual_pipeline})' if p.virtual_pipeline > 1 else ''} x "
        f"CP {p.context_parallel} x "
        f"DP {result.data_parallel} = {result.world_size} GPUs; EP {p.expert_parallel} x expert-TP "
        f"{p.expert_tp()} x expert-DP {result.expert_data_parallel}; sequence parallel "
        f"{'on' if p.sequence_parallel and p.tensor_parallel > 1 else 'off'}, distributed optimizer "
        f"{'on' if p.distributed_optimizer else 'off'}",
        f"batch      {cfg.data.global_batch_size} sequences x {cfg.data.seq_length:,d} tokens = "
        f"{result.tokens_per_step:,d} tokens/step; micro batch {cfg.data.micro_batch_size}, "
        f"{result.microbatches} micro-batches per step per DP rank",
    ]
    if result.steps is not None:
        lines.append(f"budget     {token_budget:,.0f} tokens = {result.steps:,d} steps "
                     f"(warmup {cfg.schedule.warmup_iters:,d})")
    total = sum(result.memory.values())
    unit, scale = ("GiB", GIB) if total >= GIB / 10 else ("MiB", 1 << 20)
    lines.append(f"memory     ~{total / scale:.1f} {unit} per GPU (first pipeline stage, estimate):")
    lines += [f"             {v / scale:8.2f} {unit}  {k}" for k, v in result.memory.items()]
    return "\n".join(lines)
