"""HuggingFace Mixtral directory -> torch_dist checkpoint that geno-train loads at any TP/PP/EP."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open

from checkpoint_tools.mapping import (CURRENT_HF_NAMES, RULES, SAFETENSORS_DTYPES,
                                     current_hf_shapes, hf_names, hf_shapes, merge_qkv)
from checkpoint_tools.mcore_checkpoint import ConversionError
from checkpoint_tools.output_dir import claimed_out, write_into_new_dir
from checkpoint_tools.torch_dist_writer import Chunk, write_torch_dist
from megatron_geno.checkpoint.integrity import seal
from megatron_geno.config import ModelConfig, TrainConfig
from megatron_geno.config import get_preset
from megatron_geno.presets import PRESETS
from megatron_geno.tokenizer import VOCAB_SIZE, read_hf_soft_mask


# config.json keys a Mixtral config must carry, with their checks (value -> ok)
_REQUIRED_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_local_experts",
                  "num_experts_per_tok", "intermediate_size", "vocab_size")
_OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "router_aux_loss_coef")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_hf_config(hf_dir: Path) -> dict:
    """Returns config.json after checking every key the import uses (ConversionError naming it)."""
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ConversionError(f"--hf {hf_dir} is not a directory")
    try:
        config = json.loads(path.read_text())
    except OSError as err:
        raise ConversionError(f"cannot read {path}: {err.strerror}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object")
    if config.get("model_type") != "mixtral":
        raise ConversionError(
            f"{path}: model_type {config.get('model_type')!r} is not a Mixtral architecture "
            f"(architectures: {config.get('architectures')})"
        )
    for key in _REQUIRED_KEYS:
        if key not in config:
            raise ConversionError(f"{path} lacks the Mixtral key {key!r}")
        if not _positive_int(config[key]):
            raise ConversionError(f"{path}: {key} must be a positive integer, got {config[key]!r}")
    for key in _OPTIONAL_INT_KEYS:
        if config.get(key) is not None and not _positive_int(config[key]):
            raise ConversionError(f"{path}: {key} must be a positive integer, got {config[key]!r}")
    for key in _OPTIONAL_FLOAT_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value >= 0 or value != value):
            raise ConversionError(f"{path}: {key} must be a non-negative number, got {value!r}")
    heads, groups = config["num_attention_heads"], config.get("num_key_value_heads") or \
        config["num_attention_heads"]
    if heads % groups:
        raise ConversionError(f"{path}: num_attention_heads={heads} is not divisible by "
                              f"num_key_value_heads={groups}")
    if config["num_experts_per_tok"] > config["num_local_experts"]:
        raise ConversionError(f"{path}: num_experts_per_tok={config['num_experts_per_tok']} "
                              f"exceeds num_local_experts={config['num_local_experts']}")
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
        get_preset(preset),
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


WEIGHT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
_PLAIN_FILE = re.compile(r"^[A-Za-z0-9_.\-]+\.safetensors$")


class SafetensorsDir:
    """The tensors of a (sharded) safetensors directory, read with the safetensors library.

    Each file's header is read (and checked by the library: offsets, dtypes, shapes, a
    truncated file) when the directory is opened, and the index may name only files inside the
    directory. Each tensor is read by opening its file for that read alone: safetensors maps the
    file, and pages kept mapped would stay in the conversion's resident memory.
    """

    def __init__(self, hf_dir: Path) -> None:
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise ValueError("weight_map is not a mapping of names to files")
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise ConversionError(f"{index} is not a safetensors index ({err})") from None
            for name, file in weight_map.items():
                if not _PLAIN_FILE.match(file):
                    raise ConversionError(f"{index}: tensor {name} names file {file!r}, which is "
                                          f"not a .safetensors file inside {hf_dir}")
        elif (hf_dir / "model.safetensors").exists():
            weight_map = None
        else:
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.where: dict[str, tuple] = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise ConversionError(f"{hf_dir}: shard {name} listed in the index is missing")
            self.where.update(self._read_header(path))
        if weight_map:
            missing = [k for k in weight_map if k not in self.where]
            if missing:
                raise ConversionError(f"{hf_dir}: tensor {missing[0]} listed in the index is in no shard")

    @staticmethod
    def _read_header(path: Path) -> dict[str, tuple]:
        """name -> (file, dtype, shape) for every tensor of one file."""
        entries = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    dtype, shape = piece.get_dtype(), tuple(piece.get_shape())
                    if dtype not in SAFETENSORS_DTYPES:
                        raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype}")
                    entries[name] = (path, SAFETENSORS_DTYPES[dtype], shape)
        except (SafetensorError, OSError, ValueError) as err:
            raise ConversionError(f"{path} is not a readable safetensors file "
                                  f"({str(err).strip()[:200]})") from None
        return entries

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self.where[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"tensor {name} is missing from the safetensors files")
        path = self.where[name][0]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"{path}: tensor {name} cannot be read "
                                  f"({str(err).strip()[:200]})") from None


def _inputs_of(rule, st: SafetensorsDir, model: ModelConfig, layer) -> dict[str, tuple]:
    """The HF tensors (name -> expected shape) the import reads for one rule and layer."""
    if rule.per == "model":
        return dict(zip(hf_names(rule), hf_shapes(rule, model)))
    current = current_hf_shapes(model)
    if rule.per == "layer" and rule.mcore.endswith("router.weight"):
        classic = hf_names(rule, layer)[0]
        if classic in st:
            return {classic: hf_shapes(rule, model)[0]}
        return {CURRENT_HF_NAMES["router"].format(layer=layer): current["router"]}
    if rule.per == "layer":
        return dict(zip(hf_names(rule, layer), hf_shapes(rule, model)))
    kind = "gate_up" if rule.layout == "fc1" else "down"
    fused = CURRENT_HF_NAMES[kind].format(layer=layer)
    if fused in st and hf_names(rule, layer, 0)[0] not in st:
        return {fused: current[kind]}
    wanted = {}
    for expert in range(model.num_experts):
        wanted.update(zip(hf_names(rule, layer, expert), hf_shapes(rule, model)))
    return wanted


def check_hf_tensors(hf_dir: Path, st: SafetensorsDir, model: ModelConfig) -> None:
    """Checks every tensor the import reads against config.json before anything is written.

    Each must exist with the shape the config implies and a floating-point dtype; a tensor the
    import would not read (other than rotary caches) has no place in a Genos model and is refused.
    """
    wanted: dict[str, tuple] = {}
    for rule in RULES:
        for layer in [None] if rule.per == "model" else range(model.num_layers):
            wanted.update(_inputs_of(rule, st, model, layer))
    for name, shape in wanted.items():
        if name not in st:
            raise ConversionError(f"{hf_dir}: tensor {name} is missing")
        if st.shape(name) != tuple(shape):
            raise ConversionError(
                f"{hf_dir}: tensor {name} has shape {list(st.shape(name))}, config.json implies "
                f"{list(shape)}" + (" (vocab_size)" if "embed" in name or "lm_head" in name else ""))
        if st.dtype(name) not in WEIGHT_DTYPES:
            raise ConversionError(f"{hf_dir}: tensor {name} has dtype {st.dtype(name)}, not a "
                                  f"floating-point weight")
    extra = [n for n in st.names() if n not in wanted and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ConversionError(f"{hf_dir}: tensor {extra[0]} has no place in a Genos (Mixtral) "
                              f"model" + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""))


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


def tokenizer_spec(hf_dir: Path, vocab_size: int) -> str:
    """Returns data.tokenizer for the imported model: geno when the ids are ours, else the dir.

    Refuses a vocabulary smaller than the tokenizer's (ids the embedding could not hold).
    """
    tokenizer_path = hf_dir / "tokenizer.json"
    try:
        policy = read_hf_soft_mask(hf_dir)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    if policy is not None:
        spec, needed = ("geno" if policy == "upper" else "geno:keep"), VOCAB_SIZE
    elif tokenizer_path.exists():
        spec = str(hf_dir.resolve())
        try:
            from tokenizers import Tokenizer

            needed = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
        except ImportError:  # the [hf] extra is absent: geno-train checks it when it loads
            needed = 0
        except Exception as err:  # tokenizers raises its own exception type
            raise ConversionError(f"{tokenizer_path} is not a readable tokenizer "
                                  f"({str(err)[:200]})") from None
    else:
        spec, needed = "geno", VOCAB_SIZE
    if vocab_size < needed:
        raise ConversionError(f"{hf_dir / 'config.json'}: vocab_size={vocab_size} is smaller than "
                              f"the tokenizer's {needed} ids")
    return spec


class _MetaView:
    """A SafetensorsDir's tensors as meta tensors: the conversion's shapes and dtypes, no data."""

    def __init__(self, st: SafetensorsDir) -> None:
        self.st = st

    def __contains__(self, name: str) -> bool:
        return name in self.st

    def get(self, name: str) -> torch.Tensor:
        return torch.empty(self.st.shape(name), dtype=self.st.dtype(name), device="meta")


def import_chunks(st: SafetensorsDir, model: ModelConfig) -> list[Chunk]:
    """The chunks of the imported checkpoint, as geno-train stores them (whole-model tensors;
    one chunk per layer; one per layer and expert), each made from the HF tensors only when the
    writer asks for it. The writer asks in this order, so the one layer read last is kept for
    the next expert chunks."""
    last: dict = {}

    def layer_of(rule, layer: int) -> torch.Tensor:
        if last.get("at") != (rule.mcore, layer):
            last.clear()  # drop the previous layer before reading the next
            last.update(at=(rule.mcore, layer), tensor=layer_tensor(rule, st, model, layer))
        return last["tensor"]

    meta, layers, chunks = _MetaView(st), model.num_layers, []
    for rule in RULES:
        if rule.per == "model":
            name = hf_names(rule)[0]
            shape = tuple(st.shape(name))
            chunks.append(Chunk(rule.mcore, (0,) * len(shape), shape, shape, st.dtype(name),
                                lambda name=name: st.get(name)))
            continue
        for layer in range(layers):
            planned = layer_tensor(rule, meta, model, layer)
            shape = (layers, *planned.shape)
            if rule.per == "layer":
                chunks.append(Chunk(rule.mcore, (layer,) + (0,) * planned.dim(), shape,
                                    (1, *planned.shape), planned.dtype,
                                    lambda rule=rule, layer=layer: layer_of(rule, layer)[None]))
                continue
            for expert in range(planned.shape[0]):  # one chunk per (layer, expert)
                chunks.append(Chunk(
                    rule.mcore, (layer, expert) + (0,) * (planned.dim() - 1), shape,
                    (1, 1, *planned.shape[1:]), planned.dtype,
                    lambda rule=rule, layer=layer, expert=expert:
                        layer_of(rule, layer)[expert][None, None]))
    return chunks


def _counted(produce, bar):
    def run():
        tensor = produce()
        bar.update(1)
        return tensor
    return run


def hf_to_mcore(hf_dir: str | Path, out: str | Path, progress=None) -> Path:
    """Writes OUT/iter_0000000 (weights only) + OUT/latest + OUT/model.yaml; returns OUT.

    Checks config.json and every tensor's name, shape and dtype before writing anything; holds
    one layer of one tensor at a time (import_chunks); writes into a fresh temporary directory
    and renames it to OUT when complete and sealed with checksums.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    with claimed_out(out):
        config = read_hf_config(hf_dir)
        model = model_config_from_hf(config)
        st = SafetensorsDir(hf_dir)
        if config.get("tie_word_embeddings") and "lm_head.weight" not in st:
            raise ConversionError(f"{hf_dir}: tied embeddings; Genos keeps input and output separate")
        check_hf_tensors(hf_dir, st, model)
        tokenizer = tokenizer_spec(hf_dir, model.padded_vocab_size)

        def write(tmp: Path) -> None:
            ckpt = tmp / "iter_0000000"
            chunks = import_chunks(st, model)
            bar = progress(total=len(chunks), desc="chunks") if progress else None
            if bar is not None:
                chunks = [dataclasses.replace(c, produce=_counted(c.produce, bar)) for c in chunks]
            cfg = TrainConfig(model=model)
            cfg.data.tokenizer = tokenizer
            try:
                write_torch_dist(ckpt, chunks, {"model_config": dataclasses.asdict(model),
                                                "weights_only": True,
                                                "imported_from": str(hf_dir.resolve())})
            finally:
                if bar is not None:
                    bar.close()
            seal(ckpt)
            (ckpt / "config.yaml").write_text(cfg.to_yaml())
            model_yaml = {"model": dataclasses.asdict(model), "data": {"tokenizer": tokenizer}}
            (tmp / "model.yaml").write_text(yaml.safe_dump(model_yaml, sort_keys=False))
            (tmp / "latest").write_text("0\n")

        return write_into_new_dir(out, write)
