"""geno-preprocess's work: each assembly into its shard group (resumable), in a worker pool.

The corpus layout, run.json and manifest.json are data_pipeline.corpus_manifest's; the options and
hashes data_pipeline.run_config's; the shard format data_pipeline.shard_format's.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from data_pipeline.errors import PipelineError, ShardError
from data_pipeline.fasta import CHUNK_SIZE, FastaError, Header, compression_of, line_of_offset
from data_pipeline.fasta import open_source, read_fasta
from data_pipeline.manifest import Assembly
from data_pipeline.normalise import ContigNormaliser, ContigStats, InvalidCharacter
from data_pipeline.run_config import PipelineConfig, assembly_hash
from data_pipeline.shard_format import SPLITS, read_attrs
from data_pipeline.shard_writer import AssemblyWriter
from megatron_geno.files import free_bytes, out_of_space, publish_dir
from megatron_geno.units import format_bytes
from megatron_geno.vocab import TOKENIZER_VERSION, VOCAB
log = logging.getLogger(__name__)


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
                    what = ("U (uracil) is RNA's base; a DNA FASTA has T" if chr(bad.char) in "Uu"
                            else "it is not an IUPAC DNA code (ACGTN, RYSWKMBDHV)")
                    raise FastaError(f"{path}: line {line}: character {chr(bad.char)!r} in "
                                     f"record {contigs[-1]!r}: {what}") from None
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
        # every byte on disk before the rename publishes the group; --force swaps in the new
        # group, then drops the old one
        old = publish_dir(tmp, final, replace=True, aside=shards / f".{assembly.assembly}.old")
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        _remove_unfinished(tmp)
        raise
    finally:
        source.close()
    elapsed = time.perf_counter() - started
    # tokens as the manifest and geno-preprocess stats count them: one EOD per document included
    log.info("%s: %d contigs, %d bases -> %d tokens in %d documents (%.1f Mbp/s)",
             assembly.assembly, len(contigs), total.bases, total.tokens + total.documents,
             total.documents, total.bases / max(elapsed, 1e-9) / 1e6)
    return {**read_attrs(final), "status": "written"}


def _stats(s: ContigStats) -> dict:
    bases = max(s.bases, 1)
    return {"bases": s.bases, "tokens": s.tokens, "documents": s.documents,
            "n_fraction": s.n / bases, "ambiguous": s.ambiguous, "lower_fraction": s.lower / bases,
            "gc_fraction": s.gc / max(s.bases - s.n, 1), "dropped_pieces": s.dropped_pieces,
            "dropped_bases": s.dropped_bases}


async def _zarr_settled() -> None:
    """Waits for every other task on zarr's I/O loop (run there by zarr.core.sync.sync)."""
    import asyncio

    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=30)


def _remove_unfinished(tmp: Path) -> None:
    """Removes an assembly's unfinished group. A Ctrl-C can land while this thread waits on
    zarr's I/O thread (zarr.core.sync.sync, zarr 3.1: the interrupted wait leaves the coroutine
    running), which then writes the group's metadata after the removal and leaves the group
    behind (2 of 12 interrupts under load before this): zarr's loop settles first."""
    from zarr.core.sync import sync

    try:
        sync(_zarr_settled(), timeout=60)
    except Exception as err:  # noqa: BLE001 - removing what is there matters more
        log.debug("zarr's loop did not settle: %s", err)
    shutil.rmtree(tmp, ignore_errors=True)


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
        if reason := out_of_space(err):
            return assembly.assembly, "error", {
                "message": f"{assembly.path}: writing its shards into {out} failed: {reason} "
                           f"({format_bytes(free_bytes(out))} free there); its partial group was "
                           f"removed, and a rerun after freeing space continues with it"}
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
