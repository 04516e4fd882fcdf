"""Fused elementwise work without Transformer Engine (model.fusions).

Without TE, a layer's elementwise work runs as dozens of small kernels: RMSNorm in fp32, RoPE's
cos/sin/rotate/cat, SwiGLU and the cross-entropy over the vocabulary. With fusions on:

- SwiGLU (experts): megatron-core's ``weighted_bias_swiglu_impl`` (``bias_activation_fusion``),
  compiled by megatron-core's ``jit_fuser`` (``torch.compile``);
- cross-entropy, in bf16 runs: megatron-core's ``fused_vocab_parallel_cross_entropy``
  (``cross_entropy_loss_fusion``, native implementation, ``jit_fuser`` too). Its gradient is
  always bf16 (megatron-core 0.16.1 casts it), so fp32 runs keep the unfused cross-entropy;
- RMSNorm: ``rms_norm`` below, compiled (``megatron_geno.norm.RMSNorm(fused=True)``);
- RoPE: ``rope`` below, compiled, installed as megatron-core's ``fused_apply_rotary_pos_emb``
  (the hook TE fills when present; ``apply_rope_fusion``).

``torch.compile`` generates Triton kernels on a GPU (Triton ships with CUDA torch) and C++ on a
CPU (it needs a C++ compiler there). The eager functions below are the references the tests
compare the compiled ones with.
"""

from __future__ import annotations

import functools
import logging

import torch


log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back before the weight (as HuggingFace Mixtral computes it)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding on [seq, batch, heads, dim] (megatron-core's unfused bshd arithmetic:
    cos and sin of fp32 angles cast to t's dtype, halves rotated)."""
    if interleaved:
        raise NotImplementedError("rope: interleaved rotary embedding (Genos uses halves)")
    rot = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    cos = torch.cos(freqs).to(t.dtype)
    sin = torch.sin(freqs).to(t.dtype)
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((t_rot * cos + rotated * sin, t_pass), dim=-1)


class CompiledRegion:
    """A function run through torch.compile with no silent recompiles or eager fallbacks.

    - The sequence axis (dim 0 of every tensor argument: [seq, batch, ...]) is marked dynamic, so
      one compilation serves every sequence length (training, evaluation, context-parallel
      chunks); ``maybe_mark_dynamic`` leaves an axis static where its size makes that necessary.
    - ``fullgraph``: a graph break is an error, never a region run partly eagerly.
    - A further compilation (a new dtype, hidden size, batch size or grad mode) is logged once per
      region with the count so far; so is reaching torch's recompile limit, past which torch runs
      new inputs eagerly.
    """

    def __init__(self, name: str, fn) -> None:
        self.name, self.fn = name, fn
        self.compiled = torch.compile(fn, dynamic=None, fullgraph=True)
        self.variants = 0
        self.said = set()

    def __call__(self, *args):
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        out = self.compiled(*args)
        variants = self.compilations()
        if variants != self.variants:
            self.variants = variants
            if variants > 1 and "again" not in self.said:
                self.said.add("again")
                log.warning("torch.compile compiled %s again (%d compilations): an input of a "
                            "new dtype, width or batch size; each new one compiles once more",
                            self.name, variants)
            if variants >= torch._dynamo.config.recompile_limit and "limit" not in self.said:
                self.said.add("limit")
                log.warning("torch.compile reached its recompile limit (%d) for %s: further new "
                            "inputs run it eagerly", variants, self.name)
        return out

    def compilations(self) -> int:
        """How many compiled variants of the function torch holds."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self.fn.__code__))


@functools.cache
def compiled(name: str) -> CompiledRegion:
    """The compiled form of rms_norm or rope (compiled at first call, one region per process)."""
    return CompiledRegion(name, {"rms_norm": rms_norm, "rope": rope}[name])


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """megatron-core's ``fused_apply_rotary_pos_emb`` signature, compiled."""
    return compiled("rope")(t, freqs, interleaved)


def install_rope() -> None:
    """Fills megatron-core's fused-RoPE hook with ``fused_rope`` where TE has not filled it."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope


def transformer_fields(runtime) -> dict:
    """megatron-core's TransformerConfig fusion fields for a resolved Runtime (TE brings its own
    kernels for RoPE, softmax and bias-dropout; runtime.fusions, model.fusions resolved, adds
    SwiGLU and, in bf16, cross-entropy)."""
    te, fused = runtime.te, runtime.fusions
    fields = {"bias_dropout_fusion": te, "masked_softmax_fusion": te,
              "apply_rope_fusion": te or fused, "bias_activation_fusion": fused}
    if fused:
        install_rope()
        if runtime.precision == "bf16":
            fields.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")
    return fields
