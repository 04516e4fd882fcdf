"""The Runtime (issue 21): every stack decision in one place, resolved from the config and a
Machine. Each row names a machine and settings and the stack that must come out."""

from __future__ import annotations

import pytest

from megatron_geno.config import ConfigError, load_config
from megatron_geno.runtime import Machine, resolve

CPU = Machine(cuda=False, cxx=True, grouped_mm=True)
GPU_TE = Machine.gpu_node(transformer_engine=True)
GPU = Machine.gpu_node(transformer_engine=False)
AMPERE = Machine(cuda=True, compute_capability=8, grouped_mm=True, cxx=True)

ROWS = [  # machine, overrides, expected fields
    (CPU, [], dict(device="cpu", spec="local+sdpa", experts="grouped", fusions=False,
                   adam="torch-default", precision="fp32", dispatcher="alltoall")),
    (GPU_TE, [], dict(device="cuda", spec="transformer-engine", experts="te-grouped",
                      fusions=True, adam="fused(te/apex)", precision="bf16")),
    (GPU_TE, ["model.attention_backend=sdpa"], dict(spec="local+sdpa", experts="grouped")),
    (GPU, [], dict(spec="local+sdpa", experts="grouped", adam="fused", precision="bf16")),
    (GPU, ["precision=fp32"], dict(experts="sequential")),  # grouped GEMM on CUDA: bf16 only
    (AMPERE, [], dict(experts="sequential")),  # ... on sm90+
    (CPU, ["model.moe_grouped_gemm=off", "model.fusions=on", "optimizer.fused=on"],
     dict(experts="sequential", fusions=True, adam="fused")),
    (CPU, ["model.moe_token_dispatcher=allgather"], dict(dispatcher="allgather")),
    (CPU, ["model.recompute=selective", "model.recompute_modules=[moe,core_attn]"],
     dict(recompute="selective(moe,core_attn)")),
]


@pytest.mark.parametrize("machine,overrides,expected", ROWS)
def test_the_stack_each_machine_and_setting_resolves_to(machine, overrides, expected):
    runtime = resolve(load_config(None, ["model.preset=tiny", *overrides]), machine)
    assert {k: getattr(runtime, k) for k in expected} == expected


REFUSED = [
    (CPU, ["model.attention_backend=te"], "model.attention_backend=te but transformer_engine"),
    (AMPERE, ["model.moe_grouped_gemm=on"], "model.moe_grouped_gemm=on, but torch._grouped_mm"),
    (Machine(cuda=False, cxx=False), ["model.fusions=on"], "needs a C++ compiler"),
    (GPU_TE, ["optimizer.fused=off"], "optimizer.fused=off: megatron-core runs"),
    (GPU, ["model.recompute=selective", "model.recompute_modules=[layernorm]"],
     "layernorm recompute needs Transformer Engine"),
    (GPU_TE, ["data.reset_attention_mask=true"], "data.reset_attention_mask needs"),
]


@pytest.mark.parametrize("machine,overrides,message", REFUSED)
def test_what_a_machine_cannot_run_is_refused_naming_the_key(machine, overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve(load_config(None, ["model.preset=tiny", *overrides]), machine)
    assert message in str(err.value), str(err.value)


def test_the_line_names_every_decision_and_the_layout():
    cfg = load_config(None, ["model.preset=tiny", "parallel.tensor_parallel=2",
                             "parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"])
    line = resolve(cfg, CPU, world_size=8).line()
    assert line == ("spec=local+sdpa TP=2 PP=2 VPP=2 CP=1 EP=1 DP=2 SP=True experts=grouped "
                    "fusions=off adam=torch-default dispatcher=alltoall recompute=none "
                    "dtype=torch.float32")


def test_resolving_imports_neither_torch_nor_megatron_core():
    import subprocess
    import sys

    code = ("import sys\nfrom megatron_geno.config import load_config\n"
            "from megatron_geno.runtime import Machine, resolve\n"
            "r = resolve(load_config(None, ['model.preset=genos-10b']), Machine.gpu_node())\n"
            "print(r.spec, 'torch' in sys.modules, 'megatron.core' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["transformer-engine", "False", "False"], proc.stderr[-2000:]
