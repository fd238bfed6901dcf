"""The four losses against hand-written float64 formulas (schedules and conversions written out here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_path, reference_schedule
from scipy import stats

from flowscore import EmpiricalMarginal, get_path
from flowscore.losses import (
    cfm,
    dsm,
    fm,
    logit_normal,
    loss_weight,
    objective_loss,
    sample_time,
    sm,
)

DT = torch.float64

# alpha, beta, alpha', beta' written independently of flowscore.paths
SCHEDULES = {
    "linear": lambda t: (t, 1 - t, torch.ones_like(t), -torch.ones_like(t)),
    "vp": lambda t: (
        torch.sin(math.pi * t / 2),
        torch.cos(math.pi * t / 2),
        math.pi / 2 * torch.cos(math.pi * t / 2),
        -math.pi / 2 * torch.sin(math.pi * t / 2),
    ),
}


def col(v: torch.Tensor) -> torch.Tensor:
    return v[:, None]


class LinearModel:
    """f(x, t) = x W^T + t b: a model whose losses have simple closed forms."""

    def __init__(self, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = (0.5 * torch.randn(dim, dim, generator=g, dtype=DT)).requires_grad_(True)
        self.b = torch.randn(dim, generator=g, dtype=DT)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T + col(t) * self.b


class BruteMarginal:
    """Exact marginal of the empirical distribution of ``data``, by a float64 posterior over all points
    (the schedule written out in conftest, derivatives by autograd)."""

    def __init__(self, data: torch.Tensor, name: str):
        self.data, self.path = data, make_path(name)
        self.sched = lambda t: reference_schedule(name, t)

    def _posterior(self, x, t):
        a, b, da, db = (v[:, None, None] for v in self.sched(t))
        diff = x[:, None, :] - a * self.data[None]  # (B, N, D)
        w = torch.softmax(-(diff**2).sum(-1) / (2 * b[:, :, 0] ** 2), dim=1)[..., None]
        return w, a, b, da, db, diff

    def velocity(self, x, t):
        w, a, b, da, db, diff = self._posterior(x, t)
        eps = diff / b
        return (w * (da * self.data[None] + db * eps)).sum(1)

    def score(self, x, t):
        w, a, b, da, db, diff = self._posterior(x, t)
        return (w * (-diff / b**2)).sum(1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x_data = torch.randn(64, 3, generator=g, dtype=DT)
    noise = torch.randn(64, 3, generator=g, dtype=DT)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=DT)
    return x_data, noise, t


def hand_sample(name, x_data, noise, t):
    a, b, da, db = (col(v) for v in SCHEDULES[name](t))
    return a * x_data + b * noise, a, b, da, db


@pytest.mark.parametrize("name", ["linear", "vp"])
def test_cfm_and_dsm_equal_hand_formula(name, batch):
    x_data, noise, t = batch
    model = LinearModel(3)
    x, a, b, da, db = hand_sample(name, x_data, noise, t)
    want_cfm = ((model(x, t) - (da * x_data + db * noise)) ** 2).sum(1).mean()
    want_dsm = ((model(x, t) + noise / b) ** 2).sum(1).mean()
    assert torch.allclose(cfm(model, x_data, name, t, noise), want_cfm, rtol=1e-12)
    assert torch.allclose(dsm(model, x_data, get_path(name), t, noise), want_dsm, rtol=1e-12)


def test_cfm_gradient_equals_closed_form(batch):
    x_data, noise, t = batch
    model = LinearModel(3)
    x, a, b, da, db = hand_sample("linear", x_data, noise, t)
    residual = model(x, t) - (x_data - noise)
    want = 2 * residual.T @ x / x.shape[0]  # d/dW mean ||W x + t b - u||^2
    loss = cfm(model, x_data, "linear", t, noise)
    (grad,) = torch.autograd.grad(loss, model.w)
    assert torch.allclose(grad, want.detach(), rtol=1e-10)


@pytest.mark.parametrize("name", ["linear", "vp"])
def test_fm_and_sm_equal_hand_formula_with_brute_force_marginal(name, batch):
    x_data, noise, t = batch
    data = torch.randn(7, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    marginal = BruteMarginal(data, name)
    model = LinearModel(3)
    x, *_ = hand_sample(name, x_data, noise, t)
    want_fm = ((model(x, t) - marginal.velocity(x, t)) ** 2).sum(1).mean()
    want_sm = ((model(x, t) - marginal.score(x, t)) ** 2).sum(1).mean()
    assert torch.allclose(fm(model, x_data, marginal, t, noise), want_fm, rtol=1e-12)
    assert torch.allclose(sm(model, x_data, marginal, t, noise), want_sm, rtol=1e-12)
    assert torch.allclose(objective_loss("fm", model, x_data, marginal, t, noise), want_fm, rtol=1e-12)
    assert torch.allclose(objective_loss("sm", model, x_data, marginal, t, noise), want_sm, rtol=1e-12)
    # cfm / dsm accept the marginal through objective_loss and use its path
    assert torch.allclose(
        objective_loss("cfm", model, x_data, marginal, t, noise), cfm(model, x_data, name, t, noise)
    )


@pytest.mark.parametrize("name", ["linear", "vp"])
def test_noise_prediction_is_converted_like_the_hand_conversion(name, batch):
    x_data, noise, t = batch
    eps_model = LinearModel(3, seed=3)

    def velocity_model(x, tt):  # noise -> data -> velocity by hand: D = (x - beta E) / alpha
        a, b, da, db = (col(v) for v in SCHEDULES[name](tt))
        e = eps_model(x, tt)
        return da * (x - b * e) / a + db * e

    def score_model(x, tt):  # score = -E / beta
        return -eps_model(x, tt) / col(SCHEDULES[name](tt)[1])

    got = cfm(eps_model, x_data, name, t, noise, prediction="noise")
    assert torch.allclose(got, cfm(velocity_model, x_data, name, t, noise), rtol=1e-10)
    got = dsm(eps_model, x_data, name, t, noise, prediction="noise")
    assert torch.allclose(got, dsm(score_model, x_data, name, t, noise), rtol=1e-10)


@pytest.mark.parametrize("name", ["linear", "vp", "vp-linear", "ve", "custom"])
def test_noise_weighting_is_the_noise_error_per_sample_for_all_four_objectives(name, batch):
    """weighting="noise" makes every objective the per-sample noise error ||noise_hat - noise_target||^2,
    whatever its space: the conditional noise for cfm/dsm, the posterior mean E[noise | x] for fm/sm."""
    x_data, noise, t = batch
    path = make_path(name)
    eps_model = LinearModel(3, seed=4)
    a, b, _, _ = (col(v) for v in reference_schedule(name, t))
    x = a * x_data + b * noise
    marginal = BruteMarginal(torch.randn(7, 3, generator=torch.Generator().manual_seed(5), dtype=DT), name)
    marginal_noise = -b * marginal.score(x, t)  # E[noise | x] = -beta grad log p_t(x)
    want_cond = ((eps_model(x, t) - noise) ** 2).sum(1)
    want_marg = ((eps_model(x, t) - marginal_noise) ** 2).sum(1)
    kw = dict(prediction="noise", weighting="noise", reduction="none")
    for loss, target, want in ((cfm, path, want_cond), (dsm, path, want_cond)):
        torch.testing.assert_close(
            loss(eps_model, x_data, target, t, noise, **kw), want, rtol=1e-8, atol=1e-10
        )
    marginal.path = path
    for loss in (fm, sm):
        torch.testing.assert_close(
            loss(eps_model, x_data, marginal, t, noise, **kw), want_marg, rtol=1e-8, atol=1e-10
        )
    # a velocity model on the linear path: the weight is alpha^2 / det_v^2 = t^2 (det_v = 1), not beta^2
    if name == "linear":
        per = cfm(eps_model, x_data, path, t, noise, weighting="noise", reduction="none")
        want = t**2 * ((eps_model(x, t) - (x_data - noise)) ** 2).sum(1)
        torch.testing.assert_close(per, want, rtol=1e-10, atol=0)


def test_likelihood_weighting_divides_by_the_time_density():
    """With logit-normal times the weight is g^2 p_uniform(t)/p(t) (scipy's densities), so the average
    over logit-normal draws estimates the same integral as uniform draws; an unknown density is refused."""
    path, eps = get_path("vp"), 0.01
    t = torch.tensor([0.05, 0.3, 0.5, 0.9], dtype=DT)
    u = ((t - eps) / (1 - 2 * eps)).numpy()
    ratio = torch.from_numpy(u * (1 - u) / stats.norm.pdf(np.log(u / (1 - u))))  # p_U / p_logit-normal
    got = loss_weight(path, t, "score", "likelihood", time_sampler="logit-normal", t_eps=eps)
    vp_g2 = math.pi / torch.tan(math.pi * t / 2)  # 2 beta (alpha' beta - alpha beta') / alpha on vp
    torch.testing.assert_close(got, vp_g2 * ratio, rtol=1e-10, atol=0)
    lognormal = logit_normal(0.5, 0.8)  # a callable: its draws are clamped, not rescaled (sample_time)
    tn = t.numpy()
    z = (np.log(tn / (1 - tn)) - 0.5) / 0.8
    ratio = torch.from_numpy(0.8 * tn * (1 - tn) / stats.norm.pdf(z) / (1 - 2 * eps))
    got = loss_weight(path, t, "velocity", "likelihood", time_sampler=lognormal, t_eps=eps)
    torch.testing.assert_close(got, 4 / vp_g2 * ratio, rtol=1e-10, atol=0)
    g = torch.Generator().manual_seed(0)
    t_u = sample_time(200_000, time_sampler="uniform", t_eps=eps, generator=g, dtype=DT)
    t_ln = sample_time(200_000, time_sampler="logit-normal", t_eps=eps, generator=g, dtype=DT)
    w_u = loss_weight(path, t_u, "score", "likelihood", t_eps=eps) * torch.cos(t_u)
    w_ln = loss_weight(path, t_ln, "score", "likelihood", time_sampler="logit-normal", t_eps=eps) * torch.cos(
        t_ln
    )
    se = math.hypot(w_u.std() / math.sqrt(w_u.numel()), w_ln.std() / math.sqrt(w_ln.numel()))
    assert abs(w_u.mean() - w_ln.mean()) < 4 * se
    with pytest.raises(ValueError, match="density"):
        loss_weight(path, t, "score", "likelihood", time_sampler=lambda n, gen: torch.rand(n), t_eps=eps)


def test_dim_reduction_mean_is_the_sum_over_dims_divided_by_d(batch):
    x_data, noise, t = batch
    model = LinearModel(3)
    summed = dsm(model, x_data, "vp", t, noise, reduction="none")
    averaged = dsm(model, x_data, "vp", t, noise, reduction="none", dim_reduction="mean")
    torch.testing.assert_close(averaged, summed / 3, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="dim_reduction"):
        cfm(model, x_data, "vp", t, noise, dim_reduction="max")


def test_likelihood_weighting_matches_hand_g2_and_is_the_same_in_both_spaces(batch):
    x_data, noise, t = batch
    model = LinearModel(3, seed=6)
    x, *_ = hand_sample("linear", x_data, noise, t)
    g2 = 2 * (1 - t) / t  # linear path: 2 beta (alpha' beta - alpha beta') / alpha
    want = (g2 * ((model(x, t) + noise / col(1 - t)) ** 2).sum(1)).mean()
    assert torch.allclose(dsm(model, x_data, "linear", t, noise, weighting="likelihood"), want, rtol=1e-10)
    # v - u = (g^2/2)(s - s_cond): the velocity loss with 4/g^2 equals the score loss with g^2
    for name in ("linear", "vp"):
        kw = dict(prediction="score", weighting="likelihood", reduction="none")
        a = cfm(model, x_data, name, t, noise, **kw)
        b = dsm(model, x_data, name, t, noise, **kw)
        assert torch.allclose(a, b, rtol=1e-9)


def test_callable_weighting_and_reductions(batch):
    x_data, noise, t = batch
    model = LinearModel(3)
    per = cfm(model, x_data, "linear", t, noise, reduction="none")
    assert per.shape == (64,)
    weighted = cfm(model, x_data, "linear", t, noise, weighting=lambda s: 1 + s**2, reduction="none")
    assert torch.allclose(weighted, (1 + t**2) * per)
    assert torch.allclose(cfm(model, x_data, "linear", t, noise, reduction="sum"), per.sum())
    assert torch.allclose(cfm(model, x_data, "linear", t, noise), per.mean())


def test_given_t_is_clamped_into_t_eps_interval(batch):
    x_data, noise, _ = batch
    model = LinearModel(3)
    ones, zeros = torch.ones(64, dtype=DT), torch.zeros(64, dtype=DT)
    at_end = dsm(model, x_data, "linear", ones, noise, t_eps=0.01)
    assert torch.allclose(at_end, dsm(model, x_data, "linear", 0.99 * ones, noise))
    assert torch.allclose(
        cfm(model, x_data, "linear", 0.0, noise, t_eps=0.01), cfm(model, x_data, "linear", 0.01, noise)
    )
    # t_eps = 0: velocity prediction on cfm has no singularity; the score target at t = 1 raises
    assert torch.isfinite(cfm(model, x_data, "linear", ones, noise, t_eps=0.0))
    assert torch.isfinite(cfm(model, x_data, "vp", zeros, noise, t_eps=0.0))
    with pytest.raises(ValueError, match="singular"):
        dsm(model, x_data, "linear", ones, noise, t_eps=0.0)
    with pytest.raises(ValueError, match="likelihood"):
        cfm(model, x_data, "linear", ones, noise, t_eps=0.0, weighting="likelihood")


def test_uniform_and_logit_normal_time_samplers_have_the_right_law():
    g = torch.Generator().manual_seed(0)
    eps = 0.01
    t = sample_time(20000, time_sampler="uniform", t_eps=eps, generator=g, dtype=DT)
    assert eps <= t.min() and t.max() <= 1 - eps
    assert stats.kstest(t.numpy(), stats.uniform(eps, 1 - 2 * eps).cdf).pvalue > 1e-3
    t = sample_time(20000, time_sampler="logit-normal", t_eps=eps, generator=g, dtype=DT)

    def cdf(s):  # t = eps + (1 - 2 eps) sigmoid(z), z ~ N(0, 1)
        u = (s - eps) / (1 - 2 * eps)
        return stats.norm.cdf(stats.logistic.ppf(u))

    assert stats.kstest(t.numpy(), cdf).pvalue > 1e-3
    t = sample_time(20000, time_sampler=logit_normal(1.0, 0.5), t_eps=0.0, generator=g, dtype=DT)
    assert stats.kstest(t.numpy(), lambda s: stats.norm(1.0, 0.5).cdf(stats.logistic.ppf(s))).pvalue > 1e-3
    # a callable is clamped
    t = sample_time(5, time_sampler=lambda n, gen: torch.linspace(0, 1, n), t_eps=0.1, dtype=DT)
    assert torch.allclose(t, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=DT))


def test_drawn_noise_and_times_are_reproducible_and_standard(batch):
    x_data, *_ = batch
    model = LinearModel(3)
    a = cfm(model, x_data, "vp", generator=torch.Generator().manual_seed(3))
    b = cfm(model, x_data, "vp", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # with a zero model, E cfm = E_t ||alpha' x_data + beta' noise||^2: check the drawn noise is N(0, I)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x0 = torch.zeros(40000, 2, dtype=DT)
    per = cfm(zero, x0, "linear", generator=torch.Generator().manual_seed(0), reduction="none")
    assert abs(per.mean().item() - 2.0) < 5 * per.std().item() / 200


def test_loss_weight_values():
    path = get_path("vp")
    t = torch.tensor([0.2, 0.5, 0.8], dtype=DT)
    beta = torch.cos(math.pi * t / 2)
    assert torch.allclose(loss_weight(path, t, "score", "noise"), beta**2)
    # velocity space: alpha^2 / det_v^2 with det_v = pi / 2 on vp
    assert torch.allclose(
        loss_weight(path, t, "velocity", "noise"), (torch.sin(math.pi * t / 2) * 2 / math.pi) ** 2
    )
    vp_g2 = math.pi / torch.tan(math.pi * t / 2)  # 2 beta (alpha' beta - alpha beta') / alpha on vp
    assert torch.allclose(loss_weight(path, t, "velocity", "likelihood"), 4 / vp_g2)
    assert torch.equal(loss_weight(path, t, "score", None), torch.ones(3, dtype=DT))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prediction": "eps"}, "prediction"),
        ({"weighting": "snr"}, "weighting"),
        ({"time_sampler": "beta"}, "time_sampler"),
        ({"t_eps": 0.7}, "t_eps"),
        ({"reduction": "max"}, "reduction"),
        ({"t": torch.full((4,), 1.5, dtype=DT)}, "t must lie"),
        ({"noise": torch.zeros(4, 3, dtype=DT)}, "noise"),
        ({"weighting": lambda t: torch.ones(7, dtype=DT)}, "weighting"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    x_data = torch.zeros(4, 2, dtype=DT)
    with pytest.raises(ValueError, match=match):
        cfm(lambda x, t: x, x_data, "linear", **kwargs)


def test_bad_model_and_marginal_raise_value_error():
    x_data = torch.zeros(4, 2, dtype=DT)
    with pytest.raises(ValueError, match="model"):
        cfm(lambda x, t: x[:, :1], x_data, "linear")
    with pytest.raises(ValueError, match="model"):
        cfm("not a model", x_data, "linear")
    with pytest.raises(ValueError, match="marginal"):
        fm(lambda x, t: x, x_data, get_path("linear"))
    with pytest.raises(ValueError, match="objective"):
        objective_loss("ddpm", lambda x, t: x, x_data, "linear")
    with pytest.raises(ValueError, match="x_data"):
        cfm(lambda x, t: x, torch.zeros(4), "linear")


def test_fm_and_sm_with_labels_regress_on_the_class_field(batch):
    """With labels y the target is the exact field of the class's own points (y = -1: of all the points)."""
    x_data, noise, t = batch
    g = torch.Generator().manual_seed(8)
    data = torch.randn(12, 3, generator=g, dtype=DT)
    labels = torch.tensor([0, 1, 2] * 4)
    labelled = EmpiricalMarginal(data, "vp", labels=labels)
    linear = LinearModel(3)
    model = lambda x, t, y=None: linear(x, t) + (0 if y is None else y[:, None] * 0.1)  # noqa: E731
    for loss in (fm, sm):
        for k in (0, 2):
            y = torch.full((64,), k)
            class_k = EmpiricalMarginal(data[labels == k], "vp")
            want = loss(lambda x, tt, y=y: model(x, tt, y), x_data, class_k, t, noise, reduction="none")
            got = loss(model, x_data, labelled, t, noise, y=y, reduction="none")
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        none = torch.full((64,), -1)
        whole = EmpiricalMarginal(data, "vp")
        unlabelled = loss(
            lambda x, tt, none=none: model(x, tt, none), x_data, whole, t, noise, reduction="none"
        )
        got = loss(model, x_data, labelled, t, noise, y=none, reduction="none")
        torch.testing.assert_close(got, unlabelled, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="labelled marginal"):
        fm(model, x_data, EmpiricalMarginal(data, "vp"), t, noise, y=torch.zeros(64, dtype=torch.long))
