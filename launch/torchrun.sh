#!/usr/bin/env bash
# One node: torchrun with one process per GPU on a resolved geno-train config.
#   launch/torchrun.sh CONFIG.yaml [key.sub=value ...]
# GPUS_PER_NODE (default: GPUs nvidia-smi sees, else 1), MASTER_PORT (default: a free port).
# SIGTERM or SIGUSR1 reaches every rank (torchrun forwards them): training saves and exits 0.
set -euo pipefail
CONFIG=${1:?usage: torchrun.sh CONFIG.yaml [key.sub=value ...]}
shift
PY=${PYTHON:-python3}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [[ "$GPUS_PER_NODE" -ge 1 ]] || GPUS_PER_NODE=1
fi
MASTER_PORT=${MASTER_PORT:-$($PY -c 'from megatron_geno.distributed import free_port; print(free_port())')}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP/SP comm-compute overlap order
# MoE token counts change every step: expandable segments keep the caching allocator from
# fragmenting, which the memory plan's 15% headroom counts on
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec $PY -m torch.distributed.run --nnodes 1 --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr 127.0.0.1 --master-port "$MASTER_PORT" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 600 \
    -m megatron_geno.cli --config "$CONFIG" "$@"
