"""Adapters to other conventions, against relations written by hand here.

Gaussian data N(0, s^2 I): in any scaling x = a x_data + b noise, E[x_data | x] = a s^2 x / (a^2 s^2 + b^2)
and E[noise | x] = b x / (a^2 s^2 + b^2). On ``linear`` sigma = beta/alpha = (1 - t)/t, so t = 1/(1 + sigma).
A k-diffusion denoiser sees x_ve = x/alpha (a = 1, b = sigma); a diffusers discrete model sees
x_k = sqrt(abar) x_data + sqrt(1 - abar) noise with sigma_k = sqrt((1 - abar)/abar).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from flowscore import get_path
from flowscore.adapters import from_denoiser, from_discrete, to_denoiser, to_discrete, wrap_time
from flowscore.grids import time_grid
from flowscore.samplers import sample

F64 = torch.float64
S = 0.7  # data std


def posterior(x: torch.Tensor, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[x_data | x], E[noise | x]) for x = a x_data + b noise, N(0, S^2) data; a, b broadcastable."""
    var = a**2 * S**2 + b**2
    return a * S**2 * x / var, b * x / var


def linear_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact velocity on linear (alpha = t, beta = 1 - t): u = D - E."""
    tt = t[:, None]
    data, noise = posterior(x, tt, 1 - tt)
    return data - noise


def _batch(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=F64)


def test_to_denoiser_is_the_posterior_mean_in_ve_scaling():
    x_ve = 3 * _batch()
    sigma = torch.linspace(0.01, 50, 16, dtype=F64)
    denoiser = to_denoiser(linear_velocity, "linear", "velocity")
    expected, _ = posterior(x_ve, 1.0, sigma[:, None])
    assert torch.allclose(denoiser(x_ve, sigma), expected, atol=1e-10)
    assert denoiser.prediction == "data"

    # vp: t = (2/pi) atan(1/sigma); a data model there is E[x_data | x] with alpha, beta = sin, cos
    def vp_data(x, t):
        a, b = torch.sin(math.pi * t / 2)[:, None], torch.cos(math.pi * t / 2)[:, None]
        return posterior(x, a, b)[0]

    assert torch.allclose(to_denoiser(vp_data, "vp", "data")(x_ve, sigma), expected, atol=1e-10)


def test_from_denoiser_round_trip_and_hand_denoiser():
    def edm_denoiser(x_ve, sigma):  # written by hand: D = s^2 x_ve / (s^2 + sigma^2)
        return posterior(x_ve, 1.0, sigma[:, None])[0]

    model = from_denoiser(edm_denoiser, "linear")
    x = _batch()
    t = torch.linspace(0.05, 1.0, 16, dtype=F64)
    expected, _ = posterior(x, t[:, None], 1 - t[:, None])
    assert torch.allclose(model(x, t), expected, atol=1e-10)
    assert model.prediction == "data"
    with pytest.raises(ValueError, match="alpha"):
        model(x, torch.zeros(16, dtype=F64))
    # to_denoiser(from_denoiser(D)) is D again
    sigma = torch.linspace(0.1, 20, 16, dtype=F64)
    again = to_denoiser(model, "linear", "data")
    assert torch.allclose(again(x, sigma), edm_denoiser(x, sigma), atol=1e-10)


def _abar(steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, steps, dtype=F64)  # DDPM's linear betas
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_from_discrete_at_the_discrete_noise_levels(kind):
    abar = _abar()

    def discrete(x_k, timestep):  # diffusers convention, written by hand
        assert timestep.dtype == torch.long
        a, b = abar[timestep].sqrt()[:, None], (1 - abar[timestep]).sqrt()[:, None]
        data, noise = posterior(x_k, a, b)
        return {"epsilon": noise, "sample": data, "v_prediction": a * noise - b * data}[kind]

    model = from_discrete(discrete, abar, "linear", kind, quantize=True)
    k = torch.tensor([0, 10, 200, 500, 999] * 2)
    sigma = ((1 - abar[k]) / abar[k]).sqrt()
    t = 1 / (1 + sigma)  # linear: the flowscore times with exactly those noise levels
    x = _batch(10)
    data, noise = posterior(x, t[:, None], 1 - t[:, None])
    assert torch.allclose(model(x, t), data if kind == "sample" else noise, atol=1e-9)
    assert model.prediction == ("data" if kind == "sample" else "noise")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("path_name", ["linear", "vp"])
def test_to_discrete_and_back(kind, path_name):
    abar = _abar()
    discrete = to_discrete(
        linear_velocity if path_name == "linear" else _vp_velocity, path_name, "velocity", abar, kind
    )
    k = torch.tensor([3, 100, 640, 998])
    x_k = _batch(4)
    a, b = abar[k].sqrt()[:, None], (1 - abar[k]).sqrt()[:, None]
    data, noise = posterior(x_k, a, b)
    expected = {"epsilon": noise, "sample": data, "v_prediction": a * noise - b * data}[kind]
    assert torch.allclose(discrete(x_k, k), expected, atol=1e-9)
    # fractional timesteps: from_discrete(to_discrete(model)) is the model's noise / data prediction
    back = from_discrete(discrete, abar, path_name, kind)
    t = torch.tensor([0.2, 0.5, 0.8, 0.95], dtype=F64)
    x = _batch(4)
    alpha = t if path_name == "linear" else torch.sin(math.pi * t / 2)
    beta = 1 - t if path_name == "linear" else torch.cos(math.pi * t / 2)
    data, noise = posterior(x, alpha[:, None], beta[:, None])
    assert torch.allclose(back(x, t), data if kind == "sample" else noise, atol=1e-8)


def _vp_velocity(x, t):
    a, b = torch.sin(math.pi * t / 2)[:, None], torch.cos(math.pi * t / 2)[:, None]
    data, noise = posterior(x, a, b)
    return (math.pi / 2) * (b * data - a * noise)  # alpha' D + beta' E


def test_discrete_schedule_refuses_noise_levels_it_does_not_have():
    model = from_discrete(lambda x, k: x, _abar(), "linear", "epsilon")
    with pytest.raises(ValueError, match="range"):
        model(_batch(2), torch.tensor([0.001, 0.5], dtype=F64))  # sigma = 999 is beyond sigma_999 ~ 157


def test_sample_reads_the_wrappers_prediction():
    abar = _abar()

    def discrete(x_k, timestep):
        a, b = abar[timestep].sqrt()[:, None], (1 - abar[timestep]).sqrt()[:, None]
        return posterior(x_k, a, b)[1]

    model = from_discrete(discrete, abar, "linear", "epsilon", quantize=True)
    # the discrete schedule covers sigma in [0.01, 157]: a grid inside it, then the data prediction at t = 1
    times = time_grid("linear", 20, "logsnr", t_start=0.02, sigma_min=0.02)
    out = sample(
        model,
        "linear",
        2000,
        shape=(3,),
        sampler="unipc",
        times=times,
        dtype=F64,
        generator=torch.Generator().manual_seed(0),
    )
    assert abs(float(out.std()) - S) < 0.05  # treated as a noise model, not a velocity


@pytest.mark.parametrize("convention", ["column", "flip", "sigma", "log-sigma", "timestep"])
def test_wrap_time(convention):
    seen = {}

    def model(x, t):
        seen["t"] = t
        return x

    wrapped = wrap_time(model, convention, path=get_path("linear"), num_timesteps=1000)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    wrapped(_batch(3), t)
    expected = {
        "column": t[:, None],
        "flip": 1 - t,
        "sigma": (1 - t) / t,
        "log-sigma": torch.log((1 - t) / t),
        "timestep": torch.tensor([899, 500, 100]),
    }[convention]
    assert seen["t"].shape == expected.shape and torch.allclose(seen["t"].double(), expected.double())
    if convention == "timestep":
        assert seen["t"].dtype == torch.long
    with pytest.raises(ValueError, match="convention"):
        wrap_time(model, "seconds")


def test_discrete_adapters_speak_flowscore_outside_and_diffusers_inside():
    """``prediction`` is flowscore's kind, ``prediction_type`` diffusers' (as diffusers names it); the older
    keywords (``from_discrete(prediction="epsilon")``, ``to_discrete(kind=...)``) still work, deprecated,
    with the same outputs (checked against the posterior of Gaussian data in closed form)."""
    abar = _abar()
    k, x_k = torch.tensor([3, 100, 640, 998]), _batch(4)
    a, b = abar[k].sqrt()[:, None], (1 - abar[k]).sqrt()[:, None]
    data, noise = posterior(x_k, a, b)
    new = to_discrete(linear_velocity, "linear", "velocity", abar, prediction_type="v_prediction")
    assert torch.allclose(new(x_k, k), a * noise - b * data, atol=1e-9)
    with pytest.warns(DeprecationWarning, match="prediction_type"):
        old = to_discrete(linear_velocity, "linear", "velocity", abar, kind="v_prediction")
    assert torch.equal(old(x_k, k), new(x_k, k))
    t, x = torch.tensor([0.2, 0.5, 0.8, 0.95], dtype=F64), _batch(4)
    back = from_discrete(new, abar, "linear", prediction_type="v_prediction")
    with pytest.warns(DeprecationWarning, match="prediction_type"):
        back_old = from_discrete(new, abar, "linear", prediction="v_prediction")
    assert back.prediction == back_old.prediction == "noise" and torch.equal(back(x, t), back_old(x, t))
    with pytest.raises(ValueError, match="prediction_type= only"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from_discrete(new, abar, "linear", prediction_type="sample", prediction="epsilon")
