"""Which stack a run uses, decided once: the `Runtime`.

Every "auto" of the config (attention spec, experts module, fusions, token dispatcher, Adam
kernel, precision) and everything the machine decides (CUDA or CPU, Transformer Engine or not)
is resolved here, from the config and a `Machine`, into one frozen value before anything is
built. The model, the training loop, checkpointing and evaluation read it; none of them asks
"is TE installed?" or "is there a GPU?" again. Its `line()` is the start-up line; its `to_dict()`
is saved in every checkpoint (``runtime`` in common.pt). geno-launch resolves it for the target
GPU nodes (`Machine.gpu_node`), not for the login node it runs on.

This module imports neither torch nor megatron-core at import time (geno-launch and the
argument checks stay fast); `Machine.here()` probes the machine.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from typing import Optional

from megatron_geno.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Machine:
    """What the machine offers that a choice depends on."""

    cuda: bool  # a CUDA device is present
    compute_capability: int = 0  # its major version (9: Hopper), 0 without CUDA
    transformer_engine: bool = False  # transformer_engine imports
    vendor_adam: bool = False  # megatron-core builds TE's or apex's FusedAdam (no unfused mode)
    cxx: bool = False  # a C++ compiler (torch.compile's CPU backend)
    grouped_mm: bool = False  # torch._grouped_mm exists

    @classmethod
    def here(cls) -> "Machine":
        """This process's machine (imports torch; megatron-core's optimizer module only to read
        which Adam it builds, as it decides at its own import)."""
        import torch

        cuda = torch.cuda.is_available()
        try:  # as megatron-core's gpt_layer_specs decides
            import transformer_engine  # noqa: F401

            te = True
        except ImportError:
            te = False
        from megatron.core import optimizer as mcore_optimizer

        return cls(cuda=cuda,
                   compute_capability=torch.cuda.get_device_capability()[0] if cuda else 0,
                   transformer_engine=te,
                   vendor_adam=not mcore_optimizer.USING_PYTORCH_OPTIMIZER,
                   cxx=bool(shutil.which("c++") or shutil.which("g++")),
                   grouped_mm=hasattr(torch, "_grouped_mm"))

    @classmethod
    def gpu_node(cls, transformer_engine: bool = True) -> "Machine":
        """A GPU node of the cluster a recipe targets (H100/H200 class, the docker image: TE and
        its FusedAdam when transformer_engine)."""
        return cls(cuda=True, compute_capability=9, transformer_engine=transformer_engine,
                   vendor_adam=transformer_engine, cxx=True, grouped_mm=True)


@dataclass(frozen=True)
class Runtime:
    """The resolved stack of one run (see the module docstring)."""

    device: str  # "cuda" or "cpu"
    spec: str  # "transformer-engine" or "local+sdpa"
    experts: str  # "te-grouped", "grouped" (GroupedExperts) or "sequential" (SequentialMLP)
    fusions: bool  # compiled RMSNorm / SwiGLU / RoPE / bf16 cross-entropy
    dispatcher: str  # megatron-core's token dispatcher: "alltoall" or "allgather"
    adam: str  # "torch-default", "fused" (torch's fused AdamW) or "fused(te/apex)"
    precision: str  # "fp32" or "bf16"
    recompute: str  # "none", "selective(MODULES)" or "full"
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline: int
    context_parallel: int
    expert_parallel: int
    expert_tensor_parallel: int
    sequence_parallel: bool
    data_parallel: Optional[int] = None  # world size / (TP x PP x CP), when the world is known
    padded_vocab_size: Optional[int] = None

    @property
    def te(self) -> bool:
        """Transformer Engine's spec (its fused attention, grouped GEMM and norms)."""
        return self.spec == "transformer-engine"

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def dtype(self):
        """The training dtype as a torch.dtype."""
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def line(self) -> str:
        """The start-up line: which spec, parallel sizes, modules and precision run."""
        vpp = f" VPP={self.virtual_pipeline}" if self.virtual_pipeline > 1 else ""
        return (f"spec={self.spec} TP={self.tensor_parallel} PP={self.pipeline_parallel}{vpp} "
                f"CP={self.context_parallel} EP={self.expert_parallel} "
                f"DP={self.data_parallel} SP={self.sequence_parallel} experts={self.experts} "
                f"fusions={'on' if self.fusions else 'off'} adam={self.adam} "
                f"dispatcher={self.dispatcher} recompute={self.recompute} "
                f"dtype=torch.{'bfloat16' if self.precision == 'bf16' else 'float32'}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def torch_device(self):
        """The torch.device this process computes on (its current CUDA device, or the CPU)."""
        import torch

        return (torch.device("cuda", torch.cuda.current_device()) if self.cuda
                else torch.device("cpu"))


def resolve(cfg: TrainConfig, machine: Machine, world_size: Optional[int] = None) -> Runtime:
    """The Runtime of cfg on machine; ConfigError for a choice the machine cannot run or
    settings that cannot run together on the resolved stack."""
    m, p, o = cfg.model, cfg.parallel, cfg.optimizer
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if machine.cuda else "fp32")

    if m.attention_backend == "te" and not machine.transformer_engine:
        raise ConfigError("model.attention_backend=te but transformer_engine does not import")
    te = m.attention_backend != "sdpa" and machine.transformer_engine and machine.cuda

    if m.moe_grouped_gemm == "off":
        experts = "sequential"
    elif te:
        experts = "te-grouped"
    else:
        ffn_local = m.moe_ffn_hidden_size // p.expert_tp()
        aligned = m.hidden_size % 8 == 0 and ffn_local % 8 == 0  # 16-byte rows in bf16
        runs = machine.grouped_mm and (
            (precision == "bf16" and machine.compute_capability >= 9) if machine.cuda else True)
        if runs and aligned:
            experts = "grouped"
        elif m.moe_grouped_gemm == "on":
            raise ConfigError(
                f"model.moe_grouped_gemm=on, but torch._grouped_mm cannot run here: {precision} "
                f"on {'CUDA sm' + str(machine.compute_capability) + '0' if machine.cuda else 'CPU'}"
                f" (CUDA needs bf16 on sm90+), hidden {m.hidden_size} and expert FFN per "
                f"expert-TP rank {ffn_local} (both multiples of 8); use auto or off")
        else:
            experts = "sequential"

    if m.fusions == "on" and not machine.cuda and not machine.cxx:
        raise ConfigError("model.fusions=on on CPU needs a C++ compiler (torch.compile's CPU "
                          "backend); install g++ or use model.fusions=auto")
    fusions = m.fusions == "on" or (m.fusions == "auto" and machine.cuda)

    if machine.vendor_adam:
        if o.fused == "off":
            raise ConfigError("optimizer.fused=off: megatron-core runs Transformer Engine's (or "
                              "apex's) FusedAdam whenever one is installed, and it has no unfused "
                              "mode; set optimizer.fused=auto, or run where neither is installed")
        adam = "fused(te/apex)"
    else:
        adam = "fused" if o.fused == "on" or (o.fused == "auto" and machine.cuda) else \
            "torch-default"

    if m.recompute == "selective":
        if "layernorm" in m.recompute_modules and not te:
            raise ConfigError("model.recompute_modules: layernorm recompute needs Transformer "
                              "Engine (megatron-core's output-discarding checkpoint); use "
                              "core_attn and moe, or model.recompute=full")
        recompute = f"selective({','.join(m.recompute_modules)})"
    else:
        recompute = m.recompute
    if cfg.data.reset_attention_mask and te:
        raise ConfigError("data.reset_attention_mask needs model.attention_backend=sdpa (the "
                          "TE spec's fused attention takes no per-document mask)")

    model_ranks = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    return Runtime(
        device="cuda" if machine.cuda else "cpu",
        spec="transformer-engine" if te else "local+sdpa",
        experts=experts,
        fusions=fusions,
        dispatcher="alltoall" if m.moe_token_dispatcher == "auto" else m.moe_token_dispatcher,
        adam=adam,
        precision=precision,
        recompute=recompute,
        tensor_parallel=p.tensor_parallel,
        pipeline_parallel=p.pipeline_parallel,
        virtual_pipeline=p.virtual_pipeline,
        context_parallel=p.context_parallel,
        expert_parallel=p.expert_parallel,
        expert_tensor_parallel=p.expert_tp(),
        sequence_parallel=p.tensor_parallel > 1 and p.sequence_parallel,
        data_parallel=world_size // model_ranks if world_size else None,
        padded_vocab_size=m.padded_vocab_size,
    )


def for_config(cfg: TrainConfig) -> Runtime:
    """cfg's Runtime on this machine, for a library caller that builds a model outside a run (a
    benchmark, a test, a conversion's verify). geno-train and geno-eval resolve theirs once at
    set-up and pass it down."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    return resolve(cfg, Machine.here(), world)
