import pytest

from megatron_geno.config import ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: genos-1.2b\noptimizer:\n  lr: 2.0e-4\nschedule:\n  train_iters: 50\n")
    cfg = load_config(path, ["optimizer.lr=1e-4", "parallel.tensor_parallel=2"])
    assert cfg.model.hidden_size == 1024 and cfg.model.num_layers == 12
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.schedule.train_iters == 50
    assert cfg.parallel.tensor_parallel == 2


def test_override_of_a_preset_field():
    cfg = load_config(None, ["model.preset=genos-10b", "model.num_layers=2"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 4096


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.hiden_size=3", "unknown config key model.hiden_size"),
        ("nosuch.key=1", "unknown config key nosuch"),
        ("optimizer.lr=abc", "optimizer.lr must be a number"),
        ("schedule.train_iters=1.5", "must be an integer"),
        ("model.preset=genos-3b", "unknown model preset 'genos-3b'"),
        ("parallel.virtual_pipeline=0", "parallel.virtual_pipeline must be >= 1"),
        ("precision=fp16", "precision must be"),
        ("noequals", "key.sub=value"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=genos-1.2b", "data.seq_length=8192"])
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_layout_rules_live_in_the_layout_validator_alone():
    """load_config checks values; whether a layout runs is validate_layout's one answer, which
    lists every rule broken, each with its numbers."""
    from megatron_geno.layout import LayoutError, validate_layout

    cfg = load_config(None, ["parallel.pipeline_parallel=3", "parallel.expert_parallel=3",
                             "data.global_batch_size=7"])
    with pytest.raises(LayoutError) as err:
        validate_layout(cfg, 9)
    message = str(err.value)
    for part in ("2 layers are not divisible by PP = 3", "8 experts are not divisible by EP = 3",
                 "global batch 7 is not divisible by micro batch x DP = 2 x 3 = 6"):
        assert part in message, message
    cfg = load_config(None, ["model.num_layers=4", "parallel.pipeline_parallel=2",
                             "parallel.virtual_pipeline=2"])
    assert validate_layout(cfg, 2) == (1, 1)
    assert cfg.parallel.virtual_pipeline_size() == 2
    assert load_config(None, []).parallel.virtual_pipeline_size() is None


def test_warmup_is_a_fraction_of_the_schedule_unless_given_in_steps():
    from megatron_geno.config import warmup_steps

    assert warmup_steps(load_config(None, ["schedule.train_iters=5"]).schedule) == 0
    assert warmup_steps(load_config(None, ["schedule.train_iters=200"]).schedule) == 10
    cfg = load_config(None, ["schedule.train_iters=200", "schedule.warmup_fraction=0.25"])
    assert warmup_steps(cfg.schedule) == 50
    cfg = load_config(None, ["schedule.train_iters=200", "schedule.warmup_iters=7"])
    assert warmup_steps(cfg.schedule) == 7
    with pytest.raises(ConfigError, match="warmup_iters=10 must be smaller than schedule.train_iters=5"):
        load_config(None, ["schedule.train_iters=5", "schedule.warmup_iters=10"])
    with pytest.raises(ConfigError, match=r"warmup_fraction must be in \[0, 1\)"):
        load_config(None, ["schedule.warmup_fraction=1.5"])
