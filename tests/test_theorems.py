"""grad L_FM = grad L_CFM, grad L_SM = grad L_DSM, and L_cond - L_marg = loss floor, measured with a fixed
random network (the package's MLP) and the exact EmpiricalMarginal; negative controls that must come out
significant; and the variance reductions of ``flowscore verify`` checked to leave the mean unchanged."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import reference_schedule

import flowscore.verify as verify
from flowscore.data import labelled_toy, toy
from flowscore.floor import loss_floor
from flowscore.marginals import EmpiricalMarginal
from flowscore.verify import DEFAULT_T_EPS, compare_gradients, make_model

N_BATCHES, BATCH = 60, 1024
PLAIN = {"antithetic": False, "control_variate": False, "importance": False}
REDUCED = {"antithetic": True, "control_variate": True, "importance": True}


def data_set(name: str) -> torch.Tensor:
    return toy(name, 300, seed=1)


def run(marginal, objective, n_batches=N_BATCHES, **kw):
    return compare_gradients(
        make_model((2,), seed=0), marginal, objective, n_batches=n_batches, batch_size=BATCH, seed=2,
        progress=False, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("objective", ["cfm", "dsm"])
@pytest.mark.parametrize("path", ["linear", "vp"])
@pytest.mark.parametrize("name", ["moons", "8gaussians"])
def test_gradients_agree_and_gap_equals_floor(name, path, objective):
    marginal = EmpiricalMarginal(data_set(name), path)
    s = run(marginal, objective).summary()
    assert s["grad_relative_difference"] <= 3 * s["grad_relative_standard_error"]
    assert s["grad_relative_standard_error"] < 0.03  # the measurement resolves a 10 % difference
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


@pytest.mark.parametrize("reduction", [PLAIN, REDUCED], ids=["plain", "reduced"])
@pytest.mark.parametrize("path", ["linear", "vp"])
def test_negative_control_wrong_score_formula_is_significant(path, reduction):
    marginal = EmpiricalMarginal(data_set("moons"), path)
    s = run(WrongScoreMarginal(marginal), "dsm", n_batches=40, **reduction).summary()
    assert s["grad_relative_difference"] > 5 * s["grad_relative_standard_error"]


@pytest.mark.parametrize("reduction", [PLAIN, REDUCED], ids=["plain", "reduced"])
@pytest.mark.parametrize("objective", ["cfm", "dsm"])
def test_negative_control_marginal_of_another_distribution_is_significant(objective, reduction):
    data = EmpiricalMarginal(data_set("moons"), "linear")
    other = EmpiricalMarginal(data_set("8gaussians"), "linear")
    s = run(other, objective, data=data, n_batches=40, **reduction).summary()
    assert s["grad_relative_difference"] > 5 * s["grad_relative_standard_error"]


def mean_and_variance(stats) -> tuple[torch.Tensor, float]:
    """The mean difference vector and the summed variance of its entries (tr Cov(d) / K)."""
    k = stats.n_batches
    return stats.mean_diff, stats.diff_sq_dev / (k - 1) / k


@pytest.mark.parametrize("objective", ["cfm", "dsm"])
def test_variance_reductions_leave_the_mean_difference_unchanged(objective, monkeypatch):
    # Under a negative control the expected difference E d is a nonzero vector. Each variance reduction must
    # estimate the same vector: ||mean_plain - mean_reduced||^2 is then of the size of the summed variances.
    data = EmpiricalMarginal(data_set("moons"), "vp")
    other = EmpiricalMarginal(data_set("2gaussians"), "vp")
    plain_mean, plain_var = mean_and_variance(run(other, objective, data=data, n_batches=64, **PLAIN))
    assert plain_mean.pow(2).sum() > 100 * plain_var  # E d is resolved to 10 %: a sharp comparison
    for name in ("antithetic", "control_variate", "importance"):
        alone = {**PLAIN, name: True}
        mean, var = mean_and_variance(run(other, objective, data=data, n_batches=64, **alone))
        assert (mean - plain_mean).pow(2).sum() < 9 * (var + plain_var), name
    # the comparison has power: a control variate built on a wrong data mean (so E[c] != 0) is caught
    true_of = verify.PriorMean.of

    def shifted(points: torch.Tensor) -> verify.PriorMean:
        prior = true_of(points)
        return dataclasses.replace(prior, mean=prior.mean + 1.0)

    monkeypatch.setattr(verify.PriorMean, "of", shifted)
    wrong = run(other, objective, data=data, n_batches=64, **{**PLAIN, "control_variate": True})
    mean, var = mean_and_variance(wrong)
    assert (mean - plain_mean).pow(2).sum() > 9 * (var + plain_var)


@pytest.mark.parametrize("objective", ["cfm", "dsm"])
def test_variance_reductions_cut_the_standard_error(objective):
    marginal = EmpiricalMarginal(data_set("moons"), "linear")
    plain = run(marginal, objective, n_batches=40, **PLAIN).summary()
    reduced = run(marginal, objective, n_batches=40, **REDUCED).summary()
    assert reduced["grad_relative_standard_error"] < 0.6 * plain["grad_relative_standard_error"]


def test_common_random_numbers_make_the_difference_exactly_zero_for_a_one_point_data_set():
    # with one data point the marginal field is the conditional one: the two gradients coincide per batch
    # (and the control variate vanishes: x_data equals the data mean)
    marginal = EmpiricalMarginal(torch.tensor([[0.5, -0.25]]), "vp")
    stats = run(marginal, "cfm", n_batches=3, **REDUCED)
    scale = stats.sum_grad.norm() / stats.n_batches
    assert stats.mean_diff.norm() < 1e-6 * scale
    assert math.sqrt(stats.diff_sq_dev) < 1e-6 * scale
    assert abs(stats.gap_mean) < 1e-4


def test_a_decisive_difference_stops_the_sample_early():
    marginal = WrongScoreMarginal(EmpiricalMarginal(data_set("moons"), "linear"))
    stats = compare_gradients(
        make_model((2,), seed=0), marginal, "dsm", batch_size=BATCH, max_samples=200 * BATCH,
        target_se=1e-6, min_batches=10, progress=False,
    )  # fmt: skip
    rel, se = stats.relative()
    assert stats.stopped == "decisive" and stats.n_batches == 10 and rel > verify.DECISIVE * se
    assert verify.verdict(rel, se, 1e-6)[0] == "differ"


class LabelBlindMarginal:
    """A labelled marginal whose fields ignore the labels: the wrong target for a network that sees them."""

    def __init__(self, marginal: EmpiricalMarginal):
        self.inner, self.path, self.num_classes = marginal, marginal.path, marginal.num_classes
        self.data, self.labels = marginal.data, marginal.labels

    def velocity(self, x, t):
        return self.inner.velocity(x, t)

    def score(self, x, t):
        return self.inner.score(x, t)

    def field(self, kind, x, t, y=None):
        return self.inner.field(kind, x, t)


@pytest.mark.parametrize("objective", ["cfm", "dsm"])
def test_conditional_theorems_with_labels_and_the_label_blind_negative_control(objective):
    """With class labels the network is f(x, t, y) and the marginal twin regresses on the class's exact
    field: the gradients agree and the gap is the (lower) conditional floor; regressing on the label-blind
    field instead is a significant difference."""
    points, labels = labelled_toy("8gaussians", 400, seed=1)
    marginal = EmpiricalMarginal(points, "linear", labels=labels)
    model = make_model((2,), seed=0, num_classes=8)
    kw = dict(n_batches=30, batch_size=BATCH, seed=2, progress=False)
    s = compare_gradients(model, marginal, objective, **kw).summary()
    assert s["grad_relative_difference"] <= 3 * s["grad_relative_standard_error"]
    assert s["grad_relative_standard_error"] < 0.05
    floor = loss_floor(
        marginal,
        objective=objective,
        n_samples=30 * BATCH,
        t_eps=DEFAULT_T_EPS[objective],
        seed=7,
        progress=False,
    )
    assert floor.value < floor.unconditional.value - 3 * floor.standard_error  # informative labels
    assert abs(s["loss_gap"] - floor.value) <= 3 * math.hypot(
        s["loss_gap_standard_error"], floor.standard_error
    )
    blind = compare_gradients(model, LabelBlindMarginal(marginal), objective, **kw).summary()
    assert blind["grad_relative_difference"] > 5 * blind["grad_relative_standard_error"]


# -- flow maps: the target with the conditional velocity vs with the exact marginal velocity ----------------
FLOW_MAPS = ["meanflow", "semigroup", "lagrangian"]
FM_BATCH = 512


def fm_run(marginal, objective, n_batches, **kw):
    return compare_gradients(
        make_model((2,), seed=0, two_time=True), marginal, objective, n_batches=n_batches,
        batch_size=FM_BATCH, seed=2, progress=False, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("objective", FLOW_MAPS)
def test_flow_map_gradients_agree_and_the_gap_is_the_target_shift(objective):
    """docs/theory.md section 18: the flow-map target is affine in the velocity, so the expected gradient with
    the conditional velocity equals the one with the exact marginal velocity; the losses differ by
    E|T_cond - T_marg|^2 (flow_map_floor, estimated on independent draws by a JVP of its own)."""
    marginal = EmpiricalMarginal(data_set("moons"), "linear")
    s = fm_run(marginal, objective, 24).summary()
    assert s["grad_relative_difference"] <= 3 * s["grad_relative_standard_error"]
    assert s["grad_relative_standard_error"] < 0.05
    model = make_model((2,), seed=0, two_time=True)
    floor = verify.flow_map_floor(model, marginal, objective, 24 * FM_BATCH, 1e-3, seed=7)
    se = math.hypot(s["loss_gap_standard_error"], floor.standard_error)
    assert abs(s["loss_gap"] - floor.value) <= 3 * se and se < 0.1 * floor.value


def test_semigroup_target_shift_is_the_equal_time_share_of_the_cfm_floor():
    """Only the s = t pairs of the splitting target hold the velocity: E|T_cond - T_marg|^2 is the share of
    those pairs times cfm's loss floor (floor.loss_floor, an independent estimator)."""
    from flowscore.flowmaps import Semigroup

    marginal = EmpiricalMarginal(data_set("moons"), "linear")
    model = make_model((2,), seed=0, two_time=True)
    n = 40_000
    got = verify.flow_map_floor(model, marginal, "semigroup", n, 1e-3, seed=3)
    cfm = loss_floor(marginal, objective="cfm", n_samples=n, t_eps=1e-3, seed=4, progress=False)
    share = Semigroup("linear").share_equal
    assert abs(got.value - share * cfm.value) <= 3 * math.hypot(
        got.standard_error, share * cfm.standard_error
    )


class ShiftedVelocityMarginal:
    """The exact marginal with its velocity shifted by a constant: a wrong target (negative control)."""

    def __init__(self, marginal: EmpiricalMarginal, shift: float):
        self.inner, self.path, self.data, self.shift = marginal, marginal.path, marginal.data, shift

    def velocity(self, x, t):
        return self.inner.velocity(x, t) + self.shift


@pytest.mark.parametrize("objective", FLOW_MAPS)
def test_flow_map_negative_control_a_shifted_marginal_velocity_is_significant(objective):
    marginal = EmpiricalMarginal(data_set("moons"), "linear")
    s = fm_run(ShiftedVelocityMarginal(marginal, 0.2), objective, 12).summary()
    assert s["grad_relative_difference"] > 5 * s["grad_relative_standard_error"]


def test_meanflow_control_variate_leaves_the_mean_difference_unchanged(monkeypatch):
    """The JVP control variate <u(x', t, s), sg[A(x') c]> of meanflow has mean 0: under a negative control
    (E d != 0) the estimate with it agrees with the plain one, and one built on a wrong data mean (so that
    E[c] != 0) does not."""
    wrong_target = ShiftedVelocityMarginal(EmpiricalMarginal(data_set("moons"), "vp"), 0.2)
    plain_mean, plain_var = mean_and_variance(fm_run(wrong_target, "meanflow", 24, **PLAIN))
    assert plain_mean.pow(2).sum() > 50 * plain_var
    with_cv = {**PLAIN, "control_variate": True}
    mean, var = mean_and_variance(fm_run(wrong_target, "meanflow", 24, **with_cv))
    assert (mean - plain_mean).pow(2).sum() < 9 * (var + plain_var)
    true_of = verify.PriorMean.of

    def shifted(points: torch.Tensor) -> verify.PriorMean:
        prior = true_of(points)
        return dataclasses.replace(prior, mean=prior.mean + 1.0)

    monkeypatch.setattr(verify.PriorMean, "of", shifted)
    mean, var = mean_and_variance(fm_run(wrong_target, "meanflow", 24, **with_cv))
    assert (mean - plain_mean).pow(2).sum() > 9 * (var + plain_var)
