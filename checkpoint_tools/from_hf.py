"""HuggingFace Mixtral directory -> torch_dist checkpoint that geno-train loads at any TP/PP/EP."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import yaml

from checkpoint_tools.mapping import CURRENT_HF_NAMES, RULES, hf_names, merge_qkv
from checkpoint_tools.mcore_checkpoint import ConversionError
from checkpoint_tools.torch_dist_writer import TorchDistWriter
from megatron_geno.config import ModelConfig, TrainConfig
from megatron_geno.presets import PRESETS


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as err:
        raise ConversionError(f"cannot read {path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err
    if config.get("model_type") != "mixtral":
        raise ConversionError(
            f"{path}: model_type {config.get('model_type')!r} is not a Mixtral architecture "
            f"(architectures: {config.get('architectures')})"
        )
    if config.get("sliding_window"):
        raise ConversionError(f"{path}: sliding_window={config['sliding_window']} is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{path}: hidden_act={config['hidden_act']!r}; Genos experts use silu")
    return config


def model_config_from_hf(config: dict) -> ModelConfig:
    """Returns the ModelConfig that config.json describes."""
    heads = config["num_attention_heads"]
    preset = config.get("geno_preset") if config.get("geno_preset") in PRESETS else "genos-1.2b"
    return dataclasses.replace(
        PRESETS[preset],
        preset=preset,
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads", heads),
        kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
        num_experts=config["num_local_experts"],
        moe_router_topk=config["num_experts_per_tok"],
        moe_ffn_hidden_size=config["intermediate_size"],
        norm_epsilon=config.get("rms_norm_eps", 1e-5),
        rotary_base=int(config.get("rope_theta", 1e6)),
        max_position_embeddings=config.get("max_position_embeddings", 1_048_576),
        moe_aux_loss_coeff=config.get("router_aux_loss_coef", 1e-3),
        padded_vocab_size=config["vocab_size"],
    )


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


class SafetensorsDir:
    """The tensors of a (sharded) safetensors directory, read one at a time with plain reads.

    No mmap: mapped pages a conversion has touched would stay in its resident memory.
    """

    def __init__(self, hf_dir: Path) -> None:
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / "model.safetensors").exists():
            weight_map = None
        else:
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.where: dict[str, tuple] = {}
        for name in files:
            path = hf_dir / name
            if not path.exists():
                raise ConversionError(f"{hf_dir}: shard {name} listed in the index is missing")
            self.where.update(self._read_header(path))
        if weight_map:
            missing = [k for k in weight_map if k not in self.where]
            if missing:
                raise ConversionError(f"{hf_dir}: tensor {missing[0]} listed in the index is in no shard")

    @staticmethod
    def _read_header(path: Path) -> dict[str, tuple]:
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if not 0 < length <= size - 8:
                    raise ValueError("bad header length")
                header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as err:
            raise ConversionError(f"{path} is not a readable safetensors file ({err})") from err
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if 8 + length + end > size:
                raise ConversionError(
                    f"{path} is not a readable safetensors file (tensor {name} extends past the "
                    f"end of the file: truncated?)"
                )
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            entries[name] = (path, 8 + length + begin, end - begin,
                             SAFETENSORS_DTYPES[info["dtype"]], info["shape"])
        return entries

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"tensor {name} is missing from the safetensors files")
        path, offset, length, dtype, shape = self.where[name]
        with path.open("rb") as f:
            f.seek(offset)
            data = bytearray(f.read(length))
        if len(data) != length:
            raise ConversionError(f"{path}: tensor {name} is truncated")
        return torch.frombuffer(data, dtype=dtype).reshape(shape) if length else torch.empty(shape, dtype=dtype)


def layer_tensor(rule, st: SafetensorsDir, model: ModelConfig, layer: int) -> torch.Tensor:
    """Returns one layer of a megatron key from HF tensors (classic or current names);
    for expert keys, all experts of the layer: [E, ...]."""
    if rule.layout == "qkv":
        q, k, v = (st.get(n) for n in hf_names(rule, layer))
        return merge_qkv(q, k, v, model.num_attention_heads, model.num_query_groups, model.head_dim())
    if rule.per == "layer" and rule.mcore.endswith("router.weight"):
        classic = hf_names(rule, layer)[0]
        return st.get(classic if classic in st else CURRENT_HF_NAMES["router"].format(layer=layer))
    if rule.per == "layer":
        return st.get(hf_names(rule, layer)[0])
    return gather_experts(rule, st, model, layer)


def gather_experts(rule, st: SafetensorsDir, model: ModelConfig, layer: int) -> torch.Tensor:
    """Returns [experts, ...] for fc1 ([w1; w3]) or fc2 (w2) of one layer."""
    fused = CURRENT_HF_NAMES["gate_up" if rule.layout == "fc1" else "down"].format(layer=layer)
    if fused in st and hf_names(rule, layer, 0)[0] not in st:
        return st.get(fused)  # transformers >= 5: already [E, 2I, H] = [gate; up] or [E, H, I]
    experts = []
    for expert in range(model.num_experts):
        parts = [st.get(n) for n in hf_names(rule, layer, expert)]
        experts.append(torch.cat(parts, dim=0) if rule.layout == "fc1" else parts[0])
    return torch.stack(experts)


def tokenizer_spec(hf_dir: Path) -> str:
    """Returns data.tokenizer for the imported model: geno when the ids are ours, else the dir."""
    config_path = hf_dir / "tokenizer_config.json"
    if config_path.exists():
        policy = json.loads(config_path.read_text()).get("geno_soft_mask")
        if policy in ("upper", "keep"):
            return "geno" if policy == "upper" else "geno:keep"
    if (hf_dir / "tokenizer.json").exists():
        return str(hf_dir.resolve())
    return "geno"


def hf_to_mcore(hf_dir: str | Path, out: str | Path, progress=None) -> Path:
    """Writes OUT/iter_0000000 (weights only) + OUT/latest + OUT/model.yaml; returns OUT.

    Holds one layer of one tensor at a time (TorchDistWriter). Writes into OUT.tmp and renames
    it to OUT when complete.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output directory {out} exists and is not empty")
    config = read_hf_config(hf_dir)
    model = model_config_from_hf(config)
    st = SafetensorsDir(hf_dir)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in st:
        raise ConversionError(f"{hf_dir}: tied embeddings; Genos keeps input and output separate")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = tmp / "iter_0000000"
    writer = TorchDistWriter(ckpt)
    layers = model.num_layers
    steps = [(rule, layer) for rule in RULES
             for layer in ([None] if rule.per == "model" else range(layers))]
    for rule, layer in progress(steps, desc="tensors") if progress else steps:
        if layer is None:
            tensor = st.get(hf_names(rule)[0])
            writer.add(rule.mcore, tensor, (0,) * tensor.dim(), tuple(tensor.shape))
            continue
        tensor = layer_tensor(rule, st, model, layer)  # one layer in memory at a time
        shape = (layers, *tensor.shape)
        if rule.per == "layer":
            writer.add(rule.mcore, tensor[None], (layer,) + (0,) * tensor.dim(), shape)
        else:  # one chunk per (layer, expert), as geno-train stores experts
            for expert in range(tensor.shape[0]):
                writer.add(rule.mcore, tensor[expert][None, None],
                           (layer, expert) + (0,) * (tensor.dim() - 1), shape)
    cfg = TrainConfig(model=model)
    cfg.data.tokenizer = tokenizer_spec(hf_dir)
    writer.finish({"model_config": dataclasses.asdict(model), "weights_only": True,
                   "imported_from": str(hf_dir.resolve())})
    (ckpt / "config.yaml").write_text(cfg.to_yaml())
    model_yaml = {"model": dataclasses.asdict(model), "data": {"tokenizer": cfg.data.tokenizer}}
    (tmp / "model.yaml").write_text(yaml.safe_dump(model_yaml, sort_keys=False))
    (tmp / "latest").write_text("0\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
