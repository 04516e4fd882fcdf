"""The memory plan's activation terms (launch/plan.py) against what the model really keeps for
backward, measured on CPU in bf16 (tests/memory_probe.py): per layer (a 2-layer model less a
1-layer one) and outside the layers (the 1-layer model less one layer), for the fused path a GPU
runs, the eager one, SequentialMLP experts and each recomputation setting. A change to the model
that keeps more for backward than the plan says fails here."""

import pytest

from launch.plan import layer_activations, outside_layers_activations
from megatron_geno.config import load_config
from tests.memory_probe import SETTINGS, saved_bytes, setting_name

# not a preset: GQA at 4:1, a head dimension of 32, 4 experts; 128 padded vocabulary
SHAPE = ["model.preset=tiny", "model.hidden_size=256", "model.num_attention_heads=8",
         "model.num_query_groups=2", "model.moe_ffn_hidden_size=384", "model.num_experts=4",
         "data.seq_length=128", "data.micro_batch_size=2", "data.global_batch_size=2"]
SEQ, BATCH = 128, 2


@pytest.mark.parametrize("overrides", SETTINGS, ids=setting_name)
def test_plan_activations_match_what_the_model_keeps_for_backward(overrides):
    one, two = saved_bytes(SHAPE + overrides, 1), saved_bytes(SHAPE + overrides, 2)
    m = load_config(None, SHAPE + overrides).model
    full = m.recompute == "full"
    per_layer = sum(layer_activations(m, SEQ, BATCH, recomputed=full).values())
    assert two - one == pytest.approx(per_layer, rel=0.01)
    assert one - (two - one) == pytest.approx(outside_layers_activations(m, SEQ, BATCH, 128),
                                              rel=0.01)

