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
