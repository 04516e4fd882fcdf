"""The training loop: megatron-core DDP, distributed optimizer and pipeline schedules, nothing more."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_geno import distributed, quiet, without_te
from megatron_geno.arithmetic import flops_per_token, resolve_padded_vocab
from megatron_geno.attention import flash_refusal
from megatron_geno.checkpointing import (
    CheckpointError,
    SavedRun,
    TrainState,
    check_architecture,
    check_data_position,
    checkpoint_bytes,
    complete_checkpoints,
    load_checkpoint,
    read_saved_run,
    resume_target,
    save_checkpoint,
    save_failed,
    space_warning,
)
from megatron_geno.config import ConfigError, TrainConfig, warmup_steps
from megatron_geno.data import Prefetcher, build_datasets, microbatches
from megatron_geno.evaluation.during_training import training_eval
from megatron_geno.files import DirectoryLock, DirectoryLocked
from megatron_geno.metrics import ExpertLoad, MetricsWriter, format_record, peak_flops
from megatron_geno.model import build_model_chunks, wrap_ddp
from megatron_geno.runtime import Machine, Runtime, resolve
from megatron_geno.tokenizer import build_tokenizer

log = logging.getLogger("megatron_geno")


def build_optimizer(cfg: TrainConfig, model, runtime: Runtime):
    """Returns (optimizer, scheduler): megatron-core AdamW (runtime.adam's kernel) and its
    warmup + decay schedule."""
    o, s, d = cfg.optimizer, cfg.schedule, cfg.data
    bf16 = runtime.precision == "bf16"
    optimizer = get_megatron_optimizer(
        McoreOptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        model,
    )
    without_te.set_adam_kernel(optimizer, runtime.adam == "fused")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=warmup_steps(s) * d.global_batch_size,
        lr_decay_steps=max(s.train_iters, 1) * d.global_batch_size, lr_decay_style=s.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(s.train_iters, 1) * d.global_batch_size, wd_incr_style="constant",
        # on resume this run's schedule wins over the checkpoint's (megatron-core's default is
        # the reverse); only the step count comes from the checkpoint (checkpointing.py)
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Returns (summed loss, token count, {'lm loss': [sum, count]}) for megatron-core's schedule."""
    losses = output.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    # this context-parallel rank's chunks r and 2CP-1-r of every tensor (the query rows of an
    # attention mask), cut on the host before the copy; the whole batch at CP = 1
    batch = get_batch_on_this_cp_rank(next(data_iterator))
    # pinned by the loader on a GPU: the copies overlap the work already queued
    device = next(model.parameters()).device  # where this chunk computes
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def loss_totals(outputs: list[dict], device: torch.device) -> torch.Tensor:
    """[loss sum, token count] of this rank's micro-batches, on the device (no host read)."""
    totals = torch.zeros(2, device=device)
    if parallel_state.is_pipeline_last_stage():
        for out in outputs:
            totals += out["lm loss"].to(totals.device)
    return totals


def reduce_loss(totals: torch.Tensor) -> float:
    """Returns the token-mean loss of loss_totals (of one global batch, or several added),
    known on every rank: each rank's sums (with CP, of its sequence chunks) added over DP x CP."""
    totals = totals.clone()
    torch.distributed.all_reduce(
        totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return float(totals[0] / totals[1].clamp(min=1))


class StopSignal:
    """Records SIGTERM / SIGUSR1 / Ctrl-C so the loop saves and exits at a step boundary.

    Every rank learns whether any rank got one from a CPU flag all-reduced over a gloo group (on
    CPU runs, the default group is gloo already), asynchronously: each step starts the reduction
    of this rank's flag and reads the one the previous step started, long finished by then. No
    step waits on the device or on the other ranks for it; every rank sees the same answer at the
    same step, one step after the signal."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        # every rank creates it, in the same order (TrainingRun's set-up)
        self.group = torch.distributed.new_group(backend="gloo") \
            if torch.distributed.get_backend() != "gloo" else None
        self.pending = None  # (flag, work) of the reduction the previous step started
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.received:  # a second Ctrl-C: stop now, no save
            print("geno-train: interrupted twice: exiting without saving", file=sys.stderr,
                  flush=True)
            os._exit(130)
        log.warning("received signal %d: saving a checkpoint after the next step, then exiting%s",
                    signum, " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else "")
        self.received = True

    def any_rank(self, save_due: bool = False) -> tuple[bool, bool]:
        """(whether any rank had received a signal, whether any rank's SaveClock said a save was
        due) by the previous call ((False, False) at the first)."""
        answer = self.close()
        flag = torch.tensor([1.0 if self.received else 0.0, 1.0 if save_due else 0.0])
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                            group=self.group, async_op=True)
        self.pending = (flag, work)
        return answer

    def close(self) -> tuple[bool, bool]:
        """Finishes the reduction in flight (before the groups go away); returns its answer."""
        if self.pending is None:
            return False, False
        flag, work = self.pending
        self.pending = None
        work.wait()
        received, due = flag.tolist()  # a CPU tensor: no device synchronisation
        return bool(received), bool(due)


class SaveClock:
    """checkpoint.save_interval_minutes: a save is due when that much wall time has passed since
    the last save (or the start). clock: seconds, monotonic (a fake one in tests)."""

    def __init__(self, minutes: float, clock=time.monotonic) -> None:
        self.seconds, self.clock = minutes * 60.0, clock
        self.last = clock()

    def due(self) -> bool:
        return self.seconds > 0 and self.clock() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = self.clock()


def with_padded_vocab(cfg: TrainConfig, vocab_size: int,
                      saved_run: Optional[SavedRun] = None) -> TrainConfig:
    """cfg with model.padded_vocab_size resolved once, before the model is built: the config's,
    else the checkpoint's (saved_run: a checkpoint keeps its vocabulary at any TP), else the
    tokenizer's rounded up to 128 x TP."""
    model = cfg.model
    if model.padded_vocab_size is None and saved_run is not None:
        model = dataclasses.replace(model, padded_vocab_size=saved_run.padded_vocab_size)
    padded = resolve_padded_vocab(model, vocab_size, cfg.parallel.tensor_parallel)
    return dataclasses.replace(cfg, model=dataclasses.replace(model, padded_vocab_size=padded))


def check_context_parallel_kernel(cfg: TrainConfig, runtime: Runtime,
                                  device: Optional[torch.device] = None) -> None:
    """On a GPU, context parallelism on the local attention runs only where torch's flash
    kernel takes its query chunks (dtype, head dim, GQA); a ConfigError naming why otherwise."""
    m, p = cfg.model, cfg.parallel
    if p.context_parallel == 1 or not runtime.cuda or runtime.te:
        return
    dtype = runtime.dtype
    heads, groups = (m.num_attention_heads // p.tensor_parallel,
                     m.num_query_groups // p.tensor_parallel)
    why = flash_refusal(heads, groups, m.head_dim(), dtype, device or runtime.torch_device())
    if why:
        raise ConfigError(f"parallel.context_parallel={p.context_parallel} on the local attention "
                          f"needs torch's flash attention for {heads} heads over {groups} "
                          f"key/value groups of dim {m.head_dim()} in {dtype}, and it refuses "
                          f"them here ({why}); use precision=bf16 or the TE spec "
                          f"(model.attention_backend=te)")


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became non-finite; the message says where and what to do."""


def train(cfg: TrainConfig) -> list[dict]:
    """Trains per cfg and returns the logged records (also written to RUN_DIR/metrics.jsonl)."""
    return TrainingRun(cfg).run()


class TrainingRun:
    """One geno-train run: set up (groups, model, optimizer, checkpoint, data), then steps, each
    followed by its log line, evaluation and checkpoint when due."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg, to_load = resume_target(cfg)
        # the stack, decided once, before any process group or module exists
        runtime = resolve(cfg, Machine.here(), int(os.environ.get("WORLD_SIZE", "1")))
        check_context_parallel_kernel(cfg, runtime)  # (any device of the kind answers)
        if not runtime.cuda:
            quiet.hide_stream_order_note()  # (a CUDA setting)
        distributed.initialize(cfg, cfg.schedule.seed)  # checks the layout first
        self.rank0 = distributed.rank() == 0
        self.lock = self._lock_checkpoint_dir(cfg)
        try:
            self._set_up(cfg, runtime, to_load)
        except BaseException:  # a refused or failed set-up leaves no lock file behind
            if self.lock is not None:
                self.lock.release()
            raise

    def _set_up(self, cfg: TrainConfig, runtime: Runtime, to_load: Optional[Path]) -> None:
        # the checkpoint to load, checked and read once (its checks share work across ranks)
        self.saved_run = (read_saved_run(to_load, cfg.checkpoint.verify_checksums)
                          if to_load is not None else None)
        self.run_dir = Path(cfg.logging.run_dir)
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        if self.lock is not None:  # rank 0, saving: is there room for a checkpoint?
            warning = space_warning(Path(cfg.checkpoint.save),
                                    checkpoint_bytes(cfg, tokenizer.vocab_size))
            if warning:
                log.warning("%s", warning)
        self.cfg = cfg = with_padded_vocab(cfg, tokenizer.vocab_size, self.saved_run)
        if self.saved_run is not None:
            # refused before the data, the model and the optimizer cost time and memory
            if "model_config" in self.saved_run.common:
                check_architecture(self.saved_run.common["model_config"], cfg.model,
                                   self.saved_run.path)
            check_data_position(self.saved_run, cfg)
        self.runtime = runtime = dataclasses.replace(
            runtime, padded_vocab_size=cfg.model.padded_vocab_size)
        self.device = runtime.torch_device()
        # the data first: its refusals (missing or damaged files, an empty or short corpus, a
        # soft-mask mismatch) come before the model is built
        self.train_ds, self.valid_ds, _ = build_datasets(cfg, tokenizer, self.run_dir)
        self.evaluator = training_eval(cfg)  # eval.corpora / eval.variants, read and checked now
        self.model = [wrap_ddp(chunk, cfg, runtime)
                      for chunk in build_model_chunks(cfg, tokenizer.vocab_size, runtime=runtime)]
        if self.rank0:  # fully resolved now (padded vocabulary included)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = cfg.to_yaml()
            (self.run_dir / "config.yaml").write_text(resolved)
            self.say(f"# resolved config\n{resolved}", quiet_log=False)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, runtime)
        self._connect_schedule_hooks()
        self.state = (load_checkpoint(cfg, self.model, self.optimizer, self.scheduler,
                                      self.saved_run, fused_adam=runtime.adam == "fused")
                      if self.saved_run is not None else TrainState())
        self.say(f"# {runtime.line()}")  # which spec, experts module, layout and precision ran
        d = cfg.data
        if self.evaluator is not None:
            self.evaluator.attach(self.model)
        dp = parallel_state.get_data_parallel_world_size()
        self.num_micro = d.global_batch_size // (d.micro_batch_size * dp)  # layout checked
        self.train_iter = self.micro_batches(self.train_ds, self.state.consumed_samples)
        self.forward_backward = get_forward_backward_func()
        self.flops_token = flops_per_token(cfg.model, cfg.model.padded_vocab_size, d.seq_length)
        self.peak = peak_flops()
        self.world = torch.distributed.get_world_size()
        self.expert_load = ExpertLoad(self.model)
        self.writer = (MetricsWriter(self.run_dir, cfg.logging.tensorboard, cfg.logging.wandb,
                                     cfg.logging.wandb_project, cfg.to_dict(),
                                     quiet=cfg.logging.quiet)
                       if self.rank0 else None)
        self.stop = StopSignal(cfg.checkpoint.save_on_signal)
        self.save_clock = SaveClock(cfg.checkpoint.save_interval_minutes)
        self.async_saves = None
        if cfg.checkpoint.async_save and cfg.checkpoint.save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_saves = AsyncCallsQueue()
        self.records: list[dict] = []
        self.saved: list[Path] = []
        # (steps, seconds, device loss totals) since the last record
        self.pending = (0, 0.0, torch.zeros(2, device=self.device))

    def _lock_checkpoint_dir(self, cfg: TrainConfig):
        """Rank 0 takes checkpoint.save's writer lock before anything is read or written; every
        rank stops alike (ConfigError) when another run holds it."""
        if not cfg.checkpoint.save:
            return None
        lock, why = None, [""]
        if self.rank0:
            try:
                lock = DirectoryLock(cfg.checkpoint.save)
            except DirectoryLocked as err:
                why = [str(err)]
            except OSError as err:
                why = [f"cannot write {cfg.checkpoint.save}: {err.strerror}"]
        torch.distributed.broadcast_object_list(why, src=0)
        if why[0]:
            raise ConfigError(f"checkpoint.save: {why[0]}")
        return lock

    def _connect_schedule_hooks(self) -> None:
        config = self.model[0].config
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = (self.model[0].no_sync if len(self.model) == 1
                               else [c.no_sync for c in self.model])

    def say(self, text: str, quiet_log: bool = True) -> None:
        """Prints on rank 0; with logging.quiet, logs instead (or drops it: quiet_log=False)."""
        if not self.rank0:
            return
        if self.cfg.logging.quiet:
            if quiet_log:
                log.info("%s", text.replace("\n", "; "))
        else:
            print(text, flush=True)

    def micro_batches(self, dataset, consumed: int):
        """This rank's micro-batches from `consumed` on: one iterator, or one per model chunk
        (the interleaved schedule runs every micro-batch through every chunk, in its own order)."""
        d = self.cfg.data
        # read ahead: the next global batch is ready (pinned on a GPU) while this one runs
        its = [Prefetcher(microbatches(dataset, consumed, d.micro_batch_size, d.global_batch_size),
                          depth=min(self.num_micro + 1, 8), pin=self.runtime.cuda)
               for _ in self.model]
        return its[0] if len(its) == 1 else its

    def _schedule(self, data_iterator, forward_only: bool = False):
        d = self.cfg.data
        return self.forward_backward(
            forward_step_func=forward_step, data_iterator=data_iterator, model=self.model,
            num_microbatches=self.num_micro, seq_length=d.seq_length,
            micro_batch_size=d.micro_batch_size, forward_only=forward_only)

    def step(self):
        """One optimizer step over a global batch; returns (outputs, grad norm, seconds)."""
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._schedule(self.train_iter)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.cfg.data.global_batch_size)
        self.state.iteration += 1
        self.state.consumed_samples += self.cfg.data.global_batch_size
        return outputs, grad_norm, time.perf_counter() - start

    def checked_step(self):
        """step(), with megatron-core's non-finite loss and gradient checks (its rerun state
        machine) turned into TrainingDiverged: one line naming the iteration and the last good
        checkpoint; nothing is saved from these weights."""
        try:
            return self.step()
        except RuntimeError as err:
            if "Unexpected result" not in str(err):
                raise
            what = str(err).split("message=")[-1].strip("'()") if "message=" in str(err) else ""
            raise TrainingDiverged(self.diverged(self.state.iteration + 1,
                                                 f"non-finite values ({what or err})")) from None

    def diverged(self, iteration: int, what: str) -> str:
        """The message of TrainingDiverged (every rank raises it at the same step: the loss and
        the gradient norm are reduced over all of them). A background save in flight holds
        weights from before and is finished and sealed first (or removed if it failed)."""
        try:
            self.finish_saves(blocking=True)
        except CheckpointError as err:  # save_failed removed its partial directory
            log.warning("%s", err)
        last = self.newest_complete()
        return (f"iteration {iteration}: {what}; nothing was saved from these "
                f"weights. The last good checkpoint is "
                + (f"{last}" if last else "none of this run's")
                + ": resume from it with a lower optimizer.lr, or optimizer.clip_grad > 0")

    def newest_complete(self) -> Optional[Path]:
        """The newest complete checkpoint in checkpoint.save (this run's or one it resumed)."""
        save = self.cfg.checkpoint.save
        found = complete_checkpoints(save) if save else []
        return found[0] if found else None

    def abandon_save(self) -> None:
        """On an error that not every rank may share (no collective can run): the background
        save in flight cannot be sealed, so rank 0 removes its unsealed directory; ``latest``
        still names a complete checkpoint, which is said."""
        if self.async_saves is None or not self.async_saves.get_num_unfinalized_calls():
            return
        if self.rank0:
            tmp = self.writing.with_name(self.writing.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.newest_complete()
            log.error("the background save of %s was not finished and is removed; the newest "
                      "complete checkpoint is %s", self.writing, last or "none")

    def validation_loss(self) -> float:
        iters = self.cfg.schedule.eval_iters
        for chunk in self.model:
            chunk.eval()
        it = self.micro_batches(self.valid_ds, 0)
        total = 0.0
        with torch.no_grad():
            for _ in range(iters):
                total += reduce_loss(loss_totals(self._schedule(it, forward_only=True),
                                                 self.device))
        for reader in it if isinstance(it, list) else [it]:
            reader.close()
        for chunk in self.model:
            chunk.train()
        return total / max(iters, 1)

    def record(self, grad_norm, evaluate: bool) -> dict:
        """The metrics of the steps since the last record (loss: their token mean, which leaves
        the device only here, two all-reduces and a sync; throughput over their time; grad norm
        and lr of the last), with the validation loss and eval.* when evaluating."""
        d = self.cfg.data
        steps, seconds, totals = self.pending
        self.pending = (0, 0.0, torch.zeros(2, device=self.device))
        tokens_per_s = steps * d.global_batch_size * d.seq_length / seconds
        per_gpu = tokens_per_s * self.flops_token / self.world
        loss = reduce_loss(totals)
        if not math.isfinite(loss):
            raise TrainingDiverged(self.diverged(self.state.iteration, f"the loss is {loss}"))
        record = {
            "step": self.state.iteration, "loss": loss,
            "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens_per_s, "flops_per_token": self.flops_token,
            "tflops_per_gpu": per_gpu / 1e12,
            "mfu": per_gpu / self.peak if self.peak else None,
            "consumed_samples": self.state.consumed_samples,
            "expert_load": self.expert_load.fractions(),
            # GPU only: the allocator's peak since start, to check the memory plan against
            "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                if self.runtime.cuda else None),
        }
        if evaluate:
            record["val_loss"] = self.validation_loss()
            if self.evaluator is not None:
                record.update(self.evaluator.run())
        return record

    def save(self) -> None:
        if not self.cfg.checkpoint.save:
            return
        steps, _, totals = self.pending  # never a checkpoint of weights that gave a non-finite loss
        if steps and not math.isfinite(loss := reduce_loss(totals)):
            raise TrainingDiverged(self.diverged(self.state.iteration, f"the loss is {loss}"))
        self.finish_saves(blocking=True)  # one save in flight at a time
        self.save_clock.saved()
        path = save_checkpoint(self.cfg, self.model, self.optimizer, self.scheduler,
                               self.state, self.async_saves, self.runtime)
        if self.async_saves is None:
            self.saved.append(path)
            self.say(f"# saved checkpoint {path}", quiet_log=False)
        else:
            self.writing = path
            self.say(f"# writing checkpoint {path} in the background", quiet_log=False)

    def finish_saves(self, blocking: bool) -> None:
        """Seals and publishes a background save whose writers are done on every rank (all
        ranks call this at the same steps: it agrees over them); with blocking, waits for it."""
        if self.async_saves is None or not self.async_saves.get_num_unfinalized_calls():
            return
        try:
            self.async_saves.maybe_finalize_async_calls(blocking=blocking)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # CheckpointException, raised on every rank alike
            raise save_failed(err, self.writing) from None
        if not self.async_saves.get_num_unfinalized_calls():
            self.saved.append(self.writing)
            self.say(f"# saved checkpoint {self.writing}", quiet_log=False)

    def run(self) -> list[dict]:
        """Trains to the end (or a stop); checkpoint.save's lock is released however it ends."""
        try:
            return self._run()
        except TrainingDiverged:
            raise  # its message was made after settling the save in flight
        except BaseException:
            self.abandon_save()
            raise
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> list[dict]:
        s, interval = self.cfg.schedule, self.cfg.checkpoint.save_interval
        first_iteration, started = self.state.iteration, time.perf_counter()
        while self.state.iteration < s.train_iters:
            outputs, grad_norm, elapsed = self.checked_step()
            if grad_norm is not None and not math.isfinite(grad_norm):  # read by megatron-core
                raise TrainingDiverged(self.diverged(self.state.iteration,
                                                     f"the gradient norm is {grad_norm}"))
            steps, seconds, totals = self.pending
            self.pending = (steps + 1, seconds + elapsed, totals + loss_totals(outputs, self.device))
            it = self.state.iteration
            signalled, time_due = self.stop.any_rank(self.save_clock.due())
            stopping = signalled or bool(s.stop_after and it >= s.stop_after)
            # the last step of a run is always recorded, however it ends
            log_due = (it % self.cfg.logging.log_interval == 0 or it == s.train_iters
                       or stopping)
            eval_due = bool(s.eval_interval) and it % s.eval_interval == 0
            if log_due or eval_due:
                self.finish_saves(blocking=False)  # at a record: the loss read syncs anyway
                record = self.record(grad_norm, eval_due)
                self.records.append(record)
                if self.writer:
                    self.writer.write(record)
                    if not self.cfg.logging.quiet:
                        print(format_record(record), flush=True)
            if stopping:
                self.save()
                break
            if it < s.train_iters and ((interval and it % interval == 0) or time_due):
                self.save()
        else:
            self.save()
        self.finish_saves(blocking=True)
        if self.async_saves is not None:
            self.async_saves.close()
        self.stop.close()
        if self.writer:
            self.writer.close()
        self.say(run_summary(self.cfg, self.records, self.state.iteration - first_iteration,
                             time.perf_counter() - started, self.saved[-1] if self.saved else None))
        return self.records


def run_summary(cfg: TrainConfig, records: list[dict], steps: int, wall: float,
                checkpoint: Optional[Path]) -> str:
    """What a finished run printed last: steps, tokens, time, losses, and where everything is."""
    d, run_dir = cfg.data, Path(cfg.logging.run_dir)
    last = records[-1] if records else {}
    val = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    lines = [
        f"# done: {steps} steps (to iteration {last.get('step', '-')}), "
        f"{steps * d.global_batch_size * d.seq_length:,d} tokens in {wall:.1f} s",
        f"#   final loss {last['loss']:.4f}" if "loss" in last else "#   no step logged",
    ]
    if val is not None:
        lines[-1] += f", validation loss {val:.4f}"
    lines.append(f"#   metrics {run_dir / 'metrics.jsonl'}"
                 + (f", TensorBoard {run_dir / 'tensorboard'}" if cfg.logging.tensorboard else "")
                 + (f", W&B ({cfg.logging.wandb}) {run_dir / 'wandb'}"
                    if cfg.logging.wandb != "off" else ""))
    lines.append(f"#   checkpoint {checkpoint}" if checkpoint else
                 "#   no checkpoint (set checkpoint.save=DIR to keep one)")
    return "\n".join(lines)
