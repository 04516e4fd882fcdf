"""Declarative name and layout mapping between megatron-core checkpoints and HuggingFace Mixtral.

megatron-core's torch_dist checkpoints store every tensor in a canonical global form that does not
depend on TP/PP/EP: per-layer tensors are stacked on a leading ``[layer]`` axis and expert tensors
on ``[layer, expert]``. Each row below maps one such key to HuggingFace names (classic Mixtral
names, which every transformers version loads), with ``{layer}`` / ``{expert}`` placeholders and a
layout rule:

- ``copy``: the same tensor.
- ``qkv``: megatron's fused QKV is interleaved per query group -- for each of the G groups, the
  group's H/G query heads, then its key head, then its value head -- split into q, k, v.
- ``fc1``: an expert's fused first projection is ``[gate; up]`` (w1; w3), in the global form at
  any TP (megatron-core's swiglu sharding keeps it so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rule:
    mcore: str  # key in the torch_dist checkpoint
    hf: tuple[str, ...]  # HuggingFace names produced from it
    per: str  # "model", "layer" or "expert": which leading axes the stored tensor has
    layout: str = "copy"  # copy / qkv / fc1


RULES = [
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "model"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "model"),
    Rule("output_layer.weight", ("lm_head.weight",), "model"),
    Rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
         ("model.layers.{layer}.input_layernorm.weight",), "layer"),
    Rule("decoder.layers.self_attention.linear_qkv.weight",
         ("model.layers.{layer}.self_attn.q_proj.weight",
          "model.layers.{layer}.self_attn.k_proj.weight",
          "model.layers.{layer}.self_attn.v_proj.weight"), "layer", "qkv"),
    Rule("decoder.layers.self_attention.linear_proj.weight",
         ("model.layers.{layer}.self_attn.o_proj.weight",), "layer"),
    Rule("decoder.layers.mlp.linear_fc1.layer_norm_weight",
         ("model.layers.{layer}.post_attention_layernorm.weight",), "layer"),
    Rule("decoder.layers.mlp.router.weight",
         ("model.layers.{layer}.block_sparse_moe.gate.weight",), "layer"),
    Rule("decoder.layers.mlp.experts.experts.linear_fc1.weight",
         ("model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
          "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight"), "expert", "fc1"),
    Rule("decoder.layers.mlp.experts.experts.linear_fc2.weight",
         ("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",), "expert"),
]

# safetensors dtype names (the file format's own) <-> torch dtypes, both directions of conversion
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}

# transformers >= 5 names the same tensors differently (fused experts); from-hf reads both.
CURRENT_HF_NAMES = {
    "router": "model.layers.{layer}.mlp.gate.weight",
    "gate_up": "model.layers.{layer}.mlp.experts.gate_up_proj",  # [E, 2I, H] = [gate; up]
    "down": "model.layers.{layer}.mlp.experts.down_proj",  # [E, H, I]
}


def hf_names(rule: Rule, layer: int | None = None, expert: int | None = None) -> list[str]:
    return [name.format(layer=layer, expert=expert) for name in rule.hf]


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> list[torch.Tensor]:
    """Returns [q, k, v] from megatron's per-group interleaved fused QKV weight."""
    per_group = heads // groups
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(groups, per_group + 2, head_dim, hidden)
    q = grouped[:, :per_group].reshape(heads * head_dim, hidden)
    k = grouped[:, per_group].reshape(groups * head_dim, hidden)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, hidden)
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
              head_dim: int) -> torch.Tensor:
    """Returns megatron's per-group interleaved fused QKV weight from q, k, v."""
    per_group = heads // groups
    hidden = q.shape[-1]
    parts = [
        q.reshape(groups, per_group, head_dim, hidden),
        k.reshape(groups, 1, head_dim, hidden),
        v.reshape(groups, 1, head_dim, hidden),
    ]
    return torch.cat(parts, dim=1).reshape(-1, hidden).contiguous()


def split_fc1(fc1: torch.Tensor) -> list[torch.Tensor]:
    """Returns [gate (w1), up (w3)] from an expert's fused [gate; up] projection."""
    gate, up = fc1.chunk(2, dim=0)
    return [gate.contiguous(), up.contiguous()]


def to_hf_tensors(rule: Rule, tensor: torch.Tensor, model) -> list[torch.Tensor]:
    """Applies a rule's layout to one stored tensor (one layer / expert slice)."""
    if rule.layout == "qkv":
        return split_qkv(tensor, model.num_attention_heads, model.num_query_groups, model.head_dim())
    if rule.layout == "fc1":
        return split_fc1(tensor)
    return [tensor]


def mcore_slice_shape(rule: Rule, model) -> tuple[int, ...]:
    """The shape of one stored slice of a rule's key (one layer, or one expert of a layer)."""
    h, heads, groups, hd = (model.hidden_size, model.num_attention_heads, model.num_query_groups,
                            model.head_dim())
    vocab, ffn = model.padded_vocab_size, model.moe_ffn_hidden_size
    shapes = {
        "embedding.word_embeddings.weight": (vocab, h),
        "decoder.final_layernorm.weight": (h,),
        "output_layer.weight": (vocab, h),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (h,),
        "decoder.layers.self_attention.linear_qkv.weight": ((heads + 2 * groups) * hd, h),
        "decoder.layers.self_attention.linear_proj.weight": (h, heads * hd),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (h,),
        "decoder.layers.mlp.router.weight": (model.num_experts, h),
        "decoder.layers.mlp.experts.experts.linear_fc1.weight": (2 * ffn, h),
        "decoder.layers.mlp.experts.experts.linear_fc2.weight": (h, ffn),
    }
    return shapes[rule.mcore]


def hf_shapes(rule: Rule, model) -> list[tuple[int, ...]]:
    """The HuggingFace (classic name) shapes a rule produces for one layer / expert."""
    stored = torch.empty(mcore_slice_shape(rule, model), device="meta")
    return [tuple(t.shape) for t in to_hf_tensors(rule, stored, model)]


def current_hf_shapes(model) -> dict[str, tuple[int, ...]]:
    """The shapes of transformers >= 5's fused expert and router tensors (per layer)."""
    e, h, ffn = model.num_experts, model.hidden_size, model.moe_ffn_hidden_size
    return {"router": (e, h), "gate_up": (e, 2 * ffn, h), "down": (e, h, ffn)}
