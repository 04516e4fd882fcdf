"""A full disk (issue 22, item 5): a real ENOSPC from a small tmpfs (tests/faults/small_disk.py).
Every writer ends in one line that says "no space left on device", removes its partial output,
keeps everything written before, and works again once space is freed."""

from __future__ import annotations

import numpy as np
import pytest

from tests.faults import small_disk
from tests.faults.helpers import convert, error_line, preprocess, train
from tests.functional.launcher import single_process_command
from tests.genomes import random_bases, write_fasta

pytestmark = [pytest.mark.filterwarnings("ignore"),
              pytest.mark.skipif(not small_disk.available(),
                                 reason="needs unprivileged user and mount namespaces (unshare -rm)")]


class Proc:  # error_line's view of a step's record
    def __init__(self, record: dict) -> None:
        self.returncode, self.stderr = record["returncode"], record["stderr"]


def steps(tmp_path, size: str, *argvs) -> list[dict]:
    return small_disk.run_steps({"mount": str(tmp_path / "small"), "size": size,
                                 "steps": list(argvs), "result": str(tmp_path / "result.json")})


def python(module: str, *args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", module, *args]


def test_a_save_on_a_full_disk_is_one_line_and_the_previous_checkpoint_resumes(tmp_path):
    ck = tmp_path / "small" / "ck"
    common = ["model.preset=tiny", f"checkpoint.save={ck}", "checkpoint.save_interval=2"]
    first, full, _, resumed = steps(
        tmp_path, "10m",  # a tiny checkpoint is 7.3 MB: the first fits, the second does not
        single_process_command(tmp_path / "run", *common, "schedule.train_iters=2"),
        single_process_command(tmp_path / "run", *common, "schedule.train_iters=4",
                               f"checkpoint.load={ck}"),
        ["resize", "40m"],
        single_process_command(tmp_path / "run", *common, "schedule.train_iters=4",
                               f"checkpoint.load={ck}"))
    assert first["returncode"] == 0, first["stderr"][-3000:]
    line = error_line(Proc(full))
    assert "saving iter_0000004" in line and "no space left on device" in line, line
    assert "latest still names iteration 2" in line, line
    assert full["tree"] == first["tree"]  # partial save and lock file gone, iteration 2 as it was
    assert resumed["returncode"] == 0, resumed["stderr"][-3000:]
    assert "resumed from" in resumed["stderr"].lower() or "iter_0000002" in resumed["stderr"]
    assert (resumed["tree"]["ck/latest"] != first["tree"]["ck/latest"]
            and "ck/iter_0000004/checksums.json" in resumed["tree"])


def test_an_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    proc = train(tmp_path / "run", "schedule.train_iters=2", f"checkpoint.save={tmp_path / 'ck'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = tmp_path / "small" / "hf"
    full, _, done = steps(tmp_path, "1m",
                          python("checkpoint_tools.cli", "to-hf", "--checkpoint",
                                 str(tmp_path / "ck"), "--out", str(hf)),
                          ["resize", "20m"],
                          python("checkpoint_tools.cli", "to-hf", "--checkpoint",
                                 str(tmp_path / "ck"), "--out", str(hf)))
    line = error_line(Proc(full))
    assert f"writing {hf} failed: no space left on device" in line, line
    assert full["tree"] == {}  # no partial export, no lock file
    assert done["returncode"] == 0, done["stderr"][-3000:]
    assert "hf/config.json" in done["tree"]


def test_preprocessing_on_a_full_disk_is_one_line_and_a_rerun_finishes(tmp_path):
    rng = np.random.default_rng(0)
    fasta = write_fasta(tmp_path / "big.fa", {"chr1": random_bases(rng, 3_000_000)})
    corpus = tmp_path / "small" / "corpus"
    command = python("data_pipeline.cli", "run", str(fasta), "--out", str(corpus))
    full, _, done = steps(tmp_path, "256k", command, ["resize", "20m"], command)
    line = error_line(Proc(full))
    assert "no space left on device" in line and "big" in line, line
    assert not [p for p in full["tree"] if p.endswith(".tmp") or ".tmp/" in p], full["tree"]
    assert done["returncode"] == 0, done["stderr"][-3000:]
    assert "corpus/manifest.json" in done["tree"]
