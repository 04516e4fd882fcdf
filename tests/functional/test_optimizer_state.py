"""Resume with any Adam megatron-core may run: torch's AdamW (foreach or fused kernel) and a
FusedAdam as Transformer Engine and apex implement it (the step count in each param group, no
per-parameter ``step``).

Neither TE nor apex installs here. megatron-core picks its Adam at import time
(``USING_PYTORCH_OPTIMIZER``, ``Adam``, ``HAVE_APEX_OR_TE``, ``USING_TE_OPTIMIZER``); the "group-step" runs
set those flags as an installed TE sets them and give megatron-core ``GroupStepAdam``, an AdamW
with TE FusedAdam's state layout, so that megatron-core's TE branches of the distributed
optimizer's save and load run. What this cannot check is TE's own kernel (README, Checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.functional.launcher import BASE
from tests.ranks import run_on_ranks


class GroupStepAdam(torch.optim.Optimizer):
    """AdamW keeping its state as TE's / apex's FusedAdam does: ``exp_avg`` and ``exp_avg_sq``
    per parameter, created at the first step, and one ``step`` per param group."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 adam_w_mode=True, **_):
        assert adam_w_mode
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            bias1, bias2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                assert "step" not in state, "TE FusedAdam keeps no per-parameter step"
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)


def _use_adam(kind: str) -> None:
    """Makes megatron-core build the given Adam from now on in this process."""
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer

    group_step = kind == "group-step"
    mcore_optimizer.USING_PYTORCH_OPTIMIZER = not group_step
    mcore_optimizer.Adam = GroupStepAdam if group_step else torch.optim.AdamW
    distrib_optimizer.Adam = GroupStepAdam if group_step else torch.optim.Adam
    distrib_optimizer.HAVE_APEX_OR_TE = group_step
    distrib_optimizer.USING_TE_OPTIMIZER = group_step


def _runs(rank: int, world: int, tmp: str, plan: list) -> None:
    """Runs each (name, adam, overrides) of plan in turn in this process; writes their records."""
    import logging

    from megatron_geno.config import load_config
    from megatron_geno.train import train

    logging.disable(logging.WARNING)
    out = {}
    for name, adam, overrides in plan:
        _use_adam(adam)
        cfg = load_config(None, [o for o in BASE if o != "--preset" and o != "tiny"]
                          + ["model.preset=tiny", f"logging.run_dir={tmp}/{name}",
                             f"data.cache_dir={tmp}/cache", *overrides])
        out[name] = train(cfg)
    Path(tmp, "records.json").write_text(json.dumps(out))


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Five-step runs of each Adam saving at step 2, and resumes from each at step 2 with each.
    A checkpoint at iteration 0 from the group-step Adam is continued by torch's."""
    tmp = tmp_path_factory.mktemp("adam")
    five = ["schedule.train_iters=5", "checkpoint.save_interval=2"]
    plan = [
        ("torch", "torch", [*five, f"checkpoint.save={tmp}/ck_torch"]),
        ("group", "group-step", [*five, f"checkpoint.save={tmp}/ck_group"]),
        ("group_from_group", "group-step", ["schedule.train_iters=5",
                                            f"checkpoint.load={tmp}/ck_group/iter_0000002"]),
        ("torch_from_group", "torch", ["schedule.train_iters=5",
                                       f"checkpoint.load={tmp}/ck_group/iter_0000002"]),
        ("group_from_torch", "group-step", ["schedule.train_iters=5",
                                            f"checkpoint.load={tmp}/ck_torch/iter_0000002"]),
        ("fused_from_torch", "torch", ["schedule.train_iters=5", "optimizer.fused=on",
                                       f"checkpoint.load={tmp}/ck_torch/iter_0000002"]),
        ("group_zero", "group-step", ["schedule.train_iters=0", "schedule.warmup_iters=0",
                                      f"checkpoint.save={tmp}/ck_zero"]),
        ("torch_from_group_zero", "torch", ["schedule.train_iters=5",
                                            f"checkpoint.load={tmp}/ck_zero"]),
    ]
    run_on_ranks(_runs, 1, str(tmp), plan)
    return json.loads((tmp / "records.json").read_text())


def test_each_adam_resumes_exactly_and_the_two_agree(runs):
    torch_, group = _losses(runs["torch"]), _losses(runs["group"])
    # the same AdamW in two state layouts: the same losses up to float rounding
    assert torch_ == pytest.approx(group, rel=1e-5)
    # the group-step checkpoint carries its step and moments: its resume is exact
    assert _losses(runs["group_from_group"]) == group[2:]
    # across layouts the step (bias correction) and moments carry over: without them step 4
    # (the first to use the loaded moments) would move by far more than rounding
    assert _losses(runs["torch_from_group"]) == pytest.approx(group[2:], rel=1e-5)
    assert _losses(runs["group_from_torch"]) == pytest.approx(torch_[2:], rel=1e-5)
    assert _losses(runs["fused_from_torch"]) == pytest.approx(torch_[2:], rel=1e-5)


def test_a_group_step_checkpoint_before_any_step_continues_with_torch_adam(runs):
    # iteration 0 of a TE / apex run: its param groups carry step 0 for torch's Adam to load
    assert _losses(runs["torch_from_group_zero"]) == pytest.approx(_losses(runs["group"]),
                                                                   rel=1e-5)
