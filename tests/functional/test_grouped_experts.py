"""GroupedExperts in training: the same losses as SequentialMLP at TP=2 and EP=2 (2 processes),
and checkpoints interchangeable between the two, optimizer state included."""

import subprocess
import sys

from megatron_geno.distributed import free_port
from tests.functional.launcher import BASE, assert_close, geno_train, losses, quiet_env


def train_logged(run_dir, *overrides, nproc=1):
    """geno-train under torchrun; returns (metrics records, stderr) to read the start-up line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "megatron_geno.cli", *BASE,
           f"logging.run_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'data_cache'}",
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=quiet_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, proc.stderr


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
