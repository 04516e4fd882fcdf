"""Run the Megatron model and transformers' Mixtral on the same DNA and compare logits and routing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from checkpoint_tools.mcore_checkpoint import ConversionError, open_checkpoint


@dataclass
class VerifyResult:
    max_abs_logit_diff: float
    router_topk_agreement: float  # fraction of (token, layer) whose top-k expert sets agree
    tokens: int


def dna_tokens(length: int, seed: int = 0) -> torch.Tensor:
    """Returns [1, length] ids of a random DNA sequence (A C G T, with a few N)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 9, size=length)
    ids[rng.random(length) < 0.01] = 9
    return torch.from_numpy(ids).long()[None]


def megatron_logits(checkpoint: Path, iteration: Optional[int], tokens: torch.Tensor,
                    verify_checksums: bool = True):
    """Returns (logits [1, s, V], per-layer routing maps) from the checkpoint at TP=PP=EP=1."""
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
    with torch.no_grad():
        logits = model(tokens, positions, None)
    return logits.float(), routes


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
    ref, ref_routes = megatron_logits(Path(checkpoint), iteration, tokens, verify_checksums)
    out, out_routes = hf_logits(Path(hf_dir), tokens)
    if ref.shape != out.shape:
        raise ConversionError(f"logit shapes differ: megatron {tuple(ref.shape)} vs HF {tuple(out.shape)}")
    agree = [
        (ref_routes[layer] == out_routes[layer]).all(dim=-1).float().mean().item()
        for layer in sorted(ref_routes)
    ]
    return VerifyResult(
        max_abs_logit_diff=(ref - out).abs().max().item(),
        router_topk_agreement=float(np.mean(agree)) if agree else 1.0,
        tokens=length,
    )
