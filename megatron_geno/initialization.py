"""Initial weights from the seed and each weight's global identity alone (DESIGN decision 16).

megatron-core draws initial weights from one RNG stream per process, so what a weight gets
depends on what the process built before it: at PP = 2 the second stage skips the first stage's
draws, and at EP = 2 every rank draws its local experts from the same stream (experts 4-7 were
copies of experts 0-3). Here every weight is drawn again from its checkpoint form: its key,
global shape and this rank's global offsets (megatron-core's sharded state dict, which already
knows every TP, PP, EP and CP layout). The values of a *slab* (one layer's weight, one expert of
one layer's weight, one row of the embedding or output layer) come from a generator seeded by
(seed, key, slab index) on the CPU and are sliced to this rank's part, so the iteration-0
checkpoint is the same at every layout and on every device, bit for bit.
"""

from __future__ import annotations

import hashlib
import itertools
import math

import torch

# norms start at one; the other weights are normal(0, std), the projections that write into the
# residual stream (attention output, expert fc2) with std / sqrt(2 x layers), as megatron-core's
# output_layer_init_method
_NORM_ENDINGS = ("layer_norm_weight", "layernorm.weight")
_SCALED = ("linear_proj.weight", "linear_fc2.weight")


def _slab_axes(key: str) -> int:
    """How many leading global axes index separately seeded slabs of this key."""
    if key.startswith("decoder.layers."):
        return 2 if ".experts." in key else 1  # layer (and expert)
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return 1  # vocabulary rows: a row does not depend on how far the vocabulary is padded
    return 0


def _seed(seed: int, key: str, index: tuple) -> int:
    digest = hashlib.sha256(f"{seed}:{key}:{','.join(map(str, index))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sharded_tensors(state: dict):
    """Every ShardedTensor of a model's sharded state dict, factories built into their pieces."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in nested_values(state):
        if isinstance(value, ShardedTensorFactory):
            yield from _sharded_tensors(
                {"pieces": value.build_fn(value.key, value.data, value.replica_id,
                                          value.flattened_range)})
        elif isinstance(value, ShardedTensor):
            yield value


@torch.no_grad()
def initialize_by_identity(chunks: list, seed: int, init_std: float, num_layers: int) -> None:
    """Overwrites every parameter of the model chunks with values that depend only on the seed
    and its global identity. RuntimeError if a parameter is not in the sharded state dict."""
    params = {p.untyped_storage().data_ptr(): name
              for chunk in chunks for name, p in chunk.named_parameters()}
    written = set()
    for chunk in chunks:
        for sh in _sharded_tensors(chunk.sharded_state_dict()):
            storage = sh.data.untyped_storage().data_ptr()
            if storage not in params:
                continue  # a buffer (RoPE frequencies), not a weight
            _fill(sh, seed, init_std, num_layers)
            written.add(storage)
    missing = sorted(name for storage, name in params.items() if storage not in written)
    if missing:
        raise RuntimeError(f"initialize_by_identity: no checkpoint form for {missing[:3]}")


def _fill(sh, seed: int, init_std: float, num_layers: int) -> None:
    key, data = sh.key, sh.data
    if key.endswith(_NORM_ENDINGS):
        data.fill_(1.0)
        return
    std = init_std / math.sqrt(2 * num_layers) if key.endswith(_SCALED) else init_std
    p, k = sh.prepend_axis_num, _slab_axes(sh.key)
    if p > k:
        raise RuntimeError(f"initialize_by_identity: {key} has {p} prepended axes, more than "
                           f"its {k} slab axes")
    shape, offset = sh.global_shape, sh.global_offset
    # this rank's extent on every global axis (a prepended axis holds one index)
    extent = [1] * p + list(data.shape)
    region = [range(offset[i], offset[i] + extent[i]) for i in range(len(shape))]
    rest = tuple(slice(r.start, r.stop) for r in region[k:])
    # drawn on the CPU whatever the device, so a GPU run starts from the CPU run's model too
    # (each device's generator draws other numbers); then copied to the parameter's device
    generator = torch.Generator(device="cpu")
    for index in itertools.product(*region[:k]):
        generator.manual_seed(_seed(seed, key, index))
        slab = torch.randn(shape[k:], generator=generator, dtype=torch.float32)
        target = data[tuple(i - offset[a] for a, i in zip(range(p, k), index[p:]))]
        target.copy_((slab[rest] * std).to(data.device))
