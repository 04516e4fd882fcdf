"""The distributed optimizer's state as every rank saves and loads it: its own shard, in model
space, with no gather (DESIGN decision 21).

megatron-core's distributed optimizer gives each data-parallel rank a contiguous range of its
model-parallel shard's flat gradient buffer; one parameter's part of that range is a flat slice
of the parameter. megatron-core 0.16.1 offers three ways to checkpoint it:

- ``fully_reshardable`` (what this project saved until 2026-12-05): gathers the whole state of
  a model-parallel shard on data-parallel rank 0, which writes it all;
- ``dp_reshardable``: each rank writes its own flat buffer slices, but the checkpoint reshards
  only across data parallelism (the buffers' layout depends on TP/PP/EP);
- ``fully_sharded_model_space``: each rank writes its own slice of each parameter, as a
  ``flattened_range`` ShardedTensor, which its torch_dist strategy no longer accepts
  ("ShardedTensor.flattened_range is not supported").

Here each rank's flat slice of a parameter is cut into the few rectangular boxes it covers (a
partial row, whole rows, a partial row, recursively), and each box is an ordinary ShardedTensor
of the parameter's global tensor, saved through megatron-core's uneven-sharding support
(``axis_fragmentations=None``, torch >= 2.6). The keys and global shapes are exactly those of
``fully_reshardable`` (``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``); only the
chunking differs, so a checkpoint of either format loads into this one at any TP/PP/EP/CP/DP, each
rank reading the stored chunks that overlap its own boxes. Every box is a view of the optimizer's
own state tensors: building the request copies nothing, and a load writes in place.
"""

from __future__ import annotations

from math import prod

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_geno.checkpoint.trust import CheckpointError

SHARDING = "model_space_boxes"
_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def flat_range_boxes(shape: tuple, start: int, end: int) -> list[tuple[tuple, tuple]]:
    """[(offset, box shape)] of the rectangular boxes that cover the row-major flat range
    [start, end) of a tensor of `shape`, in flat order (each box is itself a flat sub-range)."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))] if shape else [((), ())]
    inner = prod(shape[1:])
    first, last = start // inner, (end - 1) // inner
    if first == last:  # within one row
        return [((first, *offset), (1, *size)) for offset, size in
                flat_range_boxes(shape[1:], start - first * inner, end - first * inner)]
    boxes = []
    if start % inner:
        boxes += [((first, *offset), (1, *size)) for offset, size in
                  flat_range_boxes(shape[1:], start % inner, inner)]
        first += 1
    whole_end = end // inner
    if whole_end > first:
        boxes.append(((first,) + (0,) * (len(shape) - 1), (whole_end - first, *shape[1:])))
    if end % inner:
        boxes += [((whole_end, *offset), (1, *size)) for offset, size in
                  flat_range_boxes(shape[1:], 0, end % inner)]
    return boxes


def _contiguous_blocks(view: torch.Tensor) -> tuple[int, list[int]]:
    """(k, bases): view's dims k.. are contiguous in its storage; bases[i] is the storage offset
    of the i-th (row-major) index over dims :k, whose block covers prod(shape[k:]) elements."""
    shape, strides = view.shape, view.stride()
    k, expected = len(shape), 1
    while k > 0 and (shape[k - 1] == 1 or strides[k - 1] == expected):
        expected *= shape[k - 1]
        k -= 1
    bases = [view.storage_offset()]
    for dim in range(k):
        bases = [b + i * strides[dim] for b in bases for i in range(shape[dim])]
    if len(bases) > 1 << 20:
        raise CheckpointError(f"optimizer state: a parameter piece of shape {tuple(shape)} is "
                              f"too fragmented to save in model space")
    return k, bases


def _pieces(sharded) -> list[ShardedTensor]:
    """The ShardedTensors a model parameter is stored as: itself, or what its factory builds
    (on a meta tensor of the parameter's shape: the views tell where each piece lies)."""
    if not isinstance(sharded, ShardedTensorFactory):
        return [sharded]
    meta = torch.empty(sharded.data.shape, dtype=sharded.data.dtype, device="meta")
    built = sharded.build_fn(sharded.key, meta, sharded.replica_id, None)
    pieces = built if isinstance(built, list) else [built]
    if not all(isinstance(p, ShardedTensor) for p in pieces):
        raise CheckpointError(f"optimizer state: the factory of {sharded.key} builds something "
                              f"other than tensors")
    return pieces


def _boxes(sharded, shape: tuple, start: int, end: int):
    """(piece, offset in the piece, box shape, flat start in the parameter) for every box of
    the parameter's flat range [start, end) (parameter of `shape`), over its stored pieces."""
    found = []
    for piece in _pieces(sharded):
        data = piece.data
        if data.device.type == "meta":
            view = data
        else:  # a plain ShardedTensor: the parameter itself, contiguous
            view = torch.empty(shape, device="meta")
        k, bases = _contiguous_blocks(view)
        block_shape = tuple(view.shape[k:])
        inner = prod(block_shape)
        for index, base in enumerate(bases):
            lo, hi = max(start, base), min(end, base + inner)
            if lo >= hi:
                continue
            prefix = []
            for dim in reversed(range(k)):
                index, i = divmod(index, view.shape[dim])
                prefix.insert(0, i)
            for offset, size in flat_range_boxes(block_shape, lo - base, hi - base):
                flat = base + sum(o * s for o, s in zip(offset, _row_major_strides(block_shape)))
                found.append((piece, (*prefix, *offset), ((1,) * k + tuple(size)), flat))
    return found


def _row_major_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.insert(0, step)
        step *= n
    return tuple(strides)


def _param_ranges(sub):
    """(model parameter, its range [start, end) on this rank) in megatron-core's order."""
    for gbuf_range_maps in sub.gbuf_ranges:
        for per_bucket in gbuf_range_maps.values():
            for gbuf_range_map in per_bucket:
                for model_param, ranges in gbuf_range_map["param_map"].items():
                    yield model_param, ranges["param"].start, ranges["param"].end


def _model_metadata(model_sharded_state_dict: dict) -> dict:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    return {sh.data: sh for sh in nested_values(tensors)}


def _sub_state(sub, model_meta: dict, is_loading: bool) -> dict:
    """One DistributedOptimizer's sharded state: its plain state dict (param groups) and, per
    parameter, per state tensor, its boxes."""
    if is_loading:  # allocates the state the load writes into, as megatron-core does
        sub.load_state_dict(sub.state_dict())
    state = sub.state_dict()
    param_state = {}
    for idx, (model_param, start, end) in enumerate(_param_ranges(sub)):
        try:
            sharded = model_meta[model_param]
        except KeyError:
            raise CheckpointError("optimizer state: a parameter has no entry in the model's "
                                  "sharded state dict") from None
        tensors = sub._get_main_param_and_optimizer_states(model_param)
        boxes = _boxes(sharded, tuple(model_param.shape), start, end)
        entry = {}
        for key in _STATE_KEYS:
            flat = tensors[key].view(-1)
            entry[key] = {}
            for n, (piece, offset, size, flat_start) in enumerate(boxes):
                # megatron-core's uneven-sharding path takes no prepended axes: the box carries
                # them as leading axes of length one
                p = piece.prepend_axis_num
                full = (1,) * p + tuple(size)
                data = flat[flat_start - start:flat_start - start + prod(size)].view(full)
                entry[key][n] = ShardedTensor(
                    key=f"optimizer.state.{key}.{piece.key}", data=data, dtype=data.dtype,
                    local_shape=full, global_shape=piece.global_shape,
                    global_offset=(*piece.global_offset[:p],
                                   *(g + o for g, o in zip(piece.global_offset[p:], offset))),
                    axis_fragmentations=None,
                    replica_id=(*piece.replica_id[:2], 0) if isinstance(piece.replica_id, tuple)
                    else 0)
        param_state[idx] = entry
    state["param_state"] = param_state
    state["param_state_sharding_type"] = SHARDING
    return state


def _subs(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return all(isinstance(sub, DistributedOptimizer) for sub in _subs(optimizer))


def sharded_optimizer_state(optimizer, model_sharded_state_dict: dict,
                            is_loading: bool = False) -> dict:
    """The optimizer's sharded state dict in this module's form (a chain of optimizers as
    {index: state}, as megatron-core's ChainedOptimizer does, with layout-free keys)."""
    meta = _model_metadata(model_sharded_state_dict)
    states = [_sub_state(sub, meta, is_loading) for sub in _subs(optimizer)]
    return states[0] if len(states) == 1 else dict(enumerate(states))


def loaded_into_place(optimizer, request: dict, loaded: dict) -> None:
    """Copies the loaded boxes into the optimizer's state tensors (the request's views; a load
    that returns other tensors, such as the fully parallel load's exchange, is copied), and
    leaves in ``loaded`` what megatron-core's load_state_dict takes for it."""
    subs = _subs(optimizer)
    for i in range(len(subs)):
        asked = request if len(subs) == 1 else request[i]
        got = loaded if len(subs) == 1 else loaded[i]
        flat_state = {}
        for idx, entry in asked["param_state"].items():
            for key, boxes in entry.items():
                for n, sharded in boxes.items():
                    value = got["param_state"][idx][key][n]
                    if value.data_ptr() != sharded.data.data_ptr():
                        sharded.data.copy_(value)
        for idx, (model_param, _, _) in enumerate(_param_ranges(subs[i])):
            tensors = subs[i]._get_main_param_and_optimizer_states(model_param)
            flat_state[idx] = {"fp32_param": tensors["param"],
                               **{k: tensors[k] for k in _STATE_KEYS[1:]}}
        got["param_state"] = flat_state
        got["param_state_sharding_type"] = "fully_sharded_model_space"
