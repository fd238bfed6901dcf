"""GaussianMixture: closed-form marginals against quadrature, a large empirical sample, and autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import reference_schedule
from scipy import integrate, stats

from flowscore.marginals import EmpiricalMarginal
from flowscore.mixtures import GaussianMixture
from flowscore.paths import get_path

PATHS = ("linear", "vp", "vp-linear", "ve")
MEANS_1D = [[-1.5], [0.5], [2.0]]
STDS_1D = [0.3, 0.6, 0.2]
WEIGHTS_1D = [0.2, 0.5, 0.3]


def mixture_1d(dtype=torch.float64) -> GaussianMixture:
    return GaussianMixture(
        torch.tensor(MEANS_1D, dtype=dtype),
        torch.tensor(STDS_1D, dtype=dtype),
        torch.tensor(WEIGHTS_1D, dtype=dtype),
    )


def quadrature_1d(x: float, t: float, path, components=None) -> dict[str, float]:
    """Posterior expectations over x_data by numerical integration of p_data(x_data) N(x; a x_data, b^2);
    ``components`` ``(means, stds, weights)`` of the 1-D mixture, default the module's."""
    a, b, da, db = (float(v) for v in reference_schedule(path.name, torch.tensor([t], dtype=torch.float64)))
    means, stds, weights = components or (MEANS_1D, STDS_1D, WEIGHTS_1D)

    def p_data(z):
        return sum(w * stats.norm.pdf(z, m[0], s) for m, s, w in zip(means, stds, weights, strict=True))

    def joint(z):
        return p_data(z) * stats.norm.pdf(x, a * z, b)

    points = [m[0] for m in means] + [x / a if a > 1e-3 else 0.0]
    opts = {"limit": 400, "points": points, "epsabs": 0.0, "epsrel": 1e-10}
    z0 = integrate.quad(joint, -8, 8, **opts)[0]
    mean = integrate.quad(lambda z: z * joint(z), -8, 8, **opts)[0] / z0
    noise = (x - a * mean) / b
    # score by differentiating the density under the integral: d/dx N(x; a z, b^2) = -(x - a z)/b^2 N
    score = integrate.quad(lambda z: -(x - a * z) / b**2 * joint(z), -8, 8, **opts)[0] / z0
    return {
        "data": mean,
        "noise": noise,
        "velocity": da * mean + db * noise,
        "score": score,
        "log_prob": math.log(z0),
    }


@pytest.mark.parametrize("name", PATHS)
def test_marginal_matches_quadrature_1d(name):
    path = get_path(name)
    m = mixture_1d().marginal(path)
    for t in (0.05, 0.5, 0.9):
        xs = [-1.0, 0.3, 1.7]
        x = torch.tensor(xs, dtype=torch.float64)[:, None]
        for i, xv in enumerate(xs):
            ref = quadrature_1d(xv, t, path)
            for kind in ("data", "noise", "velocity", "score"):
                got = float(m.field(kind, x, t)[i, 0])
                assert got == pytest.approx(ref[kind], rel=1e-7, abs=1e-9), (name, t, kind, xv)
            assert float(m.log_prob(x, t)[i]) == pytest.approx(ref["log_prob"], rel=1e-8)


def test_log_prob_data_matches_scipy():
    mix = mixture_1d()
    x = np.linspace(-3, 3, 7)
    ref = np.log(
        sum(w * stats.norm.pdf(x, m[0], s) for m, s, w in zip(MEANS_1D, STDS_1D, WEIGHTS_1D, strict=True))
    )
    got = mix.log_prob_data(torch.tensor(x)[:, None]).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_marginal_at_data_end_is_the_data_density():
    mix = mixture_1d()
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    np.testing.assert_allclose(mix.marginal("linear").log_prob(x, 1.0), mix.log_prob_data(x), rtol=1e-12)


@pytest.mark.parametrize("name", PATHS)
def test_matches_empirical_marginal_of_a_large_sample(name):
    path = get_path(name)
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(
        torch.tensor([[-1.0, 0.5], [1.2, -0.3]], dtype=torch.float64),
        torch.tensor([0.5, 0.7], dtype=torch.float64),
        torch.tensor([0.4, 0.6], dtype=torch.float64),
    )
    sample = mix.sample(200_000, generator=g)
    emp, exact = EmpiricalMarginal(sample, path), mix.marginal(path)
    x = torch.tensor([[-1.0, 0.0], [0.3, 0.4], [1.5, -1.0]], dtype=torch.float64)
    # times where beta_t >= ~0.4, so that many of the 200k points share each posterior (ve: beta_0.7 = 0.05)
    for t in (0.3, 0.5) if name == "ve" else (0.3, 0.7):
        for kind in ("data", "velocity"):
            diff = (emp.field(kind, x, t) - exact.field(kind, x, t)).norm(dim=1)
            # Monte-Carlo error of a self-normalised average over 200k points: a few 1e-3 at most
            assert float(diff.max()) < 2e-2 * max(1.0, float(exact.field(kind, x, t).norm(dim=1).max())), kind
        assert torch.allclose(emp.log_prob(x, t), exact.log_prob(x, t), atol=1e-2)


@pytest.mark.parametrize("name", PATHS)
def test_score_is_gradient_of_log_prob(name):
    mix = GaussianMixture(
        torch.randn(4, 3, dtype=torch.float64), torch.tensor([0.2, 0.5, 1.0, 0.05]).double()
    )
    m = mix.marginal(name)
    for t in (0.0, 0.3, 0.8, 1.0):
        x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(m.log_prob(x, t).sum(), x)
        torch.testing.assert_close(m.score(x.detach(), t), grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", PATHS)
def test_fields_finite_at_both_ends_and_consistent(name):
    path = get_path(name)
    m = mixture_1d(torch.float32).marginal(path)
    x = torch.tensor([[-2.0], [0.1], [3.0]])
    for t in (0.0, 1.0):
        for kind in ("data", "noise", "velocity", "score"):
            assert torch.isfinite(m.field(kind, x, t)).all(), (name, t, kind)
    # inside (0, 1) the closed forms agree with the path's conversions
    m64 = mixture_1d().marginal(path)
    x64 = x.double()
    for src in ("data", "noise", "score"):
        torch.testing.assert_close(
            path.convert(m64.field(src, x64, 0.4), x64, 0.4, src, "velocity"),
            m64.velocity(x64, 0.4),
            rtol=1e-10,
            atol=1e-10,
        )


def test_linear_path_endpoints_closed_form():
    m = mixture_1d().marginal("linear")
    x = torch.tensor([[0.7]], dtype=torch.float64)
    # t = 0: x is pure noise: E[x_data|x] = E[x_data], velocity = E[x_data] - x, score = -x
    mean = sum(w * mu[0] for mu, w in zip(MEANS_1D, WEIGHTS_1D, strict=True))
    assert float(m.posterior_mean(x, 0.0)) == pytest.approx(mean, rel=1e-12)
    assert float(m.velocity(x, 0.0)) == pytest.approx(mean - 0.7, rel=1e-12)
    assert float(m.score(x, 0.0)) == pytest.approx(-0.7, rel=1e-12)
    # t = 1: score is that of p_data; posterior mean is x itself
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture_1d().log_prob_data(xg).sum(), xg)
    assert float(m.score(x, 1.0)) == pytest.approx(float(grad), rel=1e-12)
    assert float(m.posterior_mean(x, 1.0)) == pytest.approx(0.7, rel=1e-12)


def test_sample_moments_and_shape():
    mix = GaussianMixture(
        torch.zeros(2, 2, 2) + torch.tensor([-1.0, 1.0])[:, None, None],
        torch.tensor([0.5, 0.1]),
        torch.tensor([0.25, 0.75]),
    )
    x = mix.sample(40_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (40_000, 2, 2)
    assert float(x.mean()) == pytest.approx(0.5, abs=0.02)  # 0.25 * -1 + 0.75 * 1
    var = 0.25 * (0.25 + 1) + 0.75 * (0.01 + 1) - 0.25  # E[x^2] - E[x]^2
    assert float(x.var()) == pytest.approx(var, rel=0.03)


def test_bad_inputs():
    means = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(means, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(means, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(means, torch.ones(2), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(means, torch.ones(2), torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture(torch.tensor([[float("nan")]]), torch.ones(1))
    mix = GaussianMixture(means, torch.ones(2))
    with pytest.raises(ValueError, match="data points have shape"):
        mix.log_prob_data(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="n must"):
        mix.sample(0)
    m = mix.marginal("vp")
    with pytest.raises(ValueError, match="data points have shape"):
        m.velocity(torch.zeros(4, 2), 0.5)
    with pytest.raises(ValueError, match="kind"):
        m.field("flow", torch.zeros(4, 3), 0.5)


def test_mixture_methods_are_its_marginal_on_the_given_or_default_path():
    means = torch.tensor([[-1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    stds = torch.tensor([0.3, 0.5], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.full((5,), 0.4, dtype=torch.float64)
    gm = GaussianMixture(means, stds, path="vp")
    m = GaussianMixture(means, stds).marginal("vp")
    for name in ("posterior_mean", "velocity", "score", "noise", "log_prob"):
        assert torch.equal(getattr(gm, name)(x, t), getattr(m, name)(x, t))
        assert torch.equal(getattr(GaussianMixture(means, stds), name)(x, t, "vp"), getattr(m, name)(x, t))
    with pytest.raises(ValueError, match="path"):
        GaussianMixture(means, stds).velocity(x, t)


# -- class labels: conditional and classifier-free-guided fields in closed form ----------------------------
LABELS_1D = [0, 1, 0]  # components -1.5 and 2.0 are class 0, component 0.5 is class 1


def class_components(label: int):
    """The class's components with their weights renormalised: the class-conditional data distribution."""
    keep = [k for k, c in enumerate(LABELS_1D) if c == label]
    total = sum(WEIGHTS_1D[k] for k in keep)
    return [MEANS_1D[k] for k in keep], [STDS_1D[k] for k in keep], [WEIGHTS_1D[k] / total for k in keep]


@pytest.mark.parametrize("name", PATHS)
def test_conditional_and_guided_fields_match_quadrature(name):
    path = get_path(name)
    mix = GaussianMixture(
        torch.tensor(MEANS_1D, dtype=torch.float64),
        torch.tensor(STDS_1D, dtype=torch.float64),
        torch.tensor(WEIGHTS_1D, dtype=torch.float64),
        labels=torch.tensor(LABELS_1D),
    )
    m = mix.marginal(path)
    assert m.num_classes == 2
    xs = [-1.0, 0.3]
    x = torch.tensor(xs, dtype=torch.float64)[:, None]
    y = torch.tensor([0, 1])  # rows without a label are the unconditional field (tested above)
    for t in (0.3, 0.9):
        for i, xv in enumerate(xs):
            label = int(y[i])
            uncond = quadrature_1d(xv, t, path)
            cond = quadrature_1d(xv, t, path, class_components(label))
            for kind in ("data", "noise", "velocity", "score"):
                got = float(m.field(kind, x, t, y=y)[i, 0])
                assert got == pytest.approx(cond[kind], rel=1e-7, abs=1e-9), (name, t, kind, label)
                guided = (1 + 2.0) * cond[kind] - 2.0 * uncond[kind]
                got = float(m.field(kind, x, t, y=y, guidance=2.0)[i, 0])
                assert got == pytest.approx(guided, rel=1e-7, abs=1e-8), (name, t, kind, label)
            assert float(m.log_prob(x, t, y=y)[i]) == pytest.approx(cond["log_prob"], rel=1e-8)


def test_sample_with_labels_and_class_checks():
    mix = GaussianMixture(
        torch.tensor([[-5.0], [0.0], [5.0]]), torch.tensor([0.1, 0.1, 0.1]), labels=torch.tensor([1, 0, 1])
    )
    x, y = mix.sample_with_labels(3000, generator=torch.Generator().manual_seed(0))
    nearest = (x - mix.means.T).abs().argmin(1)  # well separated: the component drawn
    assert torch.equal(y, torch.tensor([1, 0, 1])[nearest])
    assert abs(float((y == 0).float().mean()) - 1 / 3) < 0.03
    m = mix.marginal("linear")
    with pytest.raises(ValueError, match="2 classes"):
        m.velocity(torch.zeros(2, 1), 0.5, y=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="guidance needs class labels"):
        m.velocity(torch.zeros(2, 1), 0.5, guidance=1.0)
    gap = GaussianMixture(torch.zeros(2, 1), torch.ones(2), labels=torch.tensor([0, 2]))  # class 1 empty
    with pytest.raises(ValueError, match="no component"):
        gap.marginal("vp").score(torch.zeros(1, 1), 0.5, y=torch.tensor([1]))
    with pytest.raises(ValueError, match="labels"):
        GaussianMixture(torch.zeros(2, 1), torch.ones(2), labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        GaussianMixture(torch.zeros(2, 1), torch.ones(2), labels=torch.tensor([0, 1, 1]))


def test_tiny_stds_in_float32():
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    # a std whose square underflows float32 (1e-30): refused with a clear message, not NaN
    with pytest.raises(ValueError, match="stds holds 1e-30.*float32"):
        GaussianMixture(means, torch.tensor([1e-30, 1.0]))
    with pytest.raises(ValueError, match="stds holds 1e\\+30"):
        GaussianMixture(means, torch.tensor([1e30, 1.0]))
    # representable but tiny: the float32 fields are the float64 ones (computed in float64 inside)
    small = GaussianMixture(means, torch.tensor([1e-15, 0.5]))
    exact = GaussianMixture(means.double(), torch.tensor([1e-15, 0.5], dtype=torch.float64))
    x = torch.tensor([[0.3, 0.9], [1.8, -0.7], [10.0, 10.0]])
    for name in PATHS:
        for t in (0.0, 0.5, 0.99):
            for kind in ("velocity", "score", "data"):
                got, want = (
                    small.marginal(name).field(kind, x, t),
                    exact.marginal(name).field(kind, x.double(), t),
                )
                torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
            assert torch.isfinite(small.marginal(name).log_prob(x, t)).all()
    # at t = 1 within a few s of the tiny component: the score is about -(x - m) / s^2 = -2e15
    near = torch.tensor([[2e-15, 1.0]])
    got, want = small.marginal("linear").score(near, 1.0), exact.marginal("linear").score(near.double(), 1.0)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=0.0)
    assert torch.isfinite(small.log_prob_data(x)).all()
