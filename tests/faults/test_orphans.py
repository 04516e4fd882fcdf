"""Children die with their parent (issue 11, item 5): a SIGKILLed geno-train leaves neither the
checkpoint writer's processes nor multiprocessing's manager running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.functional.launcher import quiet_env, single_process_command

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the parent-death signal is Linux's")


def test_sigkill_leaves_no_helper_process(tmp_path):
    run, ck = tmp_path / "run", tmp_path / "ck"
    cmd = single_process_command(run, "schedule.train_iters=100000", "checkpoint.save_interval=1",
                                 f"checkpoint.save={ck}")
    proc = subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    children: list[psutil.Process] = []
    deadline = time.time() + 240
    try:
        # checkpoints are saved every step: wait until the save machinery has started helpers
        while time.time() < deadline and not (ck / "latest").exists():
            assert proc.poll() is None
            time.sleep(0.2)
        while time.time() < deadline and len(children) < 2:
            children = parent.children(recursive=True)
            time.sleep(0.2)
        assert children, "geno-train started no helper process to test with"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=20)
    leftover = [(p.pid, " ".join(p.cmdline()[-2:])) for p in alive]
    for p in alive:  # do not leave them to the next test either
        p.kill()
    assert not leftover, leftover
