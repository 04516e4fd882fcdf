#!/usr/bin/env bash
# One command for a single-GPU node with CUDA torch and no network (DESIGN decision 14):
#   bash benchmarks/gpu_suite.sh WHEELS [OUT]
# Installs this project and its dependencies from WHEELS (benchmarks/make_wheelhouse.sh) into
# OUT/site with --no-index, then runs tests/gpu, the throughput rows of the GPU-throughput goals
# (and beside them for genos-1.2b at 8K: the recipe's micro batch, or the largest the memory plan
# fits on this GPU; the old path: SequentialMLP, eager elementwise work, torch's default AdamW),
# one context-parallel rank of the 32K, 128K and 1M phases alone (benchmarks/cp_attention.py:
# time, MFU of the attention, peak memory, difference from whole-sequence flash attention at 32K),
# the host reads of whole training steps and sync vs async checkpoint saves (tiny shapes),
# a profiler top-20 table and peak memory beside the memory plan's estimate, and prints one
# dated markdown block for docs/benchmarks.md (also written to OUT/block.md; OUT/partial.md
# gets each result as it comes, for a run cut short). With Transformer Engine importable it also
# runs the TE spec for genos-1.2b at 8K; every row names the spec and experts module it used.
# SMOKE=1 runs the same steps with tiny shapes (any machine, CPU included) to check the plumbing.
set -euo pipefail
WHEELS=${1:?usage: gpu_suite.sh WHEELS [OUT]}
OUT=${2:-${OUT:-$PWD/gpu_suite_out}}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WHEELS=$(cd "$WHEELS" && pwd)
LOG="$OUT/suite.log"
: > "$LOG"
step() { echo "gpu_suite: $*" >&2; }

step "installing from $WHEELS"
# the wheels for this interpreter (a folder may also hold another Python version's)
mapfile -t WHLS < <("$PY" - "$WHEELS" <<'PYEOF'
import pathlib, sys
from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import parse_wheel_filename
supported = set(sys_tags())
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    if supported & set(parse_wheel_filename(wheel.name)[3]):
        print(wheel)
PYEOF
)
"$PY" -m pip install -q --no-index --no-deps --target "$OUT/site" "${WHLS[@]}" >> "$LOG" 2>&1
export PYTHONPATH="$PWD:$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # as launched

OLD=(--set model.moe_grouped_gemm=off --set model.fusions=off --set optimizer.fused=off)
if [ "${SMOKE:-0}" = 1 ]; then
    SMALL=(--preset tiny --layers 2 --seq 256 --mbs 2 --gbs 8 --steps 4)
    ROWS=("new|${SMALL[*]}" "old|${SMALL[*]} ${OLD[*]}")
    PROFILE=(--preset tiny --layers 2 --seq 256 --steps 2)
else
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" >> "$LOG" 2>&1
    B12=(--preset genos-1.2b --layers 12 --seq 8192 --mbs 1 --gbs 4 --steps 6)
    # the recipe's micro batch (sized at DP 8 for 80 GiB), or the largest the memory plan fits
    # on this one GPU at DP 1 (unsharded optimizer), whichever is smaller
    MBS=$("$PY" - <<'PYEOF' 2>>"$LOG"
import torch
from launch.plan import largest_micro_batch
from launch.recipe import load_recipe
recipe, _, _ = load_recipe("genos-1.2b-8k", [])
cfg, _, _ = load_recipe("genos-1.2b-8k", ["data.global_batch_size=64"])
gib = torch.cuda.get_device_properties(0).total_memory / 2**30
print(min(recipe.data.micro_batch_size, largest_micro_batch(cfg, 1, gib) or 1))
PYEOF
) || MBS=1  # the plan failed (see suite.log): micro batch 1
    ROWS=("genos-1.2b 8K|${B12[*]}"
          "genos-1.2b 8K, micro batch $MBS|--preset genos-1.2b --layers 12 --seq 8192 --mbs $MBS --gbs $((2 * MBS)) --steps 6"
          "genos-1.2b 8K, old path|${B12[*]} ${OLD[*]}"
          "genos-10b shapes 4 layers 8K|--preset genos-10b --layers 4 --seq 8192 --mbs 1 --gbs 4 --steps 6"
          "genos-1.2b 32K|--preset genos-1.2b --layers 12 --seq 32768 --mbs 1 --gbs 2 --steps 5")
    if "$PY" -c "import transformer_engine" >> "$LOG" 2>&1; then
        ROWS+=("genos-1.2b 8K, TE spec|${B12[*]} --set model.attention_backend=te")
    fi
    PROFILE=(--preset genos-1.2b --layers 12 --seq 8192 --steps 3)
fi

START=$(date +%s)
# each result is also written to OUT/partial.md as it comes, so a run cut short keeps them
PARTIAL="$OUT/partial.md"
: > "$PARTIAL"
step "tests/gpu"
TESTS=$("$PY" -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee -a "$LOG" | tail -1)
echo "pytest tests/gpu: $TESTS ($(( $(date +%s) - START )) s)" >> "$PARTIAL"
TABLE=""
for row in "${ROWS[@]}"; do
    name=${row%%|*}
    step "throughput: $name"
    # shellcheck disable=SC2086
    line=$("$PY" benchmarks/train_throughput.py --no-baseline ${row#*|} 2>>"$LOG" | tail -1)
    row_md="| $name $(echo "${line#| }" | sed 's/ [^|]*|$//')"
    TABLE+="$row_md"$'\n'
    echo "$row_md ($(( $(date +%s) - START )) s)" >> "$PARTIAL"
done
step "context-parallel attention"
if [ "${SMOKE:-0}" = 1 ]; then
    CP_ROWS=(--emulate 2048:2 --emulate 8192:8)
else  # one rank of the genos-1.2b 32K, 128K and 1M phases (CP 2, 8, 32)
    CP_ROWS=(--emulate 32768:2 --emulate 131072:8 --emulate 1048576:32)
fi
CP_TABLE=$("$PY" benchmarks/cp_attention.py "${CP_ROWS[@]}" 2>>"$LOG") \
    || CP_TABLE="(benchmarks/cp_attention.py ${CP_ROWS[*]} failed: see suite.log)"
echo "$CP_TABLE" >> "$PARTIAL"
step "host reads of whole steps, checkpoint saves"
# on a GPU the reads are of device tensors: each one a wait (issue "The paths a GPU cluster runs")
READS=$("$PY" benchmarks/op_count.py --whole-step --preset tiny 2>>"$LOG") \
    || READS="(benchmarks/op_count.py --whole-step failed: see suite.log)"
echo "$READS" >> "$PARTIAL"
SAVES=$("$PY" benchmarks/checkpoint_save.py 2>>"$LOG") \
    || SAVES="(benchmarks/checkpoint_save.py failed: see suite.log)"
echo "$SAVES" >> "$PARTIAL"
step "profile"
PROFILE_OUT=$("$PY" benchmarks/profile_step.py "${PROFILE[@]}" 2>>"$LOG")
ELAPSED=$(( $(date +%s) - START ))

DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (smoke run)')")
VERSIONS=$("$PY" -c "import sys, torch, megatron.core as m; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}')")
TE=$("$PY" -c "import transformer_engine" >/dev/null 2>&1 && echo "Transformer Engine present" || echo "no Transformer Engine")
{
    echo "### $DEVICE, $(date -u +%Y-%m-%d) (benchmarks/gpu_suite.sh, project at $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
    echo
    echo "$VERSIONS; $TE; suite ran in ${ELAPSED} s."
    echo
    echo "\`pytest tests/gpu\`: $TESTS"
    echo
    echo "| run (train_throughput.py) | tokens/s | TFLOP/s per device | MFU | peak GiB | plan GiB |"
    echo "|---|---:|---:|---:|---:|---:|"
    printf "%s" "$TABLE"
    echo
    echo "Context parallelism (benchmarks/cp_attention.py ${CP_ROWS[*]}):"
    echo
    echo "$CP_TABLE"
    echo
    echo "Host reads of whole training steps (benchmarks/op_count.py --whole-step --preset tiny):"
    echo "$READS"
    echo
    echo "Checkpoint saves, synchronous vs asynchronous (benchmarks/checkpoint_save.py):"
    echo "$SAVES"
    echo
    echo "Profile (benchmarks/profile_step.py ${PROFILE[*]}):"
    echo "$PROFILE_OUT"
} | tee "$OUT/block.md"
