#!/usr/bin/env bash
# Builds a wheel folder for an air-gapped GPU node that already has CUDA torch:
#   bash benchmarks/make_wheelhouse.sh PYVER DIR      e.g. bash benchmarks/make_wheelhouse.sh 3.12 wheels
# DIR gets this project's wheel and every dependency (megatron-core pinned, zarr, ...) for
# CPython PYVER on manylinux x86_64, resolved by pip for that target; torch, triton, NVIDIA's CUDA
# wheels and torch's own dependencies are left out (the node has them). Run it where an index is reachable; carry DIR;
# benchmarks/gpu_suite.sh DIR installs from it with --no-index.
set -euo pipefail
PYVER=${1:?usage: make_wheelhouse.sh PYVER DIR (e.g. 3.12 wheels)}
DIR=${2:?usage: make_wheelhouse.sh PYVER DIR (e.g. 3.12 wheels)}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if compgen -G "$DIR/*.whl" > /dev/null; then  # two versions of one package cannot install
    echo "make_wheelhouse.sh: error: $DIR already holds wheels; give an empty or new folder" >&2
    exit 2
fi
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform linux_x86_64)
echo "wheelhouse: building this project's wheel" >&2
"$PY" -m pip wheel -q --no-deps -w "$DIR" . 2>&1 | grep -v "^\s*$" >&2 || true
REPORT=$(mktemp)
trap 'rm -f "$REPORT"' EXIT
echo "wheelhouse: resolving dependencies for CPython $PYVER" >&2
"$PY" -m pip install -q --dry-run --ignore-installed --report "$REPORT" --target "$(mktemp -d)" \
    --only-binary=:all: --python-version "$PYVER" "${PLATFORMS[@]}" "$DIR"/megatron_geno-*.whl
"$PY" - "$REPORT" > "$REPORT.list" <<'PYEOF'
import json, re, sys
# the node's CUDA torch brings these (and its own versions of torch's dependencies)
skip = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|megatron-geno|filelock|typing-extensions|"
                  r"sympy|mpmath|networkx|jinja2|markupsafe|fsspec|setuptools)$")
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if not skip.match(meta["name"].lower().replace("_", "-")):
        print(f"{meta['name']}=={meta['version']}")
PYEOF
echo "wheelhouse: downloading $(wc -l < "$REPORT.list") wheels" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" "${PLATFORMS[@]}" \
    -d "$DIR" -r "$REPORT.list"
rm -f "$REPORT.list"
echo "wheelhouse: $DIR holds $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1)" >&2
