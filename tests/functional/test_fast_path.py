"""The GPU fast path, run on CPU: compiled fusions (model.fusions=on), torch's fused AdamW
(optimizer.fused=on) and grouped experts give the baseline path's losses at another layout and in
bf16 (where the fused cross-entropy runs too), and resume exactly, also when the resumed run
switches the Adam kernel."""

from tests.functional.launcher import assert_close, geno_train, losses
from tests.functional.launcher import geno_train_logged as train_logged

STEPS = "schedule.train_iters=5"
FAST = ["model.fusions=on", "optimizer.fused=on", "model.moe_grouped_gemm=on"]
BASELINE = ["model.fusions=off", "optimizer.fused=off", "model.moe_grouped_gemm=off"]


def test_fast_path_matches_baseline_at_tp2(tmp_path):
    # one initialisation for both (megatron-core initialises each layout differently)
    geno_train(tmp_path / "init", "schedule.train_iters=0", "schedule.warmup_iters=0", *BASELINE,
               f"checkpoint.save={tmp_path / 'init'}")
    load = [f"checkpoint.load={tmp_path / 'init'}", "checkpoint.weights_only=true", STEPS]
    baseline, log = train_logged(tmp_path / "baseline", *load, *BASELINE)
    assert "experts=sequential fusions=off adam=torch-default" in log
    fast, log = train_logged(tmp_path / "fast", *load, *FAST, "parallel.tensor_parallel=2", nproc=2)
    assert "TP=2" in log and "experts=grouped fusions=on adam=fused" in log  # no silent fallback
    assert len(fast) == 5
    assert_close(losses(fast), losses(baseline), rtol=1e-4)


def test_fast_path_in_bf16_matches_baseline(tmp_path):
    """What a GPU runs, in bf16 on CPU: grouped experts in bf16, the compiled weighted SwiGLU on
    bf16 activations with fp32 router probabilities, and the fused bf16 cross-entropy. 10 steps
    from one initialisation give the eager bf16 path's losses."""
    geno_train(tmp_path / "init", "schedule.train_iters=0", "schedule.warmup_iters=0", *BASELINE,
               f"checkpoint.save={tmp_path / 'init'}")
    load = [f"checkpoint.load={tmp_path / 'init'}", "checkpoint.weights_only=true",
            "schedule.train_iters=10", "precision=bf16"]
    baseline = losses(geno_train(tmp_path / "baseline", *load, *BASELINE))
    fast, log = train_logged(tmp_path / "fast", *load, *FAST)
    assert "experts=grouped fusions=on adam=fused" in log and "dtype=torch.bfloat16" in log
    assert baseline[-1] < 0.85 * baseline[0]  # it trains: the comparison is not of two constants
    assert_close(losses(fast), baseline, rtol=1e-3)


def test_fused_adam_resumes_exactly_and_switches_kernel(tmp_path):
    """3 steps, a checkpoint, 2 more: the losses of the uninterrupted run, with the fused kernel,
    and with the default kernel resuming the fused run's checkpoint (its Adam state carries)."""
    common = ["schedule.warmup_iters=1", STEPS, *FAST[:2]]
    straight = losses(geno_train(tmp_path / "straight", *common))
    geno_train(tmp_path / "first", *common, "schedule.stop_after=3",
               f"checkpoint.save={tmp_path / 'ck'}")
    resumed = losses(geno_train(tmp_path / "resumed", *common,
                                f"checkpoint.load={tmp_path / 'ck'}"))
    switched = losses(geno_train(tmp_path / "switched", *common[:2], "optimizer.fused=off",
                                 "model.fusions=on", f"checkpoint.load={tmp_path / 'ck'}"))
    assert len(resumed) == 2
    assert_close(resumed, straight[3:], rtol=1e-6)
    assert_close(switched, straight[3:], rtol=1e-5)
