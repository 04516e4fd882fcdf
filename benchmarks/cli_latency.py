"""How long the quick answers of each tool take, against what importing torch and megatron-core
costs on the same machine in the same run, as a table.

    python benchmarks/cli_latency.py              # median of 3 runs each
    python benchmarks/cli_latency.py --repeat 5

Each command runs as its own process (`python -m MODULE ...`, what the console script runs):
`--help`, `--print-params`, `--print-config`, a config error, `geno-launch --dry-run`, refused
arguments of geno-convert and geno-eval, and `geno-convert inspect` on a one-step tiny
checkpoint made first. The baselines are `python -c pass`, `import torch` and
`import megatron.core` (what every one of these paid before they were made light). The target
(issue 23) is under 2 s each; tests/unit/test_imports.py checks that none of them imports
megatron-core (or torch, but for inspect), which is what the time rests on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 2.0


def timed(cmd: list[str], expect: int, repeat: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        times.append(time.perf_counter() - start)
        if proc.returncode != expect:
            raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}, expected {expect}\n"
                             f"{proc.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (3)")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "ckpt"
        subprocess.run([py, "-m", "megatron_geno.cli", "--preset", "tiny",
                        "schedule.train_iters=1", "schedule.eval_interval=0",
                        "logging.quiet=true", "logging.tensorboard=false",
                        f"logging.run_dir={tmp / 'run'}", f"checkpoint.save={ckpt}"],
                       check=True, cwd=ROOT, capture_output=True)
        baselines = [
            ("python -c pass", [py, "-c", "pass"], 0),
            ("import torch", [py, "-c", "import torch"], 0),
            ("import megatron.core", [py, "-c", "import megatron.core"], 0),
        ]
        commands = [
            ("geno-train --help", [py, "-m", "megatron_geno.cli", "--help"], 0),
            ("geno-train --preset genos-10b --print-params",
             [py, "-m", "megatron_geno.cli", "--preset", "genos-10b", "--print-params"], 0),
            ("geno-train --preset tiny --print-config",
             [py, "-m", "megatron_geno.cli", "--preset", "tiny", "--print-config"], 0),
            ("geno-train schedule.train_iters=lots (refused)",
             [py, "-m", "megatron_geno.cli", "schedule.train_iters=lots"], 2),
            ("geno-launch --recipe genos-1.2b-8k --nodes 16 --dry-run",
             [py, "-m", "launch.cli", "--recipe", "genos-1.2b-8k", "--nodes", "16", "--dry-run",
              f"logging.run_dir={tmp / 'launch'}"], 0),
            ("geno-preprocess --help", [py, "-m", "data_pipeline.cli", "--help"], 0),
            ("geno-convert to-hf --out . (refused)",
             [py, "-m", "checkpoint_tools.cli", "to-hf", "--checkpoint", str(ckpt), "--out", "."],
             2),
            ("geno-eval loss without a model (refused)",
             [py, "-m", "megatron_geno.evaluation.cli", "loss", "--corpus", "x"], 2),
            ("geno-convert inspect (tiny checkpoint)",
             [py, "-m", "checkpoint_tools.cli", "inspect", str(ckpt)], 0),
        ]
        measured = [(name, timed(cmd, rc, args.repeat)) for name, cmd, rc in baselines + commands]
    base = dict(measured)
    mcore = base["import megatron.core"]
    print(f"\nmedian of {args.repeat} runs each, {os.cpu_count()} CPUs, Python "
          f"{sys.version.split()[0]}\n")
    print("| command | seconds | x `import megatron.core` | under 2 s |")
    print("|---|---:|---:|---|")
    baseline_names = {name for name, _, _ in baselines}
    for name, seconds in measured:
        verdict = "" if name in baseline_names else "yes" if seconds < TARGET_S else "**no**"
        print(f"| {name} | {seconds:.2f} | {seconds / mcore:.2f} | {verdict} |")


if __name__ == "__main__":
    main()
