#!/usr/bin/env bash
# The tiny Genos MoE on CPU, end to end: train on the synthetic genome on 2 ranks (TP=2 + SP),
# save, resume at another layout (PP=2), convert to HuggingFace Mixtral, verify the logits, load
# it with transformers, and print where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-runs/example}
rm -rf "$OUT"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
PY=.venv/bin/python
run() { $PY -m torch.distributed.run --nproc-per-node 2 --master-port "$($PY -c 'from megatron_geno.distributed import free_port; print(free_port())')" -m megatron_geno.cli "$@"; }

echo "== 1/4 train tiny for 150 steps at TP=2 with sequence parallelism, checkpoint every 50"
run --preset tiny schedule.train_iters=200 schedule.stop_after=150 schedule.warmup_iters=10 \
    optimizer.lr=3e-3 optimizer.min_lr=3e-4 parallel.tensor_parallel=2 \
    checkpoint.save="$OUT/ckpt" checkpoint.save_interval=50 logging.run_dir="$OUT/train" \
    logging.log_interval=10 schedule.eval_interval=50 logging.quiet=false | grep -E "^step|^# saved|^# spec"

echo "== 2/4 resume the same run at PP=2 (resharded checkpoint) for the last 50 steps"
run --preset tiny schedule.train_iters=200 schedule.warmup_iters=10 optimizer.lr=3e-3 \
    optimizer.min_lr=3e-4 parallel.pipeline_parallel=2 checkpoint.load="$OUT/ckpt" \
    checkpoint.save="$OUT/ckpt" logging.run_dir="$OUT/train" logging.log_interval=10 \
    schedule.eval_interval=50 logging.quiet=false | grep -E "^step|^# saved|^# spec"

echo "== 3/4 convert the final checkpoint to HuggingFace Mixtral and verify logits (fp32, 2048 bases)"
.venv/bin/geno-convert to-hf --checkpoint "$OUT/ckpt" --out "$OUT/hf" 2>/dev/null
.venv/bin/geno-convert verify --checkpoint "$OUT/ckpt" --hf "$OUT/hf" 2>/dev/null

echo "== 4/4 load it with transformers (no remote code) and score a sequence"
$PY - "$OUT" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{out}/hf")
model = AutoModelForCausalLM.from_pretrained(f"{out}/hf", dtype=torch.float32).eval()
ids = tok("ACGTACGGTACCATGCAAGT" * 20, return_tensors="pt").input_ids
with torch.no_grad():
    loss = model(ids, labels=ids).loss.item()
print(f"transformers {type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
      f"loss {loss:.3f} nats/base on a 400-base sequence")
PY

$PY - "$OUT" <<'PY'
import json, math, sys
out = sys.argv[1]
records = [json.loads(l) for l in open(f"{out}/train/metrics.jsonl")]
print(f"\nloss curve (ln 4 = {math.log(4):.3f}):")
for r in records[:: max(1, len(records) // 10)] + records[-1:]:
    print(f"  step {r['step']:>4}  loss {r['loss']:.4f}" + (f"  val {r['val_loss']:.4f}" if "val_loss" in r else ""))
print(f"\nartifacts:\n  metrics     {out}/train/metrics.jsonl (TensorBoard: {out}/train/tensorboard)"
      f"\n  config      {out}/train/config.yaml\n  checkpoints {out}/ckpt (latest: "
      f"{open(f'{out}/ckpt/latest').read().strip()})\n  HuggingFace {out}/hf (MixtralForCausalLM, tokenizer.json)")
PY
