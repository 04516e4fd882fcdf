"""The preprocessing options that decide a shard's bytes, and the hashes that mark shards reusable."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from data_pipeline.errors import PipelineError
from data_pipeline.manifest import Assembly
from data_pipeline.normalise import NormalisationPolicy
from data_pipeline.shard_format import CHUNK_TOKENS, CODECS, FORMAT_VERSION, SHARD_TOKENS
from data_pipeline.splits import SplitRules
from megatron_geno.vocab import TOKENIZER_VERSION


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides the bytes of a shard; its hash marks finished shards as reusable."""

    policy: NormalisationPolicy = field(default_factory=NormalisationPolicy)
    rules: SplitRules = field(default_factory=SplitRules)
    part_tokens: int = 1 << 30
    chunk_tokens: int = CHUNK_TOKENS
    shard_tokens: int = SHARD_TOKENS
    compression_level: int = 1
    codec: str = "dna2bit"

    def __post_init__(self):
        if self.codec not in CODECS:
            raise PipelineError(f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.chunk_tokens < 1 or self.shard_tokens % self.chunk_tokens:
            raise PipelineError(f"shard size {self.shard_tokens} must be a multiple of the chunk "
                                f"size {self.chunk_tokens}")
        if self.codec == "dna2bit" and self.chunk_tokens % 8:
            raise PipelineError(f"--codec dna2bit packs whole 8-token words; chunk size "
                                f"{self.chunk_tokens} is not a multiple of 8")
        if self.part_tokens < 1:
            raise PipelineError(f"--part-size must be positive, got {self.part_tokens}")

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "tokenizer_version": TOKENIZER_VERSION,
                "policy": self.policy.to_dict(), "rules": self.rules.to_dict(),
                "part_tokens": self.part_tokens, "chunk_tokens": self.chunk_tokens,
                "shard_tokens": self.shard_tokens, "compression_level": self.compression_level,
                "codec": self.codec}

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        rules = d["rules"]
        return cls(NormalisationPolicy(**d["policy"]),
                   SplitRules(tuple(map(tuple, rules["contig_patterns"])),
                              tuple(map(tuple, rules["sample_fractions"])), rules["seed"]),
                   d["part_tokens"], d["chunk_tokens"], d["shard_tokens"], d["compression_level"],
                   d["codec"])

    def hash(self) -> str:
        return sha(self.to_dict())


def sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def assembly_hash(config: PipelineConfig, assembly: Assembly) -> str:
    """Whether a shard group is up to date (a rerun skips it): config, manifest row (the source's
    path included) and source size, known without reading the source. Not what the group holds:
    see content_identity."""
    try:
        size = os.path.getsize(assembly.path)
    except OSError:
        size = -1
    return sha([config.hash(), assembly.to_dict(), size])


def content_identity(config: PipelineConfig, assembly: Assembly, source_md5: str) -> str:
    """What one shard group holds: config, the manifest row without the source's path, and the
    source's bytes (md5). The same FASTA preprocessed from anywhere has the same identity, and so
    the corpus the same content hash (which keys its reverse-complement choices in training)."""
    row = {k: v for k, v in assembly.to_dict().items() if k not in ("path", "md5")}
    return sha([config.hash(), row, source_md5])
