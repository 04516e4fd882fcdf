"""geno-eval's measures inside geno-train (eval.corpora, eval.variants), every
schedule.eval_interval steps beside the validation loss.

The windows and variants are read once, before the first step (bad input stops the run there,
as a ConfigError naming the file); each evaluation scores the same ones with the training model
(megatron-core's forward-only schedule, at the run's layout) and returns flat metrics:
``eval/loss/<corpus>/<assembly>`` and ``eval/loss`` (nats, token-weighted over all),
``eval/bits_per_base``, ``eval/variants_mean_score`` and, with eval.label_field,
``eval/variants_auroc``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_geno.config import ConfigError, TrainConfig
from megatron_geno.evaluation.models import EvalError, MegatronModel
from megatron_geno.tokenizer import GENO_SPECS, soft_mask_of_spec


class TrainingEval:
    """eval.corpora / eval.variants read and checked from the config alone (prepare: before the
    model is built, so bad input stops the run before any work), then bound to the training
    model's chunks (attach)."""

    def __init__(self, cfg: TrainConfig) -> None:
        from megatron_geno.evaluation.loss import corpus_windows
        from megatron_geno.evaluation.variants import prepare_variants

        e = cfg.eval
        if e.variants and cfg.data.tokenizer not in GENO_SPECS:
            raise ConfigError(f"eval.variants encodes windows with the built-in tokenizer; "
                              f"data.tokenizer={cfg.data.tokenizer!r} is another")
        self.cfg = cfg
        self.model = None
        self.soft_mask = soft_mask_of_spec(cfg.data.tokenizer)
        self.window = e.window or cfg.data.seq_length
        try:
            self.loss_windows = (corpus_windows([str(c) for c in e.corpora], e.split, self.window,
                                                e.windows, seed=0) if e.corpora else None)
            self.variants = (prepare_variants(e.variants, e.reference, e.variants_window,
                                              self.soft_mask, e.label_field)
                             if e.variants else None)
        except EvalError as err:
            raise ConfigError(f"eval: {err}") from None
        if self.variants is not None and not any(v.status == "ok" for v in self.variants):
            raise ConfigError(f"eval.variants {e.variants}: no record can be scored (statuses: "
                              f"{sorted({v.status for v in self.variants})})")

    def attach(self, chunks: list) -> "TrainingEval":
        """Scores with these model chunks (the training model, at the run's layout)."""
        self.model = MegatronModel(chunks, self.cfg, "(training)", self.soft_mask)
        return self

    def run(self) -> dict:
        from megatron_geno.evaluation.loss import evaluate_loss
        from megatron_geno.evaluation.variants import score_variants

        e, metrics = self.cfg.eval, {}
        batch = max(1, self.cfg.data.micro_batch_size)
        for chunk in self.model.chunks:
            chunk.eval()
        try:
            if self.loss_windows is not None:
                result = evaluate_loss(self.model, [], e.split, self.window, batch_size=batch,
                                       prepared=self.loss_windows)
                for row in result["assemblies"]:
                    metrics[f"eval/loss/{Path(row['corpus']).name}/{row['assembly']}"] = row["loss"]
                metrics["eval/loss"] = result["total"]["loss"]
                metrics["eval/bits_per_base"] = result["total"]["bits_per_base"]
            if self.variants is not None:
                result = score_variants(self.model, e.variants, e.reference, e.variants_window,
                                        e.both_strands, e.label_field, batch,
                                        prepared=self.variants)
                scores = [v.score for v in result["variants"] if v.score is not None]
                metrics["eval/variants_mean_score"] = float(np.mean(scores))
                if result["auroc"] is not None:
                    metrics["eval/variants_auroc"] = result["auroc"]
        finally:
            for chunk in self.model.chunks:
                chunk.train()
        return metrics


def training_eval(cfg: TrainConfig):
    """A TrainingEval (not yet attached to a model) when eval.corpora or eval.variants is set,
    else None. Bad input is a ConfigError naming the file."""
    if not cfg.eval.corpora and not cfg.eval.variants:
        return None
    with torch.no_grad():
        return TrainingEval(cfg)
