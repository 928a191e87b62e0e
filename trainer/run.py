"""A training run folder: its record (``RUN/config.json``), its latent transform, its checkpoints by step,
its model with EMA or raw weights, and the refusal of a rerun with changed settings.

    RUN/config.json   {"train": resolved TrainConfig, "model": ModelConfig, "cache": CacheIdentity}

Training writes the record (:class:`RunRecord`); sampling and the report read it. The latent transform
is recorded once, as the run's ``latent_scale`` and ``latent_shift``, and :attr:`RunRecord.latent` hands
the one :class:`LatentTransform` both sides use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cache.cli.runtime import SetupError
from cache.diff import describe_change, nested_diff

from .checkpoint import CheckpointError, _load_file, checkpoints, nonfinite_tensors, verify_checkpoint

__all__ = ["LatentTransform", "CacheIdentity", "RandomWeights", "RunRecord", "read_run_record", "latest_checkpoint",
           "find_checkpoint", "load_run_model", "recorded_train", "refuse_changed_rerun", "LEGACY_MODEL_FIELDS", "legacy_model_fields",
           "unrecorded_cache_entries"]

#: ModelConfig fields added after runs were recorded without them, with the value such a record means (what
#: the code that wrote it built): SiT-down's down/up convolutions had biases before U-DiT's bias-free ones
#: became the default.
LEGACY_MODEL_FIELDS: dict[str, Any] = {"resample_bias": True}


def legacy_model_fields(model: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of :data:`LEGACY_MODEL_FIELDS` a recorded ModelConfig lacks, with the values the code that wrote
    it used; {} for a record that has them all (or no record)."""
    return {k: v for k, v in LEGACY_MODEL_FIELDS.items() if model and k not in model}


@dataclass(frozen=True)
class LatentTransform:
    """The model's latent x and the VAE's latent z: x = (z - shift) * scale, z = x / scale + shift,
    with z = mean + std * noise drawn from the cached posterior moments."""

    scale: float
    shift: float = 0.0

    def encode(self, moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x = (mean + std * noise - shift) * scale; moments (B, 2C, h, w) = [mean, std], in float32."""
        mean, std = moments.float().chunk(2, dim=1)
        return (mean + std * noise - self.shift) * self.scale

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """z = x / scale + shift, in float32 (the VAE decoder's input)."""
        return (x / self.scale + self.shift).float()


@dataclass(frozen=True)
class CacheIdentity:
    """What makes a cache the same data for a resumed run: source, encoders, rows, and how the teacher's
    tokens are stored: ``teacher_dtype`` ("float16" or "int8") and ``teacher_channel_scales`` (an int8
    teacher's per-channel scales, ``cache.quant``; None for float16 or int8 without them), which decide the
    tokens the loss sees. The per-encoder random-weights flags are None in records written before they were
    kept apart (``random_weights``, VAE or teacher, is always there).

    Records written before the storage entries were kept (:attr:`LATER`) lack them; a rerun of such a run
    does not compare what its record never held (:func:`unrecorded_cache_entries`) and rewrites the record
    with the entries of the cache it resumes on, so from then on they are compared too."""

    source_fingerprint: str | None = None
    vae_sha256: str | None = None
    teacher: str | None = None
    teacher_sha256: str | None = None
    rows: int | None = None
    resolution: int | None = None
    random_weights: bool = False
    vae_random_weights: bool | None = None
    teacher_random_weights: bool | None = None
    teacher_dtype: str | None = None
    teacher_channel_scales: list[float] | None = None

    #: Entries decided by the weights' sha256, already compared: a rerun need not match them.
    DERIVED = ("vae_random_weights", "teacher_random_weights")
    #: Entries added after the first records were written: a record without them did not say.
    LATER = ("teacher_dtype", "teacher_channel_scales")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheIdentity:
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"the run's cache identity has entries this code does not know: {', '.join(unknown)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in self.DERIVED:
            if out[name] is None:
                del out[name]
        return out


@dataclass(frozen=True)
class RandomWeights:
    """Which networks upstream of a set of samples had random weights: the cache's VAE and teacher (None:
    the run's record does not say which, ``cache`` still says whether either did) and the decoding VAE."""

    cache: bool
    cache_vae: bool | None
    cache_teacher: bool | None
    decoder_vae: bool

    @property
    def any(self) -> bool:
        return bool(self.cache or self.cache_vae or self.cache_teacher or self.decoder_vae)

    def to_dict(self) -> dict[str, Any]:
        return {"cache": self.cache, "cache_vae": self.cache_vae, "cache_teacher": self.cache_teacher,
                "decoder_vae": self.decoder_vae}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RandomWeights:
        return cls(cache=bool(d["cache"]), cache_vae=d.get("cache_vae"), cache_teacher=d.get("cache_teacher"),
                   decoder_vae=bool(d["decoder_vae"]))


@dataclass(frozen=True)
class RunRecord:
    """``RUN/config.json``: the resolved train config, the model config and the cache identity.
    ``train`` and ``model`` are the JSON forms of ``TrainConfig`` and ``ModelConfig``."""

    train: Mapping[str, Any]
    model: Mapping[str, Any] = field(default_factory=dict)
    cache: CacheIdentity = field(default_factory=CacheIdentity)

    @property
    def latent(self) -> LatentTransform:
        return LatentTransform(scale=float(self.train["latent_scale"]), shift=float(self.train["latent_shift"]))

    @property
    def model_name(self) -> str:
        return self.train["model"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``config.json`` (tuples as lists, as it reads back)."""
        return json.loads(json.dumps({"train": dict(self.train), "model": dict(self.model),
                                      "cache": self.cache.to_dict()}))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        if not isinstance(d, Mapping) or not isinstance(d.get("train"), Mapping):
            raise ValueError("not the record of a training run (no 'train' object)")
        unknown = sorted(set(d) - {"train", "model", "cache"})
        if unknown:
            raise ValueError(f"the run record has entries this code does not know: {', '.join(unknown)}")
        return cls(train=dict(d["train"]), model=dict(d.get("model") or {}),
                   cache=CacheIdentity.from_dict(d.get("cache") or {}))

    def random_weights(self, decoder_vae: bool) -> RandomWeights:
        """The upstream random-weights flags of samples of this run decoded with a VAE that has them or not."""
        c = self.cache
        return RandomWeights(cache=c.random_weights, cache_vae=c.vae_random_weights,
                             cache_teacher=c.teacher_random_weights, decoder_vae=decoder_vae)


def read_run_record(run: str) -> RunRecord:
    """The record of the run folder ``run``; SetupError if it has none or it is unreadable."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise SetupError(f"--run {run}: not a training run (no {path})")
    try:
        with open(path) as f:
            return RunRecord.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise SetupError(f"{path} is not the record of a training run ({type(e).__name__}: {e})") from None


def latest_checkpoint(folder: str) -> str | None:
    """The checkpoint with the highest step (not verified: see :func:`verify_checkpoint`), or None."""
    found = checkpoints(folder)
    return found[0] if found else None


def find_checkpoint(run: str, step: int = 0) -> tuple[str, int]:
    """(folder, step) of checkpoint ``step`` of ``run`` (0: the latest); SetupError if absent or unreadable."""
    read_run_record(run)
    folder = os.path.join(run, "checkpoints")
    path = latest_checkpoint(folder) if step == 0 else os.path.join(folder, f"step-{step:08d}")
    if path is None or not os.path.isdir(path):
        have = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise SetupError(f"--run {run}: no checkpoint{f' at step {step}' if step else ''} in {folder} "
                         f"(found: {', '.join(have) or 'none'})")
    state = os.path.join(path, "state.json")
    try:
        with open(state) as f:
            return path, int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SetupError(f"checkpoint {path} is damaged: {state} is missing or unreadable ({type(e).__name__}); "
                         "choose another with --step, or delete that folder to sample the one before it") from None


def load_run_model(run_dir: str, *, weights: str = "ema", step: int | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.nn.Module, RunRecord]:
    """The model of a training run with its ``weights`` ("ema" or "raw") from the latest checkpoint
    (or ``step``), in eval mode, and the run's record. Weights holding a NaN or an infinity (a checkpoint
    whose checksums were recomputed after the damage: training never writes them) are a CheckpointError
    naming the file and the tensors."""
    from .models import create_model

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    with open(os.path.join(run_dir, "config.json")) as f:
        run = RunRecord.from_dict(json.load(f))
    folder = os.path.join(run_dir, "checkpoints")
    path = latest_checkpoint(folder) if step is None else os.path.join(folder, f"step-{step:08d}")
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {folder}")
    model = create_model(run.model_name, **{**run.model, **legacy_model_fields(run.model)})
    name = "ema.safetensors" if weights == "ema" else "model.safetensors"
    verify_checkpoint(path, (name,))
    state = _load_file(os.path.join(path, name), device)
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{os.path.join(path, name)} holds NaN or infinite weights in {', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}: it would sample garbage; choose another checkpoint "
                              "with --step")
    biases = "down.conv.bias" in state
    if biases != bool(getattr(model.config, "resample_bias", False)) and getattr(model.config, "kind", "") == "sitdown":
        have = "has" if biases else "lacks"
        raise CheckpointError(f"{os.path.join(path, name)} {have} down/up convolution biases (down.conv.bias) but "
                              f"{os.path.join(run_dir, 'config.json')} records \"resample_bias\": "
                              f"{str(not biases).lower()}: set it to {str(biases).lower()} in the \"model\" record "
                              "to load these weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{os.path.join(path, name)} does not hold the weights of the run's model "
                              f"({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), run


def _recorded(out: str, part: str) -> dict[str, Any]:
    try:
        with open(os.path.join(out, "config.json")) as f:
            value = json.load(f).get(part)
    except (OSError, ValueError, AttributeError):
        return {}
    return dict(value) if isinstance(value, Mapping) else {}


def recorded_model(out: str) -> dict[str, Any]:
    """The ModelConfig record of the run in ``out`` (its config.json), or {} if there is none yet."""
    return _recorded(out, "model")


def recorded_train(out: str) -> dict[str, Any]:
    """The train record (resolved TrainConfig) of the run in ``out``, or {} if there is none yet."""
    return _recorded(out, "train")


def refuse_changed_rerun(out: str, record: Mapping[str, Any], *, free: frozenset[str], what: str) -> None:
    """Refuse to continue in ``out`` whose ``config.json`` was written with other settings, naming each
    change (dotted names in ``free`` may differ); nothing if there is no record yet. ``what`` says what
    the folder holds ("a run", "samples made")."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except ValueError as e:
        raise SetupError(f"{path} is not valid JSON ({e}): restore it, or choose another --out") from None
    changes = [describe_change(name, a, b) for name, a, b in nested_diff(old, record, skip=free)]
    if changes:
        raise SetupError(f"{out} holds {what} with other settings; rerun with the same ones, or choose "
                         "another --out. Changed: " + "; ".join(changes))


def unrecorded_cache_entries(out: str) -> frozenset[str]:
    """The dotted names (``cache.<entry>``) of the :attr:`CacheIdentity.LATER` entries that the record in
    ``out`` lacks because it was written before they were kept: a rerun cannot compare them, so it leaves them
    free (and writes them for the next rerun). Empty when there is no record yet or it holds them all."""
    path = os.path.join(out, "config.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return frozenset()  # none yet (or unreadable: refuse_changed_rerun says so)
    recorded = old.get("cache") if isinstance(old, dict) else None
    if not isinstance(recorded, dict):
        return frozenset()
    return frozenset(f"cache.{name}" for name in CacheIdentity.LATER if name not in recorded)
