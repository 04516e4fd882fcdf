"""model.recompute: megatron-core's activation recomputation really recomputes (the forward ops of
the recomputed part run twice per step) and changes no number."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_geno import distributed
from megatron_geno.config import ConfigError, load_config
from megatron_geno.model import build_model_chunks

ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"
EXPERTS = "GroupedLinear"


def run(*overrides):
    """(op counts, loss, input gradient norm) of one forward + backward of tiny."""
    cfg = load_config(None, ["model.preset=tiny", "data.seq_length=64", *overrides])
    distributed.initialize(cfg, seed=1234)
    try:
        (model,) = build_model_chunks(cfg, 128)
        torch.manual_seed(0)
        tokens = torch.randint(5, 9, (2, 64))
        positions = torch.arange(64)[None].expand(2, -1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = model(tokens, positions, None, labels=tokens).mean()
            loss.backward()
        counts = {name: sum(1 for e in prof.events() if e.name == name)
                  for name in (ATTENTION, EXPERTS)}
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return counts, loss.item(), grad
    finally:
        distributed.destroy()


@pytest.fixture(scope="module")
def plain():
    return run()


@pytest.mark.parametrize("overrides,recomputed", [
    (["model.recompute=full"], {ATTENTION, EXPERTS}),
    (["model.recompute=full", "model.recompute_layers=1"], {ATTENTION, EXPERTS}),
    (["model.recompute=selective", "model.recompute_modules=[core_attn]"], {ATTENTION}),
    (["model.recompute=selective", "model.recompute_modules=[moe]"], {EXPERTS}),
])
def test_recompute_runs_forward_again_and_changes_nothing(plain, overrides, recomputed):
    base_counts, base_loss, base_grad = plain
    counts, loss, grad = run(*overrides)
    layers = 1 if "model.recompute_layers=1" in overrides else 2  # tiny has 2 layers
    for name in (ATTENTION, EXPERTS):
        per_layer = base_counts[name] // 2
        extra = per_layer * layers if name in recomputed else 0
        assert counts[name] == base_counts[name] + extra, (name, counts, base_counts)
    assert loss == base_loss
    torch.testing.assert_close(grad, base_grad, rtol=0, atol=0)


def test_recompute_settings_are_checked():
    with pytest.raises(ConfigError, match="recompute_layers=1 needs model.recompute=full"):
        load_config(None, ["model.preset=tiny", "model.recompute_layers=1"])
    with pytest.raises(ConfigError, match="'attn' is not one of"):
        load_config(None, ["model.preset=tiny", "model.recompute=selective",
                           "model.recompute_modules=[attn]"])
    with pytest.raises(ConfigError, match="exceeds the 2 layers"):
        load_config(None, ["model.preset=tiny", "model.recompute=full", "model.recompute_layers=3"])


def test_memory_plan_counts_recomputation():
    """The plan's activation estimate falls with recomputation, most with full."""
    from launch.plan import memory_per_gpu

    def activations(*overrides):
        cfg = load_config(None, ["model.preset=genos-1.2b", "data.seq_length=32768",
                                 "data.micro_batch_size=1", *overrides])
        return memory_per_gpu(cfg, 1, 1)["activations (estimate)"]

    none = activations()
    moe = activations("model.recompute=selective", "model.recompute_modules=[moe]")
    full = activations("model.recompute=full")
    half = activations("model.recompute=full", "model.recompute_layers=6")
    assert full < half < none and full < moe < none
