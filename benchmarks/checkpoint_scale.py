"""Checkpoints at scale, measured from outside the processes (CPU, gloo, torchrun).

    python benchmarks/checkpoint_scale.py                       # ~110M parameters, DP4 and TP2xDP2
    python benchmarks/checkpoint_scale.py --layers 2 --ref 8bb3c10   # also the code of a commit

For each layout, 4 processes train one step and save (checkpoint.save), then a second run resumes
from it and trains one more step; a third, fresh run with no checkpoint gives the read baseline.
While they run, a sampler reads every rank's /proc/PID/status (VmRSS) and /proc/PID/io (rchar)
every 10 ms. Per rank it prints:

- extra host memory during the save: the peak RSS while ``iter_N.tmp`` exists less the RSS just
  before it appeared, against the rank's own share of the checkpoint (total bytes / world);
- bytes written: the sizes of the files it wrote (``__RANK_*.distcp``), against total / world;
- bytes read at resume: its rchar less the fresh run's (same steps, no checkpoint);
- write time (the first file of ``iter_N.tmp`` -> the last data file or ``.metadata``), seal time
  (-> ``checksums.json`` written) and publish time (-> ``latest``: config.yaml, fsync of the tree,
  the rename), from the files' modification times.

``--ref COMMIT`` runs the same with the code of COMMIT (a git worktree, the same virtualenv), the
"before" of a change; the ratios are the goal of issue 29 (extra memory within 1.3x of the own
share, written and read within 1.5x of total / world, seal at most 5% of the write).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"DP4": [], "TP2xDP2": ["parallel.tensor_parallel=2"]}


def _ranks(root_pid: int) -> dict[int, int]:
    """{rank: pid} of geno-train processes under root_pid (RANK from their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if b"megatron_geno.cli" not in cmd or b"torch.distributed.run" in cmd:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e for e in env if e.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0][5:])] = int(entry.name)
    return found


def _sample(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    rchar = int(re.search(r"rchar: (\d+)", Path(f"/proc/{pid}/io").read_text()).group(1))
    return rss, rchar


def run(cwd: Path, overrides: list[str], ck: Path | None) -> dict:
    """Runs geno-train on 4 processes; returns per rank: rss before/peak during the save window,
    the last rchar."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "-m", "megatron_geno.cli", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    per_rank: dict[int, dict] = {}
    done = threading.Event()

    def sampler():
        pids: dict[int, int] = {}
        while not done.is_set():
            if len(pids) < 4:
                pids = _ranks(proc.pid)
            saving = ck is not None and ck.exists() and any(ck.glob("iter_*.tmp"))
            for rank, pid in pids.items():
                try:
                    rss, rchar = _sample(pid)
                except (OSError, AttributeError):
                    continue
                r = per_rank.setdefault(rank, {"before": 0, "peak": 0, "rchar": 0})
                r["rchar"] = rchar
                if saving:
                    r["peak"] = max(r["peak"], rss)
                elif r["peak"] == 0:
                    r["before"] = rss
            time.sleep(0.01)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"geno-train failed ({' '.join(cmd)}):\n{err[-4000:]}")
    return per_rank


def measure(cwd: Path, tmp: Path, name: str, model: list[str]) -> list[dict]:
    base = ["--preset", "tiny", *model, *LAYOUTS[name], "data.seq_length=128",
            "data.micro_batch_size=1", "data.global_batch_size=4", "schedule.warmup_iters=0",
            "schedule.eval_interval=0", "logging.quiet=true", "logging.tensorboard=false",
            f"data.cache_dir={tmp / 'cache'}"]
    ck = tmp / f"ck_{name}"
    saved = run(cwd, [*base, "schedule.train_iters=1", f"logging.run_dir={tmp / 'a'}",
                      f"checkpoint.save={ck}"], ck)
    resumed = run(cwd, [*base, "schedule.train_iters=2", f"logging.run_dir={tmp / 'b'}",
                        f"checkpoint.load={ck}"], None)
    fresh = run(cwd, [*base, "schedule.train_iters=1", f"logging.run_dir={tmp / 'c'}"], None)
    it = ck / "iter_0000001"
    files = list(it.glob("__*_*.distcp"))
    total = sum(f.stat().st_size for f in files)
    first = min(f.stat().st_mtime for f in it.iterdir())
    written_at = max(f.stat().st_mtime for f in [*files, it / ".metadata"])
    seal = (it / "checksums.json").stat().st_mtime - written_at  # the checksums' part
    publish = (ck / "latest").stat().st_mtime - (it / "checksums.json").stat().st_mtime
    rows = []
    for rank in range(4):
        written = sum(f.stat().st_size for f in it.glob(f"__{rank}_*.distcp"))
        share = total / 4
        extra = saved[rank]["peak"] - saved[rank]["before"]
        read = resumed[rank]["rchar"] - fresh[rank]["rchar"]
        rows.append({"rank": rank, "share": share, "extra": extra, "written": written,
                     "read": read, "write_s": written_at - first, "seal_s": seal,
                     "publish_s": publish})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--layouts", default="DP4,TP2xDP2")
    parser.add_argument("--ref", help="also measure the code of this commit (the 'before')")
    args = parser.parse_args()
    model = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
             f"model.moe_ffn_hidden_size={args.ffn}"]
    codes = [("this tree", ROOT)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.ref:
            worktree = tmp / "ref"
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.ref],
                           cwd=ROOT, check=True, capture_output=True)
            codes.insert(0, (args.ref, worktree))
        try:
            print("| code | layout | rank | own share MiB | extra RSS in save MiB (x share) | "
                  "written MiB (x total/world) | read at resume MiB (x total/world) | "
                  "write s | seal s (% of write) | publish s |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for label, cwd in codes:
                for name in args.layouts.split(","):
                    for r in measure(cwd, tmp / f"{label[:8]}_{name}", name, model):
                        mib, share = 2**20, r["share"]
                        print(f"| {label} | {name} | {r['rank']} | {share / mib:.1f} | "
                              f"{r['extra'] / mib:.1f} ({r['extra'] / share:.2f}) | "
                              f"{r['written'] / mib:.1f} ({r['written'] / share:.2f}) | "
                              f"{r['read'] / mib:.1f} ({r['read'] / share:.2f}) | "
                              f"{r['write_s']:.2f} | {r['seal_s']:.2f} "
                              f"({100 * r['seal_s'] / max(r['write_s'], 1e-9):.0f}%) | "
                              f"{r['publish_s']:.2f} |",
                              flush=True)
        finally:
            if args.ref:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "ref")],
                               cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()
