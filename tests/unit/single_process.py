"""A single-process gloo group with megatron-core's parallel state, for unit tests."""

import contextlib

from megatron_geno import distributed
from megatron_geno.config import TrainConfig


@contextlib.contextmanager
def single_process_groups(parallel, seed: int = 1234):
    distributed.initialize(TrainConfig(parallel=parallel), seed)
    try:
        yield
    finally:
        distributed.destroy()
