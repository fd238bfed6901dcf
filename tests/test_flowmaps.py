"""Flow maps against independent ground truth: a Gaussian-to-Gaussian flow in closed form, scipy's DOP853,
the gradient theorem of docs/theory.md section 18 on common draws, and exact one-call sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import flowscore as fs
from flowscore.flowmaps import (
    Lagrangian,
    MeanFlow,
    Semigroup,
    draw_pairs,
    end_derivative,
    sample_jumps,
    total_derivative,
)
from flowscore.models import build_model

F64 = torch.float64
M, SIGMA = torch.tensor([0.7, -0.4], dtype=F64), 0.5


# -- closed form: data N(M, SIGMA^2 I), linear path, sigma_t^2 = t^2 SIGMA^2 + (1 - t)^2 -------------------
def _sd(t: torch.Tensor) -> torch.Tensor:
    return (t**2 * SIGMA**2 + (1 - t) ** 2).sqrt()


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1)


def exact_map(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """X(x, t, s) = s M + (sigma_s / sigma_t) (x - t M): the affine map between the Gaussian marginals."""
    return _col(s) * M + _col(_sd(s) / _sd(t)) * (x - _col(t) * M)


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v(x, t) = M + (sigma_t' / sigma_t) (x - t M), sigma_t' = (t SIGMA^2 - (1 - t)) / sigma_t."""
    d_sd = (t * SIGMA**2 - (1 - t)) / _sd(t)
    return M + _col(d_sd / _sd(t)) * (x - _col(t) * M)


class ExactAverage(torch.nn.Module):
    """The exact average velocity u(x, t, s) of the closed form (s != t), v(x, t) at s = t: a two-time
    model."""

    two_time = True

    def forward(self, x, t, s, y=None):
        gap = s - t
        safe = torch.where(gap == 0, torch.ones_like(gap), gap)
        u = (exact_map(x, t, s) - x) / _col(safe)
        return torch.where(_col(gap) == 0, exact_velocity(x, t), u)


def _times(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.85 * torch.rand(n, generator=g, dtype=F64)
    s = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=F64)
    x = exact_map(torch.randn(n, 2, generator=g, dtype=F64), torch.zeros(n, dtype=F64), t)
    return x, t, s


def test_closed_form_velocity_is_the_derivative_of_the_map():
    x, t, s = _times(16, 0)
    h = 1e-6
    fd = (exact_map(x, t, s + h) - exact_map(x, t, s - h)) / (2 * h)
    assert torch.allclose(fd, exact_velocity(exact_map(x, t, s), s), atol=1e-7)


def test_meanflow_identity_on_the_closed_form():
    """u = v + (s - t) du/dt with du/dt from one JVP, checked against finite differences along the exact
    trajectory; the MeanFlow loss with the marginal velocity vanishes at the exact average velocity."""
    x, t, s = _times(32, 1)
    model = ExactAverage()
    v = exact_velocity(x, t)
    u, dudt = total_derivative(model, x, t, s, v)
    h = 1e-5
    ahead, behind = exact_map(x, t, t + h), exact_map(x, t, t - h)
    fd = (model(ahead, t + h, s) - model(behind, t - h, s)) / (2 * h)
    assert torch.allclose(dudt, fd, atol=1e-6, rtol=1e-6)
    assert torch.allclose(u, v + _col(s - t) * dudt, atol=1e-10)
    assert float(MeanFlow("linear").regress(model, x, t, s, v).max()) < 1e-18
    # a wrong velocity (the data mean) gives a nonzero loss: the check can fail
    assert float(MeanFlow("linear").regress(model, x, t, s, torch.zeros_like(v) + M).max()) > 1e-3


def test_meanflow_loss_with_equal_rows_is_the_whole_batch_jvp_formula():
    """Rows with s = t skip the JVP: the loss and its parameter gradients equal the formula written out
    here on the whole batch (one jvp, target v + (s - t) du/dt), for every mix of equal and jump rows."""
    torch.manual_seed(0)
    net = build_model("mlp", (2,), width=32, depth=2, two_time=True).double()
    x, t, s = _times(12, 5)
    v = torch.randn(12, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    for equal in (torch.arange(12) < 5, torch.zeros(12, dtype=torch.bool), torch.ones(12, dtype=torch.bool)):
        s_mix = torch.where(equal, t, s)
        u, dudt = torch.func.jvp(lambda a, b, c: net(a, b, c), (x, t, s_mix), (v, torch.ones_like(t), 0 * t))
        want = (u - (v + _col(s_mix - t) * dudt).detach()).pow(2).sum(1)
        got = MeanFlow("linear").regress(net, x, t, s_mix, v)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
        grads = [torch.autograd.grad(loss.sum(), list(net.parameters())) for loss in (got, want)]
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(*grads, strict=True))


def test_semigroup_loss_with_equal_rows_is_the_whole_batch_formula():
    """Rows with s = t skip the two target calls: the loss and its parameter gradients equal the splitting
    formula written out here on the whole batch (target v where s = t), for every mix of equal and jump
    rows."""
    torch.manual_seed(0)
    net = build_model("mlp", (2,), width=32, depth=2, two_time=True).double()
    x, t, s = _times(12, 7)
    v = torch.randn(12, 2, dtype=F64, generator=torch.Generator().manual_seed(8))
    lam = torch.rand(12, dtype=F64, generator=torch.Generator().manual_seed(9))
    for equal in (torch.arange(12) < 5, torch.zeros(12, dtype=torch.bool), torch.ones(12, dtype=torch.bool)):
        s_mix = torch.where(equal, t, s)
        r = t + lam * (s_mix - t)
        with torch.no_grad():
            first = net(x, t, r)
            second = net(x + _col(r - t) * first, r, s_mix)
        split = _col(lam) * first + (1 - _col(lam)) * second
        want = (net(x, t, s_mix) - torch.where(_col(equal), v, split)).pow(2).sum(1)
        got = Semigroup("linear").regress(net, x, t, s_mix, r, v)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
        grads = [torch.autograd.grad(loss.sum(), list(net.parameters())) for loss in (got, want)]
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(*grads, strict=True))


def test_semigroup_target_on_the_closed_form():
    x, t, s = _times(32, 2)
    r = t + 0.3 * (s - t)
    s[:4] = t[:4]  # s = t rows regress on the velocity
    loss = Semigroup("linear").regress(ExactAverage(), x, t, s, r, exact_velocity(x, t))
    assert float(loss.max()) < 1e-20


def test_lagrangian_identity_on_the_closed_form():
    """u = v(X(x, t, s), s) - (s - t) du/ds, with du/ds from one JVP in s checked against finite differences
    of the closed form, in both directions of time; the Lagrangian loss vanishes at the exact average
    velocity and not at a wrong one."""
    x, t, s = _times(32, 3)
    model = ExactAverage()
    u, duds = end_derivative(model, x, t, s)
    h = 1e-6
    fd = (model(x, t, s + h) - model(x, t, s - h)) / (2 * h)
    assert torch.allclose(duds, fd, atol=1e-6, rtol=1e-6)
    assert torch.allclose(u, exact_velocity(exact_map(x, t, s), s) - _col(s - t) * duds, atol=1e-10)
    s[:4] = t[:4]  # s = t rows regress on the velocity
    v = exact_velocity(x, t)
    assert float(Lagrangian("linear").regress(model, x, t, s, v).max()) < 1e-18

    class Scaled(ExactAverage):
        def forward(self, x, t, s, y=None):
            return 1.1 * super().forward(x, t, s)

    assert float(Lagrangian("linear").regress(Scaled(), x, t, s, v)[4:].min()) > 1e-6


def test_lagrangian_loss_with_equal_rows_is_the_whole_batch_formula():
    """The loss and its parameter gradients equal the formula written out here on the whole batch (one jvp
    in s, the teacher at the end point without gradient, target v where s = t), for every mix of equal and
    jump rows: the gradient flows through u and through du/ds."""
    torch.manual_seed(0)
    net = build_model("mlp", (2,), width=32, depth=2, two_time=True).double()
    x, t, s = _times(12, 10)
    v = torch.randn(12, 2, dtype=F64, generator=torch.Generator().manual_seed(11))
    for equal in (torch.arange(12) < 5, torch.zeros(12, dtype=torch.bool), torch.ones(12, dtype=torch.bool)):
        s_mix = torch.where(equal, t, s)
        u, duds = torch.func.jvp(lambda c: net(x, t, c), (s_mix,), (torch.ones_like(t),))
        with torch.no_grad():
            teacher = net(x + _col(s_mix - t) * u, s_mix, s_mix)
        jump = u + _col(s_mix - t) * duds - teacher
        want = torch.where(_col(equal), u - v, jump).pow(2).sum(1)
        got = Lagrangian("linear").regress(net, x, t, s_mix, v)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
        grads = [torch.autograd.grad(loss.sum(), list(net.parameters())) for loss in (got, want)]
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(*grads, strict=True))


def test_mixture_flow_map_matches_closed_form_and_dop853():
    """GaussianMixture.flow_map: K = 1 against the closed form; a 3-component mixture on vp against scipy's
    DOP853 at rtol 1e-12, per-row times in both directions."""
    x, t, s = _times(8, 3)
    single = fs.GaussianMixture(M[None], torch.tensor([SIGMA], dtype=F64), path="linear")
    assert torch.allclose(single.flow_map(x, t, s), exact_map(x, t, s), atol=1e-7)
    means = torch.tensor([[1.0, 0.0], [-1.0, 1.2], [0.2, -1.5]], dtype=F64)
    gm = fs.GaussianMixture(means, torch.tensor([0.2, 0.35, 0.1], dtype=F64), path="vp")
    marginal = gm.marginal()
    got = gm.flow_map(x, t, s)
    for i in range(x.shape[0]):
        sol = solve_ivp(
            lambda tau, z: marginal.velocity(torch.from_numpy(z)[None], float(tau)).numpy()[0],
            (float(t[i]), float(s[i])),
            x[i].numpy(),
            method="DOP853",
            rtol=1e-12,
            atol=1e-12,
        )
        np.testing.assert_allclose(got[i].numpy(), sol.y[:, -1], atol=2e-7)
    # float32 mixtures solve in float64 too: the same map within float32 rounding
    gm32 = fs.GaussianMixture(means.float(), torch.tensor([0.2, 0.35, 0.1]), path="vp")
    assert torch.allclose(gm32.flow_map(x.float(), t.float(), s.float()).double(), got, atol=1e-5)


def test_empirical_flow_map_against_dop853_and_the_data_end():
    g = torch.Generator().manual_seed(4)
    data = torch.randn(20, 2, generator=g, dtype=F64) * 0.6
    em = fs.EmpiricalMarginal(data, "linear", dtype=F64)
    x = torch.randn(2, 2, generator=g, dtype=F64)
    got = em.flow_map(x, 0.0, 0.9)
    for i in range(1):
        sol = solve_ivp(
            lambda tau, z: em.velocity(torch.from_numpy(z)[None], float(tau)).numpy()[0],
            (0.0, 0.9),
            x[i].numpy(),
            method="DOP853",
            rtol=1e-10,
            atol=1e-10,
        )
        np.testing.assert_allclose(got[i].numpy(), sol.y[:, -1], atol=1e-6)
    # t = 1: every trajectory ends on a data point (within the documented 1e-6 clamp)
    end = em.flow_map(x, 0.0, 1.0)
    assert float(torch.cdist(end, data).min(1).values.max()) < 1e-4
    # backwards in time undoes forwards
    assert torch.allclose(em.flow_map(got, 0.9, 0.0), x, atol=1e-6)


def test_one_jump_of_the_exact_average_velocity_is_the_exact_map():
    """fs.sample on a two-time model: K jumps of the exact u reproduce X(x, 0, 1) for every K (the semigroup
    law), and fs.flow_map of the same model is one jump."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(64, 2, generator=g, dtype=F64)
    target = exact_map(x0, torch.zeros(64, dtype=F64), torch.ones(64, dtype=F64))
    for k in (1, 2, 4):
        out, nfe = fs.sample(ExactAverage(), "linear", x_init=x0, steps=k, return_nfe=True)
        assert nfe == k
        assert torch.allclose(out, target, atol=1e-12)
    assert torch.allclose(
        fs.flow_map(ExactAverage(), "linear", x0, 0.25, 0.75),
        exact_map(x0, torch.full((64,), 0.25, dtype=F64), torch.full((64,), 0.75, dtype=F64)),
        atol=1e-12,
    )
    # a K-jump Euler sampler of the instantaneous velocity is NOT the map (the check can fail)
    euler = fs.sample(lambda x, t: exact_velocity(x, t), "linear", x_init=x0, sampler="euler", steps=1)
    assert float((euler - target).abs().max()) > 1e-2


@pytest.mark.parametrize("prediction", ["velocity", "data", "noise"])
def test_flow_map_of_a_velocity_model_any_prediction(prediction):
    """fs.flow_map of the mixture's exact field of any kind (a model) equals the exact map."""
    gm = fs.GaussianMixture(
        torch.tensor([[1.0, 0.5], [-1.0, -0.5]], dtype=F64),
        torch.tensor([0.3, 0.2], dtype=F64),
        path="linear",
    )
    marginal = gm.marginal()
    x, t, s = _times(6, 6)
    model = lambda x, t: marginal.field(prediction, x, t)  # noqa: E731
    got = fs.flow_map(model, "linear", x, t, s, prediction=prediction, rtol=1e-9, atol=1e-9)
    assert torch.allclose(got, gm.flow_map(x, t, s), atol=1e-6)


def _flat_grad(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def test_meanflow_gradient_equivalence_conditional_vs_marginal():
    """E[grad] with the conditional velocity equals E[grad] with the exact marginal velocity (a mixture), on
    common draws: the mean difference is within 4 standard errors, and a wrong marginal is caught."""
    torch.manual_seed(0)
    means = torch.tensor([[1.0, 0.0], [-0.5, 0.8]], dtype=F64)
    gm = fs.GaussianMixture(means, torch.tensor([0.3, 0.2], dtype=F64), path="linear")
    marginal = gm.marginal()
    net = build_model("mlp", (2,), width=32, depth=2, time_embedding=8, two_time=True).double()
    model = fs.PreconditionedFlowMap(net, "linear", 0.5)
    objective = MeanFlow("linear")
    path = fs.get_path("linear")
    g = torch.Generator().manual_seed(1)
    diffs, wrong, grads = [], [], []
    for _ in range(60):
        x_data = gm.sample(128, g)
        t, s = draw_pairs(128, share_equal=0.0, generator=g, dtype=F64)
        noise = torch.randn(x_data.shape, generator=g, dtype=F64)
        x = path.sample(x_data, t, noise)
        per = {}
        for name, v in (
            ("cond", path.target(x_data, t, noise)),
            ("marg", marginal.velocity(x, t)),
            ("bad", marginal.velocity(x, t) + 0.3),
        ):
            net.zero_grad()
            objective.regress(model, x, t, s, v).mean().backward()
            per[name] = _flat_grad(net)
        diffs.append(per["cond"] - per["marg"])
        wrong.append(per["bad"] - per["marg"])
        grads.append(per["marg"])
    d, bad, gbar = torch.stack(diffs), torch.stack(wrong), torch.stack(grads).mean(0)
    se = math.sqrt(float(d.var(0).sum()) / d.shape[0])
    assert float(d.mean(0).norm()) < 4 * se  # equal within Monte Carlo error
    assert se < 0.25 * float(gbar.norm())  # and the error is small next to the gradient itself
    se_bad = math.sqrt(float(bad.var(0).sum()) / bad.shape[0])
    assert float(bad.mean(0).norm()) > 10 * se_bad  # negative control


def test_guidance_enters_the_target_with_the_model_unconditional_velocity():
    class Stub(torch.nn.Module):
        two_time = True

        def forward(self, x, t, s, y=None):
            return torch.full_like(x, 2.0) if y is not None and bool((y < 0).all()) else torch.zeros_like(x)

    obj = MeanFlow("linear", guidance=1.5)
    x, v = torch.zeros(3, 2), torch.ones(3, 2)
    out = obj._guided_velocity(Stub(), x, torch.full((3,), 0.3), v, torch.tensor([0, -1, 2]))
    expected = torch.tensor([[2.5 * 1 - 1.5 * 2] * 2, [1.0, 1.0], [2.5 * 1 - 1.5 * 2] * 2])
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("objective", [MeanFlow, Semigroup, Lagrangian])
def test_reference_velocity_is_the_posterior_average_over_the_own_point_and_the_references(objective):
    # linear path, x = t a + (1 - t) e: given the data point a the velocity is (a - x) / (1 - t), and the
    # posterior over a finite set {a_j} weighs a_j by exp(-|x - t a_j|^2 / (2 (1 - t)^2)); written in
    # numpy here, over the row's own point and every pool point (of its class where the row has a label)
    g = torch.Generator().manual_seed(11)
    pool, labels = torch.randn(40, 2, generator=g, dtype=F64), torch.arange(40) % 3
    batch, y = torch.randn(16, 2, generator=g, dtype=F64), torch.tensor([0, 1, 2, -1] * 4)
    for with_labels in (False, True):
        obj = objective("linear", reference_size=40)
        assert obj.needs_data and obj.options()["reference_size"] == 40
        obj.bind(pool, labels if with_labels else None)
        rows = y if with_labels else None
        t, s, x, v = obj._draw(batch, torch.Generator().manual_seed(3), rows)
        assert torch.equal(v, obj._draw(batch, torch.Generator().manual_seed(3), rows)[3])  # reproducible
        for i in range(16):
            ti, xi = float(t[i]), x[i].numpy()
            keep = pool.numpy() if not with_labels or y[i] < 0 else pool[labels == y[i]].numpy()
            points = np.concatenate([batch[i : i + 1].numpy(), keep])
            logw = -((xi - ti * points) ** 2).sum(1) / (2 * (1 - ti) ** 2)
            w = np.exp(logw - logw.max())
            expected = (w[:, None] * (points - xi)).sum(0) / w.sum() / (1 - ti)
            assert np.allclose(v[i].numpy(), expected, rtol=1e-9, atol=1e-9), (with_labels, i)
        if not with_labels:
            v_unlabelled = v
    plain = objective("linear")._draw(batch, torch.Generator().manual_seed(3))[3]
    assert not plain.allclose(v)  # the references change the target
    many = objective("linear", reference_size=1000)  # at most the training set: all 40 points
    many.bind(pool)
    assert torch.allclose(many._draw(batch, torch.Generator().manual_seed(3))[3], v_unlabelled, atol=1e-12)


def test_draw_pairs_law():
    t, s = draw_pairs(20000, share_equal=0.25, law="uniform", generator=torch.Generator().manual_seed(0))
    assert bool((t <= s).all())
    assert abs(float((s == t).float().mean()) - 0.25) < 0.02
    # min and max of two uniforms: E[t] = 1/3, E[s] = 2/3 on the unequal rows
    other = s != t
    assert abs(float(t[other].mean()) - 1 / 3) < 0.01 and abs(float(s[other].mean()) - 2 / 3) < 0.01


@pytest.mark.parametrize("law", ["uniform", "logit-normal"])
def test_draw_pairs_equal_rows_follow_the_law(law):
    """The s = t rows (flow matching) take t from the law itself, not the minimum of two draws (which would
    put twice the weight at the noise end): Kolmogorov-Smirnov against U(0, 1), resp. logit(t) against
    N(0.4, 0.8^2) (scipy's distributions)."""
    from scipy import stats

    t, s = draw_pairs(8000, share_equal=0.5, law=law, mean=0.4, std=0.8, dtype=F64,
                      generator=torch.Generator().manual_seed(1))  # fmt: skip
    equal = t[s == t].numpy()
    assert equal.size > 3500
    if law == "uniform":
        result = stats.kstest(equal, stats.uniform.cdf)
    else:
        result = stats.kstest(np.log(equal / (1 - equal)), stats.norm(0.4, 0.8).cdf)
    assert result.pvalue > 1e-3, result
    # the minimum of two uniforms is rejected by the same check (it can fail)
    low = torch.rand(2, 4000, generator=torch.Generator().manual_seed(2), dtype=F64).min(0).values.numpy()
    assert stats.kstest(low, stats.uniform.cdf).pvalue < 1e-6


@pytest.mark.parametrize("objective", [MeanFlow, Semigroup, Lagrangian])
def test_training_learns_the_closed_form_map(objective):
    """A short training run on N(M, SIGMA^2) learns the one-jump map: its error falls well below the start's
    (conditional targets are noisy: a few hundred steps do not reach the exact map)."""
    torch.manual_seed(0)
    net = build_model("mlp", (2,), width=64, depth=2, time_embedding=16, two_time=True)
    obj = objective("linear", sigma_data=SIGMA, law="uniform")
    model = obj.wrap(net)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(512, 2, generator=g)
    target = exact_map(x0.double(), torch.zeros(512, dtype=F64), torch.ones(512, dtype=F64)).float()

    def error() -> float:
        return float((sample_jumps(model, "linear", x_init=x0, steps=1) - target).pow(2).mean().sqrt())

    before = error()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(400):
        x_data = M.float() + SIGMA * torch.randn(256, 2, generator=g)
        loss = obj.loss(model, x_data, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = error()
    assert after < 0.6 * before, (before, after)


def test_two_time_models_and_errors():
    net = build_model("mlp", (2,), two_time=True)
    with pytest.raises(ValueError, match="two_time=True"):
        net(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="two-time network"):
        MeanFlow().wrap(build_model("mlp", (2,)))
    assert isinstance(MeanFlow().wrap(net), fs.PreconditionedFlowMap)
    assert MeanFlow(precondition=False).wrap(net) is net
    unet = build_model("unet", (1, 8, 8), two_time=True, num_classes=3)
    out = MeanFlow().wrap(unet)(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.ones(2), torch.tensor([0, -1]))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="does not know its image size"):  # as fs.sample of a velocity UNet
        fs.sample(MeanFlow().wrap(unet), "linear", 2, y=torch.tensor([0, 1]))
    assert fs.sample(MeanFlow().wrap(unet), "linear", 2, y=torch.tensor([0, 1]), shape=(1, 8, 8)).shape == (
        2, 1, 8, 8,
    )  # fmt: skip
    with pytest.raises(ValueError, match="s must lie in"):
        fs.GaussianMixture(M[None], torch.tensor([SIGMA], dtype=F64)).flow_map(
            torch.zeros(1, 2, dtype=F64), 0.0, 1.5, path="linear"
        )


def test_train_load_and_sample_a_flow_map_run(tmp_path):
    """TrainConfig(objective="meanflow") trains a two-time model through the Trainer; load_run rebuilds it
    (preconditioned, two_time) and fs.sample makes K jumps with it; the objective round-trips its dict."""
    from flowscore.objectives import objective_from_dict

    config = fs.TrainConfig(data="moons", data_n=2000, objective="semigroup", steps=30, batch_size=64,
                            warmup=5, loss_floor=False, checkpoint_every=30)  # fmt: skip
    fs.Trainer(config, tmp_path / "run", progress=False).train()
    run = fs.load_run(tmp_path / "run")
    assert isinstance(run.model, fs.PreconditionedFlowMap) and run.model.two_time
    x, nfe = fs.sample(
        run.model, run.path, 50, steps=2, return_nfe=True, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (50, 2) and nfe == 2 and bool(torch.isfinite(x).all())
    obj = MeanFlow("vp", share_equal=0.25, law="logit-normal", mean=0.4, adaptive_power=1.0, guidance=2.0)
    again = objective_from_dict(obj.to_dict())
    assert type(again) is MeanFlow and again.options() == obj.options()
    with pytest.raises(ValueError, match="prediction must be velocity"):
        fs.TrainConfig(data="moons", objective="meanflow", prediction="noise").validate()
    with pytest.raises(ValueError, match="does not apply"):
        fs.sample(run.model, run.path, 5, sampler="heun")
