"""Context-parallel attention's GPU kernels (skipped without CUDA): torch's flash attention takes
the Genos query chunks, and a chunk over its key prefix gives the rows of whole-sequence causal
flash attention in bf16."""

import pytest
import torch
import torch.nn.functional as F

from megatron_geno.attention import causal_attention, flash_refusal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("heads,groups,head_dim", [(16, 8, 64), (8, 4, 256)])
def test_flash_attention_takes_the_genos_chunks_in_bf16(heads, groups, head_dim):
    """genos-1.2b (16 heads, 8 groups, dim 64) and genos-10b at TP 2 (8, 4, dim 256)."""
    device = torch.device("cuda")
    assert flash_refusal(heads, groups, head_dim, torch.bfloat16, device) is None
    assert flash_refusal(heads, groups, head_dim, torch.float32, device)  # fp32: refused


def test_a_chunk_over_its_prefix_is_whole_sequence_attention_in_bf16():
    """Chunk 5 of 8 (4K positions) of a 32K sequence over its 24K-key prefix, GQA 16/8, bf16:
    within 2e-2 of the whole-sequence rows (bf16 keeps 8 bits; flash tiles differently)."""
    torch.manual_seed(0)
    s, c, chunk = 32768, 4096, 5
    q = torch.randn(1, 16, s, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, s, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    end = (chunk + 1) * c
    part = causal_attention(q[:, :, chunk * c:end], k[:, :, :end], v[:, :, :end])
    assert (part - whole[:, :, chunk * c:end]).abs().max().item() < 2e-2
