"""geno-preprocess's work: assemblies -> shard groups (resumable, parallel), corpus manifest.

Corpus layout::

    OUT/run.json              the pipeline config, its hash, and every assembly of the manifest
    OUT/shards/<assembly>/    one zarr group per assembly (parts inside; see data_pipeline.shard)
    OUT/shards/.<id>.tmp/     an assembly being written (deleted and redone on rerun)
    OUT/manifest.json         written by finalize: shards, token/document counts, splits
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from data_pipeline.fasta import CHUNK_SIZE, FastaError, Header, compression_of, line_of_offset
from data_pipeline.fasta import open_source, read_fasta
from data_pipeline.manifest import Assembly
from data_pipeline.normalise import (ContigNormaliser, ContigStats, InvalidCharacter,
                                     NormalisationPolicy)
from data_pipeline.shard import (CHUNK_TOKENS, CODECS, FORMAT_VERSION, SHARD_TOKENS, SPLITS,
                                 AssemblyWriter, ShardError, read_attrs)
from data_pipeline.splits import SplitRules
from megatron_geno.files import fsync_path, fsync_tree, write_text_atomic
from megatron_geno.vocab import TOKENIZER_VERSION, VOCAB

log = logging.getLogger(__name__)


class PipelineError(ValueError):
    """A problem with the corpus directory or a previous run; the message says what to do."""


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides the bytes of a shard; its hash marks finished shards as reusable."""

    policy: NormalisationPolicy = field(default_factory=NormalisationPolicy)
    rules: SplitRules = field(default_factory=SplitRules)
    part_tokens: int = 1 << 30
    chunk_tokens: int = CHUNK_TOKENS
    shard_tokens: int = SHARD_TOKENS
    compression_level: int = 1
    codec: str = "dna2bit"

    def __post_init__(self):
        if self.codec not in CODECS:
            raise PipelineError(f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.chunk_tokens < 1 or self.shard_tokens % self.chunk_tokens:
            raise PipelineError(f"shard size {self.shard_tokens} must be a multiple of the chunk "
                                f"size {self.chunk_tokens}")
        if self.codec == "dna2bit" and self.chunk_tokens % 8:
            raise PipelineError(f"--codec dna2bit packs whole 8-token words; chunk size "
                                f"{self.chunk_tokens} is not a multiple of 8")
        if self.part_tokens < 1:
            raise PipelineError(f"--part-size must be positive, got {self.part_tokens}")

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "tokenizer_version": TOKENIZER_VERSION,
                "policy": self.policy.to_dict(), "rules": self.rules.to_dict(),
                "part_tokens": self.part_tokens, "chunk_tokens": self.chunk_tokens,
                "shard_tokens": self.shard_tokens, "compression_level": self.compression_level,
                "codec": self.codec}

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        rules = d["rules"]
        return cls(NormalisationPolicy(**d["policy"]),
                   SplitRules(tuple(map(tuple, rules["contig_patterns"])),
                              tuple(map(tuple, rules["sample_fractions"])), rules["seed"]),
                   d["part_tokens"], d["chunk_tokens"], d["shard_tokens"], d["compression_level"],
                   d["codec"])

    def hash(self) -> str:
        return _sha(self.to_dict())


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def assembly_hash(config: PipelineConfig, assembly: Assembly) -> str:
    """The identity of one shard group: config, manifest row and source size."""
    try:
        size = os.path.getsize(assembly.path)
    except OSError:
        size = -1
    return _sha([config.hash(), assembly.to_dict(), size])


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def process_assembly(assembly: Assembly, out: Path, config: PipelineConfig, force: bool = False,
                     progress: Optional[Callable[[int], None]] = None,
                     read_chunk: int = CHUNK_SIZE) -> dict:
    """Tokenizes one assembly into OUT/shards/<id>; returns its attributes.

    A finished group with the same assembly hash is kept (status 'skipped'). The group is built
    under a temporary name and renamed when whole, so an interrupted run leaves nothing that looks
    finished. Raises FastaError / PipelineError for bad input; the temporary group is removed.
    """
    shards = out / "shards"
    final, tmp = shards / assembly.assembly, shards / f".{assembly.assembly}.tmp"
    wanted = assembly_hash(config, assembly)
    if final.exists() and not force:
        try:
            attrs = read_attrs(final)
        except ShardError as err:
            raise PipelineError(f"{err}: the finished assembly is damaged; rerun with --force "
                                f"to redo it") from None
        if attrs.get("assembly_hash") == wanted:
            return {**attrs, "status": "skipped"}
        raise PipelineError(
            f"{final} was written from a different config or input (hash "
            f"{attrs.get('assembly_hash')} != {wanted}); rerun with --force to redo it or "
            f"use a new --out")
    if tmp.exists():
        shutil.rmtree(tmp)
    shards.mkdir(parents=True, exist_ok=True)
    source = open_source(assembly.path)  # an unreadable path fails before anything is written
    started = time.perf_counter()
    path = Path(assembly.path)
    policy, rules = config.policy, config.rules
    writer = AssemblyWriter(tmp, config.part_tokens, config.chunk_tokens, config.shard_tokens,
                            config.compression_level, config.codec)
    whole_split = rules.assembly_split(assembly)
    contigs: list[str] = []
    lengths: list[int] = []
    names: dict[str, int] = {}
    total = ContigStats()
    stats: Optional[ContigStats] = None
    normaliser: Optional[ContigNormaliser] = None
    header_offset = 0

    def finish_contig() -> None:
        normaliser.finish()
        if stats.bases == 0:
            raise FastaError(f"{path}: line {line_of_offset(path, header_offset)}: record "
                             f"{contigs[-1]!r} has no sequence")
        lengths.append(stats.bases)
        for key, value in asdict(stats).items():
            setattr(total, key, getattr(total, key) + value)

    try:
        for event in read_fasta(path, read_chunk, source):
            if isinstance(event, Header):
                if normaliser is not None:
                    finish_contig()
                header_offset = event.offset
                if not event.name:
                    raise FastaError(f"{path}: line {line_of_offset(path, event.offset)}: "
                                     f"header without a name")
                if event.name in names:
                    raise FastaError(
                        f"{path}: line {line_of_offset(path, event.offset)}: duplicate contig "
                        f"name {event.name!r} (first at record {names[event.name] + 1})")
                names[event.name] = len(contigs)
                contigs.append(event.name)
                split = whole_split if whole_split is not None else rules.contig_split(event.name)
                writer.set_contig(len(contigs) - 1, split)
                stats = ContigStats()
                normaliser = ContigNormaliser(policy, writer, stats)
            else:
                before = stats.bases
                try:
                    normaliser.feed(event.data)
                except InvalidCharacter as bad:
                    line = line_of_offset(path, event.offset + bad.position)
                    raise FastaError(f"{path}: line {line}: character {chr(bad.char)!r} is not "
                                     f"an IUPAC nucleotide code (record {contigs[-1]!r})") from None
                if progress:
                    progress(stats.bases - before)
        finish_contig()
        md5 = source.md5.hexdigest()
        if assembly.md5 and md5 != assembly.md5:
            raise FastaError(f"{path}: md5 {md5} does not match the manifest's {assembly.md5}")
        per_split = {s: 0 for s in SPLITS}
        attrs = {
            **assembly.to_dict(),
            "source": {"path": str(path), "bytes": source.bytes_read, "md5": md5,
                       "compression": compression_of(path)},
            "contigs": contigs,
            "contig_lengths": lengths,
            "tokenizer": {"name": "geno", "version": TOKENIZER_VERSION, "vocab": VOCAB},
            "normalisation": policy.to_dict(),
            "splits": rules.to_dict(),
            "config_hash": config.hash(),
            "assembly_hash": wanted,
            "stats": _stats(total),
        }
        parts = writer.close(attrs)
        for part in parts:
            for s in SPLITS:
                per_split[s] += part["split_tokens"][s]
        fsync_tree(tmp)  # every byte on disk before the rename publishes the group
        if final.exists():  # --force: swap in the new group, then drop the old one
            old = shards / f".{assembly.assembly}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_path(shards)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
            fsync_path(shards)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        source.close()
    elapsed = time.perf_counter() - started
    log.info("%s: %d contigs, %d bases -> %d tokens in %d documents (%.1f Mbp/s)",
             assembly.assembly, len(contigs), total.bases, total.tokens, total.documents,
             total.bases / max(elapsed, 1e-9) / 1e6)
    return {**read_attrs(final), "status": "written"}


def _stats(s: ContigStats) -> dict:
    bases = max(s.bases, 1)
    return {"bases": s.bases, "tokens": s.tokens, "documents": s.documents,
            "n_fraction": s.n / bases, "ambiguous": s.ambiguous, "lower_fraction": s.lower / bases,
            "gc_fraction": s.gc / max(s.bases - s.n, 1), "dropped_pieces": s.dropped_pieces,
            "dropped_bases": s.dropped_bases}


def prepare_out(out: Path, config: PipelineConfig, assemblies: list[Assembly], force: bool,
                only_listed: bool = False) -> None:
    """Creates OUT and its run.json; refuses a corpus written with another config (unless force).

    Assemblies of earlier runs that this run does not name stay in the corpus (and its manifest)
    unless only_listed.
    """
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; name a corpus directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"--out {out}: cannot create ({err.strerror})") from None
    run_file = out / "run.json"
    kept: list[Assembly] = []
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
            earlier = [Assembly(**row) for row in previous.get("assemblies", [])]
        except (OSError, ValueError, TypeError) as err:
            raise PipelineError(f"{run_file}: unreadable ({err}); remove it or use a new --out")
        if previous.get("config_hash") != config.hash() and not force:
            raise PipelineError(
                f"{out} holds a corpus made with other options (config hash "
                f"{previous.get('config_hash')} != {config.hash()}); use the same options, "
                f"--force to redo it, or a new --out")
        named = {a.assembly for a in assemblies}
        unnamed = [a for a in earlier if a.assembly not in named]
        if unnamed and not only_listed:
            kept = unnamed
            log.info("%s keeps %d assemblies of earlier runs that this run does not name (%s%s); "
                     "--only-listed leaves them out of the manifest", out, len(kept),
                     ", ".join(a.assembly for a in kept[:3]), ", ..." if len(kept) > 3 else "")
    _write_json(run_file, {"format_version": FORMAT_VERSION, "config": config.to_dict(),
                           "config_hash": config.hash(),
                           "assemblies": [a.to_dict() for a in kept + list(assemblies)]})


def finalize(out: Path) -> dict:
    """Writes OUT/manifest.json once every assembly of run.json is finished; returns it."""
    try:
        run = json.loads((out / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{out}/run.json: unreadable ({err}); run geno-preprocess run first")
    config = PipelineConfig.from_dict(run["config"])
    entries, missing = [], []
    for row in run["assemblies"]:
        assembly = Assembly(**row)
        group = out / "shards" / assembly.assembly
        try:
            attrs = read_attrs(group) if (group / "zarr.json").exists() else {}
        except ShardError:
            attrs = {}  # damaged: not finished
        if attrs.get("assembly_hash") != assembly_hash(config, assembly):
            missing.append(assembly.assembly)
            continue
        entries.append({
            **{k: attrs[k] for k in ("assembly", "sample", "haplotype", "species")},
            "path": f"shards/{assembly.assembly}",
            "assembly_hash": attrs["assembly_hash"],
            "source_md5": attrs["source"]["md5"],
            "parts": attrs["parts"],
            "stats": attrs["stats"],
        })
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PipelineError(f"{len(missing)} of {len(run['assemblies'])} assemblies are not "
                            f"finished ({shown}); run the remaining tasks (or run again with "
                            f"--only-listed to leave out what this run does not name), then "
                            f"finalize")
    totals = {"tokens": 0, "documents": 0, "split_tokens": {s: 0 for s in SPLITS},
              "split_documents": {s: 0 for s in SPLITS}}
    for entry in entries:
        for part in entry["parts"]:
            totals["tokens"] += part["tokens"]
            totals["documents"] += part["documents"]
            for s in SPLITS:
                totals["split_tokens"][s] += part["split_tokens"][s]
                totals["split_documents"][s] += part["split_documents"][s]
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": run["config"],
        "config_hash": run["config_hash"],
        "content_hash": _sha([e["assembly_hash"] for e in entries]),
        "tokenizer": {"name": "geno", "version": TOKENIZER_VERSION, "vocab_size": len(VOCAB)},
        "totals": totals,
        "assemblies": entries,
    }
    _write_json(out / "manifest.json", manifest)
    return manifest


_ENTRY_PATH = re.compile(r"^shards/[A-Za-z0-9][A-Za-z0-9._#+-]*$")
_PART_NAME = re.compile(r"^part-[0-9]{5}$")


def read_manifest_json(corpus: Path) -> dict:
    """Returns a finished corpus's manifest.json, checked; a clear error when missing or bad.

    Every path it names must stay inside the corpus (shards/<assembly>/part-NNNNN).
    """
    path = Path(corpus) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist: the corpus is unfinished (run "
                            f"geno-preprocess finalize {corpus}) or not a corpus") from None
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: unreadable ({err})") from None
    try:
        for n, entry in enumerate(manifest["assemblies"]):
            if not isinstance(entry.get("path"), str) or not _ENTRY_PATH.match(entry["path"]):
                raise PipelineError(f"{path}: assembly {n} has path {entry.get('path')!r}, not "
                                    f"shards/<assembly> inside the corpus")
            for part in entry["parts"]:
                if not isinstance(part.get("name"), str) or not _PART_NAME.match(part["name"]):
                    raise PipelineError(f"{path}: assembly {entry['path']} names part "
                                        f"{part.get('name')!r}, not part-NNNNN")
        manifest["totals"]["split_tokens"]
    except (KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"{path} is not a corpus manifest (missing {err})") from None
    return manifest


_PROGRESS = None  # per process: where progress (bases) goes; set by _worker_init


def _worker_init(queue) -> None:
    global _PROGRESS
    _PROGRESS = queue


def _process_in_worker(args) -> tuple[str, str, dict]:
    """Runs process_assembly in a pool worker; returns (assembly, status or 'error', attrs/message)."""
    assembly, out, config, force, read_chunk = args
    pending = [0]

    def progress(bases: int) -> None:
        pending[0] += bases
        if pending[0] >= 1 << 24:
            _PROGRESS.put(pending[0])
            pending[0] = 0

    try:
        attrs = process_assembly(assembly, out, config, force, progress, read_chunk)
        return assembly.assembly, attrs["status"], {"stats": attrs["stats"]}
    except (FastaError, PipelineError, ShardError) as err:
        return assembly.assembly, "error", {"message": str(err)}
    except Exception as err:  # noqa: BLE001 - one assembly's bug must not lose the others
        return assembly.assembly, "error", {
            "message": f"{assembly.path}: unexpected {type(err).__name__}: {err}"}
    finally:
        if pending[0]:
            _PROGRESS.put(pending[0])


def run(assemblies: list[Assembly], out: Path, config: PipelineConfig, workers: int = 1,
        force: bool = False, read_chunk: int = CHUNK_SIZE, show_progress: Optional[bool] = None
        ) -> list[tuple[str, str, dict]]:
    """Processes assemblies on `workers` processes; returns (assembly, status, info) per assembly.

    One failing assembly does not stop the others; its status is 'error' with a message.
    Output bytes do not depend on the number of workers.
    """
    import multiprocessing as mp
    import queue as queue_module

    from tqdm import tqdm

    jobs = [(a, out, config, force, read_chunk) for a in assemblies]
    results = []
    # None: a bar on a terminal only (SLURM logs get one line per assembly instead)
    bar = tqdm(total=None, unit="bp", unit_scale=True, desc="bases", smoothing=0.1,
               disable=None if show_progress is None else not show_progress)
    if workers <= 1:
        _worker_init(queue_module.SimpleQueue())
        for job in jobs:
            results.append(_process_in_worker(job))
            while not _PROGRESS.empty():
                bar.update(_PROGRESS.get())
            bar.set_postfix_str(f"{len(results)}/{len(jobs)} assemblies")
    else:
        ctx = mp.get_context("spawn")  # zarr keeps an event-loop thread; never fork it
        progress_queue = ctx.Queue()
        with ctx.Pool(workers, initializer=_worker_init, initargs=(progress_queue,)) as pool:
            pending = [pool.apply_async(_process_in_worker, (job,)) for job in jobs]
            while pending:
                try:
                    bar.update(progress_queue.get(timeout=0.2))
                except queue_module.Empty:
                    pass
                done = [p for p in pending if p.ready()]
                for p in done:
                    results.append(p.get())
                    pending.remove(p)
                    bar.set_postfix_str(f"{len(results)}/{len(jobs)} assemblies")
            while not progress_queue.empty():
                bar.update(progress_queue.get())
    bar.close()
    order = {a.assembly: i for i, a in enumerate(assemblies)}
    return sorted(results, key=lambda r: order[r[0]])
