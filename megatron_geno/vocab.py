"""The fixed single-nucleotide vocabulary (no megatron-core import: the data pipeline uses it).

Ids (version 1; never renumber, only append):

====  ==========  ===========================================================
id    token       meaning
====  ==========  ===========================================================
0     <pad>       padding (never in data)
1     <eod>       end of document (appended to every contig / N-free piece)
2     <bos>       beginning of sequence (not added by default)
3     <mask>      mask token for downstream masked objectives
4     <unk>       a character outside IUPAC (the pipeline rejects these)
5-9   A C G T N   upper case nucleotides; IUPAC ambiguity codes map to N
10-14 a c g t n   soft-masked (lower case) nucleotides, used only with
                  ``soft_mask="keep"``; the default ``"upper"`` folds them
15-127 <tag_0>..  reserved for species / task tags
====  ==========  ===========================================================

The vocabulary has exactly 128 entries, so the padded vocabulary is 128 x TP.
"""

from __future__ import annotations

import numpy as np

TOKENIZER_VERSION = 1
SPECIAL_TOKENS = ["<pad>", "<eod>", "<bos>", "<mask>", "<unk>"]
NUCLEOTIDES = ["A", "C", "G", "T", "N"]
NUM_TAGS = 113
VOCAB: list[str] = (
    SPECIAL_TOKENS
    + NUCLEOTIDES
    + [n.lower() for n in NUCLEOTIDES]
    + [f"<tag_{i}>" for i in range(NUM_TAGS)]
)
VOCAB_SIZE = len(VOCAB)
PAD, EOD, BOS, MASK, UNK = range(5)
# IUPAC ambiguity codes other than N; each becomes N (soft-masked ones become n with "keep").
IUPAC_AMBIGUOUS = "RYSWKMBDHV"
SOFT_MASK_POLICIES = ("upper", "keep")


def encoding_table(soft_mask: str = "upper") -> np.ndarray:
    """Returns a 256-entry uint8 table mapping ASCII bytes to token ids (UNK for non-IUPAC)."""
    if soft_mask not in SOFT_MASK_POLICIES:
        raise ValueError(f"soft_mask must be one of {SOFT_MASK_POLICIES}, got {soft_mask!r}")
    table = np.full(256, UNK, dtype=np.uint8)
    for upper in NUCLEOTIDES + list(IUPAC_AMBIGUOUS):
        target = upper if upper in NUCLEOTIDES else "N"
        table[ord(upper)] = VOCAB.index(target)
        lower_target = target.lower() if soft_mask == "keep" else target
        table[ord(upper.lower())] = VOCAB.index(lower_target)
    return table


DECODE = np.array([t if len(t) == 1 else "?" for t in VOCAB])

# reverse-complement map of ids: A<->T, C<->G (both cases); N, specials and tags unchanged
COMPLEMENT = np.arange(256, dtype=np.uint8)
for _x, _y in ("AT", "CG", "at", "cg"):
    COMPLEMENT[VOCAB.index(_x)], COMPLEMENT[VOCAB.index(_y)] = VOCAB.index(_y), VOCAB.index(_x)
