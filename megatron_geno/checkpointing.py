"""torch_dist checkpoints: model, optimizer, scheduler, RNG, iteration and data position.

Layout of a save directory::

    SAVE/iter_0000010/        a megatron-core distributed checkpoint (torch_dist)
    SAVE/iter_0000010/config.yaml     the full resolved training config
    SAVE/iter_0000010/checksums.json  CRC32C of every stored item (megatron_geno.checkpoint_trust)
    SAVE/latest               the newest complete iteration (written last, atomically)

A checkpoint is written to ``iter_N.tmp``, sealed with its checksums and renamed when every rank
has finished, so a killed run never leaves a directory that looks complete. Re-saving an
iteration moves the old one aside (``iter_N.replaced``) and removes it only once the new one is
in place: a kill at any moment leaves a complete checkpoint to resume from. A start whose
``latest`` is damaged says so and resumes from the newest complete checkpoint. Every read goes
through the trust boundary (restricted unpickling, checksums). The optimizer is saved in
megatron-core's ``fully_reshardable`` format, so a checkpoint saved at one TP/PP/EP loads at
another.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_geno import checkpoint_trust as trust
from megatron_geno import compat
from megatron_geno.checkpoint_trust import CheckpointError
from megatron_geno.config import ModelConfig, TrainConfig
from megatron_geno.files import (free_bytes, fsync_path, fsync_tree, out_of_space,
                                 write_text_atomic)
from megatron_geno.units import format_bytes

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "TrainState", "save_checkpoint", "load_checkpoint",
           "resolve_checkpoint_dir", "resume_target", "read_common", "SavedRun",
           "read_saved_run"]

# Fields that must agree between a checkpoint and the model that loads it.
ARCHITECTURE_FIELDS = [
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_pre_softmax",
    "padded_vocab_size",
]
_ITER_DIR = re.compile(r"^iter_(\d{7})(\.replaced)?$")


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def iteration_dir(save: str | Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def latest_iteration(directory: str | Path) -> Optional[int]:
    """Returns the iteration in DIR/latest, or None when DIR has no such file."""
    marker = Path(directory) / "latest"
    if not marker.exists():
        return None
    text = marker.read_text(errors="replace").strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker} is corrupt: expected an iteration number, found {text[:40]!r}")
    return int(text)


def complete_checkpoints(save: str | Path) -> list[Path]:
    """The structurally complete checkpoints under SAVE, newest iteration first.

    ``iter_N.replaced`` (the previous copy of an iteration being re-saved) counts when
    ``iter_N`` itself is not complete.
    """
    found: dict[int, Path] = {}
    save = Path(save)
    if not save.is_dir():
        return []
    for entry in sorted(save.iterdir(), key=lambda p: p.name):  # iter_N before iter_N.replaced
        match = _ITER_DIR.match(entry.name)
        if not match or int(match.group(1)) in found:
            continue
        if trust.structural_fault(entry) is None:
            found[int(match.group(1))] = entry
    return [found[i] for i in sorted(found, reverse=True)]


def resume_point(save: str | Path, fallback: bool = True) -> Optional[Path]:
    """Returns the checkpoint a run saving to SAVE resumes from, None when SAVE holds none.

    That is the one ``latest`` names; when ``latest`` is damaged or names a damaged or missing
    checkpoint, a warning says so and the newest complete checkpoint is taken instead (training
    goes on from it). Without fallback (conversion, inspection, evaluation: a reader must not get
    an older model than it asked for without knowing) that is a CheckpointError naming it.
    """
    save = Path(save)
    marker = save / "latest"
    try:
        iteration = latest_iteration(save)
    except CheckpointError as err:
        iteration, problem = None, str(err)
    else:
        if iteration is None:
            return None
        problem = trust.structural_fault(iteration_dir(save, iteration))
        if problem is None:
            return iteration_dir(save, iteration)
    candidates = complete_checkpoints(save)
    if not candidates:
        raise CheckpointError(f"{marker} names a damaged checkpoint ({problem}) and {save} holds "
                              f"no other complete checkpoint")
    if not fallback:
        newest = int(_ITER_DIR.match(candidates[0].name).group(1))
        raise CheckpointError(f"{marker} names a damaged checkpoint ({problem}); the newest "
                              f"complete one is {candidates[0]}: give --iteration {newest} to "
                              f"use it")
    log.warning("%s names a damaged checkpoint (%s); resuming from %s, the newest complete "
                "checkpoint", marker, problem, candidates[0])
    return candidates[0]


def resume_target(cfg: TrainConfig) -> tuple[TrainConfig, Optional[Path]]:
    """Returns (cfg, the checkpoint directory to load, structurally checked, or None).

    With checkpoint.auto_resume (default) and a checkpoint already in checkpoint.save, cfg is set
    to resume from it: a restarted or requeued run continues itself (model, optimizer, schedule,
    data position) instead of starting again from checkpoint.load, which for a later phase is
    the previous phase's checkpoint, read weights-only. Otherwise checkpoint.load's (if any).
    """
    c = cfg.checkpoint
    point = resume_point(c.save) if c.auto_resume and c.save else None
    if point is None:
        return cfg, resolve_checkpoint_dir(c.load) if c.load else None
    if c.load and Path(c.load).resolve() == Path(c.save).resolve() and not c.weights_only:
        return dataclasses.replace(cfg, checkpoint=dataclasses.replace(c, load=str(point))), point
    log.info("resuming from %s; checkpoint.load=%s is not used", point, c.load)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(c, load=str(point),
                                                                   weights_only=False)), point


@dataclass(frozen=True)
class SavedRun:
    """What a checkpoint holds about the run that saved it, read once at set-up (after its
    bytes passed the checksum check): common.pt (model config and padded vocabulary, layout,
    Runtime, optimizer groups, train state) and config.yaml (the whole config, the tokenizer).
    Training reads everything it needs to know before building from this one value."""

    path: Path
    common: dict
    config: dict

    @property
    def padded_vocab_size(self) -> Optional[int]:
        return (self.common.get("model_config") or {}).get("padded_vocab_size")

    @property
    def tokenizer(self) -> str:
        """data.tokenizer of the run that saved it ("geno" when it records none)."""
        return (self.config.get("data") or {}).get("tokenizer", "geno")

    @property
    def weights_only(self) -> bool:
        """An import (geno-convert from-hf): weights only, no optimizer, schedule or position."""
        return bool(self.common.get("weights_only", False))


def read_saved_run(ckpt: Path, verify_checksums: bool = True) -> SavedRun:
    """CKPT (from resolve_checkpoint_dir / resume_target) through the trust boundary, then read
    once: see SavedRun."""
    common = open_for_loading(ckpt, verify_checksums)
    return SavedRun(Path(ckpt), common, _saved_config(ckpt))


def _saved_config(ckpt: Path) -> dict:
    """CKPT's config.yaml ({} when it has none: an older checkpoint)."""
    import yaml

    path = Path(ckpt) / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text()) if path.exists() else {}
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    return config if isinstance(config, dict) else {}


def resolve_checkpoint_dir(path: str | Path, iteration: Optional[int] = None,
                           fallback: bool = True) -> Path:
    """Returns the torch_dist directory for a save dir (+ iteration) or an iter_N dir itself.

    Raises CheckpointError when it is missing or structurally incomplete (naming what); a
    damaged ``latest`` falls back to the newest complete checkpoint only with fallback
    (resume_point).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    if (path / "metadata.json").exists() and iteration is None:
        ckpt = path
    elif iteration is None:
        ckpt = resume_point(path, fallback)
        if ckpt is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (no 'latest' file)")
    else:
        ckpt = iteration_dir(path, iteration)
        replaced = ckpt.with_name(ckpt.name + ".replaced")
        if not ckpt.exists() and replaced.exists():
            ckpt = replaced
    problem = trust.structural_fault(ckpt)
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded: {problem}")
    return ckpt


def open_for_loading(ckpt: Path, verify_checksums: bool = True) -> dict:
    """Passes CKPT through the trust boundary and returns its common state (common.pt).

    CKPT comes from resolve_checkpoint_dir, whose structural check has already read .metadata
    with the restricted unpickler; here (unless skipped) every stored byte is checked against
    checksums.json, before anything of the checkpoint is used.
    """
    if verify_checksums:
        trust.check_content(ckpt)
    return read_common(ckpt)


def _sharded_rng_state() -> ShardedObject:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _restore_rng_state(state: dict) -> None:
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


def _hyperparameters(optimizer) -> list[list[dict]]:
    """Each param group's settings (betas, eps, max_lr, min_lr, multipliers ...) as this run
    built them, without its parameters and step count."""
    return [[{k: v for k, v in group.items() if k not in ("params", "step")}
             for group in inner.param_groups]
            for inner in _inner_optimizers(optimizer)]


def _restore_hyperparameters(optimizer, own: list[list[dict]]) -> None:
    """Puts this run's settings back into the param groups a load replaced with the saved ones:
    on resume what the user passes now wins (optimizer.* and schedule.*; the scheduler sets lr
    and weight decay from them at every step); only the step count and the tensors are the
    checkpoint's."""
    for inner, groups in zip(_inner_optimizers(optimizer), own):
        for group, settings in zip(inner.param_groups, groups):
            group.update(settings)


def _num_optimizers(optimizer) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def _layout(cfg: TrainConfig, optimizer) -> dict:
    p = cfg.parallel
    return {
        "optimizers": _num_optimizers(optimizer),  # experts get their own optimizer when EP > 1
        "tensor_parallel": p.tensor_parallel,
        "pipeline_parallel": p.pipeline_parallel,
        "virtual_pipeline": p.virtual_pipeline,
        "expert_parallel": p.expert_parallel,
        "context_parallel": p.context_parallel,
        "world_size": torch.distributed.get_world_size(),
    }


# The optimizer state in canonical (per-parameter) form: loads at any TP/PP/EP/DP.
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,  # same tensor keys whether or not experts get their own optimizer
    # gathered over gloo into host memory of DP rank 0 only (by default every DP rank gathers the
    # whole state of its model-parallel shard, through GPU memory); the stored form is the same
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


def _unwrap(model) -> list:
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


# One checkpoint format whichever layer spec wrote it (DESIGN decision 16). megatron-core's
# Transformer Engine MoE layer keeps the pre-MLP RMSNorm as a module of its own, stored as
# decoder.layers.pre_mlp_layernorm.weight; the local spec stores the same weight under
# linear_fc1's fused-norm name (gpt_layer_specs.py, sharded_state_dict_keys_map). Saves use the
# local name; a checkpoint that has the TE name loads into either spec.
TE_KEY_ALIASES = {
    "decoder.layers.pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
}


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


def _model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict as saved: the local spec's keys, whichever spec built it."""
    return _per_chunk(_unwrap(model),
                      lambda chunk: _rename_keys(chunk.sharded_state_dict(), TE_KEY_ALIASES))


def _seal(tmp: Path) -> None:
    """Writes tmp/checksums.json; every rank checksums its share of the data files."""
    share = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    mine = trust.compute_checksums(tmp, share)
    shares: list = [None] * share[1]
    torch.distributed.all_gather_object(shares, mine)
    if share[0] == 0:
        trust.write_checksums(tmp, trust.merge_checksums(shares))


def _publish(save: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Renames a sealed tmp to final and points latest at it, never without a complete copy.

    An existing final (a re-save of the same iteration) is moved aside first and removed only
    after the new one is in place and latest is written.
    """
    fsync_tree(tmp)
    replaced = final.with_name(final.name + ".replaced")
    if final.exists():
        if replaced.exists():  # an earlier re-save was killed after moving aside: final is newer
            shutil.rmtree(replaced)
        os.replace(final, replaced)
    os.replace(tmp, final)
    fsync_path(save)
    write_text_atomic(save / "latest", f"{iteration}\n")
    if replaced.exists():
        shutil.rmtree(replaced)


def checkpoint_bytes(cfg: TrainConfig, vocab_size: int) -> int:
    """What one checkpoint of this model takes on disk, roughly: fp32 weights and their two Adam
    moments (12 B per parameter), plus the model's own weights as trained (2 or 4 B)."""
    from megatron_geno.arithmetic import count_parameters, resolve_padded_vocab

    padded = resolve_padded_vocab(cfg.model, vocab_size, cfg.parallel.tensor_parallel)
    return 16 * count_parameters(cfg.model, padded)["total"]


def space_warning(save: Path, needed: int) -> Optional[str]:
    """A warning when save's filesystem has less free space than one checkpoint needs."""
    free = shutil.disk_usage(save).free
    if free >= needed:
        return None
    return (f"checkpoint.save={save} has {free / 2**30:.1f} GiB free and one checkpoint takes "
            f"about {needed / 2**30:.1f} GiB: saves will fail with 'no space left' unless space "
            f"is freed")


def save_checkpoint(cfg: TrainConfig, model, optimizer, scheduler, state: TrainState,
                    async_queue=None, runtime=None) -> Path:
    """Saves a complete checkpoint under cfg.checkpoint.save and returns its directory.

    With async_queue (megatron-core's AsyncCallsQueue; checkpoint.async_save) the tensors are
    staged to host memory and written by a forked process while training goes on; the sealing
    (checksums) and publishing (rename, ``latest``) run when the queue finalizes the save, after
    every rank's writer is done, so ``latest`` never names a checkpoint still being written."""
    save = Path(cfg.checkpoint.save)
    final = iteration_dir(save, state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this iteration that was killed
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    compat.allocate_optimizer_state(optimizer)  # a checkpoint before the first step (iteration 0)
    model_sd = _model_sharded_state_dict(model)
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA),
        "rng_state": _sharded_rng_state(),
        "scheduler": scheduler.state_dict(),
        "train_state": dataclasses.asdict(state),
        "model_config": dataclasses.asdict(cfg.model),
        "layout": _layout(cfg, optimizer),
        # the resolved stack that wrote it (runtime.Runtime): spec, experts, precision, ...
        "runtime": runtime.to_dict() if runtime is not None else None,
    }
    finish = partial(_seal_and_publish, save, tmp, final, state.iteration, cfg.to_yaml())
    try:
        if async_queue is None:
            dist_checkpointing.save(sharded, str(tmp))
            finish()
        else:
            request = dist_checkpointing.save(sharded, str(tmp), async_sharded_save=True)
            request.add_finalize_fn(finish)
            async_queue.schedule_async_request(request)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException; every rank
        raise save_failed(err, final) from None  # gets here alike (see save_failed)
    return final


class _SealFailed(RuntimeError):
    """Rank 0 could not write the seal, the config or ``latest``; raised on every rank."""


def _seal_and_publish(save: Path, tmp: Path, final: Path, iteration: int, config: str) -> None:
    """After every rank has written its part of tmp: checksums, then (rank 0) the rename to final
    and ``latest``. A failed write on rank 0 is raised on every rank (_SealFailed), so that all
    of them leave the save alike."""
    torch.distributed.barrier()
    _seal(tmp)
    failed = [None]
    if torch.distributed.get_rank() == 0:
        try:
            (tmp / "config.yaml").write_text(config)
            _publish(save, tmp, final, iteration)
        except OSError as err:
            failed = [err]
    torch.distributed.broadcast_object_list(failed, src=0)
    if failed[0] is not None:
        raise _SealFailed(str(failed[0])) from failed[0]


def save_failed(err: BaseException, final: Path) -> CheckpointError:
    """The one line for a save that failed (disk full, quota, a dead filesystem) after
    megatron-core raised on every rank (its save broadcasts any writer's failure) or the seal
    failed (_SealFailed): rank 0 removes the partial save; the previous checkpoint and ``latest``
    are untouched. torch's file writer loses the errno ("file write failed"), so a filesystem
    with less free space than the previous checkpoint takes is judged full."""
    save, tmp = final.parent, final.with_name(final.name + ".tmp")
    free = free_bytes(save)  # before the partial save is removed
    previous = None
    try:
        previous = latest_iteration(save)
    except CheckpointError:
        pass
    before = iteration_dir(save, previous) if previous is not None else None
    size = sum(f.stat().st_size for f in before.rglob("*") if f.is_file()) if before else 0
    reason = out_of_space(err) or ("no space left on device" if free < max(size, 64 << 20)
                                   else str(err).strip().splitlines()[-1][:300])
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()
    kept = (f"{save / 'latest'} still names iteration {previous}" if previous is not None
            else "no earlier checkpoint exists")
    return CheckpointError(f"saving {final.name} into {save} failed: {reason} "
                           f"({format_bytes(free)} free there); the partial save was removed and "
                           f"{kept}")


def read_common(ckpt: Path) -> dict:
    """Returns the checkpoint's non-tensor state (common.pt); CheckpointError if unreadable."""
    return trust.read_common(ckpt)


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
    loaded = trust.trusted_load(request, ckpt)
    apply_model_weights(chunks, loaded["model"], common, ckpt)


def check_architecture(saved: dict, model: ModelConfig, where: Path) -> None:
    """Raises CheckpointError naming the first architecture field that differs."""
    current = dataclasses.asdict(model)
    for name in ARCHITECTURE_FIELDS:
        if name in saved and saved[name] != current[name]:
            raise CheckpointError(
                f"checkpoint {where} has model.{name}={saved[name]} but the config says "
                f"model.{name}={current[name]}"
            )


def load_checkpoint(cfg: TrainConfig, model, optimizer, scheduler, saved_run: SavedRun,
                    fused_adam: bool = False) -> TrainState:
    """Loads the checkpoint read at set-up (saved_run) into model (and optimizer, scheduler, RNG
    unless weights_only). fused_adam: this run's Adam kernel (runtime.adam == 'fused'); a
    checkpoint carries the kernel choice of the run that saved it, which this run's replaces."""
    ckpt, common = saved_run.path, saved_run.common
    if "model_config" in common:
        check_architecture(common["model_config"], cfg.model, ckpt)
    # an import (geno-convert from-hf) holds weights only: fresh optimizer, schedule, data position
    weights_only = cfg.checkpoint.weights_only or saved_run.weights_only
    saved, now = saved_run.tokenizer, cfg.data.tokenizer
    if not weights_only and _tokenizer_key(saved) != _tokenizer_key(now):
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with data.tokenizer={saved} and this run says "
            f"data.tokenizer={now}: its token ids would mean other bases. A resume keeps the "
            f"tokenizer; to start a new run from these weights, add checkpoint.weights_only=true")
    saved_layout = {"virtual_pipeline": 1, **common.get("layout", {})}  # older: no such key
    same_layout = saved_layout == _layout(cfg, optimizer)
    # experts get an optimizer of their own when EP > 1: across that change the optimizer's
    # non-tensor state (param groups, step) is rebuilt for the new chain (remap_optimizer_state);
    # its tensors (fp32 weights, Adam moments) are stored under layout-free keys and load as is
    regrouped = saved_layout.get("optimizers", 1) != _num_optimizers(optimizer)
    model_sd = model_weights_request(_unwrap(model), common, ckpt)
    sharded = {"model": model_sd}
    if not weights_only:
        compat.allocate_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_METADATA
        )
        if same_layout:
            sharded["rng_state"] = _sharded_rng_state()
    loaded = trust.trusted_load(sharded, ckpt)
    apply_model_weights(_unwrap(model), loaded["model"], common, ckpt)
    if weights_only:
        log.info("%s", resume_report(saved_run, cfg, ["weights"], "fresh optimizer, schedule "
                                     "and data position"))
        return TrainState()
    if regrouped:
        loaded["optimizer"] = remap_optimizer_state(loaded["optimizer"], optimizer,
                                                    common["optimizer"])
    own = _hyperparameters(optimizer)
    optimizer.load_state_dict(loaded["optimizer"])
    _restore_hyperparameters(optimizer, own)
    compat.unshare_adam_steps(optimizer)
    compat.set_adam_kernel(optimizer, fused_adam)
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in loaded:
        _restore_rng_state(loaded["rng_state"])
    state = TrainState(**loaded["train_state"])
    carried = ["weights", "Adam moments" + (" (regrouped for this layout's optimizers)"
                                            if regrouped else ""),
               f"schedule and data position (iteration {state.iteration}, "
               f"{state.consumed_samples:,d} samples)",
               "RNG state" if "rng_state" in loaded else None]
    fresh = "fresh RNG state (another layout)" if "rng_state" not in loaded else ""
    log.info("%s", resume_report(saved_run, cfg, [c for c in carried if c], fresh))
    return state


# keys that name where a run reads and writes, not what it computes
_ROUTINE_KEYS = ("checkpoint.load", "checkpoint.save", "logging.run_dir", "data.cache_dir")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _tokenizer_key(spec: str) -> str:
    """data.tokenizer with the built-in's aliases made one (geno = geno:upper)."""
    from megatron_geno.tokenizer import GENO_SPECS

    return f"geno:{GENO_SPECS[spec]}" if spec in GENO_SPECS else spec


def saved_tokenizer(ckpt: Path) -> str:
    """data.tokenizer of the run that saved CKPT (an iter_N directory; its config.yaml), or
    "geno" when it records none (for readers outside training: conversion, evaluation)."""
    return SavedRun(Path(ckpt), {}, _saved_config(ckpt)).tokenizer


def config_changes(saved_run: SavedRun, cfg: TrainConfig) -> list[str]:
    """'key: saved -> now' for every config value that differs from the one the checkpoint was
    saved with (its config.yaml; empty when it has none)."""
    saved = _flatten(saved_run.config)
    now = _flatten(cfg.to_dict())
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(saved) | set(now))
            if key not in _ROUTINE_KEYS and saved.get(key) != now.get(key) and key in saved]


def resume_report(saved_run: SavedRun, cfg: TrainConfig, carried: list[str],
                  fresh: str = "") -> str:
    """One line: what a load carried over, what starts fresh, and which settings changed."""
    changes = config_changes(saved_run, cfg)
    text = f"loaded {saved_run.path}: carried over {', '.join(carried)}" + (f"; {fresh}" if fresh else "")
    if changes:
        shown = "; ".join(changes[:12]) + (f"; and {len(changes) - 12} more"
                                           if len(changes) > 12 else "")
        text += f". Changed since it was saved, and applied: {shown}"
    return text
