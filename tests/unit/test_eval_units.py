"""geno-eval's pieces on literal inputs: variant windows (SNV, insertion, deletion, REF mismatch,
contig ends), labels, AUROC with ties."""

import numpy as np
import pytest

from megatron_geno.evaluation.variants import (Variant, auroc, label_of, make_windows,
                                               open_reference, reverse_complement)
from megatron_geno.vocab import encoding_table

SEQ = "ACGTTGCAACGGTTAACCGGTTAANNNNNNNNACGTACGT"  # 40 bases, an N gap at 25-32


@pytest.fixture()
def reference(tmp_path):
    path = tmp_path / "ref.fa"
    path.write_text(f">chrA\n{SEQ}\n")
    return open_reference(path)


def ids(text: str) -> list[int]:
    return encoding_table("upper")[np.frombuffer(text.encode(), dtype=np.uint8)].tolist()


def test_windows_for_snv_insertion_and_deletion(reference):
    # window 8, variant at 1-based 12 (0-based 11, 'G'): the window is bases 7..14
    snv = Variant("chrA", 12, "s", "G", "T")
    ins = Variant("chrA", 12, "i", "G", "GAA")  # insertion after the G: the window is cut to 8
    dele = Variant("chrA", 12, "d", "GTT", "G")  # deletes 'TT': the window takes 2 more bases
    make_windows([snv, ins, dele], reference, 8, "upper")
    assert SEQ[7:15] == "AACGGTTA"
    assert snv.ref_ids.tolist() == ids("AACGGTTA") and snv.alt_ids.tolist() == ids("AACGTTTA")
    assert ins.alt_ids.tolist() == ids("AACGGAAT")
    assert dele.alt_ids.tolist() == ids("AACGGAAC")
    assert all(v.status == "ok" for v in (snv, ins, dele))


def test_mismatch_and_contig_ends_are_statuses(reference):
    wrong = Variant("chrA", 12, "w", "C", "T")  # the reference has G there
    early = Variant("chrA", 3, "e", "G", "A")  # the window would start before base 1
    late = Variant("chrA", 38, "l", "A", "C")  # ... or end past base 40
    soft = Variant("chrA", 12, "x", "g", "t")  # REF is compared case-insensitively
    gap = Variant("chrA", 28, "n", "N", "A")  # the reference has N there: nothing to change from
    make_windows([wrong, early, late, soft, gap], reference, 8, "upper")
    assert [v.status for v in (wrong, early, late, soft, gap)] == [
        "ref_mismatch", "past_contig_end", "past_contig_end", "ok", "n_reference"]
    assert wrong.ref_ids is None and early.alt_ids is None


def test_reverse_complement_of_ids():
    assert reverse_complement(np.array(ids("AACGN"))).tolist() == ids("NCGTT")


def test_labels():
    assert label_of("Pathogenic") == 1 and label_of(("Likely_pathogenic",)) == 1
    assert label_of("Pathogenic/Likely_pathogenic") == 1
    assert label_of("Benign|Likely_benign") == 0 and label_of("0") == 0 and label_of(True) == 1
    for value in ("Conflicting_classifications_of_pathogenicity", "Uncertain_significance",
                  "Pathogenic/Benign", None, ""):
        assert label_of(value) is None, value


def test_auroc_literal_values():
    # benign scores above pathogenic: perfect
    assert auroc(np.array([-5.0, -4.0, 1.0, 2.0]), np.array([1, 1, 0, 0])) == 1.0
    assert auroc(np.array([1.0, 2.0, -5.0, -4.0]), np.array([1, 1, 0, 0])) == 0.0
    # one tie between a benign and a pathogenic score counts half: (1 + 1 + 1 + 0.5) / 4
    assert auroc(np.array([0.0, -1.0, 0.0, 1.0]), np.array([1, 1, 0, 0])) == 0.875
    assert auroc(np.array([1.0, 2.0]), np.array([0, 0])) is None


def test_hf_model_refuses_a_damaged_soft_mask_policy_before_loading(tmp_path):
    """A geno:keep export scored with upper-case ids would be silently wrong: a tokenizer config
    that cannot be read is an error naming it (before transformers loads any weight)."""
    import json

    import pytest

    from megatron_geno.evaluation.models import EvalError, HFModel

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "tokenizer_config.json").write_text('{"geno_soft_mask": "keep"')
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(EvalError, match="tokenizer_config.json is not readable JSON"):
        HFModel(tmp_path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
