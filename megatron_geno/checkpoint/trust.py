"""The trust boundary of a torch_dist checkpoint directory (DESIGN decision 12): nothing read
from a checkpoint is executed.

- ``.metadata`` (torch.distributed.checkpoint's index, a pickle) is read with an unpickler that
  admits only the checkpoint metadata classes; anything else is refused naming the file.
- Pickled objects inside the data files (RNG state, extra state) and ``common.pt`` are read with
  torch's ``weights_only`` unpickler (tensors, containers, numbers, strings).
- Storage paths named in ``.metadata`` must be plain file names inside the directory.

``TrustedLoadStrategy`` is a subclass of megatron-core 0.16.1's torch_dist load strategy. Its
``load`` builds the reader and the planner inside the method with no hook to pass others, so
the subclass restates that method with ``TrustedReader`` and ``_TrustedPlanner`` in their place,
calling megatron-core's own key-mapping helpers (checked at import: ``_MCORE_HELPERS``). Nothing
of megatron-core is replaced, so a change in megatron-core cannot silently route a load around
the checks; the crafted-pickle tests in tests/faults load through it and fail if it is bypassed.
The integrity checks (checksums) are in megatron_geno.checkpoint.integrity.
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
from torch.distributed.checkpoint.api import CheckpointException
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
        raise CheckpointError(f"{what} is damaged or truncated ({_one_line(err)})") from None


# --------------------------------------------------------------------------------------------
# megatron-core load strategies that read through the above

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor  # noqa: E402
from megatron.core.dist_checkpointing.strategies import torch as _mcore_torch  # noqa: E402
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy  # noqa: E402

# megatron-core helpers TrustedLoadStrategy.load calls as megatron-core's own load does
_MCORE_HELPERS = ("MCoreLoadPlanner", "TorchDistLoadShardedStrategy", "nested_values",
                  "_replace_state_dict_keys_with_sharded_keys", "mcore_to_pyt_state_dict",
                  "_unwrap_pyt_sharded_tensor", "_replace_sharded_keys_with_state_dict_keys",
                  "_restore_dict_types")
_missing = [name for name in _MCORE_HELPERS if not hasattr(_mcore_torch, name)]
if _missing:
    raise ImportError(f"megatron_geno.checkpoint.trust: megatron.core.dist_checkpointing."
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


class TrustedLoadStrategy(_mcore_torch.TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load strategy, reading metadata and objects safely."""

    def load(self, sharded_state_dict, checkpoint_dir):
        """megatron-core 0.16.1's TorchDistLoadShardedStrategy.load with the trusted reader and
        planner (and without its multi-storage-client reader, which this project does not use)."""
        from torch.distributed import checkpoint

        m = _mcore_torch
        tensors = [t for t in m.nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        flexible = [t for t in tensors if not t.allow_shape_mismatch]
        mismatched = {t.key: t for t in tensors if t.allow_shape_mismatch}
        original = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = (
            m._replace_state_dict_keys_with_sharded_keys(sharded_state_dict))
        pyt_state_dict = m.mcore_to_pyt_state_dict(sharded_state_dict, True)
        reader = TrustedReader(checkpoint_dir)
        checkpoint.load_state_dict(pyt_state_dict, reader, planner=_TrustedPlanner(
            shapes_validation_sharded_tensors=flexible,
            allow_shape_mismatch_sharded_tensors=mismatched))
        self.cached_global_metadata = reader.read_metadata()
        state = {k: m._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        state = m._replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
        m._restore_dict_types(state, original)
        return state

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


