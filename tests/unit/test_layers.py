"""Our SDPA core attention and RMSNorm against megatron-core's own implementations."""

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_geno.attention import SDPAttention
from megatron_geno.config import ParallelConfig
from megatron_geno.norm import RMSNorm
from tests.unit.single_process import single_process_groups


def _config(**kw):
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                             num_query_groups=2, kv_channels=16, normalization="RMSNorm",
                             use_cpu_initialization=True, attention_dropout=0.0, **kw)


@pytest.fixture(scope="module")
def groups():
    with single_process_groups(ParallelConfig()):
        yield


def test_sdpa_matches_megatron_dot_product_attention(groups):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cfg = _config()
    torch.manual_seed(0)
    s, b = 12, 2
    q = torch.randn(s, b, 4, 16)
    k = torch.randn(s, b, 2, 16)
    v = torch.randn(s, b, 2, 16)
    ours = SDPAttention(cfg, 1, AttnMaskType.causal, "self")(q, k, v, None)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")(q, k, v, mask)
    assert ours.shape == (s, b, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sdpa_explicit_mask_means_masked_out(groups):
    cfg = _config()
    s = 6
    q, k, v = torch.randn(s, 1, 4, 16), torch.randn(s, 1, 2, 16), torch.randn(s, 1, 2, 16)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    torch.testing.assert_close(attn(q, k, v, causal), attn(q, k, v, None))


def test_rope_table_is_sliced_per_context_parallel_rank_on_cpu(groups):
    """megatron-core's RoPE slice for a CP rank (rope_utils.get_pos_emb_on_this_cp_rank) pins
    host memory, which needs an accelerator; through the CPU layer it runs and rank r gets the
    angles of chunks r and 2CP-1-r, the positions megatron-core's batch split gives it."""
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    class Group:
        def __init__(self, size, rank):
            self.size, self.rank = (lambda: size), (lambda: rank)

    table = torch.arange(16.0)[:, None, None, None]  # [s, 1, 1, d]: angle = position
    for rank, chunks in ((0, [0, 7]), (1, [1, 6]), (3, [3, 4])):
        local = get_pos_emb_on_this_cp_rank(table, 0, Group(4, rank))
        expected = [2 * c + i for c in chunks for i in range(2)]
        assert local.flatten().tolist() == expected


def test_rmsnorm_matches_torch_and_marks_sequence_parallel():
    norm = RMSNorm(_config(), 64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ref = torch.nn.RMSNorm(64, eps=1e-5)
    ref.weight.data.copy_(norm.weight.data)
    x = torch.randn(5, 3, 64)
    torch.testing.assert_close(norm(x), ref(x))
    assert norm.weight.sequence_parallel is False
    assert RMSNorm(_config(tensor_model_parallel_size=2, sequence_parallel=True), 64).weight.sequence_parallel


def test_cpu_layer_checks_every_patched_target(monkeypatch):
    """A megatron-core name the CPU layer patches, gone from the installed version, is a clear
    error naming it (not a patch that silently does nothing)."""
    import megatron.core.tensor_parallel.random as mcore_random

    from megatron_geno import cpu_layer

    cpu_layer.check_patched_targets()  # the pinned megatron-core has every target
    monkeypatch.delattr(mcore_random, "_get_cuda_rng_state")
    with pytest.raises(RuntimeError, match="random._get_cuda_rng_state is missing"):
        cpu_layer.check_patched_targets()
    monkeypatch.undo()
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.delattr(distrib_optimizer, "DistributedOptimizer")  # a class that moved
    with pytest.raises(RuntimeError, match="DistributedOptimizer._set_main_param_and_optimizer_"
                                           "states is missing"):
        cpu_layer.check_patched_targets()
