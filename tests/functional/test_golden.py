"""Golden losses: the first 5 steps of `tiny` on one CPU process (fp32) are kept in the repository,
as megatron-core's functional tests keep theirs. A change that moves them must say why: update
tests/golden/tiny_cpu_fp32.json with the new values and the reason in its "why" field."""

import json
from pathlib import Path

from tests.functional.launcher import assert_close, geno_train_logged, losses

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_cpu_fp32.json"


def test_tiny_first_five_losses_match_the_golden_values(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    records, log = geno_train_logged(tmp_path / "run", *golden["overrides"],
                                     f"checkpoint.save={tmp_path / 'ck'}")
    assert golden["start_up_line"] in log
    assert_close(losses(records), golden["losses"], rtol=golden["rtol"])
    # the checkpoint records the stack that ran: the start-up line's Runtime, padded vocab too
    from megatron_geno.checkpoint.trust import read_common
    from megatron_geno.runtime import Runtime

    saved = read_common(next((tmp_path / "ck").glob("iter_*")))["runtime"]
    assert "# " + Runtime(**saved).line() in log and saved["padded_vocab_size"] == 128
