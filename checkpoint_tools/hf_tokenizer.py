"""The geno vocabulary as a HuggingFace fast tokenizer (tokenizer.json), with identical ids."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_geno.tokenizer import HF_SOFT_MASK_KEY
from megatron_geno.vocab import IUPAC_AMBIGUOUS, NUCLEOTIDES, SOFT_MASK_POLICIES, VOCAB

SPECIAL = {"pad_token": "<pad>", "eos_token": "<eod>", "bos_token": "<bos>",
           "mask_token": "<mask>", "unk_token": "<unk>"}


def build_hf_tokenizer(soft_mask: str = "upper"):
    """Returns a ``tokenizers.Tokenizer`` that maps DNA text to the same ids as GenoTokenizer, and
    decodes ids back to the bases (``decode(encode(s)) == s`` for A C G T N text, and for
    soft-masked text under ``keep``)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    if soft_mask not in SOFT_MASK_POLICIES:
        raise ValueError(f"soft_mask must be one of {SOFT_MASK_POLICIES}, got {soft_mask!r}")
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    rules = []
    for code in IUPAC_AMBIGUOUS:
        rules.append(normalizers.Replace(code, "N"))
        rules.append(normalizers.Replace(code.lower(), "n" if soft_mask == "keep" else "N"))
    if soft_mask == "upper":
        rules += [normalizers.Replace(n.lower(), n) for n in NUCLEOTIDES]
    tok.normalizer = normalizers.Sequence(rules)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # one base per token: decode joins them without spaces
    tok.add_special_tokens(list(SPECIAL.values()))
    return tok


def write_hf_tokenizer(out: Path, soft_mask: str = "upper") -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into out."""
    build_hf_tokenizer(soft_mask).save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_048_576,
              "clean_up_tokenization_spaces": False, HF_SOFT_MASK_KEY: soft_mask, **SPECIAL}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL, indent=2) + "\n")
