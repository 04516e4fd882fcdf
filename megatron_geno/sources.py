"""The training data a config names, checked from the files alone (no megatron-core, no process
group): geno-train runs these checks before anything heavy is imported, and the dataset builders
(megatron_geno.data) use the same functions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from data_pipeline.corpus_manifest import read_manifest_json
from data_pipeline.errors import PipelineError
from megatron_geno.config import ConfigError, TrainConfig, parse_blend
from megatron_geno.vocab import tokenizer_soft_mask

log = logging.getLogger("megatron_geno.data")

ZARR_MARK = "::"  # a zarr dataset path is CORPUS::SPLIT::CONTENT_HASH


def zarr_blend_per_split(blend: list, needed: list[bool], soft_mask: str = "upper",
                         seq_length: int = 0, train_tokens: int = 0) -> list:
    """Returns megatron-core's blend_per_split from [weight, corpus, ...]: the manifests' splits.

    A split that is needed (train always; valid when evaluating) but has no documents in any
    corpus is a ConfigError naming the corpora (and saying whether the corpora are empty or
    every document is held out); so is a corpus made under another soft-mask policy than the
    tokenizer's (``soft_mask``): its token ids would mean other bases. A train split shorter
    than one sample (seq_length + 1 tokens) is a ConfigError with both numbers: every sample
    would hold the same corpus repeated; a run that reads the train split more than once
    (train_tokens, its token count) is said in a warning with the number of passes.
    """
    paths, weights = parse_blend(blend)
    try:
        manifests = [read_manifest_json(Path(corpus)) for corpus in paths]
    except PipelineError as err:
        raise ConfigError(f"data.blend: {err}") from None
    for corpus, manifest in zip(paths, manifests):
        made = manifest.get("config", {}).get("policy", {}).get("soft_mask", "upper")
        if made != soft_mask:
            raise ConfigError(
                f"data.blend: corpus {corpus} was made with --soft-mask {made}, but the tokenizer "
                f"reads soft-masked bases as {soft_mask!r}; set data.tokenizer="
                f"{'geno:keep' if made == 'keep' else 'geno'} (or remake the corpus)")
    per_split = []
    for split, need in zip(("train", "valid", "test"), needed):
        chosen, chosen_weights = [], []
        for i, (corpus, manifest) in enumerate(zip(paths, manifests)):
            if manifest["totals"]["split_tokens"][split]:
                chosen.append(ZARR_MARK.join([str(Path(corpus).resolve()), split,
                                              manifest["content_hash"]]))
                if weights:
                    chosen_weights.append(weights[i])
        if need and not chosen:
            if split != "train":
                hint = ("hold out contigs or samples with geno-preprocess run --holdout-contigs "
                        "/ --holdout-samples, or set schedule.eval_interval=0")
            elif not any(m["totals"]["tokens"] for m in manifests):
                hint = ("the corpora hold no tokens at all (geno-preprocess stats shows what "
                        "--min-length / --max-n-fraction dropped)")
            else:
                hint = "every document is held out (valid or test)"
            raise ConfigError(f"data.blend: no {split} documents in {', '.join(paths)}; {hint}")
        per_split.append((chosen, chosen_weights or None) if chosen else None)
    train = sum(m["totals"]["split_tokens"]["train"] for m in manifests)
    if seq_length and train < seq_length + 1:
        raise ConfigError(f"data.seq_length={seq_length} needs {seq_length + 1:,d} tokens per "
                          f"sample, but the train split of {', '.join(paths)} holds {train:,d}: "
                          f"every sample would repeat the whole corpus; use a shorter "
                          f"data.seq_length or a larger corpus")
    if train_tokens > train and os.environ.get("RANK", "0") == "0":
        log.warning("data.blend: this run reads %s train tokens, %.1f passes over the %s of %s "
                    "(samples repeat from the second pass on)", f"{train_tokens:,d}",
                    train_tokens / train, f"{train:,d}", ", ".join(paths))
    return per_split


def check_sources(cfg: TrainConfig) -> None:
    """ConfigError naming the key and file for training data that cannot be read as the config
    says: a zarr corpus (manifest, soft-mask policy, an empty or too short train split, no
    validation split where evaluation runs) or a .bin/.idx prefix that does not exist. Reads
    manifests only; the deeper checks (an .idx's content) run where the data is opened."""
    d, s = cfg.data, cfg.schedule
    if d.source == "zarr":
        zarr_blend_per_split(d.blend, [True, bool(s.eval_interval), False],
                             tokenizer_soft_mask(d.tokenizer), d.seq_length)
    elif d.source == "megatron":
        for key in ("blend", "valid_blend", "test_blend"):
            paths, _ = parse_blend(getattr(d, key), f"data.{key}") if getattr(d, key) else ([], None)
            for prefix in paths:
                exported = all(os.path.exists(f"{prefix}_train{ext}") for ext in (".bin", ".idx"))
                for ext in (".bin", ".idx"):
                    if not os.path.exists(prefix + ext) and not exported:
                        raise ConfigError(f"data.{key}: {prefix}{ext} does not exist")
    for corpus in cfg.eval.corpora:
        try:
            read_manifest_json(Path(corpus))
        except PipelineError as err:
            raise ConfigError(f"eval.corpora: {err}") from None
    for key in ("variants", "reference"):
        path = getattr(cfg.eval, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"eval.{key}: {path} does not exist")
