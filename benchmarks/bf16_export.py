"""What `geno-convert verify` prints for fp32 and bf16 exports of a trained model, as a table.

    python benchmarks/bf16_export.py                       # tiny, 300 steps (~2 min on 2 cores)
    python benchmarks/bf16_export.py --checkpoint runs/ckpt [--tokens 2048]

Without --checkpoint it trains the `tiny` preset (one process, synthetic genome) for --steps
steps, as the example does, then exports it with `geno-convert to-hf` in fp32 and in bf16 and runs
`geno-convert verify` on each. Two comparisons per export, on the same random DNA:
- conversion: Megatron with its weights rounded to the export's dtype against transformers
  (what verify's threshold checks; it should be ~1e-6 for both);
- precision (bf16 only): the export against the checkpoint's fp32 weights, the price of bf16.
The fp32 export is the baseline measured in the same run. The bf16 figures depend on the model
(its size, how long it trained), which is why docs quote this script's table, not a rule.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_tiny(where: Path, steps: int) -> Path:
    ckpt = where / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    subprocess.run([sys.executable, "-m", "megatron_geno.cli", "--preset", "tiny",
                    f"schedule.train_iters={steps}", "schedule.eval_interval=0",
                    "logging.quiet=true", "logging.tensorboard=false",
                    f"logging.run_dir={where / 'run'}", f"checkpoint.save={ckpt}"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a geno-train checkpoint (default: train tiny)")
    parser.add_argument("--steps", type=int, default=300, help="tiny's training steps (300)")
    parser.add_argument("--tokens", type=int, default=2048, help="verify's tokens (2048)")
    args = parser.parse_args()

    from checkpoint_tools.mcore_checkpoint import open_checkpoint
    from checkpoint_tools.to_hf import mcore_to_hf
    from checkpoint_tools.verify import verify
    from megatron_geno.quiet import quiet_known_warnings

    quiet_known_warnings()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else train_tiny(tmp, args.steps)
        opened = open_checkpoint(ckpt)
        where = opened.path if args.checkpoint else "tiny on the synthetic genome"
        what = (f"{where} (iteration {opened.iteration}, {opened.model.num_layers} layers, "
                f"hidden {opened.model.hidden_size})")
        rows = {}
        for dtype in ("fp32", "bf16"):
            out = mcore_to_hf(ckpt, tmp / f"hf_{dtype}", dtype)
            rows[dtype] = verify(ckpt, out, args.tokens)
    print(f"\n{what}, {args.tokens} tokens of random DNA\n")
    print("| export | conversion: max abs logit diff | cosine | top-1 | router top-k "
          "| against fp32 weights: max abs logit diff | cosine | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, r in rows.items():
        loss = r.precision_loss
        against = ("baseline (the same weights) | 1 | 1" if loss is None else
                   f"{loss.max_abs_diff:.2e} | {loss.cosine:.6f} | {loss.top1:.4f}")
        print(f"| {dtype} | {r.max_abs_logit_diff:.2e} | {r.cosine:.6f} | {r.top1_agreement:.4f} "
              f"| {r.router_topk_agreement:.4f} | {against} |")


if __name__ == "__main__":
    main()
