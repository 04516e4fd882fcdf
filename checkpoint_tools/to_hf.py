"""Megatron torch_dist checkpoint -> HuggingFace Mixtral directory, a layer at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml

from checkpoint_tools.hf_tokenizer import write_hf_tokenizer
from checkpoint_tools.mapping import RULES, hf_names, to_hf_tensors
from checkpoint_tools.mcore_checkpoint import ConversionError, McoreCheckpoint, open_checkpoint
from megatron_geno.config import ModelConfig
from megatron_geno.tokenizer import BOS, EOD, PAD

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KNOWN_KEYS = {rule.mcore for rule in RULES}


def parse_size(text: str) -> int:
    """Returns bytes from '5GB', '500MB', '2GiB' or a plain number."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * units[unit])
    if upper.isdigit():
        return int(upper)
    raise ConversionError(f"--shard-size {text!r} is not a size like 5GB or 500MB")


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


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes a safetensors file tensor by tensor, without building the whole file in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for tensor in tensors.values():
            f.write(tensor.contiguous().view(torch.uint8).numpy().data)


class ShardWriter:
    """Writes tensors into size-bounded safetensors files plus model.safetensors.index.json.

    Pending tensors may be views into a larger stored tensor; ``flush()`` after each stored key
    lets that tensor be freed.
    """

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        write_safetensors(self.out / name, self.pending)
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / tmp_name).rename(self.out / final)
            weight_map.update({tensor: final for tensor in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def tokenizer_policy(ckpt: McoreCheckpoint) -> str:
    """Returns the soft-mask policy of the geno tokenizer the checkpoint was trained with."""
    config_file = ckpt.path / "config.yaml"
    spec = "geno"
    if config_file.exists():
        spec = (yaml.safe_load(config_file.read_text()) or {}).get("data", {}).get("tokenizer", "geno")
    return "keep" if spec == "geno:keep" else "upper"


def mcore_to_hf(checkpoint: str | Path, out: str | Path, dtype: str = "fp32",
                shard_size: str = "5GB", iteration: Optional[int] = None, progress=None) -> Path:
    """Writes a HuggingFace Mixtral directory from a geno-train checkpoint; returns its path.

    Reads one stored tensor at a time and writes it out before reading the next (peak memory:
    the largest stacked key, the experts' fc1, about 2/3 of the model's bytes). Writes into OUT.tmp and renames it to OUT when complete.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output directory {out} exists and is not empty")
    ckpt = open_checkpoint(checkpoint, iteration)
    model = ckpt.model
    check_representable(ckpt, model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, parse_size(shard_size))
    cast = DTYPES[dtype]

    def emit(rule, tensor, layer=None, expert=None):
        for name, part in zip(hf_names(rule, layer, expert), to_hf_tensors(rule, tensor, model)):
            writer.add(name, part.to(cast))

    rules = progress(RULES, desc="tensors") if progress else RULES
    for rule in rules:
        tensor = ckpt.read(rule.mcore)  # one stored key at a time (all its layers)
        if rule.per == "model":
            emit(rule, tensor)
        for layer in range(model.num_layers if rule.per != "model" else 0):
            if rule.per == "layer":
                emit(rule, tensor[layer], layer)
            else:
                for expert in range(model.num_experts):
                    emit(rule, tensor[layer, expert], layer, expert)
        writer.flush()  # the shard holds views of this key: write it before reading the next
        del tensor
    writer.finish()
    (tmp / "config.json").write_text(json.dumps(hf_config(model, dtype), indent=2) + "\n")
    write_hf_tokenizer(tmp, tokenizer_policy(ckpt))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
