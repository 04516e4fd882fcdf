"""A corpus's run.json and manifest.json: starting a run, finalizing it, and reading the manifest
back (the one manifest reader: training, verify, export and geno-eval use it).

Corpus layout::

    OUT/run.json              the pipeline config, its hash, and every assembly of the manifest
    OUT/shards/<assembly>/    one zarr group per assembly (parts inside; see data_pipeline.shard_format)
    OUT/shards/.<id>.tmp/     an assembly being written (deleted and redone on rerun)
    OUT/manifest.json         written by finalize: shards, token/document counts, splits
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from data_pipeline.errors import PipelineError, ShardError
from data_pipeline.manifest import Assembly
from data_pipeline.run_config import PipelineConfig, assembly_hash, sha
from data_pipeline.shard_format import FORMAT_VERSION, SPLITS, read_attrs
from megatron_geno.files import write_text_atomic
from megatron_geno.vocab import TOKENIZER_VERSION, VOCAB

log = logging.getLogger(__name__)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def prepare_out(out: Path, config: PipelineConfig, assemblies: list[Assembly], force: bool,
                only_listed: bool = False) -> None:
    """Creates OUT and its run.json; refuses a corpus written with another config (unless force).

    Assemblies of earlier runs that this run does not name stay in the corpus (and its manifest)
    unless only_listed.
    """
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; name a corpus directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"--out {out}: cannot create ({err.strerror})") from None
    run_file = out / "run.json"
    kept: list[Assembly] = []
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
            earlier = [Assembly(**row) for row in previous.get("assemblies", [])]
        except (OSError, ValueError, TypeError) as err:
            raise PipelineError(f"{run_file}: unreadable ({err}); remove it or use a new --out")
        if previous.get("config_hash") != config.hash() and not force:
            changed = differing_options(previous.get("config") or {}, config.to_dict())
            raise PipelineError(
                f"{out} holds a corpus made with other options ({changed}); use the same "
                f"options, --force to redo it, or a new --out")
        named = {a.assembly for a in assemblies}
        unnamed = [a for a in earlier if a.assembly not in named]
        if unnamed and not only_listed:
            kept = unnamed
            log.info("%s keeps %d assemblies of earlier runs that this run does not name (%s%s); "
                     "--only-listed leaves them out of the manifest", out, len(kept),
                     ", ".join(a.assembly for a in kept[:3]), ", ..." if len(kept) > 3 else "")
    write_json(run_file, {"format_version": FORMAT_VERSION, "config": config.to_dict(),
                           "config_hash": config.hash(),
                           # by name: the same set gives the same run.json and manifest
                           # whichever inputs, in whichever order, a run names
                           "assemblies": [a.to_dict() for a in sorted(
                               kept + list(assemblies), key=lambda a: a.assembly)]})


# where each field of a PipelineConfig comes from on geno-preprocess run's command line
_OPTIONS = {"policy.soft_mask": "--soft-mask", "policy.split_n_run": "--split-n-run",
            "policy.min_length": "--min-length", "policy.max_n_fraction": "--max-n-fraction",
            "rules.contig_patterns": "--holdout-contigs", "rules.sample_fractions":
            "--holdout-samples", "rules.seed": "--split-seed", "part_tokens": "--part-size",
            "compression_level": "--compression-level", "codec": "--codec",
            "format_version": "the store format version (another geno-preprocess)",
            "tokenizer_version": "the tokenizer version (another geno-preprocess)"}


def differing_options(before: dict, now: dict) -> str:
    """'--min-length 64 -> 100; --codec dna2bit -> zstd': the options two corpus configs differ
    in, as geno-preprocess run takes them."""
    from megatron_geno.config import flat_keys

    a, b = flat_keys(before), flat_keys(now)
    return "; ".join(f"{_OPTIONS.get(k, k)} {a.get(k)!r} -> {b.get(k)!r}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def finalize(out: Path) -> dict:
    """Writes OUT/manifest.json once every assembly of run.json is finished; returns it."""
    try:
        run = json.loads((out / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{out}/run.json: unreadable ({err}); run geno-preprocess run first")
    config = PipelineConfig.from_dict(run["config"])
    entries, missing = [], []
    for row in sorted(run["assemblies"], key=lambda r: r["assembly"]):  # (older run.json files)
        assembly = Assembly(**row)
        group = out / "shards" / assembly.assembly
        try:
            attrs = read_attrs(group) if (group / "zarr.json").exists() else {}
        except ShardError:
            attrs = {}  # damaged: not finished
        if attrs.get("assembly_hash") != assembly_hash(config, assembly):
            missing.append(assembly.assembly)
            continue
        entries.append({
            **{k: attrs[k] for k in ("assembly", "sample", "haplotype", "species")},
            "path": f"shards/{assembly.assembly}",
            "assembly_hash": attrs["assembly_hash"],
            "source_md5": attrs["source"]["md5"],
            "parts": attrs["parts"],
            "stats": attrs["stats"],
        })
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PipelineError(f"{len(missing)} of {len(run['assemblies'])} assemblies are not "
                            f"finished ({shown}); run the remaining tasks (or run again with "
                            f"--only-listed to leave out what this run does not name), then "
                            f"finalize")
    totals = {"tokens": 0, "documents": 0, "split_tokens": {s: 0 for s in SPLITS},
              "split_documents": {s: 0 for s in SPLITS}}
    for entry in entries:
        for part in entry["parts"]:
            totals["tokens"] += part["tokens"]
            totals["documents"] += part["documents"]
            for s in SPLITS:
                totals["split_tokens"][s] += part["split_tokens"][s]
                totals["split_documents"][s] += part["split_documents"][s]
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": run["config"],
        "config_hash": run["config_hash"],
        "content_hash": sha([e["assembly_hash"] for e in entries]),
        "tokenizer": {"name": "geno", "version": TOKENIZER_VERSION, "vocab_size": len(VOCAB)},
        "totals": totals,
        "assemblies": entries,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


_ENTRY_PATH = re.compile(r"^shards/[A-Za-z0-9][A-Za-z0-9._#+-]*$")
_PART_NAME = re.compile(r"^part-[0-9]{5}$")


def read_manifest_json(corpus: Path) -> dict:
    """Returns a finished corpus's manifest.json, checked; a clear error when missing or bad.

    Every path it names must stay inside the corpus (shards/<assembly>/part-NNNNN).
    """
    path = Path(corpus) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist: the corpus is unfinished (run "
                            f"geno-preprocess finalize {corpus}) or not a corpus") from None
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: unreadable ({err})") from None
    try:
        for n, entry in enumerate(manifest["assemblies"]):
            if not isinstance(entry.get("path"), str) or not _ENTRY_PATH.match(entry["path"]):
                raise PipelineError(f"{path}: assembly {n} has path {entry.get('path')!r}, not "
                                    f"shards/<assembly> inside the corpus")
            for part in entry["parts"]:
                if not isinstance(part.get("name"), str) or not _PART_NAME.match(part["name"]):
                    raise PipelineError(f"{path}: assembly {entry['path']} names part "
                                        f"{part.get('name')!r}, not part-NNNNN")
        manifest["totals"]["split_tokens"]
    except (KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"{path} is not a corpus manifest (missing {err})") from None
    return manifest
