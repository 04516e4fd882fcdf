"""The Mixtral layout pitfalls: QKV interleaved per query group, fc1 = [gate; up], tokenizer ids."""

import numpy as np
import pytest
import torch

from checkpoint_tools.mapping import merge_qkv, split_fc1, split_qkv


def test_qkv_is_interleaved_per_query_group():
    heads, groups, d, hidden = 4, 2, 3, 5
    # label each output row by (group, slot) where slot 0..1 = query heads, 2 = key, 3 = value
    rows = []
    for g in range(groups):
        for slot in range(heads // groups + 2):
            for i in range(d):
                rows.append(torch.full((hidden,), float(100 * g + 10 * slot + i)))
    qkv = torch.stack(rows)
    q, k, v = split_qkv(qkv, heads, groups, d)
    # query head h belongs to group h // (heads // groups)
    assert q[:, 0].tolist() == [0, 1, 2, 10, 11, 12, 100, 101, 102, 110, 111, 112]
    assert k[:, 0].tolist() == [20, 21, 22, 120, 121, 122]
    assert v[:, 0].tolist() == [30, 31, 32, 130, 131, 132]
    assert torch.equal(merge_qkv(q, k, v, heads, groups, d), qkv)


def test_fc1_is_gate_then_up():
    fc1 = torch.cat([torch.zeros(4, 3), torch.ones(4, 3)])
    gate, up = split_fc1(fc1)
    assert gate.sum() == 0 and up.sum() == 12


def test_router_renormalisation_matches_mixtral():
    """megatron-core's routing as configured here (top-k, then softmax over the k) equals
    Mixtral's (softmax over all experts, top-k, renormalise), and the converter refuses the
    other megatron-core mode (pre-softmax), which Mixtral cannot represent."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from checkpoint_tools.mcore_checkpoint import ConversionError
    from checkpoint_tools.to_hf import check_representable
    from megatron_geno.config import get_preset

    logits = torch.randn(50, 8)
    probs, routing_map = topk_routing_with_score_function(logits, 2, use_pre_softmax=False)
    hf = torch.softmax(logits, dim=-1)
    hf_top, hf_idx = torch.topk(hf, 2, dim=-1)
    expected = torch.zeros_like(hf).scatter(1, hf_idx, hf_top / hf_top.sum(-1, keepdim=True))
    assert torch.equal(routing_map, expected > 0)
    torch.testing.assert_close(probs, expected)
    model = get_preset("genos-1.2b")
    ckpt = SimpleNamespace(path="ckpt", shapes={})
    check_representable(ckpt, model)  # Genos: post-softmax routing converts
    model.moe_router_pre_softmax = True
    with pytest.raises(ConversionError, match="moe_router_pre_softmax=True"):
        check_representable(ckpt, model)


@pytest.mark.parametrize("policy", ["upper", "keep"])
def test_hf_tokenizer_ids_equal_training_ids(tmp_path, policy):
    from transformers import AutoTokenizer

    from checkpoint_tools.hf_tokenizer import write_hf_tokenizer
    from megatron_geno.tokenizer import GenoTokenizer

    write_hf_tokenizer(tmp_path, policy)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "ACGTNacgtnRYKMSWBDHVrykAX-"
    ours = GenoTokenizer(policy).tokenize(text).tolist()
    assert hf(text, add_special_tokens=False)["input_ids"] == ours
    assert hf.eos_token_id == 1 and hf.pad_token_id == 0 and len(hf) == 128
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACGTacgtN"), size=3000))
    assert hf(seq, add_special_tokens=False)["input_ids"] == GenoTokenizer(policy).tokenize(seq).tolist()


def test_torch_dist_writer_chunks_read_back(tmp_path):
    """A key written chunk by chunk (torch.distributed.checkpoint.save, each chunk made when the
    writer asks for it, in plan order) reads back whole (megatron-core) and by layer."""
    from checkpoint_tools.mcore_checkpoint import open_checkpoint
    from checkpoint_tools.torch_dist_writer import Chunk, write_torch_dist

    full = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    made = []

    def make(layer, row):
        made.append((layer, row))
        return full[layer, row][None, None]

    chunks = [Chunk("w", (layer, row, 0), (2, 3, 4), (1, 1, 4), torch.float32,
                    lambda layer=layer, row=row: make(layer, row))
              for layer in range(2) for row in range(3)]
    write_torch_dist(tmp_path / "ck", chunks, {"model_config": {}})
    assert made == [(layer, row) for layer in range(2) for row in range(3)]
    ckpt = open_checkpoint(tmp_path / "ck")
    assert torch.equal(ckpt.read("w"), full)
    assert torch.equal(ckpt.read_layer("w", 1), full[1])


def test_torch_dist_writer_refuses_uncovered_key_and_wrong_chunks(tmp_path):
    from checkpoint_tools.torch_dist_writer import Chunk, write_torch_dist

    with pytest.raises(ValueError, match="cover 3 of 6"):
        write_torch_dist(tmp_path / "a", [Chunk("w", (0, 0), (2, 3), (1, 3), torch.float32,
                                                lambda: torch.ones(1, 3))], {})
    wrong = [Chunk("w", (r, 0), (2, 3), (1, 3), torch.float32, lambda: torch.ones(1, 2))
             for r in range(2)]
    with pytest.raises(ValueError, match="produced"):
        write_torch_dist(tmp_path / "b", wrong, {})
