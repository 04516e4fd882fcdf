"""Context parallelism without Transformer Engine through geno-train (torchrun, gloo, fp32):
every layout with CP gives the single process's losses, a checkpoint moves between CP sizes,
and uneven loss masks across CP ranks give the single process's gradients."""

import json
from pathlib import Path

import pytest
import torch

from tests.functional.launcher import assert_close, geno_train, geno_train_logged, losses
from tests.ranks import run_on_ranks

STEPS = "schedule.train_iters=5"
GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "golden" / "tiny_cpu_fp32.json")
                    .read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single process's records (expert load included) from its own start: the golden
    losses."""
    records = geno_train(tmp_path_factory.mktemp("cp_single") / "run", STEPS)
    assert_close(losses(records), GOLDEN["losses"], rtol=1e-6)
    return records


@pytest.mark.parametrize(
    "name,layout,nproc,ran",
    [
        ("cp2", ["parallel.context_parallel=2"], 2, "TP=1 PP=1 CP=2 EP=1 DP=1"),
        ("cp4", ["parallel.context_parallel=4"], 4, "TP=1 PP=1 CP=4 EP=1 DP=1"),
        # the padded vocabulary is part of the model (128 x TP by default): fixed at one's
        ("tp2_sp_cp2", ["parallel.tensor_parallel=2", "parallel.context_parallel=2",
                        "model.padded_vocab_size=128"], 4, "TP=2 PP=1 CP=2 EP=1 DP=1 SP=True"),
        # recomputation re-runs the attention (and its K/V gather) inside the backward
        ("cp2_recompute_attention", ["parallel.context_parallel=2", "model.recompute=selective",
                                     "model.recompute_modules=[core_attn,moe]"], 2,
         "recompute=selective(core_attn,moe)"),
        # the 10B recipes' layout at tiny width, on 8 processes (CP with PP and with EP: the
        # pairs have no rows of their own, CI time being shared)
        ("tp2_pp2_cp2_ep2", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
                             "parallel.context_parallel=2", "parallel.expert_parallel=2",
                             "model.padded_vocab_size=128"], 8,
         "TP=2 PP=2 CP=2 EP=2 DP=1"),
    ],
)
def test_context_parallel_layout_matches_single_process(single, tmp_path, name, layout, nproc,
                                                        ran):
    """5 steps from the run's own start: the single process's losses (measured apart by about
    1e-7) and expert load (every rank's routed tokens counted)."""
    records, log = geno_train_logged(tmp_path / name, STEPS, *layout, nproc=nproc)
    assert ran in log and "spec=local+sdpa" in log
    assert_close(losses(records), losses(single), rtol=1e-5)
    for ours, theirs in zip(records, single):  # rank 0's stage: both layers, or PP2's first
        assert ours["expert_load"]
        for layer, shares in ours["expert_load"].items():
            assert shares == pytest.approx(theirs["expert_load"][layer], abs=2e-3), layer


def test_a_checkpoint_moves_across_cp_sizes(tmp_path):
    """Saved at CP2 after step 3, it continues at CP1 and at CP4 as the uninterrupted run."""
    golden = GOLDEN["losses"]
    ck = tmp_path / "ck_cp2"
    first = geno_train(tmp_path / "cp2", STEPS, "schedule.stop_after=3",
                       "parallel.context_parallel=2", f"checkpoint.save={ck}", nproc=2)
    assert_close(losses(first), golden[:3], rtol=1e-5)
    for cp, nproc in ((1, 1), (4, 4)):
        rest = geno_train(tmp_path / f"cp{cp}", STEPS, f"parallel.context_parallel={cp}",
                          f"checkpoint.load={ck}", nproc=nproc)
        assert_close(losses(rest), golden[3:], rtol=1e-5)


# ---- uneven loss masks: the gradients of one training step's schedule -------------------------

SEQ, MICRO, BATCHES = 64, 2, 2


def _batches() -> list[dict]:
    """Two micro-batches whose loss masks leave the CP ranks (at CP 2: rank 0 holds positions
    0-15 and 48-63, rank 1 holds 16-47) and the micro-batches very different token counts."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(BATCHES):
        tokens = torch.randint(5, 9, (MICRO, SEQ + 1), generator=g)
        mask = torch.ones(MICRO, SEQ)
        if i == 0:
            mask[:, 44:] = 0  # rank 0 keeps 16 of 32 positions, rank 1 28 of 32
        else:
            mask[0, 8:40] = 0
            mask[1, 20:] = 0
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
                    "position_ids": torch.arange(SEQ).expand(MICRO, SEQ).clone()})
    return out


def _step_gradients(rank: int, world: int, out: str, per_token: bool) -> None:
    """One step's schedule (forward_step, megatron-core's 1F1B, DDP, finalize_model_grads) at
    CP = world; rank 0 saves every parameter's reduced gradient."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_geno import distributed, model as model_module, train
    from megatron_geno.config import load_config
    from megatron_geno.model import build_model_chunks, wrap_ddp
    from megatron_geno.tokenizer import VOCAB_SIZE

    if not per_token:  # megatron-core's default: a mean per micro-batch and rank
        build = model_module.transformer_config

        def mean_per_rank(model, parallel, runtime):
            config = build(model, parallel, runtime)
            config.calculate_per_token_loss = False
            config.moe_aux_loss_coeff = model.moe_aux_loss_coeff
            config.moe_z_loss_coeff = model.moe_z_loss_coeff
            return config

        model_module.transformer_config = mean_per_rank
    cfg = load_config(None, [f"parallel.context_parallel={world}", f"data.seq_length={SEQ}",
                             f"data.micro_batch_size={MICRO}",
                             f"data.global_batch_size={MICRO * BATCHES}",
                             "parallel.distributed_optimizer=false", "precision=fp32"])
    distributed.initialize(cfg, seed=1234)
    (chunk,) = [wrap_ddp(c, cfg) for c in build_model_chunks(cfg, VOCAB_SIZE)]
    chunk.config.finalize_model_grads_func = finalize_model_grads
    chunk.config.no_sync_func = chunk.no_sync
    get_forward_backward_func()(
        forward_step_func=train.forward_step, data_iterator=iter(_batches()), model=chunk,
        num_microbatches=BATCHES, seq_length=SEQ, micro_batch_size=MICRO, forward_only=False)
    if rank == 0:
        torch.save({name: p.main_grad.clone() for name, p in chunk.named_parameters()}, out)
    distributed.destroy()


def _worst(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)).item()
               for k in b)


def test_uneven_loss_masks_across_cp_ranks_give_the_single_process_gradients(tmp_path):
    """Per-token loss (the sum over tokens, divided once by the global batch's count) makes
    CP 2 exact where CP ranks hold different numbers of scored tokens; megatron-core's default
    mean per micro-batch and rank does not (the check can fail)."""
    run_on_ranks(_step_gradients, 1, str(tmp_path / "cp1.pt"), True)
    run_on_ranks(_step_gradients, 2, str(tmp_path / "cp2.pt"), True)
    run_on_ranks(_step_gradients, 2, str(tmp_path / "cp2_mean.pt"), False)
    cp1, cp2, mean = (torch.load(tmp_path / f"{n}.pt") for n in ("cp1", "cp2", "cp2_mean"))
    assert cp1.keys() == cp2.keys() and len(cp1) > 10
    assert _worst(cp2, cp1) < 1e-5, _worst(cp2, cp1)
    assert _worst(mean, cp1) > 1e-2, _worst(mean, cp1)
