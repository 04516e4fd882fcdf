"""One checkpoint format whichever layer spec wrote it. Transformer Engine cannot run here, so its
key layout is emulated: megatron-core's TE MoE layer names the pre-MLP norm
decoder.layers.pre_mlp_layernorm.weight where the local spec says
decoder.layers.mlp.linear_fc1.layer_norm_weight, and a model built with the TE spec answers its
sharded state dict with that name. The driver below makes geno-train's model do the same."""

import subprocess
import sys

from safetensors.torch import load_file

from tests.functional.launcher import (BASE, assert_close, geno_convert, geno_train, losses,
                                      quiet_env)

TE_NAME = "decoder.layers.pre_mlp_layernorm.weight"
LOCAL_NAME = "decoder.layers.mlp.linear_fc1.layer_norm_weight"

# geno-train whose model names its state as the TE spec does; with "as-written-before", without
# this project's renaming at save (what a TE run wrote before checkpoints had one format)
DRIVER = """
import sys
from megatron.core.models.gpt import GPTModel
from megatron_geno import cli
from megatron_geno.checkpoint import state

te_names = {local: te for te, local in state.TE_KEY_ALIASES.items()}
spec_state = GPTModel.sharded_state_dict
GPTModel.sharded_state_dict = lambda self, *a, **k: state._rename_keys(
    spec_state(self, *a, **k), te_names)
if sys.argv[1] == "as-written-before":
    state.TE_KEY_ALIASES = {}
sys.exit(cli.main(sys.argv[2:]))
"""

STORED = """
import sys, warnings
warnings.filterwarnings("ignore")
from checkpoint_tools.mcore_checkpoint import init_single_process
from megatron_geno.checkpointing import resolve_checkpoint_dir, stored_keys
init_single_process()
print(" ".join(sorted(stored_keys(resolve_checkpoint_dir(sys.argv[1])))))
"""


def te_train(run_dir, mode: str, *overrides: str) -> list[dict]:
    """geno-train (one process) with the TE spec's key names; returns its metrics."""
    import json

    cmd = [sys.executable, "-c", DRIVER, mode, *BASE, f"logging.run_dir={run_dir}",
           f"data.cache_dir={run_dir.parent / 'data_cache'}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=quiet_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stored(ckpt) -> set:
    proc = subprocess.run([sys.executable, "-c", STORED, str(ckpt)], capture_output=True,
                          text=True, timeout=300, env=quiet_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(proc.stdout.split())


def test_checkpoints_of_either_spec_are_one_format(tmp_path):
    """Saved by a TE-named model: the local names (one format). Written with TE's names (as
    before): resumes at the local spec with the Adam moments (the losses of the local
    checkpoint's resume) and converts to the same HF tensors. A TE-named model resumes from a
    local checkpoint the same way."""
    schedule = ["schedule.train_iters=7"]
    first = ["schedule.stop_after=4", *schedule]
    geno_train(tmp_path / "local", *first, f"checkpoint.save={tmp_path / 'ck_local'}")
    te_train(tmp_path / "te_before", "as-written-before", *first,
             f"checkpoint.save={tmp_path / 'ck_te_before'}")
    before = stored(tmp_path / "ck_te_before")
    assert TE_NAME in before and f"optimizer.state.exp_avg.{TE_NAME}" in before \
        and LOCAL_NAME not in before  # the emulation does write TE's layout

    reference = losses(geno_train(tmp_path / "more_local", *schedule,
                                  f"checkpoint.load={tmp_path / 'ck_local'}"))
    assert len(reference) == 3
    from_te = losses(geno_train(tmp_path / "more_te", *schedule,
                                f"checkpoint.load={tmp_path / 'ck_te_before'}"))
    assert_close(from_te, reference, rtol=1e-6)
    te_from_local = losses(te_train(tmp_path / "te_more", "now", *schedule,
                                    f"checkpoint.load={tmp_path / 'ck_local'}",
                                    f"checkpoint.save={tmp_path / 'ck_te_now'}"))
    assert_close(te_from_local, reference, rtol=1e-6)
    now = stored(tmp_path / "ck_te_now")  # what a TE-named model saves: the local names
    assert LOCAL_NAME in now and TE_NAME not in now
    assert f"optimizer.state.exp_avg.{LOCAL_NAME}" in now

    exports = {}
    for name in ("local", "te_before"):
        proc = geno_convert("to-hf", "--checkpoint", str(tmp_path / f"ck_{name}"), "--out",
                            str(tmp_path / f"hf_{name}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        exports[name] = {}
        for f in sorted((tmp_path / f"hf_{name}").glob("*.safetensors")):
            exports[name].update(load_file(f))
    assert exports["local"].keys() == exports["te_before"].keys()
    assert "model.layers.0.post_attention_layernorm.weight" in exports["local"]
    for key, tensor in exports["local"].items():
        assert tensor.equal(exports["te_before"][key]), key
