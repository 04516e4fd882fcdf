"""megatron-core's torch_dist save and load: saves checksum every item as it is written, loads read
through the trust boundary (megatron_geno.checkpoint.trust), both spread over the replica group.

``TrustedLoadStrategy`` is a subclass of megatron-core 0.16.1's torch_dist load strategy. Its
``load`` builds the reader and the planner inside the method with no hook to pass others, so
the subclass restates that method with ``TrustedReader`` and ``_TrustedPlanner`` in their place,
calling megatron-core's own key-mapping helpers (checked at import: ``_MCORE_HELPERS``). Nothing
of megatron-core is replaced, so a change in megatron-core cannot silently route a load around
the checks; the crafted-pickle tests in tests/faults load through it and fail if it is bypassed.

``ChecksummingSaveStrategy`` is megatron-core's torch_dist save with torch's own writer
transform hook computing each item's CRC32C on the bytes as they go to disk (integrity.
checksumming_transforms), so sealing a save reads nothing back. ``save_strategy`` and
``trusted_load`` wrap both in megatron-core's fully parallel wrappers over the data-parallel
(with context-parallel) group: replicated items are written by one rank of the group each and
read once, then exchanged.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies import torch as _mcore_torch
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

from megatron_geno.checkpoint.trust import (COMMON, CheckpointError, TrustedReader,
                                            first_failure, one_line, read_dcp_metadata,
                                            weights_only_load)

# megatron-core helpers TrustedLoadStrategy.load calls as megatron-core's own load does
_MCORE_HELPERS = ("MCoreLoadPlanner", "TorchDistLoadShardedStrategy", "nested_values",
                  "TorchDistSaveShardedStrategy", "FileSystemWriterAsync",
                  "_replace_state_dict_keys_with_sharded_keys", "mcore_to_pyt_state_dict",
                  "_unwrap_pyt_sharded_tensor", "_replace_sharded_keys_with_state_dict_keys",
                  "_restore_dict_types")
_missing = [name for name in _MCORE_HELPERS if not hasattr(_mcore_torch, name)]
if _missing:
    raise ImportError(f"megatron_geno.checkpoint.strategy: megatron.core.dist_checkpointing."
                      f"strategies.torch has no {_missing[0]} (megatron-core 0.16.1 expected)")


class _TrustedPlanner(_mcore_torch.MCoreLoadPlanner):
    """Checks each pickled object with the weights-only unpickler before the planner uses it."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        weights_only_load(value, f"checkpoint object {read_item.dest_index.fqn}")
        value.seek(0)  # admitted: only allow-listed globals, so the full load builds the same
        super().load_bytes(read_item, value)


class TrustedLoadStrategy(_mcore_torch.TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load strategy, reading metadata and objects safely; with
    checksums (checksums.json), every stored item is checked as it is read (TrustedReader)."""

    def __init__(self, checksums: Optional[dict] = None) -> None:
        super().__init__()
        self.checksums = checksums

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
        reader = TrustedReader(checkpoint_dir, checksums=self.checksums)
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


def trusted_load(sharded_state_dict: dict, ckpt: str | Path, checksums: Optional[dict] = None,
                 parallel_group=None, **kwargs) -> dict:
    """megatron-core's dist_checkpointing.load through the trusted strategies.

    checksums: checksums.json, checked item by item as the bytes are read (no separate pass).
    parallel_group: the ranks that hold replicas of the same tensors (the data-parallel group):
    each reads a share of them and megatron-core's FullyParallelLoadStrategyWrapper exchanges
    them, so no rank reads what another reads. Errors (damaged, truncated or refused files)
    become one-line CheckpointErrors.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper)

    strategy = TrustedLoadStrategy(checksums)
    if parallel_group is not None and parallel_group.size() > 1:
        strategy = FullyParallelLoadStrategyWrapper(strategy, parallel_group)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(ckpt),
                                       sharded_strategy=strategy,
                                       common_strategy=TrustedCommonStrategy(), **kwargs)
    except CheckpointError:
        raise
    except CheckpointException as err:  # a BaseException: would escape `except Exception`
        inner = first_failure(err)
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(f"cannot load checkpoint {ckpt} (damaged or truncated?): "
                              f"{one_line(inner)}") from None
    except Exception as err:
        raise CheckpointError(f"cannot load checkpoint {ckpt}: {one_line(err)}") from err


class _ChecksummingWriter(_mcore_torch.FileSystemWriterAsync):
    """megatron-core's torch_dist writer with every item checksummed as it is written
    (integrity.checksumming_transforms: torch's stream-transform hook; no byte changes)."""

    def __init__(self, *args, **kwargs) -> None:
        from megatron_geno.checkpoint.integrity import checksumming_transforms

        super().__init__(*args, **kwargs)
        self.transforms = checksumming_transforms()


class ChecksummingSaveStrategy(_mcore_torch.TorchDistSaveShardedStrategy):
    """megatron-core 0.16.1's torch_dist save strategy writing through _ChecksummingWriter.

    Its async_save builds the writer inside the method with no hook to pass another, so the
    class it names (``FileSystemWriterAsync`` in megatron.core.dist_checkpointing.strategies.
    torch, checked at import) is our subclass for the length of the call; everything else is
    megatron-core's own."""

    def async_save(self, sharded_state_dict, checkpoint_dir):
        stock = _mcore_torch.FileSystemWriterAsync
        _mcore_torch.FileSystemWriterAsync = _ChecksummingWriter
        try:
            return super().async_save(sharded_state_dict, checkpoint_dir)
        finally:
            _mcore_torch.FileSystemWriterAsync = stock


def save_strategy(parallel_group=None):
    """The save strategy of a training checkpoint: torch_dist, checksummed as written, and with
    parallel_group (the data-parallel group) megatron-core's FullyParallelSaveStrategyWrapper,
    which spreads the writing of replicated tensors (the model's weights, replicated over data
    parallelism) over the group instead of leaving it to data-parallel rank 0."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)

    strategy = ChecksummingSaveStrategy("torch_dist", 1)
    if parallel_group is not None and parallel_group.size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, parallel_group)
    return strategy
