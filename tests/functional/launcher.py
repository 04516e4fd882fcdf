"""Runs geno-train on N local processes (torchrun, gloo on CPU) and reads back its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_geno.distributed import free_port

# Small, fast settings shared by the functional tests (tiny preset, 5 steps, fp32 on CPU).
BASE = [
    "--preset", "tiny",
    "schedule.warmup_iters=1",
    "schedule.eval_interval=0",
    "logging.quiet=true",
    "logging.tensorboard=false",
    "logging.log_interval=1",  # a record per step, to compare step by step
    "data.seq_length=128",
    "data.micro_batch_size=2",
    "data.global_batch_size=8",
]


def quiet_env() -> dict:
    """The environment for child processes: one thread each (2 ranks share 2 cores), no warnings."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def geno_train(run_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 600) -> list[dict]:
    """Runs geno-train under torchrun with nproc processes; returns metrics.jsonl records."""
    return geno_train_logged(run_dir, *overrides, nproc=nproc, timeout=timeout)[0]


def geno_train_logged(run_dir: Path, *overrides: str, nproc: int = 1,
                      timeout: int = 600) -> tuple[list[dict], str]:
    """geno_train, also returning stderr (where the start-up line names the modules that ran)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), "-m", "megatron_geno.cli", *BASE,
        f"logging.run_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'data_cache'}",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=quiet_env())
    if proc.returncode != 0:
        raise AssertionError(
            f"geno-train failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}"
            f"\n{proc.stderr[-6000:]}"
        )
    metrics = run_dir / "metrics.jsonl"
    records = ([json.loads(line) for line in metrics.read_text().splitlines()]
               if metrics.exists() else [])
    return records, proc.stderr


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def assert_close(actual: list[float], expected: list[float], rtol: float) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a - e) <= rtol * abs(e), f"step {step}: {a} vs {e} (rtol {rtol})\n{actual}\n{expected}"


def single_process_command(run_dir: Path, *overrides: str) -> list[str]:
    """The command line of one geno-train process (no torchrun) with the test settings."""
    return [sys.executable, "-m", "megatron_geno.cli", *BASE, f"logging.run_dir={run_dir}",
            f"data.cache_dir={run_dir.parent / 'data_cache'}", *overrides]


def geno_train_error(run_dir: Path, *overrides: str, timeout: int = 300) -> tuple[int, str]:
    """Runs single-process geno-train expecting failure; returns (exit code, stderr)."""
    cmd = single_process_command(run_dir, *overrides)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=quiet_env())
    return proc.returncode, proc.stderr


def geno_convert(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs geno-convert; returns the completed process (the caller checks the exit code)."""
    return subprocess.run([sys.executable, "-m", "checkpoint_tools.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=quiet_env())
