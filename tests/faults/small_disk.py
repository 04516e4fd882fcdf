"""Runs commands against a small, real filesystem: a tmpfs of a given size mounted in a private
mount namespace (``unshare --user --map-root-user --mount``, no privileges needed where user
namespaces are enabled). Writes there fail with the kernel's own ENOSPC, as on a full disk.

    unshare -rm python -m tests.faults.small_disk SPEC.json

SPEC: {"mount": DIR, "size": "10m", "steps": [[argv...], ...], "result": PATH}. A step
["resize", "40m"] grows the filesystem (space freed, as a user would). After each step the result
file (outside the mount) records its exit code, stderr and the file tree under DIR (the tmpfs
vanishes with the namespace)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.faults.helpers import tree
from tests.functional.launcher import quiet_env


def available() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs of its own."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def run_steps(spec: dict, timeout: int = 600) -> list[dict]:
    """Runs spec's steps on its small filesystem; returns one record per step."""
    spec_path = Path(spec["result"]).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-m", "tests.faults.small_disk",
                           str(spec_path)], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(spec["result"]).read_text())


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    mount = Path(spec["mount"])
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size']}", "tmpfs", str(mount)],
                   check=True)
    records = []
    for argv in spec["steps"]:
        if argv[0] == "resize":
            proc = subprocess.run(["mount", "-o", f"remount,size={argv[1]}", str(mount)],
                                  capture_output=True, text=True, check=True)
        else:
            proc = subprocess.run(argv, capture_output=True, text=True, env=quiet_env())
        records.append({"returncode": proc.returncode, "stderr": proc.stderr,
                        "tree": tree(mount), "free": shutil.disk_usage(mount).free})
    Path(spec["result"]).write_text(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
