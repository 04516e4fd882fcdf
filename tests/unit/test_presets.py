import pytest

from megatron_geno.arithmetic import count_parameters, padded_vocab_size
from megatron_geno.config import get_preset
from megatron_geno.presets import PUBLISHED_PARAMS
from megatron_geno.tokenizer import VOCAB_SIZE


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_within_6_percent_of_published(name):
    counts = count_parameters(get_preset(name), padded_vocab_size(VOCAB_SIZE, 128, 1))
    total, active = PUBLISHED_PARAMS[name]
    assert abs(counts["total"] / total - 1) < 0.06
    assert abs(counts["active"] / active - 1) < 0.06


def test_genos_architecture_constants():
    for name in ("genos-1.2b", "genos-10b"):
        m = get_preset(name)
        assert (m.num_layers, m.num_attention_heads, m.num_query_groups) == (12, 16, 8)
        assert (m.num_experts, m.moe_router_topk) == (8, 2)
        assert m.rotary_base == 50_000_000 and m.norm_epsilon == 1e-5
        assert not m.moe_router_pre_softmax
        assert m.moe_aux_loss_coeff == m.moe_z_loss_coeff == 1e-3


def test_vocab_padding_is_128_times_tp():
    assert padded_vocab_size(128, 128, 1) == 128
    assert padded_vocab_size(128, 128, 2) == 256
    assert padded_vocab_size(130, 128, 1) == 256


def test_count_matches_built_model():
    """The closed-form count equals the parameters of the real megatron-core model (tiny)."""
    import torch

    from megatron_geno.config import load_config
    from megatron_geno.model import build_gpt_model
    from tests.unit.single_process import single_process_groups

    cfg = load_config(None, ["model.preset=tiny"])
    with single_process_groups(cfg.parallel):
        model = build_gpt_model(cfg, VOCAB_SIZE)
        built = sum(p.numel() for p in model.parameters())
    assert built == count_parameters(cfg.model, 128)["total"]
    assert isinstance(built, int) and torch.is_tensor(next(model.parameters()))
