"""The one parallel-layout validator (DESIGN decision 11): geno-train, geno-launch and the
distributed set-up all call it, and nothing else checks a layout."""

from __future__ import annotations

from megatron_geno.config import ConfigError, TrainConfig


class LayoutError(ConfigError):
    """A parallel layout that cannot run; the message names every rule broken, with its numbers."""


def layout_violations(cfg: TrainConfig, world_size: int) -> list[str]:
    """Every rule the layout breaks, each with the numbers at fault (empty: it can run).

    Rules: world size divisible by TP x PP x CP (the rest is DP); EP x expert-TP divides
    TP x CP x DP and experts divide by EP; heads and query groups divisible by TP; MoE with TP > 1
    uses sequence parallelism; layers divisible by PP x virtual stages, which need PP > 1 and
    micro-batches per step divisible by PP; sequence length divisible by 2 x CP (x TP with
    sequence parallelism); global batch divisible by micro batch x DP; context parallelism with
    causal attention only (no per-document attention mask). Context parallelism runs on either
    attention (megatron_geno.attention without Transformer Engine), so no rule asks for TE.
    """
    m, p, d = cfg.model, cfg.parallel, cfg.data
    tp, pp, cp, ep, etp, vp = (p.tensor_parallel, p.pipeline_parallel, p.context_parallel,
                               p.expert_parallel, p.expert_tp(), p.virtual_pipeline)
    faults = []
    model_parallel = tp * pp * cp
    dp = world_size // model_parallel if world_size % model_parallel == 0 else None
    if dp is None:
        faults.append(f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} "
                      f"x {cp} = {model_parallel}")
    elif (tp * cp * dp) % (ep * etp):
        faults.append(f"EP x expert-TP = {ep} x {etp} = {ep * etp} does not divide TP x CP x DP "
                      f"= {tp} x {cp} x {dp} = {tp * cp * dp} (the ranks of one pipeline stage)")
    if m.num_experts % ep:
        faults.append(f"{m.num_experts} experts are not divisible by EP = {ep}")
    if m.num_attention_heads % tp or m.num_query_groups % tp:
        faults.append(f"{m.num_attention_heads} attention heads and {m.num_query_groups} query "
                      f"groups must both be divisible by TP = {tp}")
    if tp > 1 and not p.sequence_parallel:
        faults.append(f"MoE with TP = {tp} needs parallel.sequence_parallel=true")
    if vp > 1 and pp == 1:
        faults.append(f"{vp} virtual pipeline stages need PP > 1 (they split each stage)")
    if m.num_layers % (pp * vp):
        stages = f"PP x virtual stages = {pp} x {vp} = {pp * vp}" if vp > 1 else f"PP = {pp}"
        faults.append(f"{m.num_layers} layers are not divisible by {stages}")
    sp = p.sequence_parallel and tp > 1
    seq_multiple = (2 * cp if cp > 1 else 1) * (tp if sp else 1)
    if d.seq_length % seq_multiple:
        what = " x ".join(filter(None, [f"2 x CP ({2 * cp})" if cp > 1 else "",
                                        f"TP ({tp}, sequence parallelism)" if sp else ""]))
        faults.append(f"sequence length {d.seq_length} is not divisible by {what} = "
                      f"{seq_multiple}")
    if dp is not None:
        if d.global_batch_size % (d.micro_batch_size * dp):
            if d.global_batch_size % dp:
                fix = "change the world size or data.global_batch_size"
            else:  # the largest micro batch, up to the configured one, that divides
                per_rank = d.global_batch_size // dp
                fits = max(m for m in range(1, d.micro_batch_size + 1) if per_rank % m == 0)
                fix = f"data.micro_batch_size={fits} divides it"
            faults.append(f"global batch {d.global_batch_size} is not divisible by micro batch x "
                          f"DP = {d.micro_batch_size} x {dp} = {d.micro_batch_size * dp} ({fix})")
        elif vp > 1 and (d.global_batch_size // (d.micro_batch_size * dp)) % pp:
            micro = d.global_batch_size // (d.micro_batch_size * dp)
            faults.append(f"{vp} virtual pipeline stages need micro-batches per step ({micro} = "
                          f"global batch {d.global_batch_size} / (micro batch "
                          f"{d.micro_batch_size} x DP {dp})) divisible by PP = {pp}")
    if cp > 1 and d.reset_attention_mask:
        faults.append(f"data.reset_attention_mask (no attention across documents) does not run "
                      f"with CP = {cp}: context-parallel attention is causal over the whole "
                      f"sequence; set data.reset_attention_mask=false or "
                      f"parallel.context_parallel=1")
    return faults


def validate_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """Returns (DP, expert DP); LayoutError listing every violation when the layout cannot run."""
    faults = layout_violations(cfg, world_size)
    if faults:
        raise LayoutError("; ".join(faults))
    p = cfg.parallel
    dp = world_size // (p.tensor_parallel * p.pipeline_parallel * p.context_parallel)
    return dp, p.tensor_parallel * p.context_parallel * dp // (p.expert_parallel * p.expert_tp())
