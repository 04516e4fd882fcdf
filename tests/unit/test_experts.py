"""GroupedExperts (one grouped GEMM per projection) against megatron-core's SequentialMLP."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_geno.config import ParallelConfig
from megatron_geno.experts import GroupedExperts, GroupedLinear
from tests.unit.single_process import single_process_groups

E, H, FFN = 4, 32, 48


def _config(fused_activation: bool = False):
    return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4,
                             moe_ffn_hidden_size=FFN, ffn_hidden_size=FFN, num_moe_experts=E,
                             gated_linear_unit=True, activation_func=F.silu,
                             add_bias_linear=False, use_cpu_initialization=True,
                             bias_activation_fusion=fused_activation)


@pytest.fixture(scope="module")
def pair():
    """A SequentialMLP and two GroupedExperts holding the same weights (fp32): one with the eager
    SwiGLU, one with megatron-core's compiled weighted SwiGLU (model.fusions)."""
    with single_process_groups(ParallelConfig()):
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        config = _config()
        spec = get_gpt_layer_local_spec(num_experts=E, normalization="RMSNorm")
        mlp_submodules = spec.submodules.mlp.submodules.experts.submodules
        torch.manual_seed(0)
        pg = get_default_pg_collection()
        sequential = SequentialMLP(E, config, mlp_submodules, pg_collection=pg)
        grouped = GroupedExperts(E, config, pg_collection=pg)
        fused = GroupedExperts(E, _config(fused_activation=True), pg_collection=pg)
        with torch.no_grad():
            for e, expert in enumerate(sequential.local_experts):
                for module in (grouped, fused):
                    module.weight1[e].copy_(expert.linear_fc1.weight)
                    module.weight2[e].copy_(expert.linear_fc2.weight)
        yield sequential, grouped, fused


@pytest.mark.parametrize("counts", [[5, 3, 7, 1], [0, 9, 0, 4], [16, 0, 0, 0], [0, 0, 0, 0],
                                    [33, 2, 17, 64]])
@pytest.mark.parametrize("activation", ["eager", "fused"])
def test_grouped_equals_sequential_outputs_and_every_gradient(pair, counts, activation):
    sequential, grouped, fused = pair
    grouped = fused if activation == "fused" else grouped
    torch.manual_seed(sum(counts))
    tokens = sum(counts)
    x = torch.randn(tokens, H)
    probs = torch.rand(tokens)
    per_expert = torch.tensor(counts)
    outputs, grads = [], []
    for module in (sequential, grouped):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        pi = probs.clone().requires_grad_(True)
        out, _ = module(xi, per_expert, pi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append([xi.grad, pi.grad])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for e, expert in enumerate(sequential.local_experts):
        for ours, ref in ((grouped.weight1.grad[e], expert.linear_fc1.weight.grad),
                          (grouped.weight2.grad[e], expert.linear_fc2.weight.grad)):
            if ref is None:  # an expert that received no token: its gradient is zero
                assert torch.count_nonzero(ours) == 0
            else:
                torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_grouped_linear_is_one_call_each_way():
    """Forward: one grouped call; backward: one for the input, one for the weight."""
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    with torch.profiler.profile() as prof:
        GroupedLinear.apply(x, w, offs).sum().backward()
    def inside_grouped(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name == "aten::_grouped_mm":
                return True
            parent = parent.cpu_parent
        return False

    events = prof.events()
    calls = sum(1 for e in events if e.name == "aten::_grouped_mm")
    # CPU's _grouped_mm loops over groups with mm; no GEMM runs outside the grouped calls
    mm = sum(1 for e in events if e.name in ("aten::mm", "aten::bmm", "aten::addmm")
             and not inside_grouped(e))
    assert (calls, mm) == (3, 0)
    assert torch.count_nonzero(w.grad[1]) == 0  # the empty group


def test_sharded_keys_and_shapes_equal_sequential(pair):
    """Same checkpoint keys and global shapes as SequentialMLP: checkpoints interchange."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    sequential, grouped, _ = pair
    offsets = ((0, 1, 3),)  # layer 1 of 3

    def describe(module):
        tensors, objects = {}, set()
        for value in module.sharded_state_dict("mlp.experts.", offsets).values():
            if isinstance(value, ShardedTensorFactory):
                value = value.build()
                pieces = value if isinstance(value, list) else [value]
            elif isinstance(value, ShardedObject):
                objects.add((value.key, value.global_shape, value.global_offset))
                continue
            else:
                pieces = [value]
            for piece in pieces:
                tensors.setdefault(piece.key, set()).add(tuple(piece.global_shape))
        return tensors, objects

    assert describe(grouped) == describe(sequential)
