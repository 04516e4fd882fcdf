"""geno-convert on tiny checkpoints trained at TP=2, PP=2, EP=2 and PP=2 with 2 virtual stages
(2 CPU processes)."""

import json
import re
import shutil

import pytest
import torch

from tests.functional.launcher import assert_close, geno_convert, geno_train, losses

LAYOUTS = {"tp2": ["parallel.tensor_parallel=2"], "pp2": ["parallel.pipeline_parallel=2"],
           "ep2": ["parallel.expert_parallel=2"],
           "vpp2": ["model.num_layers=4", "parallel.pipeline_parallel=2",
                    "parallel.virtual_pipeline=2"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    for name, layout in LAYOUTS.items():
        geno_train(root / f"run_{name}", "schedule.train_iters=3", *layout,
                   f"checkpoint.save={root / name}", nproc=2)
    return root


def load_hf_tensors(directory):
    """All tensors of a safetensors directory, whatever its sharding."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def to_hf(ckpt, out):
    proc = geno_convert("to-hf", "--checkpoint", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_transformers_logits_match_megatron(trained, name):
    hf = to_hf(trained / name, trained / f"hf_{name}")
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["vocab_size"] == (256 if name == "tp2" else 128)  # padded to 128 x TP, kept
    assert config["rope_theta"] == 5e7 and config["tie_word_embeddings"] is False
    proc = geno_convert("verify", "--checkpoint", str(trained / name), "--hf", str(hf),
                        "--tokens", "2048")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    diff = float(re.search(r"max \|logit diff\| (\S+)", proc.stdout).group(1))
    agreement = float(re.search(r"router top-k agreement (\S+)", proc.stdout).group(1))
    assert diff < 1e-4 and agreement == 1.0, proc.stdout


def test_bf16_export_verifies_at_its_own_precision(trained, tmp_path):
    """A bf16 export passes verify's default threshold (the Megatron weights are rounded to bf16
    too), and verify reports beside it what bf16 costs against the fp32 checkpoint."""
    proc = geno_convert("to-hf", "--checkpoint", str(trained / "ep2"), "--out",
                        str(tmp_path / "hf"), "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = geno_convert("verify", "--checkpoint", str(trained / "ep2"), "--hf", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "export bfloat16" in proc.stdout and "OK" in proc.stdout
    loss = re.search(r"export precision .* max \|logit diff\| (\S+)  cosine (\S+)  top-1 "
                     r"agreement (\S+)", proc.stdout)
    assert loss, proc.stdout
    assert float(loss.group(1)) > 1e-4  # rounding to bf16 is visible ...
    assert float(loss.group(2)) > 0.999 and float(loss.group(3)) > 0.95  # ... and small


def test_auto_classes_load_without_remote_code(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_geno.tokenizer import GenoTokenizer

    hf = trained / "hf_ep2" if (trained / "hf_ep2").exists() else to_hf(trained / "ep2", trained / "hf_ep2")
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    assert type(model).__name__ == "MixtralForCausalLM"
    tok = AutoTokenizer.from_pretrained(str(hf))
    dna = "ACGTTGCAnnACGTRYACGT" * 10
    assert tok(dna, add_special_tokens=False)["input_ids"] == GenoTokenizer().tokenize(dna).tolist()


def test_round_trips_are_bit_identical(trained, tmp_path):
    from checkpoint_tools.mapping import RULES
    from checkpoint_tools.mcore_checkpoint import open_checkpoint

    hf1 = to_hf(trained / "tp2", tmp_path / "hf1")
    proc = geno_convert("from-hf", "--hf", str(hf1), "--out", str(tmp_path / "mc"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    verified = geno_convert("verify", "--checkpoint", str(tmp_path / "mc"), "--hf", str(hf1))
    assert verified.returncode == 0, verified.stdout + verified.stderr[-3000:]  # an import verifies
    original, imported = open_checkpoint(trained / "tp2"), open_checkpoint(tmp_path / "mc")
    for rule in RULES:  # mcore -> HF -> mcore
        assert torch.equal(original.read(rule.mcore), imported.read(rule.mcore)), rule.mcore
    hf2 = to_hf(tmp_path / "mc", tmp_path / "hf2")  # HF -> mcore -> HF
    a, b = load_hf_tensors(hf1), load_hf_tensors(hf2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_current_transformers_naming_imports(trained, tmp_path):
    """transformers >= 5 saves fused experts (mlp.experts.gate_up_proj); from-hf reads them too."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf1 = to_hf(trained / "pp2", tmp_path / "hf1")
    model = AutoModelForCausalLM.from_pretrained(str(hf1), dtype=torch.float32)
    current = tmp_path / "current"
    current.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # in-memory = current names
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), sorted(state)[:5]
    save_file(state, str(current / "model.safetensors"))
    shutil.copy(hf1 / "config.json", current / "config.json")
    proc = geno_convert("from-hf", "--hf", str(tmp_path / "current"), "--out", str(tmp_path / "mc"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf2 = to_hf(tmp_path / "mc", tmp_path / "hf2")
    a, b = load_hf_tensors(hf1), load_hf_tensors(hf2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_imported_checkpoint_trains_at_another_layout(trained, tmp_path):
    """The import, trained at TP=2, gives the losses of the source checkpoint itself (loaded
    weights-only at the same layout): the same model, not merely a loadable one."""
    hf = to_hf(trained / "ep2", tmp_path / "hf")
    assert geno_convert("from-hf", "--hf", str(hf), "--out", str(tmp_path / "mc")).returncode == 0
    records = geno_train(tmp_path / "cont", "--config", str(tmp_path / "mc" / "model.yaml"),
                         f"checkpoint.load={tmp_path / 'mc'}", "schedule.train_iters=2",
                         "parallel.tensor_parallel=2", nproc=2)
    source = geno_train(tmp_path / "source", f"checkpoint.load={trained / 'ep2'}",
                        "checkpoint.weights_only=true", "schedule.train_iters=2",
                        "parallel.tensor_parallel=2", nproc=2)
    assert len(records) == 2
    assert_close(losses(records), losses(source), rtol=1e-5)


def _error(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("geno-convert: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_bad_inputs_are_one_clear_error(trained, tmp_path):
    hf = to_hf(trained / "tp2", tmp_path / "hf")
    sharded = geno_convert("to-hf", "--checkpoint", str(trained / "tp2"), "--out",
                           str(tmp_path / "sharded"), "--shard-size", "20KB")
    assert sharded.returncode == 0
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    assert "missing" in _error(geno_convert("from-hf", "--hf", str(tmp_path / "sharded"),
                                            "--out", str(tmp_path / "o1")))
    victim = sorted(hf.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors" in _error(
        geno_convert("from-hf", "--hf", str(hf), "--out", str(tmp_path / "o2")))
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "not a Mixtral architecture" in _error(
        geno_convert("from-hf", "--hf", str(hf), "--out", str(tmp_path / "o3")))
    for failed in ("o1", "o2", "o3"):
        assert not (tmp_path / failed).exists()
    assert "exists and is not empty" in _error(
        geno_convert("to-hf", "--checkpoint", str(trained / "tp2"), "--out", str(hf)))
    assert "does not exist" in _error(
        geno_convert("to-hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o4")))


def test_inspect_reads_the_checkpoint_without_megatron_core(trained):
    """geno-convert inspect reads common.pt and .metadata with torch alone (no megatron-core, no
    process group) and lists the tensors megatron-core's own metadata reader finds."""
    import subprocess
    import sys

    from megatron_geno.checkpoint.layout import resolve_checkpoint_dir
    from megatron_geno.checkpoint.strategy import TrustedLoadStrategy

    script = ("import contextlib, io, sys\nfrom checkpoint_tools.cli import main\nout = io.StringIO()\n"
              "with contextlib.redirect_stdout(out):\n    rc = main(['inspect', sys.argv[1]])\n"
              "import torch\nprint(out.getvalue())\n"
              "print('STATE', rc, 'megatron.core' in sys.modules, torch.distributed.is_initialized())")
    proc = subprocess.run([sys.executable, "-c", script, str(trained / "tp2")],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[-4:] == ["STATE", "0", "False", "False"], proc.stderr[-2000:]
    listed = {m.group(1): json.loads(m.group(2)) for m in re.finditer(
        r"^  (\S+)\s+(\[[0-9, ]*\])\s+\S+$", proc.stdout, re.M)}
    mcore = TrustedLoadStrategy().load_tensors_metadata(
        resolve_checkpoint_dir(trained / "tp2", None, fallback=False))
    assert listed == {k: list(v.global_shape) for k, v in mcore.items()}
    assert listed["embedding.word_embeddings.weight"] == [256, 64]  # padded to 128 x TP=2
