"""The few-step solvers (flowscore.solvers): order of accuracy on exact fields, exactness where the theory
says so, and agreement with k-diffusion and diffusers where those are installed.

Ground truth: Gaussian data N(m, s^2) has the closed-form ODE map x_b = alpha_b m + (sd_b / sd_a)(x_a -
alpha_a m), sd_t^2 = alpha_t^2 s^2 + beta_t^2, written here with the reference schedules of ``conftest``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_path, reference_schedule

from flowscore.grids import t_of_sigma, time_grid
from flowscore.mixtures import GaussianMixture
from flowscore.samplers import encode, sample

F64 = torch.float64
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from peers import diffusers_dpm_solver, k_diffusion_sampling  # noqa: E402


class Gaussian:
    """N(mean, std^2) data on the reference schedule ``name``: every prediction and the exact ODE map."""

    def __init__(self, name: str, mean: float, std: float):
        self.name, self.mean, self.std = name, mean, std

    def _sched(self, t: torch.Tensor):
        with torch.enable_grad():
            alpha, beta, d_alpha, d_beta = reference_schedule(self.name, t)
        return alpha, beta

    def sd(self, t: torch.Tensor) -> torch.Tensor:
        alpha, beta = self._sched(t)
        return torch.sqrt(alpha**2 * self.std**2 + beta**2)

    def model(self, kind: str):
        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            alpha, beta = (c[:, None] for c in self._sched(t))
            var = alpha**2 * self.std**2 + beta**2
            resid = x - alpha * self.mean
            if kind == "data":
                return self.mean + alpha * self.std**2 * resid / var
            if kind == "noise":
                return beta * resid / var
            raise ValueError(kind)

        return predict

    def ode_map(self, x: torch.Tensor, t_a: float, t_b: float) -> torch.Tensor:
        ta, tb = torch.tensor([t_a], dtype=F64), torch.tensor([t_b], dtype=F64)
        alpha_a, alpha_b = self._sched(ta)[0], self._sched(tb)[0]
        return alpha_b * self.mean + self.sd(tb) / self.sd(ta) * (x - alpha_a * self.mean)


def _x(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- order of accuracy ---------------------------------------------------------------------------------------
ORDERS = [("ddim", 1), ("dpm++2m", 2), ("dpm++3m", 3), ("unipc", 3), ("edm-heun", 2)]


@pytest.mark.parametrize("sampler,order", ORDERS)
@pytest.mark.parametrize("direction", ["sample", "encode"])
def test_observed_order_of_accuracy(sampler, order, direction):
    """From sigma = 1e4 (the noise end, where the data prediction hardly changes, so the lower-order warm-up
    steps of the multistep solvers add little) to sigma = 0.05, on a log-SNR grid of 16, 32, 64 steps; and
    back for encode."""
    gauss = Gaussian("vp", 1.0, 2.0)
    t_noisy, t_clean = float(t_of_sigma("vp", 1e4)), float(t_of_sigma("vp", 0.05))
    t_a, t_b = (t_noisy, t_clean) if direction == "sample" else (t_clean, t_noisy)
    x = _x()
    exact = gauss.ode_map(x, t_a, t_b)
    errors = []
    for steps in (16, 32, 64):
        times = time_grid("vp", steps, "logsnr", t_start=t_a, t_end=t_b)
        kind = "data" if direction == "sample" else "noise"
        run = sample if direction == "sample" else encode
        kwargs = {"x_init": x} if direction == "sample" else {}
        out = run(
            gauss.model(kind),
            make_path("vp"),
            *(() if direction == "sample" else (x,)),
            prediction=kind,
            sampler=sampler,
            times=times,
            **kwargs,
        )
        errors.append(float((out - exact).abs().max()))
    observed = math.log2(errors[1] / errors[2])
    if sampler == "unipc" or sampler == "dpm++3m":
        assert order - 0.3 < observed < order + 1.3, (errors, observed)
    else:
        assert abs(observed - order) < 0.3, (errors, observed)


def test_dpmpp_3m_integrates_a_quadratic_data_prediction_exactly():
    """A model whose data prediction is a quadratic in lambda = log(alpha/beta), independent of x: the exact
    solution is x_b = (beta_b/beta_a) x_a + beta_b int e^lambda D(lambda) dlambda, in closed form here. A
    third-order multistep integrates it exactly after the warm-up (so from the third step on)."""
    path = make_path("ve")  # alpha = 1, beta = sigma, lambda = -log sigma

    def lam(t: torch.Tensor) -> torch.Tensor:
        return -torch.log(reference_schedule("ve", t)[1])

    def model(x, t):
        return (0.3 + 0.2 * lam(t) - 0.05 * lam(t) ** 2)[:, None].expand_as(x)

    def primitive(l: float) -> float:  # int e^l (0.3 + 0.2 l - 0.05 l^2) dl
        return math.exp(l) * (0.3 + 0.2 * (l - 1) - 0.05 * (l**2 - 2 * l + 2))

    times = time_grid(path, 8, "logsnr", t_start=0.2, t_end=0.9)
    x = _x(4)
    # the first two steps are the warm-up: start the exact comparison from the state after them
    states = []
    sample(
        model,
        path,
        x_init=x,
        prediction="data",
        sampler="dpm++3m",
        times=times,
        callback=lambda info: states.append(info["x"]),
    )
    lams = [float(lam(t.reshape(1))) for t in times]
    betas = [math.exp(-v) for v in lams]
    expected = (betas[-1] / betas[2]) * states[1] + betas[-1] * (primitive(lams[-1]) - primitive(lams[2]))
    assert (states[-1] - expected).abs().max() < 1e-10
    kd = k_diffusion_sampling()
    if kd is not None:  # k-diffusion's 3M (eta = 0) halves the D'' term: not exact for a quadratic
        from flowscore.adapters import to_denoiser

        sigmas = torch.tensor(betas, dtype=F64)
        theirs = kd.sample_dpmpp_3m_sde(
            to_denoiser(model, path, "data"), x, sigmas, eta=0.0, disable=True, noise_sampler=lambda *_: 0.0
        )
        assert (theirs - states[-1]).abs().max() > 1e-4


# -- endpoints -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "dpm++3m", "unipc", "edm-heun", "dpm++2m-sde"])
@pytest.mark.parametrize("name", ["linear", "vp", "vp-linear", "ve"])
def test_full_range_sampling_is_finite_and_close(name, sampler):
    """From t = 0 (alpha = 0 on linear, vp) to t = 1 (beta = 0): no NaN, and ODE samples close to the exact
    map of the same prior draws (a velocity-derived data prediction is finite at t = 0)."""
    mixture = GaussianMixture(torch.tensor([[1.0], [-1.0]], dtype=F64), torch.tensor([0.4, 0.4], dtype=F64))
    marginal = mixture.marginal(make_path(name))
    x0 = make_path(name).sample_prior((200, 1), generator=torch.Generator().manual_seed(0), dtype=F64)
    out = sample(
        marginal.velocity,
        make_path(name),
        x_init=x0,
        sampler=sampler,
        steps=40,
        grid="karras",
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.isfinite(out).all()
    if sampler == "dpm++2m-sde":  # samples of the mixture: both modes, about the right spread
        assert abs(float((out.abs() - 1).abs().mean()) - 0.32) < 0.1
        return
    reference = sample(marginal.velocity, make_path(name), x_init=x0, sampler="rk4", steps=400)
    assert (out - reference).abs().max() < (0.2 if sampler == "ddim" else 0.05)  # ddim: first order


def test_encode_inverts_sample_on_an_exact_field():
    mixture = GaussianMixture(
        torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64), torch.tensor([0.5, 0.4], dtype=F64)
    )
    velocity = mixture.marginal("linear").velocity
    noise = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for sampler, steps, tolerance in (("unipc", 100, 2e-3), ("rk4", 50, 2e-4)):
        data = sample(velocity, "linear", x_init=noise, sampler=sampler, steps=steps, grid="uniform")
        back = encode(velocity, "linear", data, sampler=sampler, steps=steps, grid="uniform")
        assert (back - noise).abs().max() < tolerance, (sampler, (back - noise).abs().max())


# -- peers ---------------------------------------------------------------------------------------------------
K_PAIRS = [("ddim", "euler", 12), ("dpm++2m", "dpmpp_2m", 12), ("edm-heun", "heun", 7)]


@pytest.mark.parametrize("ours,theirs,steps", K_PAIRS)
@pytest.mark.parametrize("name", ["linear", "vp"])
def test_same_as_k_diffusion(ours, theirs, steps, name):
    kd = k_diffusion_sampling()
    if kd is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    from flowscore.adapters import to_denoiser

    mixture = GaussianMixture(
        torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64), torch.tensor([0.3, 0.2], dtype=F64)
    )
    velocity = mixture.marginal(name).velocity
    path = make_path(name)
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0, rho=7.0).to(F64)  # float32 ramp: sigma_max ~ 80
    t0 = float(t_of_sigma(path, sigmas[0]))
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * float(
        path.beta(torch.tensor(t0, dtype=F64))
    )
    alpha0 = float(path.alpha(torch.tensor(t0, dtype=F64)))
    theirs_out = getattr(kd, f"sample_{theirs}")(
        to_denoiser(velocity, path), x0 / alpha0, sigmas, disable=True
    )
    times = t_of_sigma(path, sigmas)
    ours_out = sample(velocity, path, x_init=x0, sampler=ours, times=times)
    assert (ours_out - theirs_out).abs().max() < 1e-9  # alpha(1) = 1: same scaling at the end


def test_dpmpp_3m_against_k_diffusion_up_to_its_second_derivative_term():
    """k-diffusion's dpmpp_3m_sde at eta = 0 weights the D'' term with phi_3 where the exact integral of the
    quadratic is 2 phi_3 (see test above): the two agree through the first two steps (orders 1 and 2)."""
    kd = k_diffusion_sampling()
    if kd is None:
        pytest.skip("k-diffusion is not installed")
    from flowscore.adapters import to_denoiser

    gauss = Gaussian("ve", 0.5, 1.0)
    path = make_path("ve")
    sigmas = torch.tensor([80.0, 20.0, 5.0], dtype=F64)
    x0 = 80 * _x(10)
    theirs = kd.sample_dpmpp_3m_sde(
        to_denoiser(gauss.model("data"), path, "data"),
        x0,
        sigmas,
        eta=0.0,
        disable=True,
        noise_sampler=lambda *_: 0.0,
    )
    ours = sample(
        gauss.model("data"),
        path,
        x_init=x0,
        prediction="data",
        sampler="dpm++3m",
        times=t_of_sigma(path, sigmas),
    )
    assert (ours - theirs).abs().max() < 1e-10


@pytest.mark.parametrize("name", ["linear", "vp"])
def test_dpmpp_2m_same_as_diffusers(name):
    pytest.importorskip("diffusers")
    from flowscore.adapters import to_denoiser

    mixture = GaussianMixture(
        torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64), torch.tensor([0.3, 0.2], dtype=F64)
    )
    velocity = mixture.marginal(name).velocity
    path = make_path(name)
    ramp = torch.linspace(0, 1, 10, dtype=F64)
    sigmas = torch.cat(
        [(80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, torch.zeros(1, dtype=F64)]
    )
    t0 = float(t_of_sigma(path, 80.0))
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * float(
        path.beta(torch.tensor(t0, dtype=F64))
    )
    theirs, calls = diffusers_dpm_solver(
        to_denoiser(velocity, path), x0 / float(path.alpha(torch.tensor(t0, dtype=F64))), sigmas
    )
    ours, nfe = sample(
        velocity, path, x_init=x0, sampler="dpm++2m", times=t_of_sigma(path, sigmas), return_nfe=True
    )
    assert calls == nfe == 10
    assert (ours - theirs).abs().max() < 1e-6


@pytest.mark.parametrize("steps", [4, 12])
def test_unipc_same_as_diffusers(steps):
    pytest.importorskip("diffusers")
    from flowscore.adapters import to_denoiser

    mixture = GaussianMixture(
        torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64), torch.tensor([0.3, 0.2], dtype=F64)
    )
    path = make_path("linear")
    velocity = mixture.marginal(path).velocity
    ramp = torch.linspace(0, 1, steps, dtype=F64)
    sigmas = torch.cat(
        [(80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, torch.zeros(1, dtype=F64)]
    )
    t0 = float(t_of_sigma(path, 80.0))
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * (1 - t0)
    theirs, calls = diffusers_dpm_solver(to_denoiser(velocity, path), x0 / t0, sigmas, scheduler="unipc")
    ours, nfe = sample(
        velocity, path, x_init=x0, sampler="unipc", times=t_of_sigma(path, sigmas), return_nfe=True
    )
    assert calls == nfe == steps
    assert (ours - theirs).abs().max() < 1e-6


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_order_is_p_plus_one_on_an_interior_interval(order):
    """UniPC-p with its corrector is of order p + 1, also on an interval away from the noise end (sigma 3 ->
    0.3, where the data prediction varies): measured against a float64 RK4 solution of the exact field of a
    Gaussian mixture (4000 steps in t, far more accurate). Keeping order p on the last steps matters: a
    lower-order last predictor (no corrector after it) made p = 2 and 3 converge at order 2."""
    from flowscore.samplers import sample_ode
    from flowscore.solvers import sample_unipc

    mixture = GaussianMixture(
        torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64), torch.tensor([0.3, 0.2], dtype=F64)
    )
    path = make_path("linear")
    velocity = mixture.marginal(path).velocity
    t_a, t_b = float(t_of_sigma(path, 3.0)), float(t_of_sigma(path, 0.3))
    x = (1 - t_a) * torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    reference = sample_ode(velocity, x, torch.linspace(t_a, t_b, 4001, dtype=F64), "rk4")
    errors = []
    for steps in (64, 128, 256):
        times = time_grid(path, steps, "logsnr", t_start=t_a, t_end=t_b)
        out = sample_unipc(velocity, x, times, path=path, order=order)
        errors.append(float((out - reference).abs().max()))
    observed = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(o - (order + 1)) < 0.35 for o in observed), (errors, observed)


def test_dpmpp_3m_is_order_three_from_high_noise_only():
    """What its docstring says: from sigma = 1e4 at least order 3; on the interior interval sigma 10 -> 0.1
    its warm-up steps (orders 1, 2) make it order 2. Against the exact ODE map of Gaussian data on vp."""
    from flowscore.solvers import sample_dpmpp_3m

    gauss, observed = Gaussian("vp", 1.0, 2.0), {}
    for sigma_hi, sigma_lo in ((1e4, 0.05), (10.0, 0.1)):
        t_a, t_b = float(t_of_sigma("vp", sigma_hi)), float(t_of_sigma("vp", sigma_lo))
        x = _x()
        exact = gauss.ode_map(x, t_a, t_b)
        errors = []
        for steps in (64, 128):
            times = time_grid("vp", steps, "logsnr", t_start=t_a, t_end=t_b)
            out = sample_dpmpp_3m(gauss.model("data"), x, times, path=make_path("vp"), prediction="data")
            errors.append(float((out - exact).abs().max()))
        observed[sigma_hi] = math.log2(errors[0] / errors[1])
    assert observed[1e4] > 2.7 and abs(observed[10.0] - 2) < 0.3, observed
