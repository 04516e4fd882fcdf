"""geno-convert against careless and hostile input (issue 11, items 2 and 7): it removes only
what it created, never replaces OUT, and checks an HF directory before writing anything."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.faults.helpers import convert, error_line, train, tree

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint and its HF export."""
    root = tmp_path_factory.mktemp("convert")
    proc = train(root / "run", "schedule.train_iters=2", f"checkpoint.save={root / 'ck'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = convert("to-hf", "--checkpoint", str(root / "ck"), "--out", str(root / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_user_directory_named_like_a_temp_dir_survives(exported, tmp_path):
    """OUT.tmp holding a user's files is neither used nor removed, on success or failure."""
    mine = tmp_path / "hf.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = tree(mine)
    proc = convert("to-hf", "--checkpoint", str(exported / "ck"), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = convert("from-hf", "--hf", str(exported / "hf"), "--out", str(tmp_path / "imp"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp_path / "imp.tmp").mkdir()
    (tmp_path / "imp.tmp" / "keep").write_text("x")
    broken = tmp_path / "broken"
    shutil.copytree(exported / "hf", broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:5000])
    error_line(convert("from-hf", "--hf", str(broken), "--out", str(tmp_path / "imp2")))
    assert tree(mine) == before and (tmp_path / "imp.tmp" / "keep").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "hf", "hf.tmp", "imp", "imp.tmp"]


@pytest.mark.parametrize("out", [".", "file", "full"])
def test_bad_out_is_one_line_and_changes_nothing(exported, tmp_path, out):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    before = tree(tmp_path)
    for proc in (convert("to-hf", "--checkpoint", str(exported / "ck"), "--out", out, cwd=tmp_path),
                 convert("from-hf", "--hf", str(exported / "hf"), "--out", out, cwd=tmp_path)):
        line = error_line(proc)
        assert f"--out {out}" in line or f"directory {out}" in line
    assert tree(tmp_path) == before


def spoiled_hf(exported, tmp_path, edit_tensors=None, edit_config=None, edit_index=None):
    """A copy of the HF export with its tensors, config.json or index changed."""
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf_in"
    shutil.copytree(exported / "hf", hf)
    if edit_tensors:
        tensors = load_file(str(hf / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        config = json.loads((hf / "config.json").read_text())
        edit_config(config)
        (hf / "config.json").write_text(json.dumps(config))
    if edit_index:
        edit_index(hf)
    return hf


def _wrong_shape(t):
    t["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 32)


def _wrong_vocab(t):
    t["model.embed_tokens.weight"] = torch.zeros(256, 64)  # config.json says 128


def _extra(t):
    t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)


def _int_weights(t):
    t["model.norm.weight"] = torch.zeros(64, dtype=torch.int32)


def _missing(t):
    del t["model.layers.0.block_sparse_moe.experts.3.w2.weight"]


def _no_key(c):
    del c["num_local_experts"]


def _small_vocab(c):
    c["vocab_size"] = 64


def _bad_heads(c):
    c["num_key_value_heads"] = 3


def _outside_index(hf):
    from safetensors import safe_open

    (hf.parent / "outside.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "../outside.safetensors" for n in names}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    (hf / "model.safetensors").unlink()


def _tokenizer_config_not_json(hf):
    (hf / "tokenizer_config.json").write_text("{not json")


def _unknown_soft_mask(hf):
    config = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**config, "geno_soft_mask": "lower"}))


CASES = {
    "wrong-shape": (dict(edit_tensors=_wrong_shape), "model.layers.1.self_attn.o_proj.weight"),
    "wrong-vocab": (dict(edit_tensors=_wrong_vocab), "model.embed_tokens.weight"),
    "extra-tensor": (dict(edit_tensors=_extra), "model.layers.0.self_attn.q_proj.bias"),
    "int-weights": (dict(edit_tensors=_int_weights), "model.norm.weight"),
    "missing-tensor": (dict(edit_tensors=_missing), "experts.3.w2.weight"),
    "config-missing-key": (dict(edit_config=_no_key), "'num_local_experts'"),
    "vocab-below-tokenizer": (dict(edit_config=_small_vocab), "vocab_size"),
    "heads-not-divisible": (dict(edit_config=_bad_heads), "num_key_value_heads=3"),
    "index-outside-dir": (dict(edit_index=_outside_index), "../outside.safetensors"),
    "tokenizer-config-not-json": (dict(edit_index=_tokenizer_config_not_json),
                                  "tokenizer_config.json is not readable JSON"),
    "unknown-soft-mask": (dict(edit_index=_unknown_soft_mask), "geno_soft_mask='lower'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_from_hf_checks_everything_before_writing(exported, tmp_path, case):
    """In-process (the checks run before any process group or write); the CLI's exit code and
    one-line form are the same ConversionError path, checked once below."""
    from checkpoint_tools.from_hf import hf_to_mcore
    from checkpoint_tools.mcore_checkpoint import ConversionError

    edits, culprit = CASES[case]
    hf = spoiled_hf(exported, tmp_path, **edits)
    before = tree(tmp_path)
    with pytest.raises(ConversionError) as err:
        hf_to_mcore(hf, tmp_path / "imp")
    assert culprit in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert tree(tmp_path) == before


def test_from_hf_refusal_is_one_line_exit_2(exported, tmp_path):
    hf = spoiled_hf(exported, tmp_path, edit_tensors=_wrong_vocab)
    before = tree(tmp_path)
    line = error_line(convert("from-hf", "--hf", str(hf), "--out", str(tmp_path / "imp")))
    assert "model.embed_tokens.weight" in line and tree(tmp_path) == before


def test_from_hf_without_config_json(exported, tmp_path):
    from checkpoint_tools.from_hf import hf_to_mcore
    from checkpoint_tools.mcore_checkpoint import ConversionError

    hf = spoiled_hf(exported, tmp_path)
    (hf / "config.json").unlink()
    with pytest.raises(ConversionError, match="config.json"):
        hf_to_mcore(hf, tmp_path / "imp")


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".hf."))


def test_a_second_conversion_into_the_same_out_is_refused(exported, tmp_path):
    from megatron_geno.files import DirectoryLock

    holder = DirectoryLock(tmp_path, "out-hf")  # what a running conversion into tmp/hf holds
    before = tree(tmp_path)
    try:
        line = error_line(convert("to-hf", "--checkpoint", str(exported / "ck"),
                                  "--out", str(tmp_path / "hf")))
        assert tree(tmp_path) == before  # the holder's lock file untouched, nothing added
    finally:
        holder.release()
    assert "is being written by host" in line and f"pid {os.getpid()}" in line, line


def test_a_killed_conversions_leftovers_are_removed_by_the_next(exported, tmp_path):
    left = tmp_path / ".hf.k1ll3d_x.tmp"  # as fresh_temp_dir names a conversion's directory
    left.mkdir()
    (left / "model-00001-of-00002.safetensors").write_bytes(b"half a file")
    mine = tmp_path / ".hf.notes"  # not a conversion's: kept
    mine.write_text("keep me")
    proc = convert("to-hf", "--checkpoint", str(exported / "ck"), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _leftovers(tmp_path) == [".hf.notes"]
    assert (tmp_path / "hf" / "config.json").exists()


def test_ctrl_c_in_a_conversion_is_one_line_and_leaves_nothing(exported, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.functional.launcher import quiet_env

    out = tmp_path / "hf"
    proc = subprocess.Popen([sys.executable, "-m", "checkpoint_tools.cli", "to-hf",
                             "--checkpoint", str(exported / "ck"), "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, env=quiet_env())
    deadline = time.monotonic() + 120
    while not (tmp_path / ".geno-out-hf.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.002)  # the lock is taken before the checkpoint is read
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "geno-convert: interrupted: nothing was written" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT, no temporary, no lock


def test_eval_of_a_truncated_export_names_the_file(exported, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(exported / "hf", hf)
    weights = sorted(hf.glob("*.safetensors"))[-1]
    weights.write_bytes(weights.read_bytes()[:-100])
    (tmp_path / "x.fa").write_text(">x\nACGTACGTAC\n")
    line = error_line(run_eval("embed", "--hf", str(hf), "--fasta", str(tmp_path / "x.fa"),
                               "--out", str(tmp_path / "emb")))
    assert f"{weights} is damaged or truncated" in line, line


@pytest.mark.parametrize("missing,command,extra", [
    ("transformers", "embed", "megatron-geno[hf]"),
    ("pysam", "embed", "megatron-geno[eval]"),
])
def test_eval_without_an_extra_says_which_to_install(exported, tmp_path, missing, command, extra):
    import subprocess
    import sys

    from tests.functional.launcher import quiet_env

    (tmp_path / "x.fa").write_text(">x\nACGTACGTAC\n")
    args = [command, "--hf", str(exported / "hf"), "--fasta", str(tmp_path / "x.fa"),
            "--out", str(tmp_path / "emb")]
    code = (f"import sys; sys.modules[{missing!r}] = None\n"  # as if the extra were not installed
            f"from megatron_geno.evaluation.cli import main\nsys.exit(main({args!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=quiet_env())
    line = error_line(proc)
    assert extra in line, line


def run_eval(*args: str):
    import subprocess
    import sys

    from tests.functional.launcher import quiet_env

    return subprocess.run([sys.executable, "-m", "megatron_geno.evaluation.cli", *args],
                          capture_output=True, text=True, timeout=300, env=quiet_env())
