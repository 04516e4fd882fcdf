"""geno-eval's error and its argument checks (light: refusals come before torch is imported)."""

from __future__ import annotations

from typing import Optional


class EvalError(RuntimeError):
    """Input geno-eval refuses; the message names the file, record or option at fault."""


def check_model_choice(checkpoint: Optional[str], hf: Optional[str], iteration: Optional[int],
                       tensor_parallel: int, pipeline_parallel: int,
                       context_parallel: int) -> None:
    """EvalError unless exactly one of --checkpoint and --hf is given, with the options that
    apply to it."""
    if (checkpoint is None) == (hf is None):
        raise EvalError("give exactly one of --checkpoint (a geno-train checkpoint) and --hf "
                        "(a HuggingFace export)")
    if hf is not None and (tensor_parallel != 1 or pipeline_parallel != 1
                           or context_parallel != 1 or iteration is not None):
        raise EvalError("--tensor-parallel, --pipeline-parallel, --context-parallel and "
                        "--iteration apply to --checkpoint only")
