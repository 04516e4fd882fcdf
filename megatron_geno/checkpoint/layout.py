"""A save directory on disk: iterations, ``latest``, sealing and publishing a save, what a run
resumes from, and what a checkpoint says about the run that saved it (SavedRun, the config
changes a resume applies).

Layout of a save directory::

    SAVE/iter_0000010/        a megatron-core distributed checkpoint (torch_dist)
    SAVE/iter_0000010/config.yaml     the full resolved training config
    SAVE/iter_0000010/checksums.json  CRC32C of every stored item (checkpoint.integrity)
    SAVE/latest               the newest complete iteration (written last, atomically)

A checkpoint is written to ``iter_N.tmp``, sealed with its checksums and renamed when every rank
has finished, so a killed run never leaves a directory that looks complete. Re-saving an
iteration moves the old one aside (``iter_N.replaced``) and removes it only once the new one is
in place: a kill at any moment leaves a complete checkpoint to resume from. A start whose
``latest`` is damaged says so and resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_geno.checkpoint import integrity, trust
from megatron_geno.checkpoint.trust import CheckpointError
from megatron_geno.config import TrainConfig, flat_keys
from megatron_geno.files import free_bytes, out_of_space, publish_dir, write_text_atomic
from megatron_geno.units import format_bytes

log = logging.getLogger(__name__)

# One checkpoint format whichever layer spec wrote it (DESIGN decision 16). megatron-core's
# Transformer Engine MoE layer keeps the pre-MLP RMSNorm as a module of its own, stored as
# decoder.layers.pre_mlp_layernorm.weight; the local spec stores the same weight under
# linear_fc1's fused-norm name (gpt_layer_specs.py, sharded_state_dict_keys_map). Saves use the
# local name; a checkpoint that has the TE name loads into either spec.
TE_KEY_ALIASES = {
    "decoder.layers.pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
}


_ITER_DIR = re.compile(r"^iter_(\d{7})(\.replaced)?$")


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


def complete_checkpoints(save: str | Path, since: int = 0) -> list[Path]:
    """The structurally complete checkpoints under SAVE, newest iteration first (only those at
    iteration SINCE or later are checked and listed).

    ``iter_N.replaced`` (the previous copy of an iteration being re-saved) counts when
    ``iter_N`` itself is not complete.
    """
    found: dict[int, Path] = {}
    save = Path(save)
    if not save.is_dir():
        return []
    for entry in sorted(save.iterdir(), key=lambda p: p.name):  # iter_N before iter_N.replaced
        match = _ITER_DIR.match(entry.name)
        if not match or int(match.group(1)) in found or int(match.group(1)) < since:
            continue
        if integrity.structural_fault(entry) is None:
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
    candidates = None
    try:
        iteration = latest_iteration(save)
    except CheckpointError as err:
        iteration, problem = None, str(err)
    else:
        if iteration is None:
            candidates = complete_checkpoints(save)
            if not candidates:
                return None
            problem = "it is missing"  # but complete checkpoints are there: never start over
        else:
            problem = integrity.structural_fault(iteration_dir(save, iteration))
        if problem is None:
            return iteration_dir(save, iteration)
    if candidates is None:
        candidates = complete_checkpoints(save)
    if not candidates:
        raise CheckpointError(f"{_latest_problem(marker, problem)} and {save} holds no other "
                              f"complete checkpoint")
    if not fallback:
        newest = int(_ITER_DIR.match(candidates[0].name).group(1))
        raise CheckpointError(f"{_latest_problem(marker, problem)}; the newest complete one "
                              f"is {candidates[0]}: give --iteration {newest} (or that "
                              f"directory) to use it")
    log.warning("%s; resuming from %s, the newest complete checkpoint",
                _latest_problem(marker, problem), candidates[0])
    return candidates[0]


def _latest_problem(marker: Path, problem: str) -> str:
    if problem == "it is missing":
        return f"{marker.parent} holds complete checkpoints but no 'latest' file"
    return f"{marker} names a damaged checkpoint ({problem})"


def resume_target(cfg: TrainConfig) -> tuple[TrainConfig, Optional[Path]]:
    """Returns (cfg, the checkpoint directory to load, structurally checked, or None).

    With checkpoint.auto_resume (default) and a checkpoint already in checkpoint.save, cfg is set
    to resume from it: a restarted or requeued run continues itself (model, optimizer, schedule,
    data position) instead of starting again from checkpoint.load when that is a weights-only
    start (a later phase reading the previous phase's checkpoint). A full checkpoint.load (not
    weights_only) is what the user asked to continue from and wins over auto-resume; both cases
    are said at start-up. A run never starts where its saves would replace complete checkpoints
    already in checkpoint.save (refused in one line, before anything is built).
    """
    c = cfg.checkpoint
    point = resume_point(c.save) if c.auto_resume and c.save else None
    same_dir = bool(c.load and c.save and Path(c.load).resolve() == Path(c.save).resolve())
    if point is not None and (not c.load or same_dir or c.weights_only):
        if c.load and not same_dir:
            log.warning("resuming from %s (checkpoint.auto_resume: this run's own newest "
                        "checkpoint); the weights-only checkpoint.load=%s is not used", point,
                        c.load)
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(c, load=str(point),
                                                                      weights_only=False))
        target = point
    else:
        target = resolve_checkpoint_dir(c.load) if c.load else None
        if point is not None:
            log.warning("loading checkpoint.load=%s as asked; checkpoint.auto_resume would have "
                        "resumed from %s", target, point)
    if c.save:
        start = 0 if target is None or cfg.checkpoint.weights_only else _iteration_of(target)
        _refuse_overwrite(Path(c.save), start, target)
    return cfg, target


def _iteration_of(ckpt: Path) -> int:
    match = _ITER_DIR.match(ckpt.name)
    if match:
        return int(match.group(1))
    state = read_common(ckpt).get("train_state")  # a directory of another name (from-hf's)
    return int(state.get("iteration", 0)) if isinstance(state, dict) else 0


def _refuse_overwrite(save: Path, start: int, target: Optional[Path]) -> None:
    """CheckpointError when SAVE holds a complete checkpoint this run's saves would replace: one
    at an iteration beyond START (another run's, or this one's before a rollback)."""
    for ckpt in complete_checkpoints(save, since=start):
        iteration = int(_ITER_DIR.match(ckpt.name).group(1))
        if iteration == start and target is not None and ckpt.resolve() == target.resolve():
            break
        raise CheckpointError(
            f"checkpoint.save={save} holds the complete checkpoint {ckpt.name}, which this run "
            f"(starting at iteration {start}) would replace: give another checkpoint.save, or "
            f"continue it (checkpoint.load={save})")


@dataclass(frozen=True)
class SavedRun:
    """What a checkpoint holds about the run that saved it, read once at set-up (after its
    bytes passed the checksum check): common.pt (model config and padded vocabulary, layout,
    Runtime, optimizer groups, train state) and config.yaml (the whole config, the tokenizer).
    Training reads everything it needs to know before building from this one value."""

    path: Path
    common: dict
    config: dict
    # checksums.json, which the load checks item by item as it reads; None when not verifying
    checksums: Optional[dict] = None

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
    once: see SavedRun. With verify_checksums, .metadata, common.pt and every data file's size
    are checked now, and each stored item as the load reads it (SavedRun.checksums): a resume
    reads the checkpoint once, each rank its own part."""
    checksums = None
    if verify_checksums:
        checksums = integrity.check_index_files(ckpt)
    return SavedRun(Path(ckpt), read_common(ckpt), _saved_config(ckpt), checksums)


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
    problem = integrity.structural_fault(ckpt)
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
        integrity.check_content(ckpt)
    return read_common(ckpt)


def _gather_written_checksums(tmp: Path) -> Optional[dict]:
    """Every rank's item checksums, computed while its writers wrote (integrity.
    written_checksums); the merged map on rank 0, None elsewhere."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    shares: list = [None] * world
    torch.distributed.all_gather_object(shares, integrity.written_checksums(tmp, rank))
    if rank != 0:
        return None
    merged: dict = {}
    for share in shares:
        merged.update(share)
    return merged


def _publish(save: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Renames a sealed tmp to final and points latest at it, never without a complete copy.

    An existing final (a re-save of the same iteration) is moved aside first and removed only
    after the new one is in place and latest is written.
    """
    old = publish_dir(tmp, final, replace=True)  # moved aside: iter_N.replaced
    write_text_atomic(save / "latest", f"{iteration}\n")
    if old is not None:
        _remove_ours(old, f"re-saving {final.name}")


# what a save writes into iter_N (megatron-core's torch_dist files, ours); nothing else is removed
_OURS = re.compile(r"^(__\d+_\d+\.distcp|__\d+_\d+\.distcp\.crc32c|\.metadata|common\.pt|"
                   r"metadata\.json|checksums\.json|config\.yaml)$")
KEEP_MARK = "KEEP"


def prune(save: Path, keep_last: int) -> list[Path]:
    """checkpoint.keep_last: removes SAVE's complete checkpoints older than the newest KEEP_LAST
    and returns them. Kept whatever their age: the one ``latest`` names, the end of a phase (its
    iteration reached the saving run's schedule.train_iters: what the next phase loads), and an
    iteration holding a file named KEEP. Only files a save writes are removed; a directory that
    holds anything else keeps it (and stays, with a warning)."""
    try:
        named = latest_iteration(save)
    except CheckpointError:
        named = None
    removed = []
    for ckpt in complete_checkpoints(save)[keep_last:]:
        match = _ITER_DIR.match(ckpt.name)
        iteration = int(match.group(1))
        if match.group(2) or iteration == named or (ckpt / KEEP_MARK).exists():
            continue
        try:
            train_iters = _saved_config(ckpt).get("schedule", {}).get("train_iters")
        except CheckpointError:
            train_iters = None
        if train_iters is None or iteration >= int(train_iters):
            continue  # the end of a phase, or unknown: kept
        _remove_ours(ckpt, "checkpoint.keep_last")
        removed.append(ckpt)
    return removed


def _remove_ours(ckpt: Path, why: str) -> None:
    """Removes the files a save wrote into CKPT, then CKPT if nothing else is left in it."""
    for f in ckpt.iterdir():
        if _OURS.match(f.name) and f.is_file():
            f.unlink()
    others = sorted(f.name for f in ckpt.iterdir())
    if others:
        log.warning("%s: removed the checkpoint files of %s but kept the directory: it holds "
                    "files this project did not write (%s)", why, ckpt, ", ".join(others[:5]))
    else:
        ckpt.rmdir()


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


class _SealFailed(RuntimeError):
    """Rank 0 could not write the seal, the config or ``latest``; raised on every rank."""


def seal_and_publish(save: Path, tmp: Path, final: Path, iteration: int, config: str,
                     keep_last: int = 0) -> None:
    """After every rank has written its part of tmp: checksums.json from the checksums the
    writers computed (nothing is read back), then (rank 0) the rename to final and ``latest``.
    A failure on rank 0 is raised on every rank (_SealFailed), so that all of them leave the
    save alike."""
    torch.distributed.barrier()
    written = _gather_written_checksums(tmp)
    failed = [None]
    if torch.distributed.get_rank() == 0:
        try:
            integrity.write_checksums(tmp, integrity.seal_from_written(tmp, written))
            (tmp / "config.yaml").write_text(config)
            _publish(save, tmp, final, iteration)
        except (OSError, CheckpointError) as err:
            failed = [err]
        else:
            if keep_last:
                prune(save, keep_last)
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


# keys that name where a run reads and writes, not what it computes
_ROUTINE_KEYS = ("checkpoint.load", "checkpoint.save", "logging.run_dir", "data.cache_dir")


def tokenizer_key(spec: str) -> str:
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
    saved = flat_keys(saved_run.config)
    now = flat_keys(cfg.to_dict())
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(saved) | set(now))
            if key not in _ROUTINE_KEYS and saved.get(key) != now.get(key) and key in saved]


_DATA_POSITION_KEYS = ("data.seq_length", "data.global_batch_size", "data.source", "data.blend")


def check_data_position(saved_run: SavedRun, cfg: TrainConfig) -> None:
    """CheckpointError when a full resume would carry the checkpoint's data position (a sample
    count) into data it does not describe: another sequence length, global batch, source or
    blend. checkpoint.reset_data_position (or weights_only) accepts the change."""
    c = cfg.checkpoint
    if c.weights_only or c.reset_data_position or saved_run.weights_only or not saved_run.config:
        return
    saved, now = flat_keys(saved_run.config), flat_keys(cfg.to_dict())
    for key in _DATA_POSITION_KEYS:
        if key in saved and saved[key] != now[key]:
            raise CheckpointError(
                f"checkpoint {saved_run.path} was saved with {key}={saved[key]} and this run says "
                f"{key}={now[key]}: its data position would point at other data. Add "
                f"checkpoint.reset_data_position=true to keep weights, optimizer and schedule and "
                f"start the data from its beginning, or checkpoint.weights_only=true for a new "
                f"run from the weights")


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

