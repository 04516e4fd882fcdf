"""Resume and reshard through torch_dist checkpoints written by geno-train."""

import json
import math

import pytest

from tests.functional.launcher import (assert_close, geno_train, geno_train_error,
                                      geno_train_logged, losses)


def test_resume_matches_uninterrupted(tmp_path):
    straight = losses(geno_train(tmp_path / "straight", "schedule.train_iters=10"))
    ckpt = f"checkpoint.save={tmp_path / 'ck'}"
    first = losses(geno_train(tmp_path / "first", "schedule.train_iters=10",
                              "schedule.stop_after=5", ckpt))
    second = losses(geno_train(tmp_path / "second", "schedule.train_iters=10", ckpt,
                               f"checkpoint.load={tmp_path / 'ck'}"))
    assert len(first) == 5 and len(second) == 5
    assert_close(first + second, straight, rtol=1e-6)


COMPARE_CHECKPOINTS = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from checkpoint_tools.mcore_checkpoint import open_checkpoint
a, b = open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2])
assert a.shapes.keys() == b.shapes.keys(), sorted(set(a.shapes) ^ set(b.shapes))[:5]
worst = {}
for key in sorted(a.shapes):
    x, y = a.read(key).double(), b.read(key).double()
    worst[key] = ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item()
print(json.dumps(worst))
"""


def compare_checkpoints(first, second) -> dict:
    """{tensor key: max |difference| / max |value|} over every tensor of two checkpoints (model
    and optimizer state in their layout-independent form), read in a separate process."""
    import json
    import subprocess
    import sys

    from tests.functional.launcher import quiet_env

    proc = subprocess.run([sys.executable, "-c", COMPARE_CHECKPOINTS, str(first), str(second)],
                          capture_output=True, text=True, timeout=300, env=quiet_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reshard_tp2_to_pp2_continues_as_the_run_that_never_resharded(tmp_path):
    """Saved at TP=2 after 4 steps, continued 3 steps at PP=2: the losses, weights and Adam
    moments of the run that stayed at TP=2."""
    schedule = ["schedule.train_iters=7"]
    saved = geno_train(tmp_path / "tp2", *schedule, "schedule.stop_after=4",
                       "parallel.tensor_parallel=2", f"checkpoint.save={tmp_path / 'ck_tp2'}",
                       nproc=2)
    stayed = geno_train(tmp_path / "tp2_more", *schedule, "parallel.tensor_parallel=2",
                        f"checkpoint.load={tmp_path / 'ck_tp2'}",
                        f"checkpoint.save={tmp_path / 'ck_stayed'}", nproc=2)
    moved = geno_train(tmp_path / "pp2", *schedule, "parallel.pipeline_parallel=2",
                       f"checkpoint.load={tmp_path / 'ck_tp2'}",
                       f"checkpoint.save={tmp_path / 'ck_moved'}", nproc=2)
    assert len(saved) == 4 and len(moved) == 3
    assert_close(losses(moved), losses(stayed), rtol=1e-5)
    worst = compare_checkpoints(tmp_path / "ck_moved", tmp_path / "ck_stayed")
    moments = [k for k in worst if k.startswith("optimizer.state.exp_avg")]
    assert moments and any(k.startswith("decoder.") for k in worst)
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_reshard_across_expert_parallel_carries_the_optimizer(tmp_path):
    """EP=2 -> EP=1 and EP=1 -> EP=2 (dense + expert optimizers <-> one optimizer): 3 more steps
    give the losses, weights and Adam moments of the run that stayed at EP=1. (EP=1 and EP=2 runs
    are one trajectory, to rounding: initialization does not depend on the layout, and
    test_layouts holds both to the golden losses; so one run that stayed serves both moves.)"""
    schedule = ["schedule.train_iters=7"]
    ep2 = ["parallel.expert_parallel=2"]
    for name, saved_at in (("ep1", []), ("ep2", ep2)):
        geno_train(tmp_path / name, *schedule, "schedule.stop_after=4", *saved_at,
                   f"checkpoint.save={tmp_path / f'ck_{name}'}", nproc=2 if saved_at else 1)
    stayed = geno_train(tmp_path / "stayed", *schedule, f"checkpoint.load={tmp_path / 'ck_ep1'}",
                        f"checkpoint.save={tmp_path / 'stayed_ck'}")
    for name, moved_to in (("ep1", ep2), ("ep2", [])):
        moved, log = geno_train_logged(tmp_path / f"{name}_moved", *schedule, *moved_to,
                                       f"checkpoint.load={tmp_path / f'ck_{name}'}",
                                       f"checkpoint.save={tmp_path / name}_m",
                                       nproc=2 if moved_to else 1)
        assert len(moved) == 3 and "Adam moments (regrouped for this layout's optimizers)" in log
        assert_close(losses(moved), losses(stayed), rtol=1e-5)
        worst = compare_checkpoints(tmp_path / f"{name}_m", tmp_path / "stayed_ck")
        assert [k for k in worst if k.startswith("optimizer.state.exp_avg_sq.")
                and "experts" in k], sorted(worst)
        assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_bad_checkpoints_are_one_clear_error(tmp_path):
    ck = tmp_path / "ck"
    geno_train(tmp_path / "save", "schedule.train_iters=2", f"checkpoint.save={ck}")
    load = f"checkpoint.load={ck}"

    code, err = geno_train_error(tmp_path / "mismatch", "schedule.train_iters=3", load,
                                 "model.hidden_size=32")
    assert code == 2 and "model.hidden_size=64 but the config says model.hidden_size=32" in err

    code, err = geno_train_error(tmp_path / "missing", f"checkpoint.load={tmp_path / 'nope'}")
    assert code == 2 and "does not exist" in err

    (ck / "iter_0000002" / "metadata.json").unlink()  # a half-written checkpoint
    code, err = geno_train_error(tmp_path / "incomplete", "schedule.train_iters=3", load)
    assert code == 2 and "metadata.json is missing" in err and "no other complete checkpoint" in err

    (ck / "latest").write_text("garbage")
    code, err = geno_train_error(tmp_path / "corrupt", "schedule.train_iters=3", load)
    assert code == 2 and "is corrupt" in err


@pytest.mark.parametrize("signum", ["SIGUSR1", "SIGINT"])
def test_a_signal_saves_and_exits_cleanly(tmp_path, signum):
    """SIGUSR1 (SLURM's warning before the time limit), SIGTERM and Ctrl-C (SIGINT): the run
    saves after the next step and exits 0."""
    import signal
    import subprocess
    import time

    from tests.functional.launcher import quiet_env, single_process_command

    run, ck = tmp_path / "run", tmp_path / "ck"
    cmd = single_process_command(run, "schedule.train_iters=100000", f"checkpoint.save={ck}")
    proc = subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(getattr(signal, signum))
    assert proc.wait(timeout=240) == 0, proc.stderr.read()[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert (ck / "latest").read_text().strip() == str(steps[-1])
    assert (ck / f"iter_{steps[-1]:07d}" / "metadata.json").exists()


def test_resume_says_what_changed_and_what_carried_over(tmp_path):
    from tests.faults.helpers import train

    ck = tmp_path / "ck"
    assert train(tmp_path / "first", "schedule.train_iters=2", f"checkpoint.save={ck}").returncode == 0
    proc = train(tmp_path / "second", "schedule.train_iters=4", "optimizer.lr=0.0005",
                 "optimizer.min_lr=0.00005", f"checkpoint.load={ck}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if "carried over" in line)
    assert ("carried over weights, Adam moments, schedule and data position (iteration 2, "
            "16 samples), RNG state") in line
    assert "Changed since it was saved, and applied" in line
    assert "optimizer.lr: 0.001 -> 0.0005" in line and "schedule.train_iters: 2 -> 4" in line
    # applied: steps 3 and 4 run on this run's cosine (warmup 1 step, decay to step 4, lr 5e-4
    # to 5e-5), not on the saved one's (megatron-core's default: 1e-3 decayed to 1e-4 by step 2)
    records = [json.loads(r) for r in
               (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    cosine = [5e-5 + 0.5 * (math.cos(math.pi * (n - 1) / 3) + 1) * 4.5e-4 for n in (3, 4)]
    assert [r["lr"] for r in records] == pytest.approx(cosine, rel=1e-9)
    assert "logging.run_dir" not in line  # where a run writes is not a change of what it does
    proc = train(tmp_path / "third", "schedule.train_iters=2", "checkpoint.weights_only=true",
                 f"checkpoint.load={ck}")
    line = next(line for line in proc.stderr.splitlines() if "carried over" in line)
    assert "carried over weights; fresh optimizer, schedule and data position" in line


def test_log_interval_records_interval_means_and_the_stopping_step(tmp_path):
    """With logging.log_interval=5 a record holds the token mean of the steps since the last
    one, and a run stopped at step 7 (schedule.stop_after) records step 7 too."""
    every = losses(geno_train(tmp_path / "every", "schedule.train_iters=10",
                              "schedule.stop_after=7"))
    records = geno_train(tmp_path / "interval", "schedule.train_iters=10", "schedule.stop_after=7",
                         "logging.log_interval=5")
    assert [r["step"] for r in records] == [5, 7]
    assert_close(losses(records), [sum(every[:5]) / 5, sum(every[5:7]) / 2], rtol=1e-6)


def test_async_save_writes_what_a_sync_save_writes_and_resumes_exactly(tmp_path):
    """checkpoint.async_save: training runs on while the checkpoint is written; the checkpoint
    holds the same tensors as a synchronous save of the same step, sealed (checksums) and named
    in latest only when complete, and a resume from it is exact."""
    run = ["schedule.train_iters=4", "checkpoint.save_interval=2"]
    sync = losses(geno_train(tmp_path / "sync", *run, f"checkpoint.save={tmp_path / 'ck_sync'}"))
    background = losses(geno_train(tmp_path / "async", *run, "checkpoint.async_save=true",
                                   f"checkpoint.save={tmp_path / 'ck_async'}"))
    assert background == sync
    ck = tmp_path / "ck_async"
    assert (ck / "latest").read_text().strip() == "4"
    assert (ck / "iter_0000002" / "checksums.json").exists()
    assert not list(ck.glob("*.tmp"))
    worst = compare_checkpoints(ck / "iter_0000002", tmp_path / "ck_sync" / "iter_0000002")
    assert worst and max(worst.values()) == 0.0, {k: v for k, v in worst.items() if v}
    resumed = losses(geno_train(tmp_path / "resumed", "schedule.train_iters=4",
                                f"checkpoint.load={ck / 'iter_0000002'}"))
    assert resumed == sync[2:]


def test_a_kill_during_async_saves_leaves_latest_on_a_complete_checkpoint(tmp_path):
    """A save every step, in the background, killed with SIGKILL: latest names a sealed
    checkpoint, from which training resumes (with its checksums verified)."""
    import signal
    import subprocess
    import time

    from tests.functional.launcher import quiet_env, single_process_command

    ck = tmp_path / "ck"
    cmd = single_process_command(tmp_path / "run", "schedule.train_iters=100000",
                                 "checkpoint.save_interval=1", "checkpoint.async_save=true",
                                 f"checkpoint.save={ck}")
    proc = subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (ck / "latest").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    time.sleep(1.5)  # more saves in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    latest = int((ck / "latest").read_text())
    assert (ck / f"iter_{latest:07d}" / "checksums.json").exists()
    resumed = geno_train(tmp_path / "resumed", f"schedule.train_iters={latest + 1}",
                         f"checkpoint.load={ck}")
    assert [r["step"] for r in resumed] == [latest + 1]
