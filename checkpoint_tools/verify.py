"""Run the Megatron model and transformers' Mixtral on the same DNA and compare logits and routing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from checkpoint_tools.mcore_checkpoint import ConversionError, open_checkpoint


@dataclass
class LogitAgreement:
    max_abs_diff: float
    cosine: float  # mean over tokens of the cosine similarity of the two logit vectors
    top1: float  # fraction of tokens whose most likely next token agrees


def compare_logits(ref: torch.Tensor, out: torch.Tensor) -> LogitAgreement:
    ref, out = ref.reshape(-1, ref.shape[-1]).double(), out.reshape(-1, out.shape[-1]).double()
    return LogitAgreement(
        max_abs_diff=(ref - out).abs().max().item(),
        cosine=torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean().item(),
        top1=(ref.argmax(-1) == out.argmax(-1)).double().mean().item())


@dataclass
class VerifyResult:
    max_abs_logit_diff: float  # Megatron (weights rounded to the export dtype) vs transformers
    router_topk_agreement: float  # fraction of (token, layer) whose top-k expert sets agree
    tokens: int
    cosine: float = 1.0
    top1_agreement: float = 1.0
    export_dtype: str = "float32"
    # bf16 exports only: the checkpoint's own (fp32) logits against the export's, i.e. what the
    # export precision costs, reported beside the conversion check
    precision_loss: Optional[LogitAgreement] = None


def dna_tokens(length: int, seed: int = 0) -> torch.Tensor:
    """Returns [1, length] ids of a random DNA sequence (A C G T, with a few N)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 9, size=length)
    ids[rng.random(length) < 0.01] = 9
    return torch.from_numpy(ids).long()[None]


def megatron_logits(checkpoint: Path, iteration: Optional[int], tokens: torch.Tensor,
                    verify_checksums: bool = True, round_to: torch.dtype = torch.float32):
    """Returns (logits [1, s, V], per-layer routing maps, and with round_to other than fp32 the
    logits of the unrounded weights) from the checkpoint at TP=PP=EP=1, computed in fp32 with
    the weights rounded to round_to (the export's dtype)."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_geno import distributed
    from megatron_geno.checkpointing import load_model_weights
    from megatron_geno.config import TrainConfig
    from megatron_geno.model import build_gpt_model
    from megatron_geno.tokenizer import VOCAB_SIZE

    ckpt = open_checkpoint(checkpoint, iteration, verify_checksums)
    cfg = TrainConfig(model=ckpt.model, precision="fp32")
    distributed.initialize(cfg, seed=0)
    model = build_gpt_model(cfg, VOCAB_SIZE)
    load_model_weights([model], ckpt.path, ckpt.common)
    model.eval()
    routes: dict[int, torch.Tensor] = {}

    def hook(module, _inputs, output):
        routes[module.layer_number - 1] = output[1].detach()

    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(hook)
    positions = torch.arange(tokens.shape[1])[None]
    exact = None
    with torch.no_grad():
        if round_to != torch.float32:
            exact = model(tokens, positions, None).float()
            for param in model.parameters():
                param.copy_(param.to(round_to).float())
        logits = model(tokens, positions, None)
    return logits.float(), routes, exact


def hf_logits(hf_dir: Path, tokens: torch.Tensor):
    """Returns (logits [1, s, V], per-layer routing maps) from transformers' model."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConversionError(f"transformers cannot load {hf_dir}: {str(err).splitlines()[0]}") from err
    model.eval()
    routes: dict[int, torch.Tensor] = {}
    num_experts = model.config.num_local_experts

    def make_hook(layer):
        def hook(_module, _inputs, output):
            indices = output[2] if isinstance(output, tuple) and len(output) == 3 else None
            if indices is None:  # older transformers: the gate is a Linear returning logits
                indices = torch.topk(output, model.config.num_experts_per_tok, dim=-1).indices
            mask = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool)
            routes[layer] = mask.scatter_(1, indices, True)

        return hook

    for layer, block in enumerate(model.model.layers):
        moe = getattr(block, "mlp", None) or getattr(block, "block_sparse_moe")
        moe.gate.register_forward_hook(make_hook(layer))
    with torch.no_grad():
        logits = model(tokens).logits
    return logits.float(), routes


def verify(checkpoint: str | Path, hf_dir: str | Path, length: int = 2048,
           iteration: Optional[int] = None, seed: int = 0,
           verify_checksums: bool = True) -> VerifyResult:
    """Compares fp32 logits and router top-k choices of the two formats on one DNA sequence."""
    tokens = dna_tokens(length, seed)
    export_dtype = export_dtype_of(Path(hf_dir))
    ref, ref_routes, exact = megatron_logits(Path(checkpoint), iteration, tokens,
                                             verify_checksums, EXPORT_DTYPES[export_dtype])
    out, out_routes = hf_logits(Path(hf_dir), tokens)
    if ref.shape != out.shape:
        raise ConversionError(f"logit shapes differ: megatron {tuple(ref.shape)} vs HF {tuple(out.shape)}")
    agree = [
        (ref_routes[layer] == out_routes[layer]).all(dim=-1).float().mean().item()
        for layer in sorted(ref_routes)
    ]
    logits = compare_logits(ref, out)
    return VerifyResult(
        max_abs_logit_diff=logits.max_abs_diff,
        router_topk_agreement=float(np.mean(agree)) if agree else 1.0,
        tokens=length, cosine=logits.cosine, top1_agreement=logits.top1,
        export_dtype=export_dtype,
        precision_loss=compare_logits(exact, out) if exact is not None else None,
    )


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_dtype_of(hf_dir: Path) -> str:
    """The export's weight dtype from config.json's torch_dtype (float32 when absent)."""
    import json

    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read {hf_dir / 'config.json'} ({err})") from None
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"{hf_dir / 'config.json'}: torch_dtype {dtype!r} is not one of "
                              f"{', '.join(EXPORT_DTYPES)}")
    return dtype
