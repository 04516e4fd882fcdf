"""Training metrics: throughput, FLOPs and MFU, per-layer expert load, and where they are written."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from megatron_geno.arithmetic import PEAK_BF16_FLOPS
from megatron_geno.config import ConfigError

log = logging.getLogger(__name__)


def peak_flops() -> Optional[float]:
    """Returns the bf16 peak of this GPU, or None on CPU / an unknown GPU (then MFU is not shown)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class ExpertLoad:
    """Counts the tokens each expert of each MoE layer received, through router forward hooks."""

    def __init__(self, model_chunks) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts: dict[int, torch.Tensor] = {}
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._hook)

    def _hook(self, module, _inputs, output) -> None:
        counts = output[1].detach().sum(dim=0).float()  # output = (probs, routing_map)
        layer = module.layer_number
        self.counts[layer] = self.counts.get(layer, 0) + counts

    def fractions(self) -> dict[str, list[float]]:
        """Returns {layer: fraction of routed tokens per expert} and resets: the tokens of every
        rank of this pipeline stage (TP with sequence parallelism x DP x CP each route their
        own). A collective: every rank of the stage calls it."""
        from megatron.core import parallel_state

        if not self.counts:
            return {}
        layers = sorted(self.counts)
        counts = torch.stack([self.counts[layer] for layer in layers])
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        torch.distributed.all_reduce(counts, group=group)
        shares = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).tolist()
        self.counts = {}
        return {str(layer): [round(x, 4) for x in row] for layer, row in zip(layers, shares)}


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl, and scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb_mode: str = "off",
                 wandb_project: str = "megatron-geno", config: Optional[dict] = None,
                 quiet: bool = False) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        self._wandb = None
        if wandb_mode != "off":
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"logging.wandb={wandb_mode} needs the wandb package "
                                  f"(pip install wandb)") from None
            # logging.quiet: no banner or sync lines from wandb either
            settings = wandb.Settings(silent=True) if quiet else None
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), mode=wandb_mode,
                                     config=config, name=run_dir.name, settings=settings)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            scalars = {k: v for k, v in record.items()
                       if isinstance(v, (int, float)) and k != "step"}
            for layer, fractions in record.get("expert_load", {}).items():
                scalars.update({f"expert_load/layer{layer}/expert{e}": f
                                for e, f in enumerate(fractions)})
            self._wandb.log(scalars, step=record["step"], commit=True)
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)
            for layer, fractions in record.get("expert_load", {}).items():
                for expert, frac in enumerate(fractions):
                    self._tb.add_scalar(f"expert_load/layer{layer}/expert{expert}", frac, step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def format_record(record: dict) -> str:
    """Returns the console line for a metrics record."""
    parts = [f"step {record['step']:>6}"]
    for key, fmt in (("loss", ".5f"), ("val_loss", ".5f"), ("eval/loss", ".5f"),
                     ("eval/variants_auroc", ".4f"), ("lr", ".3e"), ("grad_norm", ".3f"),
                     ("tokens_per_s", ".0f"), ("tflops_per_gpu", ".1f"), ("mfu", ".1%")):
        if record.get(key) is not None:
            parts.append(f"{key} {format(record[key], fmt)}")
    return " | ".join(parts)
