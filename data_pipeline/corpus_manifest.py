"""A corpus's run.json and manifest.json: starting a run, finalizing it, and reading the manifest
back (the one manifest reader: training, verify, export and geno-eval use it).

Corpus layout::

    OUT/run.json              the pipeline config, its hash, and every assembly of the manifest
    OUT/shards/<assembly>/    one zarr group per assembly (parts inside; see data_pipeline.shard_format)
    OUT/shards/.<id>.tmp/     an assembly being written (deleted and redone on rerun)
    OUT/failures/<id>.json    why an assembly's last attempt failed (removed once it is written)
    OUT/manifest.json         written by finalize: shards, token/document counts, splits; while
                              an assembly is failed or unwritten it says "complete": false, lists
                              them, and every reader but `stats` refuses it
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from data_pipeline.errors import PipelineError, ShardError
from data_pipeline.manifest import Assembly
from data_pipeline.run_config import PipelineConfig, assembly_hash, content_identity, sha
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


def record_outcomes(out: Path, config: PipelineConfig, assemblies: list[Assembly],
                    results: list[tuple[str, str, dict]]) -> None:
    """Keeps why each failed assembly failed in OUT/failures/<id>.json (for finalize and stats,
    also when another task of an array runs them); an assembly written since loses its record."""
    by_name = {a.assembly: a for a in assemblies}
    folder = out / "failures"
    for name, status, info in results:
        record = folder / f"{name}.json"
        try:
            if status == "error":
                folder.mkdir(exist_ok=True)
                write_json(record, {"assembly": name, "source": by_name[name].path,
                                    "assembly_hash": assembly_hash(config, by_name[name]),
                                    "message": info["message"]})
            else:
                record.unlink(missing_ok=True)
        except OSError as err:  # (a full disk: the run's own error line says so)
            log.debug("cannot update %s: %s", record, err)


def _failure(out: Path, assembly: Assembly, expected_hash: str) -> str | None:
    """The recorded reason this assembly (as it is now configured) failed, if any."""
    try:
        record = json.loads((out / "failures" / f"{assembly.assembly}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("assembly_hash") != expected_hash:
        return None  # a record of an earlier source or config
    return str(record.get("message", "failed"))


def finalize(out: Path) -> dict:
    """Writes OUT/manifest.json and returns it.

    When every assembly of run.json is written the manifest is complete. Otherwise it says
    "complete": false and lists the failed assemblies (with their messages) and the ones not
    written yet; readers refuse it (see `incomplete_hint`) and `stats` shows it.
    """
    try:
        run = json.loads((out / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{out}/run.json: unreadable ({err}); run geno-preprocess run first")
    config = PipelineConfig.from_dict(run["config"])
    entries, identities, failed, unwritten = [], [], [], []
    for row in sorted(run["assemblies"], key=lambda r: r["assembly"]):  # (older run.json files)
        assembly = Assembly(**row)
        group = out / "shards" / assembly.assembly
        try:
            attrs = read_attrs(group) if (group / "zarr.json").exists() else {}
        except ShardError:
            attrs = {}  # damaged: not finished
        expected = assembly_hash(config, assembly)
        if attrs.get("assembly_hash") != expected:
            message = _failure(out, assembly, expected)
            if message is None:
                unwritten.append(assembly.assembly)
            else:
                failed.append({"assembly": assembly.assembly, "source": assembly.path,
                               "message": message})
            continue
        identities.append(content_identity(config, assembly, attrs["source"]["md5"]))
        entries.append({
            **{k: attrs[k] for k in ("assembly", "sample", "haplotype", "species")},
            "path": f"shards/{assembly.assembly}",
            "assembly_hash": attrs["assembly_hash"],
            "source_md5": attrs["source"]["md5"],
            "parts": attrs["parts"],
            "stats": attrs["stats"],
        })
    totals = {"tokens": 0, "documents": 0, "split_tokens": {s: 0 for s in SPLITS},
              "split_documents": {s: 0 for s in SPLITS}}
    for entry in entries:
        for part in entry["parts"]:
            totals["tokens"] += part["tokens"]
            totals["documents"] += part["documents"]
            for s in SPLITS:
                totals["split_tokens"][s] += part["split_tokens"][s]
                totals["split_documents"][s] += part["split_documents"][s]
    complete = not failed and not unwritten
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": run["config"],
        "config_hash": run["config_hash"],
        "complete": complete,
        # what a complete corpus holds, wherever its sources lay (run_config.content_identity);
        # an incomplete one has none (nothing may train on it)
        "content_hash": sha(identities) if complete else None,
        "tokenizer": {"name": "geno", "version": TOKENIZER_VERSION, "vocab_size": len(VOCAB)},
        "totals": totals,
        "assemblies": entries,
    }
    if not complete:
        manifest["failed"] = failed
        manifest["unwritten"] = unwritten
    write_json(out / "manifest.json", manifest)
    _drop_stale_failures(out, {f["assembly"] for f in failed})
    return manifest


def _drop_stale_failures(out: Path, failed: set[str]) -> None:
    """Removes failure records of assemblies written since or no longer in the corpus."""
    folder = out / "failures"
    if not folder.is_dir():
        return
    for record in folder.glob("*.json"):
        if record.stem not in failed:
            record.unlink(missing_ok=True)
    try:
        folder.rmdir()  # only when empty
    except OSError:
        pass


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def incomplete_hint(corpus: Path, manifest: dict) -> str:
    """One line for a corpus that is not complete: what is missing and the one way on."""
    failed = [f["assembly"] for f in manifest.get("failed", [])]
    unwritten = list(manifest.get("unwritten", []))
    total = len(manifest["assemblies"]) + len(failed) + len(unwritten)
    what = []
    if failed:
        what.append(f"{len(failed)} of {total} assemblies failed ({_names(failed)})")
    if unwritten:
        what.append(f"{len(unwritten)} of {total} are not written yet ({_names(unwritten)})")
    fix = ("fix the failed inputs (`geno-preprocess stats` shows each error) and rerun "
           "`geno-preprocess run` with the same options, or rerun naming only the inputs to "
           "keep with --only-listed" if failed else
           "run the remaining array tasks (each skips what is done), then "
           f"`geno-preprocess finalize {corpus}`")
    return (f"{corpus} is incomplete: {' and '.join(what)}; nothing trains or evaluates on it "
            f"until it is complete: {fix} (finished assemblies are kept)")


_ENTRY_PATH = re.compile(r"^shards/[A-Za-z0-9][A-Za-z0-9._#+-]*$")
_PART_NAME = re.compile(r"^part-[0-9]{5}$")


def read_manifest_json(corpus: Path, incomplete_ok: bool = False) -> dict:
    """Returns a finished corpus's manifest.json, checked; a clear error when missing or bad.

    Every path it names must stay inside the corpus (shards/<assembly>/part-NNNNN). An
    incomplete corpus is refused unless incomplete_ok (`stats`, which shows what is missing).
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
    if not is_complete(manifest) and not incomplete_ok:
        raise PipelineError(incomplete_hint(Path(corpus), manifest))
    return manifest


def is_complete(manifest: dict) -> bool:
    """Whether every assembly of the corpus is written (a manifest older than the key is)."""
    return manifest.get("complete", True) is True
