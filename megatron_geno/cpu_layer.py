"""Run megatron-core 0.16.1 on CPU over gloo: every CPU accommodation lives in this module.

megatron-core assumes CUDA in a handful of places (docs/cpu.md lists them): literal
``device="cuda"``, ``torch.cuda.current_device()`` as a device, ``Tensor.cuda()``, CUDA streams and
events, the CUDA RNG tracker, and a ``.type() == 'torch.cuda.FloatTensor'`` check in the distributed
optimizer. ``activate()`` maps each of these to its CPU equivalent, and only when CUDA is absent:
production GPU runs never enter this module's patches.

What megatron-core 0.16.1 needs without Transformer Engine / apex on CPU and GPU alike lives in
``megatron_geno/without_te.py``; ``activate()`` applies it too. Every patched target is checked at
activation (``check_patched_targets``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_geno import without_te

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


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                  inputs=None):
    """torch.autograd.backward without its torch-function dispatch: the autograd engine, called
    as megatron-core's schedule calls it."""
    from torch.autograd import Variable, _make_grads, _tensor_or_tensors_to_tuple

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)),
                        is_grads_batched=False)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs or ())
    Variable._execution_engine.run_backward(
        tensors, grads, create_graph if retain_graph is None else retain_graph, create_graph,
        inputs, allow_unreachable=True, accumulate_grad=True)


def _run_tensor_backward(tensor, gradient=None, retain_graph=None, create_graph=False,
                         inputs=None):
    """Tensor.backward, as _run_backward."""
    _run_backward(tensor, gradient, retain_graph, create_graph, inputs)


class CudaToCpuMode(TorchFunctionMode):
    """Torch function mode that places every tensor meant for CUDA on the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            # a Python-level backward (megatron-core's recomputation calls one) would otherwise
            # run entirely inside this handler, where the mode is off, and the collectives of
            # its backward (sequence- and context-parallel reduce-scatters) would ask for CUDA:
            # run the autograd engine itself with the mode on
            run = _run_backward if func is torch.autograd.backward else _run_tensor_backward
            with CudaToCpuMode():
                return run(*args, **kwargs)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # distrib_optimizer accepts only 'torch.cuda.*Tensor' parameters
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # pinned host memory needs an accelerator (RoPE's CP slice)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def in_backward():
    """A context for megatron-core code that runs inside autograd's backward (recomputation,
    gathers of the CP attention): the CPU mode when this layer is active, else nothing. The
    autograd engine does not carry Python torch-function modes into backward."""
    if _ACTIVE_MODE is None or any(isinstance(m, CudaToCpuMode)
                                   for m in torch.overrides._get_current_function_mode_stack()):
        return contextlib.nullcontext()
    return CudaToCpuMode()


def _recompute_on_cpu_too() -> None:
    """Runs activation recomputation (megatron-core's CheckpointFunction.backward) under the
    CPU mode: the autograd engine does not carry Python torch-function modes into backward, so
    the recomputed forward would otherwise place tensors on a CUDA device that does not exist."""
    from megatron.core.tensor_parallel.random import CheckpointFunction

    original = CheckpointFunction.backward
    if getattr(original, "_geno_patched", False):
        return

    def backward(ctx, *grads):
        with in_backward():
            return original(ctx, *grads)

    backward._geno_patched = True
    CheckpointFunction.backward = staticmethod(backward)


def _alltoall_splits_on_cpu() -> None:
    """megatron-core's alltoall token dispatcher copies its split sizes to the host on a side CUDA
    stream (as numpy arrays) and waits on that stream's event before the all-to-all. On CPU they
    are host tensors already: the same conversion, with no stream and no event."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as cls

    if getattr(cls._maybe_dtoh_and_synchronize, "_geno_patched", False):
        return

    def splits_on_host(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    splits_on_host._geno_patched = True
    cls._maybe_dtoh_and_synchronize = splits_on_host


def _uneven_gather_on_gloo() -> None:
    """gloo's all_gather takes only equal pieces; megatron-core's all-gather-v (the alltoall
    dispatcher's gather over the TP group when experts are tensor-parallel) passes a list of
    unequal ones. On CPU the pieces are padded to the longest, gathered and cut back."""
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim
    if getattr(original, "_geno_patched", False):
        return

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) == 1 or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:size] for piece, size in zip(pieces, output_split_sizes)])

    gather._geno_patched = True
    mappings._gather_along_first_dim = gather


# Every megatron-core / torch name this layer replaces or wraps: checked at activation, so a moved
# name is a clear error instead of a patch that silently does nothing.
PATCHED_TARGETS = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "CheckpointFunction.backward"),
    ("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim"),
    ("megatron.core.transformer.moe.token_dispatcher",
     "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize"),
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer._set_main_param_and_optimizer_states"),
    ("megatron.core.transformer.moe.moe_utils", "topk_routing_with_score_function"),
    ("torch.cpu", "Stream"),
    ("torch.cpu", "Event"),
    ("torch.cpu", "current_stream"),
    ("torch.autograd", "_make_grads"),
    ("torch.autograd", "_tensor_or_tensors_to_tuple"),
)


def check_patched_targets() -> None:
    """Raises RuntimeError naming the first patched target the installed versions lack."""
    import importlib

    for module, name in PATCHED_TARGETS:
        owner = importlib.import_module(module)
        for part in name.split("."):
            owner = getattr(owner, part, None)
        if owner is None:
            raise RuntimeError(f"megatron_geno.cpu_layer: {module}.{name} is missing from the "
                               f"installed packages (megatron-core 0.16.1 expected); the CPU "
                               f"layer cannot mend it")


def ddp_bucket_size():
    """megatron-core DDP's bucket_size: its default with CUDA; one bucket for the whole gradient
    on CPU (gloo), the setting every CPU parity test was established with."""
    return None if torch.cuda.is_available() else 2**62


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

    check_patched_targets()
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

    without_te.patch_missing_transformer_engine()
    _recompute_on_cpu_too()
    _alltoall_splits_on_cpu()
    _uneven_gather_on_gloo()
    _ACTIVE_MODE = CudaToCpuMode()
    _ACTIVE_MODE.__enter__()
    log.info("CUDA is absent: megatron-core runs on CPU through megatron_geno.cpu_layer (gloo)")
    return True


def is_active() -> bool:
    """True when the CPU layer has been activated in this process."""
    return _ACTIVE_MODE is not None


def backend() -> str:
    """The torch.distributed backend for this machine: nccl with CUDA, gloo without."""
    return "nccl" if torch.cuda.is_available() else "gloo"
