"""The fixed single-nucleotide vocabulary (megatron_geno.vocab) as a megatron-core tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

try:
    from megatron.core.tokenizers import MegatronTokenizerBase
except ImportError:  # pragma: no cover
    MegatronTokenizerBase = object  # type: ignore[assignment,misc]

from megatron_geno.vocab import (  # noqa: F401 - re-exported
    BOS, EOD, IUPAC_AMBIGUOUS, MASK, NUCLEOTIDES, NUM_TAGS, PAD, SOFT_MASK_POLICIES, SPECIAL_TOKENS,
    TOKENIZER_VERSION, UNK, VOCAB, VOCAB_SIZE, DECODE, encoding_table,
    GENO_SPECS, HF_SOFT_MASK_KEY, read_hf_soft_mask, soft_mask_of_spec, tokenizer_soft_mask,
)


class GenoTokenizer(MegatronTokenizerBase):
    """Single-nucleotide tokenizer implementing megatron-core's tokenizer interface."""

    def __init__(self, soft_mask: str = "upper") -> None:
        super().__init__("geno", {"library": "megatron_geno", "soft_mask": soft_mask})
        self.soft_mask = soft_mask
        self._table = encoding_table(soft_mask)
        # GPTDataset's cache key reads this
        self.unique_identifiers = {"class": "GenoTokenizer", "version": TOKENIZER_VERSION,
                                   "soft_mask": soft_mask}

    def tokenize(self, text: str | bytes) -> np.ndarray:
        """Returns the uint8 ids of a nucleotide string (bytes are taken as ASCII)."""
        raw = text.encode("ascii", "replace") if isinstance(text, str) else text
        return self._table[np.frombuffer(raw, dtype=np.uint8)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Returns the nucleotide string of ids; special and tag tokens are skipped."""
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        arr = arr[(arr >= 5) & (arr < 15)]
        return "".join(DECODE[arr].tolist())

    @property
    def vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(VOCAB)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return dict(enumerate(VOCAB))

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def pad(self) -> int:
        return PAD

    @property
    def eod(self) -> int:
        return EOD

    @property
    def bos(self) -> int:
        return BOS

    @property
    def mask(self) -> int:
        return MASK

    @property
    def unk(self) -> int:
        return UNK

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("DNA tokenizers have no chat template")


class HFTokenizerAdapter(MegatronTokenizerBase):
    """A HuggingFace tokenizer directory seen through megatron-core's tokenizer interface."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        super().__init__(path, {"library": "huggingface"})
        self._tok = AutoTokenizer.from_pretrained(path)
        self.unique_identifiers = {"class": "HFTokenizerAdapter", "path": str(path)}

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self._tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def detokenize(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True).replace(" ", "")

    @property
    def vocab(self):
        return self._tok.get_vocab()

    @property
    def inv_vocab(self):
        return {i: t for t, i in self._tok.get_vocab().items()}

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"HuggingFace tokenizer {self.path} has no eos token to use as <eod>")
        return eos

    @property
    def pad(self) -> Optional[int]:
        return self._tok.pad_token_id

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("DNA tokenizers have no chat template")


# data.tokenizer values naming the built-in tokenizer -> its soft-mask policy
def build_tokenizer(spec: str = "geno"):
    """Returns the built-in tokenizer for ``"geno"``, else the HuggingFace tokenizer at that path."""
    if spec in GENO_SPECS:
        return GenoTokenizer(GENO_SPECS[spec])
    return HFTokenizerAdapter(spec)


