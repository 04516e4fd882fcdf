"""Runs a test function on N local processes over gloo (the CPU layer active), as OLMo-core's
testing helper does: each process calls fn(rank, world, *args); an exception in any rank fails
the test with that rank's traceback."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from megatron_geno.distributed import free_port


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron_geno import cpu_layer

    cpu_layer.activate()
    try:
        fn(rank, world, *args)
    finally:
        if torch.distributed.is_initialized():  # fn may have torn its groups down itself
            torch.distributed.destroy_process_group()


def run_on_ranks(fn, world: int, *args) -> None:
    """Calls fn(rank, world, *args) in `world` spawned processes with a gloo group."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def cp_chunks(t: torch.Tensor, group) -> torch.Tensor:
    """This CP rank's chunks of t [s, ...] (sequence first), cut by megatron-core's batch split
    (which takes [b, s])."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank({"x": t.transpose(0, 1)},
                                     cp_group=group)["x"].transpose(0, 1).contiguous()
