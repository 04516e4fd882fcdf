"""Context-parallel attention without Transformer Engine (megatron_geno.attention) against the
single-process causal attention over the whole sequence, on 2 and 4 gloo processes in fp32."""

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from megatron_geno import attention
from megatron_geno.distributed import free_port
from tests.ranks import cp_chunks, run_on_ranks


def test_a_query_chunk_attends_its_key_prefix_aligned_bottom_right():
    """The last 8 of 24 positions attending all 24 keys are the last rows of full causal
    attention; is_causal=True with 8 queries and 24 keys aligns top-left and is not."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 8) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    chunk = attention.causal_attention(q[:, :, 16:], k, v)
    torch.testing.assert_close(chunk, full[:, :, 16:], rtol=0, atol=1e-6)
    top_left = F.scaled_dot_product_attention(q[:, :, 16:], k, v, is_causal=True)
    assert (top_left - full[:, :, 16:]).abs().max() > 0.1
    # GQA: 4 query heads over 2 key/value groups, as the model calls it
    kg, vg = k[:, :2], v[:, :2]
    full = F.scaled_dot_product_attention(q, kg, vg, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attention.causal_attention(q[:, :, 16:], kg, vg),
                               full[:, :, 16:], rtol=0, atol=1e-6)


def test_global_chunk_order_inverts_megatron_cores_batch_split():
    """Gathering every rank's chunks (megatron-core's get_batch_on_this_cp_rank) in rank order,
    then taking global_chunk_order, gives the positions 0..s-1 back."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    class Group:  # what the split reads of a process group
        def __init__(self, size, rank):
            self._size, self._rank = size, rank

        def size(self):
            return self._size

        def rank(self):
            return self._rank

    # the split reads a group's size and rank only once torch.distributed is up (an earlier
    # test of the session may have left it up)
    started = not torch.distributed.is_initialized()
    if started:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for cp in (2, 3, 4):
            s = 2 * cp * 3
            positions = torch.arange(s)[None]
            gathered = torch.cat([get_batch_on_this_cp_rank({"x": positions.clone()},
                                                            cp_group=Group(cp, r))["x"][0]
                                  for r in range(cp)])
            assert gathered.tolist() != list(range(s))  # the split does reorder
            chunks = gathered.view(2 * cp, -1)[attention.global_chunk_order(cp)]
            assert chunks.reshape(-1).tolist() == list(range(s))
    finally:
        if started:
            torch.distributed.destroy_process_group()


class _SavesInputs(torch.autograd.Function):
    """Causal attention that keeps its query, key and value inputs themselves for backward, as
    flash attention does (torch's CPU kernels keep copies), so a kept gathered K/V would show."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return _eager_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = _eager_attention(*inputs)
        return torch.autograd.grad(out, inputs, grad)


def _eager_attention(q, k, v):
    sq, sk = q.shape[-2], k.shape[-2]
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _saves_inputs_attention(q, k, v, scale=None, dropout_p=0.0):
    return _SavesInputs.apply(q, k, v)


def _parity_on_rank(rank: int, world: int) -> None:
    group = torch.distributed.new_group(list(range(world)))
    for heads, groups in ((4, 2), (4, 4)):
        torch.manual_seed(0)  # every rank draws the same whole-sequence tensors
        s, b, d = 12 * world, 2, 8
        q, go = torch.randn(s, b, heads, d), torch.randn(s, b, heads, d)
        k, v = torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
        whole = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in whole),
                                             is_causal=True, enable_gqa=heads != groups)
        torch.autograd.backward(ref.permute(2, 0, 1, 3), go)
        mine = [cp_chunks(t, group).requires_grad_() for t in (q, k, v)]
        out = attention.context_parallel_attention(*mine, group)
        torch.autograd.backward(out, cp_chunks(go, group))
        torch.testing.assert_close(out, cp_chunks(ref.permute(2, 0, 1, 3), group),
                                   rtol=0, atol=1e-5)
        for name, local, full in zip("qkv", mine, whole):
            torch.testing.assert_close(local.grad, cp_chunks(full.grad, group), rtol=0, atol=1e-5,
                                       msg=lambda m, n=name: f"d{n} on rank {rank}: {m}")


def _gathered_kv_on_rank(rank: int, world: int, hooks: bool) -> None:
    """After the forward, no gathered K/V is alive (only this rank's chunks are kept); the
    backward gathers each once more and still gives the single-process gradients. Without the
    saved-tensor hooks (hooks=False) the gathered K/V stay alive: the check can fail."""
    group = torch.distributed.new_group(list(range(world)))
    gathered, calls = [], []
    real = attention.gather_global, attention.causal_attention, attention._KeepLocalOnly

    def spy(x, grp):
        out = real[0](x, grp)
        gathered.append(weakref.ref(out if out._base is None else out._base))  # the storage's
        calls.append(x.shape)
        return out

    attention.gather_global, attention.causal_attention = spy, _saves_inputs_attention
    if not hooks:
        attention._KeepLocalOnly = lambda regathers: contextlib.nullcontext()
    try:
        torch.manual_seed(1)
        s, b, h, d = 8 * world, 1, 2, 4
        q, k, v, go = (torch.randn(s, b, h, d) for _ in range(4))
        whole = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in whole),
                                             is_causal=True)
        torch.autograd.backward(ref.permute(2, 0, 1, 3), go)
        mine = [cp_chunks(t, group).requires_grad_() for t in (q, k, v)]
        out = attention.context_parallel_attention(*mine, group)
        gc.collect()
        alive = [ref() is not None for ref in gathered]
        assert alive == [not hooks] * 2, f"gathered K/V alive after the forward: {alive}"
        torch.autograd.backward(out, cp_chunks(go, group))
        assert len(calls) == (4 if hooks else 2)  # with hooks: K and V once more in backward
        for local, full in zip(mine, whole):
            torch.testing.assert_close(local.grad, cp_chunks(full.grad, group), rtol=0, atol=1e-5)
    finally:
        attention.gather_global, attention.causal_attention, attention._KeepLocalOnly = real


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_attention_matches_one_process(world):
    """Output and q/k/v gradients within 1e-5 (fp32) of causal attention over the whole sequence,
    with GQA (4 heads, 2 groups) and without, at CP 2 and 4."""
    run_on_ranks(_parity_on_rank, world)


@pytest.mark.parametrize("hooks", [True, False])
def test_gathered_keys_and_values_are_not_kept_for_backward(hooks):
    run_on_ranks(_gathered_kv_on_rank, 2, hooks)


def test_a_gpu_run_refuses_chunks_flash_attention_will_not_take(monkeypatch):
    """On a GPU, CP on the local attention checks at start-up that torch's flash kernel takes
    the query chunks (else torch would materialise an S x S mask) and refuses in one line."""
    from megatron_geno import train
    from megatron_geno.config import ConfigError, load_config
    from megatron_geno.runtime import Machine, resolve

    assert attention.flash_refusal(4, 2, 16, torch.float32, torch.device("cpu"))  # a reason
    asked = []
    monkeypatch.setattr(train, "flash_refusal", lambda *a: asked.append(a) or "head dim 512")
    gpu = Machine.gpu_node(transformer_engine=False)
    cpu = torch.device("cpu")  # stands in for the GPU: flash_refusal is the stand-in above
    whole = load_config(None, ["model.preset=genos-10b"])
    train.check_context_parallel_kernel(whole, resolve(whole, gpu), cpu)
    assert asked == []  # CP = 1: nothing to check
    cfg = load_config(None, ["model.preset=genos-10b", "parallel.context_parallel=2",
                             "parallel.tensor_parallel=2", "model.attention_backend=sdpa"])
    with pytest.raises(ConfigError, match="needs torch's flash attention for 8 heads over 4 "
                                          "key/value groups of dim 256 .*head dim 512"):
        train.check_context_parallel_kernel(cfg, resolve(cfg, gpu), cpu)
