"""Input manifests: which assemblies to tokenize, and which of them this task processes."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

COLUMNS = ("assembly", "sample", "haplotype", "species", "path", "md5", "split")
REQUIRED = COLUMNS[:5]
SPLIT_NAMES = ("train", "valid", "test")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._#+-]*$")
_FASTA_SUFFIXES = (".gz", ".bgz", ".xz", ".bz2", ".fa", ".fasta", ".fna", ".fas", ".fsa")


class ManifestError(ValueError):
    """A bad manifest or input list; the message names the file, line and column."""


@dataclass(frozen=True)
class Assembly:
    assembly: str  # unique id; also the shard directory name
    sample: str  # both haplotypes of a sample share it (sample-level splits keep them together)
    haplotype: str
    species: str
    path: str  # absolute
    md5: str = ""
    split: str = ""  # "", or train / valid / test for the whole assembly

    def to_dict(self) -> dict:
        return asdict(self)


def read_manifest(path: str | os.PathLike) -> list[Assembly]:
    """Returns the assemblies of a TSV manifest (header row with at least the required columns).

    Columns: assembly, sample, haplotype, species, path, and optionally md5 and split. Relative
    paths are relative to the manifest's directory. Lines starting with '#' are comments.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ManifestError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text (byte offset {err.start})") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.startswith("#")]
    if not lines:
        raise ManifestError(f"{path}: empty manifest")
    header = [h.strip().lower() for h in lines[0][1].split("\t")]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ManifestError(f"{path}: line {lines[0][0]}: header lacks column(s) {', '.join(missing)}"
                            f" (tab-separated; expected {', '.join(COLUMNS)})")
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        raise ManifestError(f"{path}: line {lines[0][0]}: unknown column(s) {', '.join(unknown)}")
    assemblies = []
    for lineno, line in lines[1:]:
        fields = next(csv.reader([line], delimiter="\t"))
        if len(fields) != len(header):
            raise ManifestError(f"{path}: line {lineno}: {len(fields)} fields, header has "
                                f"{len(header)}")
        row = dict(zip(header, (f.strip() for f in fields)))
        source = Path(row["path"])
        if not source.is_absolute():
            source = path.parent / source
        assemblies.append(make_assembly(row, str(source.resolve()), f"{path}: line {lineno}"))
    check_unique(assemblies, str(path))
    return assemblies


def make_assembly(row: dict, source: str, where: str) -> Assembly:
    if not _SAFE_ID.match(row["assembly"]):
        raise ManifestError(f"{where}: assembly id {row['assembly']!r} must match {_SAFE_ID.pattern}")
    split = row.get("split", "") or ""
    if split and split not in SPLIT_NAMES:
        raise ManifestError(f"{where}: split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
    md5 = (row.get("md5", "") or "").lower()
    if md5 and not re.fullmatch(r"[0-9a-f]{32}", md5):
        raise ManifestError(f"{where}: md5 {md5!r} is not 32 hex digits")
    return Assembly(row["assembly"], row.get("sample") or row["assembly"],
                    row.get("haplotype", ""), row.get("species", ""), source, md5, split)


def assemblies_from_paths(paths: list[str], species: str) -> list[Assembly]:
    """Returns one assembly per FASTA path, named after the file (suffixes removed)."""
    assemblies = []
    for p in paths:
        name = Path(p).name
        while name.lower().endswith(_FASTA_SUFFIXES):
            name = name[: name.rfind(".")]
        assemblies.append(make_assembly({"assembly": name, "sample": name, "species": species},
                                        str(Path(p).resolve()), p))
    check_unique(assemblies, "the FASTA paths")
    return assemblies


def check_unique(assemblies: list[Assembly], where: str) -> None:
    seen: dict[str, Assembly] = {}
    for a in assemblies:
        if a.assembly in seen:
            raise ManifestError(f"{where}: assembly id {a.assembly!r} appears twice "
                                f"({seen[a.assembly].path} and {a.path})")
        seen[a.assembly] = a


def _env_int(name: str, default: int) -> int:
    """An integer environment variable (SLURM's array variables); ManifestError naming it."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ManifestError(f"environment variable {name}={text!r} is not an integer (give "
                            f"--task-index and --num-tasks instead)") from None


def task_slice(assemblies: list[Assembly], task_index: Optional[int],
               num_tasks: Optional[int]) -> list[Assembly]:
    """Returns this task's assemblies: every num_tasks-th of the id-sorted list, from task_index.

    The defaults come from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, so each array task
    of `sbatch --array=0-(N-1)` takes a disjoint, deterministic share.
    """
    if num_tasks is None:
        num_tasks = _env_int("SLURM_ARRAY_TASK_COUNT", 1)
    if task_index is None:
        task_index = _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ManifestError(f"--task-index {task_index} must be in [0, --num-tasks {num_tasks})")
    ordered = sorted(assemblies, key=lambda a: a.assembly)
    return ordered[task_index::num_tasks]
