"""Training on Megatron .bin/.idx prefixes blended by weight, and the errors for bad prefixes."""

from megatron_geno.data import synthetic_genome, write_indexed_dataset
from tests.functional.launcher import geno_train, geno_train_error


def test_blend_of_two_prefixes_trains(tmp_path):
    human, primate = tmp_path / "human", tmp_path / "primate"
    write_indexed_dataset(human, synthetic_genome(100_000, seed=1))
    write_indexed_dataset(primate, synthetic_genome(100_000, seed=2))
    records = geno_train(tmp_path / "run", "data.source=megatron",
                         f"data.blend=[0.5, '{human}', 0.5, '{primate}']",
                         "schedule.train_iters=3")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] < records[0]["loss"]


def test_bad_prefixes_are_one_clear_error(tmp_path):
    code, err = geno_train_error(tmp_path / "a", "data.source=megatron",
                                 f"data.blend=['{tmp_path / 'nope'}']")
    assert code == 2 and f"{tmp_path / 'nope'}.bin does not exist" in err
    small = tmp_path / "small"
    write_indexed_dataset(small, synthetic_genome(2_000, seed=1, num_contigs=3))
    code, err = geno_train_error(tmp_path / "b", "data.source=megatron", f"data.blend=['{small}']")
    assert code == 2 and "3 documents leave the valid part" in err


def test_exported_corpus_trains_and_validates_on_its_own_splits(tmp_path):
    """geno-preprocess export-megatron writes P_train / P_valid; data.blend=[P] finds both, and
    explicit train / valid prefixes work as Megatron-LM's --train/--valid-data-path do."""
    from tests.genomes import genome, write_fasta
    from tests.unit.test_preprocess import run_cli

    fasta = write_fasta(tmp_path / "g.fa", genome(3, {"chr1": 30_000, "chr20": 6_000}))
    assert run_cli("run", fasta, "--out", tmp_path / "corpus", "--holdout-contigs",
                   "valid=chr20") == 0
    assert run_cli("export-megatron", tmp_path / "corpus", "--prefix", tmp_path / "mg" / "g") == 0
    prefix = tmp_path / "mg" / "g"
    found = geno_train(tmp_path / "found", "data.source=megatron", f"data.blend=['{prefix}']",
                       "schedule.train_iters=2", "schedule.eval_interval=2")
    explicit = geno_train(tmp_path / "explicit", "data.source=megatron",
                          f"data.blend=['{prefix}_train']", f"data.valid_blend=['{prefix}_valid']",
                          "schedule.train_iters=2", "schedule.eval_interval=2")
    assert [r["loss"] for r in found] == [r["loss"] for r in explicit]
    assert found[-1]["val_loss"] == explicit[-1]["val_loss"]
    code, err = geno_train_error(tmp_path / "none", "data.source=megatron",
                                 f"data.blend=['{prefix}_train']", f"data.test_blend=['{prefix}_valid']",
                                 "schedule.eval_interval=2")
    assert code == 2 and "no valid data; give data.valid_blend" in err
