"""What every fault test asserts: the exit code, one clear line naming the culprit, and that
nothing outside the command's own temporary directory changed."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

from tests.functional.launcher import quiet_env, single_process_command

MARKER = "pwned"  # crafted pickles try to create this file


def tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones included) with its content hash; directories too."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def run(args: list[str], cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=quiet_env(),
                          cwd=cwd)


def convert(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "checkpoint_tools.cli", *args], cwd=cwd)


def preprocess(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "data_pipeline.cli", *args], cwd=cwd)


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run(single_process_command(run_dir, *overrides))


def error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """Asserts exit `code`, no traceback, and returns the one 'error:' line of stderr."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


class Evil:
    """Unpickling this runs `touch <directory>/pwned`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __reduce__(self):
        return (os.system, (f"touch {self.directory / MARKER}",))


def evil_pickle(directory: Path) -> bytes:
    return pickle.dumps(Evil(directory))
