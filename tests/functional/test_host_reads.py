"""The training step does not wait on the host (issue "The paths a GPU cluster runs", item 4):
between log intervals our code reads no device tensor; per record it reads two (the loss and
the expert load). Counted as benchmarks/op_count.py --whole-step counts them: every item /
tolist / float / int / bool / numpy of a tensor in whole training steps, by who asks."""

import json
from pathlib import Path

from tests.ranks import run_on_ranks


def _count(rank: int, world: int, out: str) -> None:
    import logging

    from benchmarks.op_count import whole_step_reads

    logging.disable(logging.WARNING)
    result = {}
    for layers in (1, 2):
        reads, micro, _ = whole_step_reads("tiny", layers, 64, steps=5)
        result[layers] = reads
    result["micro"] = micro
    Path(out).write_text(json.dumps(result))


def test_our_code_reads_the_device_only_when_it_records(tmp_path):
    from benchmarks.op_count import HOST_RESIDENT

    out = tmp_path / "reads.json"
    run_on_ranks(_count, 1, str(out))
    result = json.loads(out.read_text())
    one, two = result["1"], result["2"]
    ours = {k: v for k, v in one.items() if k.startswith("megatron_geno")
            and k not in HOST_RESIDENT}
    # 5 steps at logging.log_interval=5: one record, whose loss and expert load leave the device
    assert sorted(ours) == ["megatron_geno metrics.py:fractions",
                            "megatron_geno train.py:reduce_loss"], ours
    assert all(count <= 2 for count in ours.values()), ours
    # a layer adds none of ours (its reads are megatron-core's own or of host tensors)
    assert all(two.get(k, 0) == v for k, v in ours.items()), (ours, two)
