"""The import graph (issue 21, item 4): no circles among the project's modules, and the light
entry points stay light. A new circle, or a module that pulls torch or megatron-core into
preprocessing or geno-launch, fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["megatron_geno", "data_pipeline", "checkpoint_tools", "launch"]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (function bodies too)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others():
    assert circles(import_graph()) == []


def test_the_circle_check_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_preprocessing_conversion_cli_and_launch_import_neither_torch_nor_megatron_core():
    code = ("import sys\nimport data_pipeline.cli, data_pipeline.pipeline, data_pipeline.corpus\n"
            "import launch.cli, launch.plan, launch.recipe, checkpoint_tools.cli\n"
            "import megatron_geno.cli, megatron_geno.config, megatron_geno.runtime\n"
            "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_importing_the_package_does_nothing_else():
    """megatron_geno/__init__ imports no module and changes no process state: the leaf modules
    preprocessing uses (vocab, files, units) come without the rest; only the command-line entry
    modules tie spawn children to their parent (megatron_geno.lifetime)."""
    code = ("import sys\nimport megatron_geno\n"
            "print(sorted(m for m in sys.modules if m.startswith('megatron_geno.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_quick_answers_import_neither_torch_nor_megatron_core(tmp_path):
    """--help, --print-params, --print-config, a geno-launch dry run and refused arguments of
    geno-convert and geno-eval (a missing checkpoint or export among them) answer without the
    seconds torch and megatron-core take (benchmarks/cli_latency.py times them)."""
    cases = [
        ("megatron_geno.cli", ["--preset", "genos-10b", "--print-params"], 0),
        ("megatron_geno.cli", ["--preset", "tiny", "--print-config"], 0),
        ("launch.cli", ["--recipe", "genos-1.2b-8k", "--nodes", "16", "--dry-run",
                        f"logging.run_dir={tmp_path}"], 0),
        ("checkpoint_tools.cli", ["to-hf", "--checkpoint", "x", "--out", "."], 2),
        ("checkpoint_tools.cli", ["to-hf", "--checkpoint", str(tmp_path / "none"), "--out",
                                  str(tmp_path / "hf")], 2),
        ("checkpoint_tools.cli", ["from-hf", "--hf", str(tmp_path / "none"), "--out",
                                  str(tmp_path / "mc")], 2),
        ("checkpoint_tools.cli", ["verify", "--checkpoint", str(tmp_path), "--hf",
                                  str(tmp_path / "none")], 2),
        ("checkpoint_tools.cli", ["inspect", str(tmp_path / "none")], 2),
        ("megatron_geno.evaluation.cli", ["loss", "--corpus", "x"], 2),
        ("megatron_geno.evaluation.cli", ["loss", "--checkpoint", str(tmp_path / "none"),
                                          "--corpus", "x"], 2),
        ("megatron_geno.evaluation.cli", ["loss", "--hf", str(tmp_path), "--corpus", "x"], 2),
    ]
    for module, args, code in cases:
        script = ("import sys, importlib\n"
                  f"rc = importlib.import_module({module!r}).main({args!r})\n"
                  "print(rc, 'torch' in sys.modules, 'megatron.core' in sys.modules)")
        proc = subprocess.run([sys.executable, "-c", script],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.stdout.split()[-3:] == [str(code), "False", "False"], (
            module, args, proc.stdout[-500:], proc.stderr[-1500:])
