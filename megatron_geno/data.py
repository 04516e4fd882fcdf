"""Training data through megatron-core's GPTDataset: zarr corpora, .bin/.idx prefixes, a synthetic genome."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_pipeline.corpus import CorpusSplit
from data_pipeline.export import write_bin_idx
from megatron_geno.config import ConfigError, TrainConfig, parse_blend
from megatron_geno.sources import ZARR_MARK, zarr_blend_per_split
from megatron_geno.tokenizer import tokenizer_soft_mask
from megatron_geno.vocab import COMPLEMENT, EOD

log = logging.getLogger(__name__)

SYNTHETIC_VERSION = 2


def _synthetic_chain(rng: np.random.Generator) -> np.ndarray:
    return rng.dirichlet(np.full(4, 0.1), size=4**2)


def synthetic_transitions(seed: int) -> np.ndarray:
    """The generating chain of synthetic_genome(..., seed): [16, 4], row 4 x b[-2] + b[-1] (bases
    0..3 = A C G T) holding P(next base | the previous two)."""
    return _synthetic_chain(np.random.default_rng(seed))


def synthetic_genome(length: int, seed: int, num_contigs: int = 100) -> list[np.ndarray]:
    """Returns deterministic synthetic contigs (token ids 5-8 = A C G T) with learnable structure.

    An order-2 Markov chain with sparse transition probabilities, interleaved with copies of a few
    repeat units (like tandem repeats and transposons), so a model can get well below ln(4) nats.
    """
    rng = np.random.default_rng(seed)
    order = 2
    transitions = _synthetic_chain(rng)
    cumulative = np.cumsum(transitions, axis=1)
    repeats = [rng.integers(0, 4, size=rng.integers(6, 300)) for _ in range(12)]
    contigs = []
    per_contig = max(length // num_contigs, order + 1)
    for _ in range(num_contigs):
        out = np.empty(per_contig, dtype=np.uint8)
        uniforms = rng.random(per_contig)
        state, i = 0, 0
        while i < per_contig:
            if rng.random() < 0.002:  # insert a repeat copy
                unit = repeats[rng.integers(len(repeats))]
                copies = np.tile(unit, rng.integers(1, 4))[: per_contig - i]
                out[i : i + len(copies)] = copies
                for base in copies[-order:]:
                    state = (state * 4 + int(base)) % 4**order
                i += len(copies)
                continue
            base = int(np.searchsorted(cumulative[state], uniforms[i] * cumulative[state, -1]))
            base = min(base, 3)
            out[i] = base
            state = (state * 4 + base) % 4**order
            i += 1
        contigs.append(out + 5)  # A C G T are ids 5..8
    return contigs


def write_indexed_dataset(prefix: str | Path, documents: list[np.ndarray]) -> None:
    """Writes documents (EOD appended) as a Megatron .bin/.idx pair (export-megatron's writer)."""
    write_bin_idx(prefix, (np.append(doc, EOD).astype(np.uint8) for doc in documents))


def synthetic_prefix(cfg: TrainConfig, cache_dir: Path) -> str:
    """Returns the .bin/.idx prefix of the synthetic genome, writing it on rank 0 if missing."""
    d = cfg.data
    key = hashlib.sha256(
        f"{SYNTHETIC_VERSION}:{d.synthetic_genome_length}:{d.synthetic_seed}".encode()
    ).hexdigest()[:12]
    prefix = cache_dir / f"synthetic_genome_{key}"
    if torch.distributed.get_rank() == 0 and not Path(str(prefix) + ".idx").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_indexed_dataset(prefix, synthetic_genome(d.synthetic_genome_length, d.synthetic_seed))
    torch.distributed.barrier()
    return str(prefix)


def check_prefixes(paths: list[str], split: str) -> None:
    """Raises ConfigError for a missing prefix, or one with too few documents for the split.

    megatron-core splits by document and loops forever on a split that gets no document.
    """
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in paths:
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise ConfigError(f"data.blend: {prefix}{ext} does not exist")
        num_docs = len(open_indexed(prefix, "data.blend").sequence_lengths)
        for name, bounds in zip(("train", "valid", "test"), matrix):
            if bounds is None or bounds[0] == bounds[1]:
                continue
            if int(round(bounds[1] * num_docs)) == int(round(bounds[0] * num_docs)):
                raise ConfigError(
                    f"{prefix}: {num_docs} documents leave the {name} part of data.split="
                    f"{split!r} empty; give more documents or set data.split (e.g. '100,0,0')"
                )


def open_indexed(prefix: str, key: str) -> IndexedDataset:
    """megatron-core's IndexedDataset of a .bin/.idx pair, checked: an .idx that megatron-core
    cannot read, or a .bin of another size than the .idx describes (a truncated copy), is a
    ConfigError naming the file and the config key."""
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        lengths = dataset.sequence_lengths
        itemsize = dataset.index.dtype_size
    except Exception as err:  # noqa: BLE001 - struct, numpy and assertion errors alike
        raise ConfigError(f"{key}: {prefix}.idx is damaged or truncated ({type(err).__name__}: "
                          f"{str(err).strip()[:120]}); export it again") from None
    expected = int(lengths.astype("int64").sum()) * itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise ConfigError(f"{key}: {prefix}.bin holds {actual:,d} bytes but its .idx describes "
                          f"{expected:,d} (truncated or from another export); export it again")
    return dataset


def _is_prefix(prefix: str) -> bool:
    return os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")


def megatron_blend_per_split(d, needed: list[bool]) -> Optional[list]:
    """megatron-core's blend_per_split for data.source=megatron, or None to split by data.split.

    Per split when data.valid_blend / data.test_blend is given, or when a blend entry P is a
    geno-preprocess export (P_train, P_valid, P_test exist instead of P): train from data.blend
    (P_train for an export), valid and test from their blends or the exports' P_valid / P_test.
    """
    paths, weights = parse_blend(d.blend)
    exported = [p for p in paths if not _is_prefix(p) and _is_prefix(f"{p}_train")]
    if not (d.valid_blend or d.test_blend or exported):
        return None
    per_split = []
    for split, extra, need in (("train", None, needed[0]), ("valid", d.valid_blend, needed[1]),
                               ("test", d.test_blend, needed[2])):
        if split == "train":
            chosen = [f"{p}_train" if p in exported else p for p in paths]
            chosen_weights = weights
        elif extra:
            chosen, chosen_weights = parse_blend(extra)
        else:
            keep = [i for i, p in enumerate(paths) if p in exported and _is_prefix(f"{p}_{split}")]
            chosen = [f"{paths[i]}_{split}" for i in keep]
            chosen_weights = [weights[i] for i in keep] if weights else None
        key = f"data.{'blend' if split == 'train' else split + '_blend'}"
        for prefix in chosen:
            if not _is_prefix(prefix):
                raise ConfigError(f"{key}: {prefix}.bin / .idx do not exist")
            open_indexed(prefix, key)
        if need and not chosen:
            raise ConfigError(f"data.source=megatron: no {split} data; give data.{split}_blend, "
                              f"export a {split} split with geno-preprocess, or set "
                              f"schedule.eval_interval=0")
        per_split.append((chosen, chosen_weights) if chosen else None)
    return per_split




@dataclass
class GenoGPTDatasetConfig(GPTDatasetConfig):
    reverse_complement_prob: float = 0.0


class GenoGPTDataset(GPTDataset):
    """GPTDataset over zarr corpus splits or .bin/.idx prefixes, with reverse-complement augmentation.

    A sample is reverse-complemented with probability `reverse_complement_prob`, decided by a
    hash of (seed, dataset, sample index): the same on every rank, run and resume, and for a zarr
    corpus wherever it lies (its content hash, not its path).
    """

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig):
        if ZARR_MARK in dataset_path:
            corpus, split, _ = dataset_path.split(ZARR_MARK)
            return CorpusSplit(corpus, split)
        return GPTDataset.build_low_level_dataset(dataset_path, config)

    def _query_document_sample_shuffle_indices(self, idx: int):
        text, document_ids = super()._query_document_sample_shuffle_indices(idx)
        p = getattr(self.config, "reverse_complement_prob", 0.0)
        if p and text.min() >= 0 and self._flip(idx) < p:  # padded samples (-1) stay as they are
            text = COMPLEMENT[text[::-1].astype(np.uint8)].astype(text.dtype)
        return text, document_ids

    def _flip(self, idx: int) -> float:
        # a zarr split by its content (hash and split), never its path: a corpus copied or
        # moved elsewhere trains the same; a .bin/.idx prefix by megatron-core's description
        path = self.dataset_path or ""
        identity = (":".join(path.split(ZARR_MARK)[1:]) if ZARR_MARK in path
                    else self.unique_description_hash)
        key = f"{self.config.random_seed}:{identity}:{idx}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def build_datasets(cfg: TrainConfig, tokenizer, run_dir: Path):
    """Returns (train, valid, test) datasets sized for the whole run, built by megatron-core."""
    d, s = cfg.data, cfg.schedule
    cache_dir = Path(d.cache_dir) if d.cache_dir else run_dir / "data_cache"
    eval_runs = s.train_iters // s.eval_interval + 1 if s.eval_interval else 0
    sizes = [
        s.train_iters * d.global_batch_size,
        max(eval_runs * s.eval_iters * d.global_batch_size, 1),
        d.global_batch_size,
    ]
    sources: dict = {}
    if d.source == "zarr":
        per_split = zarr_blend_per_split(d.blend, [True, eval_runs > 0, False],
                                         tokenizer_soft_mask(d.tokenizer), d.seq_length,
                                         sizes[0] * d.seq_length)
        sizes = [size if blend else None for size, blend in zip(sizes, per_split)]
        sources["blend_per_split"] = per_split
    elif d.source == "megatron" and (per_split := megatron_blend_per_split(
            d, [True, eval_runs > 0, False])) is not None:
        sizes = [size if blend else None for size, blend in zip(sizes, per_split)]
        sources["blend_per_split"] = per_split
    else:
        if d.source == "synthetic":
            paths, weights = [synthetic_prefix(cfg, cache_dir)], None
        else:
            paths, weights = parse_blend(d.blend)
            check_prefixes(paths, d.split)
        sources.update(blend=(paths, weights), split=d.split)
    config = GenoGPTDatasetConfig(
        random_seed=s.seed,
        sequence_length=d.seq_length,
        path_to_cache=str(cache_dir / "indices"),
        tokenizer=tokenizer,
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=False,
        create_attention_mask=d.reset_attention_mask,
        reverse_complement_prob=d.reverse_complement_prob,
        **sources,
    )
    return BlendedMegatronDatasetBuilder(GenoGPTDataset, sizes, lambda: True, config).build()


def microbatches(
    dataset, consumed_samples: int, micro_batch_size: int, global_batch_size: int
) -> Iterator[dict]:
    """Yields this DP rank's micro-batches in global order, starting at consumed_samples.

    Each global batch of samples [c, c + G) is cut into micro-batches of M consecutive samples
    per DP rank per step, as Megatron's pretraining sampler does, so the samples of a global batch
    do not depend on the data-parallel size.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    sample = consumed_samples
    while True:
        for start in range(0, global_batch_size, micro_batch_size * dp_size):
            first = sample + start + dp_rank * micro_batch_size
            items = [dataset[(first + i) % len(dataset)] for i in range(micro_batch_size)]
            # a blend adds a numpy 'dataset_id' per sample: keep the tensors
            yield {k: torch.stack([it[k] for it in items]) for k, v in items[0].items()
                   if torch.is_tensor(v)}
        sample += global_batch_size


class Prefetcher:
    """An iterator of micro-batches read ahead on a background thread, into pinned host memory
    when there is a GPU, so that the step copies them with ``non_blocking`` and never waits on
    the dataset; the order and content are the source's. An error of the source (a damaged
    shard) is raised where the batch would have been."""

    def __init__(self, source: Iterator[dict], depth: int, pin: bool) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source, pin), daemon=True,
                                        name="geno-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Iterator[dict], pin: bool) -> None:
        try:
            for batch in source:
                if pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                if not self._put((batch, None)):
                    return
            self._put((None, StopIteration()))
        except BaseException as err:  # handed to the consumer, raised there
            self._put((None, err))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> dict:
        batch, err = self._queue.get()
        if err is not None:
            self.close()
            raise err
        return batch

    def close(self) -> None:
        """Stops reading ahead (the thread ends at its next batch)."""
        self._stop.set()

    def __del__(self) -> None:
        self.close()
