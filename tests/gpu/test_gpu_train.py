"""Single-GPU runs (skipped without CUDA): tiny and a 2-layer genos-1.2b train in bf16, loss falls."""

import pytest
import torch

from tests.functional.launcher import geno_train, geno_train_logged, losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("tiny", ["--preset", "tiny"]),
        ("genos_1_2b_2_layers", ["--preset", "genos-1.2b", "model.num_layers=2",
                                 "data.seq_length=1024", "data.micro_batch_size=1"]),
    ],
)
def test_single_gpu_bf16_loss_falls(tmp_path, name, overrides):
    records = geno_train(tmp_path / name, *overrides, "schedule.train_iters=30", "precision=bf16",
                         "optimizer.lr=1e-3")
    values = losses(records)
    assert sum(values[-5:]) / 5 < 0.9 * sum(values[:5]) / 5, values
    assert records[-1]["tokens_per_s"] > 0


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="torch._grouped_mm in bf16 needs sm90 (H100/H200) or newer")
def test_grouped_experts_run_on_the_gpu_and_loss_falls(tmp_path):
    """The fast path actually runs (not a silent fallback): grouped experts, compiled fusions
    (model.fusions=auto is on with CUDA) and torch's fused AdamW (optimizer.fused=auto); its peak
    memory is what the memory plan says."""
    overrides = ["model.num_layers=2", "data.seq_length=1024", "data.micro_batch_size=1",
                 "schedule.train_iters=30", "precision=bf16", "model.moe_grouped_gemm=on",
                 "model.attention_backend=sdpa"]
    records, log = geno_train_logged(tmp_path / "run", "--preset", "genos-1.2b", *overrides)
    assert "experts=grouped" in log and "dtype=torch.bfloat16" in log
    assert "fusions=on" in log and "adam=fused" in log
    values = losses(records)
    assert sum(values[-5:]) / 5 < 0.9 * sum(values[:5]) / 5, values
    # the memory plan (launch/plan.py) against the allocator's peak: within the headroom the
    # recipes are sized with, and not so high that it wastes the GPU
    from launch.plan import HEADROOM, memory_per_gpu
    from megatron_geno.config import load_config

    planned = sum(memory_per_gpu(load_config(None, ["model.preset=genos-1.2b", *overrides]),
                                 1, 1).values()) / 2**30
    peak = max(r["peak_memory_gib"] for r in records)
    assert 0.8 * planned <= peak <= planned / (1 - HEADROOM), (peak, planned)
