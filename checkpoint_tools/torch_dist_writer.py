"""Write a megatron-core torch_dist checkpoint one chunk at a time (bounded memory).

megatron-core's ``dist_checkpointing.save`` takes the whole state dict in one call. This writer
produces the same on-disk format -- a torch.distributed.checkpoint directory (``.metadata`` plus
``__0_0.distcp`` with each chunk ``torch.save``d at a recorded byte range), megatron's
``metadata.json`` and ``common.pt`` -- while holding a single chunk in memory. geno-train and
``McoreCheckpoint`` load it like any other checkpoint.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

DATA_FILE = "__0_0.distcp"
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


class TorchDistWriter:
    """Appends tensor chunks to a torch_dist checkpoint directory; ``finish`` writes metadata."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.data = (directory / DATA_FILE).open("wb")
        self.tensors: dict[str, TensorStorageMetadata] = {}
        self.storage: dict[MetadataIndex, _StorageInfo] = {}

    def add(self, key: str, chunk: torch.Tensor, offsets: tuple[int, ...],
            global_shape: tuple[int, ...]) -> None:
        """Stores ``chunk`` as the region of ``key`` starting at ``offsets``."""
        if len(offsets) != chunk.dim() or len(global_shape) != chunk.dim():
            raise ValueError(f"{key}: offsets {offsets} / shape {global_shape} vs chunk {tuple(chunk.shape)}")
        meta = self.tensors.setdefault(key, TensorStorageMetadata(
            properties=TensorProperties(dtype=chunk.dtype), size=torch.Size(global_shape), chunks=[]))
        if meta.properties.dtype != chunk.dtype or tuple(meta.size) != tuple(global_shape):
            raise ValueError(f"{key}: chunks disagree on dtype or global shape")
        chunk = chunk.contiguous()
        if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
            chunk = chunk.clone()  # torch.save of a view would write its whole storage
        buffer = io.BytesIO()
        torch.save(chunk, buffer)
        start = self.data.tell()
        self.data.write(buffer.getbuffer())
        meta.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=chunk.shape))
        self.storage[MetadataIndex(key, torch.Size(offsets))] = _StorageInfo(
            relative_path=DATA_FILE, offset=start, length=self.data.tell() - start)

    def finish(self, common: dict) -> None:
        """Writes .metadata, metadata.json and common.pt; checks every key is fully covered."""
        self.data.close()
        for key, meta in self.tensors.items():
            covered = sum(int(c.sizes.numel()) for c in meta.chunks)
            if covered != meta.size.numel():
                raise ValueError(f"{key}: chunks cover {covered} of {meta.size.numel()} elements")
        metadata = Metadata(state_dict_metadata=dict(self.tensors), storage_data=dict(self.storage))
        with (self.directory / ".metadata").open("wb") as f:
            pickle.dump(metadata, f)
        torch.save(common, self.directory / "common.pt")
        (self.directory / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
