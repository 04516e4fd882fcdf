"""launch/slurm/geno.sbatch under stand-in srun/scontrol, and a phase handoff through geno-launch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_geno.distributed import free_port
from tests.functional.launcher import assert_close, geno_train, losses, quiet_env

ROOT = Path(__file__).resolve().parents[2]
SRUN = """#!/usr/bin/env bash
# stand-in srun: drop srun's options, run the command on this machine (same PID)
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$SCONTROL_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo 127.0.0.1; fi
"""
TINY = {"model": {"preset": "tiny"},
        "data": {"seq_length": 128, "micro_batch_size": 2, "global_batch_size": 8},
        "schedule": {"train_iters": 400, "warmup_iters": 2, "eval_interval": 0},
        "logging": {"log_interval": 1, "tensorboard": False, "quiet": True}}


def slurm_env(tmp: Path) -> dict:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(quiet_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
                SLURM_NNODES="1", SLURM_JOB_NODELIST="node001", GPUS_PER_NODE="2",
                MASTER_PORT=str(free_port()), PYTHON=sys.executable,
                SCONTROL_LOG=str(tmp / "scontrol.log"), OMP_NUM_THREADS="1")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sbatch_saves_on_sigusr1_requeues_and_resumes_with_the_same_loss(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**TINY, "checkpoint": {"save": str(tmp_path / "ckpt")},
                                      "logging": {**TINY["logging"], "run_dir": str(run)},
                                      "data": {**TINY["data"], "cache_dir": str(tmp_path / "dc")}}))
    sbatch = [str(ROOT / "launch/slurm/geno.sbatch"), str(config)]
    job = subprocess.Popen(["bash", *sbatch], env=slurm_env(tmp_path), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(metrics(run)) < 3 and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what SLURM's --signal=B:USR1@300 does before the limit
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-5000:]
    saved = int((tmp_path / "ckpt" / "latest").read_text())
    assert 3 <= saved < 400 and len(metrics(run)) == saved
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text()

    relaunch = subprocess.run(["bash", *sbatch, f"schedule.stop_after={saved + 2}"],
                              env=slurm_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert relaunch.returncode == 0, relaunch.stdout[-5000:] + relaunch.stderr[-3000:]
    resumed = metrics(run)[saved:]
    assert [r["step"] for r in resumed] == [saved + 1, saved + 2]

    straight = geno_train(tmp_path / "straight", "schedule.train_iters=400",
                          "schedule.warmup_iters=2", f"schedule.stop_after={saved + 2}", nproc=2)
    assert_close(losses(resumed), losses(straight)[saved:], rtol=1e-5)


def recipe(tmp: Path, name: str, seq: int, extra: dict) -> Path:
    tree = {"launch": {"phase": extra.pop("phase"), "token_budget": 8 * seq * 6,
                       "warmup_fraction": 0.1},
            **TINY, "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
            "data": {**TINY["data"], "seq_length": seq, "cache_dir": str(tmp / "dc")},
            "logging": {**TINY["logging"], "run_dir": str(tmp / name)}, **extra}
    tree["schedule"] = {k: v for k, v in tree["schedule"].items()
                        if k not in ("train_iters", "warmup_iters")}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def geno_launch(*args, tmp: Path) -> subprocess.CompletedProcess:
    """geno-launch with a python3 on PATH that cannot run geno-train and no PYTHON set: the run
    must use the interpreter that runs geno-launch."""
    bin_dir = tmp / "wrong_python"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text("#!/bin/sh\necho 'not the right python' >&2\nexit 3\n")
    (bin_dir / "python3").chmod(0o755)
    env = {k: v for k, v in quiet_env().items() if k != "PYTHON"}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_phase_handoff_keeps_weights_and_starts_a_fresh_schedule(tmp_path):
    one = recipe(tmp_path, "phase1", 64, {"phase": 1,
                                          "checkpoint": {"save": str(tmp_path / "ckpt1")}})
    two = recipe(tmp_path, "phase2", 256, {"phase": 2, "checkpoint": {
        "save": str(tmp_path / "ckpt2"), "load": str(tmp_path / "ckpt1"), "weights_only": True}})
    for r in (one, two):
        proc = geno_launch("--recipe", r, "--nodes", 1, "--gpus-per-node", 2, "--torchrun",
                           tmp=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert "6 steps" in proc.stdout  # token budget / tokens per step
    first, second = metrics(tmp_path / "phase1"), metrics(tmp_path / "phase2")
    assert [r["step"] for r in second] == list(range(1, 7))  # fresh schedule, 6 steps
    assert second[0]["consumed_samples"] == 8
    assert first[-1]["lr"] < 1e-3 and second[0]["lr"] == 3e-3  # the schedule starts again
    # weights carried over: phase 2 starts far below a fresh model's loss at the same length
    fresh = geno_train(tmp_path / "fresh", "data.seq_length=256", "schedule.train_iters=6",
                       "schedule.warmup_iters=1", "optimizer.lr=3e-3", nproc=1)
    assert second[0]["loss"] < fresh[0]["loss"] - 0.3, (second[0], fresh[0], first[-1])
    assert int((tmp_path / "ckpt2" / "latest").read_text()) == 6


LOGGING_SRUN = """#!/usr/bin/env bash
# stand-in srun that records its options, then runs the command here
echo "$*" >> "$SRUN_LOG"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
"""
APPTAINER = """#!/usr/bin/env bash
# stand-in apptainer: record the call, drop 'exec', its options and the image, run the command
echo "$*" >> "$SRUN_LOG"
shift
while [[ $1 == --* ]]; do [[ $1 == --bind ]] && shift; shift; done
shift
exec "$@"
"""


@pytest.mark.parametrize("image", ["nvcr.io/lab/megatron-geno:1", "/images/megatron-geno.sif"])
def test_sbatch_runs_in_the_named_container(tmp_path, image):
    env = slurm_env(tmp_path)
    for name, text in (("srun", LOGGING_SRUN), ("apptainer", APPTAINER)):
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
    env.update(GENO_CONTAINER=image, SRUN_LOG=str(tmp_path / "srun.log"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**TINY, "schedule": {**TINY["schedule"], "train_iters": 3},
                                      "logging": {**TINY["logging"], "run_dir": str(tmp_path / "r")},
                                      "data": {**TINY["data"], "cache_dir": str(tmp_path / "dc")}}))
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm/geno.sbatch"), str(config)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "srun.log").read_text()
    if image.endswith(".sif"):
        assert f"exec --nv --bind {ROOT} {image} {sys.executable} -m torch.distributed.run" in log
    else:
        assert f"--container-image={image} --container-mounts={ROOT}:{ROOT}" in log
    assert len(metrics(tmp_path / "r")) == 3
