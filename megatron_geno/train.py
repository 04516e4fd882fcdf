"""The training loop: megatron-core DDP, distributed optimizer and pipeline schedules, nothing more."""

from __future__ import annotations

import dataclasses
import logging
import signal
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

from megatron_geno import compat, distributed
from megatron_geno.checkpointing import (
    TrainState,
    checkpoint_vocab,
    resume_target,
    load_checkpoint,
    save_checkpoint,
)
from megatron_geno.config import ConfigError, TrainConfig, warmup_steps
from megatron_geno.data import build_datasets, microbatches
from megatron_geno.evaluation.during_training import training_eval
from megatron_geno.metrics import ExpertLoad, MetricsWriter, format_record, peak_flops
from megatron_geno.model import (build_model_chunks, describe, resolve_precision,
                                 use_transformer_engine, wrap_ddp)
from megatron_geno.presets import flops_per_token, resolve_padded_vocab
from megatron_geno.tokenizer import build_tokenizer

log = logging.getLogger("megatron_geno")


def build_optimizer(cfg: TrainConfig, model):
    """Returns (optimizer, scheduler): megatron-core AdamW and its warmup + decay schedule."""
    o, s, d = cfg.optimizer, cfg.schedule, cfg.data
    bf16 = resolve_precision(cfg.precision) == torch.bfloat16
    optimizer = get_megatron_optimizer(
        McoreOptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        model,
    )
    compat.set_adam_kernel(optimizer, compat.fused_adam_wanted(o.fused))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=warmup_steps(s) * d.global_batch_size,
        lr_decay_steps=max(s.train_iters, 1) * d.global_batch_size, lr_decay_style=s.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(s.train_iters, 1) * d.global_batch_size, wd_incr_style="constant",
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
    batch = next(data_iterator)
    mask = batch.get("attention_mask")  # only with data.reset_attention_mask
    output = model(batch["tokens"].to(_device()), batch["position_ids"].to(_device()),
                   None if mask is None else mask.to(_device()), labels=batch["labels"].to(_device()))
    return output, partial(loss_func, batch["loss_mask"].to(_device()))


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def reduce_loss(outputs: list[dict]) -> float:
    """Returns the token-mean loss of a global batch, known on every rank."""
    totals = torch.zeros(2, device=_device())
    if parallel_state.is_pipeline_last_stage():
        for out in outputs:
            totals += out["lm loss"].to(totals.device)
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return float(totals[0] / totals[1].clamp(min=1))


class StopSignal:
    """Records SIGTERM / SIGUSR1 so the loop saves and exits at the next step boundary."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        log.warning("received signal %d: saving a checkpoint after this step, then exiting", signum)
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def with_padded_vocab(cfg: TrainConfig, vocab_size: int) -> TrainConfig:
    """cfg with model.padded_vocab_size resolved once, before the model is built: the config's,
    else the checkpoint's, else the tokenizer's rounded up to 128 x TP."""
    model = cfg.model
    if model.padded_vocab_size is None:
        model = dataclasses.replace(model, padded_vocab_size=checkpoint_vocab(cfg))
    padded = resolve_padded_vocab(model, vocab_size, cfg.parallel.tensor_parallel)
    return dataclasses.replace(cfg, model=dataclasses.replace(model, padded_vocab_size=padded))


def train(cfg: TrainConfig) -> list[dict]:
    """Trains per cfg and returns the logged records (also written to RUN_DIR/metrics.jsonl)."""
    cfg = resume_target(cfg)
    distributed.initialize(cfg, cfg.schedule.seed)  # checks the layout first
    rank0 = distributed.rank() == 0
    run_dir = Path(cfg.logging.run_dir)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    cfg = with_padded_vocab(cfg, tokenizer.vocab_size)
    model = [wrap_ddp(chunk, cfg) for chunk in build_model_chunks(cfg, tokenizer.vocab_size)]
    if rank0:  # fully resolved now (padded vocabulary included)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        if not cfg.logging.quiet:
            print(f"# resolved config\n{cfg.to_yaml()}", flush=True)
    optimizer, scheduler = build_optimizer(cfg, model)
    config = model[0].config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model[0].no_sync if len(model) == 1 else [c.no_sync for c in model]
    state = TrainState()
    if cfg.checkpoint.load:
        state = load_checkpoint(cfg, model, optimizer, scheduler)
    if rank0:  # the start-up line: which spec, experts module, layout and precision ran
        if cfg.logging.quiet:
            log.info("%s", describe(cfg))
        else:
            print(f"# {describe(cfg)}", flush=True)

    d, s = cfg.data, cfg.schedule
    if d.reset_attention_mask and use_transformer_engine(cfg.model):
        raise ConfigError("data.reset_attention_mask needs model.attention_backend=sdpa (the TE "
                          "spec's fused attention takes no per-document mask)")
    train_ds, valid_ds, _ = build_datasets(cfg, tokenizer, run_dir)
    evaluator = training_eval(cfg, model)  # eval.corpora / eval.variants, read once, now
    dp = parallel_state.get_data_parallel_world_size()
    num_micro = d.global_batch_size // (d.micro_batch_size * dp)  # divisible: layout checked

    def iterators(dataset, consumed: int):
        """This rank's micro-batches from `consumed` on: one iterator, or one per model chunk
        (the interleaved schedule runs every micro-batch through every chunk, in its own order)."""
        its = [microbatches(dataset, consumed, d.micro_batch_size, d.global_batch_size)
               for _ in model]
        return its[0] if len(its) == 1 else its

    train_iter = iterators(train_ds, state.consumed_samples)
    forward_backward = get_forward_backward_func()
    flops_token = flops_per_token(cfg.model, cfg.model.padded_vocab_size, d.seq_length)
    peak = peak_flops()
    expert_load = ExpertLoad(model)
    writer = (MetricsWriter(run_dir, cfg.logging.tensorboard, cfg.logging.wandb,
                            cfg.logging.wandb_project, cfg.to_dict()) if rank0 else None)
    stop = StopSignal(cfg.checkpoint.save_on_signal)
    records: list[dict] = []
    world = torch.distributed.get_world_size()

    def run_eval() -> float:
        for chunk in model:
            chunk.eval()
        it = iterators(valid_ds, 0)
        total = 0.0
        with torch.no_grad():
            for _ in range(s.eval_iters):
                out = forward_backward(forward_step_func=forward_step, data_iterator=it, model=model,
                                       num_microbatches=num_micro, seq_length=d.seq_length,
                                       micro_batch_size=d.micro_batch_size, forward_only=True)
                total += reduce_loss(out)
        for chunk in model:
            chunk.train()
        return total / max(s.eval_iters, 1)

    saved: list[Path] = []

    def save() -> None:
        if cfg.checkpoint.save:
            path = save_checkpoint(cfg, model, optimizer, scheduler, state)
            saved.append(path)
            if rank0 and not cfg.logging.quiet:
                print(f"# saved checkpoint {path}", flush=True)

    first_iteration, started = state.iteration, time.perf_counter()
    while state.iteration < s.train_iters:
        start = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = forward_backward(forward_step_func=forward_step, data_iterator=train_iter,
                                   model=model, num_microbatches=num_micro,
                                   seq_length=d.seq_length, micro_batch_size=d.micro_batch_size)
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=d.global_batch_size)
        state.iteration += 1
        state.consumed_samples += d.global_batch_size
        elapsed = time.perf_counter() - start
        log_due = state.iteration % cfg.logging.log_interval == 0 or state.iteration == s.train_iters
        eval_due = bool(s.eval_interval) and state.iteration % s.eval_interval == 0
        if log_due or eval_due:  # the loss leaves the device only here (two all-reduces, a sync)
            loss = reduce_loss(outputs)
            tokens_per_s = d.global_batch_size * d.seq_length / elapsed
            record = {
                "step": state.iteration, "loss": loss, "lr": scheduler.get_lr(optimizer.param_groups[0]),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens_per_s, "flops_per_token": flops_token,
                "tflops_per_gpu": tokens_per_s * flops_token / world / 1e12,
                "mfu": tokens_per_s * flops_token / world / peak if peak else None,
                "consumed_samples": state.consumed_samples,
                "expert_load": expert_load.fractions(),
                # GPU only: the allocator's peak since start, to check the memory plan against
                "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                    if torch.cuda.is_available() else None),
            }
            if eval_due:
                record["val_loss"] = run_eval()
                if evaluator is not None:
                    record.update(evaluator.run())
            records.append(record)
            if writer:
                writer.write(record)
                if not cfg.logging.quiet:
                    print(format_record(record), flush=True)
        interval = cfg.checkpoint.save_interval
        if stop.any_rank() or (s.stop_after and state.iteration >= s.stop_after):
            save()
            break
        if interval and state.iteration % interval == 0 and state.iteration < s.train_iters:
            save()
    else:
        save()
    if writer:
        writer.close()
    if rank0:
        summary = run_summary(cfg, records, state.iteration - first_iteration,
                              time.perf_counter() - started, saved[-1] if saved else None)
        if cfg.logging.quiet:
            log.info("%s", summary.replace("\n", "; "))
        else:
            print(summary, flush=True)
    return records


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
