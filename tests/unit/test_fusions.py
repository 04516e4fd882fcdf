"""Every fused op (model.fusions=on, torch.compile) against its eager reference, forward and
backward in fp32: RMSNorm, RoPE (against megatron-core's unfused RoPE), the weighted SwiGLU of the
experts and the vocabulary-parallel cross-entropy (both megatron-core's). On CPU torch.compile
generates C++; the first compile of each op takes tens of seconds."""

import pytest
import torch
import torch.nn.functional as F

from megatron_geno import fusions
from megatron_geno.config import ConfigError, ModelConfig, ParallelConfig
from tests.unit.single_process import single_process_groups

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _grads(fn, *inputs):
    """fn's output and the gradient of every input under one fixed random output gradient."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    torch.manual_seed(7)
    out.backward(torch.randn_like(out))
    return out.detach(), [x.grad for x in leaves if x.requires_grad]


def _assert_same(fused, reference, *inputs):
    out, grads = _grads(fused, *inputs)
    ref_out, ref_grads = _grads(reference, *inputs)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL)


def test_compiled_rms_norm_equals_reference_and_hf():
    torch.manual_seed(0)
    x, w = torch.randn(16, 2, 64) * 3, torch.rand(64) + 0.5
    _assert_same(lambda a, b: fusions.compiled("rms_norm")(a, b, 1e-5),
                 lambda a, b: fusions.rms_norm(a, b, 1e-5), x, w)
    # the reference is HuggingFace's arithmetic, written out here
    x32 = x.float()
    hf = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    torch.testing.assert_close(fusions.rms_norm(x, w, 1e-5), hf, rtol=0, atol=0)


def test_compiled_rope_equals_megatron_unfused_rope():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    torch.manual_seed(1)
    seq, dim = 24, 16
    inv_freq = 1.0 / (50_000_000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(seq).float(), inv_freq)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]  # megatron-core's [s, 1, 1, d]
    t = torch.randn(seq, 2, 4, dim)
    _assert_same(lambda a: fusions.fused_rope(a, freqs),
                 lambda a: _apply_rotary_pos_emb_bshd(a, freqs), t)
    # the eager reference is megatron-core's arithmetic too, and it changes the tensor
    torch.testing.assert_close(fusions.rope(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs),
                               rtol=0, atol=0)
    assert not torch.allclose(fusions.rope(t, freqs)[1:], t[1:])


def test_fused_weighted_swiglu_equals_reference():
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

    torch.manual_seed(2)
    h, probs = torch.randn(37, 2 * 24), torch.rand(37, 1)

    def reference(y, p):
        gate, up = torch.chunk(y, 2, dim=-1)
        return F.silu(gate) * up * p

    _assert_same(lambda y, p: weighted_bias_swiglu_impl(y, None, p), reference, h, probs)


def test_fused_cross_entropy_equals_reference_in_bf16():
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.parallel_state import get_tensor_model_parallel_group
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    with single_process_groups(ParallelConfig()):
        torch.manual_seed(3)
        logits, labels = torch.randn(10, 2, 128) * 4, torch.randint(0, 128, (10, 2))
        tp = get_tensor_model_parallel_group()
        # megatron-core's fused cross-entropy returns a bf16 gradient (so only bf16 runs use it):
        # it equals the fp32 reference's, rounded to bf16
        bf16 = logits.to(torch.bfloat16)
        out, (grad,) = _grads(lambda x: fused_vocab_parallel_cross_entropy(x, labels, tp), bf16)
        ref, (ref_grad,) = _grads(lambda x: vocab_parallel_cross_entropy(x.float(), labels), bf16)
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(grad, ref_grad.to(torch.bfloat16))
        # and the reference is the textbook cross-entropy
        torch.testing.assert_close(
            vocab_parallel_cross_entropy(logits.clone(), labels),
            F.cross_entropy(logits.view(-1, 128), labels.view(-1), reduction="none").view(10, 2),
            **TOL)


def _runtime(fusions_setting: str, precision: str = "bf16", machine=None):
    from megatron_geno.config import load_config
    from megatron_geno.runtime import Machine, resolve

    cfg = load_config(None, ["model.preset=tiny", f"model.fusions={fusions_setting}",
                             f"precision={precision}"])
    return resolve(cfg, machine or Machine(cuda=False, cxx=True))


def test_fusions_setting_resolves_and_fills_megatron_rope_hook(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_geno.runtime import Machine

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    off = fusions.transformer_fields(_runtime("off"))
    assert not off["apply_rope_fusion"] and not off["bias_activation_fusion"]
    assert rope_utils.fused_apply_rotary_pos_emb is None
    on = fusions.transformer_fields(_runtime("on"))
    assert on["apply_rope_fusion"] and on["bias_activation_fusion"]
    assert on["cross_entropy_loss_fusion"] and on["cross_entropy_fusion_impl"] == "native"
    assert rope_utils.fused_apply_rotary_pos_emb is fusions.fused_rope
    fp32 = fusions.transformer_fields(_runtime("on", "fp32"))
    assert "cross_entropy_loss_fusion" not in fp32  # its gradient would be bf16
    assert not _runtime("auto").fusions  # auto: on with CUDA only
    assert _runtime("auto", machine=Machine(cuda=True, compute_capability=9)).fusions


def test_fusions_on_without_compiler_is_a_config_error():
    from megatron_geno.runtime import Machine

    with pytest.raises(ConfigError, match="model.fusions=on .* C\\+\\+ compiler"):
        _runtime("on", machine=Machine(cuda=False, cxx=False))


def test_compiled_regions_compile_once_for_every_sequence_length_and_say_when_again(caplog):
    """The sequence axis is dynamic: new lengths reuse the one compilation; a new dtype compiles
    again, and that is logged once (not at every further variant)."""
    region = fusions.CompiledRegion("rms_norm (test)", lambda x, w, eps: fusions.rms_norm(x, w, eps))
    w = torch.rand(32) + 0.5
    for seq in (8, 24, 40, 17):
        x = torch.randn(seq, 2, 32)
        torch.testing.assert_close(region(x, w, 1e-5), fusions.rms_norm(x, w, 1e-5), **TOL)
    assert region.compilations() == 1
    assert not [r for r in caplog.records if r.name == "megatron_geno.fusions"]
    with caplog.at_level("WARNING", logger="megatron_geno.fusions"):
        region(torch.randn(8, 2, 32, dtype=torch.float64), w.double(), 1e-5)
        region(torch.randn(8, 3, 32, dtype=torch.float64), w.double(), 1e-5)
    assert region.compilations() >= 2
    said = [r.getMessage() for r in caplog.records if "compiled rms_norm (test) again" in r.getMessage()]
    assert len(said) == 1, said
