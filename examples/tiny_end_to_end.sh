#!/usr/bin/env bash
# The whole flow on CPU in a few minutes: FASTA assemblies -> geno-preprocess -> geno-launch
# (geno-train, tiny preset, 2 ranks) -> geno-convert to-hf -> geno-convert verify -> transformers.
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

echo "== 6/6 load it with transformers (no remote code): per-assembly validation loss on chr20"
$PYTHON - "$OUT" <<'PY'
import json, math, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from data_pipeline.corpus import Corpus
from megatron_geno.vocab import EOD

out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{out}/hf")
model = AutoModelForCausalLM.from_pretrained(f"{out}/hf", dtype=torch.float32).eval()
print(f"transformers {type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} "
      f"parameters; tokenizer: {tok('ACGTN').input_ids} for ACGTN")
print(f"\n{'corpus':<10} {'assembly':<10} {'species':<16} {'valid tokens':>12} {'loss':>7} {'bits/base':>9}")
for corpus in ("human", "primates"):
    for entry, part in Corpus(f"{out}/corpus/{corpus}").parts():
        scored, total = 0, 0.0
        for i in np.flatnonzero(part.doc_split == 1):  # chr20, EOD dropped
            ids = part.document(int(i))[:-1][: 16 * 256]
            windows = torch.from_numpy(ids[: len(ids) // 256 * 256].astype(np.int64)).view(-1, 256)
            with torch.no_grad():  # windows of the training context length
                loss = model(windows, labels=windows).loss.item()
            total += loss * windows.numel()
            scored += windows.numel()
        loss = total / scored
        print(f"{corpus:<10} {entry['assembly']:<10} {entry['species']:<16} {scored:>12,d} "
              f"{loss:>7.4f} {loss / math.log(2):>9.3f}")
print(f"(uniform over A C G T: {math.log(4):.4f} nats = 2 bits per base)")

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
      f"\n  HuggingFace {out}/hf (MixtralForCausalLM, tokenizer.json)")
PY
