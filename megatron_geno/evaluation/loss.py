"""geno-eval loss: held-out likelihood per assembly and per species on token-store corpora.

Each document of the split (a contig or an N-free piece; its EOD dropped) is cut into
non-overlapping windows: window k holds tokens [kL, (k+1)L] (L+1 tokens) and scores the L
predictions of tokens kL+1 .. (k+1)L, so every token but the first of a document is scored once,
within its own document (no window crosses an EOD). The last window of a document is shorter and
padded; padding is never scored. ``sample`` scores a deterministic sample of that many windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_geno.evaluation.models import EvalError, for_each_batch
from megatron_geno.vocab import PAD


@dataclass(frozen=True)
class Window:
    group: int  # index into the assembly table
    part: int  # index into the opened parts
    start: int  # token offset in the part
    length: int  # tokens in the window (L + 1, or fewer at a document's end)


def corpus_windows(corpora: list[str], split: str, length: int, sample: Optional[int] = None,
                   seed: int = 0):
    """Returns (windows, assemblies, parts): every window of the split's documents (or a sample of
    them, sorted), the assembly table [{corpus, assembly, species}], and the opened parts."""
    from data_pipeline.corpus import Corpus
    from data_pipeline.errors import PipelineError, ShardError
    from data_pipeline.shard_format import SPLITS

    if split not in SPLITS[1:]:
        raise EvalError(f"--split must be valid or test, got {split!r}")
    if length < 1:
        raise EvalError(f"--window must be positive, got {length}")
    code = SPLITS.index(split)
    windows, assemblies, parts = [], [], []
    for path in corpora:
        try:
            corpus = Corpus(path)
            for entry, part in corpus.parts():
                key = {"corpus": str(path), "assembly": entry["assembly"],
                       "species": entry.get("species", "")}
                if key not in assemblies:
                    assemblies.append(key)
                group = assemblies.index(key)
                parts.append(part)
                offsets = part.doc_offsets
                for doc in np.flatnonzero(part.doc_split == code):
                    begin, end = int(offsets[doc]), int(offsets[doc + 1]) - 1  # EOD dropped
                    for start in range(begin, end - 1, length):
                        windows.append(Window(group, len(parts) - 1, start,
                                              min(length + 1, end - start)))
        except (PipelineError, ShardError, OSError) as err:
            raise EvalError(f"corpus {path}: {err}") from None
    if not windows:
        raise EvalError(f"no {split} documents in {', '.join(map(str, corpora))} (geno-preprocess "
                        f"--holdout-contigs / --holdout-samples assign them)")
    if sample is not None:
        if sample < 1:
            raise EvalError(f"--windows must be positive, got {sample}")
        if sample < len(windows):
            chosen = np.random.default_rng(seed).choice(len(windows), sample, replace=False)
            windows = [windows[i] for i in sorted(chosen)]
    return windows, assemblies, parts


def _batch(windows: list[Window], parts, length: int) -> torch.Tensor:
    """Token ids [b, L+1], each window padded with PAD (window w scores its first w.length - 1
    predictions; the padding is never scored)."""
    ids = torch.full((len(windows), length + 1), PAD, dtype=torch.long)
    for row, w in enumerate(windows):
        window = parts[w.part].tokens.read(w.start, w.start + w.length)
        ids[row, :w.length] = torch.from_numpy(window.astype(np.int64))
    return ids


def evaluate_loss(model, corpora: list[str], split: str = "valid", length: int = 1024,
                  sample: Optional[int] = None, batch_size: int = 8, seed: int = 0,
                  progress=None, prepared=None) -> dict:
    """Scores the windows (prepared: corpus_windows' result, to reuse); returns {"assemblies":
    [...], "species": [...], "total": {...}, "window": L, "split": ..., "model": ...}, each row
    with tokens, loss (nats) and bits/base."""
    windows, assemblies, parts = prepared or corpus_windows(corpora, split, length, sample, seed)
    groups = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    sums = {}  # assembly -> (nats, tokens) over this data-parallel rank's batches

    def use(i: int, logprobs: torch.Tensor) -> None:
        for row, w in enumerate(groups[i]):
            n, t = sums.get(w.group, (0.0, 0))
            sums[w.group] = (n - float(logprobs[row, :w.length - 1].sum()), t + w.length - 1)

    for_each_batch(model, len(groups), lambda i: _batch(groups[i], parts, length), use,
                   progress)
    nats = np.zeros(len(assemblies))
    tokens = np.zeros(len(assemblies), dtype=np.int64)
    for rank_sums in model.gather({"sums": sums}, all_ranks=True):
        for group, (n, t) in rank_sums["sums"].items():
            nats[group] += n
            tokens[group] += t

    def row(n: float, t: int, **key) -> dict:
        loss = n / t if t else float("nan")
        return {**key, "tokens": int(t), "loss": loss, "bits_per_base": loss / math.log(2)}

    table = [row(nats[i], tokens[i], **a) for i, a in enumerate(assemblies) if tokens[i]]
    species = {}
    for i, a in enumerate(assemblies):
        n, t = species.get(a["species"], (0.0, 0))
        species[a["species"]] = (n + nats[i], t + tokens[i])
    return {"model": str(model.path), "split": split, "window": length,
            "windows": len(windows), "assemblies": table,
            "species": [row(n, t, species=s) for s, (n, t) in species.items() if t],
            "total": row(float(nats.sum()), int(tokens.sum()))}


def format_loss_table(result: dict) -> str:
    lines = [f"{'corpus':<24} {'assembly':<14} {'species':<20} {'tokens':>12} {'loss':>8} "
             f"{'bits/base':>9}"]
    for r in result["assemblies"]:
        lines.append(f"{Path(r['corpus']).name:<24} {r['assembly']:<14} {r['species']:<20} "
                     f"{r['tokens']:>12,d} {r['loss']:>8.4f} {r['bits_per_base']:>9.4f}")
    lines.append("")
    lines.append(f"{'species':<60} {'tokens':>12} {'loss':>8} {'bits/base':>9}")
    for r in result["species"] + [dict(result["total"], species="(all)")]:
        lines.append(f"{r['species']:<60} {r['tokens']:>12,d} {r['loss']:>8.4f} "
                     f"{r['bits_per_base']:>9.4f}")
    lines.append(f"({result['windows']:,d} windows of {result['window']:,d} tokens, split "
                 f"{result['split']}; uniform over A C G T: {math.log(4):.4f} nats = 2 bits)")
    return "\n".join(lines)
