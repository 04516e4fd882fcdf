"""geno-preprocess: shards round-trip, bad input, resume, parallel determinism, splits, export."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.cli import main
from data_pipeline.corpus import Corpus, CorpusSplit
from data_pipeline.manifest import Assembly
from data_pipeline.normalise import NormalisationPolicy
from data_pipeline.corpus_manifest import prepare_out
from data_pipeline.pipeline import process_assembly
from data_pipeline.run_config import PipelineConfig
from data_pipeline.shard_format import ZARR_NAMES
from data_pipeline.token_reader import TokenReader
from megatron_geno.vocab import EOD, VOCAB, encoding_table
from tests.genomes import fasta_bytes, genome, random_bases, write_fasta
from tests.unit.test_normalise import normalise


def manifest(tmp: Path, rows: list[dict]) -> Path:
    cols = ["assembly", "sample", "haplotype", "species", "path", "md5", "split"]
    lines = ["\t".join(cols)] + ["\t".join(str(r.get(c, "")) for c in cols) for r in rows]
    path = tmp / "manifest.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def tree_bytes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def gappy_genome(seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    chrom = b"N" * 50 + random_bases(rng, 3000, b"ACGTacgt") + b"N" * 300
    chrom += random_bases(rng, 10, b"ACGT") + b"N" * 200 + random_bases(rng, 2500, b"ACGTRYacgt")
    chrom += b"NNNNN" + random_bases(rng, 700) + b"N" * 120
    return {"chr1": chrom, "chr20": random_bases(rng, 1500), "chrM": random_bases(rng, 40),
            "scaffold_9": b"A" + b"N" * 90 + b"C" * 80}


def test_shards_round_trip_across_parts_and_rollbacks(tmp_path):
    """Every document read back equals the normaliser's output, with tiny parts and shards."""
    records = gappy_genome(0)
    path = write_fasta(tmp_path / "g.fa.gz", records, compression="gzip")
    policy = NormalisationPolicy(split_n_run=100, min_length=20, max_n_fraction=0.3)
    # a 10-base piece is dropped after its shard was written: exercises the rollback path
    config = PipelineConfig(policy, part_tokens=2000, chunk_tokens=64, shard_tokens=256)
    asm = Assembly("g", "g", "1", "test", str(path))
    prepare_out(tmp_path / "out", config, [asm], False)
    attrs = process_assembly(asm, tmp_path / "out", config, read_chunk=100)
    assert len(attrs["parts"]) > 2
    from data_pipeline.corpus_manifest import finalize

    finalize(tmp_path / "out")
    got = []
    for _, part in Corpus(tmp_path / "out").parts():
        for i in range(len(part.doc_split)):
            doc = part.document(i)
            assert doc[-1] == EOD
            name = attrs["contigs"][part.doc_contig[i]]
            got.append((name, int(part.doc_source_start[i]), "".join(VOCAB[t] for t in doc[:-1])))
    expected = []
    for name, seq in records.items():
        docs, _ = normalise(seq.decode(), chunk=1000, split_n_run=100, min_length=20,
                            max_n_fraction=0.3)
        expected += [(name, start, text) for start, text in docs]
    assert got == expected
    assert attrs["stats"]["dropped_pieces"] >= 2  # the 10-base piece and chrM


@pytest.mark.parametrize("codec", ["dna2bit", "zstd", "blosc"])
def test_zarr_reads_our_shards_like_the_fast_reader(tmp_path, codec):
    import zarr

    rng = np.random.default_rng(1)
    seq = bytearray(random_bases(rng, 300_000, b"ACGTACGTACGTN"))
    for start in rng.integers(0, 290_000, 40):  # soft-masked blocks, some across chunk ends
        seq[start:start + 5000] = bytes(seq[start:start + 5000]).lower()
    records = {"c": bytes(seq)}
    path = write_fasta(tmp_path / "g.fa", records)
    config = PipelineConfig(NormalisationPolicy(soft_mask="keep"), chunk_tokens=4096,
                            shard_tokens=65536, codec=codec)
    asm = Assembly("g", "g", "", "", str(path))
    prepare_out(tmp_path / "o", config, [asm], False)
    process_assembly(asm, tmp_path / "o", config)
    tokens = tmp_path / "o/shards/g/part-00000/tokens"
    fast, slow = TokenReader(tokens), zarr.open_array(str(tokens), mode="r")
    assert fast.layout is not None and fast.layout[3] == ZARR_NAMES[codec]
    np.testing.assert_array_equal(slow[:], fast.read(0, len(fast)))
    expected = encoding_table("keep")[np.frombuffer(records["c"], dtype=np.uint8)]
    np.testing.assert_array_equal(slow[:], np.append(expected, EOD))
    rng = np.random.default_rng(2)
    for _ in range(200):
        a = int(rng.integers(0, len(fast)))
        b = int(rng.integers(a, min(a + 20_000, len(fast)) + 1))
        np.testing.assert_array_equal(fast.read(a, b), slow[a:b])


def run_cli(*args) -> int:
    return main(list(map(str, args)))


GOOD = {"chr1": b"ACGT" * 100}
BAD_INPUTS = {
    # name: (file bytes or None for a missing file, expected text, manifest md5)
    "no_header": (b"\n\n", "no FASTA header", ""),
    "seq_before_header": (b"ACGT\n>chr1\nACGT\n", "line 1: sequence before the first", ""),
    "empty_record": (b">chr1\n>chr2\nACGT\n", "line 1: record 'chr1' has no sequence", ""),
    "empty_last_record": (b">chr1\nACGT\n>chr2\n", "line 3: record 'chr2' has no sequence", ""),
    "duplicate_name": (b">chr1\nACGT\n>chr2\nAC\n>chr1 again\nGG\n",
                       "line 5: duplicate contig name 'chr1'", ""),
    "bad_character": (b">chr1\nACGT\nACGT\nAC.T\n",
                      "line 4: character '.' in record 'chr1': it is not an IUPAC DNA code", ""),
    "rna_base": (b">chr1\nACGU\n", "line 2: character 'U' in record 'chr1': U (uracil) is RNA's", ""),
    "truncated_gzip": (gzip.compress(fasta_bytes(genome(0, {"c": 50_000})))[:-2000],
                       "corrupt or truncated gzip", ""),
    "missing_file": (None, "cannot read", ""),
    "md5_mismatch": (fasta_bytes(GOOD), "does not match the manifest's", "0" * 32),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_keeps_other_assemblies(tmp_path, capsys, case):
    content, expected, md5 = BAD_INPUTS[case]
    bad = tmp_path / f"{case}.fa"
    if content is not None:
        bad.write_bytes(content)
    good = write_fasta(tmp_path / "good.fa", GOOD)
    rows = [{"assembly": "bad", "sample": "s1", "path": bad, "md5": md5},
            {"assembly": "good", "sample": "s2", "path": good}]
    rc = run_cli("run", "--manifest", manifest(tmp_path, rows), "--out", tmp_path / "out")
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert rc == 2
    assert len(errors) == 1 and str(bad) in errors[0] and expected in errors[0], errors
    shards = tmp_path / "out" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["good"]  # no partial or temporary group
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())  # lists the failure
    assert written["complete"] is False and [a["assembly"] for a in written["assemblies"]] == ["good"]
    assert [(f["assembly"], expected in f["message"]) for f in written["failed"]] == [("bad", True)]


def test_bad_options_name_the_option(tmp_path, capsys):
    good = write_fasta(tmp_path / "good.fa", GOOD)
    assert run_cli("run", good, "--out", tmp_path / "o", "--holdout-contigs", "train=chr1") == 2
    assert "--holdout-contigs" in capsys.readouterr().err
    assert run_cli("run", good, "--out", tmp_path / "o", "--min-length", "0") == 2
    assert "--min-length" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("run", good, "--out", tmp_path / "o", "--part-size", "lots")


def hprc_like(tmp_path: Path, samples=("HG001", "HG002", "HG003")) -> Path:
    rows = []
    for i, sample in enumerate(samples):
        for hap in (1, 2):
            records = genome(10 * i + hap, {"chr1": 3000, "chr20": 1000, "chrX": 500})
            path = write_fasta(tmp_path / f"{sample}.{hap}.fa.gz", records, compression="gzip")
            rows.append({"assembly": f"{sample}.{hap}", "sample": sample, "haplotype": hap,
                         "species": "Homo sapiens", "path": path.name})
    return manifest(tmp_path, rows)


def test_contig_holdout_applies_to_every_assembly(tmp_path):
    m = hprc_like(tmp_path)
    assert run_cli("run", "--manifest", m, "--out", tmp_path / "o",
                   "--holdout-contigs", "valid=^chr20$", "test=^chrX$") == 0
    corpus = Corpus(tmp_path / "o")
    for entry, part in corpus.parts():
        names = np.array(json.loads((tmp_path / "o" / entry["path"] / "zarr.json").read_text())
                         ["attributes"]["contigs"])[part.doc_contig]
        assert list(part.doc_split) == [{"chr20": 1, "chrX": 2}.get(n, 0) for n in names]
    t = corpus.manifest["totals"]["split_tokens"]
    assert t == {"train": 6 * 3001, "valid": 6 * 1001, "test": 6 * 501}


def test_sample_holdout_keeps_haplotypes_together_and_is_deterministic(tmp_path):
    m = hprc_like(tmp_path, samples=tuple(f"S{i:03d}" for i in range(12)))
    assert run_cli("run", "--manifest", m, "--out", tmp_path / "o", "--holdout-samples",
                   "valid=0.25", "test=0.25", "--split-seed", "7", "--workers", "2") == 0
    splits = {}
    for entry, part in Corpus(tmp_path / "o").parts():
        assert len(set(part.doc_split)) == 1
        splits.setdefault(entry["sample"], set()).add(int(part.doc_split[0]))
    assert all(len(s) == 1 for s in splits.values())  # both haplotypes in the same split
    assert {next(iter(s)) for s in splits.values()} == {0, 1, 2}
    # the same assignment in a fresh interpreter with another str hash seed
    code = ("from data_pipeline.splits import SplitRules; from data_pipeline.manifest import Assembly;"
            "r=SplitRules(sample_fractions=(('valid',0.25),('test',0.25)),seed=7);"
            "print([r.assembly_split(Assembly(f'S{i:03d}.1',f'S{i:03d}','1','','')) for i in range(12)])")
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parents[2], check=True).stdout
    assert [s or 0 for s in eval(out)] == [next(iter(splits[f"S{i:03d}"])) for i in range(12)]


def test_rerun_skips_finished_refuses_other_options_and_force_redoes(tmp_path, capsys):
    m = hprc_like(tmp_path, samples=("HG001",))
    out = tmp_path / "o"
    assert run_cli("run", "--manifest", m, "--out", out) == 0
    before = tree_bytes(out)
    assert run_cli("run", "--manifest", m, "--out", out) == 0
    assert "0 written, 2 already done" in capsys.readouterr().err
    assert tree_bytes(out) == before
    assert run_cli("run", "--manifest", m, "--out", out, "--soft-mask", "keep") == 2
    assert "other options (--soft-mask 'upper' -> 'keep')" in capsys.readouterr().err
    assert tree_bytes(out) == before  # nothing written was lost
    assert run_cli("run", "--manifest", m, "--out", out, "--soft-mask", "keep", "--force") == 0
    assert tree_bytes(out) != before


def test_array_tasks_and_workers_give_the_same_bytes_as_one_process(tmp_path, capsys):
    m = hprc_like(tmp_path)
    assert run_cli("run", "--manifest", m, "--out", tmp_path / "one") == 0
    assert run_cli("run", "--manifest", m, "--out", tmp_path / "par", "--workers", "2") == 0
    for task in (1, 0, 2):
        assert run_cli("run", "--manifest", m, "--out", tmp_path / "arr", "--task-index", task,
                       "--num-tasks", 3) == 0
        if task == 1:
            assert run_cli("finalize", tmp_path / "arr") == 2
            err = capsys.readouterr().err
            assert "not written yet" in err and "run the remaining array tasks" in err
    assert run_cli("finalize", tmp_path / "arr") == 0
    one = tree_bytes(tmp_path / "one")
    assert tree_bytes(tmp_path / "par") == one
    assert tree_bytes(tmp_path / "arr") == one


def test_verify_passes_and_catches_a_changed_source(tmp_path, capsys):
    m = hprc_like(tmp_path, samples=("HG001",))
    out = tmp_path / "o"
    assert run_cli("run", "--manifest", m, "--out", out, "--soft-mask", "keep") == 0
    assert run_cli("verify", out, "--windows", 8, "--window-length", 500) == 0
    assert "OK" in capsys.readouterr().out
    source = tmp_path / "HG001.1.fa.gz"
    records = genome(11, {"chr1": 3000, "chr20": 1000, "chrX": 500})
    records["chr1"] = records["chr1"][:1500] + b"N" + records["chr1"][1501:]
    write_fasta(source, records, compression="gzip")
    assert run_cli("verify", out, "--windows", 64, "--window-length", 3000) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_stats_table_lists_every_assembly(tmp_path, capsys):
    m = hprc_like(tmp_path, samples=("HG001",))
    assert run_cli("run", "--manifest", m, "--out", tmp_path / "o") == 0
    capsys.readouterr()
    assert run_cli("stats", tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert "HG001.1" in out and "HG001.2" in out and "total (2 assemblies)" in out
    # 3000 + 1000 + 500 bases and one EOD per contig; two haplotypes
    assert out.count(" 4,503 ") == 2 and " 9,006 " in out


def test_export_megatron_is_read_back_by_megatron_core(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    m = hprc_like(tmp_path, samples=("HG001",))
    out = tmp_path / "o"
    assert run_cli("run", "--manifest", m, "--out", out, "--holdout-contigs", "valid=chr20") == 0
    assert run_cli("export-megatron", out, "--prefix", tmp_path / "mg" / "human") == 0
    for split in ("train", "valid"):
        exported = IndexedDataset(str(tmp_path / "mg" / f"human_{split}"))
        ours = CorpusSplit(out, split)
        assert len(exported) == len(ours) > 0
        for i in range(len(ours)):
            np.testing.assert_array_equal(exported[i], ours.get(i))
    assert not (tmp_path / "mg" / "human_test.bin").exists()
