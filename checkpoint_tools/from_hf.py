"""HuggingFace Mixtral directory -> torch_dist checkpoint that geno-train loads at any TP/PP/EP."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import yaml

from checkpoint_tools.mapping import CURRENT_HF_NAMES, RULES, hf_names, merge_qkv
from checkpoint_tools.mcore_checkpoint import ConversionError, init_single_process
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


class SafetensorsDir:
    """Lazy access to the tensors of a (sharded) safetensors directory."""

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / "model.safetensors").exists():
            weight_map = None
        else:
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles, self.where = {}, {}
        for name in files:
            path = hf_dir / name
            if not path.exists():
                raise ConversionError(f"{hf_dir}: shard {name} listed in the index is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except Exception as err:  # safetensors raises its own error types
                raise ConversionError(f"{path} is not a readable safetensors file ({err})") from err
            self.handles[name] = handle
            self.where.update({key: name for key in keys})
        if weight_map:
            missing = [k for k in weight_map if k not in self.where]
            if missing:
                raise ConversionError(f"{hf_dir}: tensor {missing[0]} listed in the index is in no shard")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"tensor {name} is missing from the safetensors files")
        try:
            return self.handles[self.where[name]].get_tensor(name)
        except Exception as err:
            raise ConversionError(f"cannot read {name} from {self.where[name]} ({err})") from err


def gather_key(rule, st: SafetensorsDir, model: ModelConfig) -> torch.Tensor | list[torch.Tensor]:
    """Returns one megatron key from HF tensors (classic or current names): the tensor for
    whole-model keys, else a list with one tensor per layer (never stacked: no extra copy)."""
    if rule.per == "model":
        return st.get(hf_names(rule)[0])
    layers = []
    for layer in range(model.num_layers):
        if rule.layout == "qkv":
            q, k, v = (st.get(n) for n in hf_names(rule, layer))
            layers.append(merge_qkv(q, k, v, model.num_attention_heads, model.num_query_groups,
                                    model.head_dim()))
        elif rule.per == "layer" and rule.mcore.endswith("router.weight"):
            classic = hf_names(rule, layer)[0]
            layers.append(st.get(classic if classic in st else
                                 CURRENT_HF_NAMES["router"].format(layer=layer)))
        elif rule.per == "layer":
            layers.append(st.get(hf_names(rule, layer)[0]))
        else:
            layers.append(gather_experts(rule, st, model, layer))
    return layers


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


def stored_chunks(rule, tensor, sharded_tensor_cls) -> list:
    """Returns one stored chunk per layer (and expert), as geno-train saves them, so that
    readers can load a layer without reading the whole key. ``tensor`` is a whole-model tensor
    or a list of per-layer tensors."""
    if rule.per == "model":
        return [sharded_tensor_cls.from_rank_offsets(rule.mcore, tensor.contiguous(), replica_id=0)]
    layers = len(tensor)
    if rule.per == "layer":
        return [sharded_tensor_cls.from_rank_offsets(
            rule.mcore, t.contiguous(), (0, l, layers), replica_id=0, prepend_axis_num=1)
            for l, t in enumerate(tensor)]
    experts = tensor[0].shape[0]
    return [sharded_tensor_cls.from_rank_offsets(
        rule.mcore, t[e].contiguous(), (0, l, layers), (1, e, experts), replica_id=0,
        prepend_axis_num=2) for l, t in enumerate(tensor) for e in range(experts)]


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


def hf_to_mcore(hf_dir: str | Path, out: str | Path) -> Path:
    """Writes OUT/iter_0000000 (weights only) + OUT/latest + OUT/model.yaml; returns OUT."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output directory {out} exists and is not empty")
    config = read_hf_config(hf_dir)
    model = model_config_from_hf(config)
    st = SafetensorsDir(hf_dir)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in st:
        raise ConversionError(f"{hf_dir}: tied embeddings; Genos keeps input and output separate")
    init_single_process()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = tmp / "iter_0000000"
    ckpt.mkdir(parents=True)
    sharded = {}
    for rule in RULES:
        tensor = gather_key(rule, st, model)
        sharded[rule.mcore] = stored_chunks(rule, tensor, ShardedTensor)
    cfg = TrainConfig(model=model)
    cfg.data.tokenizer = tokenizer_spec(hf_dir)
    state = {"model": sharded, "model_config": dataclasses.asdict(model), "weights_only": True,
             "imported_from": str(hf_dir.resolve())}
    dist_checkpointing.save(state, str(ckpt))
    (ckpt / "config.yaml").write_text(cfg.to_yaml())
    model_yaml = {"model": dataclasses.asdict(model), "data": {"tokenizer": cfg.data.tokenizer}}
    (tmp / "model.yaml").write_text(yaml.safe_dump(model_yaml, sort_keys=False))
    (tmp / "latest").write_text("0\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
