"""A GPU run starts from the model a CPU run starts from (skipped without CUDA): every weight of
the GPU-built tiny model equals, bit for bit, its draw on the CPU (megatron_geno.initialization
draws on the CPU whatever the device). With the CPU tests' layout-independence
(tests/functional/test_initialization.py), the GPU's initial model is the same at every layout."""

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_initial_weights_are_the_cpu_draws(precision):
    from megatron_geno import distributed
    from megatron_geno.config import load_config
    from megatron_geno.initialization import _fill, _sharded_tensors
    from megatron_geno.model import build_model_chunks
    from megatron_geno.vocab import VOCAB_SIZE

    cfg = load_config(None, ["model.preset=tiny", f"precision={precision}"])
    distributed.initialize(cfg, seed=1234)
    try:
        (chunk,) = build_model_chunks(cfg, VOCAB_SIZE)
        params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
        checked = 0
        for sh in _sharded_tensors(chunk.sharded_state_dict()):
            if sh.data.untyped_storage().data_ptr() not in params:
                continue
            assert sh.data.is_cuda, sh.key
            on_cpu = dataclasses.replace(sh, data=torch.empty_like(sh.data, device="cpu"))
            _fill(on_cpu, cfg.schedule.seed, cfg.model.init_method_std, cfg.model.num_layers)
            assert torch.equal(on_cpu.data, sh.data.cpu()), sh.key
            checked += 1
        assert checked >= 10
    finally:
        distributed.destroy()
