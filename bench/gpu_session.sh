#!/usr/bin/env bash
# Everything a GPU session should measure, in one device call, logs under ${OUT:-bench/results}.
# Usage on the device machine from the repo root:  bash bench/gpu_session.sh [quick]
# Wheels the GPU image lacks travel in the git-ignored .whl/ (name it in the device tool's `carry`); make them
# here with: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   --platform manylinux2014_x86_64 -d .whl fla-core jaxtyping wadler_lindig hypothesis sortedcontainers attrs
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/env.log"
python3 -c "import hypothesis, jaxtyping" 2>/dev/null || echo "WARNING: hypothesis/jaxtyping missing: carry .whl (see top of this file)"
timeout 420 python3 -m pytest -m gpu tests -q --maxfail=10 -p no:cacheprovider 2>&1 | grep -v DEBUG | tee "$out/gpu_tests.log" | tail -30
timeout 120 python3 -m bench.block_mask --seq-lens 16384 65536 --with-dense 2>&1 | grep -v DEBUG | tee "$out/block_mask.log" | tail -6
timeout 300 python3 -m bench.train_toy --seq-len 8192 --steps 40 --compile 2>&1 | grep -v DEBUG | tee "$out/train_toy.log" | tail -8
if [ "${1:-}" != quick ]; then
    timeout 900 python3 -m bench.nsa --out "$out" 2>&1 | grep -v DEBUG | tee "$out/nsa.log" | tail -40
fi
