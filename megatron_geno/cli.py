"""geno-train: train a Genos model (single process, or one process per GPU under torchrun)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_geno.lifetime import die_with_parent_if_spawned

die_with_parent_if_spawned()  # in a multiprocessing spawn child (which imports the main module)

EPILOG = """\
examples:
  geno-train --preset tiny schedule.train_iters=100              # CPU, one process
  torchrun --nproc-per-node 2 -m megatron_geno.cli --preset tiny parallel.tensor_parallel=2
  geno-train --config launch/recipes/genos-1.2b-8k.yaml checkpoint.load=ckpt/
  geno-train --preset genos-10b --print-params

Overrides are key.sub=value (value read as YAML); unknown keys are an error.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="geno-train",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (sections: model, parallel, data, "
                        "optimizer, schedule, checkpoint, logging)")
    parser.add_argument("--preset", help="model preset: tiny, genos-1.2b, genos-10b "
                        "(same as model.preset=NAME)")
    parser.add_argument("--print-params", action="store_true",
                        help="print total and active parameter counts without building the model")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="show the known third-party warnings hidden by default")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser.parse_intermixed_args(argv)


def print_params(cfg) -> None:
    from megatron_geno.arithmetic import count_parameters, resolve_padded_vocab
    from megatron_geno.presets import PUBLISHED_PARAMS
    from megatron_geno.vocab import VOCAB_SIZE

    vocab = resolve_padded_vocab(cfg.model, VOCAB_SIZE, 1)
    counts = count_parameters(cfg.model, vocab)
    print(f"preset {cfg.model.preset}: padded vocab {vocab}")
    def short(n: int) -> str:
        return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"

    print(f"  total parameters : {counts['total']:>15,d}  ({short(counts['total'])})")
    print(f"  active per token : {counts['active']:>15,d}  ({short(counts['active'])})")
    if cfg.model.preset in PUBLISHED_PARAMS:
        total, active = PUBLISHED_PARAMS[cfg.model.preset]
        print(f"  published        : {total / 1e9:.2f} B total, {active / 1e9:.2f} B active "
              f"(ours {counts['total'] / total - 1:+.1%}, {counts['active'] / active - 1:+.1%})")


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_geno.quiet import quiet_known_warnings

    quiet_known_warnings(args.verbose)
    from megatron_geno.lifetime import tie_forked_children

    tie_forked_children()  # helper processes die with this one, even on SIGKILL
    from megatron_geno.config import ConfigError, load_config  # no megatron-core import yet

    overrides = list(args.overrides)
    if args.preset:
        overrides.insert(0, f"model.preset={args.preset}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"geno-train: error: {err}", file=sys.stderr)
        return 2
    if args.print_params:
        print_params(cfg)
        return 0
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    from megatron_geno.layout import validate_layout  # config only: no megatron-core yet
    from megatron_geno.sources import check_sources

    try:  # the layout against the world torchrun / srun set up, and the data files, before
        # anything heavy is imported
        validate_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        check_sources(cfg)
    except ConfigError as err:
        print(f"geno-train: error: {err}", file=sys.stderr)
        return 2
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_known_warnings(args.verbose)  # again: basicConfig set the levels
    from megatron_geno import distributed
    from megatron_geno.checkpointing import CheckpointError
    from megatron_geno.train import TrainingDiverged, train

    from data_pipeline.errors import ShardError

    try:
        train(cfg)
    except (ConfigError, CheckpointError, TrainingDiverged) as err:
        print(f"geno-train: error: {err}", file=sys.stderr)
        distributed.destroy()  # every rank meets these alike; no rank is left in a collective
        return 2
    except OSError as err:  # a run directory or cache that cannot be written (checked at start)
        from megatron_geno.files import out_of_space

        where = f"{err.filename}: " if err.filename else ""
        print(f"geno-train: error: cannot write {where}{out_of_space(err) or err.strerror or err}",
              file=sys.stderr)
        distributed.destroy()
        return 2
    except ShardError as err:  # a damaged corpus file, met by the rank that reads it
        print(f"geno-train: error: {err} (geno-preprocess verify finds such damage)",
              file=sys.stderr)
        distributed.destroy()
        return 2
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
