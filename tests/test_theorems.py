"""grad L_FM = grad L_CFM, grad L_SM = grad L_DSM, and L_cond - L_marg = loss floor, measured with a fixed
random network and the exact EmpiricalMarginal; plus negative controls that must come out significant."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import reference_schedule

from flowscore.data import toy
from flowscore.floor import loss_floor
from flowscore.marginals import EmpiricalMarginal
from flowscore.verify import _MLP, DEFAULT_T_EPS, compare_gradients

N_BATCHES, BATCH = 60, 1024


def model_for(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _MLP(2, 32)


def data_set(name: str) -> torch.Tensor:
    return toy(name, 300, seed=1)


@pytest.mark.parametrize("objective", ["flow", "score"])
@pytest.mark.parametrize("path", ["linear", "vp"])
@pytest.mark.parametrize("name", ["moons", "8gaussians"])
def test_gradients_agree_and_gap_equals_floor(name, path, objective):
    marginal = EmpiricalMarginal(data_set(name), path)
    comparison = compare_gradients(
        model_for(), marginal, objective, n_batches=N_BATCHES, batch_size=BATCH, seed=2, progress=False
    )
    s = comparison.summary()
    assert s["grad_relative_difference"] <= 3 * s["grad_relative_standard_error"]
    assert s["grad_relative_standard_error"] < 0.1  # the measurement resolves a 30 % difference
    floor = loss_floor(
        marginal,
        objective=objective,
        n_samples=N_BATCHES * BATCH,
        t_eps=DEFAULT_T_EPS[objective],
        seed=7,
        progress=False,
    )
    se = math.hypot(s["loss_gap_standard_error"], floor.standard_error)
    assert abs(s["loss_gap"] - floor.value) <= 3 * se
    assert se < 0.05 * floor.value


class WrongScoreMarginal:
    """The seed's wrong score-from-velocity formula s = (alpha/beta^2) u + (alpha'/alpha - beta'/beta) x."""

    def __init__(self, marginal: EmpiricalMarginal):
        self.inner, self.path, self.data = marginal, marginal.path, marginal.data

    def velocity(self, x, t):
        return self.inner.velocity(x, t)

    def score(self, x, t):
        a, b, da, db = (v[:, None] for v in reference_schedule(self.path.name, t))
        return (a / b**2) * self.inner.velocity(x, t) + (da / a - db / b) * x


@pytest.mark.parametrize("path", ["linear", "vp"])
def test_negative_control_wrong_score_formula_is_significant(path):
    marginal = EmpiricalMarginal(data_set("moons"), path)
    comparison = compare_gradients(
        model_for(),
        WrongScoreMarginal(marginal),
        "score",
        n_batches=N_BATCHES,
        batch_size=BATCH,
        seed=2,
        progress=False,
    )
    s = comparison.summary()
    assert s["grad_relative_difference"] > 5 * s["grad_relative_standard_error"]


@pytest.mark.parametrize("objective", ["flow", "score"])
def test_negative_control_marginal_of_another_distribution_is_significant(objective):
    data = EmpiricalMarginal(data_set("moons"), "linear")
    other = EmpiricalMarginal(data_set("8gaussians"), "linear")
    comparison = compare_gradients(
        model_for(),
        other,
        objective,
        data=data,
        n_batches=N_BATCHES,
        batch_size=BATCH,
        seed=2,
        progress=False,
    )
    s = comparison.summary()
    assert s["grad_relative_difference"] > 5 * s["grad_relative_standard_error"]


def test_common_random_numbers_make_the_difference_exactly_zero_for_a_one_point_data_set():
    # with one data point the marginal field is the conditional one: the two gradients coincide per batch
    marginal = EmpiricalMarginal(torch.tensor([[0.5, -0.25]]), "vp")
    comparison = compare_gradients(model_for(), marginal, "flow", n_batches=3, batch_size=64, progress=False)
    assert comparison.diffs.abs().max() < 1e-5 * comparison.marginal_grads.abs().max()
    assert comparison.gaps.abs().max() < 1e-4
