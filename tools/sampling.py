"""Samplers for the linear-interpolant velocity model, as small functions over ``velocity(x, t, y)``.

Time convention (``trainer/losses.py``): t = 0 is data, t = 1 is noise,

    x_t = (1 - t) x_0 + t eps,        v = eps - x_0,                                          (1)

and the model regresses E[v | x_t] = velocity(x_t, t, y). A ``Velocity`` here is any callable
``velocity(x, t, y) -> v`` with x (B, ...), t a Python float shared by the batch and y (B,) int64
labels; :func:`model_velocity` wraps a trained model as one, :func:`with_guidance` adds
classifier-free guidance. Samplers keep their state in float64 and cast every velocity to float64;
the model itself runs in float32 (or the dtype given to :func:`model_velocity`), as REPA's
``samplers.py``.

Score (the linear path has alpha = 1 - t, sigma = t). From (1), x_0 = x_t - t v, so
eps = x_t + (1 - t) v and, by Tweedie, grad log p_t(x) = -E[eps | x_t = x] / t:

    score(x, t) = -(x + (1 - t) v(x, t)) / t.                                                 (2)

SDE (REPA's Euler-Maruyama). Every SDE dx = [v + g^2/2 score] dt + g dW has the marginals of the
ODE dx = v dt; run backwards in time (dt < 0) it reads dx = [v - g^2/2 score] dt + g dW. REPA takes
g^2 = 2t, which gives the drift

    d(x, t) = v - t score = x + (2 - t) v                                                     (3)

and the update from t_i to t_{i+1} < t_i (dt = t_{i+1} - t_i, z ~ N(0, I))

    x <- x + d(x, t_i) dt + sqrt(2 t_i) sqrt(|dt|) z.                                         (4)

The grid is linspace(1, t_last, steps) with 0 appended: steps - 1 updates (4), then one step (3)
from t_last to 0 without noise. steps velocity evaluations (NFE).

ODE (probability flow dx = v dt) on the grid linspace(1, 0, steps + 1): Euler, x <- x + dt v(x, t_i),
NFE = steps; or Heun (EDM's 2nd order), x' = x + dt v(x, t_i), x <- x + dt (v(x, t_i) + v(x',
t_{i+1})) / 2, without the correction on the last step to t = 0: NFE = 2 steps - 1.

Guidance (:func:`guided_velocity`): v = v_u + s (v_c - v_u) for lo <= t <= hi (inclusive, as
REPA), conditional and null labels in one batched call; the plain conditional velocity elsewhere
and whenever s = 1 (REPA guides only for s > 1; a scale below 1 is guided here, unguided there).
Euler is REPA's ``euler_sampler`` with ``heun=False`` step for step (tests/test_sampling.py restates
it). With (3) affine in v, guiding v is the same as guiding REPA's drift. Heun's
correction is the guided field at t_{i+1}, so it is guided when t_{i+1} is in the interval (REPA's
``euler_sampler`` decides both halves of a step by t_i; the two differ only on the one step that
crosses an end of the interval).

Noise (:class:`PerSampleNoise`): every sample has its own torch.Generator, seeded by (seed, index),
drawing on the CPU; its initial noise and its SDE noise come from that stream alone, so an image
depends on (seed, index, settings), not on the batch it falls in, the rank or the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FiniteCheck",
    "NonFiniteSample",
    "Velocity",
    "PerSampleNoise",
    "class_labels",
    "euler_maruyama",
    "guided_velocity",
    "model_velocity",
    "ode_euler",
    "ode_heun",
    "ode_time_grid",
    "sample_seed",
    "score_from_velocity",
    "sde_drift",
    "sde_time_grid",
    "with_guidance",
]

#: ``velocity(x, t, y) -> v``: x (B, ...), t a float shared by the batch, y (B,) labels.
Velocity = Callable[[Tensor, float, Tensor], Tensor]

#: Streams of :func:`sample_seed`: the noise of a sample and its uniform label draw.
NOISE_STREAM, LABEL_STREAM = 0, 1


# ----------------------------------------------------------------------------------------------
# Time grids, score and drift


def sde_time_grid(steps: int, t_last: float = 0.04) -> Tensor:
    """REPA's SDE grid: linspace(1, t_last, steps) then 0, float64, steps + 1 points."""
    if steps < 1 or not 0 < t_last < 1:
        raise ValueError(f"need steps >= 1 and 0 < t_last < 1, got steps={steps}, t_last={t_last}")
    t = torch.linspace(1.0, t_last, steps, dtype=torch.float64)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def ode_time_grid(steps: int) -> Tensor:
    """The ODE grid linspace(1, 0, steps + 1), float64."""
    if steps < 1:
        raise ValueError(f"need steps >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def score_from_velocity(v: Tensor, x: Tensor, t: float) -> Tensor:
    """Equation (2): score = -(x + (1 - t) v) / t, for 0 < t <= 1."""
    return -(x + (1.0 - t) * v) / t


def sde_drift(v: Tensor, x: Tensor, t: float) -> Tensor:
    """Equation (3): the reverse-time drift v - (g^2 / 2) score with g^2 = 2t."""
    return v - t * score_from_velocity(v, x, t)


# ----------------------------------------------------------------------------------------------
# Samplers


def _velocity64(velocity: Velocity, x: Tensor, t: float, y: Tensor) -> Tensor:
    return velocity(x, t, y).to(torch.float64)


def euler_maruyama(velocity: Velocity, x1: Tensor, y: Tensor, *, noise: Callable[[], Tensor],
                   steps: int = 250, t_last: float = 0.04) -> Tensor:
    """Equation (4) from t = 1 to t_last, then the drift step (3) to t = 0; returns x_0 in float64.

    ``x1`` is the initial noise; ``noise()`` returns the next N(0, I) draw shaped like ``x1``; it is
    called ``steps - 1`` times, once per stochastic step, in time order. NFE = ``steps``.
    """
    ts = sde_time_grid(steps, t_last).tolist()
    x = x1.to(torch.float64)
    for t, t_next in zip(ts[:-2], ts[1:-1]):
        dt = t_next - t
        d = sde_drift(_velocity64(velocity, x, t, y), x, t)
        x = x + d * dt + (2.0 * t) ** 0.5 * abs(dt) ** 0.5 * noise().to(x)
    t, t_next = ts[-2], ts[-1]
    return x + sde_drift(_velocity64(velocity, x, t, y), x, t) * (t_next - t)


def ode_euler(velocity: Velocity, x1: Tensor, y: Tensor, *, steps: int = 50) -> Tensor:
    """Euler on dx = v dt from t = 1 to 0 in ``steps`` equal steps; x_0 in float64, NFE = steps."""
    ts = ode_time_grid(steps).tolist()
    x = x1.to(torch.float64)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * _velocity64(velocity, x, t, y)
    return x


def ode_heun(velocity: Velocity, x1: Tensor, y: Tensor, *, steps: int = 50) -> Tensor:
    """Heun (2nd order, EDM) on dx = v dt from t = 1 to 0, Euler on the last step to t = 0;
    x_0 in float64, NFE = 2 steps - 1."""
    ts = ode_time_grid(steps).tolist()
    x = x1.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t
        v = _velocity64(velocity, x, t, y)
        x_euler = x + dt * v
        if i == steps - 1:
            x = x_euler
        else:
            x = x + dt * 0.5 * (v + _velocity64(velocity, x_euler, t_next, y))
    return x


# ----------------------------------------------------------------------------------------------
# Guidance and the model


def guided_velocity(velocity: Velocity, x: Tensor, t: float, y: Tensor, *, null: int, scale: float,
                    interval: tuple[float, float]) -> Tensor:
    """Classifier-free guidance v_u + s (v_c - v_u) at times lo <= t <= hi, in x's dtype.

    Inside the interval (and for s != 1) one call of batch 2B on cat([x, x]) with labels
    cat([y, null]); otherwise one conditional call of batch B.
    """
    lo, hi = interval
    if scale == 1.0 or not lo <= t <= hi:
        return velocity(x, t, y).to(x.dtype)
    v = velocity(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, null)])).to(x.dtype)
    cond, uncond = v.chunk(2)
    return uncond + scale * (cond - uncond)


def with_guidance(velocity: Velocity, *, null: int, scale: float, interval: tuple[float, float]) -> Velocity:
    """``velocity`` with :func:`guided_velocity` applied, for the samplers."""
    return functools.partial(guided_velocity, velocity, null=null, scale=scale, interval=interval)


def model_velocity(model: torch.nn.Module, *, dtype: torch.dtype = torch.float32,
                   autocast: torch.dtype | None = None) -> Velocity:
    """A model ``model(x, t, y) -> (velocity, projected)`` as a Velocity: x and the (B,) time tensor in
    ``dtype``, the forward under ``torch.autocast(autocast)`` when given; the projected tokens dropped."""

    def velocity(x: Tensor, t: float, y: Tensor) -> Tensor:
        xt = x.to(dtype)
        tt = torch.full((x.shape[0],), t, dtype=dtype, device=x.device)
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return model(xt, tt, y)[0]

    return velocity


class NonFiniteSample(RuntimeError):
    """The model's velocity or the sampled latents hold a NaN or an infinity; the message names the step."""


class FiniteCheck:
    """``velocity`` that records, on its device and without a host sync, whether each evaluation was finite;
    :meth:`raise_first` (one sync, after the sampler) raises :class:`NonFiniteSample` naming the first
    evaluation that was not (1-based, counted in velocity evaluations: the step for SDE and ODE Euler) and
    its time, or if ``x0`` (the sampler's result) is not finite."""

    def __init__(self, velocity: Velocity) -> None:
        self.velocity = velocity
        self.flags: list[Tensor] = []
        self.times: list[float] = []

    def __call__(self, x: Tensor, t: float, y: Tensor) -> Tensor:
        v = self.velocity(x, t, y)
        self.flags.append(torch.isfinite(v).all())
        self.times.append(t)
        return v

    def raise_first(self, x0: Tensor, *, what: str = "") -> None:
        flags = torch.stack([*self.flags, torch.isfinite(x0).all()]).cpu().tolist()
        n = len(self.flags)
        if all(flags):
            return
        k = flags.index(False)
        if k < n:
            raise NonFiniteSample(f"{what}the model's velocity at step {k + 1} of {n} (t = {self.times[k]:.4g}) holds "
                                  "NaN or infinite values; no images were written for them")
        raise NonFiniteSample(f"{what}the sampled latents after the last of {n} steps hold NaN or infinite values "
                              "(the velocities were finite: they overflowed); no images were written for them")


# ----------------------------------------------------------------------------------------------
# Per-sample randomness


def sample_seed(seed: int, index: int, stream: int = NOISE_STREAM) -> int:
    """A 63-bit generator seed from (seed, index, stream) alone (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


class PerSampleNoise:
    """N(0, I) draws of shape (B, *shape), row b from the generator of sample ``indices[b]``.

    Each call returns the next draw of every sample's stream: the first is its initial noise, the
    next ones its SDE noise. Drawn in float32 on the CPU (the same numbers on every device), then
    moved to ``device``.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], *,
                 device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
        self.shape = tuple(shape)
        self.device = torch.device(device)

    def __call__(self) -> Tensor:
        draws = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(draws).to(self.device)


def class_labels(indices: Sequence[int], *, mode: str, num_classes: int, seed: int) -> Tensor:
    """Labels (B,) int64 of the samples ``indices``, each a function of its index alone.

    ``mode``: "uniform" (one draw in [0, num_classes) from (seed, index)), "balanced" (index mod
    num_classes), or a comma list of class ids cycled over the indices ("3,7": 3, 7, 3, 7, ...).
    """
    if mode == "uniform":
        labels = [np.random.default_rng(sample_seed(seed, int(i), LABEL_STREAM)).integers(num_classes)
                  for i in indices]
    elif mode == "balanced":
        labels = [int(i) % num_classes for i in indices]
    else:
        ids = [int(c) for c in mode.split(",")]
        if any(not 0 <= c < num_classes for c in ids):
            raise ValueError(f"labels {mode!r}: class ids must be in [0, {num_classes})")
        labels = [ids[int(i) % len(ids)] for i in indices]
    return torch.tensor(labels, dtype=torch.int64)
