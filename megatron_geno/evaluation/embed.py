"""geno-eval embed: per-sequence embeddings from one layer's hidden states.

Sequences are the records of a FASTA (plain or gzip/bgzip, read with pysam) or the regions of a
BED file on an indexed reference. A sequence longer than the window is cut into consecutive
windows of at most L tokens, each run on its own (no context crosses a window boundary). Pooling:
``mean`` is the mean over every token of the sequence (all windows, token-weighted); ``last`` is
the hidden state of the sequence's last token (in its window).

Output: ``OUT.npy`` (float32 [records, 2, hidden]: [:, 0] mean, [:, 1] last) with the record
names in ``OUT.names.txt``, or a zarr group ``OUT.zarr`` with arrays ``mean``, ``last`` and
``names``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_geno.evaluation.models import EvalError, for_each_batch
from megatron_geno.vocab import encoding_table


def read_sequences(fasta: Optional[str] = None, bed: Optional[str] = None,
                   reference: Optional[str] = None) -> list[tuple[str, str]]:
    """(name, bases) of every FASTA record, or of every BED region (name: the BED name column,
    else chrom:start-end)."""
    from megatron_geno.evaluation.models import pysam_module

    pysam = pysam_module()

    from megatron_geno.evaluation.variants import open_reference

    if (fasta is None) == (bed is None):
        raise EvalError("give exactly one of --fasta and --bed (with --reference)")
    if fasta is not None:
        if reference is not None:
            raise EvalError("--reference goes with --bed, not --fasta")
        if not Path(fasta).is_file():
            raise EvalError(f"--fasta {fasta} does not exist")
        try:
            with pysam.FastxFile(fasta) as f:
                records = [(r.name, r.sequence or "") for r in f]
        except (OSError, ValueError) as err:
            raise EvalError(f"--fasta {fasta}: not a readable FASTA ({err})") from None
        if not records:
            raise EvalError(f"--fasta {fasta} holds no records")
        empty = [name for name, seq in records if not seq]
        if empty:
            raise EvalError(f"--fasta {fasta}: record {empty[0]} is empty")
        return records
    if reference is None:
        raise EvalError("--bed needs --reference (the FASTA its coordinates refer to)")
    ref = open_reference(reference)
    if not Path(bed).is_file():
        raise EvalError(f"--bed {bed} does not exist")
    records = []
    for n, line in enumerate(Path(bed).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        cols = line.split("\t")
        try:
            chrom, start, end = cols[0], int(cols[1]), int(cols[2])
        except (IndexError, ValueError):
            raise EvalError(f"--bed {bed} line {n}: expected chrom<TAB>start<TAB>end") from None
        if chrom not in ref.references:
            raise EvalError(f"--bed {bed} line {n}: contig {chrom} is not in the reference")
        if not 0 <= start < end <= ref.get_reference_length(chrom):
            raise EvalError(f"--bed {bed} line {n}: {chrom}:{start}-{end} is empty or past the "
                            f"contig end ({ref.get_reference_length(chrom):,d})")
        name = cols[3] if len(cols) > 3 and cols[3] else f"{chrom}:{start}-{end}"
        records.append((name, ref.fetch(chrom, start, end)))
    if not records:
        raise EvalError(f"--bed {bed} holds no regions")
    return records


def embed(model, records: list[tuple[str, str]], layer: Optional[int] = None, length: int = 1024,
          batch_size: int = 8, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (mean [n, h], last [n, h]) float32 for the records."""
    if length < 1:
        raise EvalError(f"--window must be positive, got {length}")
    layer = model.num_layers if layer is None else layer
    table = encoding_table(model.soft_mask)
    windows = []  # (record, token ids)
    for r, (_, seq) in enumerate(records):
        ids = table[np.frombuffer(seq.encode("ascii", "replace"), dtype=np.uint8)]
        windows += [(r, ids[k:k + length]) for k in range(0, len(ids), length)]
    # batches of equal-length windows
    by_length: dict[int, list[int]] = {}
    for w, (_, ids) in enumerate(windows):
        by_length.setdefault(len(ids), []).append(w)
    batches = [group[k:k + batch_size] for group in by_length.values()
               for k in range(0, len(group), batch_size)]
    sums = np.zeros((len(records), model.hidden_size))
    counts = np.zeros(len(records), dtype=np.int64)
    last = np.zeros((len(records), model.hidden_size), dtype=np.float32)
    outputs = {}

    def make(b: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([windows[w][1] for w in batches[b]]).astype(np.int64))

    def use(b: int, hidden: torch.Tensor) -> None:
        for row, w in enumerate(batches[b]):
            h = hidden[row].double().numpy()
            outputs[w] = (h.sum(0), h.shape[0], h[-1].astype(np.float32))

    for_each_batch(model, len(batches), make, use, progress,
                   compute=lambda tokens: model.hidden(tokens, layer))
    merged = model.gather(outputs)
    for w in sorted(merged):  # a record's windows are consecutive: its last one comes last
        r = windows[w][0]
        total, n, final = merged[w]
        sums[r] += total
        counts[r] += n
        last[r] = final
    return (sums / counts[:, None]).astype(np.float32), last


def write_embeddings(out: str | Path, names: list[str], mean: np.ndarray,
                     last: np.ndarray) -> list[Path]:
    """Writes OUT.npy + OUT.names.txt, or OUT.zarr; returns the paths written."""
    from megatron_geno.files import fresh_temp_dir, publish_dir, write_bytes_atomic

    out = Path(out)
    if out.suffix not in (".npy", ".zarr"):
        raise EvalError(f"--out {out}: name a .npy file or a .zarr directory")
    if out.exists():
        raise EvalError(f"--out {out} exists; it is never replaced")
    if out.suffix == ".npy":
        import io

        buffer = io.BytesIO()
        np.save(buffer, np.stack([mean, last], axis=1))
        names_file = out.with_suffix(".names.txt")
        if names_file.exists():
            raise EvalError(f"{names_file} exists; it is never replaced")
        write_bytes_atomic(names_file, ("\n".join(names) + "\n").encode())
        write_bytes_atomic(out, buffer.getvalue())
        return [out, names_file]
    import zarr

    tmp = fresh_temp_dir(out)
    group = zarr.open_group(str(tmp), mode="w")
    group.create_array("mean", data=mean)
    group.create_array("last", data=last)
    # the names as an attribute (JSON): zarr's variable-length string arrays have no stable
    # Zarr V3 specification yet, so other Zarr readers might not read an array of them
    group.attrs["names"] = list(names)
    group.attrs["pooling"] = {"mean": "mean over all tokens of all windows",
                              "last": "hidden state of the last token"}
    publish_dir(tmp, out)
    return [out]
