"""geno-eval variants: zero-shot variant effect as a log-likelihood ratio.

For each SNV and short indel of a VCF/BCF (read with pysam), the window of L reference bases
centred on the variant and the same window with the alternative allele (continued with the
reference after it, cut to L) are scored by the model; the score is
log p(alt window) - log p(ref window), summed over the L - 1 predictions of each window (and
averaged with the reverse-complement windows' with ``both_strands``). A low score means the
model finds the alternative allele improbable in its context.

Per record, a status: ``ok``; ``n_reference`` (the reference has N, or another ambiguity code,
under the REF allele: no base to change from); ``ref_mismatch`` (the VCF REF is not the
reference's bases there);
``past_contig_end`` (the window does not fit inside the contig); ``unsupported`` (symbolic or
long alleles, or a missing ALT). Only ``ok`` records are scored. With a label field (ClinVar's
CLNSIG, or any 0/1 / true/false INFO field), AUROC is the probability that a benign (0)
variant scores above a pathogenic (1) one (ties count half).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_geno.evaluation.models import EvalError, for_each_batch
from megatron_geno.vocab import COMPLEMENT, encoding_table

MAX_ALLELE = 50  # longer REF/ALT alleles are not "short indels"
POSITIVE = {"pathogenic", "likely_pathogenic", "1", "true", "yes"}
NEGATIVE = {"benign", "likely_benign", "0", "false", "no"}


@dataclass
class Variant:
    chrom: str
    pos: int  # 1-based, as in the VCF
    id: str
    ref: str
    alt: str
    label: Optional[int] = None
    status: str = "ok"
    score: Optional[float] = None
    ref_ids: Optional[np.ndarray] = None
    alt_ids: Optional[np.ndarray] = None


def label_of(value) -> Optional[int]:
    """1 pathogenic, 0 benign, None otherwise (uncertain, conflicting, absent)."""
    if value is None:
        return None
    values = value if isinstance(value, (tuple, list)) else [value]
    tokens = {t.strip().lower() for v in values for t in str(v).replace("|", "/").replace(
        ",", "/").split("/") if t.strip()}
    if tokens and tokens <= POSITIVE:
        return 1
    if tokens and tokens <= NEGATIVE:
        return 0
    return None


def open_reference(path: str | Path):
    from megatron_geno.evaluation.models import pysam_module

    pysam = pysam_module()

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--reference {path} does not exist")
    try:
        return pysam.FastaFile(str(path))
    except (OSError, ValueError) as err:
        raise EvalError(f"--reference {path}: cannot open it as an indexed FASTA ({err}; a "
                        f"compressed FASTA must be bgzip-compressed, with .fai and .gzi, or "
                        f"indexable beside it)") from None


def _is_compressed(path: Path) -> bool:
    with path.open("rb") as f:
        magic = f.read(4)
    return magic[:2] == b"\x1f\x8b" or magic[:3] == b"BCF"


def read_variants(vcf: str | Path, reference, label_field: Optional[str] = None) -> list[Variant]:
    """Every ALT allele of every record, in file order. A compressed VCF or a BCF must be indexed
    (.tbi / .csi) and is read contig by contig; records must be sorted; every contig must be in
    the reference. Errors name the file and record."""
    from megatron_geno.evaluation.models import pysam_module

    pysam = pysam_module()

    vcf = Path(vcf)
    if not vcf.is_file():
        raise EvalError(f"--vcf {vcf} does not exist")
    try:
        vf = pysam.VariantFile(str(vcf))
    except (OSError, ValueError) as err:
        raise EvalError(f"--vcf {vcf}: not a readable VCF/BCF ({err})") from None
    compressed = _is_compressed(vcf)
    if compressed and not any(Path(f"{vcf}{ext}").exists() for ext in (".tbi", ".csi")):
        raise EvalError(f"--vcf {vcf} is compressed but not indexed (no {vcf.name}.tbi or .csi): "
                        f"index it with `bcftools index {vcf.name}` or `tabix -p vcf {vcf.name}`")
    if label_field and label_field not in vf.header.info:
        raise EvalError(f"--label-field {label_field} is not an INFO field of {vcf}")
    known = set(reference.references)
    variants: list[Variant] = []
    seen_contigs: list[str] = []
    last = None
    try:
        for n, rec in enumerate(vf.fetch() if compressed else vf, start=1):
            if rec.chrom not in known:
                shown = ", ".join(list(reference.references)[:5])
                raise EvalError(f"--vcf {vcf} record {n} ({rec.chrom}:{rec.pos}): contig "
                                f"{rec.chrom} is not in the reference (it has {shown}, ...)")
            if last is not None and (rec.chrom != last[0] and rec.chrom in seen_contigs
                                     or rec.chrom == last[0] and rec.pos < last[1]):
                raise EvalError(f"--vcf {vcf} is not sorted: record {n} ({rec.chrom}:{rec.pos}) "
                                f"comes after {last[0]}:{last[1]}; sort it with `bcftools sort`")
            if rec.chrom not in seen_contigs:
                seen_contigs.append(rec.chrom)
            last = (rec.chrom, rec.pos)
            label = label_of(rec.info.get(label_field)) if label_field else None
            for alt in rec.alts or [None]:
                v = Variant(rec.chrom, rec.pos, rec.id or ".", rec.ref or "", alt or ".", label)
                if (alt is None or not rec.ref or alt.startswith("<") or alt in ("*", ".")
                        or not alt.isalpha() or max(len(rec.ref), len(alt)) > MAX_ALLELE):
                    v.status = "unsupported"
                variants.append(v)
    except (OSError, ValueError) as err:
        raise EvalError(f"--vcf {vcf}: cannot read it ({err})") from None
    return variants


def make_windows(variants: list[Variant], reference, length: int, soft_mask: str) -> None:
    """Fills ref_ids / alt_ids (L token ids) of every ``ok`` variant, or sets its status."""
    table = encoding_table(soft_mask)
    half = length // 2
    for v in variants:
        if v.status != "ok":
            continue
        contig_len = reference.get_reference_length(v.chrom)
        p = v.pos - 1
        start = p - half
        end = start + length + max(len(v.ref) - len(v.alt), 0)  # a deletion needs more reference
        if start < 0 or end > contig_len:
            v.status = "past_contig_end"
            continue
        seq = reference.fetch(v.chrom, start, end)
        at = p - start
        if set(seq[at:at + len(v.ref)].upper()) - set("ACGT"):  # a gap or an ambiguity code
            v.status = "n_reference"
            continue
        if seq[at:at + len(v.ref)].upper() != v.ref.upper():
            v.status = "ref_mismatch"
            continue
        alt_seq = (seq[:at] + v.alt + seq[at + len(v.ref):])[:length]
        v.ref_ids = table[np.frombuffer(seq[:length].encode(), dtype=np.uint8)]
        v.alt_ids = table[np.frombuffer(alt_seq.encode(), dtype=np.uint8)]


def reverse_complement(ids: np.ndarray) -> np.ndarray:
    return COMPLEMENT[ids][::-1]


def auroc(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """P(a benign score > a pathogenic score), ties half; None without both classes."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return None
    values = np.concatenate([neg, pos])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # average ranks of ties
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[:len(neg)].sum() - len(neg) * (len(neg) + 1) / 2) / (len(neg) * len(pos)))


def prepare_variants(vcf: str | Path, reference: str | Path, length: int, soft_mask: str,
                     label_field: Optional[str] = None) -> list[Variant]:
    """The VCF's alleles with their windows (or their status), ready to score."""
    if length < 2:
        raise EvalError(f"--window must be at least 2, got {length}")
    fasta = open_reference(reference)
    variants = read_variants(vcf, fasta, label_field)
    make_windows(variants, fasta, length, soft_mask)
    return variants


def score_variants(model, vcf: str | Path, reference: str | Path, length: int = 1024,
                   both_strands: bool = False, label_field: Optional[str] = None,
                   batch_size: int = 8, progress=None, prepared=None) -> dict:
    """Scores every supported record (prepared: prepare_variants' result, to reuse); returns
    {"variants": [...], "counts": {...}, "auroc": ...}."""
    variants = prepared or prepare_variants(vcf, reference, length, model.soft_mask, label_field)
    scored = [v for v in variants if v.status == "ok"]
    windows = []  # (variant index, strand sign, ref or alt)
    for i, v in enumerate(scored):
        windows += [(i, v.ref_ids), (i, v.alt_ids)]
        if both_strands:
            windows += [(i, reverse_complement(v.ref_ids)), (i, reverse_complement(v.alt_ids))]
    batches = [windows[k:k + batch_size] for k in range(0, len(windows), batch_size)]
    totals: dict[int, float] = {}

    def make(b: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([ids for _, ids in batches[b]]).astype(np.int64))

    def use(b: int, logprobs: torch.Tensor) -> None:
        for row in range(len(batches[b])):
            totals[b * batch_size + row] = float(logprobs[row].sum())

    if batches:
        for_each_batch(model, len(batches), make, use, progress)
    merged = model.gather(totals)
    per_variant = 4 if both_strands else 2
    for i, v in enumerate(scored):
        w = [merged[i * per_variant + k] for k in range(per_variant)]
        llr = [w[k + 1] - w[k] for k in range(0, per_variant, 2)]
        v.score = sum(llr) / len(llr)
    counts = {}
    for v in variants:
        counts[v.status] = counts.get(v.status, 0) + 1
    labelled = [v for v in scored if v.label is not None]
    area = auroc(np.array([v.score for v in labelled]), np.array([v.label for v in labelled])) \
        if labelled else None
    return {"model": str(model.path), "window": length, "both_strands": both_strands,
            "variants": variants, "counts": counts, "auroc": area,
            "labelled": {"pathogenic": sum(v.label == 1 for v in labelled),
                         "benign": sum(v.label == 0 for v in labelled)}}


def write_tsv(result: dict, path: str | Path) -> None:
    from megatron_geno.files import write_text_atomic

    lines = ["chrom\tpos\tid\tref\talt\tscore\tstatus\tlabel"]
    for v in result["variants"]:
        score = "" if v.score is None else f"{v.score:.6f}"
        label = "" if v.label is None else str(v.label)
        lines.append(f"{v.chrom}\t{v.pos}\t{v.id}\t{v.ref}\t{v.alt}\t{score}\t{v.status}\t{label}")
    write_text_atomic(Path(path), "\n".join(lines) + "\n")


def summary(result: dict) -> str:
    counts = ", ".join(f"{k} {n:,d}" for k, n in sorted(result["counts"].items()))
    line = (f"{sum(result['counts'].values()):,d} alleles: {counts} (window {result['window']:,d}"
            f"{', both strands' if result['both_strands'] else ''})")
    if result["auroc"] is not None:
        lab = result["labelled"]
        line += (f"\nAUROC {result['auroc']:.4f} ({lab['pathogenic']:,d} pathogenic vs "
                 f"{lab['benign']:,d} benign; P(benign scores above pathogenic))")
    elif any(result["labelled"].values()):
        line += "\nAUROC: needs both pathogenic and benign labels"
    return line

