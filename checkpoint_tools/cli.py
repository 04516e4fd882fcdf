"""geno-convert: Megatron torch_dist checkpoints <-> HuggingFace Mixtral directories, verified."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_geno.lifetime import die_with_parent_if_spawned

die_with_parent_if_spawned()  # in a multiprocessing spawn child (which imports the main module)

EPILOG = """\
examples:
  geno-convert to-hf --checkpoint runs/ckpt --out hf/genos-tiny           # latest iteration
  geno-convert to-hf --checkpoint runs/ckpt --iteration 500 --out hf/x --dtype bf16 --shard-size 2GB
  geno-convert verify --checkpoint runs/ckpt --hf hf/genos-tiny           # exit 1 above --threshold
  geno-convert from-hf --hf hf/genos-tiny --out ckpt/imported
  geno-train --config ckpt/imported/model.yaml checkpoint.load=ckpt/imported   # continue training
  geno-convert inspect runs/ckpt
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="geno-convert", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="torch_dist checkpoint -> HuggingFace Mixtral directory")
    to_hf.add_argument("--checkpoint", required=True, help="save dir (uses 'latest') or iter_N dir")
    to_hf.add_argument("--iteration", type=int, help="iteration to convert (default: latest)")
    to_hf.add_argument("--out", required=True, help="new output directory (must not exist, or be "
                       "an empty directory); written beside it first, renamed when complete")
    to_hf.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    to_hf.add_argument("--shard-size", default="1GB",
                       help="max safetensors file size (1GB); conversion holds one file in memory")
    from_hf = sub.add_parser("from-hf", help="HuggingFace Mixtral directory -> torch_dist checkpoint")
    from_hf.add_argument("--hf", required=True, help="directory with config.json and safetensors")
    from_hf.add_argument("--out", required=True, help="new output save dir (must not exist, or be "
                         "an empty directory); written beside it first, renamed when complete")
    inspect = sub.add_parser("inspect", help="config, iteration, layout and tensors of a checkpoint")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--iteration", type=int)
    verify = sub.add_parser("verify", help="compare Megatron and transformers logits (the Megatron "
                            "weights rounded to the export's dtype, both computed in fp32)")
    verify.add_argument("--checkpoint", required=True)
    verify.add_argument("--iteration", type=int)
    verify.add_argument("--hf", required=True)
    verify.add_argument("--tokens", type=int, default=2048, help="DNA sequence length (2048)")
    verify.add_argument("--threshold", type=float, default=1e-4,
                        help="max absolute logit difference allowed (1e-4)")
    for command in (to_hf, inspect, verify):
        command.add_argument("--no-verify-checksums", dest="verify_checksums",
                             action="store_false",
                             help="skip checking every stored byte against the checksums "
                             "written at save (faster; damage then goes unnoticed)")
    from megatron_geno.quiet import add_verbose

    add_verbose(parser, sub)
    return parser.parse_args(argv)


def check_inputs(args) -> None:
    """A missing --checkpoint or --hf is one line without torch or megatron-core (the readers
    check the same again, with the contents)."""
    from checkpoint_tools.errors import ConversionError

    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and not Path(checkpoint).exists():
        raise ConversionError(f"checkpoint {checkpoint} does not exist")
    hf = getattr(args, "hf", None)
    if hf is not None and not Path(hf).is_dir():
        raise ConversionError(f"--hf {hf} is not a directory")


def inspect_checkpoint(path: str, iteration, verify_checksums: bool = True) -> None:
    from checkpoint_tools.mcore_checkpoint import open_checkpoint

    ckpt = open_checkpoint(path, iteration, verify_checksums)
    print(f"checkpoint   {ckpt.path}")
    print(f"iteration    {ckpt.iteration if ckpt.iteration is not None else 'n/a (weights only)'}")
    print(f"layout       {json.dumps(ckpt.common.get('layout', {}))}")
    if ckpt.common.get("imported_from"):
        print(f"imported     {ckpt.common['imported_from']}")
    print("model        " + json.dumps(ckpt.common.get("model_config", {})))
    total = 0
    print("tensors:")
    for key in sorted(ckpt.shapes):
        shape = ckpt.shapes[key]
        numel = 1
        for dim in shape:
            numel *= dim
        if not key.startswith(("optimizer", "chained_")):
            total += numel
        print(f"  {key:<72} {str(list(shape)):<22} {str(ckpt.dtypes[key]).replace('torch.', '')}")
    print(f"model parameters: {total:,d}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_geno.lifetime import tie_forked_children

    tie_forked_children()  # helper processes die with this one, even on SIGKILL
    from megatron_geno.quiet import quiet_known_warnings

    quiet_known_warnings(args.verbose)
    from megatron_geno.progress import progress

    from checkpoint_tools.errors import ConversionError
    from checkpoint_tools.output_dir import check_out
    from megatron_geno.checkpoint.errors import CheckpointError

    try:
        check_inputs(args)  # before torch and megatron-core are imported
        if args.command in ("to-hf", "from-hf"):
            check_out(Path(args.out))
        if args.command == "to-hf":
            from checkpoint_tools.to_hf import mcore_to_hf

            out = mcore_to_hf(args.checkpoint, args.out, args.dtype, args.shard_size,
                              args.iteration, progress=progress,
                              verify_checksums=args.verify_checksums)
            print(f"wrote {out}")
        elif args.command == "from-hf":
            from checkpoint_tools.from_hf import hf_to_mcore

            out = hf_to_mcore(args.hf, args.out, progress=progress)
            print(f"wrote {out}; continue with: geno-train --config {out}/model.yaml "
                  f"checkpoint.load={out}")
        elif args.command == "inspect":
            inspect_checkpoint(args.checkpoint, args.iteration, args.verify_checksums)
        else:
            from checkpoint_tools.verify import verify

            result = verify(args.checkpoint, args.hf, args.tokens, args.iteration,
                            verify_checksums=args.verify_checksums)
            ok = result.max_abs_logit_diff <= args.threshold
            print(f"tokens {result.tokens}  export {result.export_dtype}  max |logit diff| "
                  f"{result.max_abs_logit_diff:.3e}  cosine {result.cosine:.6f}  top-1 agreement "
                  f"{result.top1_agreement:.4f}  router top-k agreement "
                  f"{result.router_topk_agreement:.4f}  {'OK' if ok else 'FAIL'} (threshold "
                  f"{args.threshold:g})")
            if result.precision_loss is not None:
                loss = result.precision_loss
                print(f"export precision ({result.export_dtype} against the checkpoint's fp32 "
                      f"weights, for information): max |logit diff| {loss.max_abs_diff:.3e}  "
                      f"cosine {loss.cosine:.6f}  top-1 agreement {loss.top1:.4f}")
            return 0 if ok else 1
    except (ConversionError, CheckpointError) as err:
        print(f"geno-convert: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the output's temporary directory is removed on the way out
        print("geno-convert: interrupted: nothing was written", file=sys.stderr)
        return 130
    finally:  # the one-process group of checkpoint I/O and verify; gloo aborts if it outlives exit
        if "torch" in sys.modules:  # (a refused argument never imported it)
            import torch

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
