"""Build the Genos MoE GPTModel on megatron-core for a resolved Runtime (megatron_geno.runtime:
which spec, experts module, fusions and precision), and wrap it in megatron-core's DDP."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_geno import cpu_layer, fusions, without_te
from megatron_geno.attention import SDPAttention
from megatron_geno.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megatron_geno.experts import GroupedExperts
from megatron_geno.initialization import initialize_by_identity
from megatron_geno.norm import RMSNorm
from megatron_geno.arithmetic import resolve_padded_vocab
from megatron_geno.runtime import Runtime, for_config

log = logging.getLogger(__name__)


def recompute_settings(model: ModelConfig, parallel: ParallelConfig) -> dict:
    """megatron-core's recompute fields for model.recompute / recompute_modules / _layers."""
    if model.recompute == "none":
        return {}
    if model.recompute == "selective":  # layernorm needs TE: checked by runtime.resolve
        return {"recompute_granularity": "selective",
                "recompute_modules": list(model.recompute_modules)}
    if model.recompute_layers is None:  # every layer, one at a time
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    return {"recompute_granularity": "full", "recompute_method": "block",
            "recompute_num_layers": model.recompute_layers}


def router_loss_ranks(parallel: ParallelConfig) -> int:
    """The ranks one micro-batch's router tokens are split over (TP with sequence parallelism,
    x CP): the factor megatron-core 0.16.1's per-token loss leaves out of the router's losses.

    With ``calculate_per_token_loss`` its router scales the aux and z losses by this rank's token
    count (router.py, attach_and_log_load_balancing_loss / apply_z_loss), while the loss and the
    gradients are divided by the token count summed over DP x CP only; each rank's share is then
    1 / (TP x CP) of what it is at TP = CP = 1 (measured: TP2 and CP2 losses 6.5e-4 off by step
    5, 1e-7 with the coefficients multiplied by this). Without per-token loss megatron-core
    applies the same factor itself (the schedule's ``cp_group_size`` loss scale)."""
    sp_tp = parallel.tensor_parallel if parallel.sequence_parallel else 1
    return sp_tp * parallel.context_parallel


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, runtime: Runtime
) -> TransformerConfig:
    """Returns megatron-core's TransformerConfig for the Genos architecture on runtime's stack."""
    dtype = runtime.dtype
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim(),
        ffn_hidden_size=model.moe_ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # megatron-core's draws depend on the layout, and build_model_chunks draws every weight
        # again from the seed and its global identity (megatron_geno.initialization); its own
        # initialization stays on all the same: it is also where a tensor-parallel weight is
        # marked as one (set_tensor_model_parallel_attributes), which the gradient norm reads
        init_method_std=model.init_method_std,
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff * router_loss_ranks(parallel),
        moe_z_loss_coeff=model.moe_z_loss_coeff * router_loss_ranks(parallel),
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=runtime.dispatcher,
        moe_grouped_gemm=runtime.experts == "te-grouped",
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_size(),
        # interleaving: unbatched p2p, which at PP=2 sends the two directions on two communicators.
        # Batched p2p puts both in one FIFO per peer, and at PP=2 (prev = next) an activation and a
        # gradient of the same shape arrive swapped. Overlapped p2p (Megatron-LM's default with
        # interleaving) gave run-to-run different losses over gloo, so it stays off (docs/cpu.md).
        overlap_p2p_comm=False,
        batch_p2p_comm=parallel.virtual_pipeline == 1,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tp(),
        sequence_parallel=runtime.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not runtime.cuda,
        **fusions.transformer_fields(runtime),
        gradient_accumulation_fusion=False,
        **recompute_settings(model, parallel),
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
        # the loss is a sum over tokens, divided once by the global batch's token count (over DP
        # x CP, in finalize_model_grads): exact when loss masks leave CP ranks or micro-batches
        # uneven, where a mean per micro-batch would weight their tokens unequally
        calculate_per_token_loss=True,
    )


def layer_spec(config: TransformerConfig, runtime: Runtime, pp_rank: Optional[int] = None,
               vp_stage: Optional[int] = None):
    """Returns the block spec for this pipeline stage (and virtual stage) on runtime's stack:
    TE's fused spec, or local + SDPA + RMSNorm (compiled with runtime.fusions; GroupedExperts
    in place of SequentialMLP where runtime.experts is 'grouped')."""
    if runtime.te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        layer = get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
        return layer
    layer = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, normalization="RMSNorm")
    sub = layer.submodules
    attention = sub.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(attention.submodules, core_attention=SDPAttention),
    )
    norm = ModuleSpec(module=RMSNorm, params={"fused": runtime.fusions})
    mlp = sub.mlp
    if runtime.experts == "grouped":
        moe = mlp.submodules
        mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(
            moe, experts=ModuleSpec(module=GroupedExperts)))
    layer = dataclasses.replace(
        layer,
        submodules=dataclasses.replace(
            sub, input_layernorm=norm, pre_mlp_layernorm=norm, self_attention=attention,
            mlp=mlp,
        ),
    )
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=norm)


def build_model_chunks(cfg: TrainConfig, vocab_size: int, initialize: bool = True,
                       runtime: Optional[Runtime] = None) -> list[GPTModel]:
    """Returns this pipeline stage's GPTModel chunks: one, or parallel.virtual_pipeline of them
    (chunk v holds virtual stage v; model parallel groups must exist). They share one config.
    Their weights depend only on schedule.seed and each weight's global identity, whatever the
    layout; initialize=False leaves them unset, for a caller that loads every weight next.
    runtime: the run's resolved stack (resolved here for a caller that has none)."""
    runtime = runtime or for_config(cfg)
    without_te.patch_missing_transformer_engine()
    config = transformer_config(cfg.model, cfg.parallel, runtime)
    # train() resolves it once (checkpoint's or derived) before building; others derive it here
    padded = resolve_padded_vocab(cfg.model, vocab_size, cfg.parallel.tensor_parallel)
    virtual = cfg.parallel.virtual_pipeline_size()
    chunks = []
    for vp_stage in range(virtual) if virtual else [None]:
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, runtime, vp_stage=vp_stage),
            vocab_size=padded,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            parallel_output=True,
            vp_stage=vp_stage,
        )
        if runtime.cuda:
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    if initialize:
        initialize_by_identity(chunks, cfg.schedule.seed, cfg.model.init_method_std,
                               cfg.model.num_layers)
    return chunks


def build_gpt_model(cfg: TrainConfig, vocab_size: int) -> GPTModel:
    """Returns the one GPTModel chunk of this pipeline stage (no virtual pipeline stages)."""
    if cfg.parallel.virtual_pipeline > 1:
        raise ConfigError("build_gpt_model builds one chunk; use build_model_chunks with "
                          "parallel.virtual_pipeline > 1")
    (model,) = build_model_chunks(cfg, vocab_size)
    return model


def wrap_ddp(model: GPTModel, cfg: TrainConfig, runtime: Optional[Runtime] = None
             ) -> DistributedDataParallel:
    """Wraps a model chunk in megatron-core's DDP (contiguous fp32 grad buffers)."""
    runtime = runtime or for_config(cfg)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce and runtime.cuda,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # megatron-core's check reads two norms per gradient bucket from the device before the
        # reduction (tens of waits per step on a GPU); the loop checks the clipped gradient norm
        # megatron-core reads anyway, the logged loss, and the pending loss before every save
        # (train.py: TrainingDiverged)
        check_for_nan_in_grad=False,
        bucket_size=cpu_layer.ddp_bucket_size(),
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
