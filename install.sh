#!/usr/bin/env bash
# Installs megatron-geno into ./.venv on a fresh machine: CPU torch 2.13.0, pinned megatron-core,
# this package with the [hf,test,bench,track,eval] extras. Idempotent. On GPU clusters use docker/ instead.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[hf,test,bench,track,eval]"
echo "installed into $(pwd)/.venv"
