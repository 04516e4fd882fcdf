"""GenoGPTDataset over a zarr corpus: samples, reverse-complement augmentation, document masks."""

import numpy as np
import pytest

from megatron_geno.config import ConfigError, load_config
from megatron_geno.data import build_datasets
from megatron_geno.tokenizer import GenoTokenizer
from megatron_geno.vocab import COMPLEMENT, EOD, VOCAB
from tests.genomes import genome, write_fasta
from tests.unit.test_preprocess import run_cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    paths = [write_fasta(tmp / f"a{i}.fa", genome(i, {"chr1": 700, "chr2": 300, "chr20": 400}))
             for i in range(2)]
    assert run_cli("run", *paths, "--out", tmp / "c", "--holdout-contigs", "valid=chr20") == 0
    return tmp / "c"


def datasets(corpus, tmp_path, *overrides):
    cfg = load_config(None, ["data.source=zarr", f"data.blend=['{corpus}']", "data.seq_length=64",
                             "schedule.train_iters=10", "schedule.warmup_iters=1",
                             "schedule.eval_interval=5", *overrides])
    return build_datasets(cfg, GenoTokenizer(), tmp_path)


def text_of(sample) -> np.ndarray:
    return np.append(sample["tokens"].numpy(), sample["labels"].numpy()[-1])


def test_samples_come_from_the_manifest_splits(corpus, tmp_path):
    train, valid, test = datasets(corpus, tmp_path)
    assert test is None
    valid_text = "".join(VOCAB[t] for t in text_of(valid[0]) if t != EOD)
    chr20 = genome(0, {"chr1": 700, "chr2": 300, "chr20": 400})["chr20"].upper().decode()
    chr20_b = genome(1, {"chr1": 700, "chr2": 300, "chr20": 400})["chr20"].upper().decode()
    assert any(valid_text[:30] in c for c in (chr20, chr20_b))
    train_text = "".join(VOCAB[t] for i in range(20) for t in text_of(train[i]) if t != EOD)
    assert chr20[:40] not in train_text and chr20_b[:40] not in train_text


def test_complement_table_against_literal_ids():
    """A C G T N = 5..9, a c g t n = 10..14 (tokenizer v1); everything else maps to itself."""
    pairs = {5: 8, 6: 7, 7: 6, 8: 5, 9: 9, 10: 13, 11: 12, 12: 11, 13: 10, 14: 14}
    for token in range(128):
        assert COMPLEMENT[token] == pairs.get(token, token), token


def test_reverse_complement_is_exact_and_deterministic(corpus, tmp_path):
    plain, _, _ = datasets(corpus, tmp_path / "a")
    always, _, _ = datasets(corpus, tmp_path / "b", "data.reverse_complement_prob=1.0")
    half, _, _ = datasets(corpus, tmp_path / "c", "data.reverse_complement_prob=0.5")
    half_again, _, _ = datasets(corpus, tmp_path / "d", "data.reverse_complement_prob=0.5")
    flipped = 0
    for i in range(60):
        text = text_of(plain[i])
        rc = COMPLEMENT[text[::-1]]
        np.testing.assert_array_equal(text_of(always[i]), rc)
        h = text_of(half[i])
        assert np.array_equal(h, text) or np.array_equal(h, rc)
        np.testing.assert_array_equal(h, text_of(half_again[i]))
        flipped += not np.array_equal(h, text)
    assert 15 <= flipped <= 45


def test_reset_attention_mask_blocks_attention_across_documents(corpus, tmp_path):
    train, _, _ = datasets(corpus, tmp_path, "data.reset_attention_mask=true",
                           "data.reset_position_ids=true")
    for i in range(len(train)):
        sample = train[i]
        eods = np.flatnonzero(sample["tokens"].numpy() == EOD)
        if len(eods) and eods[0] < 63:
            break
    else:
        pytest.fail("no sample with a document boundary")
    b = int(eods[0]) + 1  # first token of the next document
    mask = sample["attention_mask"][0]  # True: masked
    assert mask[b, :b].all() and not mask[b, b]
    assert not mask[b - 1, : b].any()  # inside the first document: causal only
    assert int(sample["position_ids"][b]) == 0


def test_missing_valid_split_is_a_config_error(tmp_path):
    path = write_fasta(tmp_path / "a.fa", genome(0, {"chr1": 700}))
    assert run_cli("run", path, "--out", tmp_path / "c") == 0
    with pytest.raises(ConfigError, match="no valid documents"):
        datasets(tmp_path / "c", tmp_path)
    with pytest.raises(ConfigError, match="manifest.json does not exist"):
        datasets(tmp_path / "nowhere", tmp_path)


def test_blend_weights_set_the_share_of_samples(corpus, tmp_path):
    """data.blend=[3, A, 1, B]: three of every four training samples come from A."""
    paths = [write_fasta(tmp_path / f"b{i}.fa", genome(10 + i, {"chr1": 900, "chr20": 400}))
             for i in range(2)]
    assert run_cli("run", *paths, "--out", tmp_path / "other", "--holdout-contigs",
                   "valid=chr20") == 0
    cfg = load_config(None, ["data.source=zarr", f"data.blend=[3, '{corpus}', 1, '{tmp_path / 'other'}']",
                             "data.seq_length=64", "schedule.train_iters=25",
                             "schedule.eval_interval=0"])
    from megatron_geno.config import ParallelConfig
    from tests.unit.single_process import single_process_groups

    with single_process_groups(ParallelConfig()):  # megatron-core's blend asks for a rank
        train, _, _ = build_datasets(cfg, GenoTokenizer(), tmp_path / "run")
    counts = np.bincount(np.asarray(train.dataset_index), minlength=2)
    assert counts.sum() == 25 * cfg.data.global_batch_size
    assert abs(counts[0] / counts.sum() - 0.75) <= 1 / counts.sum() + 1e-9, counts
