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

import json
from pathlib import Path

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


# ---- soft-mask policies of data.tokenizer values (light: preflight checks read them) ----

GENO_SPECS = {"geno": "upper", "geno:upper": "upper", "geno:keep": "keep"}


def soft_mask_of_spec(spec: str) -> str:
    """The built-in tokenizer's soft-mask policy for a data.tokenizer value (upper otherwise)."""
    return GENO_SPECS.get(spec, "upper")


def tokenizer_soft_mask(spec: str) -> str:
    """The soft-mask policy of a data.tokenizer value: the built-in's, or what an HF export's
    tokenizer_config.json declares (upper where it declares none)."""
    return GENO_SPECS[spec] if spec in GENO_SPECS else read_hf_soft_mask(Path(spec)) or "upper"


# the key of tokenizer_config.json that names an HF export's soft-mask policy
HF_SOFT_MASK_KEY = "geno_soft_mask"


def read_hf_soft_mask(hf_dir: Path) -> str | None:
    """The soft-mask policy ("upper" or "keep") an HF export's tokenizer_config.json names
    (checkpoint_tools.hf_tokenizer writes it), or None where the file or the key is absent (not
    a geno tokenizer). A file that is not a JSON object, or a policy that is not one of ours, is
    a ValueError naming the file."""
    path = hf_dir / "tokenizer_config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    policy = config.get(HF_SOFT_MASK_KEY)
    if policy is not None and policy not in SOFT_MASK_POLICIES:
        raise ValueError(f"{path}: {HF_SOFT_MASK_KEY}={policy!r} is not one of "
                         f"{', '.join(SOFT_MASK_POLICIES)}")
    return policy
