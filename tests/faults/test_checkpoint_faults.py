"""Hostile and damaged checkpoints (issue 11, items 1, 3 and 4): nothing read from a checkpoint
runs code, damage is one line naming the file (and tensor), a damaged `latest` falls back."""

from __future__ import annotations

import io
import json
import pickle
import shutil

import pytest
import torch

from tests.faults.helpers import MARKER, convert, error_line, evil_pickle, train, tree

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny trained save directory with iterations 2 and 4 (latest = 4)."""
    root = tmp_path_factory.mktemp("ckpt")
    proc = train(root / "run", "schedule.train_iters=4", "checkpoint.save_interval=2",
                 f"checkpoint.save={root / 'ck'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "ck"


@pytest.fixture
def ck(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ck")
    return tmp_path / "ck"


def reseal(it):
    """What an attacker can do too: recompute checksums.json over the crafted files."""
    from megatron_geno.checkpoint.integrity import seal

    seal(it)


COMMANDS = {
    "inspect": lambda it, tmp: convert("inspect", str(it)),
    "to-hf": lambda it, tmp: convert("to-hf", "--checkpoint", str(it), "--out", str(tmp / "hf")),
    "train-load": lambda it, tmp: train(tmp / "run", "schedule.train_iters=6",
                                        f"checkpoint.load={it}"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_crafted_metadata_pickle_never_runs(ck, tmp_path, command):
    it = ck / "iter_0000004"
    (it / ".metadata").write_bytes(evil_pickle(tmp_path))
    reseal_ok = False
    try:
        reseal(it)
        reseal_ok = True
    except Exception:  # seal reads .metadata through the same restricted unpickler
        pass
    assert not reseal_ok
    before = tree(ck)
    line = error_line(COMMANDS[command](it, tmp_path))
    assert not (tmp_path / MARKER).exists()
    assert ".metadata" in line and "refused global posix.system" in line
    assert tree(ck) == before and not (tmp_path / "hf").exists()


def test_crafted_common_pt_never_runs(ck, tmp_path):
    it = ck / "iter_0000004"
    from tests.faults.helpers import Evil

    torch.save({"model_config": Evil(tmp_path)}, it / "common.pt")
    reseal(it)
    for proc in (convert("inspect", str(it)),
                 train(tmp_path / "run", "schedule.train_iters=6", f"checkpoint.load={it}")):
        line = error_line(proc)
        assert "common.pt" in line and "refused to unpickle" in line
    assert not (tmp_path / MARKER).exists()


def test_crafted_object_inside_data_file_never_runs(ck, tmp_path):
    """A pickled object item (extra state, RNG) in a .distcp file is read weights-only."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_geno.checkpoint.trust import read_dcp_metadata
    from tests.faults.helpers import Evil

    it = ck / "iter_0000004"
    metadata = read_dcp_metadata(it)
    key = next(k for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata) and "_extra_state" in k)
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data[index]
    payload = io.BytesIO()
    torch.save(Evil(tmp_path), payload)
    data_file = it / info.relative_path
    offset = data_file.stat().st_size
    with data_file.open("ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(payload.getvalue()))
    with (it / ".metadata").open("wb") as f:
        pickle.dump(metadata, f)
    reseal(it)
    line = error_line(train(tmp_path / "run", "schedule.train_iters=6", f"checkpoint.load={it}"))
    assert not (tmp_path / MARKER).exists()
    assert key in line and "refused to unpickle" in line


def test_storage_path_outside_the_checkpoint_is_refused(ck, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from megatron_geno.checkpoint.trust import read_dcp_metadata

    it = ck / "iter_0000004"
    metadata = read_dcp_metadata(it)
    index = next(iter(metadata.storage_data))
    info = metadata.storage_data[index]
    metadata.storage_data[index] = _StorageInfo("../../outside.distcp", info.offset, info.length)
    with (it / ".metadata").open("wb") as f:
        pickle.dump(metadata, f)
    line = error_line(convert("inspect", str(it)))
    assert "../../outside.distcp" in line and "not a file name inside" in line


DAMAGE = {
    "truncated-distcp": ("__0_1.distcp", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    "empty-distcp": ("__0_0.distcp", lambda p: p.write_bytes(b"")),
    "empty-metadata": (".metadata", lambda p: p.write_bytes(b"")),
    "truncated-metadata": (".metadata", lambda p: p.write_bytes(p.read_bytes()[:500])),
    "truncated-common": ("common.pt", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "missing-distcp": ("__0_1.distcp", lambda p: p.unlink()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_one_line_and_leaves_no_output(ck, tmp_path, damage):
    name, spoil = DAMAGE[damage]
    it = ck / "iter_0000004"
    spoil(it / name)
    before = tree(tmp_path)
    line = error_line(convert("to-hf", "--checkpoint", str(it), "--out", str(tmp_path / "hf")))
    assert name in line
    assert tree(tmp_path) == before  # no partial output, no temporary directory left


def test_changed_tensor_bytes_name_file_and_tensor(ck, tmp_path):
    it = ck / "iter_0000004"
    document = json.loads((it / "checksums.json").read_text())
    item = next(i for i in document["items"] if i["item"].startswith("output_layer.weight"))
    data = bytearray((it / item["file"]).read_bytes())
    at = item["offset"] + item["length"] - 16  # inside the tensor's bytes, past its header
    data[at] ^= 0xFF
    (it / item["file"]).write_bytes(bytes(data))
    for proc in (convert("to-hf", "--checkpoint", str(it), "--out", str(tmp_path / "hf")),
                 train(tmp_path / "run", "schedule.train_iters=6", f"checkpoint.load={it}")):
        line = error_line(proc)
        assert item["file"] in line and "output_layer.weight" in line and "checksum" in line
    assert not (tmp_path / "hf").exists()
    # the flag that skips the check for speed really skips it: the damaged bytes then load
    proc = convert("to-hf", "--checkpoint", str(it), "--out", str(tmp_path / "hf"),
                   "--no-verify-checksums")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_checkpoint_without_checksums_loads_with_a_warning(ck, tmp_path):
    it = ck / "iter_0000004"
    (it / "checksums.json").unlink()  # as written before checksums existed
    proc = convert("inspect", str(it))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has no checksums.json" in proc.stderr


def test_damaged_latest_resumes_from_newest_complete_checkpoint(ck, tmp_path):
    (ck / "iter_0000004" / "__0_0.distcp").write_bytes(b"")  # latest names a damaged one
    proc = train(tmp_path / "run", "schedule.train_iters=5", f"checkpoint.save={ck}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "names a damaged checkpoint" in proc.stderr and "iter_0000002" in proc.stderr
    assert (ck / "latest").read_text().strip() == "5"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4, 5]  # resumed after iteration 2


def test_garbage_latest_without_a_complete_checkpoint_is_one_line(ck, tmp_path):
    (ck / "latest").write_text("garbage")
    for it in ("iter_0000002", "iter_0000004"):
        (ck / it / "metadata.json").unlink()
    line = error_line(train(tmp_path / "run", "schedule.train_iters=6", f"checkpoint.save={ck}"))
    assert "latest" in line and "no other complete checkpoint" in line


def test_killed_resave_leaves_a_complete_checkpoint(ck, tmp_path, monkeypatch):
    """A re-save of iteration 4 killed after moving the old copy aside: the old copy is found."""
    import os

    from megatron_geno import checkpointing
    from megatron_geno.checkpoint import layout

    save, final = ck, ck / "iter_0000004"
    tmp = ck / "iter_0000004.tmp"
    shutil.copytree(final, tmp)  # the new copy, complete
    real_replace = os.replace
    calls = []

    def killed_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # the window between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        layout._publish(save, tmp, final, 4)
    monkeypatch.undo()
    assert not final.exists() and (ck / "iter_0000004.replaced").exists()
    assert checkpointing.resume_point(save) == ck / "iter_0000004.replaced"
    proc = train(tmp_path / "run", "schedule.train_iters=5", f"checkpoint.save={ck}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ck / "latest").read_text().strip() == "5"
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 5


def test_resave_of_an_iteration_replaces_it_completely(ck, tmp_path):
    """A run resumed at its last iteration saves iteration 4 again: one complete copy remains."""
    from megatron_geno.checkpoint.integrity import structural_fault, verify_checksums

    proc = train(tmp_path / "run", "schedule.train_iters=4", f"checkpoint.save={ck}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["iter_0000002", "iter_0000004", "latest"]
    assert (ck / "latest").read_text().strip() == "4"
    assert structural_fault(ck / "iter_0000004") is None
    assert verify_checksums(ck / "iter_0000004") == []


def test_a_second_run_on_the_same_save_directory_is_refused(ck, tmp_path):
    """Two geno-train runs on one checkpoint.save: the second is refused at start, naming the
    holder (host, pid), and the directory is unchanged; once the first ends, a run proceeds. The
    saved checkpoints are readable by the group and others as the umask says."""
    import os
    import stat

    from megatron_geno.files import DirectoryLock

    held = DirectoryLock(ck)  # as a running geno-train on ck holds it
    try:
        before = tree(ck)
        line = error_line(train(tmp_path / "run", "schedule.train_iters=6",
                                f"checkpoint.save={ck}"))
        assert "checkpoint.save" in line and f"pid {os.getpid()}" in line, line
        assert tree(ck) == before
    finally:
        held.release()
    proc = train(tmp_path / "run", "schedule.train_iters=5", f"checkpoint.save={ck}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ck / "latest").read_text().strip() == "5"
    umask = os.umask(0o022)
    os.umask(umask)
    for published in (ck / "latest", ck / "iter_0000005" / "checksums.json"):
        assert stat.S_IMODE(published.stat().st_mode) == 0o666 & ~umask, published


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_diverging_training_is_one_line_naming_the_last_good_checkpoint(tmp_path, background):
    """Non-finite gradients (an lr of 1e12 brings them at step 2, before its save): one line
    with the iteration and the last good checkpoint; nothing saved after it. With async saves,
    step 1's save is still in flight at step 2: it is finished and sealed, then named."""
    ck = tmp_path / "ck"
    line = error_line(train(tmp_path / "run", "schedule.train_iters=20", "optimizer.lr=1e12",
                            "optimizer.min_lr=1e11", "schedule.warmup_iters=0",
                            "optimizer.clip_grad=0", "checkpoint.save_interval=1",
                            f"checkpoint.async_save={str(background).lower()}",
                            f"checkpoint.save={ck}"))
    assert "iteration 2: the gradient norm is nan" in line, line
    assert str(ck / "iter_0000001") in line and "nothing was saved" in line
    assert (ck / "latest").read_text().strip() == "1"
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith(".")) == [
        "iter_0000001", "latest"]


def test_a_resume_under_another_tokenizer_is_refused(ck, tmp_path):
    """The soft-mask policy is part of the tokenizer: resuming a geno (upper) run with geno:keep
    is one line naming both and the way to start anew from the weights, which then works."""
    before = tree(ck)
    line = error_line(train(tmp_path / "run", "schedule.train_iters=6", "data.tokenizer=geno:keep",
                            f"checkpoint.load={ck}"))
    assert "data.tokenizer=geno " in line and "data.tokenizer=geno:keep" in line, line
    assert "checkpoint.weights_only=true" in line
    assert tree(ck) == before
    proc = train(tmp_path / "fresh", "schedule.train_iters=2", "data.tokenizer=geno:keep",
                 "checkpoint.weights_only=true", f"checkpoint.load={ck}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_space_a_checkpoint_needs_is_known_before_saving(ck):
    """The start-up estimate of one checkpoint's size is the size a save writes (tiny: within
    a third); less free space than that is a warning naming both."""
    from megatron_geno.checkpointing import checkpoint_bytes, space_warning
    from megatron_geno.config import load_config

    cfg = load_config(None, ["model.preset=tiny"])
    from megatron_geno.vocab import VOCAB_SIZE

    estimate = checkpoint_bytes(cfg, VOCAB_SIZE)
    written = sum(f.stat().st_size for f in (ck / "iter_0000004").rglob("*") if f.is_file())
    assert 0.67 < written / estimate < 1.5, (written, estimate)
    assert space_warning(ck, estimate) is None
    warning = space_warning(ck, 10**18)
    assert warning and str(ck) in warning and "GiB free" in warning


def test_conversion_refuses_a_damaged_latest_unless_told_the_iteration(ck, tmp_path):
    """Training goes on from the newest complete checkpoint when latest names a damaged one;
    geno-convert does not hand out an older model silently: one line naming the newest complete
    iteration, and --iteration takes it."""
    (ck / "iter_0000004" / "__0_0.distcp").write_bytes(b"")
    before = tree(tmp_path)
    line = error_line(convert("to-hf", "--checkpoint", str(ck), "--out", str(tmp_path / "hf")))
    assert "names a damaged checkpoint" in line and "--iteration 2" in line, line
    assert tree(tmp_path) == before
    proc = convert("inspect", str(ck), "--iteration", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    line = error_line(train(tmp_path / "file" / "run", "schedule.train_iters=2",
                            f"data.cache_dir={tmp_path / 'cache'}"))
    assert f"cannot write {tmp_path / 'file' / 'run'}" in line and "Not a directory" in line, line
