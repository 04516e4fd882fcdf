"""Config values (issue 11, item 6): every numeric field has a checked range; a bad value is one
line naming the key and the range, exit 2, before any model is built."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from megatron_geno.config import CHOICES, RANGES, ConfigError, TrainConfig, load_config
from tests.faults.helpers import error_line, train, tree

ROOT = Path(__file__).resolve().parents[2]

BAD = {
    "data.seq_length=0": "data.seq_length must be >= 2",
    "optimizer.lr=-1": "optimizer.lr must be > 0",
    "optimizer.lr=.nan": "optimizer.lr must be > 0 and finite, got nan",
    "optimizer.lr=.inf": "optimizer.lr must be > 0 and finite, got inf",
    "optimizer.min_lr=0.5": "optimizer.min_lr=0.5 must not exceed optimizer.lr=0.001",
    "data.global_batch_size=0": "data.global_batch_size must be >= 1",
    "data.micro_batch_size=-2": "data.micro_batch_size must be >= 1",
    "schedule.train_iters=-1": "schedule.train_iters must be >= 0",
    "schedule.warmup_iters=-5": "schedule.warmup_iters must be >= 0",
    "schedule.eval_iters=0": "schedule.eval_iters must be >= 1 when schedule.eval_interval=50",
    "optimizer.adam_beta2=1.0": "optimizer.adam_beta2 must be in [0, 1)",
    "optimizer.adam_eps=0": "optimizer.adam_eps must be > 0",
    "optimizer.clip_grad=-1": "optimizer.clip_grad must be >= 0",
    "model.norm_epsilon=0": "model.norm_epsilon must be in (0, 1)",
    "model.moe_router_topk=9": "model.moe_router_topk=9 must not exceed model.num_experts=8",
    "data.reverse_complement_prob=1.5": "data.reverse_complement_prob must be in [0, 1]",
    "logging.log_interval=0": "logging.log_interval must be >= 1",
    "parallel.expert_tensor_parallel=0": "parallel.expert_tensor_parallel must be >= 1",
    "schedule.stop_after=500": "schedule.stop_after=500 must not exceed schedule.train_iters=100",
    "schedule.decay_style=cosin": "schedule.decay_style must be one of",
    "model.attention_backend=flash": "model.attention_backend must be one of",
}


@pytest.mark.parametrize("override", list(BAD))
def test_bad_value_names_key_and_range(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.preset=tiny", override])
    assert BAD[override] in str(err.value)


def test_every_numeric_field_has_a_range():
    """A field added without a range fails here, so no value goes unchecked."""
    cfg = TrainConfig()
    missing = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for field in dataclasses.fields(value):
            default = getattr(value, field.name)
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            nullable_int = default is None and "int" in str(field.type) and "str" not in str(field.type)
            key = f"{section.name}.{field.name}"
            if (numeric or nullable_int) and key not in RANGES:
                missing.append(key)
    assert not missing, missing
    assert "precision" in CHOICES


def test_cli_refuses_before_building_anything(tmp_path):
    """One line, exit 2, and not even the run directory was made."""
    line = error_line(train(tmp_path / "run", "optimizer.lr=-0.1"))
    assert "optimizer.lr must be > 0" in line
    assert not (tmp_path / "run").exists()


def test_launch_refuses_bad_values_before_rendering(tmp_path):
    import sys

    from tests.faults.helpers import run

    proc = run([sys.executable, "-m", "launch.cli", "--recipe", "genos-1.2b-8k", "--dry-run",
                "data.seq_length=0", f"logging.run_dir={tmp_path / 'run'}"])
    assert "data.seq_length must be >= 2" in error_line(proc)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,expected", [
    ("data.seq_length=0", "data.seq_length must be >= 2"),
    # a layout the world (torchrun's WORLD_SIZE, 1 here) cannot run: before any process group
    ("parallel.tensor_parallel=2", "world size 1 is not divisible by TP x PP x CP"),
])
def test_config_errors_come_before_megatron_core_is_imported(override, expected):
    """A bad value or layout is reported without the 5-8 s import of megatron-core."""
    import subprocess
    import sys

    code = ("import sys\nfrom megatron_geno.cli import main\n"
            f"rc = main(['--preset', 'tiny', {override!r}])\n"
            "print(rc, 'megatron.core' in sys.modules, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr[-2000:]
    assert expected in proc.stderr, proc.stderr


BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else '1, 2, 3'}]\n"
               for i in range(8))  # 9^7 leaves from 200 bytes, were aliases expanded


@pytest.mark.parametrize("name,content,expected", [
    ("list.yaml", b"- a\n- b\n", "must be a mapping at the top level"),
    ("latin1.yaml", b"model:\n  preset: \xe9\n", "is not UTF-8 text (byte 17)"),
    ("broken.yaml", b"model:\n  preset: [tiny\n", "is not valid YAML (line 3)"),
    ("bomb.yaml", BOMB.encode(), "YAML aliases (*name) are not accepted"),
    ("directory", None, "Is a directory"),
])
@pytest.mark.parametrize("kind", ["config", "recipe"])
def test_bad_config_and_recipe_files_are_one_line(tmp_path, name, content, expected, kind):
    from launch.recipe import load_recipe

    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path) if kind == "config" else load_recipe(str(path), [])
    assert expected in str(err.value) and str(path) in str(err.value), str(err.value)


def test_an_override_that_is_not_yaml_is_one_line(tmp_path):
    line = error_line(train(tmp_path / "run", "model.num_layers=[2"))
    assert "override 'model.num_layers=[2' is not valid YAML" in line


def test_data_that_cannot_be_read_is_refused_before_megatron_core_is_imported(tmp_path):
    """A corpus that is not there, or a .bin/.idx prefix that is not, is one line in a second."""
    import subprocess
    import sys

    for overrides, expected in [
        (["data.source=zarr", f"data.blend=[{tmp_path / 'nothing'}]"],
         f"data.blend: {tmp_path / 'nothing' / 'manifest.json'} does not exist"),
        (["data.source=megatron", f"data.blend=[{tmp_path / 'prefix'}]"],
         f"data.blend: {tmp_path / 'prefix'}.bin does not exist"),
        ([f"eval.corpora=[{tmp_path / 'nothing'}]", "schedule.eval_interval=5"],
         "eval.corpora:"),
    ]:
        code = ("import sys\nfrom megatron_geno.cli import main\n"
                f"rc = main(['--preset', 'tiny', *{overrides!r}])\n"
                "print(rc, 'megatron.core' in sys.modules, 'torch' in sys.modules)")
        before = tree(tmp_path)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path,  # the default run directory is here
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr[-2000:]
        assert expected in proc.stderr, proc.stderr
        assert tree(tmp_path) == before  # refused before anything is written
