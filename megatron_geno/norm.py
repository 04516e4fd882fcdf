"""RMSNorm for the local layer spec that supports sequence parallelism."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_geno.fusions import compiled, rms_norm


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 (as HuggingFace Mixtral does), weight marked for sequence parallelism.

    With sequence parallelism each TP rank normalises a different slice of the sequence, so the
    weight's gradient is partial; ``sequence_parallel=True`` on the parameter makes megatron-core's
    ``finalize_model_grads`` all-reduce it across the tensor-parallel group.
    ``fused=True`` (model.fusions) runs it as one compiled kernel (``megatron_geno.fusions``).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 fused: bool = False, **_unused):
        super().__init__()
        self.eps = eps
        self._norm = compiled("rms_norm") if fused else rms_norm
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight, self.eps)
