#!/usr/bin/env bash
# The whole flow on CPU in a few minutes: FASTA assemblies -> geno-preprocess -> geno-launch
# (geno-train, tiny preset, 2 ranks) -> geno-convert to-hf -> geno-convert verify -> geno-eval loss.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-runs/example}
rm -rf "$OUT"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore PYTHON=.venv/bin/python
BIN=.venv/bin

echo "== 1/6 make 6 small assemblies (2 human samples x 2 haplotypes, 1 primate x 2; gzip FASTA)"
$PYTHON examples/make_assemblies.py "$OUT/fasta"

echo "== 2/6 geno-preprocess: tokenize into zarr shards, chr20 of every assembly held out"
for corpus in human primates; do
    $BIN/geno-preprocess run --manifest "$OUT/fasta/$corpus.tsv" --out "$OUT/corpus/$corpus" \
        --holdout-contigs valid='^chr20$' --workers 2 2>&1 | grep -v INFO
done
$BIN/geno-preprocess stats "$OUT/corpus/human"
$BIN/geno-preprocess verify "$OUT/corpus/human" --windows 8 --window-length 4096 2>&1 | grep -v INFO

echo "== 3/6 geno-launch: validate the layout, then train tiny for 300 steps on 2 ranks (TP=2 + SP)"
$BIN/geno-launch --recipe examples/tiny_recipe.yaml --nodes 1 --gpus-per-node 2 --torchrun \
    "data.blend=[1.0, $OUT/corpus/human, 1.0, $OUT/corpus/primates]" \
    checkpoint.save="$OUT/ckpt" logging.run_dir="$OUT/train" data.cache_dir="$OUT/data_cache" \
    2>&1 | grep -E "^(recipe|layout|batch|budget|memory|step|# saved|# spec)" || true
test -f "$OUT/ckpt/latest" || { echo "training failed: see $OUT/train" >&2; exit 1; }

echo "== 4/6 geno-convert to-hf: the final checkpoint as a HuggingFace Mixtral directory"
$BIN/geno-convert to-hf --checkpoint "$OUT/ckpt" --out "$OUT/hf" 2>/dev/null

echo "== 5/6 geno-convert verify: Megatron vs transformers logits (fp32, 2048 bases)"
$BIN/geno-convert verify --checkpoint "$OUT/ckpt" --hf "$OUT/hf" 2>/dev/null

echo "== 6/6 geno-eval loss: per-assembly validation loss on chr20, from the HuggingFace export"
$BIN/geno-eval loss --hf "$OUT/hf" --corpus "$OUT/corpus/human" --corpus "$OUT/corpus/primates" \
    --window 256 --windows 96 --json "$OUT/eval_loss.json" 2>/dev/null
$PYTHON - "$OUT" <<'PY'
import json, math, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{out}/hf")
model = AutoModelForCausalLM.from_pretrained(f"{out}/hf", dtype=torch.float32).eval()
print(f"\ntransformers {type(model).__name__} (no remote code): "
      f"{sum(p.numel() for p in model.parameters()):,} parameters; tokenizer: "
      f"{tok('ACGTN').input_ids} for ACGTN")

records = [json.loads(l) for l in open(f"{out}/train/metrics.jsonl")]
print(f"\nloss curve (ln 4 = {math.log(4):.3f}):")
shown = records[:: max(1, len(records) // 10)]
for r in shown + ([records[-1]] if records[-1] is not shown[-1] else []):
    print(f"  step {r['step']:>4}  loss {r['loss']:.4f}" + (f"  val {r['val_loss']:.4f}" if "val_loss" in r else ""))
print(f"\nartifacts:\n  assemblies  {out}/fasta (*.fa.gz, human.tsv, primates.tsv)"
      f"\n  token store {out}/corpus/human, {out}/corpus/primates (zarr shards, manifest.json)"
      f"\n  metrics     {out}/train/metrics.jsonl (TensorBoard: {out}/train/tensorboard)"
      f"\n  config      {out}/train/config.yaml (launch copy: {out}/train/launch/)"
      f"\n  checkpoints {out}/ckpt (latest: {open(f'{out}/ckpt/latest').read().strip()})"
      f"\n  HuggingFace {out}/hf (MixtralForCausalLM, tokenizer.json)"
      f"\n  eval        {out}/eval_loss.json (geno-eval loss)")
PY
