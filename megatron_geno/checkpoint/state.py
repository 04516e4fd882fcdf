"""What a checkpoint holds and how it maps onto this run's objects: the train state, the model's
sharded state dict (under the local spec's names, whichever spec built it), the optimizer's
layout and its remapping when the optimizer chain changes, hyperparameters kept across a load,
and the RNG state."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_geno.checkpoint import optimizer_shards, strategy, trust
from megatron_geno.checkpoint.layout import TE_KEY_ALIASES
from megatron_geno.checkpoint.trust import CheckpointError
from megatron_geno.config import ModelConfig, TrainConfig


# Fields that must agree between a checkpoint and the model that loads it.
ARCHITECTURE_FIELDS = [
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_pre_softmax",
    "padded_vocab_size",
]


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def sharded_rng_state() -> ShardedObject:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _saved_step(saved) -> float | None:
    """The optimizer step recorded in a saved optimizer's param groups (any structure)."""
    if isinstance(saved, dict):
        groups = saved.get("param_groups")
        for group in groups if isinstance(groups, list) else []:
            if isinstance(group, dict) and "step" in group:
                return group["step"]
        for value in saved.values():
            step = _saved_step(value)
            if step is not None:
                return step
    return None


def remap_optimizer_state(loaded: dict, optimizer, saved_common: dict) -> dict:
    """The loaded optimizer state rebuilt for this run's chain of optimizers, when the checkpoint
    was saved with another number (one optimizer, or dense + experts at EP > 1).

    dist_checkpointing merges the saved common part (param groups in the saved chain's shape)
    with the tensors requested for this chain; each sub-optimizer's tensors (``param_state``,
    stored under layout-free keys) are kept, and its param groups are its own, carrying the
    saved step (the scheduler sets lr and weight decay at every step)."""
    step = _saved_step(saved_common)
    if step is None:
        raise CheckpointError("the checkpoint's optimizer state records no step")
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    rebuilt = []
    for i, sub in enumerate(subs):
        own = sub.state_dict()
        for group in own["optimizer"]["param_groups"]:
            group["step"] = step
        tensors = loaded[i] if len(subs) > 1 else loaded
        own["param_state"] = tensors["param_state"]
        own["param_state_sharding_type"] = tensors.get("param_state_sharding_type",
                                                       "fully_reshardable")
        rebuilt.append(own)
    return {i: own for i, own in enumerate(rebuilt)} if len(subs) > 1 else rebuilt[0]


def _inner_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron-core's (chained) optimizer, where this rank has one."""
    return [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])
            if sub.optimizer is not None]


def hyperparameters(optimizer) -> list[list[dict]]:
    """Each param group's settings (betas, eps, max_lr, min_lr, multipliers ...) as this run
    built them, without its parameters and step count."""
    return [[{k: v for k, v in group.items() if k not in ("params", "step")}
             for group in inner.param_groups]
            for inner in _inner_optimizers(optimizer)]


def restore_hyperparameters(optimizer, own: list[list[dict]]) -> None:
    """Puts this run's settings back into the param groups a load replaced with the saved ones:
    on resume what the user passes now wins (optimizer.* and schedule.*; the scheduler sets lr
    and weight decay from them at every step); only the step count and the tensors are the
    checkpoint's."""
    for inner, groups in zip(_inner_optimizers(optimizer), own):
        for group, settings in zip(inner.param_groups, groups):
            group.update(settings)


def num_optimizers(optimizer) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def layout_record(cfg: TrainConfig, optimizer) -> dict:
    p = cfg.parallel
    return {
        "optimizers": num_optimizers(optimizer),  # experts get their own optimizer when EP > 1
        "tensor_parallel": p.tensor_parallel,
        "pipeline_parallel": p.pipeline_parallel,
        "virtual_pipeline": p.virtual_pipeline,
        "expert_parallel": p.expert_parallel,
        "context_parallel": p.context_parallel,
        "world_size": torch.distributed.get_world_size(),
    }


def optimizer_request(optimizer, model_sd: dict, is_loading: bool = False) -> dict:
    """The optimizer's sharded state dict as saved and loaded: the distributed optimizer's in
    model-space boxes, each rank its own shard (optimizer_shards); a plain optimizer's
    (distributed_optimizer=false) as megatron-core gives it, replicated over data parallelism
    (the fully parallel save spreads its writing over the group)."""
    if optimizer_shards.is_distributed(optimizer):
        return optimizer_shards.sharded_optimizer_state(optimizer, model_sd, is_loading)
    # the same tensor keys whether or not experts get their own optimizer (EP > 1)
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                        metadata={"chained_optim_avoid_prefix": True})


def optimizer_loaded(optimizer, request: dict, loaded: dict) -> None:
    """Puts what a load returned for optimizer_request where megatron-core's load_state_dict
    takes it (the distributed optimizer's boxes are already in place)."""
    if optimizer_shards.is_distributed(optimizer):
        optimizer_shards.loaded_into_place(optimizer, request, loaded)


def unwrap_chunks(model) -> list:
    """Returns the GPTModel chunks inside megatron-core's DDP wrappers (keys without 'module.')."""
    return [getattr(chunk, "module", chunk) for chunk in model]


def _per_chunk(chunks: list, make) -> dict:
    """One chunk's dict as it is; several chunks (virtual pipeline stages) as chunk0, chunk1, ...

    Tensors are stored under their global keys (layer numbers included), whatever the nesting,
    so a checkpoint loads at any number of chunks.
    """
    if len(chunks) == 1:
        return make(chunks[0])
    return {f"chunk{i}": make(chunk) for i, chunk in enumerate(chunks)}


def _chunk_states(chunks: list, state: dict) -> list:
    """The inverse of _per_chunk: each chunk's part of a loaded dict."""
    return [state] if len(chunks) == 1 else [state[f"chunk{i}"] for i in range(len(chunks))]


def _rename_keys(state: dict, names: dict) -> dict:
    """state with every sharded entry's key renamed through ``names`` (in place)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(state):
        if getattr(value, "key", None) in names:
            value.key = names[value.key]
    return state


def stored_keys(ckpt: Path) -> set:
    """Every key the checkpoint stores (tensors and objects such as _extra_state)."""
    return {key.split("/shard_")[0] for key in trust.read_dcp_metadata(ckpt).state_dict_metadata}


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict as saved: the local spec's keys, whichever spec built it."""
    return _per_chunk(unwrap_chunks(model),
                      lambda chunk: _rename_keys(chunk.sharded_state_dict(), TE_KEY_ALIASES))


def model_weights_request(chunks: list, common: dict, ckpt: Path) -> dict:
    """Returns the model's sharded state dict to load from the checkpoint ``ckpt``: under the
    names it stores (local or Transformer Engine, TE_KEY_ALIASES), without the _extra_state
    entries it lacks (an HF import, geno-convert from-hf, carries parameters only; a local-spec
    checkpoint has none for TE's modules)."""
    stored = stored_keys(ckpt)
    names = {local: te for te, local in TE_KEY_ALIASES.items()
             if te in stored and local not in stored}

    def request(chunk) -> dict:
        state = _rename_keys(_rename_keys(chunk.sharded_state_dict(), TE_KEY_ALIASES), names)
        return {k: v for k, v in state.items()
                if not (k.endswith("_extra_state") and getattr(v, "key", None) not in stored)}

    return _per_chunk(chunks, request)


def apply_model_weights(chunks: list, state: dict, common: dict, ckpt: Path) -> None:
    """Loads loaded model tensors into the chunks; CheckpointError if a parameter is missing."""
    imported = common.get("imported_from") is not None
    for chunk, chunk_state in zip(chunks, _chunk_states(chunks, state)):
        result = chunk.load_state_dict(chunk_state, strict=not imported)
        missing = [k for k in getattr(result, "missing_keys", []) if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt} lacks parameter {missing[0]}")


def load_model_weights(chunks: list, ckpt: Path, common: dict) -> None:
    """Loads only the model weights of a torch_dist checkpoint into (unwrapped) GPTModel chunks."""
    request = {"model": model_weights_request(chunks, common, ckpt)}
    loaded = strategy.trusted_load(request, ckpt)
    apply_model_weights(chunks, loaded["model"], common, ckpt)


def _derived(fields: dict) -> dict:
    """The model fields with the values megatron-core derives when unset (kv_channels =
    hidden_size / heads), so an explicit value equal to the derived one is no difference."""
    if fields.get("kv_channels") is None and fields.get("hidden_size") \
            and fields.get("num_attention_heads"):
        fields["kv_channels"] = fields["hidden_size"] // fields["num_attention_heads"]
    return fields


def check_architecture(saved: dict, model: ModelConfig, where: Path) -> None:
    """Raises CheckpointError naming the first architecture field that differs."""
    current = _derived(dataclasses.asdict(model))
    saved = _derived(dict(saved))
    for name in ARCHITECTURE_FIELDS:
        if name in saved and saved[name] != current[name]:
            raise CheckpointError(
                f"checkpoint {where} has model.{name}={saved[name]} but the config says "
                f"model.{name}={current[name]}"
            )

