"""The loss floor against numerical quadrature (float64 numpy, written here) and exact properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flowscore import get_path
from flowscore.floor import LossFloor, floor_terms, loss_floor
from flowscore.marginals import EmpiricalMarginal
from flowscore.mixtures import GaussianMixture

DATA_1D = np.array([-1.0, 0.5, 2.0])

SCHEDULES = {  # alpha, beta, alpha', beta' (numpy), independent of flowscore.paths
    "linear": lambda t: (t, 1 - t, np.ones_like(t), -np.ones_like(t)),
    "vp": lambda t: (
        np.sin(np.pi * t / 2),
        np.cos(np.pi * t / 2),
        np.pi / 2 * np.cos(np.pi * t / 2),
        -np.pi / 2 * np.sin(np.pi * t / 2),
    ),
}


def quadrature_floor(data: np.ndarray, name: str, kind: str, t_eps: float, t_lo=None, t_hi=None) -> float:
    """C = mean over t in [t_lo, t_hi] of (1/N) sum_i E_eps (T(x|d_i) - T(x))^2, 1D data, dense grids."""
    t_lo = t_eps if t_lo is None else t_lo
    t_hi = 1 - t_eps if t_hi is None else t_hi
    n_t = 300
    t = t_lo + (t_hi - t_lo) * (np.arange(n_t) + 0.5) / n_t  # midpoint rule
    eps = np.linspace(-9, 9, 801)
    w_eps = np.exp(-0.5 * eps**2) / math.sqrt(2 * math.pi) * (eps[1] - eps[0])
    a, b, da, db = (v[:, None, None] for v in SCHEDULES[name](t))
    total = 0.0
    for d_i in data:
        x = a * d_i + b * eps[None, :, None]  # (T, E, 1)
        logits = -((x - a * data[None, None, :]) ** 2) / (2 * b**2)  # (T, E, N)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        if kind == "velocity":
            cond = da * d_i + db * eps[None, :, None]
            marg = (w * (da * data + db * (x - a * data) / b)).sum(-1, keepdims=True)
        else:
            cond = -eps[None, :, None] / b
            marg = (w * (-(x - a * data) / b**2)).sum(-1, keepdims=True)
        total += (((cond - marg) ** 2)[..., 0] * w_eps).sum(1).mean()
    return total / len(data)


@pytest.mark.parametrize(
    "name, objective, t_eps",
    [("linear", "flow", 1e-3), ("vp", "flow", 1e-3), ("linear", "score", 0.05), ("vp", "score", 0.05)],
)
def test_floor_matches_quadrature(name, objective, t_eps):
    data = torch.tensor(DATA_1D)[:, None]
    kind = "velocity" if objective == "flow" else "score"
    want = quadrature_floor(DATA_1D, name, kind, t_eps)
    got = loss_floor(data, name, objective, n_samples=40_000, t_eps=t_eps, seed=1, progress=False)
    assert abs(got.value - want) < 4 * got.standard_error, (got.value, want, got.standard_error)
    assert got.standard_error < 0.05 * want  # the check has teeth
    # one bin against quadrature on that bin alone
    k = 4
    lo, hi = got.bin_edges[k], got.bin_edges[k + 1]
    want_bin = quadrature_floor(DATA_1D, name, kind, t_eps, lo, hi)
    assert abs(got.per_bin[k] - want_bin) < 4 * got.per_bin_standard_error[k]


def test_per_bin_values_are_consistent_with_the_overall_value():
    data = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = loss_floor(data, "vp", "flow", n_samples=6000, n_bins=7, time_sampler="logit-normal", progress=False)
    assert sum(f.bin_counts) == f.n_samples == 6000
    assert f.bin_edges == pytest.approx(np.linspace(0, 1, 8).tolist())
    weighted = sum(c * v for c, v in zip(f.bin_counts, f.per_bin, strict=True)) / f.n_samples
    assert weighted == pytest.approx(f.value, rel=1e-12)
    assert min(f.per_bin_standard_error) > 0 and f.standard_error > 0


@pytest.mark.parametrize("objective", ["flow", "score"])
@pytest.mark.parametrize("name", ["linear", "vp", "ve"])
def test_floor_of_a_one_point_data_set_is_zero(name, objective):
    data = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    f = loss_floor(data, name, objective, n_samples=2000, t_eps=0.01, progress=False)
    assert abs(f.value) < 1e-12
    assert max(abs(v) for v in f.per_bin) < 1e-12


def test_weighting_multiplies_each_draw():
    data = torch.tensor(DATA_1D)[:, None]
    marginal = EmpiricalMarginal(data, "linear")
    g = torch.Generator().manual_seed(4)
    x_data, noise = data[torch.tensor([0, 1, 2, 1])], torch.randn(4, 1, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)
    _, plain = floor_terms(marginal, x_data, "score", t, noise)
    _, weighted = floor_terms(marginal, x_data, "score", t, noise, weighting="noise")
    assert torch.allclose(weighted, (1 - t) ** 2 * plain, rtol=1e-12)
    # the plain term is (E[eps|x] - eps)^2 / beta^2 with the posterior written out here
    x = t[:, None] * x_data + (1 - t[:, None]) * noise
    w = torch.softmax(-((x - t[:, None] * data.T) ** 2) / (2 * (1 - t[:, None]) ** 2), dim=1)
    post_eps = (w * (x - t[:, None] * data.T) / (1 - t[:, None])).sum(1)
    assert torch.allclose(plain, (post_eps - noise[:, 0]) ** 2 / (1 - t) ** 2, rtol=1e-9)


def test_accepts_a_marginal_reproducible_and_serialisable():
    data = torch.randn(40, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    marginal = EmpiricalMarginal(data, get_path("linear"))
    a = loss_floor(marginal, objective="flow", n_samples=2000, seed=3, progress=False)
    b = loss_floor(data, "linear", "flow", n_samples=2000, seed=3, progress=False)
    assert isinstance(a, LossFloor)
    assert a.value == pytest.approx(b.value, rel=1e-12)
    c = loss_floor(data, "linear", "cfm", n_samples=2000, seed=3, progress=False)  # "flow" is an alias
    assert c.value == b.value and c.objective == "cfm"
    with pytest.raises(ValueError, match="objective"):
        loss_floor(data, "linear", "fm", n_samples=10, progress=False)
    assert json.loads(json.dumps(a.to_dict()))["n_samples"] == 2000


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.zeros(5, 2), "linear"), {"objective": "velocity"}, "objective"),
        ((torch.zeros(5, 2), "linear"), {"n_samples": 0}, "n_samples"),
        ((torch.zeros(5, 2), "linear"), {"n_bins": 1.5}, "n_bins"),
        ((torch.zeros(5, 2),), {}, "path"),
        (([1.0, 2.0], "linear"), {}, "data"),
        ((torch.zeros(5, 2), "linear"), {"t_eps": -0.1}, "t_eps"),
    ],
)
def test_bad_arguments_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        loss_floor(*args, progress=False, **kwargs)


def test_path_must_match_the_marginal():
    marginal = EmpiricalMarginal(torch.zeros(5, 2, dtype=torch.float64), "linear")
    with pytest.raises(ValueError, match="path"):
        loss_floor(marginal, "vp", progress=False)


@pytest.mark.parametrize("name", ["linear", "vp"])
def test_floor_of_a_gaussian_matches_its_closed_form(name):
    # data N(m, s^2 I_D): Var(x_data | x) = s^2 beta^2 / (alpha^2 s^2 + beta^2) per dim, and
    # u(x|x_data) - u(x) = (alpha' - alpha beta'/beta) (x_data - E[x_data|x]), so
    # C(t) = D (alpha' - alpha beta'/beta)^2 s^2 beta^2 / (alpha^2 s^2 + beta^2), averaged over t.
    s, dim, t_eps = 0.7, 2, 1e-3
    mixture = GaussianMixture(torch.tensor([[1.0, -0.5]], dtype=torch.float64), torch.tensor([s]))
    t = t_eps + (1 - 2 * t_eps) * (np.arange(20000) + 0.5) / 20000
    a, b, da, db = SCHEDULES[name](t)
    want = np.mean(dim * (da * b - a * db) ** 2 * s**2 / (a**2 * s**2 + b**2))
    got = loss_floor(mixture.marginal(name), objective="flow", n_samples=20_000, t_eps=t_eps, progress=False)
    assert abs(got.value - want) < 4 * got.standard_error
    assert got.standard_error < 0.02 * want
