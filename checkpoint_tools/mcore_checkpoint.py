"""Read a geno-train torch_dist checkpoint a slice at a time, without building the model.

Opening one (common state, tensor shapes: `geno-convert inspect`) needs torch alone; reading a
whole tensor goes through megatron-core's loader, imported then, with a one-process group."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from checkpoint_tools.errors import ConversionError  # noqa: F401 - re-exported
from megatron_geno.checkpoint import trust
from megatron_geno.checkpoint.layout import (TE_KEY_ALIASES, open_for_loading,
                                             resolve_checkpoint_dir)
from megatron_geno.checkpoint.trust import CheckpointError
from megatron_geno.config import ModelConfig


def init_single_process() -> None:
    """A one-process gloo group (megatron-core's checkpoint I/O needs torch.distributed), with the
    CPU layer active when CUDA is absent (its writer synchronizes CUDA)."""
    from megatron_geno import cpu_layer
    from megatron_geno.distributed import free_port

    cpu_layer.activate()
    if torch.distributed.is_initialized():
        return

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )


@dataclass
class McoreCheckpoint:
    path: Path
    common: dict
    shapes: dict[str, tuple[int, ...]]  # by the local spec's names (layout.TE_KEY_ALIASES)
    dtypes: dict[str, torch.dtype]
    stored: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> stored name

    @property
    def model(self) -> ModelConfig:
        saved = self.common.get("model_config")
        if saved is None:
            raise ConversionError(f"{self.path}: no model_config in common.pt; not a geno-train checkpoint")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in saved.items() if k in known})

    @property
    def iteration(self) -> Optional[int]:
        return self.common.get("train_state", {}).get("iteration")

    def read(self, key: str) -> torch.Tensor:
        """Loads one tensor in its global (unsharded) form, e.g. all layers of a stacked key.

        megatron-core 0.16.1 cannot load part of a stored key from one process (it checks that
        the request covers every stored fragment), so the unit of reading is one key.
        """
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        from megatron_geno.checkpoint.strategy import trusted_load

        if key not in self.shapes:
            raise ConversionError(f"{self.path}: tensor {key} is missing from the checkpoint")
        init_single_process()
        data = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        stored = self.stored.get(key, key)
        request = {key: ShardedTensor.from_rank_offsets(stored, data, replica_id=0)}
        try:
            loaded = trusted_load(request, self.path, validate_access_integrity=False)
        except CheckpointError as err:
            raise ConversionError(f"cannot read tensor {key}: {err}") from err
        return loaded[key]


    def read_layer(self, key: str, layer: int) -> torch.Tensor:
        """Loads ``key[layer]`` alone: only the stored chunks that overlap that layer are read
        (torch.distributed.checkpoint with a planner asking for that region; megatron-core stores
        stacked layers as separate chunks, so one layer costs one layer's memory)."""
        from checkpoint_tools.torch_dist_writer import read_layer

        if key not in self.shapes:
            raise ConversionError(f"{self.path}: tensor {key} is missing from the checkpoint")
        try:
            return read_layer(self.path, self.stored.get(key, key), layer, self.shapes[key],
                              self.dtypes[key])
        except CheckpointError as err:
            raise ConversionError(f"cannot read tensor {key}: {err}") from err
        except (ValueError, RuntimeError, OSError) as err:  # DCP wraps reader errors
            raise ConversionError(f"{self.path}: cannot read layer {layer} of {key} "
                                  f"({str(err).strip().splitlines()[-1][:200]})") from None


def open_checkpoint(path: str | Path, iteration: Optional[int] = None,
                    verify_checksums: bool = True) -> McoreCheckpoint:
    """Returns the checkpoint's common state and tensor shapes (reads no tensor data, imports
    no megatron-core and starts no process group).

    The checkpoint passes the trust boundary first: restricted metadata, then (unless
    verify_checksums is False) every stored byte against its checksum.
    """
    try:
        ckpt = resolve_checkpoint_dir(path, iteration, fallback=False)
        common = open_for_loading(ckpt, verify_checksums)
        stored = trust.stored_tensors(ckpt)
    except CheckpointError as err:
        raise ConversionError(str(err)) from err
    names = {key: TE_KEY_ALIASES.get(key, key) for key in stored}  # by the local spec's names
    return McoreCheckpoint(ckpt, common,
                           {names[k]: tuple(v.size) for k, v in stored.items()},
                           {names[k]: v.properties.dtype for k, v in stored.items()},
                           {names[k]: k for k in stored if names[k] != k})
