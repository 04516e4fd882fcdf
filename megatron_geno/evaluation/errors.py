"""geno-eval's error and its argument checks (light: refusals come before torch is imported)."""

from __future__ import annotations

from pathlib import Path
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
    # a missing model: said before torch and megatron-core are imported
    if checkpoint is not None and not Path(checkpoint).exists():
        raise EvalError(f"checkpoint {checkpoint} does not exist")
    if hf is not None and not (Path(hf) / "config.json").is_file():
        raise EvalError(f"--hf {hf}: no config.json there (not a HuggingFace export)")
