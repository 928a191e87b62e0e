#!/usr/bin/env bash
# The GPU checks of the cache issue, as one script for a lent GPU machine (no internet there).
# Installs the wheels carried in .whl (zarr, numcodecs, diffusers, ...) beside the machine's torch,
# runs the loader tests, then `tools.bench_cache --preset gpu` (SD-VAE + DINOv2-B architectures,
# random weights, 3072 synthetic JPEGs): eager fp32 and bf16, then bf16 compiled if time allows.
# Usage there: bash tools/bench_gpu.sh  (writes $OUT/*.json and logs)
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, zarr, diffusers, timm, accelerate; print('torch', torch.__version__, 'zarr', zarr.__version__, 'diffusers', diffusers.__version__, 'timm', timm.__version__)"
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -x -p no:cacheprovider tests/test_loader.py tests/test_encoders.py 2>&1 | tail -3
python3 -m tools.bench_cache --preset gpu ${BENCH_ARGS:-} --out /tmp/bench 2>&1 | grep -v 'img/s]' | tee "$OUT/bench_eager.log" | tail -6
cp /tmp/bench/bench_cache.json "$OUT/bench_eager.json"
timeout ${COMPILE_BUDGET:-240} python3 -m tools.bench_cache --preset gpu --precisions bf16 --compile --skip-loader \
  --out /tmp/bench 2>&1 | grep -v 'img/s]' | tee "$OUT/bench_compile.log" | tail -4
cp /tmp/bench/bench_cache.json "$OUT/bench_compile.json" 2>/dev/null
exit 0
