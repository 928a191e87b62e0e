"""Samplers against a problem with a known answer, guidance batching, per-sample noise.

The Gaussian toy: data x_0 ~ N(mu, s^2) per dimension, x_t = (1 - t) x_0 + t eps. Then x_t is
Gaussian with mean m_t = (1 - t) mu and variance var_t = (1 - t)^2 s^2 + t^2, and since
v = eps - x_0 is jointly Gaussian with x_t, Cov(v, x_t) = t - (1 - t) s^2 gives the exact velocity

    E[v | x_t = x] = (t - (1 - t) s^2) / var_t * (x - m_t) - mu.

Its probability-flow ODE is solved by x_t = m_t + sqrt(var_t) z, so the exact ODE sample started
from x_1 = z is mu + s z, per sample. The SDE sampler is affine in (x_1, its noise) for this
velocity, so its output distribution is N(Q, P^2 + sum_k R_k^2), with the coefficients read off
by running the sampler itself on probe inputs (no Monte-Carlo error).

Tolerances (observed values in the comments, float64):
- ODE per-sample max error vs mu + s z: Euler halves per doubling of steps (ratios 1.94-1.97),
  Heun quarters (4.1-4.4); Heun at 50 steps < 2e-3 (observed 1.6e-3), Euler at 50 steps < 0.08
  (observed 0.072).
- SDE: output mean exact to 1e-12; std error against the t_last-limited answer halves per doubling
  (first-order weak convergence); at 250 steps |std - s| < 0.01 (observed 0.0057, almost all of it
  from stopping the noise at t = 0.04).
- Monte-Carlo runs of 80000 values: 5 standard errors (mean s/sqrt(n) = 0.0018, std s/sqrt(2n) = 0.0013).
"""

from __future__ import annotations

import math

import pytest
import torch

from tools.sampling import (
    PerSampleNoise,
    Velocity,
    class_labels,
    euler_maruyama,
    guided_velocity,
    model_velocity,
    ode_euler,
    ode_heun,
    ode_time_grid,
    sample_seed,
    score_from_velocity,
    sde_drift,
    sde_time_grid,
    with_guidance,
)

MU, S = 1.5, 0.5
N, D = 20000, 4


def mean_t(t: float) -> float:
    return (1 - t) * MU


def var_t(t: float) -> float:
    return (1 - t) ** 2 * S**2 + t**2


def toy_velocity(x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
    """E[v | x_t = x] for x_0 ~ N(MU, S^2) (module docstring)."""
    return (t - (1 - t) * S**2) / var_t(t) * (x - mean_t(t)) - MU


def initial_noise(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def no_labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# The toy itself, checked independently


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_toy_velocity_is_the_regression_of_v_on_x_t(t):
    """Monte Carlo: least squares of v = eps - x_0 on x_t has the closed form's slope and intercept."""
    g = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(400_000, generator=g, dtype=torch.float64)
    eps = torch.randn(400_000, generator=g, dtype=torch.float64)
    xt, v = (1 - t) * x0 + t * eps, eps - x0
    slope = ((xt - xt.mean()) * (v - v.mean())).mean() / xt.var()
    intercept = v.mean() - slope * xt.mean()
    grid = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ref = toy_velocity(grid, t, no_labels(2))
    torch.testing.assert_close(torch.stack([intercept, intercept + slope]), ref, atol=0.01, rtol=0)


@pytest.mark.parametrize("t", [0.2, 0.7])
def test_toy_velocity_is_the_time_derivative_of_the_exact_flow(t):
    z = initial_noise(8)
    flow = lambda t: mean_t(t) + math.sqrt(var_t(t)) * z  # noqa: E731
    h = 1e-6
    fd = (flow(t + h) - flow(t - h)) / (2 * h)
    torch.testing.assert_close(toy_velocity(flow(t), t, no_labels(8)), fd, atol=1e-8, rtol=0)


@pytest.mark.parametrize("t", [0.04, 0.3, 1.0])
def test_score_from_velocity_is_the_gaussian_score(t):
    x = initial_noise(16) * 2 + 1
    v = toy_velocity(x, t, no_labels(16))
    torch.testing.assert_close(score_from_velocity(v, x, t), -(x - mean_t(t)) / var_t(t), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(sde_drift(v, x, t), x + (2 - t) * v, atol=1e-12, rtol=1e-12)  # equation (3)


def test_time_grids():
    sde = sde_time_grid(250, 0.04)
    assert len(sde) == 251 and sde[0] == 1 and sde[-2] == 0.04 and sde[-1] == 0 and sde.dtype == torch.float64
    assert (sde.diff() < 0).all()
    ode = ode_time_grid(4)
    assert ode.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        sde_time_grid(10, 0.0)
    with pytest.raises(ValueError):
        ode_time_grid(0)


# ----------------------------------------------------------------------------------------------
# ODE


@pytest.mark.parametrize("solver, order, tol50", [(ode_euler, 1, 0.08), (ode_heun, 2, 2e-3)])
def test_ode_converges_to_the_exact_flow_at_its_order(solver, order, tol50):
    z = initial_noise()
    exact = MU + S * z
    errors = [(solver(toy_velocity, z, no_labels(N), steps=k) - exact).abs().max().item() for k in (10, 20, 40, 80)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    expected = 2.0**order
    assert all(0.85 * expected < r < 1.25 * expected for r in ratios), (errors, ratios)
    out = solver(toy_velocity, z, no_labels(N), steps=50)
    assert (out - exact).abs().max() < tol50
    mc = 5 * S / math.sqrt(out.numel())  # the sample's own Monte-Carlo spread, 5 standard errors
    assert abs(out.mean().item() - MU) < tol50 + mc
    assert abs(out.std().item() - S) < tol50 + mc


# ----------------------------------------------------------------------------------------------
# SDE


def sde_output_law(steps: int, t_last: float = 0.04) -> tuple[float, float]:
    """Mean and std of the SDE sampler's output on the toy, read off the sampler by probes: row 0
    starts at 0 with no noise (the mean Q), row 1 at 1 (P + Q), row 2 + k gets a unit draw at step k only."""
    rows = steps + 1
    x1 = torch.zeros(rows, 1, dtype=torch.float64)
    x1[1] = 1.0
    calls = iter(range(steps - 1))

    def probe_noise() -> torch.Tensor:
        e = torch.zeros(rows, 1, dtype=torch.float64)
        e[2 + next(calls)] = 1.0
        return e

    out = euler_maruyama(toy_velocity, x1, no_labels(rows), noise=probe_noise, steps=steps, t_last=t_last)[:, 0]
    q = out[0]
    return q.item(), (out[1:] - q).pow(2).sum().sqrt().item()


def sde_limit_std(t_last: float = 0.04) -> float:
    """The std the SDE reaches as steps grow: the exact law N(m, var) at t_last through the final
    drift step (3), x_0 = x - t_last (x + (2 - t_last) v(x))."""
    a = (t_last - (1 - t_last) * S**2) / var_t(t_last)  # dv/dx
    return abs(1 - t_last - t_last * (2 - t_last) * a) * math.sqrt(var_t(t_last))


def test_sde_output_law_converges_at_first_order():
    laws = {k: sde_output_law(k) for k in (25, 50, 100, 200, 250)}
    assert all(abs(m - MU) < 1e-12 for m, _ in laws.values())
    errors = [abs(laws[k][1] - sde_limit_std()) for k in (25, 50, 100, 200)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.7 < r < 2.2 for r in ratios), (errors, ratios)
    assert abs(laws[250][1] - S) < 0.01  # 0.0057: stopping the noise at t = 0.04 costs about 1%
    assert abs(sde_limit_std(0.01) - S) < abs(sde_limit_std(0.04) - S)


def test_sde_samples_have_the_output_law():
    """Monte Carlo with real noise: the sampler's draws have the law the probes found, and mu, s."""
    g = torch.Generator().manual_seed(2)
    out = euler_maruyama(toy_velocity, initial_noise(), no_labels(N), steps=250,
                         noise=lambda: torch.randn(N, D, generator=g, dtype=torch.float64))
    mean, std = sde_output_law(250)
    n = out.numel()
    assert abs(out.mean().item() - mean) < 5 * std / math.sqrt(n)
    assert abs(out.std().item() - std) < 5 * std / math.sqrt(2 * n)
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() - S) < 0.015


def counting(calls: list) -> Velocity:
    def velocity(x, t, y):
        calls.append((t, x.shape[0], y.clone()))
        return toy_velocity(x, t, y)
    return velocity


def repa_euler_sampler(velocity, x1, y, *, num_steps, cfg_scale, guidance_low, guidance_high, null):
    """REPA samplers.py euler_sampler with heun=False (generate.py's ODE default), restated: grid
    linspace(1, 0, num_steps + 1) in float64; guided iff cfg_scale > 1 and low <= t_cur <= high; the
    guided velocity uncond + s (cond - uncond); x_next = x_cur + (t_next - t_cur) d_cur."""
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = x1.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-1].tolist(), t_steps[1:].tolist()):
        x_cur = x_next
        if cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high:
            cond = velocity(x_cur, t_cur, y).to(torch.float64)
            uncond = velocity(x_cur, t_cur, torch.full_like(y, null)).to(torch.float64)
            d_cur = uncond + cfg_scale * (cond - uncond)
        else:
            d_cur = velocity(x_cur, t_cur, y).to(torch.float64)
        x_next = x_cur + (t_next - t_cur) * d_cur
    return x_next


def test_ode_euler_is_repas_euler_sampler():
    """Same grid, same inclusive guidance interval decided by t_cur, same update (the ODE preset's solver)."""
    x, y = initial_noise(3), torch.tensor([0, 4, 2])
    for steps, interval in [(50, (0.0, 0.7)), (7, (0.25, 0.5)), (4, (0.25, 0.5))]:
        ours = ode_euler(with_guidance(fake_velocity([]), null=NULL, scale=1.8, interval=interval), x, y, steps=steps)
        ref = repa_euler_sampler(fake_velocity([]), x, y, num_steps=steps, cfg_scale=1.8, guidance_low=interval[0],
                                 guidance_high=interval[1], null=NULL)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert ode_time_grid(50).tolist() == torch.linspace(1, 0, 51, dtype=torch.float64).tolist()


def test_euler_steps_by_hand():
    """v(x, t) = 2 x + t, x_1 = 3, two steps: v = 7 at t = 1 -> x = 3 - 0.5 * 7 = -0.5;
    v = -1 + 0.5 = -0.5 at t = 0.5 -> x_0 = -0.5 + 0.25 = -0.25."""
    out = ode_euler(lambda x, t, y: 2 * x + t, torch.tensor([[3.0]]), no_labels(1), steps=2)
    assert out.item() == -0.25


def test_function_evaluations():
    z, y = initial_noise(3), no_labels(3)
    for sampler, kwargs, nfe in [(euler_maruyama, dict(noise=lambda: torch.zeros(3, D)), 7),
                                 (ode_euler, {}, 7), (ode_heun, {}, 13)]:
        calls: list = []
        sampler(counting(calls), z, y, steps=7, **kwargs)
        assert len(calls) == nfe, sampler.__name__


# ----------------------------------------------------------------------------------------------
# Per-sample noise and labels


def sde_by_index(indices: list[int], seed: int = 0) -> torch.Tensor:
    noise = PerSampleNoise(seed, indices, (D,))
    x1 = noise()
    return euler_maruyama(toy_velocity, x1, no_labels(len(indices)), noise=noise, steps=20)


def test_an_image_depends_on_its_index_not_its_batch():
    whole = sde_by_index(list(range(6)))
    parts = torch.cat([sde_by_index([0, 1]), sde_by_index([2, 3, 4, 5])])
    assert torch.equal(whole, parts)
    assert torch.equal(sde_by_index([5, 2]), whole[[5, 2]])
    assert not torch.equal(sde_by_index([0, 1], seed=1), whole[:2])
    noise = PerSampleNoise(0, [0, 1], (D,), device="cpu")
    a, b = noise(), noise()
    assert a.shape == (2, D) and a.dtype == torch.float32 and not torch.equal(a, b)
    assert sample_seed(0, 1) != sample_seed(1, 0) != sample_seed(0, 1, 1) and 0 <= sample_seed(7, 9) < 2**63


def test_class_labels():
    idx = list(range(2000))
    u = class_labels(idx, mode="uniform", num_classes=10, seed=0)
    assert u.dtype == torch.int64 and u.min() == 0 and u.max() == 9
    assert torch.bincount(u).min() > 150  # about 200 each
    assert torch.equal(class_labels([1500, 3], mode="uniform", num_classes=10, seed=0), u[[1500, 3]])
    assert not torch.equal(class_labels(idx, mode="uniform", num_classes=10, seed=1), u)
    assert class_labels([0, 1, 7, 12], mode="balanced", num_classes=5, seed=0).tolist() == [0, 1, 2, 2]
    assert class_labels([0, 1, 2, 5], mode="3,1", num_classes=5, seed=0).tolist() == [3, 1, 3, 1]
    with pytest.raises(ValueError, match="class ids"):
        class_labels([0], mode="5", num_classes=5, seed=0)


# ----------------------------------------------------------------------------------------------
# Guidance

NULL = 9


def fake_velocity(calls: list) -> Velocity:
    """Records (t, batch, labels); conditional v = x + y, null-label v = -x."""
    def velocity(x, t, y):
        calls.append((t, x.shape[0], y.clone()))
        yy = y.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return torch.where(yy == NULL, -x, x + yy)
    return velocity


def test_guided_velocity_is_one_batched_call_inside_the_interval():
    x, y, scale = initial_noise(3), torch.tensor([0, 4, 2]), 1.65
    calls: list = []
    v = guided_velocity(fake_velocity(calls), x, 0.5, y, null=NULL, scale=scale, interval=(0.0, 0.7))
    assert len(calls) == 1 and calls[0][1] == 6 and calls[0][2].tolist() == [0, 4, 2, NULL, NULL, NULL]
    cond, uncond = x + y[:, None], -x
    torch.testing.assert_close(v, uncond + scale * (cond - uncond))
    calls.clear()
    v = guided_velocity(fake_velocity(calls), x, 0.8, y, null=NULL, scale=scale, interval=(0.0, 0.7))
    assert [c[1] for c in calls] == [3] and calls[0][2].tolist() == [0, 4, 2]
    torch.testing.assert_close(v, cond)
    for t in (0.25, 0.75):  # both ends are inside
        calls.clear()
        guided_velocity(fake_velocity(calls), x, t, y, null=NULL, scale=scale, interval=(0.25, 0.75))
        assert calls[0][1] == 6


@pytest.mark.parametrize("sampler", ["sde", "euler", "heun"])
def test_scale_one_never_doubles_the_batch(sampler):
    calls: list = []
    run_sampler(sampler, with_guidance(fake_velocity(calls), null=NULL, scale=1.0, interval=(0.0, 1.0)))
    assert calls and all(b == 3 for _, b, _ in calls)


def run_sampler(name: str, velocity, steps: int = 4, t_last: float = 0.25) -> torch.Tensor:
    x, y = initial_noise(3), torch.tensor([0, 4, 2])
    if name == "sde":
        return euler_maruyama(velocity, x, y, steps=steps, t_last=t_last, noise=lambda: torch.zeros(3, D))
    return (ode_euler if name == "euler" else ode_heun)(velocity, x, y, steps=steps)


@pytest.mark.parametrize("sampler, expected", [
    # ODE grid 1, .75, .5, .25, 0; guidance on [0.25, 0.5]
    ("euler", [(1.0, 3), (0.75, 3), (0.5, 6), (0.25, 6)]),
    # Heun's correction is a velocity at t_next, guided when t_next is in the interval
    ("heun", [(1.0, 3), (0.75, 3), (0.75, 3), (0.5, 6), (0.5, 6), (0.25, 6), (0.25, 6)]),
    # SDE grid linspace(1, 0.25, 4) = 1, .75, .5, .25, then 0: the last (deterministic) step is guided too
    ("sde", [(1.0, 3), (0.75, 3), (0.5, 6), (0.25, 6)]),
])
def test_guidance_only_inside_the_interval(sampler, expected):
    calls: list = []
    run_sampler(sampler, with_guidance(fake_velocity(calls), null=NULL, scale=2.0, interval=(0.25, 0.5)))
    assert [(t, b) for t, b, _ in calls] == expected
    for _, b, y in calls:
        assert y.tolist() == ([0, 4, 2, NULL, NULL, NULL] if b == 6 else [0, 4, 2])


def test_model_velocity_feeds_the_model_its_dtype_and_a_time_vector():
    from trainer.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", input_size=8, num_classes=4, teacher_dim=0).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a non-zero output
    x, y = initial_noise(2).new_empty(2, 4, 8, 8).normal_(), torch.tensor([1, 4])
    with torch.no_grad():
        v = model_velocity(model)(x, 0.3, y)
        ref, _ = model(x.float(), torch.full((2,), 0.3), y)
        bf16 = model_velocity(model, autocast=torch.bfloat16)(x, 0.3, y)
    assert v.dtype == torch.float32 and torch.equal(v, ref)
    torch.testing.assert_close(bf16.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("sampler", ["sde", "euler", "heun"])
def test_finite_check_names_the_first_nonfinite_step(sampler):
    """A velocity that turns NaN from t < 0.45 on: FiniteCheck names the first evaluation at such a t (the samplers
    themselves run on), with one host sync after the batch."""
    from tools.sampling import FiniteCheck, NonFiniteSample

    def velocity(x, t, y):
        return torch.full_like(x, float("nan")) if t < 0.45 else -x

    check = FiniteCheck(velocity)
    x1, y = torch.randn(2, 3), torch.zeros(2, dtype=torch.int64)
    if sampler == "sde":
        x0 = euler_maruyama(check, x1, y, noise=lambda: torch.randn(2, 3), steps=10)
    else:
        x0 = (ode_euler if sampler == "euler" else ode_heun)(check, x1, y, steps=10)
    first = next(k for k, t in enumerate(check.times) if t < 0.45)
    with pytest.raises(NonFiniteSample, match=rf"step {first + 1} of {len(check.times)} \(t = {check.times[first]:.4g}\)"):
        check.raise_first(x0)
    ok = FiniteCheck(lambda x, t, y: -x)
    ok.raise_first(ode_euler(ok, x1, y, steps=4))  # nothing to say
    with pytest.raises(NonFiniteSample, match="after the last of 4 steps"):
        ok.raise_first(torch.tensor([float("inf")]))
