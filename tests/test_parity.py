"""Parity of objectives (issue 16): the "network" weighting, matched log-SNR times, and their defaults.

Ground truth is written out here: the schedules in closed form, the preconditioning's c_in and c_out from
their formulas, the network F known exactly, and the law of the log-SNR in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowscore import losses
from flowscore.config import DATA_STD, TrainConfig, parity_defaults
from flowscore.marginals import EmpiricalMarginal
from flowscore.paths import get_path
from flowscore.preconditioning import Preconditioned
from flowscore.runs import _stored_config

F64 = torch.float64
PATHS = ("linear", "vp", "vp-linear", "ve")
T_EPS = 1e-3


def schedule(name: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(alpha, beta, alpha', beta') in closed form (docs/theory.md section 6), default constants."""
    if name == "linear":
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
    if name == "vp":
        h = math.pi / 2
        return torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t)
    if name == "ve":
        lo, hi = 0.002, 80.0
        beta = hi ** (1 - t) * lo**t
        return torch.ones_like(t), beta, torch.zeros_like(t), beta * math.log(lo / hi)
    b0, b1 = 0.1, 20.0  # vp-linear
    s = 1 - t
    rate, big_t = b0 + s * (b1 - b0), b0 * s + 0.5 * s**2 * (b1 - b0)
    alpha, beta = torch.exp(-big_t / 2), torch.sqrt(1 - torch.exp(-big_t))
    return alpha, beta, 0.5 * rate * alpha, -rate * torch.exp(-big_t) / (2 * beta)


class KnownNet(nn.Module):
    """F(z, t) = tanh(z W + t b): a fixed function, evaluated again by the test."""

    def __init__(self, dim: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.randn(dim, dim, generator=g, dtype=F64)
        self.b = torch.randn(dim, generator=g, dtype=F64)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.w + t[:, None] * self.b)


def draws(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_data = 0.5 * torch.randn(n, 2, generator=g, dtype=F64) + torch.tensor([1.0, -0.5], dtype=F64)
    t = torch.cat(
        [torch.tensor([0.002, 0.998], dtype=F64), 0.01 + 0.98 * torch.rand(n - 2, generator=g, dtype=F64)]
    )
    return x_data, t, torch.randn(n, 2, generator=g, dtype=F64)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("objective", ["cfm", "dsm"])
@pytest.mark.parametrize("prediction", ["velocity", "score", "noise", "data"])
def test_network_weighting_is_the_squared_error_of_the_preconditioned_network(name, objective, prediction):
    x_data, t, noise = draws()
    net = KnownNet()
    model = Preconditioned(net, name, prediction, sigma_data=DATA_STD)
    loss = losses.objective_loss(
        objective, model, x_data, name, t, noise, prediction=prediction, weighting="network", reduction="none"
    )
    alpha, beta, d_alpha, d_beta = (c[:, None] for c in schedule(name, t))
    c_in = 1 / torch.sqrt(alpha**2 * DATA_STD**2 + beta**2)
    c_out = torch.sqrt(d_alpha**2 * DATA_STD**2 + d_beta**2)
    x = alpha * x_data + beta * noise
    f_target = (d_alpha * x_data + d_beta * noise) / c_out
    expected = (1 + DATA_STD**2) * (net(c_in * x, t) - f_target).pow(2).sum(1)  # k ||F - F*||^2
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", PATHS)
def test_cfm_and_dsm_are_one_loss_with_the_network_weighting(name):
    x_data, t, noise = draws(seed=1)
    torch.manual_seed(0)
    model = Preconditioned(
        _TimeFree(nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()), name
    )
    per = {
        obj: losses.objective_loss(
            obj, model, x_data, name, t, noise, prediction="velocity", weighting="network", reduction="none"
        )
        for obj in ("cfm", "dsm")
    }
    torch.testing.assert_close(per["cfm"], per["dsm"], rtol=1e-8, atol=1e-12)
    assert bool((per["cfm"] > 1e-3).all())  # a real loss, not two zeros
    marginal = EmpiricalMarginal(x_data[:12], name)
    per = {
        obj: losses.objective_loss(
            obj,
            model,
            x_data,
            marginal,
            t,
            noise,
            prediction="velocity",
            weighting="network",
            reduction="none",
        )
        for obj in ("fm", "sm")
    }
    torch.testing.assert_close(per["fm"], per["sm"], rtol=1e-6, atol=1e-10)


class _TimeFree(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def half_log_snr_law(name: str) -> tuple[float, float]:
    """The range (u_lo, u_hi) of linear's times whose log-SNR the path reaches in [t_eps, 1 - t_eps]: linear's
    log-SNR is 2 log(u / (1 - u)), so u = sigmoid(lambda / 2)."""
    ends = torch.tensor([T_EPS, 1 - T_EPS], dtype=F64)
    alpha, beta, _, _ = schedule(name, ends)
    u = torch.sigmoid(torch.log(alpha / beta))
    return max(T_EPS, float(u[0])), min(1 - T_EPS, float(u[1]))


def cdf_of_log_snr(name: str, lam: torch.Tensor) -> torch.Tensor:
    u_lo, u_hi = half_log_snr_law(name)
    return ((torch.sigmoid(lam / 2) - u_lo) / (u_hi - u_lo)).clamp(0, 1)


def log_snr(name: str, t: torch.Tensor) -> torch.Tensor:
    alpha, beta, _, _ = schedule(name, t)
    return 2 * torch.log(alpha / beta)


def ks_statistic(name: str, t: torch.Tensor) -> float:
    lam = torch.sort(log_snr(name, t.to(F64))).values
    n = lam.numel()
    cdf = cdf_of_log_snr(name, lam)
    i = torch.arange(1, n + 1, dtype=F64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


@pytest.mark.parametrize("name", ["vp", "vp-linear", "ve"])
def test_matched_times_have_the_log_snr_law_of_uniform_times_on_linear(name):
    sampler = losses.snr_matched(name, "linear", T_EPS)
    n = 20_000
    t = losses.sample_time(n, time_sampler=sampler, t_eps=T_EPS, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= T_EPS and float(t.max()) <= 1 - T_EPS
    bound = 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov at the 1 % level
    assert ks_statistic(name, t) < bound
    # the same test rejects uniform times on this path (it can fail)
    uniform = losses.sample_time(n, t_eps=T_EPS, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert ks_statistic(name, uniform) > 3 * bound
    # quantiles of the log-SNR against the closed form
    u_lo, u_hi = half_log_snr_law(name)
    q = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    u = u_lo + q * (u_hi - u_lo)
    expected = 2 * torch.log(u / (1 - u))
    got = torch.quantile(log_snr(name, t.to(F64)), q)
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0)


@pytest.mark.parametrize("name", ["vp", "vp-linear", "ve"])
def test_matched_times_density_integrates_to_one_and_is_the_derivative_of_the_cdf(name):
    sampler = losses.snr_matched(name, "linear", T_EPS)
    v = torch.linspace(0, 1, 400_001, dtype=F64)
    assert abs(float(torch.trapezoid(sampler.density(v), v)) - 1) < 1e-4
    t = torch.linspace(0.01, 0.99, 99, dtype=F64)
    h = 1e-6
    numeric = (cdf_of_log_snr(name, log_snr(name, t + h)) - cdf_of_log_snr(name, log_snr(name, t - h))) / (
        2 * h
    )
    torch.testing.assert_close(sampler.time_density(t), numeric, rtol=1e-5, atol=1e-8)
    assert float(sampler.time_density(torch.tensor([0.0, 1.0], dtype=F64)).abs().max()) == 0.0
    # the likelihood weighting divides by it: p_uniform / p on [t_eps, 1 - t_eps]
    ratio = losses.time_density_ratio(t, sampler, T_EPS)
    torch.testing.assert_close(ratio, 1 / ((1 - 2 * T_EPS) * numeric), rtol=1e-5, atol=0)


def test_matched_times_on_linear_are_the_uniform_times_bit_for_bit():
    sampler = losses.snr_matched("linear", "linear", T_EPS)
    for dtype in (torch.float32, F64):
        a = losses.sample_time(
            999, time_sampler=sampler, generator=torch.Generator().manual_seed(5), dtype=dtype
        )
        b = losses.sample_time(
            999, time_sampler="uniform", generator=torch.Generator().manual_seed(5), dtype=dtype
        )
        assert torch.equal(a, b)


def test_matched_times_need_t_eps_above_zero_off_the_reference():
    with pytest.raises(ValueError, match="t_eps > 0"):
        losses.snr_matched("vp", "linear", 0.0)
    with pytest.raises(ValueError, match="t_eps > 0"):
        TrainConfig(path="vp", t_eps=0.0)
    assert TrainConfig(path="vp", t_eps=0.0, time_sampler="uniform").resolved_weighting() is None


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("objective", ["cfm", "fm", "dsm", "sm"])
def test_the_defaults_are_the_network_weighting_and_matched_times(name, objective):
    config = TrainConfig(path=name, objective=objective)
    assert (config.weighting, config.time_sampler) == ("auto", "auto")
    assert config.resolved_weighting() == "network"
    sampler = config.resolved_time_sampler()
    if name == "linear":
        assert sampler == "uniform"
    else:
        t = sampler(5000, torch.Generator().manual_seed(0))
        assert ks_statistic(name, t) < 1.63 / math.sqrt(5000)
    raw = parity_defaults(name, objective, precondition=False)
    assert raw == {"weighting": "noise" if objective in ("dsm", "sm") else None, "time_sampler": "uniform"}


@pytest.mark.parametrize(
    ("name", "objective", "precondition", "weighting"),
    [("linear", "cfm", True, None), ("ve", "cfm", True, "noise"), ("ve", "cfm", False, None),
     ("vp", "dsm", True, "noise"), ("linear", "sm", False, "noise")],
)  # fmt: skip
def test_runs_stored_with_named_times_keep_the_weighting_they_were_trained_with(
    name, objective, precondition, weighting
):
    stored = {**TrainConfig(path=name, objective=objective).to_dict(), "time_sampler": "uniform"}
    stored.update(weighting="auto", precondition=precondition)
    config = _stored_config(stored)
    assert (config.resolved_weighting(), config.resolved_time_sampler()) == (weighting, "uniform")


def test_the_network_weighting_follows_sigma_data():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    path = get_path("vp")
    for sigma in (0.5, 1.0, 2.0):
        _, _, d_alpha, d_beta = schedule("vp", t)
        expected = (1 + sigma**2) / (d_alpha**2 * sigma**2 + d_beta**2)
        got = losses.loss_weight(path, t, "velocity", "network", sigma_data=sigma)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="sigma_data"):
        losses.loss_weight(path, t, "velocity", "network", sigma_data=0.0)


@pytest.mark.parametrize("name", ["vp", "vp-linear", "ve"])
@pytest.mark.parametrize("objective", ["cfm", "dsm"])
def test_linear_velocity_weighting_is_the_linear_paths_velocity_error_at_the_same_log_snr(name, objective):
    x_data, t, noise = draws(seed=2)
    net = KnownNet()
    model = Preconditioned(net, name, "velocity", sigma_data=DATA_STD)
    loss = losses.objective_loss(
        objective, model, x_data, name, t, noise, prediction="velocity", weighting="linear-velocity",
        reduction="none",
    )  # fmt: skip
    alpha, beta, d_alpha, d_beta = (c[:, None] for c in schedule(name, t))
    x = alpha * x_data + beta * noise
    v = model(x, t)
    d_v = d_alpha * beta - alpha * d_beta
    noise_hat = (d_alpha * x - alpha * v) / d_v  # the model's noise and data predictions
    data_hat = (x - beta * noise_hat) / alpha
    # on linear at the same log-SNR the velocity is data - noise: the model's, and the target
    expected = ((data_hat - noise_hat) - (x_data - noise)).pow(2).sum(1)
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("weighting", ["network", "linear-velocity"])
def test_the_parity_weightings_are_exactly_one_for_cfm_on_linear_so_linear_cfm_is_unchanged(weighting):
    t = losses.sample_time(100_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(losses.loss_weight(get_path("linear"), t, "velocity", weighting), torch.ones_like(t))
