"""Parity of objectives (issue 16): the parity weightings, matched log-SNR times, every path through the
linear network, and their defaults.

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
from flowscore.objectives import objective_from_config
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
@pytest.mark.parametrize("network_path", ["linear", "own"])
def test_the_defaults_are_the_parity_weighting_and_matched_times(name, objective, network_path):
    config = TrainConfig(path=name, objective=objective, network_path=network_path)
    assert (config.weighting, config.time_sampler) == ("auto", "auto")
    assert config.resolved_weighting() == {"linear": "linear-velocity", "own": "network"}[network_path]
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


# -- every path through the linear path's network at the matched time (network_path="linear") ----------------
def matched(name: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(k, tau, k', tau') in closed form: x_path(t) = k x_linear(tau) at equal log-SNR, k = alpha + beta,
    tau = alpha / k."""
    alpha, beta, d_alpha, d_beta = schedule(name, t)
    k = alpha + beta
    return k, alpha / k, d_alpha + d_beta, (d_alpha * beta - alpha * d_beta) / k**2


def time_of_linear(name: str, tau: torch.Tensor) -> torch.Tensor:
    """The time of ``name`` whose log-SNR is linear's at ``tau`` (closed forms: sigma = (1 - tau) / tau)."""
    sigma = (1 - tau) / tau
    if name == "vp":
        return torch.atan(1 / sigma) * 2 / math.pi
    if name == "ve":
        return torch.log(sigma / 80.0) / math.log(0.002 / 80.0)
    b0, b1 = 0.1, 20.0  # vp-linear: e^{-T} = 1 / (1 + sigma^2), T(s) = b0 s + (b1 - b0) s^2 / 2, s = 1 - t
    big_t = torch.log1p(sigma**2)
    s = (-b0 + torch.sqrt(b0**2 + 2 * (b1 - b0) * big_t)) / (b1 - b0)
    return 1 - s


def linear_model(net: nn.Module, x_lin: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """linear's preconditioned velocity c_out F(c_in x, tau), the scalings written out."""
    c_in = 1 / torch.sqrt(tau**2 * DATA_STD**2 + (1 - tau) ** 2)
    return math.sqrt(1 + DATA_STD**2) * net(c_in[:, None] * x_lin, tau)


@pytest.mark.parametrize("name", ["vp", "vp-linear", "ve"])
@pytest.mark.parametrize("prediction", ["velocity", "score", "noise", "data"])
def test_a_paths_model_through_the_linear_network_is_the_linear_model_at_the_matched_time(name, prediction):
    """v_path(x, t) = (k'/k) x + k tau' v_linear(x / k, tau) with the same weights, then the closed-form
    conversions out of the velocity (docs/theory.md sections 5 and 16)."""
    x_data, t, noise = draws(seed=4)
    net = KnownNet()
    model = Preconditioned(net, name, prediction, sigma_data=DATA_STD, network_path="linear")
    alpha, beta, d_alpha, d_beta = (c[:, None] for c in schedule(name, t))
    x = alpha * x_data + beta * noise
    k, tau, d_k, d_tau = matched(name, t)
    v = (d_k / k)[:, None] * x + (k * d_tau)[:, None] * linear_model(net, x / k[:, None], tau)
    det = d_alpha * beta - alpha * d_beta
    expected = {
        "velocity": v,
        "data": (beta * v - d_beta * x) / det,
        "noise": (d_alpha * x - alpha * v) / det,
        "score": (alpha * v - d_alpha * x) / (beta * det),
    }[prediction]
    torch.testing.assert_close(model(x, t), expected, rtol=1e-8, atol=1e-9)
    own = Preconditioned(net, name, prediction, sigma_data=DATA_STD)  # the old model differs: not vacuous
    assert float((own(x, t) - expected).abs().max()) > 1e-2
    # finite on the closed interval, every prediction
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    assert bool(torch.isfinite(model(torch.randn(2, 2, dtype=F64), ends)).all())


@pytest.mark.parametrize("prediction", ["velocity", "score", "noise", "data"])
def test_on_linear_the_linear_network_is_the_own_model_bit_for_bit(prediction):
    x_data, t, noise = draws(seed=5)
    net = KnownNet()
    x = t[:, None] * x_data + (1 - t[:, None]) * noise
    a = Preconditioned(net, "linear", prediction, DATA_STD, network_path="linear")(x, t)
    assert torch.equal(a, Preconditioned(net, "linear", prediction, DATA_STD)(x, t))


@pytest.mark.parametrize("name", ["vp", "vp-linear", "ve"])
@pytest.mark.parametrize("objective", ["cfm", "dsm"])
@pytest.mark.parametrize("prediction", ["velocity", "noise"])
def test_with_the_defaults_each_sample_costs_linear_cfms_loss_at_the_matched_time(
    name, objective, prediction
):
    """The default objective (network_path linear, weighting linear-velocity) at the path's time matched to
    linear's tau: the per-sample loss is linear cfm's ||v_lin(x_lin, tau) - (x_data - noise)||^2, for the same
    draws."""
    g = torch.Generator().manual_seed(6)
    x_data, noise = (
        0.5 * torch.randn(50, 2, generator=g, dtype=F64),
        torch.randn(50, 2, generator=g, dtype=F64),
    )
    lo, hi = half_log_snr_law(name)
    tau = lo + (hi - lo) * torch.rand(50, generator=g, dtype=F64)
    config = TrainConfig(path=name, objective=objective, prediction=prediction)
    objective_ = objective_from_config(config)
    net = KnownNet()
    got = objective_.per_sample(
        objective_.wrap(net), objective_.draw(x_data, t=time_of_linear(name, tau), noise=noise)
    )
    x_lin = tau[:, None] * x_data + (1 - tau[:, None]) * noise
    expected = (linear_model(net, x_lin, tau) - (x_data - noise)).pow(2).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "vp-linear", "ve"])
@pytest.mark.parametrize("objective", ["cfm", "dsm"])
def test_with_the_defaults_the_expected_loss_is_linear_cfms_by_monte_carlo(name, objective):
    """E[loss] of the default objective, drawing its own times, against linear cfm's loss with the same
    network over uniform times on the common range of noise levels (closed form), float64 Monte Carlo."""
    n = 200_000
    config = TrainConfig(path=name, objective=objective)
    objective_ = objective_from_config(config)
    net = KnownNet()
    x_data = 0.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    got = objective_.loss(objective_.wrap(net), x_data, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(9)
    lo, hi = half_log_snr_law(name)
    tau = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    data, noise = 0.5 * torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)
    x_lin = tau[:, None] * data + (1 - tau[:, None]) * noise
    expected = (linear_model(net, x_lin, tau) - (data - noise)).pow(2).sum(1)
    se = math.sqrt((got.var() + expected.var()) / n)
    assert abs(float(got.mean() - expected.mean())) < 4 * se
    # the own network with the same weighting and times trains another loss (the test can fail)
    own = objective_from_config(
        TrainConfig(path=name, objective=objective, network_path="own", weighting="linear-velocity")
    )
    other = own.loss(own.wrap(net), x_data, generator=torch.Generator().manual_seed(8))
    assert abs(float(other.mean() - expected.mean())) > 10 * se


def test_stored_runs_keep_the_own_network_and_the_old_defaults_remain_reachable():
    stored = TrainConfig(path="vp").to_dict()
    del stored["network_path"]  # a run stored before the option
    config = _stored_config(stored)
    assert config.network_path == "own" and config.resolved_weighting() == "network"
    net = KnownNet()
    x_data, t, noise = draws(seed=8)
    x = x_data * torch.sin(math.pi / 2 * t)[:, None] + noise * torch.cos(math.pi / 2 * t)[:, None]
    model = objective_from_config(config).wrap(net)
    torch.testing.assert_close(
        model(x, t), Preconditioned(net, "vp", "velocity", DATA_STD)(x, t), rtol=0, atol=0
    )
    fresh = objective_from_config(TrainConfig(path="vp")).wrap(net)
    assert fresh.network_path == "linear" and not torch.allclose(fresh(x, t), model(x, t))
