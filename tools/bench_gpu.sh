#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (no internet there). Installs the wheels
# carried in .whl (zarr, numcodecs, diffusers, ...) beside the machine's torch, then
#   WHAT=cache (default): the loader and encoder tests, then `tools.bench_cache --preset gpu` (SD-VAE +
#     DINOv2-B architectures, random weights, 3072 synthetic JPEGs): eager fp32 and bf16, then bf16
#     compiled if time allows;
#   WHAT=train: the model and loss tests (the CUDA loss test among them), then `tools.bench_train
#     --preset gpu` (SiT-down-B at 256 and -XL at 64, loop vs in-memory step vs online teacher),
#     eager, then compiled within COMPILE_BUDGET seconds;
#   WHAT=sample: the sampler, sampling, metric and Inception tests (CUDA where they pick `auto`), then
#     `tools.bench_sample --preset gpu` (SiT-down-XL at batch 256, 25 SDE steps with CFG: loop vs bare
#     forwards, eager and compiled; SD-VAE decoder; Inception features; hours for 50K samples).
# Usage there: [WHAT=train] bash tools/bench_gpu.sh  (writes $OUT/*.json and logs)
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
if [ "${WHAT:-cache}" = sample ]; then
  [ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -x -p no:cacheprovider tests/test_sampling.py tests/test_sample.py \
    tests/test_fidelity.py tests/test_inception.py 2>&1 | tail -3
  timeout ${BENCH_BUDGET:-420} python3 -m tools.bench_sample --preset gpu ${BENCH_ARGS:-} --out /tmp/bench 2>&1 \
    | tee "$OUT/sample.log" | tail -8
  cp /tmp/bench/bench_sample.json "$OUT/bench_sample.json" 2>/dev/null
  exit 0
fi
if [ "${WHAT:-cache}" = train ]; then
  [ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -x -p no:cacheprovider tests/test_models.py tests/test_losses.py 2>&1 | tail -3
  python3 -m tools.bench_train --preset gpu --compile-modes off ${BENCH_ARGS:-} --out /tmp/bench 2>&1 | tee "$OUT/train_eager.log" | tail -6
  cp /tmp/bench/bench_train.json "$OUT/train_eager.json"
  timeout ${COMPILE_BUDGET:-300} python3 -m tools.bench_train --preset gpu --compile-modes on ${BENCH_ARGS:-} \
    --out /tmp/bench 2>&1 | tee "$OUT/train_compile.log" | tail -6
  cp /tmp/bench/bench_train.json "$OUT/train_compile.json" 2>/dev/null
  exit 0
fi
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -x -p no:cacheprovider tests/test_loader.py tests/test_encoders.py 2>&1 | tail -3
python3 -m tools.bench_cache --preset gpu ${BENCH_ARGS:-} --out /tmp/bench 2>&1 | grep -v 'img/s]' | tee "$OUT/bench_eager.log" | tail -6
cp /tmp/bench/bench_cache.json "$OUT/bench_eager.json"
timeout ${COMPILE_BUDGET:-240} python3 -m tools.bench_cache --preset gpu --precisions bf16 --compile --skip-loader \
  --out /tmp/bench 2>&1 | grep -v 'img/s]' | tee "$OUT/bench_compile.log" | tail -4
cp /tmp/bench/bench_cache.json "$OUT/bench_compile.json" 2>/dev/null
exit 0
