"""Core attention for the local (no Transformer Engine) layer spec: torch SDPA, GQA, causal, and
context parallelism (DESIGN decision 15).

Context parallelism (CP): megatron-core's batch split (``get_batch_on_this_cp_rank``) gives CP
rank r the sequence chunks r and 2CP-1-r of 2 x CP equal chunks (balanced causal work), and its
RoPE table is sliced the same way, so q and k arrive here with their global positions. Each rank
all-gathers K and V over the CP group with their GQA groups (megatron-core's sequence-parallel
gather: all-gather forward, reduce-scatter backward), puts the chunks back in global order, and
attends each local query chunk j to the keys of chunks 0..j with a bottom-right-aligned causal
mask. The gathered K/V are not kept for backward: autograd's saved-tensor hooks keep this rank's
chunks and gather again when the layer's backward needs them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_geno import cpu_layer


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA of q [b, h, sq, d] over k, v [b, g, sk, d] (sk >= sq), causal with the mask aligned
    bottom-right: query i sees keys up to sk - sq + i (the queries are the last sq positions).

    ``is_causal=True`` aligns top-left, which is wrong whenever sq != sk; it is used only for
    sq == sk. On CUDA, torch's ``causal_lower_right`` bias reaches the flash kernel; elsewhere
    the mask is explicit (CPU sizes)."""
    sq, sk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if sq == sk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                              scale=scale, enable_gqa=gqa)
    if q.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(sq, sk)
    else:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          scale=scale, enable_gqa=gqa)


def flash_refusal(heads: int, groups: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device) -> Optional[str]:
    """Why torch's flash attention would not run a context-parallel query chunk (``heads``
    query heads over ``groups`` key/value groups of ``head_dim``, in ``dtype``) on ``device``;
    None when it would. Elsewhere ``causal_lower_right`` falls back to efficient attention
    (no GQA) or to a materialised S x S mask, silently: at 128K+ that is no fallback at all."""
    import warnings

    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    q = torch.empty(1, heads, 128, head_dim, dtype=dtype, device=device)
    kv = torch.empty(1, groups, 256, head_dim, dtype=dtype, device=device)
    with warnings.catch_warnings(record=True) as reasons:
        warnings.simplefilter("always")
        ok = can_use_flash_attention(SDPAParams(q, kv, kv, None, 0.0, False, heads != groups),
                                     True)
    if ok:
        return None
    return "; ".join(str(w.message).strip() for w in reasons) or \
        f"torch {torch.__version__} has no flash attention for {device}"


def global_chunk_order(cp: int) -> torch.Tensor:
    """For global chunks 0..2CP-1, their positions in a CP all-gather (rank r contributes its
    chunks r and 2CP-1-r, in that order, at positions 2r and 2r+1)."""
    order = [0] * (2 * cp)
    for r in range(cp):
        order[r], order[2 * cp - 1 - r] = 2 * r, 2 * r + 1
    return torch.tensor(order)


def gather_global(x: torch.Tensor, group) -> torch.Tensor:
    """This CP rank's chunks x [s / CP, ...] all-gathered over ``group`` into global sequence
    order [s, ...] (backward: reduce-scatter of the gradient back to each rank's chunks)."""
    cp = group.size()
    gathered = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True,
                                                    group=group)
    chunks = gathered.view(2 * cp, x.shape[0] // 2, *x.shape[1:])
    return chunks[global_chunk_order(cp).to(x.device)].reshape(cp * x.shape[0], *x.shape[1:])


class _Regather:
    """A gathered K or V, known to autograd by its storage: kept as this rank's chunks and
    gathered again (once per backward) when a saved view of it is unpacked."""

    def __init__(self, local: torch.Tensor, full: torch.Tensor, group) -> None:
        self.local, self.group = local.detach(), group
        self.storage = full.untyped_storage().data_ptr()
        self.full: Optional[torch.Tensor] = None

    def get(self) -> torch.Tensor:
        if self.full is None:
            with torch.no_grad(), cpu_layer.in_backward():
                self.full = gather_global(self.local, self.group)
        return self.full


class _KeepLocalOnly(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that swap any saved view of the gathered K/V for a _Regather."""

    def __init__(self, regathers: list[_Regather]) -> None:
        def pack(t: torch.Tensor):
            for r in regathers:
                if t.untyped_storage().data_ptr() == r.storage:
                    return r, t.size(), t.stride(), t.storage_offset()
            return t

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            r, size, stride, offset = saved
            return r.get().as_strided(size, stride, offset)

        super().__init__(pack, unpack)


def context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               group, scale: Optional[float] = None,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of this CP rank's two query chunks over the whole sequence's keys.

    query [s/CP, b, h, d], key and value [s/CP, b, g, d] hold global chunks r and 2CP-1-r (in
    that order) of the CP rank r of ``group``; returns [s/CP, b, h, d] in the same order, equal
    to the rows of single-process causal attention over the whole sequence.
    """
    full_k, full_v = gather_global(key, group), gather_global(value, group)
    regathers = [_Regather(key, full_k, group), _Regather(value, full_v, group)]
    with _KeepLocalOnly(regathers):
        return attend_chunks(query, full_k, full_v, group.rank(), group.size(), scale, dropout_p)


def attend_chunks(query: torch.Tensor, full_k: torch.Tensor, full_v: torch.Tensor, rank: int,
                  cp: int, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """CP rank ``rank``'s query chunks r and 2CP-1-r (query [s/CP, b, h, d]) over the whole
    sequence's keys and values [s, b, g, d] (global order): [s/CP, b, h, d]. What one rank of
    ``context_parallel_attention`` computes once K and V are gathered (benchmarks/cp_attention.py
    runs it alone to emulate one rank of a long-context phase on one GPU)."""
    c = query.shape[0] // 2
    outs = []
    for half, chunk in enumerate((rank, 2 * cp - 1 - rank)):
        keys = (chunk + 1) * c  # this chunk and every one before it
        q = query[half * c:(half + 1) * c].permute(1, 2, 0, 3)
        k, v = (t[:keys].permute(1, 2, 0, 3) for t in (full_k, full_v))
        outs.append(causal_attention(q, k, v, scale, dropout_p))
    # [b, h, c, d] x 2 -> [s/CP, b, h, d]
    return torch.cat(outs, dim=2).permute(2, 0, 1, 3)


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's DotProductAttention using F.scaled_dot_product_attention.

    Takes query [sq, b, heads, d] and key/value [sk, b, groups, d] (grouped-query attention,
    no key/value repetition in memory) and returns [sq, b, heads x d]. Causal unless an explicit
    mask is given; a megatron-core mask marks *masked* positions with True. On GPU, torch picks
    the flash / memory-efficient kernels. With context parallelism, causal only
    (``context_parallel_attention``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(
                required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        sq, b = query.shape[0], query.shape[1]
        dropout = self.dropout_p if self.training else 0.0
        if self.cp_group is not None:
            if attention_mask is not None:  # the layout rules refuse reset_attention_mask + CP
                raise ValueError("SDPAttention with context parallelism is causal only; it takes "
                                 "no attention mask")
            out = context_parallel_attention(query, key, value, self.cp_group,
                                             self.softmax_scale, dropout)
            return out.reshape(sq, b, -1)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        if attention_mask is not None:
            mask, causal = ~attention_mask, False  # megatron: True = masked out
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=self.groups_per_partition != self.heads_per_partition,
        )
        # [b, h, s, d] -> [s, b, h x d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
