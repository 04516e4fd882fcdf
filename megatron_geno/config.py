"""Training configuration: dataclasses, loaded from YAML with ``key.sub=value`` overrides."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_geno.presets import PRESETS


class ConfigError(ValueError):
    """A configuration a user can fix: the message names the key or value at fault."""


@dataclass
class ModelConfig:
    """The Genos architecture; presets (megatron_geno.presets) fill every field."""

    preset: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: Optional[int] = None  # default: hidden_size // num_attention_heads
    num_experts: int = 8
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 128
    norm_epsilon: float = 1e-5
    rotary_base: int = 50_000_000
    max_position_embeddings: int = 1_048_576
    make_vocab_size_divisible_by: int = 128  # the padded vocabulary is a multiple of this x TP
    # None: the tokenizer's vocabulary rounded up to make_vocab_size_divisible_by x TP. A loaded
    # checkpoint's value wins, so a checkpoint keeps its vocabulary at any TP.
    padded_vocab_size: Optional[int] = None
    moe_aux_loss_coeff: float = 1e-3
    moe_z_loss_coeff: float = 1e-3
    moe_router_pre_softmax: bool = False  # Genos: softmax over all experts, then top-k
    moe_token_dispatcher: str = "auto"  # auto: alltoall (megatron-core's GPU default), CPU too
    moe_grouped_gemm: str = "auto"  # auto: grouped wherever torch._grouped_mm runs; or on / off
    # compiled RMSNorm, RoPE, SwiGLU and cross-entropy (megatron_geno.fusions): auto = on with
    # CUDA, off on CPU; on (on CPU: needs a C++ compiler); off
    fusions: str = "auto"
    init_method_std: float = 0.02
    attention_backend: str = "auto"  # auto: Transformer Engine if importable, else sdpa
    # activation recomputation (megatron-core's): none; selective = recompute_modules of every
    # layer (core_attn, layernorm, moe); full = whole layers (recompute_layers per pipeline
    # stage, None: all), trading one more forward per layer for activation memory. The default
    # module is moe (3/4 of a layer's activations); with flash attention, core_attn saves almost
    # nothing (tests/unit/test_memory_plan.py measures both)
    recompute: str = "none"
    recompute_modules: list = field(default_factory=lambda: ["moe"])
    recompute_layers: Optional[int] = None

    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # model chunks per pipeline stage (interleaved 1F1B: a smaller bubble, more communication);
    # 1 = one chunk per stage. Needs pipeline_parallel > 1, layers divisible by PP x this, and
    # micro-batches per step divisible by PP.
    virtual_pipeline: int = 1
    context_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: Optional[int] = None  # None: same as tensor_parallel (mcore default)
    sequence_parallel: bool = True  # used whenever tensor_parallel > 1 (MoE requires it)
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False

    def virtual_pipeline_size(self) -> Optional[int]:
        """megatron-core's virtual_pipeline_model_parallel_size: None without interleaving."""
        return self.virtual_pipeline if self.virtual_pipeline > 1 else None

    def expert_tp(self) -> int:
        """The expert tensor-parallel size in effect (expert_tensor_parallel, else TP)."""
        return self.expert_tensor_parallel or self.tensor_parallel


@dataclass
class DataConfig:
    # "synthetic": deterministic synthetic genome; "zarr": geno-preprocess corpus directories in
    # `blend` (train/valid/test from their manifests); "megatron": .bin/.idx prefixes in `blend`
    source: str = "synthetic"
    blend: list = field(default_factory=list)  # [weight, path, weight, path, ...] or [path, ...]
    split: str = "98,1,1"  # document split of synthetic / megatron sources (zarr: the manifest's)
    # megatron source: prefixes of the validation and test sets, as Megatron-LM's
    # --valid-data-path / --test-data-path ([weight, prefix, ...] or [prefix, ...]); with either,
    # or with geno-preprocess export prefixes (P_train / P_valid / P_test), data.split is unused
    valid_blend: list = field(default_factory=list)
    test_blend: list = field(default_factory=list)
    reverse_complement_prob: float = 0.0  # reverse-complement a sample with this probability
    reset_attention_mask: bool = False  # no attention across documents (EOD) within a sample
    reset_position_ids: bool = False  # positions restart at each document
    seq_length: int = 256
    micro_batch_size: int = 2
    global_batch_size: int = 8
    synthetic_genome_length: int = 200_000
    synthetic_seed: int = 1234
    cache_dir: Optional[str] = None
    tokenizer: str = "geno"  # "geno" (built in) or a HuggingFace tokenizer directory


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # torch's fused AdamW kernel when TE / apex are absent: auto = where the parameters are on
    # CUDA (elsewhere torch's default foreach / for-loop AdamW); on; off
    fused: str = "auto"


@dataclass
class ScheduleConfig:
    train_iters: int = 100
    stop_after: Optional[int] = None  # save and stop at this iteration; the schedule still spans train_iters
    warmup_iters: Optional[int] = None  # linear warmup steps; None: warmup_fraction of the schedule
    warmup_fraction: float = 0.05  # of train_iters, when warmup_iters is not set
    decay_style: str = "cosine"
    eval_interval: int = 50
    eval_iters: int = 2
    seed: int = 1234


def warmup_steps(schedule: "ScheduleConfig") -> int:
    """The warmup length in steps: warmup_iters when set, else warmup_fraction of train_iters."""
    if schedule.warmup_iters is not None:
        return schedule.warmup_iters
    return int(schedule.warmup_fraction * schedule.train_iters)


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    save_interval: int = 0  # 0: only at the end and on SIGTERM/SIGUSR1
    # also save when this many minutes of wall time have passed since the last save (or the
    # start); 0: off. Every rank agrees on it one step later (the signal flag's reduction)
    save_interval_minutes: float = 0.0
    # retention: after each save, remove this directory's complete checkpoints older than the
    # newest keep_last (0: keep all). Never removed: the one `latest` names, the end of a phase
    # (iteration = schedule.train_iters of the run that saved it), an iteration holding a file
    # named KEEP, and anything in an iter_* directory that this project did not write
    keep_last: int = 0
    load: Optional[str] = None
    weights_only: bool = False  # load model weights only: fresh optimizer, schedule and data position
    # check every stored item a rank reads against the checksums computed as it was written
    # (during the load itself: no extra read)
    verify_checksums: bool = True
    save_on_signal: bool = True
    # write checkpoints in the background (megatron-core's asynchronous torch_dist save): the
    # tensors are staged to host memory, training goes on, and the checkpoint is sealed and named
    # in `latest` once every rank's writer is done (checked at each log interval)
    async_save: bool = False
    # resume from `save` when it already holds a checkpoint (a restart or SLURM requeue), in place
    # of `load`: a later phase keeps load=<previous phase> + weights_only and still resumes itself
    auto_resume: bool = True
    # a full resume whose data.seq_length, data.global_batch_size, data.source or data.blend
    # differs from the checkpoint's is refused (its sample count would point at other data);
    # true: accept it and start the data from its beginning (weights, optimizer, schedule kept)
    reset_data_position: bool = False


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 10  # steps per record; the loss leaves the device only then (Megatron-LM: 100)
    tensorboard: bool = True
    quiet: bool = False
    # Weights & Biases (the wandb package, optional): off / offline (files under RUN_DIR/wandb,
    # `wandb sync` later; no network) / online
    wandb: str = "off"
    wandb_project: str = "megatron-geno"


@dataclass
class EvalConfig:
    """geno-eval's measures during training, every schedule.eval_interval steps (beside the
    validation loss): loss per assembly on token-store corpora, and variant effect scores."""

    corpora: list = field(default_factory=list)  # token-store corpus directories
    split: str = "valid"  # the corpora's split: valid or test
    window: Optional[int] = None  # tokens per loss window; None: data.seq_length
    windows: int = 64  # a deterministic sample of this many loss windows (the same each time)
    variants: Optional[str] = None  # a VCF / BCF of SNVs and short indels
    reference: Optional[str] = None  # the reference FASTA of eval.variants
    variants_window: int = 1024  # bases per variant window
    label_field: Optional[str] = None  # an INFO field with labels (e.g. CLNSIG): AUROC
    both_strands: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    precision: str = "auto"  # auto: bf16 with CUDA, fp32 on CPU; or fp32 / bf16

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (``*name``): a few bytes of nested aliases expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted in configs", mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, what: str) -> Any:
    """YAML text read safely and without aliases; ConfigError naming `what` and the line."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        problem = " ".join(str(problem).split())
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """{'a.b.c': value} for every leaf of a nested mapping (a config, a corpus's options)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(key: str) -> str:
    """A key as a message shows it: as written, or quoted (repr) when it holds anything but
    letters, digits, '_', '-' and '.' (a newline would break the one-line error)."""
    return key if re.fullmatch(r"[\w.\-]+", key) else repr(key)


def read_yaml_file(path: str | Path, what: str) -> Any:
    """A YAML file's content (parse_yaml); ConfigError for a file that cannot be read, a
    directory, or one that is not UTF-8 text."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None
    return parse_yaml(text, f"{what} {path}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Returns (key path, value) from ``a.b=c``; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), parse_yaml(raw, f"override {text!r}") if raw != "" else ""


def _set_nested(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {_shown('.'.join(path))}: {_shown(part)} is not a "
                              f"section")
    node[path[-1]] = value


def _field_types(cls) -> dict[str, tuple[type, bool]]:
    """Each field's (type, None allowed) from its annotation: int, float, bool, str or list,
    optionally Optional[...]."""
    out = {}
    for f in dataclasses.fields(cls):
        text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        optional = text.startswith("Optional[")
        name = text[len("Optional["):-1] if optional else text
        out[f.name] = ({"int": int, "float": float, "bool": bool, "str": str,
                        "list": list}.get(name, object), optional)
    return out


# list fields whose items may be numbers too (blend weights); every other list holds strings
_NUMBER_ITEMS = {"data.blend", "data.valid_blend", "data.test_blend"}


def _coerce(name: str, value: Any, kind: type, optional: bool) -> Any:
    """Turns a YAML value into the field's declared type (ints given for floats, etc.);
    ConfigError naming the key for a value of another type, or null where none is allowed."""
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be null")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if kind is int:
            if not math.isfinite(value) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        return kind(value)
    if kind is str and isinstance(value, bool) and name in CHOICES:
        word = "on" if value else "off"  # YAML 1.1 reads on/off/yes/no as booleans
        if word in CHOICES[name]:
            return word
        raise ConfigError(f"{name} must be one of {', '.join(CHOICES[name])}, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if kind is list:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            number = (isinstance(item, (int, float)) and not isinstance(item, bool)
                      and name in _NUMBER_ITEMS)
            if not (isinstance(item, str) or number):
                what = "a path or a weight" if name in _NUMBER_ITEMS else "a string"
                raise ConfigError(f"{name}[{i}] must be {what}, got {item!r}")
        return items
    return value


def parse_blend(blend: list, key: str = "data.blend") -> tuple[list[str], Optional[list[float]]]:
    """Returns (paths, weights) from ``[w1, p1, w2, p2]`` or ``[p1, p2]``; ConfigError naming key
    for any other shape or a weight that is not a positive finite number."""
    if all(isinstance(x, str) for x in blend):
        return [str(x) for x in blend], None
    if len(blend) % 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                 for w in blend[0::2]) \
            or not all(isinstance(p, str) for p in blend[1::2]):
        raise ConfigError(f"{key} must be [path, ...] or [weight, path, ...]; got {blend}")
    for weight, path in zip(blend[0::2], blend[1::2]):
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{key}: the weight of {path} must be a positive number, got "
                              f"{weight!r}")
    return [str(p) for p in blend[1::2]], [float(w) for w in blend[0::2]]


def build_section(cls, values: dict, where: str, base=None):
    """An instance of the dataclass cls from a YAML mapping (over base's values, or cls()'s):
    unknown keys and values of another type than the field declares are a ConfigError naming
    the key (where is its prefix, e.g. 'model.')."""
    base = base if base is not None else cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    types = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {_shown(f'{where}{key}')} "
                              f"(known: {', '.join(known)})")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} is a section; give it as a mapping")
            kwargs[key] = build_section(type(current), value, f"{where}{key}.", current)
        else:
            kwargs[key] = _coerce(f"{where}{key}", value, *types[key])
    return dataclasses.replace(base, **kwargs)


def get_preset(name: str) -> ModelConfig:
    """The named preset's ModelConfig (megatron_geno.presets); an unknown name is a ConfigError
    listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig(preset=name, **PRESETS[name])


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Returns the resolved TrainConfig from a YAML file, then preset defaults, then overrides."""
    tree: dict = {}
    if path is not None:
        tree = read_yaml_file(path, "config") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
        tree.pop("launch", None)  # a recipe's launch section is geno-launch's (launch/recipe.py)
    for text in overrides or []:
        _set_nested(tree, *parse_override(text))

    model_tree = tree.pop("model", {}) or {}
    if not isinstance(model_tree, dict):
        raise ConfigError("model is a section; give it as a mapping")
    model_tree = dict(model_tree)
    preset_name = model_tree.pop("preset", ModelConfig.preset)
    if not isinstance(preset_name, str):
        raise ConfigError(f"model.preset must be a preset name, got {preset_name!r}")
    cfg = build_section(TrainConfig, tree, "")
    model = build_section(ModelConfig, model_tree, "model.", get_preset(preset_name))
    cfg = dataclasses.replace(cfg, model=model)
    validate(cfg)
    return cfg


INF = math.inf
# Allowed range of every numeric field: (low, high, low inclusive, high inclusive). A None value
# is allowed only where the field's default is None. Checked before anything else is built.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "model.num_layers": (1, INF, True, False),
    "model.hidden_size": (1, INF, True, False),
    "model.num_attention_heads": (1, INF, True, False),
    "model.num_query_groups": (1, INF, True, False),
    "model.kv_channels": (1, INF, True, False),
    "model.num_experts": (1, INF, True, False),
    "model.moe_router_topk": (1, INF, True, False),
    "model.moe_ffn_hidden_size": (1, INF, True, False),
    "model.norm_epsilon": (0, 1, False, False),
    "model.rotary_base": (1, INF, True, False),
    "model.max_position_embeddings": (1, INF, True, False),
    "model.make_vocab_size_divisible_by": (1, INF, True, False),
    "model.padded_vocab_size": (1, INF, True, False),
    "model.moe_aux_loss_coeff": (0, INF, True, False),
    "model.moe_z_loss_coeff": (0, INF, True, False),
    "model.init_method_std": (0, INF, False, False),
    "model.recompute_layers": (1, INF, True, False),
    "parallel.tensor_parallel": (1, INF, True, False),
    "parallel.pipeline_parallel": (1, INF, True, False),
    "parallel.virtual_pipeline": (1, INF, True, False),
    "parallel.context_parallel": (1, INF, True, False),
    "parallel.expert_parallel": (1, INF, True, False),
    "parallel.expert_tensor_parallel": (1, INF, True, False),
    "data.reverse_complement_prob": (0, 1, True, True),
    "data.seq_length": (2, INF, True, False),
    "data.micro_batch_size": (1, INF, True, False),
    "data.global_batch_size": (1, INF, True, False),
    "data.synthetic_genome_length": (1, INF, True, False),
    "data.synthetic_seed": (0, 2**63 - 1, True, True),
    "optimizer.lr": (0, INF, False, False),
    "optimizer.min_lr": (0, INF, True, False),
    "optimizer.weight_decay": (0, INF, True, False),
    "optimizer.adam_beta1": (0, 1, True, False),
    "optimizer.adam_beta2": (0, 1, True, False),
    "optimizer.adam_eps": (0, INF, False, False),
    "optimizer.clip_grad": (0, INF, True, False),
    "schedule.train_iters": (0, INF, True, False),  # 0: save the initial checkpoint only
    "schedule.stop_after": (1, INF, True, False),
    "schedule.warmup_iters": (0, INF, True, False),
    "schedule.warmup_fraction": (0, 1, True, False),
    "schedule.eval_interval": (0, INF, True, False),
    "schedule.eval_iters": (0, INF, True, False),
    "schedule.seed": (0, 2**63 - 1, True, True),
    "checkpoint.save_interval": (0, INF, True, False),
    "checkpoint.save_interval_minutes": (0, INF, True, False),
    "checkpoint.keep_last": (0, INF, True, False),
    "logging.log_interval": (1, INF, True, False),
    "eval.window": (2, INF, True, False),
    "eval.windows": (1, INF, True, False),
    "eval.variants_window": (2, INF, True, False),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "precision": ("auto", "fp32", "bf16"),
    "data.source": ("synthetic", "zarr", "megatron"),
    "model.moe_token_dispatcher": ("auto", "alltoall", "allgather"),
    "model.moe_grouped_gemm": ("auto", "on", "off"),
    "model.fusions": ("auto", "on", "off"),
    "model.attention_backend": ("auto", "sdpa", "te"),
    "optimizer.fused": ("auto", "on", "off"),
    "model.recompute": ("none", "selective", "full"),
    "schedule.decay_style": ("cosine", "linear", "constant", "inverse-square-root"),
    "logging.wandb": ("off", "offline", "online"),
    "eval.split": ("valid", "test"),
}


RECOMPUTE_MODULES = ("core_attn", "layernorm", "moe")  # megatron-core's names that apply here


def _describe_range(low, high, low_in, high_in) -> str:
    if high == INF:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_ranges(cfg: TrainConfig) -> None:
    """Raises ConfigError naming the first field outside its allowed range or choices."""
    tree = cfg.to_dict()
    for key, (low, high, low_in, high_in) in RANGES.items():
        section, name = key.split(".")
        value = tree[section][name]
        default = getattr(type(getattr(cfg, section))(), name)
        if value is None and default is None:
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value)
              and (value >= low if low_in else value > low)
              and (value <= high if high_in else value < high))
        if not ok:
            raise ConfigError(f"{key} must be {_describe_range(low, high, low_in, high_in)}"
                              f"{' and finite' if isinstance(default, float) else ''}, "
                              f"got {value!r}")
    for key, allowed in CHOICES.items():
        section, _, name = key.rpartition(".")
        value = tree[section][name] if section else tree[name]
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Raises ConfigError for values out of range and settings that cannot work together."""
    check_ranges(cfg)
    m, p, d, o = cfg.model, cfg.parallel, cfg.data, cfg.optimizer
    e = cfg.eval
    if (e.variants is None) != (e.reference is None):
        raise ConfigError("eval.variants (a VCF) and eval.reference (its FASTA) go together")
    if (e.corpora or e.variants) and not cfg.schedule.eval_interval:
        raise ConfigError("eval.corpora / eval.variants run every schedule.eval_interval steps; "
                          "it is 0")
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr={o.min_lr:g} must not exceed optimizer.lr={o.lr:g}")
    unknown = set(m.recompute_modules) - set(RECOMPUTE_MODULES)
    if unknown:
        raise ConfigError(f"model.recompute_modules: {sorted(unknown)[0]!r} is not one of "
                          f"{', '.join(RECOMPUTE_MODULES)}")
    if m.recompute_layers is not None and m.recompute != "full":
        raise ConfigError(f"model.recompute_layers={m.recompute_layers} needs model.recompute=full")
    if m.recompute_layers is not None and m.recompute_layers > m.num_layers // p.pipeline_parallel:
        raise ConfigError(f"model.recompute_layers={m.recompute_layers} exceeds the "
                          f"{m.num_layers // p.pipeline_parallel} layers of a pipeline stage")
    if m.moe_router_topk > m.num_experts:
        raise ConfigError(f"model.moe_router_topk={m.moe_router_topk} must not exceed "
                          f"model.num_experts={m.num_experts}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} must be divisible "
                          f"by model.num_query_groups={m.num_query_groups}")
    if (cfg.schedule.stop_after is not None
            and cfg.schedule.stop_after > cfg.schedule.train_iters):
        raise ConfigError(f"schedule.stop_after={cfg.schedule.stop_after} must not exceed "
                          f"schedule.train_iters={cfg.schedule.train_iters}")
    if cfg.schedule.eval_interval and cfg.schedule.eval_iters < 1:
        raise ConfigError(f"schedule.eval_iters must be >= 1 when schedule.eval_interval="
                          f"{cfg.schedule.eval_interval} (or set schedule.eval_interval=0)")
    if d.source != "synthetic" and not d.blend:
        raise ConfigError(f"data.source={d.source} needs data.blend (prefixes or shard paths)")
    for key in ("blend", "valid_blend", "test_blend"):
        if getattr(d, key):
            parse_blend(getattr(d, key), f"data.{key}")
    if cfg.schedule.warmup_iters and cfg.schedule.warmup_iters >= max(cfg.schedule.train_iters, 1):
        raise ConfigError(
            f"schedule.warmup_iters={cfg.schedule.warmup_iters} must be smaller than "
            f"schedule.train_iters={cfg.schedule.train_iters}"
        )
