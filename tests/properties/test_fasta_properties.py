"""Property test (issue 22, item 9): whatever bytes a FASTA file holds, geno-preprocess's reading
gives the documents a plain reference reading gives, or one FastaError line, never another
exception. The reference below restates the format and normalisation rules line by line; the
real reader streams in chunks (sized here down to a few bytes, so that records, N runs and
line ends cross chunk boundaries)."""

from __future__ import annotations

import gzip

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.corpus import Corpus
from data_pipeline.corpus_manifest import finalize, prepare_out
from data_pipeline.fasta import FastaError
from data_pipeline.manifest import Assembly
from data_pipeline.normalise import NormalisationPolicy
from data_pipeline.pipeline import process_assembly
from data_pipeline.run_config import PipelineConfig
from megatron_geno.vocab import EOD, IUPAC_AMBIGUOUS, VOCAB

BASES = set(b"ACGTN" + IUPAC_AMBIGUOUS.encode())


class Refused(Exception):
    pass


def reference(data: bytes, policy: NormalisationPolicy) -> list[tuple[str, int, str]]:
    """(contig, start, text) of every document, or Refused."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    records: list[tuple[str, bytearray]] = []
    for line in data.split(b"\n"):
        if line.startswith(b">"):
            try:
                fields = line[1:].decode("utf-8").split()
            except UnicodeDecodeError:
                raise Refused("header is not UTF-8") from None
            if not fields:
                raise Refused("header without a name")
            if fields[0] in [name for name, _ in records]:
                raise Refused("duplicate name")
            records.append((fields[0], bytearray()))
        elif not records:
            if line.strip():
                raise Refused("sequence before the first header")
        else:
            records[-1][1].extend(line.replace(b"\r", b""))
    if not records:
        raise Refused("no header")
    docs = []
    for name, seq in records:
        if not seq:
            raise Refused("a record without sequence")
        if any(b not in BASES for b in bytes(seq).upper()):
            raise Refused("not IUPAC")
        text = "".join("N" if chr(b) in IUPAC_AMBIGUOUS else chr(b) for b in bytes(seq).upper())
        docs += [(name, start, piece) for start, piece in pieces(text, policy)]
    return docs


def pieces(text: str, policy: NormalisationPolicy) -> list[tuple[int, str]]:
    """Runs of bases between N runs of at least split_n_run (terminal Ns trimmed), filtered."""
    out, i, n = [], 0, len(text)
    while i < n:
        while i < n and text[i] == "N":
            i += 1
        if i == n:
            break
        start, j = i, i
        while j < n:  # extend over bases and short N runs
            if text[j] != "N":
                j += 1
                continue
            run = j
            while run < n and text[run] == "N":
                run += 1
            if run == n or (policy.split_n_run and run - j >= policy.split_n_run):
                break
            j = run
        piece = text[start:j]
        if len(piece) >= policy.min_length and piece.count("N") <= policy.max_n_fraction * len(piece):
            out.append((start, piece))
        i = j
    return out


names = st.one_of(st.sampled_from(["chr1", "chr2", "chrM", "x y", "\u00e9"]), st.text(max_size=6))
header = st.tuples(names, st.sampled_from(["", " desc", "\t1"])).map(
    lambda t: (">" + t[0] + t[1]).encode())
sequence_line = st.one_of(
    st.text(alphabet="ACGTNacgtn", min_size=1, max_size=30),
    st.text(alphabet="ACGTNNNNNN", min_size=1, max_size=12),
    st.text(alphabet="ACGTRYKMSWBDHVacgtn", min_size=1, max_size=12),
    st.text(alphabet="ACGTU \t*-", max_size=6)).map(str.encode)
record = st.tuples(header, st.lists(sequence_line, max_size=5)).map(lambda r: [r[0], *r[1]])
noise = st.one_of(st.binary(max_size=6), st.just(b""), st.just(b">"), st.just(b"ACGT"))


def _assemble(records, noise_lines, positions, end, prefix) -> bytes:
    lines = [line for r in records for line in r]
    for line, at in zip(noise_lines, positions):
        lines.insert(at % (len(lines) + 1), line)
    return prefix + end.join(lines)


fasta = st.one_of(
    st.builds(_assemble, st.lists(record, min_size=1, max_size=4), st.just([]), st.just([]),
              st.sampled_from([b"\n", b"\r\n"]), st.sampled_from([b"", b"\xef\xbb\xbf", b"\n"])),
    st.builds(_assemble, st.lists(record, min_size=1, max_size=4),
              st.lists(noise, min_size=1, max_size=2), st.lists(st.integers(0, 30), min_size=2,
                                                                 max_size=2),
              st.sampled_from([b"\n", b"\r\n"]), st.just(b"")),
    st.binary(max_size=48))
policies = st.builds(NormalisationPolicy, split_n_run=st.sampled_from([0, 1, 3, 100]),
                     min_length=st.sampled_from([1, 2, 5]),
                     max_n_fraction=st.sampled_from([0.0, 0.5, 1.0]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=fasta, policy=policies, chunk=st.sampled_from([1, 3, 7, 1 << 16]),
       compressed=st.booleans())
def test_any_fasta_bytes_read_like_the_reference_or_are_one_line(data, policy, chunk, compressed,
                                                                   tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fasta")
    path = tmp / ("a.fa.gz" if compressed else "a.fa")
    path.write_bytes(gzip.compress(data, mtime=0) if compressed else data)
    try:
        expected = reference(data, policy)
    except Refused:
        expected = None
    config = PipelineConfig(policy, part_tokens=64, chunk_tokens=16, shard_tokens=32)
    asm = Assembly("a", "a", "1", "test", str(path))
    prepare_out(tmp / "out", config, [asm], False)
    try:
        attrs = process_assembly(asm, tmp / "out", config, read_chunk=chunk)
    except FastaError as err:
        assert expected is None, (err, expected)
        assert "\n" not in str(err) and str(path) in str(err), str(err)
        return
    assert expected is not None, "read a file the reference refuses"
    got = []
    if attrs["stats"]["documents"]:
        finalize(tmp / "out")
        for _, part in Corpus(tmp / "out").parts():
            for i in range(len(part.doc_split)):
                doc = part.document(i)
                assert doc[-1] == EOD
                got.append((attrs["contigs"][part.doc_contig[i]], int(part.doc_source_start[i]),
                            "".join(VOCAB[t] for t in doc[:-1])))
    assert got == expected
