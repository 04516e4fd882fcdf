"""Known third-party warnings, hidden by default (every CLI's --verbose shows them).

Each entry was seen on this project's own paths and says nothing a user can act on: megatron-core
noting that Transformer Engine / apex are absent (the pip-only path expects that), deprecations
inside megatron-core and torch, megatron-core's own note that zeroing fp32 shard groups touches
non-leaf .grad (distrib_optimizer.py says so itself), and its rerun state machine's start-up lines.
htslib's own `[E::...]` / `[W::...]` lines (pysam) are silenced where pysam is imported
(`megatron_geno.evaluation.models.pysam_module`): our error line says the same in words.
"""

from __future__ import annotations

import logging
import warnings

KNOWN_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    r"`torch.distributed.reduce_scatter_tensor` is deprecated",
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
    "The 'megatron.core.transformer.custom_layers.transformer_engine'",
    "__array__ implementation doesn't accept a copy keyword",
    # torch.distributed.checkpoint, called by megatron-core's checkpoint loader
    "`load_state_dict` is deprecated and will be removed",
    "Please use DTensor instead and we are deprecating ShardedTensor",
    # ... and in a one-process conversion, which needs no process group for its reads
    "torch.distributed is disabled, unavailable or uninitialized",
)
# megatron-core loggers whose INFO / WARNING start-up lines are noise here
QUIET_LOGGERS = ("megatron", "megatron.core", "megatron.core.rerun_state_machine",
                 "megatron.core.datasets")


_VERBOSE = [False]  # what the running tool's --verbose said


def is_verbose() -> bool:
    return _VERBOSE[0]


def quiet_known_warnings(verbose: bool = False) -> None:
    """Hides KNOWN_WARNINGS and megatron-core's chatty loggers, unless verbose."""
    _VERBOSE[0] = bool(verbose)
    if verbose:
        return
    for text in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


# megatron-core's advice for overlapping tensor-parallel communication with the backward pass
# (tensor_parallel/layers.py). It is for training on CUDA; launch/torchrun.sh sets the variable.
STREAM_ORDER_NOTE = "environment variable CUDA_DEVICE_MAX_CONNECTIONS to 1"


def hide_stream_order_note() -> None:
    """Hides STREAM_ORDER_NOTE (unless --verbose) where it cannot apply: on CPU, and in
    geno-eval, which runs no backward pass."""
    if not _VERBOSE[0]:
        warnings.filterwarnings("ignore", message=f".*{STREAM_ORDER_NOTE}")


def add_verbose(parser, subcommands=None) -> None:
    """``--verbose`` on a tool and on each of its subcommands, so that it works before or after
    the subcommand's name (``geno-convert --verbose inspect X`` and ``geno-convert inspect X
    --verbose``). A subcommand's own flag defaults to SUPPRESS: left out, it keeps the tool's."""
    import argparse

    text = "show the known third-party warnings hidden by default"
    parser.add_argument("--verbose", action="store_true", help=text)
    for sub in (subcommands.choices.values() if subcommands is not None else ()):
        sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=text)
