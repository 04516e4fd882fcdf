import torch
from megatron.core import parallel_state

from megatron_geno import distributed
from megatron_geno.config import TrainConfig


def test_finish_tears_down_every_group():
    """geno-train ends with finish(): a gloo group alive at interpreter exit aborts the process."""
    distributed.initialize(TrainConfig(), seed=1)
    assert torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()
    distributed.finish()
    assert not torch.distributed.is_initialized()
    assert not parallel_state.model_parallel_is_initialized()
    distributed.finish()  # a second call (or one after an error teardown) is harmless
