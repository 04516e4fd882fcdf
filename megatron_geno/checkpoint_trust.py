"""The trust boundary of a torch_dist checkpoint directory (DESIGN decision 12).

Checkpoints are downloaded and shared, so nothing read from one is executed and every byte that
is used is checked first:

- ``.metadata`` (torch.distributed.checkpoint's index, a pickle) is read with an unpickler that
  admits only the checkpoint metadata classes; anything else is refused naming the file.
- Pickled objects inside the data files (RNG state, extra state) and ``common.pt`` are read with
  torch's ``weights_only`` unpickler (tensors, containers, numbers, strings).
- Storage paths named in ``.metadata`` must be plain file names inside the directory.
- ``checksums.json``, written at save, holds the CRC32C of every stored item (tensor chunk or
  object) and of ``.metadata`` and ``common.pt``; it is checked before a load, and a mismatch
  names the file and the tensor.

megatron-core 0.16.1's ``dist_checkpointing.load`` takes a strategy but its torch_dist strategy
builds its reader and planner internally; ``TrustedLoadStrategy`` swaps those two module names
for the duration of its own load (checked at import, see ``_MCORE_NAMES``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import re
import threading
from pathlib import Path
from typing import Iterable, Optional

import google_crc32c
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
METADATA = ".metadata"
COMMON = "common.pt"
_READ_BLOCK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, unsafe or does not match the model."""


# --------------------------------------------------------------------------------------------
# .metadata: a restricted unpickler

_ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
    },
    "torch.serialization": {"_get_layout"},  # looks a layout up by name in torch's namespace
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _check_storage_path(ckpt: Path, relative: str) -> None:
    if not isinstance(relative, str) or not _PLAIN_NAME.match(relative) or relative in (".", ".."):
        raise CheckpointError(f"{ckpt / METADATA}: storage path {relative!r} is not a file name "
                              f"inside the checkpoint directory; refusing the checkpoint")


def read_dcp_metadata(ckpt: str | Path) -> Metadata:
    """Returns the checkpoint's torch.distributed.checkpoint index, read without running code.

    Raises CheckpointError naming the file when it is missing, damaged, holds anything but the
    checkpoint metadata classes, or names a storage file outside the directory.
    """
    ckpt = Path(ckpt)
    path = ckpt / METADATA
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a complete torch_dist checkpoint") from None
    except pickle.UnpicklingError as err:
        if str(err).startswith("refused global"):
            raise CheckpointError(f"{path}: {err}; a checkpoint's metadata holds only checkpoint "
                                  f"metadata classes, refusing the checkpoint") from None
        raise CheckpointError(f"{path} is damaged: {err}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError) as err:
        raise CheckpointError(f"{path} is damaged or truncated ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path} does not hold torch.distributed.checkpoint metadata")
    for index, info in (metadata.storage_data or {}).items():
        _check_storage_path(ckpt, getattr(info, "relative_path", None))
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0
                and length >= 0):
            raise CheckpointError(f"{path}: item {index.fqn} has a bad byte range "
                                  f"({offset!r}, {length!r})")
    return metadata


def weights_only_load(data: io.BytesIO | str | Path, what: str):
    """torch.load with torch's restricted unpickler; CheckpointError naming `what`."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        reason = next((line for line in first if "Unsupported global" in line),
                      first[0] if first else "")
        raise CheckpointError(f"{what}: refused to unpickle ({reason.strip()[:200]})") from None
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing") from None
    except Exception as err:  # torch.load's errors on damaged bytes vary by where they are hit
        raise CheckpointError(f"{what} is damaged or truncated ({_one_line(err)})") from None


# --------------------------------------------------------------------------------------------
# megatron-core load strategies that read through the above

from megatron.core.dist_checkpointing.mapping import ShardedObject  # noqa: E402
from megatron.core.dist_checkpointing.strategies import torch as _mcore_torch  # noqa: E402
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy  # noqa: E402

# the megatron-core names TrustedLoadStrategy.load replaces while it runs
_MCORE_NAMES = ("_get_filesystem_reader", "MCoreLoadPlanner", "TorchDistLoadShardedStrategy")
_missing = [name for name in _MCORE_NAMES if not hasattr(_mcore_torch, name)]
if _missing:
    raise ImportError(f"megatron_geno.checkpoint_trust: megatron.core.dist_checkpointing."
                      f"strategies.torch has no {_missing[0]} (megatron-core 0.16.1 expected)")


class TrustedReader(FileSystemReader):
    """A FileSystemReader whose metadata comes from read_dcp_metadata (read once)."""

    def __init__(self, path, *args, **kwargs) -> None:
        super().__init__(path)
        self._trusted_metadata: Optional[Metadata] = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._trusted_metadata is None:
            self._trusted_metadata = read_dcp_metadata(self.path)
        return self._trusted_metadata


class _TrustedPlanner(_mcore_torch.MCoreLoadPlanner):
    """Checks each pickled object with the weights-only unpickler before the planner uses it."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        weights_only_load(value, f"checkpoint object {read_item.dest_index.fqn}")
        value.seek(0)  # admitted: only allow-listed globals, so the full load builds the same
        super().load_bytes(read_item, value)


_swap_lock = threading.Lock()


@contextlib.contextmanager
def _trusted_reads():
    with _swap_lock:
        saved = {name: getattr(_mcore_torch, name) for name in _MCORE_NAMES[:2]}
        _mcore_torch._get_filesystem_reader = lambda path, cache_metadata=False: TrustedReader(path)
        _mcore_torch.MCoreLoadPlanner = _TrustedPlanner
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(_mcore_torch, name, value)


class TrustedLoadStrategy(_mcore_torch.TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load strategy, reading metadata and objects safely."""

    def load(self, sharded_state_dict, checkpoint_dir):
        with _trusted_reads():
            return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir, metadata: Optional[Metadata] = None):
        return super().load_tensors_metadata(
            checkpoint_dir, metadata if metadata is not None else read_dcp_metadata(checkpoint_dir))

    def load_sharded_metadata(self, checkpoint_dir):
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        metadata = read_dcp_metadata(checkpoint_dir)
        result = {}
        for key, storage in metadata.state_dict_metadata.items():
            if isinstance(storage, BytesStorageMetadata):
                obj = ShardedObject.empty_from_unique_key(key)
                result[obj.unique_key] = obj
        result.update(self.load_tensors_metadata(checkpoint_dir, metadata))
        return result


class TrustedCommonStrategy(TorchCommonLoadStrategy):
    """common.pt through torch's weights-only unpickler, whatever torch's default."""

    def load_common(self, checkpoint_dir):
        return weights_only_load(Path(checkpoint_dir) / COMMON, str(Path(checkpoint_dir) / COMMON))

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: objects stored as separate files are not a "
                              f"torch_dist checkpoint of this project")


def _first_failure(err: CheckpointException) -> BaseException:
    failures = getattr(err, "failures", None) or {}
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, stack)
        if isinstance(inner, BaseException):
            return inner
    return err


def trusted_load(sharded_state_dict: dict, ckpt: str | Path, **kwargs) -> dict:
    """megatron-core's dist_checkpointing.load through the trusted strategies.

    Errors (damaged, truncated or refused files) become one-line CheckpointErrors.
    """
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(sharded_state_dict, str(ckpt),
                                       sharded_strategy=TrustedLoadStrategy(),
                                       common_strategy=TrustedCommonStrategy(), **kwargs)
    except CheckpointError:
        raise
    except CheckpointException as err:  # a BaseException: would escape `except Exception`
        inner = _first_failure(err)
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(f"cannot load checkpoint {ckpt} (damaged or truncated?): "
                              f"{_one_line(inner)}") from None
    except Exception as err:
        raise CheckpointError(f"cannot load checkpoint {ckpt}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    """'Type: first line of the message' (or just the type), at most 300 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (type(err).__name__ + (f": {lines[0]}" if lines else ""))[:300]


def read_common(ckpt: str | Path) -> dict:
    """Returns the checkpoint's common.pt (non-tensor state) read with the weights-only loader."""
    common = TrustedCommonStrategy().load_common(ckpt)
    if not isinstance(common, dict):
        raise CheckpointError(f"{Path(ckpt) / COMMON} does not hold a state dict")
    return common


def read_tensors_metadata(ckpt: str | Path) -> dict:
    """Returns {key: ShardedTensor without data} (global shapes and dtypes) of the checkpoint."""
    return TrustedLoadStrategy().load_tensors_metadata(Path(ckpt))


# --------------------------------------------------------------------------------------------
# content checksums

def _crc_range(f, offset: int, length: int) -> int:
    f.seek(offset)
    crc, left = 0, length
    while left:
        block = f.read(min(left, _READ_BLOCK))
        if not block:
            return -1  # short file
        crc = google_crc32c.extend(crc, block)
        left -= len(block)
    return crc


def _crc_file(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    with path.open("rb") as f:
        return size, _crc_range(f, 0, size)


def _items_by_file(metadata: Metadata) -> dict[str, list]:
    files: dict[str, list] = {}
    for index, info in (metadata.storage_data or {}).items():
        files.setdefault(info.relative_path, []).append((index, info))
    for items in files.values():
        items.sort(key=lambda pair: pair[1].offset)
    return files


def _item_name(index) -> str:
    offsets = getattr(index, "offset", None)
    return index.fqn if offsets is None else f"{index.fqn}@{list(offsets)}"


def compute_checksums(ckpt: str | Path, share: tuple[int, int] = (0, 1)) -> dict:
    """Returns the checksum entries of this process's share of the checkpoint's data files.

    share = (rank, world): the data files are split between processes by position in sorted
    order; rank 0 also covers .metadata and common.pt. merge the shares with merge_checksums.
    """
    ckpt = Path(ckpt)
    rank, world = share
    metadata = read_dcp_metadata(ckpt)
    files, items = {}, []
    for n, (name, entries) in enumerate(sorted(_items_by_file(metadata).items())):
        if n % world != rank:
            continue
        path = ckpt / name
        files[name] = {"size": path.stat().st_size}
        with path.open("rb") as f:
            for index, info in entries:
                items.append({"item": _item_name(index), "file": name, "offset": info.offset,
                              "length": info.length,
                              "crc32c": _crc_range(f, info.offset, info.length)})
    if rank == 0:
        for name in (METADATA, COMMON):
            size, crc = _crc_file(ckpt / name)
            files[name] = {"size": size, "crc32c": crc}
    return {"files": files, "items": items}


def merge_checksums(shares: Iterable[dict]) -> dict:
    """One checksums.json document from every process's compute_checksums result."""
    merged = {"format": 1, "algorithm": "crc32c", "files": {}, "items": []}
    for share in shares:
        merged["files"].update(share["files"])
        merged["items"].extend(share["items"])
    merged["files"] = dict(sorted(merged["files"].items()))
    merged["items"].sort(key=lambda item: (item["file"], item["offset"]))
    return merged


def write_checksums(ckpt: str | Path, document: dict) -> None:
    """Writes CKPT/checksums.json (durably: a crash never leaves half a file)."""
    from megatron_geno.files import write_text_atomic

    write_text_atomic(Path(ckpt) / CHECKSUMS, json.dumps(document, indent=0) + "\n")


def seal(ckpt: str | Path) -> None:
    """Computes and writes the checksums of a whole checkpoint from one process."""
    write_checksums(ckpt, merge_checksums([compute_checksums(ckpt)]))


def read_checksums(ckpt: str | Path) -> Optional[dict]:
    """Returns checksums.json, None when the checkpoint has none (older versions wrote none)."""
    path = Path(ckpt) / CHECKSUMS
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
        if document.get("algorithm") != "crc32c" or not isinstance(document.get("items"), list):
            raise ValueError("unknown layout")
        return document
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(f"{path} is damaged ({str(err)[:200]})") from None


def verify_checksums(ckpt: str | Path, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Checks this process's share of the checkpoint against checksums.json.

    Returns one message per fault (naming the file, and the tensor for item data); an empty list
    when everything matches or the checkpoint predates checksums (a warning is logged).
    """
    ckpt = Path(ckpt)
    document = read_checksums(ckpt)
    if document is None:
        log.warning("%s has no %s (written by an older version): its content is not verified",
                    ckpt, CHECKSUMS)
        return []
    rank, world = share
    faults, unusable = [], set()
    names = sorted(document["files"])
    mine = {name for n, name in enumerate(names) if n % world == rank}
    for name in sorted(mine):
        _check_storage_path(ckpt, name)
        path, expected = ckpt / name, document["files"][name]
        if not path.exists():
            faults.append(f"{path} is missing")
            unusable.add(name)
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            faults.append(f"{path} has {size} bytes, {expected.get('size')} were written "
                          f"(truncated or damaged)")
            unusable.add(name)
            continue
        if "crc32c" in expected and _crc_file(path)[1] != expected["crc32c"]:
            faults.append(f"{path}: content checksum mismatch")
    handles: dict[str, object] = {}
    try:
        for item in document["items"]:
            name = item.get("file")
            if name not in mine or name in unusable:
                continue
            if name not in handles:
                handles[name] = (ckpt / name).open("rb")
            crc = _crc_range(handles[name], int(item["offset"]), int(item["length"]))
            if crc != item["crc32c"]:
                faults.append(f"{ckpt / name}: tensor {item['item']} fails its content checksum "
                              f"(bytes {item['offset']}..{item['offset'] + item['length']})")
    finally:
        for handle in handles.values():
            handle.close()
    return faults


def gather_faults(faults: list[str]) -> list[str]:
    """Every process's faults, on every process (a collective when torch.distributed is up)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return faults
    shares: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, faults)
    return [fault for share in shares for fault in share]


def check_content(ckpt: str | Path) -> None:
    """Raises CheckpointError (the same on every rank) when any stored byte fails its checksum.

    The work is split between the processes of the job; each reads its share once.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    share = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
             if distributed else (0, 1))
    try:
        faults = verify_checksums(ckpt, share)
    except CheckpointError as err:
        faults = [str(err)]
    faults = gather_faults(faults)
    if faults:
        more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
        raise CheckpointError(faults[0] + more)


def structural_fault(ckpt: str | Path) -> Optional[str]:
    """Returns why CKPT is not a complete, loadable checkpoint (cheap checks), or None.

    Checks the files a load needs exist, .metadata is safe to read and names only present files,
    and file sizes match checksums.json when it exists. Content is check_content's job.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return f"{ckpt} does not exist"
    for name in ("metadata.json", COMMON):
        if not (ckpt / name).is_file():
            return f"{ckpt / name} is missing"
    try:
        metadata = read_dcp_metadata(ckpt)
        document = read_checksums(ckpt)
    except CheckpointError as err:
        return str(err)
    for name in _items_by_file(metadata):
        if not (ckpt / name).is_file():
            return f"{ckpt / name} is missing"
    for name, expected in (document or {}).get("files", {}).items():
        path = ckpt / name
        if not path.is_file() or path.stat().st_size != expected.get("size"):
            return f"{path} is missing or has the wrong size (truncated?)"
    return None
