"""A megatron-core torch_dist checkpoint, written and read a chunk at a time through
torch.distributed.checkpoint's public API (bounded memory).

megatron-core's ``dist_checkpointing.save`` takes the whole state dict in one call. Here
``torch.distributed.checkpoint.save`` runs with a planner whose write items are the chunks
geno-train itself stores (one per layer, or per layer and expert) and whose ``resolve_data``
produces each chunk only when the writer asks for it (one writer thread: in plan order, one chunk
in memory). Beside the DCP directory (``.metadata``, ``__0_0.distcp``) go megatron-core's
``metadata.json`` and ``common.pt``. ``read_layer`` loads one layer of a stored key with a load
planner that asks only for the stored chunks overlapping it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, ReadItem,
                                                  SavePlan, SavePlanner, TensorWriteData,
                                                  WriteItem, WriteItemType)

# TrustedReader: .metadata through the restricted unpickler
from megatron_geno.checkpoint.trust import TrustedReader, first_failure

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


@dataclass
class Chunk:
    """One stored region of a key: where it sits in the global tensor, and how to make it."""

    key: str
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


class _ChunkSavePlanner(SavePlanner):
    def __init__(self, chunks: list[Chunk]) -> None:
        self.chunks = {MetadataIndex(c.key, torch.Size(c.offsets)): c for c in chunks}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        return SavePlan([WriteItem(
            index=index, type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets),
                                           sizes=torch.Size(c.shape)),
                properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape)))
            for index, c in self.chunks.items()])

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        return create_default_global_save_plan(all_plans, rewrite_index_hints=False)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        chunk = self.chunks[write_item.index]
        tensor = chunk.produce()
        if tuple(tensor.shape) != tuple(chunk.shape) or tensor.dtype != chunk.dtype:
            raise ValueError(f"{chunk.key} at {chunk.offsets}: produced {tuple(tensor.shape)} "
                             f"{tensor.dtype}, planned {chunk.shape} {chunk.dtype}")
        return tensor.contiguous()


class _Writer(dcp.FileSystemWriter):
    """FileSystemWriter recording no storage identity in .metadata (its path object is not one of
    the classes a checkpoint's metadata may hold; geno-train's own saves record none either)."""

    def storage_meta(self):
        return None


def write_torch_dist(directory: Path, chunks: list[Chunk], common: dict) -> None:
    """Writes a torch_dist checkpoint holding the chunks (each key fully covered) and common."""
    covered: dict[str, int] = {}
    for c in chunks:
        if not (len(c.offsets) == len(c.shape) == len(c.global_shape)):
            raise ValueError(f"{c.key}: offsets {c.offsets} / shape {c.global_shape} vs chunk "
                             f"{c.shape}")
        covered[c.key] = covered.get(c.key, 0) + int(torch.Size(c.shape).numel())
    for c in chunks:
        total = int(torch.Size(c.global_shape).numel())
        if covered[c.key] != total:
            raise ValueError(f"{c.key}: chunks cover {covered[c.key]} of {total} elements")
    directory.mkdir(parents=True, exist_ok=True)
    writer = _Writer(str(directory), single_file_per_rank=True, sync_files=True, thread_count=1)
    try:
        dcp.save({}, storage_writer=writer, planner=_ChunkSavePlanner(chunks), no_dist=True)
    except CheckpointException as err:  # DCP wraps what a chunk's producer raised
        raise first_failure(err) from None
    torch.save(common, directory / "common.pt")
    (directory / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))


class _LayerLoadPlanner(LoadPlanner):
    """Reads key[layer] into `out`: one read item per stored chunk that overlaps the layer."""

    def __init__(self, key: str, layer: int, out: torch.Tensor) -> None:
        self.key, self.layer, self.out = key, layer, out[None]  # [1, ...] at (layer, 0, ...)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items, filled = [], 0
        dest = MetadataIndex(self.key, torch.Size((self.layer,) + (0,) * (self.out.dim() - 1)))
        for chunk in self.metadata.state_dict_metadata[self.key].chunks:
            first, count = chunk.offsets[0], chunk.sizes[0]
            if not first <= self.layer < first + count:
                continue
            lengths = torch.Size((1, *chunk.sizes[1:]))
            items.append(ReadItem(
                type=LoadItemType.TENSOR, dest_index=dest,
                dest_offsets=torch.Size((0, *chunk.offsets[1:])),
                storage_index=MetadataIndex(self.key, chunk.offsets),
                storage_offsets=torch.Size((self.layer - first,) + (0,) * (len(lengths) - 1)),
                lengths=lengths))
            filled += lengths.numel()
        if filled != self.out.numel():
            raise ValueError(f"stored chunks of {self.key} do not cover layer {self.layer}")
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise ValueError(f"{self.key}: unexpected bytes item")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        region = self.out
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            region = region.narrow(dim, start, length)
        return region

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of `out`: the data is in place


def read_layer(directory: Path, key: str, layer: int, global_shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
    """key[layer] of a torch_dist checkpoint, reading only the stored chunks that overlap it."""
    out = torch.empty(global_shape[1:], dtype=dtype)
    try:
        dcp.load({}, storage_reader=TrustedReader(str(directory)),
                 planner=_LayerLoadPlanner(key, layer, out), no_dist=True)
    except CheckpointException as err:
        raise first_failure(err) from None
    return out
