"""Grouped-GEMM experts without Transformer Engine: each projection of all local experts is one
``torch._grouped_mm`` call, forward and backward (3 calls per projection instead of 3 per expert).

The module enters through the layer spec (``MoESubmodules.experts``) in place of megatron-core's
``SequentialMLP``, and stores its weights so that checkpoints are interchangeable with it: the
same keys, the same global shapes ([layer, expert, out, in]), the same ``[gate; up]`` global form
of fc1 at any expert-TP, the same (empty) extra state. A checkpoint saved with one loads into the
other, optimizer state included, and the HF conversion does not see which ran.

Weights: ``weight1`` [local experts, fc1 out / expert-TP, hidden] and ``weight2`` [local experts,
hidden, ffn / expert-TP], i.e. each expert's ``linear_fc1.weight`` / ``linear_fc2.weight`` stacked.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

_ALIGN = 16  # torch._grouped_mm wants 16-byte-aligned strides: pad the token axis to this


def grouped_mm_available(dtype: torch.dtype, device: torch.device) -> bool:
    """True where torch._grouped_mm runs this dtype: CPU (fp32, bf16), CUDA bf16 on sm90+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class GroupedLinear(torch.autograd.Function):
    """y[rows of group e] = x[rows of group e] @ w[e].T for all groups, in one call each way.

    x [T, in], w [E, out, in], offs [E] int32 cumulative row counts (empty groups allowed).
    Backward: dx in one grouped call, dw in one grouped call over the padded token axis.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w, offs=offs) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            rows = -(-x.shape[0] // _ALIGN) * _ALIGN  # rows past offs[-1] are not read
            dy_t = _pad_rows(dy, rows).t().contiguous()
            dw = torch._grouped_mm(dy_t, _pad_rows(x, rows), offs=offs).to(w.dtype)
        return dx, dw, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return GroupedLinear.apply(x, w, offs)


class GroupedExperts(MegatronModule):
    """The local experts of an MoE layer as grouped GEMMs (SwiGLU or a plain activation)."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules=None,
                 pg_collection=None) -> None:
        super().__init__(config=config)
        if config.add_bias_linear:
            raise ValueError("GroupedExperts: expert biases are not supported (Genos has none)")
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = (pg_collection.ep, pg_collection.expt_tp,
                                                       pg_collection.expt_dp)
        tp, tp_rank = self.tp_group.size(), self.tp_group.rank()
        ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
        self.gated = config.gated_linear_unit
        fc1_out = 2 * ffn if self.gated else ffn
        self.ffn_local = divide(ffn, tp)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = torch.nn.Parameter(torch.empty(
            num_local_experts, divide(fc1_out, tp), hidden, dtype=config.params_dtype, device=device))
        self.weight2 = torch.nn.Parameter(torch.empty(
            num_local_experts, hidden, self.ffn_local, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            # each expert as SequentialMLP initializes its linear_fc1 (column-parallel) and
            # linear_fc2 (row-parallel) weights
            for e in range(num_local_experts):
                _initialize_affine_weight_cpu(self.weight1.data[e], fc1_out, hidden,
                                              divide(fc1_out, tp), 0, config.init_method,
                                              params_dtype=config.params_dtype,
                                              rank=tp_rank, world_size=tp,
                                              skip_set_tensor_parallel_attributes=True)
                _initialize_affine_weight_cpu(self.weight2.data[e], hidden, ffn, self.ffn_local,
                                              1, config.output_layer_init_method,
                                              params_dtype=config.params_dtype,
                                              rank=tp_rank, world_size=tp,
                                              skip_set_tensor_parallel_attributes=True)
        set_tensor_model_parallel_attributes(self.weight1, True, 1, 1)
        set_tensor_model_parallel_attributes(self.weight2, True, 2, 1)
        for weight in (self.weight1, self.weight2):  # expert parameters: reduced over expert-DP
            weight.allreduce = not config.expert_model_parallel_size > 1
        self.register_load_state_dict_post_hook(_ignore_extra_state)

    def _weighted_activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """activation(fc1 output) x router probability, in h's dtype. With
        ``bias_activation_fusion`` (model.fusions) and SwiGLU: megatron-core's compiled
        ``weighted_bias_swiglu_impl``, as its SequentialMLP experts use it. Besides fewer kernels,
        its backward recomputes SwiGLU from the fc1 output, so the gate, up and SwiGLU tensors
        are not kept for backward (about 30% less activation memory per layer at genos-1.2b)."""
        probs = probs.unsqueeze(-1)
        if self.gated and self.config.bias_activation_fusion and \
                self.config.activation_func is F.silu:
            return weighted_bias_swiglu_impl(h, None, probs)
        if self.gated:
            gate, up = torch.chunk(h, 2, dim=-1)
            return (self.config.activation_func(gate) * up * probs).to(h.dtype)
        return (self.config.activation_func(h) * probs).to(h.dtype)

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor,
                probs: torch.Tensor):
        """Returns (output [tokens, hidden], None) for tokens sorted by local expert."""
        offs = torch.cumsum(tokens_per_expert.to(device=hidden.device), 0).to(torch.int32)
        h = grouped_linear(hidden, self.weight1, offs)
        act = self._weighted_activation(h, probs)
        return grouped_linear(act, self.weight2, offs), None

    # ---- checkpoints: exactly SequentialMLP's keys and global forms ---------------------------

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        if (metadata or {}).get("singleton_local_shards"):
            raise NotImplementedError("GroupedExperts: singleton_local_shards checkpoints")
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        tp_rank, tp = self.tp_group.rank(), self.tp_group.size()
        replica = (0, 0, self.dp_group.rank())
        experts_axis = len(sharded_offsets)
        # the expert axis: this rank's experts are a contiguous block of the global ones
        expert_offsets = (*sharded_offsets, (experts_axis, ep_rank, ep_size))
        state = {}
        fc1_key, fc2_key = f"{prefix}experts.linear_fc1.weight", f"{prefix}experts.linear_fc2.weight"
        fc1 = ShardedTensor.from_rank_offsets(
            fc1_key, self.weight1, *expert_offsets, (experts_axis + 1, tp_rank, tp),
            replica_id=replica, prepend_axis_num=experts_axis)
        state[f"{prefix}weight1"] = (_swiglu_factory(fc1, expert_offsets, experts_axis, tp_rank, tp)
                                     if self.gated else fc1)
        state[f"{prefix}weight2"] = ShardedTensor.from_rank_offsets(
            fc2_key, self.weight2, *expert_offsets, (experts_axis + 2, tp_rank, tp),
            replica_id=replica, prepend_axis_num=experts_axis)
        # SequentialMLP's linears carry an (empty) extra state per expert: keep the keys so a
        # checkpoint of either loads into the other
        num_global = ep_size * self.num_local_experts
        for e in range(self.num_local_experts):
            index = ep_rank * self.num_local_experts + e
            shape = tuple(n for _, _, n in sharded_offsets) + (num_global,)
            offset = tuple(o for _, o, _ in sharded_offsets) + (index,)
            for name in ("linear_fc1", "linear_fc2"):
                state[f"{prefix}local_experts.{e}.{name}._extra_state"] = ShardedObject(
                    f"{prefix}experts.{name}._extra_state", None, shape, offset,
                    replica_id=(0, tp_rank, self.dp_group.rank()))
        return state



def _ignore_extra_state(module, incompatible_keys) -> None:
    """The extra-state keys kept for SequentialMLP compatibility load into nothing here."""
    for key in list(incompatible_keys.unexpected_keys):
        if "_extra_state" in key:
            incompatible_keys.unexpected_keys.remove(key)


def _swiglu_factory(sh_ten: ShardedTensor, expert_offsets: tuple, experts_axis: int,
                    tp_rank: int, tp: int) -> ShardedTensorFactory:
    """fc1's global form is [gate; up] at any expert-TP, while each TP rank holds
    [gate_r; up_r]: stored as two pieces, as megatron-core's swiglu factory does for one expert."""
    axis = experts_axis + 1

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        gate, up = torch.chunk(t, 2, dim=1)
        return [ShardedTensor.from_rank_offsets(key, gate, *expert_offsets, (axis, tp_rank, 2 * tp),
                                                replica_id=replica_id, prepend_axis_num=experts_axis),
                ShardedTensor.from_rank_offsets(key, up, *expert_offsets,
                                                (axis, tp + tp_rank, 2 * tp),
                                                replica_id=replica_id, prepend_axis_num=experts_axis)]

    def merge(pieces):
        with torch.no_grad():
            return torch.cat(pieces, dim=1)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id,
                                flattened_range=sh_ten.flattened_range)
