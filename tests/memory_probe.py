"""Measures, on CPU, the memory a model's forward + backward needs: what the memory plan
(launch/plan.py) estimates. Used by tests/unit/test_memory_plan.py and benchmarks/memory_plan.py.

- ``saved_bytes``: the bytes of every tensor autograd keeps for backward after one forward
  (torch.autograd.graph.saved_tensors_hooks; parameters and storages seen twice count once, and
  what a dropped branch of the graph saved does not count).
  A tensor saved for backward is the same tensor on a GPU, so this is the activation memory a GPU
  holds for one micro-batch, except where a GPU kernel saves something else (flash attention
  saves q, k, v, its output and the log-sum-exp on both).
- ``peak_bytes``: the peak of memory allocated during one forward + backward above what was
  allocated before it, from torch.profiler's memory timeline (CPU allocations), with gradients
  preallocated as megatron-core's DDP buffers are.
"""

from __future__ import annotations

import contextlib

import torch


# the settings whose kept-for-backward bytes the plan models: the fused path a GPU runs, the
# eager one, SequentialMLP experts, each recomputation (test_memory_plan and the benchmark)
SETTINGS = [
    ["model.fusions=on"],
    ["model.fusions=off"],
    ["model.fusions=off", "model.moe_grouped_gemm=off"],
    ["model.fusions=on", "model.moe_grouped_gemm=off"],
    ["model.fusions=on", "model.recompute=selective", "model.recompute_modules=[moe]"],
    ["model.fusions=on", "model.recompute=selective", "model.recompute_modules=[core_attn]"],
    ["model.fusions=on", "model.recompute=full"],
]


def setting_name(overrides: list[str]) -> str:
    return " ".join(o.split(".", 1)[1] for o in overrides)


@contextlib.contextmanager
def bf16_model(overrides: list[str], layers: int):
    """Yields (model config, model in bf16, tokens, positions) for one micro-batch."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_geno import distributed
    from megatron_geno.config import load_config
    from megatron_geno.model import build_model_chunks
    from megatron_geno.tokenizer import VOCAB_SIZE

    cfg = load_config(None, ["model.moe_token_dispatcher=allgather", "precision=bf16",
                             *overrides, f"model.num_layers={layers}"])
    get_moe_layer_wise_logging_tracker().clear()  # sized by the previous model's layer count
    distributed.initialize(cfg, seed=1234)
    try:
        (model,) = build_model_chunks(cfg, VOCAB_SIZE)
        model = model.bfloat16()
        s, b = cfg.data.seq_length, cfg.data.micro_batch_size
        torch.manual_seed(0)
        tokens = torch.randint(5, 9, (b, s))
        yield cfg, model, tokens, torch.arange(s)[None].expand(b, s)
    finally:
        distributed.destroy()


def _loss(model, tokens, positions) -> torch.Tensor:
    return model(tokens, positions, None, labels=tokens).float().mean()


class _Saved:
    """What autograd holds for one saved tensor (weakly referenced, so that tensors a dropped
    branch of the graph saved are not counted)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_bytes(overrides: list[str], layers: int) -> int:
    """Bytes kept for backward by one forward of a `layers`-layer bf16 model: the storages of the
    tensors autograd still holds when the forward returns, each once, parameters excluded."""
    import weakref

    with bf16_model(overrides, layers) as (_, model, tokens, positions):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        held: list[weakref.ref] = []

        def pack(t: torch.Tensor) -> _Saved:
            saved = _Saved(t)
            held.append(weakref.ref(saved))
            return saved

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
            loss = _loss(model, tokens, positions)
        storages = {}
        for ref in held:
            saved = ref()
            if saved is not None:
                storage = saved.tensor.untyped_storage()
                if storage.data_ptr() not in params:
                    storages[storage.data_ptr()] = storage.nbytes()
        del loss
        return sum(storages.values())


def peak_bytes(overrides: list[str], layers: int) -> int:
    """Peak bytes allocated during one forward + backward (the second of two) above the start."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with bf16_model(overrides, layers) as (_, model, tokens, positions):
        for p in model.parameters():  # DDP accumulates into buffers that exist before the step
            p.grad = torch.zeros_like(p)
        _loss(model, tokens, positions).backward()  # lazy initialisation is not per-step memory
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            _loss(model, tokens, positions).backward()
        now = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            if action == Action.CREATE:
                now += size
            elif action == Action.DESTROY:
                now -= size
            peak = max(peak, now)
        return peak
