"""The GPU suite's scripts parse, and the wheelhouse leaves out what a CUDA node already has."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scripts_parse():
    for name in ("gpu_suite.sh", "make_wheelhouse.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / name)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_wheelhouse_skips_torch_and_cuda_but_keeps_megatron_core():
    text = (ROOT / "benchmarks" / "make_wheelhouse.sh").read_text()
    pattern = re.search(r'skip = re.compile\((r".*?")\s*\n\s*(r".*?")\)', text, re.S)
    skip = re.compile(eval(pattern.group(1)) + eval(pattern.group(2)))  # noqa: S307 - our file
    for name in ("torch", "triton", "nvidia-cublas-cu12", "sympy", "megatron-geno"):
        assert skip.match(name), name
    for name in ("megatron-core", "zarr", "numcodecs", "google-crc32c", "isal", "pyyaml"):
        assert not skip.match(name), name
