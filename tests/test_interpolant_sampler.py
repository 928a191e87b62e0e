"""The sampler integrates the flow the trainer regresses: a Gaussian toy whose exact velocity is
derived from `trainer.losses` (its interpolant's alpha, sigma and their derivatives), checked against
`interpolate` / `velocity_target` by regression, then fed to `tools.sampling`'s solvers.

Data x ~ N(mu, s^2) per dimension, eps ~ N(0, 1), x_t = alpha_t x + sigma_t eps and
v = alpha'_t x + sigma'_t eps (trainer.losses, equations (1)-(2)). x_t and v are jointly Gaussian:

    E[x_t] = alpha_t mu,   Var[x_t] = alpha_t^2 s^2 + sigma_t^2,   Cov(v, x_t) = alpha_t alpha'_t s^2 + sigma_t sigma'_t,
    E[v | x_t = x] = alpha'_t mu + Cov(v, x_t) / Var[x_t] (x - alpha_t mu).

Started from x_1 ~ N(0, 1), a sampler that follows this velocity from t = 1 to 0 must return N(mu, s^2).
A change of time convention or of velocity sign in either package breaks these tests.

Tolerances (observed values in the comments, float64; the initial noise is standardised, so the exact
flow returns mean mu and std s exactly and what is left is the solver's own error):
- ODE mean exact to 1e-12 (the velocity is affine in x); std error Euler < 0.8 / steps (observed
  0.69-0.74 / steps for 10-80 steps), Heun < 1.2 / steps^2 (observed 0.79-0.92 / steps^2).
- SDE (Monte Carlo, 80000 values): |mean - mu| < 5 standard errors; |std - s| < 0.006 (stopping the noise
  at t = 0.04 costs 0.0057) + 0.5 / steps + 5 standard errors (observed 0.011 at 25 steps, 0.0049 at 250).
"""

from __future__ import annotations

import math

import pytest
import torch

from tools.sampling import euler_maruyama, ode_euler, ode_heun
from trainer.losses import interpolant, interpolate, velocity_target

MU, S = 1.5, 0.5
N, D = 20000, 4


def exact_velocity(x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
    """E[v | x_t = x] for x ~ N(MU, S^2), from trainer.losses.interpolant (module docstring)."""
    alpha, sigma, d_alpha, d_sigma = interpolant(torch.tensor(t, dtype=torch.float64))
    var = alpha**2 * S**2 + sigma**2
    cov = alpha * d_alpha * S**2 + sigma * d_sigma
    return d_alpha * MU + cov / var * (x - alpha * MU)


def standard_noise(seed: int = 0) -> torch.Tensor:
    """N(0, 1) draws shifted and scaled to sample mean 0 and sample std 1 exactly."""
    z = torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean()) / z.std()


def no_labels(n: int = N) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_exact_velocity_is_the_regression_of_the_training_target(t):
    """Monte Carlo: least squares of velocity_target on interpolate's x_t has the closed form's slope
    and intercept (400000 pairs; tolerance 0.01, about 5 standard errors)."""
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x = MU + S * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    tt = torch.full((n,), t, dtype=torch.float64)
    xt, v = interpolate(x, eps, tt), velocity_target(x, eps)
    slope = ((xt - xt.mean()) * (v - v.mean())).mean() / xt.var()
    intercept = v.mean() - slope * xt.mean()
    ref = exact_velocity(torch.tensor([0.0, 1.0], dtype=torch.float64), t, no_labels(2))
    torch.testing.assert_close(torch.stack([intercept, intercept + slope]), ref, atol=0.01, rtol=0)


@pytest.mark.parametrize("solver, order, c", [(ode_euler, 1, 0.8), (ode_heun, 2, 1.2)])
def test_ode_solvers_recover_the_data_law(solver, order, c):
    z = standard_noise()
    for steps in (10, 20, 40, 80):
        out = solver(exact_velocity, z, no_labels(), steps=steps)
        assert abs(out.mean().item() - MU) < 1e-12, steps
        assert abs(out.std().item() - S) < c / steps**order, (steps, out.std().item())


@pytest.mark.parametrize("steps", [25, 250])
def test_sde_sampler_recovers_the_data_law(steps):
    g = torch.Generator().manual_seed(2)
    out = euler_maruyama(exact_velocity, standard_noise(), no_labels(), steps=steps,
                         noise=lambda: torch.randn(N, D, generator=g, dtype=torch.float64))
    n = out.numel()
    assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(out.std().item() - S) < 0.006 + 0.5 / steps + 5 * S / math.sqrt(2 * n)
