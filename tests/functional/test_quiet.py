"""Known third-party warnings are hidden by default and shown with --verbose."""

import os
import re
import subprocess
import sys

from megatron_geno.distributed import free_port

WARNING_LINE = re.compile(r"(UserWarning|FutureWarning|DeprecationWarning|WARNING megatron\.core)")


def loud_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONWARNINGS", "CUDA_DEVICE_MAX_CONNECTIONS")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def warnings_of(cmd: list) -> list[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=loud_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if WARNING_LINE.search(line)]


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port())]


def run(tmp_path, *flags, nproc: int = 1):
    launcher = torchrun(nproc) if nproc > 1 else [sys.executable]
    return warnings_of([*launcher, "-m", "megatron_geno.cli", "--preset", "tiny",
                        "schedule.train_iters=1", "data.seq_length=64", "logging.quiet=true",
                        "logging.tensorboard=false", f"logging.run_dir={tmp_path / 'run'}",
                        f"data.cache_dir={tmp_path / 'cache'}", *flags])


def test_known_warnings_hidden_unless_verbose(tmp_path):
    assert run(tmp_path) == []
    assert run(tmp_path, "--verbose")  # the same run shows them when asked


def test_tensor_parallel_training_and_eval_on_cpu_are_quiet(tmp_path):
    """megatron-core's CUDA_DEVICE_MAX_CONNECTIONS advice is for the backward pass on CUDA: a
    TP=2 run with sequence parallelism on CPU, and geno-eval (forward only) under torchrun, do
    not print it unless --verbose."""
    ckpt = tmp_path / "ckpt"
    assert run(tmp_path, "parallel.tensor_parallel=2", f"checkpoint.save={ckpt}",
               "schedule.eval_interval=0", nproc=2) == []
    fasta = tmp_path / "s.fa"
    fasta.write_text(">s1\nACGTACGTACGTAAACCCGGGTTTACGT\n")
    embed = [*torchrun(2), "-m", "megatron_geno.evaluation.cli", "embed", "--checkpoint", ckpt,
             "--tensor-parallel", "2", "--fasta", fasta, "--window", "64"]
    assert warnings_of([*map(str, embed), "--out", str(tmp_path / "a.npy")]) == []
    loud = warnings_of([*map(str, embed), "--out", str(tmp_path / "b.npy"), "--verbose"])
    assert any("CUDA_DEVICE_MAX_CONNECTIONS" in line for line in loud), loud
