"""logging.wandb: every logged scalar reaches a Weights & Biases run (offline: no network)."""

from megatron_geno.metrics import MetricsWriter


def test_metrics_reach_an_offline_wandb_run(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False, wandb_mode="offline",
                           wandb_project="megatron-geno-test", config={"model": {"preset": "tiny"}})
    run = writer._wandb
    writer.write({"step": 1, "loss": 2.5, "lr": 1e-3, "expert_load": {"1": [0.25, 0.75]}})
    writer.write({"step": 2, "loss": 2.25, "lr": 9e-4, "expert_load": {"1": [0.5, 0.5]}})
    assert run.summary["loss"] == 2.25 and run.summary["lr"] == 9e-4
    assert run.summary["expert_load/layer1/expert1"] == 0.5
    assert run.config["model"] == {"preset": "tiny"}
    writer.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_wandb_mode_is_checked():
    import pytest

    from megatron_geno.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="logging.wandb must be one of off, offline, online"):
        load_config(None, ["logging.wandb=yes"])


def test_a_quiet_run_prints_no_wandb_banner(tmp_path, capfd):
    for quiet in (False, True):
        writer = MetricsWriter(tmp_path / str(quiet), tensorboard=False, wandb_mode="offline",
                               wandb_project="megatron-geno-test", quiet=quiet)
        writer.write({"step": 1, "loss": 2.5})
        writer.close()
        out = capfd.readouterr()
        said = "wandb" in (out.out + out.err).lower()
        assert said != quiet, (quiet, out.out[-500:], out.err[-500:])
