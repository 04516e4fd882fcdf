"""Normalisation rules and the streaming FASTA reader, one property per test."""

import numpy as np
import pytest

from data_pipeline.fasta import Header, Sequence, read_fasta
from data_pipeline.normalise import (ContigNormaliser, ContigStats, InvalidCharacter,
                                     NormalisationPolicy, PolicyError)
from megatron_geno.vocab import VOCAB
from tests.genomes import fasta_bytes, genome, write_fasta


class ListSink:
    """Collects documents as (source_start, sequence string)."""

    def __init__(self):
        self.docs, self.current = [], None

    def start_document(self, source_start):
        self.current = (source_start, [])

    def extend(self, ids):
        self.current[1].append(ids.copy())

    def finish_document(self):
        start, parts = self.current
        self.docs.append((start, "".join(VOCAB[i] for i in np.concatenate(parts))))

    def discard_document(self):
        self.current = None


def normalise(seq: str, chunk: int = 7, **policy) -> tuple[list, ContigStats]:
    sink, stats = ListSink(), ContigStats()
    norm = ContigNormaliser(NormalisationPolicy(**{"min_length": 1, **policy}), sink, stats)
    raw = seq.encode()
    for i in range(0, len(raw), chunk):
        norm.feed(raw[i:i + chunk])
    norm.finish()
    return sink.docs, stats


def test_soft_masked_bases_fold_to_upper_case_by_default():
    assert normalise("acgtNNacGT", split_n_run=0)[0] == [(0, "ACGTNNACGT")]


def test_keep_policy_keeps_soft_masking():
    assert normalise("acgtnnACGT", soft_mask="keep", split_n_run=0)[0] == [(0, "acgtnnACGT")]


def test_iupac_ambiguity_codes_become_n_and_are_counted():
    docs, stats = normalise("ACRYSWKMBDHVGT", split_n_run=0, max_n_fraction=1.0)
    assert docs == [(0, "AC" + "N" * 10 + "GT")]
    assert stats.ambiguous == 10 and stats.n == 10


def test_terminal_ns_are_trimmed_with_source_coordinates():
    assert normalise("NNNNACGTNN", split_n_run=0)[0] == [(4, "ACGT")]


def test_long_n_runs_split_and_short_ones_stay():
    seq = "ACGTA" + "N" * 5 + "CCCCC" + "N" * 4 + "GGGGG"
    docs, _ = normalise(seq, split_n_run=5)
    assert docs == [(0, "ACGTA"), (10, "CCCCCNNNNGGGGG")]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 10_000])
def test_result_does_not_depend_on_chunking(chunk):
    rng = np.random.default_rng(0)
    pieces = []
    for _ in range(40):
        pieces.append("".join(rng.choice(list("ACGTacgtRY"), rng.integers(1, 30))))
        pieces.append("N" * int(rng.integers(1, 12)) + "n" * int(rng.integers(0, 3)))
    seq = "".join(pieces)
    assert normalise(seq, chunk=chunk, split_n_run=8) == normalise(seq, chunk=len(seq), split_n_run=8)


def test_short_pieces_are_dropped_but_not_the_contig():
    seq = "ACG" + "N" * 10 + "ACGTACGTAC"
    docs, stats = normalise(seq, split_n_run=5, min_length=5)
    assert docs == [(13, "ACGTACGTAC")]
    assert stats.dropped_pieces == 1 and stats.dropped_bases == 3


def test_pieces_with_too_many_ns_are_dropped_and_the_rest_of_the_contig_kept():
    seq = "AC" + "NNNN" + "G" + "N" * 20 + "ACGTACGTAC"
    docs, stats = normalise(seq, split_n_run=10, max_n_fraction=0.5)
    assert docs == [(27, "ACGTACGTAC")]  # "ACNNNNG" is 4/7 N
    assert stats.dropped_pieces == 1
    docs, _ = normalise("AC" + "NNN" + "G", split_n_run=10, max_n_fraction=0.5)
    assert docs == [(0, "ACNNNG")]  # exactly half is kept


def test_a_contig_of_gaps_keeps_every_good_piece():
    chrom = ("ACGT" * 50 + "N" * 1000) * 5
    docs, _ = normalise(chrom, chunk=97, split_n_run=100)
    assert [start for start, _ in docs] == [i * 1200 for i in range(5)]


def test_invalid_character_is_reported_at_its_offset():
    sink = ListSink()
    norm = ContigNormaliser(NormalisationPolicy(), sink, ContigStats())
    with pytest.raises(InvalidCharacter) as err:
        norm.feed(b"ACGT\nAC*T\n")
    assert chr(err.value.char) == "*" and err.value.position == 7


def test_bad_policy_names_the_option():
    with pytest.raises(PolicyError, match="--max-n-fraction"):
        NormalisationPolicy(max_n_fraction=2)


def events(path, chunk):
    out, seq = [], {}
    for e in read_fasta(path, chunk):
        if isinstance(e, Header):
            out.append(e.name)
            seq[e.name] = b""
        else:
            assert isinstance(e, Sequence)
            seq[out[-1]] += e.data.replace(b"\n", b"").replace(b"\r", b"")
    return seq


@pytest.mark.parametrize("compression", ["plain", "gzip", "bgzf", "xz", "bz2"])
@pytest.mark.parametrize("chunk", [1, 5, 61, 1 << 20])
def test_reader_returns_every_record_for_any_chunk_size_and_compression(tmp_path, compression, chunk):
    records = genome(3, {"chr1": 500, "chr2": 1, "chrM": 130})
    path = write_fasta(tmp_path / "g.fa", records, compression=compression)
    assert events(path, chunk) == records


def test_reader_handles_crlf_unwrapped_and_missing_final_newline(tmp_path):
    records = genome(4, {"a": 300, "b": 70})
    (tmp_path / "crlf.fa").write_bytes(fasta_bytes(records, 60, b"\r\n"))
    (tmp_path / "oneline.fa").write_bytes(fasta_bytes(records, 0).rstrip(b"\n"))
    assert events(tmp_path / "crlf.fa", 13) == records
    assert events(tmp_path / "oneline.fa", 13) == records
