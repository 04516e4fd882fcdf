"""geno-preprocess: pangenome FASTA assemblies -> a sharded zarr token store that geno-train reads."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_geno.lifetime import die_with_parent_if_spawned

die_with_parent_if_spawned()  # in a multiprocessing spawn child (which imports the main module)

EPILOG = """\
examples:
  geno-preprocess run --manifest hprc.tsv --out corpus/human --workers 8 \\
      --holdout-contigs valid='(^|[#_])chr20$' --holdout-samples test=0.02
  sbatch --array=0-99 --wrap "geno-preprocess run --manifest hprc.tsv --out corpus/human --no-finalize"
  geno-preprocess finalize corpus/human          # after the array: writes manifest.json
  geno-preprocess run --out corpus/toy genome1.fa.gz genome2.fna.gz --species 'Pan troglodytes'
  geno-preprocess stats corpus/human
  geno-preprocess verify corpus/human --windows 32
  geno-preprocess export-megatron corpus/human --prefix megatron/human   # human_train.bin/.idx ...

manifest.tsv (tab-separated, header row; md5 and split optional):
  assembly  sample  haplotype  species       path                     md5  split
  HG002.1   HG002   1          Homo sapiens  HG002.paternal.fa.gz
"""


def _size(text: str) -> int:
    from megatron_geno.units import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="geno-preprocess", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="tokenize assemblies into OUT/shards (resumable)")
    run.add_argument("fasta", nargs="*", help="FASTA paths (instead of --manifest)")
    run.add_argument("--manifest", help="TSV: assembly, sample, haplotype, species, path[, md5, split]")
    run.add_argument("--out", required=True, help="corpus directory")
    run.add_argument("--species", default="unknown", help="species of FASTA paths given directly")
    run.add_argument("--workers", type=int, default=1, help="processes, one assembly each (1)")
    run.add_argument("--task-index", type=int, help="this task's index (default SLURM_ARRAY_TASK_ID)")
    run.add_argument("--num-tasks", type=int, help="number of tasks (default SLURM_ARRAY_TASK_COUNT)")
    run.add_argument("--force", action="store_true",
                     help="redo the named assemblies even if finished (also a damaged one)")
    run.add_argument("--only-listed", action="store_true",
                     help="the manifest lists only the assemblies named now (default: assemblies "
                     "of earlier runs in OUT stay in it; their shards are never deleted)")
    run.add_argument("--no-finalize", action="store_true",
                     help="do not write manifest.json (array tasks; run `finalize` at the end)")
    norm = run.add_argument_group("normalisation (recorded in every shard)")
    norm.add_argument("--soft-mask", choices=["upper", "keep"], default="upper",
                      help="upper: fold soft-masked bases to A C G T N (default); keep: a c g t n ids")
    norm.add_argument("--split-n-run", type=int, default=100,
                      help="split contigs at runs of at least this many N (100; 0: never)")
    norm.add_argument("--min-length", type=int, default=64, help="drop shorter pieces (64 bases)")
    norm.add_argument("--max-n-fraction", type=float, default=0.5,
                      help="drop pieces with a larger N fraction (0.5)")
    splits = run.add_argument_group("splits (deterministic; the rest is train)")
    splits.add_argument("--holdout-contigs", nargs="+", default=[], metavar="SPLIT=REGEX",
                        help="contigs whose name matches REGEX go to SPLIT (valid/test) in every "
                        "assembly, e.g. valid='chr20$'")
    splits.add_argument("--holdout-samples", nargs="+", default=[], metavar="SPLIT=FRACTION",
                        help="hold out this fraction of samples (both haplotypes), e.g. test=0.02")
    splits.add_argument("--split-seed", type=int, default=0, help="seed of sample hold-out (0)")
    layout = run.add_argument_group("shard layout")
    layout.add_argument("--part-size", type=_size, default=_size("1G"),
                        help="start a new part after this many tokens (1G)")
    layout.add_argument("--codec", choices=["dna2bit", "zstd", "blosc"], default="dna2bit",
                        help="dna2bit (default): 2 bits per base plus runs of other tokens, "
                        "~0.25 bytes/base, the fastest to write and read, read by zarr where "
                        "this package is installed; zstd: ~0.3 bytes/base, any zarr v3 reader; "
                        "blosc: bit-shuffled zstd, ~0.47 bytes/base")
    layout.add_argument("--compression-level", type=int, default=1,
                        help="zstd / blosc level (1); dna2bit has none")
    layout.add_argument("--read-chunk", type=_size, default=_size("4M"),
                        help="decompressed bytes read at a time (4M); bounds memory")
    fin = sub.add_parser("finalize", help="write manifest.json: complete when every assembly is "
                         "written, else listing the failed and unwritten ones (exit 2)")
    fin.add_argument("corpus")
    stats = sub.add_parser("stats", help="per-assembly table: tokens, documents, splits, N, GC; "
                           "an incomplete corpus's failures too (exit 1)")
    stats.add_argument("corpus")
    verify = sub.add_parser("verify", help="check random windows bit-exact against the sources")
    verify.add_argument("corpus")
    verify.add_argument("--windows", type=int, default=16, help="windows per assembly (16)")
    verify.add_argument("--window-length", type=int, default=8192, help="bases per window (8192)")
    verify.add_argument("--seed", type=int, default=0)
    export = sub.add_parser("export-megatron", help="write PREFIX_<split>.bin/.idx for Megatron-LM")
    export.add_argument("corpus")
    export.add_argument("--prefix", required=True, help="output prefix")
    from megatron_geno.quiet import add_verbose

    add_verbose(parser, sub)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from megatron_geno.quiet import quiet_known_warnings

    quiet_known_warnings(args.verbose)  # export-megatron's megatron-core INFO lines
    from megatron_geno.lifetime import tie_forked_children

    tie_forked_children()  # helper processes die with this one, even on SIGKILL
    from data_pipeline.fasta import FastaError
    from data_pipeline.manifest import ManifestError
    from data_pipeline.normalise import PolicyError
    from data_pipeline.errors import PipelineError, ShardError
    from data_pipeline.splits import SplitError

    try:
        return _dispatch(args)
    except (FastaError, ManifestError, PolicyError, PipelineError, ShardError, SplitError) as err:
        print(f"geno-preprocess: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk while writing the manifest, run.json or an export
        from megatron_geno.files import free_bytes, out_of_space
        from megatron_geno.units import format_bytes

        if not (reason := out_of_space(err)):
            raise
        where = err.filename or getattr(args, "out", None) or getattr(args, "prefix", "")
        print(f"geno-preprocess: error: writing {where} failed: {reason} "
              f"({format_bytes(free_bytes(where))} free there); what was written before is kept "
              f"and its temporary file removed", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # each unfinished assembly's temporary group is removed
        print("geno-preprocess: interrupted: finished assemblies are kept and a rerun of the same "
              "command continues with the rest", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from data_pipeline.corpus_manifest import finalize, incomplete_hint, is_complete
    from data_pipeline.errors import PipelineError

    if args.command == "run":
        return _run(args)
    if args.command == "finalize":
        manifest = finalize(Path(args.corpus))
        if not is_complete(manifest):
            raise PipelineError(incomplete_hint(Path(args.corpus), manifest))
        print(f"wrote {args.corpus}/manifest.json: {len(manifest['assemblies'])} assemblies, "
              f"{manifest['totals']['tokens']:,d} tokens")
        return 0
    if args.command == "stats":
        from data_pipeline.corpus import Corpus, stats_table

        corpus = Corpus(args.corpus, incomplete_ok=True)
        print(stats_table(corpus))
        if corpus.complete:
            return 0
        print(f"geno-preprocess: {incomplete_hint(corpus.path, corpus.manifest)}", file=sys.stderr)
        return 1
    if args.command == "verify":
        from data_pipeline.verify import verify_corpus

        result = verify_corpus(args.corpus, args.windows, args.window_length, args.seed)
        for line in result.mismatches[:20]:
            print(f"MISMATCH {line}")
        ok = not result.mismatches
        print(f"verified {result.windows} windows, {result.bases:,d} bases: "
              f"{'OK' if ok else f'{len(result.mismatches)} mismatches'}")
        return 0 if ok else 1
    from data_pipeline.export import export_megatron

    written = export_megatron(args.corpus, args.prefix)
    for split in ("train", "valid", "test"):
        if split in written:
            print(f"{split}: {written[split]}.bin / {written[split]}.idx")
        else:
            print(f"{split}: no documents in this split, nothing written")
    return 0


def _run(args) -> int:
    import hashlib

    from data_pipeline.manifest import ManifestError, assemblies_from_paths, read_manifest, task_slice
    from data_pipeline.normalise import NormalisationPolicy
    from data_pipeline.run_config import PipelineConfig
    from data_pipeline.errors import PipelineError
    from data_pipeline.splits import SplitRules, parse_pairs
    from megatron_geno.files import DirectoryLock, DirectoryLocked

    if bool(args.manifest) == bool(args.fasta):
        raise ManifestError("give either --manifest or FASTA paths")
    if args.workers < 1:
        raise ManifestError(f"--workers must be >= 1, got {args.workers}")
    if args.read_chunk < 1000:
        raise ManifestError(f"--read-chunk must be at least 1K, got {args.read_chunk} bytes")
    assemblies = (read_manifest(args.manifest) if args.manifest
                  else assemblies_from_paths(args.fasta, args.species))
    config = PipelineConfig(
        policy=NormalisationPolicy(args.soft_mask, args.split_n_run, args.min_length,
                                   args.max_n_fraction),
        rules=SplitRules(parse_pairs(args.holdout_contigs, "--holdout-contigs"),
                         parse_pairs(args.holdout_samples, "--holdout-samples", float),
                         args.split_seed),
        part_tokens=args.part_size, compression_level=args.compression_level, codec=args.codec)
    mine = task_slice(assemblies, args.task_index, args.num_tasks)
    out = Path(args.out)
    # one writer per corpus and set of assemblies (the tasks of a SLURM array, which take
    # disjoint sets, write side by side)
    share = hashlib.sha256("\n".join(a.assembly for a in mine).encode()).hexdigest()[:12]
    lock = None
    try:
        if out.is_dir() or not out.exists():  # a file: prepare_out says so
            lock = DirectoryLock(out, f"writer-{share}")
    except DirectoryLocked as err:
        raise PipelineError(str(err)) from None
    except OSError as err:
        raise PipelineError(f"cannot write --out {out}: {err.strerror}") from None
    try:
        return _run_locked(args, out, config, assemblies, mine)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(args, out: Path, config, assemblies: list, mine: list) -> int:
    from data_pipeline.corpus_manifest import (finalize, incomplete_hint, is_complete,
                                               prepare_out, record_outcomes)
    from data_pipeline.errors import PipelineError
    from data_pipeline.pipeline import run

    prepare_out(out, config, assemblies, args.force, args.only_listed)
    # no more worker processes than assemblies to give them
    results = run(mine, out, config, min(args.workers, max(len(mine), 1)), args.force,
                  args.read_chunk)
    record_outcomes(out, config, mine, results)
    failed = [(name, info["message"]) for name, status, info in results if status == "error"]
    done = {s: sum(1 for _, st, _ in results if st == s) for s in ("written", "skipped")}
    print(f"{len(mine)} assemblies: {done['written']} written, {done['skipped']} already done, "
          f"{len(failed)} failed", file=sys.stderr)
    for name, message in failed:
        print(f"geno-preprocess: error: {message}", file=sys.stderr)
    if args.no_finalize or len(mine) < len(assemblies):
        if failed:
            print(f"geno-preprocess: the failures are recorded in {out}/failures; "
                  f"`geno-preprocess finalize {out}` after every task lists them in the manifest",
                  file=sys.stderr)
            return 2
        print(f"task done; run `geno-preprocess finalize {out}` after every task", file=sys.stderr)
        return 0
    try:
        manifest = finalize(out)
    except OSError as err:
        if not failed:
            raise
        # (a full disk: the assembly's own line above says so)
        print(f"geno-preprocess: {out}/manifest.json could not be written ({err.strerror}); a "
              f"rerun of the same command retries the failed assemblies", file=sys.stderr)
        return 2
    if not is_complete(manifest):  # the manifest lists what is missing; the hint, the way on
        if not failed:
            raise PipelineError(incomplete_hint(out, manifest))
        print(f"geno-preprocess: {incomplete_hint(out, manifest)}", file=sys.stderr)
        return 2
    t = manifest["totals"]
    if not t["tokens"]:
        policy = config.policy
        print(f"geno-preprocess: error: {out} holds no sequence: every contig of "
              f"{', '.join(a['assembly'] for a in manifest['assemblies'])} is shorter than "
              f"--min-length {policy.min_length} or more than --max-n-fraction "
              f"{policy.max_n_fraction:g} N", file=sys.stderr)
        return 2
    print(f"wrote {out}/manifest.json: {len(manifest['assemblies'])} assemblies, "
          f"{t['tokens']:,d} tokens ({t['split_tokens']['train']:,d} train, "
          f"{t['split_tokens']['valid']:,d} valid, {t['split_tokens']['test']:,d} test)")
    for split in ("train", "valid"):
        if not t["split_tokens"][split]:
            why = ("every document is held out by --holdout-contigs / --holdout-samples: "
                   "geno-train cannot train on it" if split == "train" else
                   "nothing is held out: geno-train's validation (schedule.eval_interval) needs "
                   "--holdout-contigs or --holdout-samples, or a validation corpus")
            print(f"geno-preprocess: warning: {out} has an empty {split} split: {why}",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
