"""The lines geno-train ends with: what ran, the final losses, and where everything is."""

from pathlib import Path

from megatron_geno.config import load_config


def test_summary_names_steps_tokens_losses_and_paths():
    from megatron_geno.train import run_summary

    cfg = load_config(None, ["data.seq_length=64", "data.global_batch_size=8",
                             "logging.run_dir=runs/x"])
    records = [{"step": 4, "loss": 4.5, "val_loss": 4.4}, {"step": 5, "loss": 4.25}]
    text = run_summary(cfg, records, 5, 12.34, Path("ck/iter_0000005"))
    assert "5 steps (to iteration 5), 2,560 tokens in 12.3 s" in text
    assert "final loss 4.2500, validation loss 4.4000" in text
    assert "runs/x/metrics.jsonl" in text and "runs/x/tensorboard" in text
    assert "checkpoint ck/iter_0000005" in text
    assert "no checkpoint (set checkpoint.save=DIR" in run_summary(cfg, records, 5, 1.0, None)
