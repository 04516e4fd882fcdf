"""torch_dist checkpoints: saving and loading a run (model, optimizer, scheduler, RNG, iteration
and data position). The API training, conversion and evaluation use; its parts live by job in
megatron_geno.checkpoint:

- ``trust``: nothing read from a checkpoint is executed (restricted unpicklers; torch alone);
- ``strategy``: megatron-core's torch_dist load reading through ``trust``;
- ``integrity``: checksums, and the structural check of a directory;
- ``layout``: a save directory on disk (iterations, ``latest``, sealing and publishing, resume
  points, SavedRun);
- ``state``: what a checkpoint holds and how it maps onto this run (train state, model keys,
  optimizer layout and remapping, RNG).

The distributed optimizer's state is saved in model-space boxes (``optimizer_shards``): every
rank writes its own shard with no gather onto data-parallel rank 0; megatron-core's fully
parallel save spreads the replicated model weights over the data-parallel group; each item is
checksummed as it is written. A checkpoint saved at one TP/PP/EP/CP/DP loads at another, each
rank reading (and verifying) only the stored items it needs.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_geno import without_te
from megatron_geno.checkpoint import strategy
from megatron_geno.checkpoint.integrity import seal, structural_fault
from megatron_geno.checkpoint.layout import (
    TE_KEY_ALIASES, SavedRun, check_data_position, checkpoint_bytes, complete_checkpoints,
    config_changes, iteration_dir, latest_iteration, open_for_loading, read_common, read_saved_run,
    resolve_checkpoint_dir, resume_point, resume_report, resume_target, save_failed,
    saved_tokenizer, seal_and_publish, space_warning, tokenizer_key,
)
from megatron_geno.checkpoint.state import (
    TrainState, apply_model_weights, check_architecture,
    hyperparameters, layout_record, load_model_weights, model_sharded_state_dict,
    model_weights_request, num_optimizers, remap_optimizer_state, restore_hyperparameters,
    optimizer_loaded, optimizer_request, restore_rng_state, sharded_rng_state, stored_keys,
    unwrap_chunks,
)
from megatron_geno.checkpoint.trust import CheckpointError
from megatron_geno.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "SavedRun", "TE_KEY_ALIASES", "TrainState", "check_architecture",
           "check_data_position", "checkpoint_bytes", "complete_checkpoints", "config_changes",
           "iteration_dir", "latest_iteration", "load_checkpoint", "load_model_weights",
           "open_for_loading", "read_common", "read_saved_run", "resolve_checkpoint_dir",
           "resume_point", "resume_target", "save_checkpoint", "save_failed", "saved_tokenizer",
           "seal", "space_warning", "stored_keys", "structural_fault"]


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
    without_te.allocate_optimizer_state(optimizer)  # a checkpoint before the first step (iteration 0)
    model_sd = model_sharded_state_dict(model)
    sharded = {
        "model": model_sd,
        "optimizer": optimizer_request(optimizer, model_sd),
        "rng_state": sharded_rng_state(),
        "scheduler": scheduler.state_dict(),
        "train_state": dataclasses.asdict(state),
        "model_config": dataclasses.asdict(cfg.model),
        "layout": layout_record(cfg, optimizer),
        # the resolved stack that wrote it (runtime.Runtime): spec, experts, precision, ...
        "runtime": runtime.to_dict() if runtime is not None else None,
    }
    finish = partial(seal_and_publish, save, tmp, final, state.iteration, cfg.to_yaml(),
                     cfg.checkpoint.keep_last)
    try:
        writer = strategy.save_strategy(_replica_group())
        if async_queue is None:
            dist_checkpointing.save(sharded, str(tmp), sharded_strategy=writer)
            finish()
        else:
            request = dist_checkpointing.save(sharded, str(tmp), sharded_strategy=writer,
                                              async_sharded_save=True)
            request.add_finalize_fn(finish)
            async_queue.schedule_async_request(request)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException; every rank
        raise save_failed(err, final) from None  # gets here alike (see save_failed)
    return final


def _replica_group():
    """The ranks that hold replicas of the same model tensors (data parallel, with context
    parallel: megatron-core's training glue uses this group for its fully parallel save and
    load)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def load_checkpoint(cfg: TrainConfig, model, optimizer, scheduler, saved_run: SavedRun,
                    fused_adam: bool = False) -> TrainState:
    """Loads the checkpoint read at set-up (saved_run) into model (and optimizer, scheduler, RNG
    unless weights_only), whose architecture and data position the set-up has checked
    (check_architecture, check_data_position: before the model was built). fused_adam: this
    run's Adam kernel (runtime.adam == 'fused'); a checkpoint carries the kernel choice of the
    run that saved it, which this run's replaces."""
    ckpt, common = saved_run.path, saved_run.common
    # an import (geno-convert from-hf) holds weights only: fresh optimizer, schedule, data position
    weights_only = cfg.checkpoint.weights_only or saved_run.weights_only
    saved, now = saved_run.tokenizer, cfg.data.tokenizer
    if not weights_only and tokenizer_key(saved) != tokenizer_key(now):
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with data.tokenizer={saved} and this run says "
            f"data.tokenizer={now}: its token ids would mean other bases. A resume keeps the "
            f"tokenizer; to start a new run from these weights, add checkpoint.weights_only=true")
    saved_layout = {"virtual_pipeline": 1, **common.get("layout", {})}  # older: no such key
    same_layout = saved_layout == layout_record(cfg, optimizer)
    # experts get an optimizer of their own when EP > 1: across that change the optimizer's
    # non-tensor state (param groups, step) is rebuilt for the new chain (remap_optimizer_state);
    # its tensors (fp32 weights, Adam moments) are stored under layout-free keys and load as is
    regrouped = saved_layout.get("optimizers", 1) != num_optimizers(optimizer)
    model_sd = model_weights_request(unwrap_chunks(model), common, ckpt)
    sharded = {"model": model_sd}
    if not weights_only:
        without_te.allocate_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer_request(optimizer, model_sd, is_loading=True)
        if same_layout:
            sharded["rng_state"] = sharded_rng_state()
    loaded = strategy.trusted_load(sharded, ckpt, checksums=saved_run.checksums,
                                   parallel_group=_replica_group())
    apply_model_weights(unwrap_chunks(model), loaded["model"], common, ckpt)
    if weights_only:
        log.info("%s", resume_report(saved_run, cfg, ["weights"], "fresh optimizer, schedule "
                                     "and data position"))
        return TrainState()
    optimizer_loaded(optimizer, sharded["optimizer"], loaded["optimizer"])
    if regrouped:
        loaded["optimizer"] = remap_optimizer_state(loaded["optimizer"], optimizer,
                                                    common["optimizer"])
    own = hyperparameters(optimizer)
    optimizer.load_state_dict(loaded["optimizer"])
    restore_hyperparameters(optimizer, own)
    without_te.unshare_adam_steps(optimizer)
    without_te.set_adam_kernel(optimizer, fused_adam)
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in loaded:
        restore_rng_state(loaded["rng_state"])
    state = TrainState(**loaded["train_state"])
    if cfg.checkpoint.reset_data_position:
        log.info("checkpoint.reset_data_position: the data starts from its beginning (the "
                 "checkpoint had consumed %s samples)", f"{state.consumed_samples:,d}")
        state = dataclasses.replace(state, consumed_samples=0)
    carried = ["weights", "Adam moments" + (" (regrouped for this layout's optimizers)"
                                            if regrouped else ""),
               f"schedule and data position (iteration {state.iteration}, "
               f"{state.consumed_samples:,d} samples)",
               "RNG state" if "rng_state" in loaded else None]
    fresh = "fresh RNG state (another layout)" if "rng_state" not in loaded else ""
    log.info("%s", resume_report(saved_run, cfg, [c for c in carried if c], fresh))
    return state

