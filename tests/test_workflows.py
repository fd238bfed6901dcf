"""The sample / eval workflows on a run: honest bits per dimension, --n bounds every part, batched sampling.

Ground truth: a model that is the exact velocity field of a Gaussian (``GaussianMixture`` with one
component), whose data-space density after the normalizer is ``N(mu, sigma^2 I)`` in closed form; the
dequantised negative log-likelihood of integer data then has the closed form
``E_u[-log N(k + u; mu, sigma^2)] = D/2 log(2 pi sigma^2) + (||k - mu||^2 + D/12) / (2 sigma^2)``, and the
discrete probability of a bin ``P(k) = prod_d (Phi((k_d + 1/2 - mu)/sigma) - Phi((k_d - 1/2 - mu)/sigma))``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flowscore as fs
from flowscore import workflows
from flowscore.data import Normalizer
from flowscore.mixtures import GaussianMixture

F64 = torch.float64
D = 3


def gaussian_run(mu: float, sigma: float, held_out: torch.Tensor, shift: float = 5.0, scale: float = 2.0):
    """A run-like object whose model is the exact field of N(mu, sigma^2 I) in data space.

    The model lives in the normalizer's space z = (x - shift) / scale, where the data are
    N((mu - shift) / scale, (sigma / scale)^2 I).
    """
    mean_z = torch.full((1, D), (mu - shift) / scale, dtype=F64)
    field = GaussianMixture(mean_z, torch.tensor([sigma / scale], dtype=F64)).marginal("linear").velocity
    calls = {"max_batch": 0}

    def model(x, t):
        calls["max_batch"] = max(calls["max_batch"], x.shape[0])
        return field(x.double(), t.double()).to(x.dtype)  # eval works in float32, the field in float64

    run = SimpleNamespace(
        model=model, path=fs.get_path("linear"), prediction="velocity", data_shape=(D,),
        normalizer=Normalizer(torch.full((D,), shift), torch.full((D,), scale)), held_out=held_out,
        config=SimpleNamespace(objective="cfm"), log=[], loss_floor=None,
    )  # fmt: skip
    return run, calls


def expected_nll(k: torch.Tensor, mu: float, sigma: float) -> float:
    """Mean over the rows of k of E_u[-log N(k + u; mu, sigma^2 I)], u ~ U[-1/2, 1/2)^D."""
    sq = ((k - mu) ** 2).sum(1) + D / 12
    return float((0.5 * D * math.log(2 * math.pi * sigma**2) + sq / (2 * sigma**2)).mean())


def discrete_nll(k: torch.Tensor, mu: float, sigma: float) -> float:
    """Mean of -log P(k), P the mass of the unit bin around k under N(mu, sigma^2 I)."""
    normal = torch.distributions.Normal(torch.tensor(mu, dtype=F64), torch.tensor(sigma, dtype=F64))
    mass = normal.cdf(k + 0.5) - normal.cdf(k - 0.5)
    return float(-torch.log(mass).sum(1).mean())


def no_samples(m: int) -> workflows.EvalSamples:
    points = np.zeros((m, D), np.float32)
    return workflows.EvalSamples(points, points, points[None], "rk4")


@pytest.mark.parametrize(("mu", "sigma"), [(5.6, 3.0), (4.0, 0.3)])
def test_bits_per_dim_of_integer_data_is_the_dequantised_closed_form(mu, sigma):
    gen = torch.Generator().manual_seed(0)
    held = torch.round(mu + sigma * torch.randn(1200, D, generator=gen, dtype=F64))
    run, _ = gaussian_run(mu, sigma, held)
    m = 600
    result = workflows.evaluate_run(run, n=m, samples=no_samples(m))
    assert result["dequantized"] is True and result["n"] == m
    a = held[:m]
    expected = expected_nll(a, mu, sigma)
    # the estimate averages one uniform draw per point: its standard error is below 0.05 nats here
    assert result["nll"] == pytest.approx(expected, abs=0.08)
    assert result["bits_per_dim"] == pytest.approx(result["nll"] / (D * math.log(2)), rel=1e-9)
    # an upper bound on the discrete model's bits, and these are >= 0; the sharp Gaussian's continuous
    # density exceeds 1 (log-density at its mode > 0): without dequantisation bits/dim would be negative
    assert result["bits_per_dim"] >= discrete_nll(a, mu, sigma) / (D * math.log(2)) - 0.03
    assert result["bits_per_dim"] > 0
    if sigma < 1:
        assert 0.5 * D * math.log(2 * math.pi * sigma**2) < 0


def test_continuous_data_are_not_dequantised_and_get_the_normalizer_log_det():
    mu, sigma = 0.7, 1.3
    gen = torch.Generator().manual_seed(1)
    held = mu + sigma * torch.randn(400, D, generator=gen, dtype=F64)
    run, _ = gaussian_run(mu, sigma, held, shift=-1.0, scale=0.5)
    result = workflows.evaluate_run(run, n=200, samples=no_samples(200))
    a = held[:200]
    exact = torch.distributions.Normal(mu, sigma).log_prob(a).sum(1)
    assert result["dequantized"] is False
    assert result["nll"] == pytest.approx(float(-exact.mean()), abs=1e-4)


def test_eval_n_bounds_the_likelihood_points_and_no_likelihood_skips_it():
    held = torch.round(5 + 2 * torch.randn(500, D, generator=torch.Generator().manual_seed(2), dtype=F64))
    run, calls = gaussian_run(5.0, 2.0, held)
    workflows.evaluate_run(run, n=37, samples=no_samples(37))
    assert calls["max_batch"] == 37
    run, calls = gaussian_run(5.0, 2.0, held)
    result = workflows.evaluate_run(run, n=37, samples=no_samples(37), likelihood=False)
    assert calls["max_batch"] == 0
    assert (result["nll"], result["bits_per_dim"], result["dequantized"]) == (None, None, None)


def test_constant_held_out_data_give_a_zero_floor_and_no_ratio():
    run, _ = gaussian_run(2.0, 1.0, torch.full((40, D), 2.0, dtype=F64))
    samples = workflows.EvalSamples(*(np.full((20, D), 2.5, np.float32),) * 2, np.zeros((1, 20, D)), "rk4")
    result = workflows.evaluate_run(run, n=20, samples=samples, likelihood=False)
    assert result["w2_floor"] == 0 and result["w2_ratio_ode"] is None and result["w2_ratio_sde"] is None
    assert result["w2_ode"] == pytest.approx(0.5 * math.sqrt(D))
    assert "-" in workflows.format_eval(result)


def test_sample_run_batches_from_one_generator_and_decodes():
    run, _ = gaussian_run(5.0, 2.0, torch.zeros(4, D, dtype=F64))
    run.model = lambda x, t: -x  # cheap; any field will do
    n = workflows.SAMPLE_BATCH + 5
    out = workflows.sample_run(run, n, sampler="euler", steps=2, seed=3)
    assert out.shape == (n, D) and out.dtype == np.float32 and np.isfinite(out).all()
    gen = torch.Generator().manual_seed(3)
    first = fs.sample(run.model, run.path, workflows.SAMPLE_BATCH, sampler="euler", steps=2, shape=(D,),
                      generator=gen)  # fmt: skip
    np.testing.assert_allclose(out[: workflows.SAMPLE_BATCH], (2 * first + 5).numpy(), rtol=1e-6, atol=1e-6)
    second = fs.sample(run.model, run.path, 5, sampler="euler", steps=2, shape=(D,), generator=gen)
    np.testing.assert_allclose(out[workflows.SAMPLE_BATCH :], (2 * second + 5).numpy(), rtol=1e-6, atol=1e-6)


def test_sampling_more_than_memory_holds_is_refused_before_any_work():
    run, calls = gaussian_run(5.0, 2.0, torch.zeros(4, D, dtype=F64))
    with pytest.raises(ValueError, match="memory"):
        workflows.sample_run(run, 10**13)
    assert calls["max_batch"] == 0
