"""Training time around checkpoint saves, synchronous vs asynchronous (checkpoint.async_save), CPU.

    python benchmarks/checkpoint_save.py                   # tiny preset widened, 12 steps
    python benchmarks/checkpoint_save.py --steps 20 --save-interval 5 model.hidden_size=256

Runs geno-train twice in one process each (gloo, CPU), the same steps with a save every
--save-interval steps, once with synchronous saves and once with asynchronous ones, and prints
per mode: the run's wall time (from its summary line: set-up excluded, saves included), the
mean step time, and the mean time of the steps that follow a save (an asynchronous save's writer
runs beside them). Every save is published (`latest`) in both modes before the run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDER = ["model.hidden_size=256", "model.moe_ffn_hidden_size=512", "model.num_layers=4"]


def run(tmp: Path, mode: str, steps: int, interval: int, extra: list[str]) -> dict:
    run_dir, ck = tmp / f"run_{mode}", tmp / f"ck_{mode}"
    cmd = [sys.executable, "-m", "megatron_geno.cli", "--preset", "tiny", *WIDER, *extra,
           f"schedule.train_iters={steps}", "schedule.warmup_iters=1", "schedule.eval_interval=0",
           "logging.log_interval=1", "logging.tensorboard=false", f"logging.run_dir={run_dir}",
           f"data.cache_dir={tmp / 'cache'}", f"checkpoint.save={ck}",
           f"checkpoint.save_interval={interval}", f"checkpoint.async_save={mode == 'async'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"geno-train failed:\n{proc.stderr[-3000:]}")
    wall = float(re.search(r"tokens in ([0-9.]+) s", proc.stdout).group(1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = {r["step"]: tokens_per_step(extra) / r["tokens_per_s"] for r in records}
    after = [per_step[s] for s in per_step if s > 1 and (s - 1) % interval == 0]
    return {"wall": wall, "step": sum(per_step.values()) / len(per_step),
            "after": sum(after) / len(after) if after else float("nan"),
            "saves": len(list(ck.glob("iter_*"))), "latest": (ck / "latest").read_text().strip()}


def tokens_per_step(extra: list[str]) -> int:
    values = {"data.global_batch_size": 8, "data.seq_length": 128}  # the tiny preset's
    for item in extra:
        key, _, value = item.partition("=")
        if key in values:
            values[key] = int(value)
    return values["data.global_batch_size"] * values["data.seq_length"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-interval", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="more geno-train overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {mode: run(Path(tmp), mode, args.steps, args.save_interval, args.overrides)
                for mode in ("sync", "async")}
    print(f"\n{args.steps} steps, a save every {args.save_interval}, tiny preset widened "
          f"({' '.join(WIDER + args.overrides)}), 1 process, CPU")
    print("\n| saves | run wall time (s) | mean step (s) | mean step right after a save (s) | "
          "checkpoints, latest |")
    print("|---|---:|---:|---:|---|")
    for mode, row in rows.items():
        print(f"| {mode} | {row['wall']:.1f} | {row['step']:.3f} | {row['after']:.3f} | "
              f"{row['saves']}, {row['latest']} |")
    print(f"\nasync / sync wall time: {rows['async']['wall'] / rows['sync']['wall']:.2f}")


if __name__ == "__main__":
    main()
