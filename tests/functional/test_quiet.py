"""Known third-party warnings are hidden by default and shown with --verbose."""

import os
import re
import subprocess
import sys

WARNING_LINE = re.compile(r"(UserWarning|FutureWarning|DeprecationWarning|WARNING megatron\.core)")


def run(tmp_path, *flags):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "megatron_geno.cli", "--preset", "tiny", "schedule.train_iters=1",
           "data.seq_length=64", "logging.quiet=true", "logging.tensorboard=false",
           f"logging.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if WARNING_LINE.search(line)]


def test_known_warnings_hidden_unless_verbose(tmp_path):
    assert run(tmp_path) == []
    assert run(tmp_path, "--verbose")  # the same run shows them when asked
