"""GroupedExperts in training: the same losses as SequentialMLP at TP=2 and EP=2 (2 processes),
and checkpoints interchangeable between the two, optimizer state included."""

from tests.functional.launcher import assert_close, geno_train, losses
from tests.functional.launcher import geno_train_logged as train_logged


def test_grouped_matches_sequential_across_layouts(tmp_path):
    geno_train(tmp_path / "init", "schedule.train_iters=0", "schedule.warmup_iters=0",
               "model.moe_grouped_gemm=off", f"checkpoint.save={tmp_path / 'init'}")
    load = [f"checkpoint.load={tmp_path / 'init'}", "checkpoint.weights_only=true",
            "schedule.train_iters=5"]
    sequential, log = train_logged(tmp_path / "sequential", *load, "model.moe_grouped_gemm=off")
    assert "experts=sequential" in log
    for name, layout in (("tp2", ["parallel.tensor_parallel=2"]),
                         ("ep2", ["parallel.expert_parallel=2"])):
        grouped, log = train_logged(tmp_path / name, *load, *layout, "model.moe_grouped_gemm=on",
                                    nproc=2)
        assert "experts=grouped" in log  # the fast path ran, not a silent fallback
        assert_close(losses(grouped), losses(sequential), rtol=1e-4)


def test_checkpoints_interchange_between_grouped_and_sequential(tmp_path):
    """Saved by one experts module after 3 steps, continued by the other: the same 2 losses as
    continuing with the same module (weights and Adam moments carried over exactly)."""
    common = ["schedule.warmup_iters=1", "schedule.train_iters=5", "schedule.stop_after=3"]
    for module in ("on", "off"):
        geno_train(tmp_path / f"first_{module}", *common, f"model.moe_grouped_gemm={module}",
                   f"checkpoint.save={tmp_path / f'ck_{module}'}")
    rest = ["schedule.warmup_iters=1", "schedule.train_iters=5"]
    same = losses(geno_train(tmp_path / "same", *rest, "model.moe_grouped_gemm=on",
                             f"checkpoint.load={tmp_path / 'ck_on'}"))
    crossed = losses(geno_train(tmp_path / "crossed", *rest, "model.moe_grouped_gemm=off",
                                f"checkpoint.load={tmp_path / 'ck_on'}"))
    back = losses(geno_train(tmp_path / "back", *rest, "model.moe_grouped_gemm=on",
                             f"checkpoint.load={tmp_path / 'ck_off'}"))
    assert len(same) == 2
    assert_close(crossed, same, rtol=1e-6)
    assert_close(back, same, rtol=1e-6)
