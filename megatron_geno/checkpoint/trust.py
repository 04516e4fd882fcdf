"""The trust boundary of a torch_dist checkpoint directory (DESIGN decision 12): nothing read
from a checkpoint is executed.

- ``.metadata`` (torch.distributed.checkpoint's index, a pickle) is read with an unpickler that
  admits only the checkpoint metadata classes; anything else is refused naming the file.
- Pickled objects inside the data files (RNG state, extra state) and ``common.pt`` are read with
  torch's ``weights_only`` unpickler (tensors, containers, numbers, strings).
- Storage paths named in ``.metadata`` must be plain file names inside the directory.

This module needs torch alone (``geno-convert inspect`` reads a checkpoint through it without
megatron-core); megatron-core's load strategies that read through it are in
megatron_geno.checkpoint.strategy, the integrity checks (checksums) in
megatron_geno.checkpoint.integrity.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from megatron_geno.checkpoint.errors import CheckpointError  # noqa: E402,F401 - re-exported

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
METADATA = ".metadata"
COMMON = "common.pt"


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
        raise CheckpointError(f"{what} is damaged or truncated ({one_line(err)})") from None


# --------------------------------------------------------------------------------------------
# torch.distributed.checkpoint's reader, with the metadata read above

class TrustedReader(FileSystemReader):
    """A FileSystemReader whose metadata comes from read_dcp_metadata (read once); given the
    checkpoint's checksums (checksums.json), every stored item is checked against its CRC32C as
    it is read, so a load verifies exactly the bytes it uses, with no pass of its own."""

    def __init__(self, path, *args, checksums: Optional[dict] = None, **kwargs) -> None:
        super().__init__(path)
        self._trusted_metadata: Optional[Metadata] = None
        self._expected = None if checksums is None else {
            (item.get("file"), item.get("offset")): item for item in checksums["items"]}

    def _slice_file(self, file, sinfo):
        if self._expected is None:
            return super()._slice_file(file, sinfo)
        import google_crc32c

        where = Path(self.path) / sinfo.relative_path
        expected = self._expected.get((sinfo.relative_path, sinfo.offset))
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        if expected is None:
            raise CheckpointError(f"{where}: bytes {sinfo.offset}..{sinfo.offset + sinfo.length}"
                                  f" have no checksum in {CHECKSUMS}; refusing the checkpoint")
        if len(data) != sinfo.length or google_crc32c.value(data) != expected["crc32c"]:
            raise CheckpointError(f"{where}: tensor {expected['item']} fails its content checksum"
                                  f" (bytes {sinfo.offset}..{sinfo.offset + sinfo.length})")
        return io.BytesIO(data)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._trusted_metadata is None:
            self._trusted_metadata = read_dcp_metadata(self.path)
        return self._trusted_metadata


def one_line(err: BaseException) -> str:
    """'Type: first line of the message' (or just the type), at most 300 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (type(err).__name__ + (f": {lines[0]}" if lines else ""))[:300]


def first_failure(err: BaseException) -> BaseException:
    """The exception a rank raised inside torch.distributed.checkpoint, which wraps each in a
    CheckpointException's per-rank failures ((exception, stack) pairs); err itself if none."""
    for failure in (getattr(err, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return err


def read_common(ckpt: str | Path) -> dict:
    """Returns the checkpoint's common.pt (non-tensor state) read with the weights-only loader."""
    path = Path(ckpt) / COMMON
    common = weights_only_load(path, str(path))
    if not isinstance(common, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return common


def stored_tensors(ckpt: str | Path) -> dict:
    """{key: TensorStorageMetadata} (global size, dtype) of every tensor the checkpoint stores,
    from .metadata alone (no megatron-core, no process group: geno-convert inspect)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {key: meta for key, meta in read_dcp_metadata(ckpt).state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)}
