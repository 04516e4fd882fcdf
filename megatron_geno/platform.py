"""Run megatron-core 0.16.1 on CPU over gloo: every CPU accommodation lives in this module.

megatron-core assumes CUDA in a handful of places (docs/cpu.md lists them): literal
``device="cuda"``, ``torch.cuda.current_device()`` as a device, ``Tensor.cuda()``, CUDA streams and
events, the CUDA RNG tracker, and a ``.type() == 'torch.cuda.FloatTensor'`` check in the distributed
optimizer. ``activate()`` maps each of these to its CPU equivalent, and only when CUDA is absent:
production GPU runs never enter this module's patches.

Separately, ``patch_missing_transformer_engine()`` mends two places where megatron-core 0.16.1
breaks without Transformer Engine / apex (CPU and GPU alike): an undefined symbol in MoE routing
and the torch-Adam ``step`` state in the reshardable optimizer checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ACTIVE_MODE: TorchFunctionMode | None = None
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron-core passes torch.cuda.current_device() (an int) as a device
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Torch function mode that places every tensor meant for CUDA on the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # distrib_optimizer accepts only 'torch.cuda.*Tensor' parameters
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def patch_missing_transformer_engine() -> None:
    """Mends megatron-core 0.16.1 where it breaks without Transformer Engine / apex. Idempotent.

    1. ``moe_utils.te_general_gemm`` is imported only inside a try block and then tested with
       ``is not None``: NameError without TE. Define it as None.
    2. With torch's Adam, each parameter's optimizer state holds a ``step`` tensor, which the
       ``fully_reshardable`` checkpoint does not carry per parameter (it restores it from the
       param groups); ``_set_main_param_and_optimizer_states`` then fails with KeyError 'step'.
       Hide ``step`` while the loaded tensors are copied in.
    """
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_geno_patched", False):
        return

    def set_states_keeping_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    set_states_keeping_step._geno_patched = True
    cls._set_main_param_and_optimizer_states = set_states_keeping_step


def _recompute_on_cpu_too() -> None:
    """Runs activation recomputation (megatron-core's CheckpointFunction.backward) under the
    CPU mode: the autograd engine does not carry Python torch-function modes into backward, so
    the recomputed forward would otherwise place tensors on a CUDA device that does not exist."""
    from megatron.core.tensor_parallel.random import CheckpointFunction

    original = CheckpointFunction.backward
    if getattr(original, "_geno_patched", False):
        return

    def backward(ctx, *grads):
        if any(isinstance(m, CudaToCpuMode)
               for m in torch.overrides._get_current_function_mode_stack()):
            return original(ctx, *grads)
        with CudaToCpuMode():
            return original(ctx, *grads)

    backward._geno_patched = True
    CheckpointFunction.backward = staticmethod(backward)


def activate() -> bool:
    """Make megatron-core run on CPU; returns True when the CPU layer is (now) active.

    Does nothing and returns False when CUDA is available. Idempotent.
    """
    global _ACTIVE_MODE
    if torch.cuda.is_available():
        return False
    if _ACTIVE_MODE is not None:
        return True

    import megatron.core.tensor_parallel.random as mcore_random

    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = torch.cpu.Stream
    cuda.Event = torch.cpu.Event
    cuda.stream = torch.cpu.stream
    cuda.current_stream = torch.cpu.current_stream
    cuda.default_stream = torch.cpu.current_stream
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed seeds the CPU generator itself
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_allocated = lambda device=None: 0
    mcore_random._get_cuda_rng_state = _cpu_rng_get
    mcore_random._set_cuda_rng_state = _cpu_rng_set

    patch_missing_transformer_engine()
    _recompute_on_cpu_too()
    _ACTIVE_MODE = CudaToCpuMode()
    _ACTIVE_MODE.__enter__()
    log.warning("CUDA is absent: megatron-core runs on CPU through megatron_geno.platform (gloo)")
    return True


def is_active() -> bool:
    """True when the CPU layer has been activated in this process."""
    return _ACTIVE_MODE is not None


def backend() -> str:
    """The torch.distributed backend for this machine: nccl with CUDA, gloo without."""
    return "nccl" if torch.cuda.is_available() else "gloo"
