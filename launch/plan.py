"""Layout validation and the numbers a launch prints before any GPU is touched."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_geno.config import ModelConfig, TrainConfig
from megatron_geno.layout import LayoutError, validate_layout  # noqa: F401 - launch's API
from megatron_geno.arithmetic import count_parameters, resolve_padded_vocab
from megatron_geno.vocab import VOCAB_SIZE

GIB = 1 << 30
GPU_MEMORY_GIB = 80.0  # the recipes are sized for an 80 GB GPU (H100 / A100: 79.6-80 GiB)
# not in the plan: the CUDA context, NCCL and cuBLAS workspaces, the caching allocator's
# fragmentation (MoE's token counts change every step); the plan's total stays under the rest
HEADROOM = 0.15
RECIPE_DATA_PARALLEL = 8  # the recipes' micro-batch is sized at DP 8 (more DP needs less memory)


@dataclass
class Plan:
    world_size: int
    data_parallel: int
    expert_data_parallel: int
    microbatches: int  # per step, per data-parallel rank
    tokens_per_step: int
    steps: int | None  # for the token budget
    memory: dict[str, float]  # bytes per GPU (estimate), by part
    gpu_gib: float  # the GPU's memory the plan is checked against
    largest_micro_batch: int | None  # the largest that fits it (global batch unchanged)
    save_host: dict[str, float]  # host bytes per process while a checkpoint is saved, by part


def _norm_bytes(m: ModelConfig) -> int:
    """Bytes per token an RMSNorm keeps: its bf16 input (and, eager, an fp32 copy) and 1/rms.
    model.fusions auto counts as on: it is on wherever CUDA runs the job."""
    e, h = 2, m.hidden_size
    return e * h + 4 if m.fusions != "off" else 4 * h + e * h + 4


def layer_activations(m: ModelConfig, seq: float, batch: int,
                      recomputed: bool = False) -> dict[str, float]:
    """Bytes one transformer layer keeps for its backward pass, by part, for a micro-batch of
    ``batch`` sequences of which this GPU holds ``seq`` positions (bf16, flash attention). RoPE's
    tensors are per position, the rest per token. ``recomputed``: a layer of
    model.recompute=full, which keeps only its input; model.recompute=selective drops the
    recomputed modules' part.

    Each term is a tensor megatron-core's layer (local spec, SDPA, grouped or sequential experts)
    saves for backward, per token; tests/unit/test_memory_plan.py measures those tensors on CPU
    (autograd's saved-tensor hooks) and holds this to within 1%. With ``model.fusions`` on (the
    GPU default) RMSNorm keeps its bf16 input and SwiGLU recomputes from the fc1 output; eager
    (fusions off) RMSNorm also keeps an fp32 copy and the SwiGLU keeps its gate, up and product.
    """
    e, h, d = 2, m.hidden_size, m.head_dim()
    heads, groups, ffn, k, experts = (m.num_attention_heads, m.num_query_groups,
                                      m.moe_ffn_hidden_size, m.moe_router_topk, m.num_experts)
    tokens = seq * batch
    if recomputed:
        return {"layer input": e * h * tokens}
    fused = m.fusions != "off"  # auto: on wherever CUDA runs the job
    if fused:
        expert_token = e * h + 3 * e * ffn + 4  # input, fc1 output, fc2 input, probability
    else:
        expert_token = e * h + (5 if m.moe_grouped_gemm != "off" else 6) * e * ffn + 4
    parts = {
        "norms": 2 * _norm_bytes(m),
        # the QKV projection's input; q and k after RoPE; the QKV output (v is a view of it);
        # the attention output; the log-sum-exp
        "attention": (e * h + e * heads * d + e * groups * d + e * (heads + 2 * groups) * d
                      + e * heads * d + 4 * heads),
        "router": e * h + 8 * experts + 20 * k + 4,  # input, logits, scores, top-k
        "experts": k * expert_token + 8 * k + 5 * experts,  # and the dispatcher's maps
    }
    if m.recompute == "selective":
        if "moe" in m.recompute_modules:  # router and experts rebuilt from the layer's input
            parts["router"], parts["experts"] = e * h, 0.0
        if "core_attn" in m.recompute_modules:  # q, k, v stay as its recompute's inputs
            parts["attention"] -= 4 * heads
    result = {part: per_token * tokens for part, per_token in parts.items()}
    if not fused:  # eager RoPE's cos and sin for q and k, per position
        result["attention"] += 4 * e * d * seq
    return result


def context_parallel_gather(m: ModelConfig, seq_length: int, batch: int, tp: int,
                            cp: int) -> float:
    """Bytes of the largest transient of context-parallel attention (bf16), for one layer at a
    time: in backward, the whole sequence's K and V gathered again over the CP group (this
    GPU's query groups, s x b x groups / TP x head dim each) and their gradients before the
    reduce-scatter; the forward holds half of it. Nothing of it is kept between layers
    (megatron_geno.attention keeps only this rank's chunks for backward); 0 without CP."""
    if cp == 1:
        return 0.0
    return 4 * 2 * seq_length * batch * (m.num_query_groups // tp) * m.head_dim()


def outside_layers_activations(m: ModelConfig, seq: float, batch: int, vocab: int) -> float:
    """Bytes kept for backward outside the layers (as ``layer_activations``): final norm, output
    layer input, fp32 logits for the loss, token ids; fused, RoPE's fp32 angles (per position)."""
    fused = m.fusions != "off"
    return ((_norm_bytes(m) + 2 * m.hidden_size + 4 * vocab + 17) * seq * batch
            + (4 * m.head_dim() * seq if fused else 0))


def _parameters_here(cfg: TrainConfig, dp: int, expert_dp: int) -> tuple[float, float]:
    """(parameters of the first stage's model-parallel shard, this GPU's share of their
    optimizer state: divided over DP, and expert-DP for the experts, by the distributed
    optimizer)."""
    m, p = cfg.model, cfg.parallel
    tp, pp, ep, etp = p.tensor_parallel, p.pipeline_parallel, p.expert_parallel, p.expert_tp()
    counts = count_parameters(m, resolve_padded_vocab(m, VOCAB_SIZE, tp))
    expert_params = m.num_layers * m.num_experts * counts["per_expert"]
    dense_params = counts["total"] - expert_params
    # the first stage holds the embedding; the output layer sits on the last (same size)
    layer_dense = (dense_params - counts["embeddings"]) / m.num_layers
    dense_here = (layer_dense * m.num_layers / pp + counts["embeddings"] / 2) / tp
    experts_here = expert_params / pp / (ep * etp)
    optimizer_shards = dense_here / (dp if p.distributed_optimizer else 1) + experts_here / (
        expert_dp if p.distributed_optimizer else 1)
    return dense_here + experts_here, optimizer_shards


def save_host_memory(cfg: TrainConfig, dp: int, expert_dp: int) -> dict[str, float]:
    """Host (CPU) memory a checkpoint save takes for a while, in bytes per process, by part.

    Every rank writes its own share and no rank gathers another's (megatron_geno.checkpoint.
    optimizer_shards): its own optimizer shard (fp32 master weights and both Adam moments, 12 B
    per parameter of it) and its 1/DP of the replicated bf16 weights (megatron-core's fully
    parallel save spreads them over the data-parallel group), staged in host memory for
    torch_dist's writer, synchronous or checkpoint.async_save alike."""
    params, optimizer_shards = _parameters_here(cfg, dp, expert_dp)
    return {"own share staged for the writer (every rank, no gather)":
            2 * params / dp + 12 * optimizer_shards}


def memory_per_gpu(cfg: TrainConfig, dp: int, expert_dp: int) -> dict[str, float]:
    """Returns an estimate of bytes per GPU on the busiest (first) pipeline stage, by part.

    Parameters bf16 (2 B), gradients fp32 (4 B, megatron-core DDP buffers), optimizer fp32 master
    + Adam moments (12 B) divided over DP (distributed optimizer; expert parameters over the
    expert-DP group). Activations: ``layer_activations`` per layer for this GPU's s x b / (TP x
    CP) tokens; the first stage holds PP micro-batches in flight under 1F1B, and
    1 + (PP - 1) / (PP x V) times that with V virtual stages (interleaved 1F1B). model.recompute:
    full keeps only each recomputed layer's input plus one layer being rebuilt; selective drops
    the recomputed modules' share. Backward working memory: the largest transient of one
    layer's backward, the gradient of the experts' fc1 output and the bf16 weight gradient of
    one layer's fc1 experts (benchmarks/memory_plan.py compares with the peak torch's memory
    profiler measures on CPU); with CP, one layer's gathered K/V and their gradients
    (``context_parallel_gather``). Not included: the CUDA context, NCCL and cuBLAS workspaces and
    the caching allocator's fragmentation; ``fits`` leaves room for them.
    """
    m, p, d = cfg.model, cfg.parallel, cfg.data
    tp, pp, cp, ep, etp = (p.tensor_parallel, p.pipeline_parallel, p.context_parallel,
                           p.expert_parallel, p.expert_tp())
    vocab = resolve_padded_vocab(m, VOCAB_SIZE, tp)
    params, optimizer_shards = _parameters_here(cfg, dp, expert_dp)
    seq, batch = d.seq_length / (tp * cp), d.micro_batch_size  # this GPU's share
    tokens = seq * batch
    per_layer = sum(layer_activations(m, seq, batch).values())
    layers_here = m.num_layers / pp
    in_flight = min(pp, max(1, d.global_batch_size // (d.micro_batch_size * dp)))
    if p.virtual_pipeline > 1:
        in_flight *= 1 + (pp - 1) / (pp * p.virtual_pipeline)
    if m.recompute == "full":  # a recomputed layer keeps its input; one layer is rebuilt
        recomputed = min(m.recompute_layers or layers_here, layers_here)
        stored = (recomputed * sum(layer_activations(m, seq, batch, recomputed=True).values())
                  + (layers_here - recomputed) * per_layer)
        activations = stored * in_flight + per_layer
    else:
        activations = per_layer * layers_here * in_flight
    if pp == 1:
        activations += outside_layers_activations(m, seq, batch, vocab)
    fc1_out = 2 * m.moe_ffn_hidden_size
    working = (2 * m.moe_router_topk * fc1_out / etp * tokens
               + 2 * m.num_experts / ep * fc1_out / etp * m.hidden_size)
    memory = {"parameters (bf16)": 2 * params, "gradients (fp32)": 4 * params,
              "optimizer (fp32 master + Adam, sharded)": 12 * optimizer_shards,
              "activations (estimate)": activations,
              "backward working memory (estimate)": working}
    if cp > 1:
        memory["context-parallel K/V gather (one layer)"] = context_parallel_gather(
            m, d.seq_length, batch, tp, cp)
    return memory


def fits(memory: dict[str, float], gpu_gib: float) -> bool:
    """True when the plan's total leaves HEADROOM of a GPU with gpu_gib GiB free."""
    return sum(memory.values()) <= gpu_gib * GIB * (1 - HEADROOM)


def largest_micro_batch(cfg: TrainConfig, world_size: int,
                        gpu_gib: float = GPU_MEMORY_GIB) -> int | None:
    """The largest power-of-two micro batch whose plan fits a GPU of gpu_gib GiB at this layout
    and world size, the global batch unchanged; None when even 1 does not fit."""
    best, mbs = None, 1
    while mbs <= cfg.data.global_batch_size:
        trial = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size=mbs))
        try:
            dp, expert_dp = validate_layout(trial, world_size)
        except LayoutError:  # the global batch no longer divides by micro batch x DP
            break
        if not fits(memory_per_gpu(trial, dp, expert_dp), gpu_gib):
            break
        best, mbs = mbs, mbs * 2
    return best


def plan(cfg: TrainConfig, world_size: int, token_budget: float | None,
         gpu_gib: float = GPU_MEMORY_GIB) -> Plan:
    dp, expert_dp = validate_layout(cfg, world_size)
    d = cfg.data
    tokens = d.global_batch_size * d.seq_length
    steps = math.ceil(token_budget / tokens) if token_budget else None
    return Plan(world_size, dp, expert_dp, d.global_batch_size // (d.micro_batch_size * dp),
                tokens, steps, memory_per_gpu(cfg, dp, expert_dp), gpu_gib,
                largest_micro_batch(cfg, world_size, gpu_gib),
                save_host_memory(cfg, dp, expert_dp))


ASSUMED_MFU = 0.35  # for when saves fall in time: a plan, not a measurement


def save_schedule(cfg: TrainConfig, result: Plan) -> str:
    """When saves fall: by step (checkpoint.save_interval), by wall time (checkpoint.
    save_interval_minutes, over a step time expected at ASSUMED_MFU of an H100's bf16 peak),
    and what retention keeps."""
    from megatron_geno.arithmetic import PEAK_BF16_FLOPS, flops_per_token

    c = cfg.checkpoint
    if not c.save:
        return "saves      none (checkpoint.save is not set)"
    vocab = cfg.model.padded_vocab_size or 128
    step_s = (result.tokens_per_step * flops_per_token(cfg.model, vocab, cfg.data.seq_length)
              / (result.world_size * PEAK_BF16_FLOPS["H100"] * ASSUMED_MFU))
    parts = [f"a step ~{step_s / 60:.1f} min at {ASSUMED_MFU:.0%} MFU"]
    if c.save_interval:
        parts.append(f"every {c.save_interval:,d} steps (~{c.save_interval * step_s / 3600:.1f} h)")
    if c.save_interval_minutes:
        every = max(1, math.ceil(c.save_interval_minutes * 60 / step_s))
        parts.append(f"every {c.save_interval_minutes:g} min of wall time (~every {every:,d} "
                     f"steps)")
    if result.steps:
        due = [c.save_interval] if c.save_interval else []
        if c.save_interval_minutes:
            due.append(max(1, math.ceil(c.save_interval_minutes * 60 / step_s)))
        count = (result.steps - 1) // min(due) if due else 0
        parts.append(f"~{count:,d} saves in {result.steps:,d} steps, plus the end")
    parts.append(f"keeping the last {c.keep_last}" if c.keep_last else "keeping all")
    return "saves      " + "; ".join(parts)


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
    save = result.save_host
    lines.append("save       host memory per process while a checkpoint is written: "
                 + "; ".join(f"{v / GIB:.1f} GiB {k}" for k, v in save.items()))
    lines.append(save_schedule(cfg, result))
    room = (f"{result.gpu_gib * (1 - HEADROOM):.1f} GiB ({result.gpu_gib:g} GiB per GPU less "
            f"{HEADROOM:.0%} headroom)")
    best = result.largest_micro_batch
    largest = (f"the largest micro batch that fits is {best}" if best else
               "no micro batch fits: more model or context parallelism, or model.recompute")
    if fits(result.memory, result.gpu_gib):
        lines.append(f"fits       in {room}; {largest}")
    else:
        lines.append(f"warning    the estimate exceeds {room}; {largest}")
    return "\n".join(lines)
