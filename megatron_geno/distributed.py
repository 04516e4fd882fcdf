"""Process groups and seeds: torch.distributed, then megatron-core's model-parallel groups."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_geno import cpu_layer
from megatron_geno.config import TrainConfig


def free_port() -> int:
    """Returns a TCP port on localhost that is free right now, drawn at random below the
    kernel's ephemeral range: the ports gloo and other clients are given come from that range,
    so none of them takes this one between now and the rendezvous binding it (concurrent runs
    on one machine, e.g. parallel test workers, each draw their own)."""
    import random

    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the range is crowded: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize(cfg: TrainConfig, seed: int) -> None:
    """Initializes torch.distributed (torchrun's env, or a single local process), checks the
    layout against the world size (megatron_geno.layout), then builds megatron-core's groups."""
    from megatron_geno.layout import validate_layout

    cpu_layer.activate()
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # torchrun / srun set the rendezvous in the environment; alone, we are one local process
        launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ
        torch.distributed.init_process_group(
            backend=cpu_layer.backend(),
            timeout=timedelta(minutes=10),
            **({} if launched else {"init_method": f"tcp://127.0.0.1:{free_port()}",
                                    "rank": 0, "world_size": 1}),
        )
    validate_layout(cfg, torch.distributed.get_world_size())
    parallel = cfg.parallel
    etp = parallel.expert_tp()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_size(),
            context_parallel_size=parallel.context_parallel,
            expert_model_parallel_size=parallel.expert_parallel,
            expert_tensor_parallel_size=etp,
        )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seeds every process the same way (DP ranks must start from identical weights)."""
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy() -> None:
    """Tears down mcore groups and the default process group."""
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def finish() -> None:
    """Ends a run that every rank completed: waits for all ranks, then tears the groups down.

    Skipping this is not harmless: gloo's worker threads outlive a process group that is still
    alive at interpreter exit, and the process then dies with SIGABRT ("terminate called without
    an active exception") after its work is done, so torchrun reports a failed run.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    destroy()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
