"""Single-GPU runs (skipped without CUDA): tiny and a 2-layer genos-1.2b train in bf16, loss falls."""

import pytest
import torch

from tests.functional.launcher import geno_train, losses

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
