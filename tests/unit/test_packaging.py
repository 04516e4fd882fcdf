"""The docker image installs what setup.py pins; the console scripts and recipes ship; every tool
takes --verbose before or after its subcommand."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def setup_requirements() -> dict[str, str]:
    """Returns {name: requirement} from setup.py's install_requires and the hf/test/eval extras."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}

    def strings(node):
        return [constants[e.id] if isinstance(e, ast.Name) else e.value for e in node.elts]

    reqs = strings(kw["install_requires"])
    extras = {k.value: v for k, v in zip(kw["extras_require"].keys, kw["extras_require"].values)}
    reqs += strings(extras["hf"]) + strings(extras["test"]) + strings(extras["eval"])
    return {re.split(r"[<>=!\[]", r)[0].lower(): r for r in reqs}


def test_dockerfile_pins_agree_with_setup_py():
    docker = (ROOT / "docker" / "Dockerfile").read_text()
    installed = {re.split(r"[<>=!\[]", r)[0].lower(): r
                 for r in re.findall(r'"([A-Za-z0-9_.\-]+(?:[<>=!]=?[^"]*)?)"', docker)}
    for name, requirement in setup_requirements().items():
        if name == "torch":  # the base image's CUDA build is kept on purpose
            continue
        assert name in installed, f"docker/Dockerfile does not install {requirement}"
        assert installed[name] == requirement, (
            f"docker/Dockerfile installs {installed[name]!r}, setup.py pins {requirement!r}")
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", docker, re.M)


def test_every_console_script_and_recipe_is_packaged():
    setup = (ROOT / "setup.py").read_text()
    for script, module in (("geno-preprocess", "data_pipeline.cli"), ("geno-train", "megatron_geno.cli"),
                           ("geno-convert", "checkpoint_tools.cli"), ("geno-launch", "launch.cli"),
                           ("geno-eval", "megatron_geno.evaluation.cli")):
        assert f'"{script}={module}:main"' in setup
        assert (ROOT / (module.replace(".", "/") + ".py")).exists()
    assert '"recipes/*.yaml", "torchrun.sh", "slurm/*.sbatch"' in setup
    assert len(list((ROOT / "launch" / "recipes").glob("genos-*.yaml"))) == 8


def test_the_token_store_imports_no_training_code():
    """data_pipeline (writer and reader) uses only megatron_geno's leaf modules (vocabulary, file
    publication, sizes, warnings, child lifetime), so megatron_geno.data imports it at the top
    with no cycle; megatron-core and torch stay out of preprocessing."""
    import subprocess
    import sys

    code = ("import sys, data_pipeline.cli, data_pipeline.pipeline, data_pipeline.corpus, "
            "data_pipeline.verify, data_pipeline.export; "
            "print(sorted(m for m in sys.modules if m.startswith(('megatron', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    loaded = set(ast.literal_eval(out.strip()))
    leaves = {"megatron_geno", "megatron_geno.vocab", "megatron_geno.files",
              "megatron_geno.units", "megatron_geno.quiet", "megatron_geno.lifetime"}
    assert loaded <= leaves, loaded - leaves
    text = (ROOT / "megatron_geno" / "data.py").read_text()
    assert "from data_pipeline.corpus import CorpusSplit\n" in text  # at the top, not lazily


@pytest.mark.parametrize("module,before", [
    ("data_pipeline.cli", ["stats", "c"]),
    ("checkpoint_tools.cli", ["inspect", "c"]),
    ("megatron_geno.evaluation.cli", ["loss", "--hf", "h", "--corpus", "c"]),
])
def test_verbose_is_taken_before_and_after_the_subcommand(module, before):
    import importlib

    parse = importlib.import_module(module).parse_args
    assert parse(["--verbose", *before]).verbose is True
    assert parse([*before, "--verbose"]).verbose is True
    assert parse(before).verbose is False
