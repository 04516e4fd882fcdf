"""geno-preprocess verify: random token windows checked bit-exact against the source FASTA."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.corpus import Corpus
from data_pipeline.fasta import Header, open_source, read_fasta
from data_pipeline.normalise import NEWLINES
from data_pipeline.errors import ShardError
from data_pipeline.shard_format import read_attrs
from data_pipeline.token_reader import Part
from megatron_geno.vocab import encoding_table


@dataclass
class VerifyResult:
    windows: int = 0
    bases: int = 0
    mismatches: list[str] = field(default_factory=list)


def verify_corpus(corpus_dir: str | Path, windows_per_assembly: int = 16, window: int = 8192,
                  seed: int = 0) -> VerifyResult:
    """Decodes random windows of every assembly and compares them with the normalised source.

    Windows are drawn per assembly (documents weighted by length) from the shards; the source
    FASTA is streamed once and the same bases are normalised independently of the N-splitting
    logic (the tokenizer's table for the recorded case policy), so a wrong offset, dropped or doubled base, or
    a case error shows up as a mismatch. A changed source file (md5) is reported too.
    """
    corpus = Corpus(corpus_dir)
    result = VerifyResult()
    rng = np.random.default_rng(seed)
    for entry in corpus.assemblies:
        try:
            _verify_assembly(corpus, entry, rng, windows_per_assembly, window, result)
        except ShardError as err:
            result.mismatches.append(f"DAMAGED {err} (assembly {entry['assembly']}; "
                                     f"geno-preprocess run --force redoes it)")
    return result


def _verify_assembly(corpus: Corpus, entry: dict, rng, windows_per_assembly: int, window: int,
                     result: VerifyResult) -> None:
    """Checks one assembly: every shard file's index, then random windows against the source."""
    group = corpus.path / entry["path"]
    attrs = read_attrs(group)
    wanted = defaultdict(list)  # contig index -> [(start, tokens, where)]
    parts = [Part(group / p["name"]) for p in entry["parts"]]
    for part in parts:
        part.tokens.check()
    docs = [(part, i) for part in parts for i in range(len(part.doc_split))]
    if not docs:
        return
    lengths = np.array([int(p.doc_offsets[i + 1] - p.doc_offsets[i]) - 1 for p, i in docs])
    for pick in rng.choice(len(docs), size=windows_per_assembly, p=lengths / lengths.sum()):
        part, i = docs[pick]
        n = min(window, int(lengths[pick]))
        offset = int(rng.integers(0, lengths[pick] - n + 1))
        tokens = part.tokens.read(int(part.doc_offsets[i]) + offset,
                                  int(part.doc_offsets[i]) + offset + n)
        start = int(part.doc_source_start[i]) + offset
        wanted[int(part.doc_contig[i])].append(
            (start, tokens, f"{entry['assembly']}/{part.path.name} document {i}"))
    # the tokenizer's own byte -> id table for the recorded policy
    table = encoding_table(attrs["normalisation"]["soft_mask"]).tobytes()
    source_path = attrs["source"]["path"]
    source = open_source(source_path)
    contig, pos = -1, 0
    for event in read_fasta(source_path, source=source):
        if isinstance(event, Header):
            contig, pos = contig + 1, 0
            continue
        bases = event.data.translate(None, NEWLINES)
        for start, tokens, where in wanted.get(contig, ()):
            lo, hi = max(start, pos), min(start + len(tokens), pos + len(bases))
            if lo >= hi:
                continue
            expected = bases[lo - pos:hi - pos].translate(table)
            got = tokens[lo - start:hi - start].tobytes()
            if got != expected:
                bad = next(k for k in range(len(got)) if got[k] != expected[k])
                result.mismatches.append(
                    f"{where}: contig {attrs['contigs'][contig]!r} position {lo + bad}: "
                    f"token {got[bad]} != source-derived {expected[bad]}")
            result.bases += hi - lo
        pos += len(bases)
    source.close()
    if source.md5.hexdigest() != attrs["source"]["md5"]:
        result.mismatches.append(f"{source_path}: md5 {source.md5.hexdigest()} differs from "
                                 f"the one recorded at preprocessing ({attrs['source']['md5']})")
    result.windows += sum(len(v) for v in wanted.values())
