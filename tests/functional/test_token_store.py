"""The token store end to end: kill-and-rerun byte identity, and geno-train on preprocessed corpora."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.functional.launcher import assert_close, geno_train, geno_train_error, losses, quiet_env
from tests.genomes import genome, write_fasta
from tests.unit.test_preprocess import manifest, run_cli, tree_bytes


def preprocess_command(m: Path, out: Path) -> list[str]:
    # 1 KiB reads make each assembly take long enough to be killed in the middle of it
    return [sys.executable, "-m", "data_pipeline.cli", "run", "--manifest", str(m), "--out",
            str(out), "--read-chunk", "1K", "--holdout-contigs", "valid=chr20"]


def test_killed_run_resumes_to_identical_bytes(tmp_path):
    rows = []
    for i in range(3):
        path = write_fasta(tmp_path / f"g{i}.fa.gz", genome(i, {"chr1": 1_500_000, "chr20": 300_000}),
                           compression="gzip")
        rows.append({"assembly": f"g{i}", "sample": f"s{i}", "path": path.name})
    m = manifest(tmp_path, rows)
    assert run_cli("run", "--manifest", m, "--out", tmp_path / "straight",
                   "--holdout-contigs", "valid=chr20") == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(preprocess_command(m, killed), env=quiet_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards, deadline = killed / "shards", time.time() + 120
    while time.time() < deadline:  # kill once one assembly is done and the next is half written
        done = [p for p in shards.glob("g*")] if shards.exists() else []
        partial = list(shards.glob(".*.tmp/part-00000/tokens")) if shards.exists() else []
        if done and partial:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert list(shards.glob(".*.tmp")), "no half-written assembly at the kill"
    assert not (killed / "manifest.json").exists()

    rerun = subprocess.run(preprocess_command(m, killed), env=quiet_env(), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stderr and "0 already done" not in rerun.stderr
    assert tree_bytes(killed) == tree_bytes(tmp_path / "straight")


def test_tiny_trains_on_a_blend_of_two_preprocessed_corpora(tmp_path):
    corpora = []
    for name, seed in (("human", 1), ("primate", 2)):
        paths = [write_fasta(tmp_path / f"{name}{h}.fa", genome(seed * 10 + h, {
            "chr1": 20_000, "chr2": 10_000, "chr20": 4_000})) for h in (1, 2)]
        assert run_cli("run", *paths, "--out", tmp_path / name, "--holdout-contigs",
                       "valid=chr20") == 0
        corpora.append(tmp_path / name)
    blend = ["data.source=zarr", f"data.blend=[1, '{corpora[0]}', 1, '{corpora[1]}']",
             "data.reverse_complement_prob=0.5", "schedule.train_iters=2",
             "schedule.eval_interval=2"]
    records = geno_train(tmp_path / "run", *blend, nproc=2)
    single = geno_train(tmp_path / "single", *blend)
    assert [r["step"] for r in records] == [1, 2]
    # 2 data-parallel ranks read exactly the samples one process reads (blend, splits, RC)
    assert_close(losses(records), losses(single), rtol=1e-5)
    assert records[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)


def test_unfinished_corpus_is_one_clear_error(tmp_path):
    path = write_fasta(tmp_path / "a.fa", genome(0, {"chr1": 5000}))
    assert run_cli("run", path, "--out", tmp_path / "c", "--no-finalize") == 0
    code, err = geno_train_error(tmp_path / "run", "data.source=zarr",
                                 f"data.blend=['{tmp_path / 'c'}']")
    assert code == 2 and "manifest.json does not exist" in err


def test_a_corpus_trains_only_under_its_own_soft_mask_policy(tmp_path):
    """A corpus made with --soft-mask keep holds ids 10-14 for soft-masked bases: the default
    tokenizer (upper) is refused naming the corpus and both policies; geno:keep trains."""
    path = write_fasta(tmp_path / "a.fa", {"chr1": genome(0, {"chr1": 20_000})["chr1"].lower()})
    assert run_cli("run", path, "--out", tmp_path / "c", "--soft-mask", "keep") == 0
    data = ["data.source=zarr", f"data.blend=['{tmp_path / 'c'}']", "schedule.eval_interval=0",
            "schedule.warmup_iters=0"]
    from tests.faults.helpers import tree

    before = tree(tmp_path / "c")
    code, err = geno_train_error(tmp_path / "run", *data, "schedule.train_iters=1")
    assert tree(tmp_path / "c") == before
    line = next(line for line in err.splitlines() if "error:" in line)
    assert code == 2 and str(tmp_path / "c") in line and "--soft-mask keep" in line, err[-2000:]
    assert "data.tokenizer=geno:keep" in line
    records = geno_train(tmp_path / "keep", *data, "schedule.train_iters=1",
                         "data.tokenizer=geno:keep")
    assert [r["step"] for r in records] == [1]


def test_a_corpus_trains_the_same_wherever_it_lies(tmp_path):
    """Reverse-complement augmentation is keyed by the corpus's content hash, not its path: a
    copy elsewhere gives the same losses (it did not: 1.4637 vs 1.4747 at step 25), and so does
    the same FASTA preprocessed from another directory (its content hash named the source's path:
    the example's table changed with the clone's location)."""
    import shutil

    path = write_fasta(tmp_path / "a.fa", genome(3, {"chr1": 30_000, "chr20": 4_000}))
    assert run_cli("run", path, "--out", tmp_path / "here") == 0
    shutil.copytree(tmp_path / "here", tmp_path / "elsewhere" / "copy")
    moved = tmp_path / "other" / "place" / "a.fa"
    moved.parent.mkdir(parents=True)
    shutil.copyfile(path, moved)
    assert run_cli("run", moved, "--out", tmp_path / "remade") == 0
    corpora = (tmp_path / "here", tmp_path / "elsewhere" / "copy", tmp_path / "remade")
    hashes = {json.loads((c / "manifest.json").read_text())["content_hash"] for c in corpora}
    assert len(hashes) == 1, hashes
    runs = [losses(geno_train(tmp_path / f"run{i}", "data.source=zarr",
                              f"data.blend=['{corpus}']", "data.reverse_complement_prob=0.5",
                              "schedule.train_iters=3", "schedule.eval_interval=0"))
            for i, corpus in enumerate(corpora)]
    assert runs[0] == runs[1] == runs[2]
