"""Megatron torch_dist checkpoint -> HuggingFace Mixtral directory, a layer at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from checkpoint_tools.hf_tokenizer import write_hf_tokenizer
from checkpoint_tools.mapping import RULES, hf_names, to_hf_tensors
from checkpoint_tools.mcore_checkpoint import ConversionError, McoreCheckpoint, open_checkpoint
from checkpoint_tools.output_dir import claimed_out, write_into_new_dir
from megatron_geno.config import ModelConfig
from megatron_geno.units import parse_size
from megatron_geno.checkpointing import saved_tokenizer
from megatron_geno.tokenizer import BOS, EOD, PAD, soft_mask_of_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KNOWN_KEYS = {rule.mcore for rule in RULES}


def shard_bytes(text: str) -> int:
    """--shard-size in bytes (megatron_geno.units.parse_size); ConversionError naming the flag."""
    try:
        size = parse_size(text)
    except ValueError as err:
        raise ConversionError(f"--shard-size: {err}") from None
    if size < 1:
        raise ConversionError(f"--shard-size must be positive, got {text!r}")
    return size


def check_representable(ckpt: McoreCheckpoint, model: ModelConfig) -> None:
    """Refuses checkpoints that Mixtral cannot represent, naming what is in the way."""
    if model.moe_router_pre_softmax:
        raise ConversionError(
            f"{ckpt.path}: moe_router_pre_softmax=True (softmax over all experts, no "
            "renormalisation after top-k) cannot be represented by Mixtral's router"
        )
    tensors = [k for k in ckpt.shapes if not k.startswith(("optimizer.", "chained_"))
               and "_extra_state" not in k and k != "rng_state"]
    for key in tensors:
        if key not in KNOWN_KEYS:
            what = ("biases" if key.endswith(".bias") else "qk-layernorm" if "layernorm" in key
                    and ("q_layernorm" in key or "k_layernorm" in key) else
                    "shared experts" if "shared_expert" in key else "an unmapped tensor")
            raise ConversionError(f"{ckpt.path}: tensor {key} ({what}) has no Mixtral equivalent")


def hf_config(model: ModelConfig, dtype: str) -> dict:
    """Returns config.json for MixtralForCausalLM."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": model.padded_vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.moe_ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": float(model.rotary_base),
        "num_local_experts": model.num_experts,
        "num_experts_per_tok": model.moe_router_topk,
        "router_aux_loss_coef": model.moe_aux_loss_coeff,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "initializer_range": model.init_method_std,
        "bos_token_id": BOS,
        "eos_token_id": EOD,
        "pad_token_id": PAD,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        "geno_preset": model.preset,
    }


class ShardWriter:
    """Writes tensors, in a planned order, into size-bounded safetensors files plus the index,
    with the safetensors library (``save_file``).

    The plan (names and shapes, in the order they will be added) fixes which file each tensor
    goes to before any data is read. A file's tensors are held until its last one arrives, then
    written: memory is bounded by --shard-size (1GB by default), not by the model.
    """

    def __init__(self, out: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_bytes: int) -> None:
        self.out, self.plan, self.dtype = out, plan, dtype
        itemsize = torch.tensor([], dtype=dtype).element_size()
        self.sizes = [itemsize * int(torch.Size(shape).numel()) for _, shape in plan]
        self.file_of, file, used = [], 0, 0
        for size in self.sizes:
            if used and used + size > max_bytes:
                file, used = file + 1, 0
            self.file_of.append(file)
            used += size
        n = file + 1
        self.names = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.next, self.pending = 0, {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape = self.plan[self.next]
        if name != expected or tuple(tensor.shape) != tuple(shape):
            raise ConversionError(f"internal: got {name} {tuple(tensor.shape)}, planned {expected} {shape}")
        self.pending[name] = tensor.to(self.dtype).contiguous()
        file = self.file_of[self.next]
        self.next += 1
        if self.next == len(self.plan) or self.file_of[self.next] != file:
            save_file(self.pending, str(self.out / self.names[file]), metadata={"format": "pt"})
            self.pending = {}

    def finish(self) -> None:
        if self.next != len(self.plan):
            raise ConversionError(f"internal: wrote {self.next} of {len(self.plan)} planned tensors")
        weight_map = {name: self.names[self.file_of[i]] for i, (name, _) in enumerate(self.plan)}
        index = {"metadata": {"total_size": sum(self.sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def conversion_order(model: ModelConfig):
    """Yields (rule, layer, expert) in output order: whole-model tensors, then layer by layer."""
    for rule in RULES:
        if rule.per == "model":
            yield rule, None, None
    for layer in range(model.num_layers):
        for rule in RULES:
            if rule.per == "layer":
                yield rule, layer, None
            elif rule.per == "expert":
                for expert in range(model.num_experts):
                    yield rule, layer, expert


def plan_tensors(ckpt: McoreCheckpoint, model: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Returns every HF (name, shape) in output order, from the stored shapes (no data read)."""
    leading = {"model": 0, "layer": 1, "expert": 2}
    plan = []
    for rule, layer, expert in conversion_order(model):
        if rule.mcore not in ckpt.shapes:
            raise ConversionError(f"{ckpt.path}: tensor {rule.mcore} is missing from the checkpoint")
        stored = torch.empty(ckpt.shapes[rule.mcore][leading[rule.per]:], device="meta")
        parts = to_hf_tensors(rule, stored, model)
        plan += [(n, tuple(t.shape)) for n, t in zip(hf_names(rule, layer, expert), parts)]
    return plan


def mcore_to_hf(checkpoint: str | Path, out: str | Path, dtype: str = "fp32",
                shard_size: str = "1GB", iteration: Optional[int] = None, progress=None,
                verify_checksums: bool = True) -> Path:
    """Writes a HuggingFace Mixtral directory from a geno-train checkpoint; returns its path.

    Reads one layer of one stored tensor at a time; the writer holds one safetensors file's
    tensors until the file is complete (peak memory: about shard_size plus one layer of one
    stored tensor). Writes into a fresh temporary directory beside OUT and renames it to OUT when
    complete.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    out = Path(out)
    with claimed_out(out):
        max_bytes = shard_bytes(shard_size)
        ckpt = open_checkpoint(checkpoint, iteration, verify_checksums)
        model = ckpt.model
        check_representable(ckpt, model)
        plan = plan_tensors(ckpt, model)

        def write(tmp: Path) -> None:
            writer = ShardWriter(tmp, plan, DTYPES[dtype], max_bytes)
            steps = list(conversion_order(model))
            current = (None, None, None)  # (key, layer, tensor): one layer of one stored key in memory
            for rule, layer, expert in progress(steps, desc="tensors") if progress else steps:
                if current[:2] != (rule.mcore, layer):
                    tensor = ckpt.read(rule.mcore) if layer is None else ckpt.read_layer(rule.mcore, layer)
                    current = (rule.mcore, layer, tensor)
                stored = current[2] if expert is None else current[2][expert]
                for name, part in zip(hf_names(rule, layer, expert), to_hf_tensors(rule, stored, model)):
                    writer.add(name, part)
            writer.finish()
            (tmp / "config.json").write_text(json.dumps(hf_config(model, dtype), indent=2) + "\n")
            # the soft-mask policy of the run that saved the checkpoint
            write_hf_tokenizer(tmp, soft_mask_of_spec(saved_tokenizer(ckpt.path)))

        return write_into_new_dir(out, write)
