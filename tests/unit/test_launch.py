"""geno-launch: every layout rule rejects a bad layout naming the numbers; the recipes pass."""

import dataclasses

import pytest

from launch.cli import main
from launch.plan import (GPU_MEMORY_GIB, RECIPE_DATA_PARALLEL, LayoutError, fits,
                         largest_micro_batch, memory_per_gpu, plan, validate_layout)
from launch.recipe import RECIPE_DIR, load_recipe
from megatron_geno.config import load_config


BASE = ["model.preset=genos-1.2b", "data.seq_length=8192", "data.micro_batch_size=1",
        "data.global_batch_size=1024"]


def layout(overrides: list[str]):
    """A genos-1.2b config with overrides applied without load_config's own checks, so each
    layout rule is reached by validate_layout itself."""
    c = load_config(None, BASE)
    for text in overrides:
        key, value = text.split("=")
        section, field = key.split(".")
        value = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
        setattr(c, section, dataclasses.replace(getattr(c, section), **{field: value}))
    return c


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], 6,
     "world size 6 is not divisible by TP x PP x CP = 2 x 2 x 1 = 4"),
    (["parallel.expert_parallel=8", "parallel.tensor_parallel=2"], 8,
     "EP x expert-TP = 8 x 2 = 16 does not divide TP x CP x DP = 2 x 1 x 4 = 8"),
    (["parallel.expert_parallel=16"], 16, "8 experts are not divisible by EP = 16"),
    (["parallel.tensor_parallel=16"], 16,
     "16 attention heads and 8 query groups must both be divisible by TP = 16"),
    (["parallel.pipeline_parallel=5"], 5, "12 layers are not divisible by PP = 5"),
    (["parallel.virtual_pipeline=2"], 8, "2 virtual pipeline stages need PP > 1"),
    (["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=4"], 8,
     "12 layers are not divisible by PP x virtual stages = 2 x 4 = 8"),
    (["parallel.pipeline_parallel=4", "parallel.virtual_pipeline=3", "data.global_batch_size=6"], 8,
     "need micro-batches per step (3 = global batch 6 / (micro batch 1 x DP 2)) divisible by PP = 4"),
    (["parallel.context_parallel=4", "data.seq_length=8196"], 8,
     "sequence length 8196 is not divisible by 2 x CP (8) = 8"),
    (["parallel.tensor_parallel=2", "parallel.context_parallel=2", "data.seq_length=8196"], 8,
     "sequence length 8196 is not divisible by 2 x CP (4) x TP (2, sequence parallelism) = 8"),
    (["data.global_batch_size=1000"], 16,
     "global batch 1000 is not divisible by micro batch x DP = 1 x 16 = 16 (change the world "
     "size or data.global_batch_size)"),
    (["data.micro_batch_size=8"], 256,
     "global batch 1024 is not divisible by micro batch x DP = 8 x 256 = 2048 "
     "(data.micro_batch_size=4 divides it)"),
    (["parallel.tensor_parallel=2", "parallel.sequence_parallel=false"], 8,
     "MoE with TP = 2 needs parallel.sequence_parallel=true"),
])
def test_each_rule_rejects_a_bad_layout_with_its_numbers(overrides, world, message):
    with pytest.raises(LayoutError) as err:
        validate_layout(layout(overrides), world)
    assert message in str(err.value)


def test_context_parallelism_runs_without_transformer_engine_but_not_with_document_masks():
    """CP is a layout of the local SDPA attention too (megatron_geno.attention); what it cannot
    run is a per-document attention mask, refused naming both settings."""
    for backend in ("auto", "sdpa"):
        c = load_config(None, BASE + ["parallel.context_parallel=2",
                                      f"model.attention_backend={backend}"])
        assert validate_layout(c, 8) == (4, 8)
    c = load_config(None, BASE + ["parallel.context_parallel=2", "data.reset_attention_mask=true"])
    with pytest.raises(LayoutError, match="data.reset_attention_mask .* does not run with CP = 2"):
        validate_layout(c, 8)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_published_layouts_pass_with_the_derived_numbers(recipe):
    c, launch, _ = load_recipe(recipe, [])
    nodes = 64 if "10b" in recipe else 16  # 512 / 128 GPUs: a multiple of every phase's TPxPPxCP
    result = plan(c, nodes * 8, token_budget=launch.token_budget)
    p = c.parallel
    assert result.data_parallel * p.tensor_parallel * p.pipeline_parallel * p.context_parallel \
        == nodes * 8
    assert result.microbatches * result.data_parallel * c.data.micro_batch_size == 1024
    assert result.tokens_per_step == 1024 * c.data.seq_length
    assert c.schedule.train_iters == result.steps
    assert 0.05 * result.steps - 1 <= c.schedule.warmup_iters <= 0.1 * result.steps + 1
    assert c.optimizer.lr == 1e-4 and c.optimizer.min_lr == 1e-5 and c.precision == "bf16"
    if launch.phase > 1:
        assert c.checkpoint.weights_only and c.checkpoint.load.endswith("checkpoints")
        # the long phases save at least 4 times by step and at least every 30 minutes
        assert result.steps // c.checkpoint.save_interval >= 4
        assert 0 < c.checkpoint.save_interval_minutes <= 30 and c.checkpoint.keep_last >= 2
    if "10b" in recipe:
        assert (p.tensor_parallel, p.pipeline_parallel, p.expert_parallel) == (2, 2, 2)
        assert p.context_parallel >= 2
    else:
        assert (p.tensor_parallel, p.pipeline_parallel, p.expert_parallel) == (1, 1, 1)
        assert p.sequence_parallel and p.distributed_optimizer


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_recipe_micro_batch_is_the_largest_the_plan_fits(recipe):
    """Sized at DP 8 for an 80 GiB GPU (the plan's activations are held to the model's saved
    tensors by test_memory_plan); twice it would not fit."""
    c, _, _ = load_recipe(recipe, [])
    p = c.parallel
    world = RECIPE_DATA_PARALLEL * p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    assert largest_micro_batch(c, world) == c.data.micro_batch_size
    result = plan(c, world, token_budget=None)
    assert fits(result.memory, GPU_MEMORY_GIB) and result.largest_micro_batch == \
        c.data.micro_batch_size


def test_cli_names_the_largest_micro_batch_and_warns_when_the_plan_exceeds_the_gpu(
        capsys, tmp_path):
    run_dir = f"logging.run_dir={tmp_path / 'run'}"
    assert main(["--recipe", "genos-1.2b-8k", "--nodes", "1", "--dry-run", run_dir]) == 0
    assert "fits       in 68.0 GiB (80 GiB per GPU less 15% headroom); the largest micro batch " \
        "that fits is 8" in capsys.readouterr().out
    assert main(["--recipe", "genos-1.2b-8k", "--nodes", "1", "--dry-run", "--gpu-memory", "40",
                 run_dir]) == 0
    assert "warning    the estimate exceeds 34.0 GiB (40 GiB per GPU less 15% headroom); the " \
        "largest micro batch that fits is 2" in capsys.readouterr().out
    assert main(["--recipe", "genos-10b-1m", "--nodes", "256", "--dry-run", "--gpu-memory", "8",
                 "--container", "img", run_dir]) == 0
    assert "no micro batch fits" in capsys.readouterr().out
    refused = tmp_path / "refused"
    for bad in ("0", "-80", "nan", "inf"):
        assert main(["--recipe", "genos-1.2b-8k", "--dry-run", "--gpu-memory", bad,
                     f"logging.run_dir={refused}"]) == 2
        assert "--gpu-memory must be > 0 GiB" in capsys.readouterr().err
    assert not refused.exists()  # a refused launch writes nothing


def test_context_parallel_grows_and_later_phases_mix_one_to_one():
    for model in ("genos-1.2b", "genos-10b"):
        phases = [load_recipe(f"{model}-{n}", [])[0] for n in ("8k", "32k", "128k", "1m")]
        cps = [c.parallel.context_parallel for c in phases]
        assert cps == sorted(cps) and cps[-1] > cps[0]
        assert [len(c.data.blend) for c in phases] == [2, 2, 4, 4]
        assert phases[-1].data.blend[0] == phases[-1].data.blend[2]  # 1:1


def test_memory_estimate_shrinks_with_model_parallelism():
    one = load_config(None, ["model.preset=genos-10b", "data.seq_length=8192",
                             "data.micro_batch_size=1", "data.global_batch_size=64"])
    split = load_config(None, ["model.preset=genos-10b", "data.seq_length=8192",
                               "data.micro_batch_size=1", "data.global_batch_size=64",
                               "parallel.tensor_parallel=2", "parallel.expert_parallel=2"])
    a, b = memory_per_gpu(one, 8, 8), memory_per_gpu(split, 4, 4)
    assert b["parameters (bf16)"] < 0.6 * a["parameters (bf16)"]
    assert b["activations (estimate)"] < a["activations (estimate)"]


def test_virtual_stages_pass_and_hold_more_activations_in_flight():
    pp = BASE + ["parallel.pipeline_parallel=4"]
    plain, virtual = load_config(None, pp), load_config(None, pp + ["parallel.virtual_pipeline=3"])
    validate_layout(virtual, 8)
    a, b = memory_per_gpu(plain, 2, 2), memory_per_gpu(virtual, 2, 2)
    # interleaved 1F1B: 1 + (PP - 1) / (PP x V) = 1.25 times the activations of plain 1F1B
    assert b["activations (estimate)"] == pytest.approx(1.25 * a["activations (estimate)"])
    assert b["parameters (bf16)"] == a["parameters (bf16)"]


def test_cli_dry_run_prints_the_plan_and_bad_layouts_exit_2(capsys, tmp_path):
    run_dir = f"logging.run_dir={tmp_path / 'run'}"
    assert main(["--recipe", "genos-10b-8k", "--nodes", "4", "--gpus-per-node", "8",
                 "--dry-run", "--container", "nvcr.io/lab/geno:1", run_dir]) == 0
    out = capsys.readouterr().out
    assert "DP 4 = 32 GPUs" in out and "tokens/step" in out and "GiB per GPU" in out
    assert "every 30 min of wall time" in out and "keeping the last 3" in out
    assert "no gather" in out and "DP rank 0" not in out
    assert "sbatch --nodes=4 --gpus-per-node=8" in out  # several nodes: a SLURM job
    assert "--export=ALL,PYTHON=python3,GENO_CONTAINER=nvcr.io/lab/geno:1" in out
    written = sorted(p.name for p in (tmp_path / "run" / "launch").iterdir())
    # CP = 2 without the image (no Transformer Engine here): the local attention runs CP
    assert main(["--recipe", "genos-10b-8k", "--nodes", "4", "--gpus-per-node", "8",
                 "--dry-run", f"logging.run_dir={tmp_path / 'no_te'}"]) == 0
    assert "CP 2 x DP 4 = 32 GPUs" in capsys.readouterr().out
    other = f"logging.run_dir={tmp_path / 'refused'}"
    assert main(["--recipe", "genos-10b-8k", "--nodes", "1", "--gpus-per-node", "4",
                 "--dry-run", "--slurm", "--container", "x", other]) == 2
    assert written == ["genos-10b-8k.yaml"] and not (tmp_path / "refused").exists()
    assert "world size 4 is not divisible by TP x PP x CP = 2 x 2 x 2 = 8" in capsys.readouterr().err
    assert main(["--recipe", "nope", "--dry-run"]) == 2
    assert "genos-1.2b-8k" in capsys.readouterr().err


def test_dry_run_writes_the_config_and_prints_the_real_command(capsys, tmp_path):
    """What a dry run prints is what the real run executes, and the config it names exists."""
    import shlex
    import sys

    assert main(["--recipe", "genos-1.2b-8k", "--nodes", "16", "--gpus-per-node", "8",
                 "--dry-run", f"logging.run_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    command = shlex.split(next(line for line in out.splitlines()
                               if line.startswith("command"))[len("command"):])
    config = tmp_path / "launch" / "genos-1.2b-8k.yaml"
    assert command[0] == "sbatch" and command[-1] == str(config) and config.exists()
    assert f"--export=ALL,PYTHON={sys.executable}" in command
    assert load_config(config).data.seq_length == 8192
    assert main(["--recipe", "genos-1.2b-8k", "--nodes", "2", "--torchrun", "--dry-run",
                 f"logging.run_dir={tmp_path / 'refused'}"]) == 2
    assert "drop --torchrun" in capsys.readouterr().err
    assert main(["--recipe", "genos-1.2b-8k", "--nodes", "1", "--container", "img", "--dry-run",
                 f"logging.run_dir={tmp_path / 'refused'}"]) == 2
    assert "--container is for SLURM jobs" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()  # a refused launch writes nothing


def test_recipe_warmup_follows_an_overridden_schedule():
    """A recipe's warmup fraction applies to the steps that will run, budget or override."""
    cfg, _, _ = load_recipe("genos-1.2b-8k", ["schedule.train_iters=10"])
    assert cfg.schedule.train_iters == 10 and cfg.schedule.warmup_iters == 1
    cfg, launch, _ = load_recipe("genos-1.2b-8k", [])
    assert cfg.schedule.warmup_iters == round(launch.warmup_fraction * cfg.schedule.train_iters)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_every_recipe_dry_runs_on_its_nodes_without_transformer_engine(recipe, capsys, tmp_path):
    """The SLURM dry run of each shipped recipe at DP 8 validates and fits with no
    Transformer Engine where geno-launch runs (this machine) and no --container: context
    parallelism runs on the local attention (e.g. genos-1.2b-1m on 32 nodes x 8 GPUs)."""
    import importlib.util

    assert importlib.util.find_spec("transformer_engine") is None  # what the test is about
    c, _, _ = load_recipe(recipe, [])
    p = c.parallel
    world = RECIPE_DATA_PARALLEL * p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    assert main(["--recipe", recipe, "--nodes", str(world // 8), "--gpus-per-node", "8",
                 "--slurm", "--dry-run", f"logging.run_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert f"CP {p.context_parallel} x DP 8 = {world} GPUs" in out and "\nfits       in" in out
    if p.context_parallel > 1:
        assert "context-parallel K/V gather (one layer)" in out


def test_document_masks_with_context_parallelism_are_refused_writing_nothing(capsys, tmp_path):
    refused = tmp_path / "refused"
    assert main(["--recipe", "genos-1.2b-32k", "--nodes", "2", "--dry-run",
                 "data.reset_attention_mask=true", f"logging.run_dir={refused}"]) == 2
    err = capsys.readouterr().err
    assert "data.reset_attention_mask (no attention across documents) does not run with CP = 2" \
        in err and len(err.strip().splitlines()) == 1
    assert not refused.exists()


def test_a_job_without_sbatch_is_one_line_and_dry_runs_keep_an_earlier_config(capsys, tmp_path,
                                                                              monkeypatch):
    """A real SLURM launch where sbatch is not on PATH: one line, exit 2, nothing written; a dry
    run with other settings leaves the config an earlier launch of the run directory ran with."""
    run_dir = f"logging.run_dir={tmp_path / 'run'}"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["--recipe", "genos-1.2b-8k", "--nodes", "2", run_dir]) == 2
    assert "geno-launch: error: sbatch is not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["--recipe", "genos-1.2b-8k", "--nodes", "2", "--dry-run", run_dir]) == 0
    saved = tmp_path / "run" / "launch" / "genos-1.2b-8k.yaml"
    first = saved.read_text()
    assert main(["--recipe", "genos-1.2b-8k", "--nodes", "2", "--dry-run", run_dir,
                 "optimizer.lr=0.0002"]) == 0
    assert saved.read_text() == first
    other = saved.with_name("genos-1.2b-8k.dry-run.yaml")
    assert "lr: 0.0002" in other.read_text() and str(other) in capsys.readouterr().out
