"""geno-eval: score a checkpoint (geno-train, any layout it was saved at) or a HuggingFace export.

  loss      held-out loss per assembly and species on token-store corpora (nats, bits per base)
  variants  zero-shot variant effect: log-likelihood ratio of ALT against REF windows of a VCF
  embed     per-sequence embeddings (mean and last token of one layer) of a FASTA or BED regions

A Megatron checkpoint is scored at --tensor-parallel x --pipeline-parallel x --context-parallel
over the processes torchrun starts (the rest of the world is data parallel); an export through
transformers in one process. Both give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from megatron_geno.lifetime import die_with_parent_if_spawned

die_with_parent_if_spawned()  # in a multiprocessing spawn child (which imports the main module)

EPILOG = """\
examples:
  geno-eval loss --checkpoint runs/ckpt --corpus corpus/human --corpus corpus/primates --window 4096
  geno-eval loss --hf hf/genos --corpus corpus/human --split test --windows 200 --json loss.json
  torchrun --nproc-per-node 2 -m megatron_geno.evaluation.cli loss --checkpoint runs/ckpt \\
      --tensor-parallel 2 --corpus corpus/human
  geno-eval variants --checkpoint runs/ckpt --vcf clinvar.vcf.gz --reference hg38.fa.gz \\
      --window 1024 --both-strands --label-field CLNSIG --out scores.tsv
  geno-eval embed --hf hf/genos --fasta promoters.fa --layer 6 --window 2048 --out promoters.npy
  geno-eval embed --checkpoint runs/ckpt --bed regions.bed --reference hg38.fa --out regions.zarr

Bad input (a missing or damaged file, an unsorted or unindexed compressed VCF, a contig missing
from the reference, a directory that is not a Mixtral export) is one 'geno-eval: error:' line and
exit code 2; per-record problems (REF mismatch, a window past a contig end) are counted.
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (exactly one of --checkpoint and --hf)")
    g.add_argument("--checkpoint", help="geno-train checkpoint: save dir (its latest) or iter_N")
    g.add_argument("--iteration", type=int, help="with --checkpoint: this iteration")
    g.add_argument("--hf", help="HuggingFace Mixtral export (geno-convert to-hf)")
    g.add_argument("--tensor-parallel", type=int, default=1, help="TP for --checkpoint (1)")
    g.add_argument("--pipeline-parallel", type=int, default=1, help="PP for --checkpoint (1)")
    g.add_argument("--context-parallel", type=int, default=1,
                   help="CP for --checkpoint (1): each window split over CP ranks, for windows "
                   "longer than one device holds")
    g.add_argument("--no-verify-checksums", action="store_true",
                   help="skip the checkpoint's checksum check")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (8)")
    p.add_argument("--window", type=int, default=1024, help="window length in tokens (1024)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="geno-eval", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    loss = sub.add_parser("loss", help="held-out loss per assembly and species",
                          description="Loss (nats) and bits per base on non-overlapping windows "
                          "of each document of a split; a window never crosses an EOD.")
    _model_args(loss)
    loss.add_argument("--corpus", action="append", required=True,
                      help="token-store corpus directory (repeatable)")
    loss.add_argument("--split", default="valid", help="valid (default) or test")
    loss.add_argument("--windows", type=int, help="score a deterministic sample of N windows")
    loss.add_argument("--seed", type=int, default=0, help="the sample's seed (0)")
    loss.add_argument("--json", help="also write the result as JSON to this file")

    var = sub.add_parser("variants", help="zero-shot variant effect (log-likelihood ratio)",
                         description="Score = log p(ALT window) - log p(REF window) for every SNV "
                         "and short indel, in a window of --window bases centred on it.")
    _model_args(var)
    var.add_argument("--vcf", required=True, help="VCF or BCF (plain, or bgzipped and indexed)")
    var.add_argument("--reference", required=True,
                     help="reference FASTA (plain, or bgzip with .fai/.gzi)")
    var.add_argument("--both-strands", action="store_true",
                     help="average with the reverse-complement windows' score")
    var.add_argument("--label-field", help="INFO field with labels (e.g. CLNSIG): AUROC")
    var.add_argument("--out", required=True, help="TSV: chrom pos id ref alt score status label")
    var.add_argument("--json", help="also write counts and AUROC as JSON to this file")

    emb = sub.add_parser("embed", help="per-sequence embeddings of one layer",
                         description="Mean over tokens and last token of a layer's hidden "
                         "states; longer sequences are cut into windows of --window tokens.")
    _model_args(emb)
    emb.add_argument("--fasta", help="FASTA of the sequences (plain or gzip)")
    emb.add_argument("--bed", help="BED regions on --reference")
    emb.add_argument("--reference", help="reference FASTA for --bed")
    emb.add_argument("--layer", type=int,
                     help="0 embeddings, 1..L-1 after that layer, L (default) after the final norm")
    emb.add_argument("--out", required=True, help="OUT.npy (+ OUT.names.txt) or OUT.zarr")
    from megatron_geno.quiet import add_verbose

    add_verbose(parser, sub)
    return parser.parse_args(argv)


def _progress(rank0: bool):
    if not rank0:
        return None
    from megatron_geno.progress import progress

    return lambda it, desc, total=None: progress(it, desc=desc, total=total, leave=False)


def _check_outputs(args) -> None:
    from megatron_geno.evaluation.errors import EvalError

    for flag in ("out", "json"):
        path = getattr(args, flag, None)
        if path is None:
            continue
        p = Path(path)
        if p.is_dir():
            raise EvalError(f"--{flag} {p} is a directory")
        if not p.parent.exists():
            raise EvalError(f"--{flag} {p}: directory {p.parent} does not exist")
    for flag in ("vcf", "reference"):  # inputs first: no model is loaded for a missing file
        path = getattr(args, flag, None)
        if path is not None and not Path(path).is_file():
            raise EvalError(f"--{flag} {path} does not exist")
    for corpus in getattr(args, "corpus", None) or []:
        if not (Path(corpus) / "manifest.json").is_file():
            raise EvalError(f"--corpus {corpus}: no manifest.json (not a finished corpus)")
        from data_pipeline.corpus_manifest import read_manifest_json
        from data_pipeline.errors import PipelineError

        try:  # a damaged or incomplete corpus: before any model is loaded
            read_manifest_json(Path(corpus))
        except PipelineError as err:
            raise EvalError(f"--corpus: {err}") from None
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be positive, got {args.batch_size}")
    if min(args.tensor_parallel, args.pipeline_parallel, args.context_parallel) < 1:
        raise EvalError("--tensor-parallel, --pipeline-parallel and --context-parallel must be "
                        "positive")


def run(args) -> int:
    from megatron_geno.evaluation.errors import EvalError, check_model_choice

    try:
        check_model_choice(args.checkpoint, args.hf, args.iteration, args.tensor_parallel,
                           args.pipeline_parallel, args.context_parallel)  # before torch
        _check_outputs(args)
        from megatron_geno.evaluation.models import open_model
        from megatron_geno.quiet import hide_stream_order_note

        hide_stream_order_note()  # (advice for the backward pass; eval runs none)

        if args.command == "embed":  # inputs first: no model is loaded for a bad FASTA
            from megatron_geno.evaluation.embed import read_sequences

            records = read_sequences(args.fasta, args.bed, args.reference)
        model = open_model(args.checkpoint, args.hf, args.iteration, args.tensor_parallel,
                           args.pipeline_parallel, not args.no_verify_checksums,
                           args.context_parallel)
        import torch

        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        progress = _progress(rank0)
        if args.command == "loss":
            from megatron_geno.evaluation.loss import evaluate_loss, format_loss_table

            result = evaluate_loss(model, args.corpus, args.split, args.window, args.windows,
                                   args.batch_size, args.seed, progress)
            if rank0:
                print(format_loss_table(result))
                if args.json:
                    from megatron_geno.files import write_text_atomic

                    write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        elif args.command == "variants":
            from megatron_geno.evaluation.variants import score_variants, summary, write_tsv

            result = score_variants(model, args.vcf, args.reference, args.window,
                                    args.both_strands, args.label_field, args.batch_size,
                                    progress)
            if rank0:
                write_tsv(result, args.out)
                print(summary(result))
                print(f"scores: {args.out}")
                if args.json:
                    from megatron_geno.files import write_text_atomic

                    doc = {k: v for k, v in result.items() if k != "variants"}
                    write_text_atomic(args.json, json.dumps(doc, indent=2) + "\n")
        else:
            from megatron_geno.evaluation.embed import embed, write_embeddings

            mean, last = embed(model, records, args.layer, args.window, args.batch_size, progress)
            if rank0:
                written = write_embeddings(args.out, [name for name, _ in records], mean, last)
                print(f"{len(records):,d} sequences, hidden size {mean.shape[1]}, layer "
                      f"{model.num_layers if args.layer is None else args.layer}: "
                      f"{', '.join(map(str, written))}")
    except EvalError as err:
        print(f"geno-eval: error: {err}", file=sys.stderr)
        return 2
    finally:
        if "torch" in sys.modules:  # (a refused argument never imported it)
            import torch

            if torch.distributed.is_initialized():
                from megatron_geno import distributed

                distributed.finish()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_geno.quiet import quiet_known_warnings

    quiet_known_warnings(args.verbose)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
