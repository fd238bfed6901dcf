"""Log-likelihood through the probability-flow ODE against closed-form densities.

The model is the exact marginal field of a Gaussian mixture (``flowscore.mixtures``), whose density at
t = 1 is known; the ground truth is a float64 brute-force mixture density written here.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowscore.likelihood import bits_per_dim, log_likelihood
from flowscore.mixtures import GaussianMixture

F64 = torch.float64


def _mixture(dim: int = 2) -> GaussianMixture:
    gen = torch.Generator().manual_seed(11)
    means = torch.randn(3, dim, generator=gen, dtype=F64) * 1.2
    return GaussianMixture(means, torch.tensor([0.4, 0.3, 0.5], dtype=F64), torch.tensor([0.3, 0.3, 0.4]))


def _log_density(x: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    """float64 brute force log sum_k w_k N(x; m_k, s_k^2 I)."""
    d = x.shape[1]
    sq = ((x[:, None, :] - mixture.means[None]) ** 2).sum(-1)
    var = mixture.stds**2
    return torch.logsumexp(
        torch.log(mixture.weights) - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var), 1
    )


def _points(mixture: GaussianMixture, n: int = 24) -> torch.Tensor:
    return mixture.sample(n, torch.Generator().manual_seed(12))


@pytest.mark.parametrize("name", ["linear", "vp", "vp-linear", "ve"])
def test_exact_divergence_matches_the_mixture_density(name):
    mixture = _mixture()
    x = _points(mixture)
    ll = log_likelihood(mixture.marginal(name).velocity, name, x, steps=40)
    # linear, vp: p_0 is exactly the prior N(0, beta_0^2 I). vp-linear (alpha_0 = 0.0066) and ve
    # (p_0 = p_data * N(0, 80^2) against the prior N(0, 80^2)) only approximate it, a log-density error of
    # first order in the mean shift, ~ alpha_0 m . x_0 and m . x_0 / 80^2 (measured 3e-3 and 6e-3, the same
    # with dopri5 at rtol = atol = 1e-8)
    tolerance = {"linear": 5e-4, "vp": 5e-4, "vp-linear": 1e-2, "ve": 2e-2}[name]
    assert (ll - _log_density(x, mixture)).abs().max() < tolerance


def test_karras_grid_converges_on_sharp_data_where_the_uniform_grid_does_not():
    """Modes of std 0.01-0.02: at 100 rk4 steps the even grid misses the closed-form density by more than
    the karras grid (its steps dense where sigma is small) by two orders; on broad modes both are exact."""
    mixture = _mixture()
    sharp = GaussianMixture(mixture.means, torch.tensor([0.01, 0.02, 0.015], dtype=F64), mixture.weights)
    x = _points(sharp)
    velocity = sharp.marginal("linear").velocity
    error = {
        grid: float((log_likelihood(velocity, "linear", x, grid=grid) - _log_density(x, sharp)).abs().max())
        for grid in ("uniform", "karras")
    }
    assert error["karras"] < 5e-4 < 2e-3 < error["uniform"], error
    broad = log_likelihood(mixture.marginal("linear").velocity, "linear", _points(mixture), grid="karras")
    assert (broad - _log_density(_points(mixture), mixture)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="grid"):
        log_likelihood(velocity, "linear", x, grid="nope")


def test_dopri5_matches_the_mixture_density():
    pytest.importorskip("torchdiffeq")
    mixture = _mixture()
    x = _points(mixture)
    ll = log_likelihood(
        mixture.marginal("linear").velocity, "linear", x, method="dopri5", rtol=1e-7, atol=1e-7
    )
    assert (ll - _log_density(x, mixture)).abs().max() < 1e-4


@pytest.mark.parametrize("prediction", ["noise", "score", "data"])
def test_other_predictions_use_t_eps(prediction):
    # linear: velocity from noise/score is singular at t = 0, from data at t = 1; the run then stops at t_eps
    mixture = _mixture()
    x = _points(mixture)
    marginal = mixture.marginal("linear")
    model = lambda x, t: marginal.field(prediction, x, t)  # noqa: E731
    error = (
        log_likelihood(model, "linear", x, prediction=prediction, steps=40) - _log_density(x, mixture)
    ).abs()
    assert error.max() < 0.05  # a bias of order t_eps = 1e-3 (measured 0.01 for noise/score)
    finer = log_likelihood(model, "linear", x, prediction=prediction, steps=40, t_eps=1e-4)
    assert (finer - _log_density(x, mixture)).abs().max() < error.max()


def test_hutchinson_is_unbiased():
    mixture = _mixture(dim=10)  # D = 10 > 8: the auto mode uses Hutchinson
    x = _points(mixture, 64)
    velocity = mixture.marginal("vp").velocity
    exact = _log_density(x, mixture)
    exact_div = log_likelihood(velocity, "vp", x, steps=20, hutchinson=False)
    assert (exact_div - exact).abs().max() < 2e-3
    auto = log_likelihood(velocity, "vp", x, steps=20, n_probes=4, generator=torch.Generator().manual_seed(0))
    forced = log_likelihood(
        velocity, "vp", x, steps=20, hutchinson=True, n_probes=4, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(auto, forced)
    error = auto - exact_div
    assert error.abs().max() > 1e-3  # a stochastic estimate, not the exact trace
    # independent probes per sample: the mean error is within 4 standard errors of 0
    assert abs(float(error.mean())) < 4 * float(error.std()) / math.sqrt(x.shape[0])
    more = log_likelihood(
        velocity, "vp", x, steps=20, hutchinson=True, n_probes=32, generator=torch.Generator().manual_seed(1)
    )
    assert float((more - exact_div).std()) < 0.6 * float(error.std())  # variance ~ 1 / n_probes


def test_bits_per_dim_convention():
    # uniform density on [-1, 1]^D: log p = -D log 2, which is 8 bits per dimension for 256 levels
    d = 3 * 4 * 4
    ll = torch.full((5,), -d * math.log(2.0), dtype=F64)
    assert torch.allclose(bits_per_dim(ll, d), torch.full((5,), 8.0, dtype=F64))
    # on [0, 1] (data_range 1) with 16 levels the uniform density is 1: log2(16) = 4 bits
    assert torch.allclose(
        bits_per_dim(torch.zeros(2, dtype=F64), 7, num_levels=16, data_range=1.0),
        torch.full((2,), 4.0, dtype=F64),
    )
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(ll, 0)
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(ll, d, data_range=0.0)


def test_bad_options_raise():
    mixture = _mixture()
    x = _points(mixture, 4)
    velocity = mixture.marginal("linear").velocity
    with pytest.raises(ValueError, match="sampler"):
        log_likelihood(velocity, "linear", x, sampler="rk45")
    with pytest.raises(ValueError, match="hutchinson"):
        log_likelihood(velocity, "linear", x, hutchinson="yes")
    with pytest.raises(ValueError, match="n_probes"):
        log_likelihood(velocity, "linear", x, n_probes=0)
    with pytest.raises(ValueError, match="x"):
        log_likelihood(velocity, "linear", x[0])


def test_the_integrator_is_named_sampler_and_method_still_works_with_a_deprecation_warning():
    mixture = _mixture()
    x = _points(mixture, 4)
    velocity = mixture.marginal("linear").velocity
    euler = log_likelihood(velocity, "linear", x, steps=8, sampler="euler")
    with pytest.warns(DeprecationWarning, match="sampler="):
        old = log_likelihood(velocity, "linear", x, steps=8, method="euler")
    torch.testing.assert_close(old, euler, rtol=0, atol=0)
    rk4 = log_likelihood(velocity, "linear", x, steps=8)  # the default integrator: another result
    assert float((rk4 - euler).abs().max()) > 1e-6
    with pytest.raises(ValueError, match="sampler= only"):
        log_likelihood(velocity, "linear", x, sampler="rk4", method="euler")
