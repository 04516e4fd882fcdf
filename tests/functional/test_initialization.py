"""The model is a function of the seed, not of the layout (DESIGN decision 16): the iteration-0
checkpoint of a run is the same, bit for bit, at TP1 / TP2 / PP2 / EP2 / CP2, and every expert
starts different from every other."""

import json
import subprocess
import sys

from tests.functional.launcher import geno_train, quiet_env

# the padded vocabulary is fixed: by default it grows with TP (128 x TP), and a checkpoint
# with more rows is not the same file
ZERO = ["schedule.train_iters=0", "schedule.warmup_iters=0", "model.padded_vocab_size=256"]

INSPECT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from checkpoint_tools.mcore_checkpoint import open_checkpoint
reference, *others = [open_checkpoint(p) for p in sys.argv[1:]]
worst = {}  # per other checkpoint: {key: max |difference| / max |value|}
for path, ck in zip(sys.argv[2:], others):
    assert ck.shapes.keys() == reference.shapes.keys(), path
    worst[path] = {}
    for key in sorted(reference.shapes):
        x, y = ck.read(key).double(), reference.read(key).double()
        worst[path][key] = ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item()
ep2 = others[[p.endswith("ck_ep2") for p in sys.argv[2:]].index(True)]  # what the weights are
fc1 = ep2.read("decoder.layers.mlp.experts.experts.linear_fc1.weight").double()  # [L, E, ...]
layers, experts = fc1.shape[:2]
closest = min((fc1[l, i] - fc1[l, j]).abs().max().item()
              for l in range(layers) for i in range(experts) for j in range(i + 1, experts))
std = lambda key: ep2.read(key).double().std().item()
print(json.dumps({"worst": worst, "closest_experts": closest,
                  "qkv_std": std("decoder.layers.self_attention.linear_qkv.weight"),
                  "proj_std": std("decoder.layers.self_attention.linear_proj.weight"),
                  "fc2_std": std("decoder.layers.mlp.experts.experts.linear_fc2.weight"),
                  "norms": sorted({round(x, 6) for x in ep2.read(
                      "decoder.layers.mlp.linear_fc1.layer_norm_weight").flatten().tolist()})}))
"""


def test_iteration_zero_checkpoint_is_the_same_at_every_layout_and_not_at_another_seed(tmp_path):
    layouts = {"tp2": "parallel.tensor_parallel=2", "pp2": "parallel.pipeline_parallel=2",
               "ep2": "parallel.expert_parallel=2", "cp2": "parallel.context_parallel=2"}
    geno_train(tmp_path / "tp1", *ZERO, f"checkpoint.save={tmp_path / 'ck_tp1'}")
    for name, layout in layouts.items():
        geno_train(tmp_path / name, *ZERO, layout, f"checkpoint.save={tmp_path / f'ck_{name}'}",
                   nproc=2)
    geno_train(tmp_path / "seed7", *ZERO, "schedule.seed=7",
               f"checkpoint.save={tmp_path / 'ck_seed7'}")
    paths = [str(tmp_path / f"ck_{name}") for name in ("tp1", *layouts, "seed7")]
    proc = subprocess.run([sys.executable, "-c", INSPECT, *paths], capture_output=True,
                          text=True, timeout=600, env=quiet_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in layouts:
        worst = stats["worst"][str(tmp_path / f"ck_{name}")]
        assert any(k.startswith("decoder.layers.mlp.experts") for k in worst)
        assert max(worst.values()) == 0.0, (name, sorted(worst.items(), key=lambda kv: -kv[1])[:3])
    # another seed is another model: every weight differs (norms start at one either way)
    other = stats["worst"][str(tmp_path / "ck_seed7")]
    weights = [v for k, v in other.items()
               if not k.startswith("optimizer.") and k.endswith("weight") and "norm" not in k]
    assert weights and min(weights) > 0.1, other
    # what the weights are: distinct experts (EP2 drew experts 4-7 as copies of 0-3 before),
    # normal(0, 0.02), the residual projections scaled by 1 / sqrt(2 x layers), norms at one
    assert stats["closest_experts"] > 0.01, stats
    assert abs(stats["qkv_std"] - 0.02) < 0.002, stats
    assert abs(stats["proj_std"] - 0.01) < 0.001 and abs(stats["fc2_std"] - 0.01) < 0.001, stats
    assert stats["norms"] == [1.0], stats
