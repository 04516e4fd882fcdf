"""Where megatron-core 0.16.1 breaks without Transformer Engine / apex, on CPU and GPU alike.

The CPU-only accommodations live in megatron_geno/cpu_layer.py; these apply to every pip-only run
(torch's Adam instead of TE's / apex's fused one, no TE kernels).
"""

from __future__ import annotations

import torch


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


def _torch_adams(optimizer):
    """The torch Adam / AdamW instances inside a megatron-core (chained) optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):  # AdamW is a subclass
            yield inner


def fused_adam_wanted(setting: str) -> bool:
    """optimizer.fused: auto = torch's fused AdamW where the parameters are on CUDA."""
    return setting == "on" or (setting == "auto" and torch.cuda.is_available())


def _place_steps(adam: torch.optim.Adam) -> None:
    """Keeps each parameter's ``step`` where its kernel reads it: on the parameter's device for the
    fused kernel (a CPU step there is an error), on the CPU otherwise (where reading it for the bias
    correction costs no device synchronisation)."""
    for group in adam.param_groups:
        for param in group["params"]:
            state = adam.state.get(param)
            if state and isinstance(state.get("step"), torch.Tensor):
                device = param.device if group.get("fused") else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


def set_adam_kernel(optimizer, fused: bool) -> int:
    """Runs torch's AdamW inside megatron-core's optimizer as the fused kernel (one launch per
    device and dtype for the whole update) or as torch's default (foreach on CUDA). Without TE /
    apex megatron-core builds a plain ``torch.optim.AdamW``; with them it runs their FusedAdam and
    this changes nothing. Call it after building the optimizer and after loading its state (a
    checkpoint carries the kernel choice of the run that saved it). Returns the number of torch
    Adam optimizers switched."""
    count = 0
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            group["fused"] = True if fused else None
            group["foreach"] = False if fused else None
        if fused:
            adam._step_supports_amp_scaling = True
        _place_steps(adam)
        count += 1
    return count


def allocate_optimizer_state(optimizer) -> None:
    """Gives every parameter an (empty) Adam state before a load, or a save before any step.

    Each Adam keeps its step count where its own kernel reads it, and megatron-core's
    DistributedOptimizer reads it from there when saving (its param groups carry it in the
    checkpoint, whichever Adam saved it):
    - torch's Adam / AdamW (no Transformer Engine or apex): a ``step`` tensor per parameter,
      created with the rest of the state at the first step; state_dict() asserts on it before;
    - TE's and apex's FusedAdam: one ``step`` per param group, no per-parameter one (a
      per-parameter ``step`` there makes megatron-core's load look for a tensor the checkpoint
      does not hold: KeyError 'step'). Before the first step it has none; 0 is given so that an
      iteration-0 checkpoint records one for whichever Adam loads it.
    Loading overwrites these placeholders, step included.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if inner is None:
            continue
        torch_adam = isinstance(inner, torch.optim.Adam)  # AdamW is a subclass
        if not len(inner.state) and opt.init_state_fn is not None:
            opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            if not torch_adam:
                group.setdefault("step", 0)
                continue
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.tensor(0.0))
        if torch_adam:
            _place_steps(inner)


def unshare_adam_steps(optimizer) -> None:
    """Gives each parameter its own Adam ``step`` tensor after a load.

    Without TE / apex, megatron-core restores one ``step`` tensor object into every parameter's
    state; torch's Adam increments it in place once per parameter, so the bias correction of
    the following steps would be wrong.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if opt.optimizer is None:
            continue
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
