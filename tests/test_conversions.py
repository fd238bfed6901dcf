"""The twelve conversions between velocity, score, noise and data, against targets built in the test from
(x_data, noise) with closed-form schedules; the seed README's corrected formulas; negative controls showing
the seed's wrong formulas fail; the singular endpoints; property-based tests over shapes, times and dtypes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import (
    DIRECTION_DENOMINATORS,
    EDGE_TIMES,
    PATH_NAMES,
    VP_LINEAR_T_CLAMP,
    bcast,
    check_finite_or_value_error,
    make_path,
    reference_schedule,
    reference_targets,
    rel_err,
    zero_quantities,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from flowscore import KINDS, convert

F64 = torch.float64
DIRECTIONS = list(itertools.product(KINDS, KINDS))


def grid(name: str, n: int = 25) -> torch.Tensor:
    upper = 1 - 2 * VP_LINEAR_T_CLAMP if name == "vp-linear" else 0.98
    return torch.linspace(0.02, upper, n, dtype=F64)


def draw(t: torch.Tensor, dims: tuple[int, ...], seed: int, dtype: torch.dtype = F64):
    gen = torch.Generator().manual_seed(seed)
    shape = (t.shape[0], *dims)
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype), torch.randn(
        shape, generator=gen, dtype=F64
    ).to(dtype)


# -- every direction maps the conditional target of src to that of dst
@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize(("src", "dst"), DIRECTIONS)
def test_conversion_maps_targets(name: str, src: str, dst: str) -> None:
    path = make_path(name)
    t = grid(name)
    x_data, noise = draw(t, (3,), seed=0)
    target = reference_targets(name, x_data, noise, t)
    out = path.convert(target[src], target["x"], t, src, dst)
    for i in range(t.shape[0]):
        assert rel_err(out[i], target[dst][i]) < 1e-9, (t[i].item(), rel_err(out[i], target[dst][i]))
    torch.testing.assert_close(
        convert(target[src], target["x"], path.schedule(t), src, dst), out, rtol=0, atol=0
    )


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize(("src", "dst"), DIRECTIONS)
def test_round_trip_is_identity(name: str, src: str, dst: str) -> None:
    """src -> dst -> src returns any input value (not only a target): the two maps are inverses."""
    path = make_path(name)
    t = grid(name)
    x, value = draw(t, (2, 2), seed=1)
    back = path.convert(path.convert(value, x, t, src, dst), x, t, dst, src)
    torch.testing.assert_close(back, value, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_conversions_compose(name: str) -> None:
    """velocity -> noise -> data equals velocity -> data (a consistency check of the 2x2 solve)."""
    path = make_path(name)
    t = grid(name)
    x, value = draw(t, (4,), seed=2)
    two_steps = path.convert(path.convert(value, x, t, "velocity", "noise"), x, t, "noise", "data")
    torch.testing.assert_close(two_steps, path.convert(value, x, t, "velocity", "data"), rtol=1e-9, atol=1e-9)


# -- property-based: random shapes, times, paths, dtypes
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(PATH_NAMES),
    direction=st.sampled_from(DIRECTIONS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    dims=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    batch=st.integers(1, 5),
    t_unit=st.floats(0.0, 1.0),
    scalar_time=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_conversion_maps_targets_and_round_trips(
    name, direction, dtype, dims, batch, t_unit, scalar_time, seed
) -> None:
    """Away from the endpoints (t in [0.1, 0.9]) float32 agrees with the float64 reference to ~1e-4 relative
    to the size of the inputs; float64 to 1e-9."""
    src, dst = direction
    path = make_path(name)
    t64 = torch.full((batch,), 0.1 + 0.8 * t_unit, dtype=F64)
    x_data, noise = draw(t64, tuple(dims), seed)
    target = reference_targets(name, x_data, noise, t64)  # float64 ground truth
    t = 0.1 + 0.8 * t_unit if scalar_time else t64.to(dtype)
    out = path.convert(target[src].to(dtype), target["x"].to(dtype), t, src, dst)
    assert out.dtype == dtype and out.shape == x_data.shape
    scale = max(
        target[src].abs().max().item(), target["x"].abs().max().item(), target[dst].abs().max().item()
    )
    assert (out.to(F64) - target[dst]).abs().max().item() <= TOLERANCE[dtype] * scale
    back = path.convert(out, target["x"].to(dtype), t, dst, src)
    assert (back.to(F64) - target[src]).abs().max().item() <= TOLERANCE[dtype] * scale


# -- the seed README's corrected formulas, and negative controls
def corrected_score_from_velocity(u, x, alpha, beta, d_alpha, d_beta):
    """README (corrected): s = (alpha u - alpha' x) / (beta (alpha' beta - alpha beta'))."""
    a, b, da, db = (bcast(c, x) for c in (alpha, beta, d_alpha, d_beta))
    return (a * u - da * x) / (b * (da * b - a * db))


def corrected_velocity_from_score(s, x, alpha, beta, d_alpha, d_beta):
    """README (corrected): u = (alpha'/alpha) x + (beta^2 alpha'/alpha - beta beta') s."""
    a, b, da, db = (bcast(c, x) for c in (alpha, beta, d_alpha, d_beta))
    return (da / a) * x + (b**2 * da / a - b * db) * s


def seed_score_from_velocity(u, x, alpha, beta, d_alpha, d_beta):
    """The seed's WRONG formula s = (alpha/beta^2) u + (alpha'/alpha - beta'/beta) x."""
    a, b, da, db = (bcast(c, x) for c in (alpha, beta, d_alpha, d_beta))
    return (a / b**2) * u + (da / a - db / b) * x


def seed_conditional_velocity(x, x_data, alpha, beta, d_alpha, d_beta):
    """The seed's WRONG general formula u(x|x_data) = (alpha'/alpha)(x_data - x) - (beta'/beta) x."""
    a, b, da, db = (bcast(c, x) for c in (alpha, beta, d_alpha, d_beta))
    return (da / a) * (x_data - x) - (db / b) * x


@pytest.mark.parametrize("name", PATH_NAMES)
def test_corrected_readme_formulas_hold(name: str) -> None:
    t = grid(name)
    x_data, noise = draw(t, (3,), seed=3)
    target = reference_targets(name, x_data, noise, t)
    schedule = reference_schedule(name, t)
    x = target["x"]
    score = corrected_score_from_velocity(target["velocity"], x, *schedule)
    velocity = corrected_velocity_from_score(target["score"], x, *schedule)
    torch.testing.assert_close(score, target["score"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(velocity, target["velocity"], rtol=1e-9, atol=1e-9)
    # flowscore's coefficients are these formulas' coefficients
    alpha, beta, d_alpha, d_beta = schedule
    c_u, c_x = make_path(name).coefficients(t, "velocity", "score")
    det = beta * (d_alpha * beta - alpha * d_beta)
    torch.testing.assert_close(c_u, alpha / det, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c_x, -d_alpha / det, rtol=1e-9, atol=1e-12)
    c_s, c_x = make_path(name).coefficients(t, "score", "velocity")
    torch.testing.assert_close(c_s, beta**2 * d_alpha / alpha - beta * d_beta, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c_x, d_alpha / alpha, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "vp", "vp-linear", "custom"])
def test_seed_score_from_velocity_formula_is_wrong(name: str) -> None:
    """Negative control: the seed's s = (alpha/beta^2) u + (alpha'/alpha - beta'/beta) x misses the true score
    by far on every generative path (ve is excluded: alpha' = 0 there, and the seed formula divides by 0)."""
    t = grid(name)
    x_data, noise = draw(t, (3,), seed=4)
    target = reference_targets(name, x_data, noise, t)
    wrong = seed_score_from_velocity(target["velocity"], target["x"], *reference_schedule(name, t))
    errors = [rel_err(wrong[i], target["score"][i]) for i in range(t.shape[0])]
    assert min(errors) > 0.05, min(errors)


@pytest.mark.parametrize("name", ["linear", "vp", "vp-linear", "custom"])
def test_seed_conditional_velocity_formula_is_wrong(name: str) -> None:
    """Negative control: the seed's u = (alpha'/alpha)(x_data - x) - (beta'/beta) x is not d/dt of the sample,
    while the corrected (beta'/beta) x + (alpha' - alpha beta'/beta) x_data is."""
    t = grid(name)
    x_data, noise = draw(t, (3,), seed=5)
    target = reference_targets(name, x_data, noise, t)
    alpha, beta, d_alpha, d_beta = (bcast(c, x_data) for c in reference_schedule(name, t))
    x = target["x"]
    corrected = (d_beta / beta) * x + (d_alpha - alpha * d_beta / beta) * x_data
    torch.testing.assert_close(corrected, target["velocity"], rtol=1e-9, atol=1e-9)
    wrong = seed_conditional_velocity(x, x_data, *reference_schedule(name, t))
    errors = [rel_err(wrong[i], target["velocity"][i]) for i in range(t.shape[0])]
    assert min(errors) > 0.05, min(errors)


def test_linear_path_velocity_is_data_minus_noise() -> None:
    """On the linear path u(x|x_data) = (x_data - x)/(1 - t) = x_data - noise (README)."""
    path = make_path("linear")
    t = grid("linear")
    x_data, noise = draw(t, (2,), seed=6)
    x = path.sample(x_data, t, noise)
    torch.testing.assert_close(path.conditional_velocity(x, x_data, t), x_data - noise)
    torch.testing.assert_close(path.conditional_velocity(x, x_data, t), (x_data - x) / bcast(1 - t, x))


# -- marginal fields: the maps are linear, so they hold for posterior means too
@pytest.mark.parametrize("name", PATH_NAMES)
def test_conversion_maps_marginal_velocity_to_marginal_score(name: str) -> None:
    """Data N(m, s^2) (1D): p_t = N(alpha m, alpha^2 s^2 + beta^2). Marginal velocity of the Gaussian flow
    mu' + (sigma'/sigma)(x - mu); marginal score by autograd of the Normal log-density."""
    m, s = 0.7, 0.4
    t = grid(name, 9)
    alpha_fn, beta_fn = (lambda tt, k=k: reference_schedule(name, tt)[k] for k in (0, 1))
    mu, sigma = alpha_fn(t) * m, torch.sqrt(alpha_fn(t) ** 2 * s**2 + beta_fn(t) ** 2)
    tt = t.clone().requires_grad_(True)
    d_mu = torch.autograd.grad(alpha_fn(tt).sum() * m + 0 * tt.sum(), tt)[0]
    d_sigma = torch.autograd.grad(torch.sqrt(alpha_fn(tt) ** 2 * s**2 + beta_fn(tt) ** 2).sum(), tt)[0]
    x = torch.linspace(-3, 3, 7, dtype=F64).reshape(1, 7).expand(t.shape[0], 7).clone()
    velocity = bcast(d_mu, x) + bcast(d_sigma / sigma, x) * (x - bcast(mu, x))
    xg = x.clone().requires_grad_(True)
    log_p = torch.distributions.Normal(bcast(mu, x), bcast(sigma, x)).log_prob(xg).sum()
    (score,) = torch.autograd.grad(log_p, xg)
    path = make_path(name)
    torch.testing.assert_close(path.convert(velocity, x, t, "velocity", "score"), score, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(path.convert(score, x, t, "score", "velocity"), velocity, rtol=1e-8, atol=1e-8)


# -- singular endpoints: finite output or the documented ValueError
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("t_value", EDGE_TIMES)
@pytest.mark.parametrize("name", PATH_NAMES)
def test_conversions_finite_or_documented_error(name: str, t_value: float, dtype: torch.dtype) -> None:
    path = make_path(name)
    gen = torch.Generator().manual_seed(7)
    x, value = torch.randn(3, 2, generator=gen, dtype=dtype), torch.randn(3, 2, generator=gen, dtype=dtype)
    zeros = zero_quantities(name, t_value)
    for (src, dst), denominators in DIRECTION_DENOMINATORS.items():
        for t in (torch.full((3,), t_value, dtype=dtype), t_value):
            check_finite_or_value_error(
                lambda src=src, dst=dst, t=t: path.convert(value, x, t, src, dst),
                expect_error=bool(zeros & denominators),
            )
        check_finite_or_value_error(  # the coefficients alone, as losses and samplers use them
            lambda src=src, dst=dst: torch.stack(
                path.coefficients(torch.full((3,), t_value, dtype=dtype), src, dst)
            ),
            expect_error=bool(zeros & denominators),
        )


def test_singular_error_names_direction_and_time() -> None:
    path = make_path("linear")
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"velocity -> score.*'linear'.*t = 1"):
        path.convert(x, x, torch.tensor([0.5, 1.0]), "velocity", "score")
    with pytest.raises(ValueError, match=r"noise -> data.*t = 0"):
        path.convert(x, x, 0.0, "noise", "data")


def test_mixed_batch_of_times_raises_only_when_one_is_singular() -> None:
    """One singular row is enough to raise: no row silently becomes NaN."""
    path = make_path("vp")
    x = torch.ones(3, 2, dtype=F64)
    assert torch.isfinite(path.convert(x, x, torch.tensor([0.0, 0.5, 0.9], dtype=F64), "data", "score")).all()
    with pytest.raises(ValueError):
        path.convert(x, x, torch.tensor([0.0, 0.5, 1.0], dtype=F64), "data", "score")


def test_velocity_determinant_values() -> None:
    """det_v = alpha' beta - alpha beta' is 1 on linear, pi/2 on vp (docstring of flowscore.conversions)."""
    t = grid("vp", 7)
    for name, det in (("linear", 1.0), ("vp", math.pi / 2)):
        alpha, beta, d_alpha, d_beta = reference_schedule(name, t)
        torch.testing.assert_close(d_alpha * beta - alpha * d_beta, torch.full_like(t, det))
        c_u, c_x = make_path(name).coefficients(t, "velocity", "data")  # D = (beta u - beta' x)/det
        torch.testing.assert_close(c_u, beta / det)
        torch.testing.assert_close(c_x, -d_beta / det)
