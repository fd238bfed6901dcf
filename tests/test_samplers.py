"""Samplers against closed forms: Gaussian data N(m, s^2 I) has a linear velocity field on every path.

Ground truth, written here from the reference schedules of ``conftest`` (not from flowscore's formulas):
x_t = alpha_t m + sigma_t z with sigma_t^2 = alpha_t^2 s^2 + beta_t^2 and z = x_0 / beta_0, so the ODE map is
x_t = alpha_t m + (sigma_t / beta_0) x_0 and
the velocity u_t(x) = alpha'_t m + (sigma'_t / sigma_t)(x - alpha_t m).
The derivatives of the reference schedules come from autograd, so the fields enable grad inside the samplers.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import bcast, make_path, reference_schedule

from flowscore.mixtures import GaussianMixture
from flowscore.paths import get_path as fs_path
from flowscore.samplers import (
    EVALS_PER_STEP,
    as_field,
    diffusion_schedule,
    final_step,
    sample,
    sample_ode,
    sample_sde,
)

F64 = torch.float64


class GaussianData:
    """Closed-form fields of N(mean, std^2 I) data on the reference schedule ``name``."""

    def __init__(self, name: str, mean: torch.Tensor, std: float):
        self.name, self.mean, self.std = name, mean.to(F64), std

    def _moments(self, t: torch.Tensor, x: torch.Tensor):
        with torch.enable_grad():  # the samplers run under no_grad; the reference derivatives use autograd
            coefficients = reference_schedule(self.name, t)
        alpha, beta, d_alpha, d_beta = (bcast(c, x) for c in coefficients)
        var = alpha**2 * self.std**2 + beta**2
        return alpha, beta, d_alpha, d_beta, var

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, beta, d_alpha, d_beta, var = self._moments(t, x)
        d_log_sigma = (alpha * d_alpha * self.std**2 + beta * d_beta) / var
        return d_alpha * self.mean + d_log_sigma * (x - alpha * self.mean)

    def field(self, kind: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, beta, _, _, var = self._moments(t, x)
        resid = x - alpha * self.mean
        if kind == "velocity":
            return self.velocity(x, t)
        if kind == "score":
            return -resid / var
        if kind == "noise":
            return beta * resid / var
        return self.mean + alpha * self.std**2 * resid / var  # data: E[x_data | x]

    def model(self, kind: str):
        return lambda x, t: self.field(kind, x, t)

    def ode_map(self, x0: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x0.shape[0],), t, dtype=F64)
        alpha, beta, _, _, var = self._moments(tt, x0)
        beta0 = reference_schedule(self.name, torch.zeros(1, dtype=F64))[1]
        return alpha * self.mean + var.sqrt() * x0 / beta0


def _prior(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- ODE: transport map and convergence order ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "vp"])
def test_ode_matches_closed_form_transport(name):
    gauss = GaussianData(name, torch.tensor([1.0]), 0.5)
    x0 = _prior(200, 1)
    exact = gauss.ode_map(x0, 1.0)
    assert torch.allclose(exact, 1.0 + 0.5 * x0)  # x_1 = m + s x_0 on both paths (beta_0 = 1)
    times = torch.linspace(0, 1, 65, dtype=F64)
    x1, traj = sample_ode(gauss.velocity, x0, times, "rk4", return_trajectory=True)
    assert (x1 - exact).abs().max() < 1e-6
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], x1)
    assert (traj[32] - gauss.ode_map(x0, 0.5)).abs().max() < 1e-6  # the state at t = 1/2 too
    pytest.importorskip("torchdiffeq")
    x1 = sample_ode(gauss.velocity, x0, [0.0, 1.0], "dopri5", rtol=1e-9, atol=1e-9)
    assert (x1 - exact).abs().max() < 1e-6


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_convergence_order(method, order):
    # vp with s = 2 shows the textbook orders; on linear the midpoint rule happens to reach order 3
    gauss = GaussianData("vp", torch.tensor([1.0]), 2.0)
    x0 = _prior(50, 1)
    exact = gauss.ode_map(x0, 1.0)
    errors = [
        float(
            (sample_ode(gauss.velocity, x0, torch.linspace(0, 1, n + 1, dtype=F64), method) - exact)
            .abs()
            .max()
        )
        for n in (16, 32, 64)
    ]
    observed = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert abs(observed[-1] - order) < 0.25, (errors, observed)
    linear = GaussianData("linear", torch.tensor([1.0]), 2.0)
    exact_linear = linear.ode_map(x0, 1.0)
    err = [
        float(
            (sample_ode(linear.velocity, x0, torch.linspace(0, 1, n + 1, dtype=F64), method) - exact_linear)
            .abs()
            .max()
        )
        for n in (32, 64)
    ]
    assert math.log2(err[0] / err[1]) > order - 0.25


def test_rk4_keeps_order_four_up_to_the_data_end_on_vp_linear():
    """vp-linear's beta' diverges at t = 1; the mixture's exact field uses beta beta' in closed form, so rk4
    integrated up to t = 1 still shows order 4 (error ratio ~16 per halving) against a fine reference."""
    mixture = GaussianMixture(
        torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64), torch.tensor([0.5, 0.4], dtype=F64)
    )
    field = mixture.marginal("vp-linear").velocity
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    reference = sample_ode(field, x0, torch.linspace(0.5, 1, 1601, dtype=F64), "rk4")
    errors = [
        float(
            (sample_ode(field, x0, torch.linspace(0.5, 1, n + 1, dtype=F64), "rk4") - reference).abs().max()
        )
        for n in (10, 20, 40)
    ]
    observed = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(observed) > 3.7, (errors, observed)


# -- sample(): every prediction with every sampler reproduces the data ---------------------------------------
CASES = [
    ("velocity", "euler", {}),
    ("velocity", "rk4", {}),
    ("velocity", "dopri5", {}),
    ("velocity", "sde", {}),
    ("velocity", "sde", {"diffusion": "score-sde"}),
    ("velocity", "sde", {"diffusion": 2.0}),
    ("noise", "rk4", {}),
    ("score", "heun", {}),
    ("data", "midpoint", {}),
    ("noise", "sde", {}),
    ("score", "sde", {"diffusion": lambda t: 0.3 * torch.ones_like(t)}),
]


@pytest.mark.parametrize("name", ["linear", "vp"])
@pytest.mark.parametrize("prediction,sampler,extra", CASES)
def test_sample_reproduces_gaussian(name, prediction, sampler, extra):
    if sampler == "dopri5":
        pytest.importorskip("torchdiffeq")
    mean = torch.tensor([1.0, -0.5], dtype=F64)
    gauss = GaussianData(name, mean, 0.5)
    n = 4000
    out = sample(
        gauss.model(prediction),
        make_path(name),
        n,
        prediction=prediction,
        sampler=sampler,
        steps=100,
        shape=(2,),
        dtype=F64,
        generator=torch.Generator().manual_seed(1),
        **extra,
    )
    assert out.shape == (n, 2) and torch.isfinite(out).all()
    se_mean = 0.5 / math.sqrt(n)
    assert (out.mean(0) - mean).abs().max() < 4 * se_mean + 0.005
    var_ratio = out.var(0) / 0.25
    # 4 standard errors of a variance (sqrt(2/n)) plus a discretization allowance of 2 % (Euler, EM)
    assert (var_ratio - 1).abs().max() < 4 * math.sqrt(2 / n) + 0.02, var_ratio


def test_ode_samples_are_the_closed_form_map_of_the_prior_draws():
    gauss = GaussianData("linear", torch.tensor([0.3, 0.7]), 0.8)
    out = sample(
        gauss.model("noise"),
        "linear",
        64,
        prediction="noise",
        sampler="rk4",
        steps=200,
        dtype=F64,
        generator=torch.Generator().manual_seed(3),
    )
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    # the noise model starts at t_eps = 1e-3 (velocity singular at t = 0): a bias of order t_eps
    assert (out - gauss.ode_map(x0, 1.0)).abs().max() < 3e-3
    exact_start = sample(
        gauss.model("velocity"),
        "linear",
        64,
        sampler="rk4",
        steps=50,
        dtype=F64,
        generator=torch.Generator().manual_seed(3),
    )
    assert (exact_start - gauss.ode_map(x0, 1.0)).abs().max() < 1e-6


# -- the SDE's pieces ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "vp", "ve"])
def test_final_step_to_one_is_the_posterior_mean(name):
    gauss = GaussianData(name, torch.tensor([1.0, 2.0]), 0.7)
    path = make_path(name)
    x = 3 * _prior(16, 2)
    t = torch.full((16,), 0.97, dtype=F64)
    one = torch.tensor(1.0, dtype=F64)
    jumped = final_step(path, gauss.velocity, x, t, one)
    data_hat, noise_hat = gauss.field("data", x, t), gauss.field("noise", x, t)
    alpha1, beta1 = (float(c) for c in reference_schedule(name, one.reshape(1))[:2])
    assert torch.allclose(jumped, alpha1 * data_hat + beta1 * noise_hat, atol=1e-10)


def test_default_diffusion_formula():
    t = torch.linspace(0, 1, 11, dtype=F64)
    assert torch.allclose(diffusion_schedule("linear")(t), 1 - t)  # beta (alpha' beta - alpha beta') = 1 - t
    cos, sin = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
    assert torch.allclose(diffusion_schedule("vp", "bounded")(t), math.pi / 2 * cos)
    # the default: linear's 1 - tau at tau = alpha / (alpha + beta), times d tau / dt and (alpha + beta)^2
    tau = sin / (sin + cos)
    d_tau = (math.pi / 2) / (sin + cos) ** 2  # d/dt of sin / (sin + cos) at frequency pi / 2
    assert torch.allclose(diffusion_schedule("vp")(t), (sin + cos) ** 2 * (1 - tau) * d_tau)
    assert torch.equal(diffusion_schedule("linear")(t), diffusion_schedule("linear", "bounded")(t))
    assert torch.allclose(diffusion_schedule("linear", 3.0)(t), 3 * (1 - t))
    inner = t[1:]  # score-sde: 2 beta (alpha' beta - alpha beta') / alpha = 2 (1 - t) / t on linear
    assert torch.allclose(diffusion_schedule("linear", "score-sde")(inner), 2 * (1 - inner) / inner)
    with pytest.raises(ValueError, match="diffusion"):
        diffusion_schedule("linear", -1.0)
    with pytest.raises(ValueError, match="diffusion"):
        diffusion_schedule("linear", "nope")


def test_the_default_sde_samples_alike_on_every_path():
    """Every path is linear in other coordinates (x / (alpha + beta) at linear's time alpha / (alpha + beta)):
    with the default diffusion and grid (both linear's, carried at equal log-SNR) the SDE on vp and ve
    makes, from the same prior draws and Brownian increments, nearly linear's samples; with the path's own
    bounded diffusion on uniform times it does not. The model is the exact field of a mixture."""
    mixture, n, steps = _mixture(), 2000, 400
    out = {}
    for name in ("linear", "vp", "ve"):
        for label, diffusion, grid in (("default", None, None), ("own", "bounded", "uniform")):
            marginal = mixture.marginal(name)
            out[name, label] = sample(
                marginal.velocity, name, n, sampler="sde", steps=steps, grid=grid, diffusion=diffusion,
                dtype=F64, generator=torch.Generator().manual_seed(3),
                x_init=torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
                * float(fs_path(name).beta(torch.zeros(1, dtype=F64))),
            )  # fmt: skip
    for name in ("vp", "ve"):
        alike = (out[name, "default"] - out["linear", "default"]).norm(dim=1).mean()
        apart = (out[name, "own"] - out["linear", "own"]).norm(dim=1).mean()
        assert alike < 0.1 and apart > 8 * alike, (name, float(alike), float(apart))


def test_sde_without_noise_is_euler_on_the_ode():
    gauss = GaussianData("linear", torch.tensor([1.0]), 0.5)
    x0 = _prior(100, 1)
    times = torch.linspace(0, 1, 201, dtype=F64)
    sde = sample_sde(gauss.velocity, gauss.model("score"), x0, times, path="linear", diffusion=0.0)
    # g = 0: Euler steps, then the final deterministic step (exact for a Gaussian posterior mean)
    assert (sde - gauss.ode_map(x0, 1.0)).abs().max() < 2e-2
    ode = sample_ode(gauss.velocity, x0, times[:-1], "euler")
    expected = final_step(make_path("linear"), gauss.velocity, ode, times[-2].expand(100), times[-1])
    assert torch.allclose(sde, expected)


def test_model_calls_per_step():
    gauss = GaussianData("linear", torch.tensor([0.0, 0.0]), 1.0)
    calls = []

    def model(x, t):
        calls.append(t.shape)
        return gauss.field("noise", x, t)

    sample(model, "linear", 8, prediction="noise", sampler="sde", steps=10, dtype=F64)
    assert len(calls) == 10 and all(s == (8,) for s in calls)  # velocity and score share one call
    calls.clear()
    sample(model, "linear", 8, prediction="noise", sampler="rk4", steps=10, dtype=F64)
    assert len(calls) == 10 * EVALS_PER_STEP["rk4"]


def test_as_field_converts_through_the_path():
    gauss = GaussianData("vp", torch.tensor([0.5, -1.0]), 0.6)
    x = _prior(32, 2)
    t = torch.rand(32, generator=torch.Generator().manual_seed(4), dtype=F64) * 0.9 + 0.05
    for src in ("noise", "score", "data", "velocity"):
        for dst in ("velocity", "score", "noise", "data"):
            got = as_field(gauss.model(src), "vp", src, dst)(x, t)
            assert torch.allclose(got, gauss.field(dst, x, t), atol=1e-9), (src, dst)
    scalar_t = as_field(gauss.model("noise"), "vp", "noise", "velocity")(x, 0.5)
    assert torch.allclose(scalar_t, gauss.velocity(x, torch.full((32,), 0.5, dtype=F64)))


# -- errors --------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error(monkeypatch):
    gauss = GaussianData("linear", torch.tensor([0.0]), 1.0)
    x0 = _prior(4, 1)
    with pytest.raises(ValueError, match="monotone"):
        sample_ode(gauss.velocity, x0, [0.0, 0.5, 0.4], "euler")
    with pytest.raises(ValueError, match="unknown sampler .rk45."):
        sample_ode(gauss.velocity, x0, [0.0, 1.0], "rk45")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample_ode(gauss.velocity, x0, [0.0, 1.5], "euler")
    with pytest.raises(ValueError, match="sampler"):
        sample(gauss.velocity, "linear", 4, sampler="ddpm", shape=(1,))
    with pytest.raises(ValueError, match="steps"):
        sample(gauss.velocity, "linear", 4, steps=0, shape=(1,))
    with pytest.raises(ValueError, match="prediction"):
        sample(gauss.velocity, "linear", 4, prediction="eps", shape=(1,))
    with pytest.raises(ValueError, match="singular"):  # a noise model at t = 0 on linear
        sample_ode(as_field(gauss.model("noise"), "linear", "noise"), x0, [0.0, 1.0], "euler")
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(ValueError, match="torchdiffeq"):
        sample_ode(gauss.velocity, x0, [0.0, 1.0], "dopri5")


# -- a Gaussian mixture's exact marginal field as the model --------------------------------------------------
def _mixture(scale: float = 1.0) -> GaussianMixture:
    means = torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.2]], dtype=F64)
    return GaussianMixture(
        means, scale * torch.tensor([0.3, 0.2, 0.4], dtype=F64), torch.tensor([0.3, 0.3, 0.4])
    )


def _log_density(x: torch.Tensor, mixture) -> torch.Tensor:
    """float64 brute force log sum_k w_k N(x; m_k, s_k^2 I), written here."""
    d = x.shape[1]
    sq = ((x[:, None, :] - mixture.means[None]) ** 2).sum(-1)
    var = mixture.stds**2
    log_n = -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
    return torch.logsumexp(torch.log(mixture.weights) + log_n, 1)


# W2 and MMD between a few thousand 2D samples are too noisy to tell a 25 % error in the mode widths from
# sampling noise (measured: W2 of exact samples to fresh data 0.09-0.35 against floors 0.11-0.19 at n = 1000),
# so the distribution check is the mean log-density of the samples under the data density, E[log p(x)], whose
# standard error is sd(log p) / sqrt(n) ~ 0.017 nats at n = 4000, and the fraction of samples per mode.
@pytest.mark.parametrize("name", ["linear", "vp"])
@pytest.mark.parametrize(
    "prediction,sampler,steps",
    [
        ("velocity", "rk4", 40),
        ("velocity", "dopri5", 2),
        ("velocity", "sde", 100),
        ("noise", "rk4", 40),
        ("score", "sde", 100),
    ],
)
def test_mixture_field_reproduces_the_mixture(name, prediction, sampler, steps):
    if sampler == "dopri5":
        pytest.importorskip("torchdiffeq")
    mixture, n = _mixture(), 4000
    gen = torch.Generator().manual_seed(7)
    reference = _log_density(mixture.sample(100_000, gen), mixture)
    tolerance = 4 * float(reference.std()) / math.sqrt(n) + 0.03  # 4 SE + discretization allowance

    def draw(mix):
        marginal = mix.marginal(name)
        model = lambda x, t: marginal.field(prediction, x, t)  # noqa: E731
        return sample(
            model, name, n, prediction=prediction, sampler=sampler, steps=steps, dtype=F64, generator=gen
        )

    out = draw(mixture)
    assert abs(float(_log_density(out, mixture).mean() - reference.mean())) < tolerance
    modes = torch.cdist(out, mixture.means).argmin(1)
    fractions = torch.bincount(modes, minlength=3).double() / n
    assert (fractions - mixture.weights).abs().max() < 4 * math.sqrt(0.25 / n) + 0.01
    wrong = draw(_mixture(scale=1.25))  # the field of a mixture with 25 % wider modes must fail the check
    assert abs(float(_log_density(wrong, mixture).mean() - reference.mean())) > 3 * tolerance


def test_dopri5_never_leaves_the_time_interval():
    pytest.importorskip("torchdiffeq")
    velocity = _mixture().marginal("linear").velocity
    seen = []

    def field(x, t):
        seen.append(t)
        return velocity(x, t)

    x0 = _prior(200, 2)
    sample_ode(field, x0, [0.0, 1.0], "dopri5", rtol=1e-6, atol=1e-6)
    times = torch.cat(seen)
    assert float(times.min()) >= 0.0 and float(times.max()) <= 1.0  # no adaptive overshoot past t = 1


# -- fs.sample: labels and guidance, model checks, NFE, x_init -----------------------------------------------
class LabelledGaussians:
    """Class c of the data is N(means[c], s^2 I); the unconditional data (label -1) is N(0, s^2 I) (a model
    need not be a consistent mixture for the guidance identity). Every prediction in closed form on linear."""

    def __init__(self, means: torch.Tensor, std: float):
        self.means, self.std = means.to(F64), std

    def field(self, kind: str, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean = torch.where((y >= 0)[:, None], self.means[y.clamp(min=0)], torch.zeros_like(x))
        a, b = t[:, None], 1 - t[:, None]  # linear: alpha = t, beta = 1 - t, alpha' = 1, beta' = -1
        var = a**2 * self.std**2 + b**2
        resid = x - a * mean
        data = mean + a * self.std**2 * resid / var
        noise = b * resid / var
        return {"data": data, "noise": noise, "score": -resid / var, "velocity": data - noise}[kind]

    def model(self, kind: str):
        return lambda x, t, y: self.field(kind, x, t, y)


@pytest.mark.parametrize("prediction", ["velocity", "score", "noise", "data"])
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_guidance_gives_the_same_guided_field_in_every_prediction_space(prediction, sampler):
    """One step from t = 0.3 to 0.35 with guidance w: x + h [(1 + w) u(x, t, y) - w u(x, t, -1)], the
    guided velocity computed here by hand; DDIM on linear is the same Euler step."""
    gauss = LabelledGaussians(torch.tensor([[2.0, 0.0], [-1.0, 1.5]]), 0.4)
    x = _prior(6, 2)
    y = torch.tensor([0, 1, 0, 1, -1, 0])
    w, t, h = 2.5, 0.3, 0.05
    tt = torch.full((6,), t, dtype=F64)
    guided = (1 + w) * gauss.field("velocity", x, tt, y) - w * gauss.field(
        "velocity", x, tt, torch.full_like(y, -1)
    )
    out = sample(
        gauss.model(prediction),
        "linear",
        x_init=x,
        times=[t, t + h],
        prediction=prediction,
        sampler=sampler,
        y=y,
        guidance=w,
    )
    assert torch.allclose(out, x + h * guided, atol=1e-12)


@pytest.mark.parametrize("sampler", ["sde", "dpm++2m-sde", "unipc"])
def test_guided_sampling_calls_the_model_once_per_step_on_both_halves(sampler):
    gauss = LabelledGaussians(torch.tensor([[2.0, 0.0], [-1.0, 1.5]]), 0.4)
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        return gauss.field("noise", x, t, y)

    y = torch.tensor([0, 1, 1, 0])
    out, nfe = sample(
        model,
        "linear",
        4,
        prediction="noise",
        sampler=sampler,
        steps=12,
        y=y,
        guidance=1.0,
        dtype=F64,
        return_nfe=True,
    )
    assert torch.isfinite(out).all() and nfe == len(calls) == 12
    assert all(torch.equal(c, torch.tensor([0, 1, 1, 0, -1, -1, -1, -1])) for c in calls)
    # strong guidance pushes samples of class 0 beyond its mean (2, 0) away from the unconditional 0
    x = sample(
        gauss.model("velocity"),
        "linear",
        2000,
        sampler=sampler,
        steps=20,
        y=torch.zeros(2000, dtype=torch.long),
        guidance=1.0,
        dtype=F64,
        generator=torch.Generator().manual_seed(0),
    )
    assert float(x[:, 0].mean()) > 2.5


def test_model_output_shape_and_non_finite_values_are_caught():
    gauss = GaussianData("linear", torch.tensor([0.0, 0.0]), 1.0)
    with pytest.raises(ValueError, match="shaped like x"):
        sample(lambda x, t: gauss.velocity(x, t)[:, :1], "linear", 4, sampler="unipc", steps=5, dtype=F64)

    def blows_up(x, t):
        out = gauss.velocity(x, t)
        return out / (t[:, None] < 0.6).to(out.dtype) - out  # inf from t = 0.6 on

    for sampler in ("euler", "unipc", "sde"):
        with pytest.raises(ValueError, match=r"NaN or Inf at step 7 of 10 \(t = 0\.6"):
            sample(blows_up, "linear", 4, sampler=sampler, steps=10, grid="uniform", dtype=F64)


def test_nfe_callback_and_trajectory():
    gauss = GaussianData("linear", torch.tensor([0.5, 0.0]), 0.8)
    seen = []
    out, traj, nfe = sample(
        gauss.model("velocity"),
        "linear",
        5,
        sampler="edm-heun",
        steps=6,
        grid="karras",
        dtype=F64,
        callback=seen.append,
        return_trajectory=True,
        return_nfe=True,
    )
    # Heun steps: 2 calls, but the first (from alpha = 0) and the last (to beta = 0) are Euler steps
    assert nfe == 2 * 6 - 2 and seen[-1]["nfe"] == nfe and [s["i"] for s in seen] == list(range(6))
    assert traj.shape == (7, 5, 2) and torch.equal(traj[-1], out)
    for sampler, steps, expected in (("rk4", 5, 20), ("unipc", 9, 9), ("dpm++3m", 4, 4), ("heun", 3, 6)):
        _, n = sample(
            gauss.model("velocity"), "linear", 5, sampler=sampler, steps=steps, dtype=F64, return_nfe=True
        )
        assert n == expected, sampler


def test_x_init_at_a_start_time_follows_the_exact_map():
    gauss = GaussianData("vp", torch.tensor([1.0]), 0.5)
    x0 = _prior(100, 1)
    start = gauss.ode_map(x0, 0.4)  # exact states at t = 0.4
    for sampler in ("unipc", "rk4", "dpm++3m"):
        out = sample(
            gauss.model("velocity"), make_path("vp"), x_init=start, t_start=0.4, sampler=sampler, steps=40
        )
        assert (out - gauss.ode_map(x0, 1.0)).abs().max() < 5e-3, sampler  # a wrong start: ~0.1


def test_defaults_and_bad_arguments():
    from flowscore.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, defaults

    assert defaults() == (DEFAULT_SAMPLER, DEFAULT_STEPS[DEFAULT_SAMPLER], defaults()[2])
    assert set(DEFAULT_STEPS) == set(SAMPLERS)
    gauss = GaussianData("linear", torch.tensor([0.0]), 1.0)
    with pytest.raises(ValueError, match="grid"):
        sample(gauss.velocity, "linear", 4, grid="cosine", shape=(1,))
    with pytest.raises(ValueError, match="x_init"):
        sample(gauss.velocity, "linear", 5, x_init=_prior(4, 1))
    with pytest.raises(ValueError, match="n "):
        sample(gauss.velocity, "linear")
    with pytest.raises(ValueError, match="labels"):
        sample(gauss.velocity, "linear", 4, guidance=1.0, shape=(1,))
    with pytest.raises(ValueError, match="y must be shaped"):
        sample(lambda x, t, y: x, "linear", 4, y=torch.zeros(3, dtype=torch.long), shape=(1,))
    with pytest.raises(ValueError, match="decreasing"):
        from flowscore.samplers import encode

        encode(gauss.velocity, "linear", _prior(4, 1), times=[0.0, 1.0])
    with pytest.raises(ValueError, match="ODE sampler"):
        encode(gauss.velocity, "linear", _prior(4, 1), sampler="sde")


def test_dopri5_on_a_stiff_field_stops_after_max_steps():
    """dx/dt = -1e7 (x - cos t): explicit dopri5 needs about 1e7 / 3.3 steps for stability, so it ran for
    minutes; now it stops with a ValueError after max_steps steps (6 evaluations each, plus 2)."""
    pytest.importorskip("torchdiffeq")
    calls = []

    def stiff(x, t):
        calls.append(1)
        return -1e7 * (x - torch.cos(t)[:, None])

    x = torch.zeros(3, 1, dtype=F64)
    with pytest.raises(ValueError, match="max_steps = 50"):
        sample_ode(stiff, x, [0.0, 1.0], "dopri5", max_steps=50)
    assert len(calls) <= 6 * 50 + 2
    with pytest.raises(ValueError, match="max_steps"):
        sample(stiff, "linear", 3, sampler="dopri5", shape=(1,), dtype=F64, max_steps=20)
    with pytest.raises(ValueError, match="max_steps"):
        sample_ode(stiff, x, [0.0, 1.0], "dopri5", max_steps=0)
    # a smooth field is unaffected: the exact solution of dx/dt = -x is x0 e^{-t}
    out = sample_ode(lambda x, t: -x, torch.ones(2, 1, dtype=F64), [0.0, 1.0], "dopri5", rtol=1e-9, atol=1e-9)
    assert (out - math.exp(-1)).abs().max() < 1e-7


def test_sample_infers_the_data_shape_from_a_built_in_model():
    """README: ``fs.sample(run.model, run.path, 1000)`` on a 10-D run failed (the shape defaulted to (2,))."""
    from flowscore.models import build_model
    from flowscore.preconditioning import Preconditioned

    torch.manual_seed(0)
    model = Preconditioned(build_model("mlp", (10,), width=16, depth=1), "linear")
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    out = sample(model, "linear", 7, steps=3, generator=gen())
    assert out.shape == (7, 10)
    assert torch.equal(out, sample(model, "linear", 7, steps=3, shape=(10,), generator=gen()))
    with pytest.raises(ValueError, match=r"differs from the data shape \(10,\)"):
        sample(model, "linear", 7, steps=3, shape=(2,))
    unet = build_model("unet", (1, 8, 8))
    with pytest.raises(ValueError, match="shape=run.data_shape"):
        sample(unet, "linear", 2, steps=2)
    with pytest.raises(ValueError, match="C = 1"):
        sample(unet, "linear", 2, steps=2, shape=(3, 8, 8))
    assert sample(unet, "linear", 2, steps=2, shape=(1, 8, 8)).shape == (2, 1, 8, 8)

    class Own(torch.nn.Module):  # any model may say it with a data_shape attribute
        data_shape = (3,)

        def forward(self, x, t):
            return -x

    assert sample(Own(), "linear", 4, steps=2).shape == (4, 3)
    assert sample(lambda x, t: -x, "linear", 4, steps=2).shape == (4, 2)  # unknown: the default (2,)


def test_encode_from_the_data_end_with_the_exact_marginal_of_a_data_set():
    """README's ``fs.encode(m.velocity, path, x)`` with ``m = EmpiricalMarginal``: its fields are singular
    at t = 1 (they divide by beta_1 = 0), which made encode fail with NaN at its first step. It now starts
    at 1 - t_eps there, taking x as the state at that time: encoding the states that the ODE from the prior
    draws z reaches at 1 - t_eps gives z back (the ODE map is invertible), converging with the steps."""
    from flowscore.data import toy
    from flowscore.grids import time_grid
    from flowscore.marginals import EmpiricalMarginal
    from flowscore.samplers import encode

    path = make_path("linear")
    m = EmpiricalMarginal(toy("moons", 256, seed=0).double(), path)
    z = _prior(400, 2, seed=1)
    times = time_grid(path, 80, "logsnr", t_start=0.0, t_end=1 - 1e-3)
    x = sample(m.velocity, path, x_init=z, times=times)
    noise, nfe = encode(m.velocity, path, x, steps=80, return_nfe=True)
    assert nfe == 80 + 1  # the probing call at t = 1 counts
    assert (noise - z).abs().max() < 0.02
    # a model finite at t = 1 starts there, its probing output reused by the first step (no extra call)
    gauss = GaussianData("linear", torch.tensor([0.5, 0.0]), 0.8)
    code, nfe = encode(gauss.velocity, path, x, steps=10, return_nfe=True)
    assert nfe == 10 and torch.equal(code, encode(gauss.velocity, path, x, steps=10, t_start=1.0))


def test_x_init_stands_for_the_state_where_the_grid_starts():
    """sample's docstring: x_init starts at t_start if given, else at t = 0, or at t_eps where the sampler
    needs a prediction singular at 0 (a noise model's data prediction on linear)."""
    gauss = GaussianData("linear", torch.tensor([0.5, 0.0]), 0.8)
    x0 = _prior(6, 2)
    for prediction, first in (("velocity", 0.0), ("noise", 1e-3)):
        seen = []
        sample(
            gauss.model(prediction), "linear", x_init=x0, prediction=prediction, steps=4, callback=seen.append
        )
        assert seen[0]["t"] == first, prediction
    seen = []
    sample(
        gauss.model("noise"),
        "linear",
        x_init=x0,
        prediction="noise",
        steps=4,
        t_start=0.2,
        callback=seen.append,
    )
    assert seen[0]["t"] == 0.2


@pytest.mark.parametrize("prediction", ["velocity", "noise", "data"])
@pytest.mark.parametrize("name", ["linear", "vp"])
def test_declared_calls_per_step_equal_the_counted_model_calls(name, prediction):
    """The one sampler registry: for every sampler and grid, the model calls counted by a counting model
    equal the registry's count from its declared calls per step (edm-heun: 2 per step, 1 on the steps that
    skip its corrector; the final step of the velocity integrators and of sde: 1), and return_nfe too."""
    from flowscore.grids import GRIDS
    from flowscore.sampler_registry import REGISTRY, planned_calls

    gauss = GaussianData(name, torch.tensor([0.5, 0.0]), 0.8)
    path = make_path(name)
    for sampler, declared in REGISTRY.items():
        if declared.adaptive or sampler == "sb-sde":  # an SB-CFM model's sampler: tests/test_sbcfm.py
            continue
        for grid in GRIDS:
            calls, seen = [], []

            def model(x, t, calls=calls):
                calls.append(1)
                return gauss.field(prediction, x, t)

            _, nfe = sample(
                model, path, 3, prediction=prediction, sampler=sampler, steps=6, grid=grid, dtype=F64,
                callback=seen.append, return_nfe=True,
            )  # fmt: skip
            times = torch.tensor([seen[0]["t"]] + [s["t_next"] for s in seen], dtype=F64)
            final = sampler == "sde" or (declared.family == "t" and prediction == "data")
            expected = planned_calls(sampler, times, path, final_step=final)
            assert len(calls) == nfe == expected, (sampler, grid, len(calls), expected)
    assert REGISTRY["edm-heun"].calls_per_step == 2 and REGISTRY["rk4"].calls_per_step == 4


def test_one_vocabulary_sampler_and_a_named_result():
    """``sampler`` is the one name (``method=`` still works, with a DeprecationWarning); return_info gives a
    SampleResult whose fields do not depend on flags (the old tuples still work, deprecated)."""
    import warnings

    import flowscore as fs

    gauss = GaussianData("linear", torch.tensor([0.5, 0.0]), 0.8)
    x0 = _prior(5, 2)
    new = sample_ode(gauss.velocity, x0, [0.0, 0.5, 1.0], "rk4")
    with pytest.warns(DeprecationWarning, match="sampler="):
        old = sample_ode(gauss.velocity, x0, [0.0, 0.5, 1.0], method="rk4")
    assert torch.equal(new, old)
    with pytest.raises(ValueError, match="sampler= only"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sample_ode(gauss.velocity, x0, [0.0, 1.0], "euler", method="rk4")
    res = sample(gauss.velocity, "linear", x_init=x0, sampler="rk4", steps=3, return_info=True)
    assert isinstance(res, fs.SampleResult) and res.nfe == 12 and res.trajectory is None
    torch.testing.assert_close(res.times, torch.linspace(0, 1, 4, dtype=F64))
    assert (res.x - gauss.ode_map(x0, 1.0)).abs().max() < 1e-3  # rk4, 3 steps, on the closed-form map
    res = sample(
        gauss.velocity, "linear", x_init=x0, sampler="rk4", steps=3, return_info=True, return_trajectory=True
    )
    assert res.trajectory.shape == (4, 5, 2) and torch.equal(res.trajectory[-1], res.x)
    with pytest.warns(DeprecationWarning, match="return_info=True"):
        x, nfe = sample(gauss.velocity, "linear", x_init=x0, sampler="rk4", steps=3, return_nfe=True)
    assert nfe == 12 and torch.equal(x, res.x)
