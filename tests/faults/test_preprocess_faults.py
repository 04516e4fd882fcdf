"""geno-preprocess against careless input and damaged corpora (issue 11, item 8)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.faults.helpers import error_line, preprocess, tree
from tests.genomes import random_bases, write_fasta


@pytest.fixture
def fastas(tmp_path):
    rng = np.random.default_rng(0)
    return [write_fasta(tmp_path / f"a{i}.fa", {f"chr{j}": random_bases(rng, 3000) for j in (1, 2)})
            for i in range(3)]


def manifest_assemblies(corpus):
    return [a["assembly"] for a in json.loads((corpus / "manifest.json").read_text())["assemblies"]]


def test_out_naming_a_file_is_one_line(fastas, tmp_path):
    target = tmp_path / "corpus"
    target.write_text("not a directory")
    before = tree(tmp_path)
    line = error_line(preprocess("run", "--out", str(target), str(fastas[0])))
    assert str(target) in line and "is a file" in line
    assert tree(tmp_path) == before


def test_rerun_naming_fewer_inputs_keeps_the_others(fastas, tmp_path):
    corpus = tmp_path / "corpus"
    assert preprocess("run", "--out", str(corpus), *map(str, reversed(fastas))).returncode == 0
    first = json.loads((corpus / "manifest.json").read_text())
    proc = preprocess("run", "--out", str(corpus), str(fastas[0]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the same set of assemblies: the same manifest (order and content hash), whatever was named
    assert manifest_assemblies(corpus) == ["a0", "a1", "a2"]
    assert json.loads((corpus / "manifest.json").read_text()) == first
    proc = preprocess("run", "--out", str(corpus), str(fastas[0]), "--only-listed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert manifest_assemblies(corpus) == ["a0"]
    assert sorted(p.name for p in (corpus / "shards").iterdir()) == ["a0", "a1", "a2"]


def test_contig_names_are_utf8(tmp_path):
    path = tmp_path / "g.fa"
    seq = random_bases(np.random.default_rng(1), 200).decode()
    path.write_text(f">contig_é\n{seq}\n>contig_è\n{seq}\n", encoding="utf-8")
    corpus = tmp_path / "corpus"
    proc = preprocess("run", "--out", str(corpus), str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    attrs = json.loads((corpus / "shards" / "g" / "zarr.json").read_text(encoding="utf-8"))
    assert attrs["attributes"]["contigs"] == ["contig_é", "contig_è"]


def test_header_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "g.fa"
    seq = random_bases(np.random.default_rng(1), 200)
    path.write_bytes(b">ok\n" + seq + b"\n>bad\xff\n" + seq + b"\n")
    line = error_line(preprocess("run", "--out", str(tmp_path / "corpus"), str(path)))
    assert f"{path}: line 3: header is not valid UTF-8" in line


DAMAGE = {
    "truncated-shard": lambda g: (g / "part-00000/tokens/c/0").write_bytes(
        (g / "part-00000/tokens/c/0").read_bytes()[:100]),
    "changed-index": lambda g: _flip_last_bytes(g / "part-00000/tokens/c/0"),
    "missing-shard": lambda g: (g / "part-00000/tokens/c/0").unlink(),
}


def _flip_last_bytes(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shard_found_by_verify_and_redone_by_force(fastas, tmp_path, damage):
    corpus = tmp_path / "corpus"
    assert preprocess("run", "--out", str(corpus), *map(str, fastas)).returncode == 0
    clean = tree(corpus / "shards" / "a1")
    DAMAGE[damage](corpus / "shards" / "a1")
    proc = preprocess("verify", str(corpus))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "DAMAGED" in proc.stdout and str(corpus / "shards" / "a1" / "part-00000") in proc.stdout
    proc = preprocess("run", "--out", str(corpus), "--force", str(fastas[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tree(corpus / "shards" / "a1") == clean  # byte-identical to the first run
    assert preprocess("verify", str(corpus)).returncode == 0


def test_damaged_group_metadata_is_one_line_then_force_redoes_it(fastas, tmp_path):
    corpus = tmp_path / "corpus"
    assert preprocess("run", "--out", str(corpus), *map(str, fastas)).returncode == 0
    (corpus / "shards" / "a2" / "zarr.json").write_text("{not json")
    line = error_line(preprocess("run", "--out", str(corpus), *map(str, fastas)))
    assert str(corpus / "shards" / "a2" / "zarr.json") in line and "--force" in line
    proc = preprocess("run", "--out", str(corpus), "--force", str(fastas[2]))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_manifest_paths_never_leave_the_corpus(fastas, tmp_path):
    corpus = tmp_path / "corpus"
    assert preprocess("run", "--out", str(corpus), str(fastas[0])).returncode == 0
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["assemblies"][0]["path"] = "../../elsewhere"
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    for command in ("stats", "verify"):
        line = error_line(preprocess(command, str(corpus)))
        assert "manifest.json" in line and "../../elsewhere" in line


def test_published_files_are_fsynced_before_the_rename(fastas, tmp_path, monkeypatch):
    """Every file of a finished assembly reaches the disk before the rename that publishes it."""
    from data_pipeline import pipeline
    from data_pipeline.corpus_manifest import prepare_out
    from data_pipeline.manifest import assemblies_from_paths
    from data_pipeline.run_config import PipelineConfig
    from megatron_geno import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    config = PipelineConfig()
    [assembly] = assemblies_from_paths([str(fastas[0])], "test")
    out = tmp_path / "corpus"
    prepare_out(out, config, [assembly], False)
    pipeline.process_assembly(assembly, out, config)
    publish = next(i for i, e in enumerate(events)
                   if e[0] == "replace" and e[2] == str(out / "shards" / "a0"))
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    tmp = events[publish][1]
    written = {os.path.join(d, f).replace(str(out / "shards" / "a0"), tmp)
               for d, _, fs in os.walk(out / "shards" / "a0") for f in fs}
    assert written and written <= synced


def test_training_on_a_damaged_corpus_is_one_line(fastas, tmp_path):
    from tests.faults.helpers import train

    corpus = tmp_path / "corpus"
    assert preprocess("run", "--out", str(corpus), *map(str, fastas)).returncode == 0
    shard = corpus / "shards" / "a1" / "part-00000" / "tokens" / "c" / "0"
    shard.write_bytes(shard.read_bytes()[:100])
    line = error_line(train(tmp_path / "run", "schedule.train_iters=2", "schedule.eval_interval=0",
                            "data.seq_length=64", "data.source=zarr", f"data.blend=[{corpus}]"))
    assert str(shard) in line and "truncated" in line


def test_a_second_writer_of_the_same_assemblies_is_refused(fastas, tmp_path):
    """Two `run`s of the same assemblies into one --out: the second is refused at start, naming
    the holder; a run of other assemblies (another SLURM array task) is not."""
    import hashlib

    from megatron_geno.files import DirectoryLock

    corpus = tmp_path / "corpus"
    assert preprocess("run", "--out", str(corpus), str(fastas[2])).returncode == 0
    share = hashlib.sha256(b"a0").hexdigest()[:12]
    held = DirectoryLock(corpus, f"writer-{share}")  # as a run of a0 in progress holds it
    try:
        before = tree(corpus)
        line = error_line(preprocess("run", "--out", str(corpus), str(fastas[0])))
        assert f"pid {os.getpid()}" in line and str(corpus) in line
        assert tree(corpus) == before
        proc = preprocess("run", "--out", str(corpus), str(fastas[1]))
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        held.release()
    proc = preprocess("run", "--out", str(corpus), str(fastas[0]))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ctrl_c_stops_cleanly_and_a_rerun_continues(tmp_path):
    """Ctrl-C (SIGINT to the process) in the middle of an assembly: exit 130 with one line, no
    traceback, no temporary group left; the same command then finishes the corpus."""
    import signal
    import subprocess
    import sys
    import time

    from tests.functional.launcher import quiet_env
    from tests.genomes import genome

    path = write_fasta(tmp_path / "big.fa", genome(0, {"chr1": 1_500_000}))
    corpus = tmp_path / "corpus"
    cmd = [sys.executable, "-m", "data_pipeline.cli", "run", str(path), "--out", str(corpus),
           "--read-chunk", "1K"]
    proc = subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((corpus / "shards").glob(".*.tmp/part-00000")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err[-2000:]
    assert "Traceback" not in err and "geno-preprocess: interrupted" in err, err[-2000:]
    assert not list((corpus / "shards").glob(".*.tmp"))
    assert preprocess("run", str(path), "--out", str(corpus)).returncode == 0
    assert manifest_assemblies(corpus) == ["big"]


def test_data_corner_cases_are_one_line_or_just_work(fastas, tmp_path):
    """A UTF-8 byte-order mark is skipped; a corrupt gzip member names the file; --read-chunk 0
    names the option; a corpus whose every contig is all N is one line with the thresholds."""
    import gzip

    bom = tmp_path / "bom.fa"
    bom.write_bytes(b"\xef\xbb\xbf" + fastas[0].read_bytes())
    assert preprocess("run", "--out", str(tmp_path / "c_bom"), str(bom)).returncode == 0
    assert manifest_assemblies(tmp_path / "c_bom") == ["bom"]

    broken = tmp_path / "broken.fa.gz"
    data = bytearray(gzip.compress(fastas[0].read_bytes()))
    data[len(data) // 2:len(data) // 2 + 40] = b"\x00" * 40
    broken.write_bytes(bytes(data))
    line = error_line(preprocess("run", "--out", str(tmp_path / "c_gz"), str(broken)))
    assert str(broken) in line and "corrupt or truncated gzip" in line, line

    line = error_line(preprocess("run", "--out", str(tmp_path / "c0"), str(fastas[0]),
                                 "--read-chunk", "0"))
    assert "--read-chunk must be at least 1K" in line, line

    all_n = write_fasta(tmp_path / "alln.fa", {"chr1": b"N" * 5000})
    line = error_line(preprocess("run", "--out", str(tmp_path / "c_n"), str(all_n)))
    assert "holds no sequence" in line and "alln" in line and "--max-n-fraction" in line, line


def test_training_data_that_cannot_fill_a_sample_is_one_line_with_numbers(fastas, tmp_path):
    """An empty corpus is called empty (not 'held out'); a corpus shorter than one sample is
    refused with both numbers; a run that repeats the corpus says how many passes it makes."""
    import logging

    from megatron_geno.config import ConfigError
    from megatron_geno.sources import zarr_blend_per_split

    all_n = write_fasta(tmp_path / "alln.fa", {"chr1": b"N" * 5000})
    preprocess("run", "--out", str(tmp_path / "empty"), str(all_n))  # refused, manifest written
    with pytest.raises(ConfigError) as err:
        zarr_blend_per_split([str(tmp_path / "empty")], [True, False, False])
    assert "hold no tokens at all" in str(err.value), str(err.value)

    assert preprocess("run", "--out", str(tmp_path / "c"), str(fastas[0])).returncode == 0
    train = json.loads((tmp_path / "c" / "manifest.json").read_text())["totals"]["split_tokens"]["train"]
    with pytest.raises(ConfigError) as err:
        zarr_blend_per_split([str(tmp_path / "c")], [True, False, False], seq_length=train)
    assert (f"data.seq_length={train} needs {train + 1:,d} tokens per sample, but the train "
            f"split of {tmp_path / 'c'} holds {train:,d}") in str(err.value), str(err.value)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron_geno.data").addHandler(handler)
    try:
        zarr_blend_per_split([str(tmp_path / "c")], [True, False, False], seq_length=128,
                             train_tokens=3 * train)
    finally:
        logging.getLogger("megatron_geno.data").removeHandler(handler)
    assert any("3.0 passes over the" in r.getMessage() for r in records), records


@pytest.mark.parametrize("damage,expected", [
    ("idx", "human_train.idx is damaged or truncated"),
    ("bin", "human_train.bin holds"),
])
def test_a_truncated_export_is_one_line_naming_the_file(fastas, tmp_path, damage, expected):
    from types import SimpleNamespace

    from megatron_geno.config import ConfigError
    from megatron_geno.data import check_prefixes, megatron_blend_per_split

    assert preprocess("run", "--out", str(tmp_path / "c"), str(fastas[0])).returncode == 0
    prefix = tmp_path / "mg" / "human"
    assert preprocess("export-megatron", str(tmp_path / "c"), "--prefix",
                      str(prefix)).returncode == 0
    check_prefixes([f"{prefix}_train"], "100,0,0")  # whole, it opens
    path = tmp_path / "mg" / f"human_train.{damage}"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ConfigError) as err:
        check_prefixes([f"{prefix}_train"], "100,0,0")
    assert expected in str(err.value) and "data.blend" in str(err.value), str(err.value)
    d = SimpleNamespace(blend=[str(prefix)], valid_blend=[], test_blend=[])
    with pytest.raises(ConfigError) as err:
        megatron_blend_per_split(d, [True, False, False])
    assert expected in str(err.value), str(err.value)


def test_a_bad_slurm_array_variable_is_one_line(fastas, tmp_path, monkeypatch):
    from data_pipeline.manifest import ManifestError, task_slice

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3%")
    with pytest.raises(ManifestError) as err:
        task_slice([], None, 4)
    assert "SLURM_ARRAY_TASK_ID='3%' is not an integer" in str(err.value)


def test_an_empty_split_is_warned(fastas, tmp_path):
    proc = preprocess("run", "--out", str(tmp_path / "held"), str(fastas[0]),
                      "--holdout-contigs", "valid=chr*")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has an empty train split: every document is held out" in proc.stderr, proc.stderr
    proc = preprocess("run", "--out", str(tmp_path / "all"), str(fastas[0]))
    assert proc.returncode == 0 and "has an empty valid split" in proc.stderr, proc.stderr


def test_a_failed_assembly_is_listed_in_the_manifest_with_one_way_on(fastas, tmp_path):
    """One bad input of three: the two others are written, manifest.json says the corpus is
    incomplete and why, `stats` shows it, every reader refuses it with the same hint (which never
    leads back to itself), and fixing the input completes the corpus as one clean run would."""
    from tests.faults.helpers import train

    bad = tmp_path / "a1.fa"
    good_a1 = bad.read_bytes()
    bad.write_bytes(b">chr1\nACGTUACGT\n")
    corpus = tmp_path / "corpus"
    proc = preprocess("run", "--out", str(corpus), *map(str, fastas))
    line = error_line(proc)
    assert f"{bad}: line 2" in line and "RNA" in line, line
    hint = [x for x in proc.stderr.splitlines() if "is incomplete" in x]
    assert len(hint) == 1 and "1 of 3 assemblies failed (a1)" in hint[0], proc.stderr
    assert "rerun `geno-preprocess run`" in hint[0] and "finalize" not in hint[0], hint[0]
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["content_hash"] is None
    assert [a["assembly"] for a in manifest["assemblies"]] == ["a0", "a2"]
    assert manifest["failed"] == [{"assembly": "a1", "source": str(bad), "message": line.split(
        "error: ", 1)[1]}]

    stats = preprocess("stats", str(corpus))
    assert stats.returncode == 1 and "a1" in stats.stdout and "FAILED" in stats.stdout
    assert "a0" in stats.stdout and hint[0].split(": ", 1)[1] in stats.stderr
    before = tree(corpus)
    for command in (("finalize", str(corpus)), ("verify", str(corpus)),
                    ("export-megatron", str(corpus), "--prefix", str(tmp_path / "x"))):
        line = error_line(preprocess(*command))
        assert "1 of 3 assemblies failed (a1)" in line and "rerun `geno-preprocess run`" in line
    line = error_line(train(tmp_path / "run", "schedule.train_iters=2", "schedule.eval_interval=0",
                            "data.seq_length=64", "data.source=zarr", f"data.blend=[{corpus}]"))
    assert "is incomplete" in line and "(a1)" in line, line
    import subprocess
    import sys

    unread = tmp_path / "model"  # an export whose config nobody reads: refused before that
    unread.mkdir()
    (unread / "config.json").write_text("{}")
    line = error_line(subprocess.run(
        [sys.executable, "-m", "megatron_geno.evaluation.cli", "loss", "--hf", str(unread),
         "--corpus", str(corpus)], capture_output=True, text=True))
    assert "is incomplete" in line and "(a1)" in line, line
    assert tree(corpus) == before  # refusals write nothing

    bad.write_bytes(good_a1)
    assert preprocess("run", "--out", str(corpus), *map(str, fastas)).returncode == 0
    clean = tmp_path / "clean"
    assert preprocess("run", "--out", str(clean), *map(str, fastas)).returncode == 0
    assert not (corpus / "failures").exists()
    assert tree(corpus / "shards") == tree(clean / "shards")
    fixed = json.loads((corpus / "manifest.json").read_text())
    assert fixed["complete"] is True
    assert fixed["content_hash"] == json.loads((clean / "manifest.json").read_text())["content_hash"]


def test_a_failed_array_task_is_listed_by_finalize_and_dropping_the_input_completes(fastas,
                                                                                    tmp_path):
    bad = tmp_path / "a2.fa"
    bad.write_bytes(b">chr1\n")  # an empty record
    corpus = tmp_path / "corpus"
    for task in (0, 1, 2):
        proc = preprocess("run", "--out", str(corpus), "--task-index", str(task), "--num-tasks",
                          "3", *map(str, fastas))
        if task == 2:
            assert str(bad) in error_line(proc)
            assert f"{corpus}/failures" in proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr[-2000:]
    line = error_line(preprocess("finalize", str(corpus)))
    assert "1 of 3 assemblies failed (a2)" in line, line
    assert json.loads((corpus / "manifest.json").read_text())["failed"][0]["assembly"] == "a2"
    proc = preprocess("run", "--out", str(corpus), "--only-listed", *map(str, fastas[:2]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert manifest_assemblies(corpus) == ["a0", "a1"] and not (corpus / "failures").exists()
    assert json.loads((corpus / "manifest.json").read_text())["complete"] is True
