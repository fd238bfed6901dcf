"""Schrödinger-bridge CFM: the Brownian-bridge sample and target against torchcfm on the same pairs, t and
noise, against closed forms (the bridge's mean and variance by Monte Carlo, the target as the time derivative
of the sample by autograd and finite differences, the continuity equation of the bridge's Gaussian law), and
the entropic pairing at the absolute epsilon = 2 sigma^2 against torchcfm's plan."""

from __future__ import annotations

import math

import pytest
import torch

from flowscore.bridges import bridge_std, sb_cfm_target, sb_couple, sb_epsilon
from flowscore.couplings import entropic_plan, pairing

F64 = torch.float64


def batch(n: int = 256, dims: tuple[int, ...] = (2,), dtype=F64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_source, x_data, noise = (torch.randn(n, *dims, generator=gen, dtype=F64).to(dtype) for _ in range(3))
    return x_source, 3 * x_data + 1, noise


# -- against torchcfm
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_sample_and_target_equal_torchcfm_on_the_same_pairs_t_and_noise(dtype, sigma) -> None:
    """torchcfm's SchrodingerBridgeConditionalFlowMatcher (x0 = source at t = 0, x1 = data at t = 1: the same
    direction) through its lower-level methods with our t and noise: the same x bit for bit, the same target
    to float precision (torchcfm divides by 2t(1-t) + 1e-8: a relative 1e-8 / (2t(1-t)) <= 1.1e-7 for t in
    [0.05, 0.95]); at t = 0 and 1 both give x_data - x_source exactly."""
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    matcher = cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=sigma)
    x_source, x_data, noise = batch(dims=(3, 2), dtype=dtype)
    t = torch.linspace(0.05, 0.95, 256, dtype=F64).to(dtype)
    x, target = sb_cfm_target(x_source, x_data, t, noise, sigma)
    x_cfm = matcher.sample_xt(x_source, x_data, t, noise)
    target_cfm = matcher.compute_conditional_flow(x_source, x_data, t, x_cfm)
    torch.testing.assert_close(x, x_cfm, rtol=0, atol=0)
    rtol = 2e-7 if dtype == F64 else 2e-5  # float32: torchcfm's (x - mu) form cancels digits
    assert float((target - target_cfm).abs().max() / target_cfm.abs().max()) < rtol
    ends = torch.tensor([0.0, 1.0] * 128, dtype=dtype)
    x, target = sb_cfm_target(x_source, x_data, ends, noise, sigma)
    x_cfm = matcher.sample_xt(x_source, x_data, ends, noise)
    torch.testing.assert_close(x, x_cfm, rtol=0, atol=0)
    torch.testing.assert_close(target, matcher.compute_conditional_flow(x_source, x_data, ends, x_cfm))
    torch.testing.assert_close(target, x_data - x_source, rtol=0, atol=0)


def test_sb_pairing_plan_is_torchcfm_sinkhorn_plan_at_epsilon_two_sigma_squared() -> None:
    """torchcfm's SB-CFM builds OTPlanSampler(method, reg=2 sigma^2) on the raw squared distances (no
    normalisation); its sinkhorn plan (rows source, columns data) is ours (rows data, columns source) with
    reg_absolute=True, transposed, up to our Sinkhorn stopping threshold (marginals within 1e-6). The
    relative default solves another problem (epsilon times the mean cost)."""
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    sigma = 0.8
    matcher = cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=sigma, ot_method="sinkhorn")
    assert matcher.ot_sampler.reg == pytest.approx(sb_epsilon(sigma)) == 2 * sigma**2
    x_source, x_data, _ = batch(n=64, seed=1)
    theirs = torch.from_numpy(matcher.ot_sampler.get_map(x_source, x_data)).T
    ours = entropic_plan(x_data, x_source, sb_epsilon(sigma), reg_absolute=True)
    assert float((ours - theirs).abs().sum()) < 1e-5 and float((ours - theirs).abs().max()) < 1e-6
    relative = entropic_plan(x_data, x_source, sb_epsilon(sigma))
    assert float((relative - theirs).abs().sum()) > 0.1


# -- closed forms, no peer needed
def test_bridge_marginal_has_the_brownian_bridge_mean_and_variance() -> None:
    """Fixed endpoints, n = 400k noise draws: the mean of x is t x_data + (1 - t) x_source and its variance
    sigma^2 t (1 - t) per coordinate (within 5 standard errors; float64)."""
    n, sigma = 400_000, 0.7
    x_source, x_data = torch.tensor([[-1.0, 2.0]], dtype=F64), torch.tensor([[3.0, 0.5]], dtype=F64)
    gen = torch.Generator().manual_seed(2)
    for t_value in (0.1, 0.5, 0.85):
        noise = torch.randn(n, 2, generator=gen, dtype=F64)
        x, _ = sb_cfm_target(x_source.expand(n, 2), x_data.expand(n, 2), t_value, noise, sigma)
        var = sigma**2 * t_value * (1 - t_value)
        mean = t_value * x_data + (1 - t_value) * x_source
        assert float((x.mean(0) - mean).abs().max()) < 5 * math.sqrt(var / n)
        assert float((x.var(0) / var - 1).abs().max()) < 5 * math.sqrt(2 / n)


def test_target_is_the_time_derivative_of_the_bridge_sample_at_fixed_noise() -> None:
    """d/dt [t x_data + (1 - t) x_source + sigma sqrt(t (1 - t)) noise] written out here, by autograd and by
    central differences, equals the target; and the (x - mu) form of Tong et al. eq. 21 gives the same."""
    sigma = 0.6
    x_source, x_data, noise = batch(n=64)
    t = torch.linspace(0.01, 0.99, 64, dtype=F64)

    def bridge(tt: torch.Tensor) -> torch.Tensor:
        tt = tt[:, None]
        return tt * x_data + (1 - tt) * x_source + sigma * torch.sqrt(tt * (1 - tt)) * noise

    tt = t.clone().requires_grad_(True)
    out = bridge(tt)
    columns = [torch.autograd.grad(out[:, j].sum(), tt, retain_graph=True)[0] for j in range(out.shape[1])]
    by_autograd = torch.stack(columns, 1)
    x, target = sb_cfm_target(x_source, x_data, t, noise, sigma)
    torch.testing.assert_close(x, bridge(t), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(target, by_autograd, rtol=1e-12, atol=1e-12)
    h = 1e-6
    torch.testing.assert_close(target, (bridge(t + h) - bridge(t - h)) / (2 * h), rtol=1e-6, atol=1e-6)
    mu = t[:, None] * x_data + (1 - t[:, None]) * x_source
    eq21 = x_data - x_source + ((1 - 2 * t) / (2 * t * (1 - t)))[:, None] * (x - mu)
    torch.testing.assert_close(target, eq21, rtol=1e-10, atol=1e-10)


def test_target_field_satisfies_the_continuity_equation_of_the_bridge_law() -> None:
    """For a fixed pair the bridge's law is N(mu_t, s_t^2 I), s_t = sigma sqrt(t (1 - t)); the target, as a
    field of x (noise = (x - mu_t) / s_t), transports it: d/dt log p + u . grad log p + div u = 0, each term
    by autograd of the log-density written here."""
    sigma, d = 0.9, 3
    x_source = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
    x_data = torch.tensor([2.0, -1.5, 0.0], dtype=F64)
    gen = torch.Generator().manual_seed(3)
    for t_value in (0.05, 0.3, 0.5, 0.8):
        x = (torch.randn(5, d, generator=gen, dtype=F64) + 1).requires_grad_(True)
        t = torch.full((5,), t_value, dtype=F64, requires_grad=True)

        def log_p(x, t):
            mu = t[:, None] * x_data + (1 - t[:, None]) * x_source
            s = sigma * torch.sqrt(t * (1 - t))[:, None]
            return (-0.5 * ((x - mu) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(1)

        def field(x, t_value=t_value):
            mu = t_value * x_data + (1 - t_value) * x_source
            noise = (x - mu) / bridge_std(torch.tensor(t_value, dtype=F64), sigma)
            return sb_cfm_target(x_source.expand(5, d), x_data.expand(5, d), t_value, noise, sigma)[1]

        lp = log_p(x, t)
        d_t, grad_x = torch.autograd.grad(lp.sum(), (t, x))
        u = field(x)
        div = sum(torch.autograd.grad(u[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(d))
        residual = d_t + (u * grad_x).sum(1) + div
        assert float(residual.detach().abs().max()) < 1e-9, (t_value, residual)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_finite_on_the_closed_interval_and_straight_line_at_sigma_zero(dtype) -> None:
    x_source, x_data, noise = batch(n=7, dtype=dtype)
    t = torch.tensor([0.0, 1e-30, 1e-7, 0.5, 1 - 1e-7, 1.0, 1.0], dtype=dtype)
    x, target = sb_cfm_target(x_source, x_data, t, noise, 2.0)
    assert torch.isfinite(x).all() and torch.isfinite(target).all()
    assert torch.equal(x[0], x_source[0]) and torch.equal(x[-1], x_data[-1])  # pinned at both ends
    x, target = sb_cfm_target(x_source, x_data, t, noise, 0.0)
    torch.testing.assert_close(target, x_data - x_source, rtol=0, atol=0)
    torch.testing.assert_close(x, t[:, None] * x_data + (1 - t[:, None]) * x_source, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": math.inf}, "sigma"),
        ({"t": 1.5}, "t must lie"),
        ({"noise": torch.zeros(4, 3, dtype=F64)}, "noise"),
        ({"x_source": torch.zeros(4, 2, dtype=torch.float32)}, "x_source"),
    ],
)
def test_bad_inputs_raise_one_line_value_errors(change, pattern) -> None:
    x_source, x_data, noise = batch(n=4)
    args = {"x_source": x_source, "x_data": x_data, "t": 0.5, "noise": noise, "sigma": 1.0, **change}
    with pytest.raises(ValueError, match=pattern):
        sb_cfm_target(**args)
    with pytest.raises(ValueError, match="sigma"):
        sb_couple(x_source, x_data, 0.0)


# -- the pairing
def test_sb_couple_draws_source_rows_from_the_absolute_epsilon_plan() -> None:
    """Each data row's source index is drawn from row i of entropic_plan(..., 2 sigma^2, absolute): empirical
    frequencies over 600 draws within 5 standard errors of the plan's conditional rows; a small sigma gives
    the exact OT assignment."""
    sigma, b, draws = 0.7, 5, 600
    x_source, x_data, _ = batch(n=b, seed=4)
    x_data = x_data / 3  # comparable scales: a plan neither diagonal nor uniform
    rows = entropic_plan(x_data, x_source, sb_epsilon(sigma), reg_absolute=True)
    rows = rows / rows.sum(1, keepdim=True)
    gen = torch.Generator().manual_seed(5)
    counts = torch.zeros(b, b, dtype=F64)
    for _ in range(draws):
        paired = sb_couple(x_source, x_data, sigma, generator=gen)
        index = (paired[:, None, :] == x_source[None]).all(-1).double().argmax(1)
        counts[torch.arange(b), index] += 1
    freq = counts / draws
    assert 2 / b < float(rows.max()) < 0.95  # neither the uniform plan nor a permutation
    assert bool(((freq - rows).abs() <= 5 * torch.sqrt(rows * (1 - rows) / draws) + 1e-12).all())
    perm = torch.tensor([3, 0, 4, 1, 2])
    near = x_source[perm] + 0.02 * x_data  # a clear optimum: the permutation
    assert torch.equal(pairing(near, x_source, "ot"), perm)
    torch.testing.assert_close(sb_couple(x_source, near, 0.05, generator=gen), x_source[perm], rtol=0, atol=0)


# -- data to data: the sigma -> 0 limit between two Gaussians, against the closed-form OT map
def sqrtm_spd(m: torch.Tensor) -> torch.Tensor:
    """The symmetric positive definite square root, by eigendecomposition (float64)."""
    values, vectors = torch.linalg.eigh(m)
    return vectors @ torch.diag(values.sqrt()) @ vectors.T


GAUSS_M0, GAUSS_M1 = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([-0.5, 3.0], dtype=F64)
GAUSS_S0 = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=F64)
GAUSS_S1 = torch.tensor([[0.3, -0.4], [-0.4, 1.5]], dtype=F64)  # does not commute with S0


def gaussian_ot_matrix() -> torch.Tensor:
    """A = S0^{-1/2} (S0^{1/2} S1 S0^{1/2})^{1/2} S0^{-1/2}: the OT map x -> m1 + A (x - m0) of N(m0, S0) to
    N(m1, S1) for the squared distance."""
    root = sqrtm_spd(GAUSS_S0)
    inv_root = torch.linalg.inv(root)
    return inv_root @ sqrtm_spd(root @ GAUSS_S1 @ root) @ inv_root


def flow_map(velocity) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, c) with x(1) = M x(0) + c for the flow of a velocity field affine in x, integrated by fs.sample
    (rk4, 200 uniform steps) from x_init = [0, e1, e2] in float64."""
    from flowscore import sample

    x_init = torch.cat([torch.zeros(1, 2, dtype=F64), torch.eye(2, dtype=F64)])
    end = sample(velocity, "linear", x_init=x_init, sampler="rk4", steps=200, grid="uniform")
    return (end[1:] - end[:1]).T, end[0]


def test_two_gaussians_ot_flow_reaches_the_closed_form_ot_map_and_the_independent_flow_does_not() -> None:
    """Data to data between N(m0, S0) and N(m1, S1) (non-commuting covariances), sigma = 0 (straight pairs):
    the exact marginal velocity of the OT coupling, v_t(x) = m1 - m0 + (A - I)((1-t) I + t A)^{-1}(x - m_t),
    integrated from x_init gives the closed-form OT map m1 + A (x - m0) (A symmetric positive definite with
    A S0 A = S1); that of the independent coupling, v_t(x) = m1 - m0 + C_t V_t^{-1}(x - m_t) with
    V_t = (1-t)^2 S0 + t^2 S1, C_t = t S1 - (1-t) S0, also pushes N(m0, S0) to N(m1, S1) (M S0 M^T = S1) but
    by another map (not symmetric), with a larger transport cost."""
    a = gaussian_ot_matrix()
    eye = torch.eye(2, dtype=F64)
    torch.testing.assert_close(a, a.T, rtol=0, atol=1e-12)
    assert bool((torch.linalg.eigvalsh(a) > 0).all())
    torch.testing.assert_close(a @ GAUSS_S0 @ a, GAUSS_S1, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(GAUSS_S0 @ GAUSS_S1, GAUSS_S1 @ GAUSS_S0)

    def mean_at(t: torch.Tensor) -> torch.Tensor:
        return (1 - t)[:, None] * GAUSS_M0 + t[:, None] * GAUSS_M1

    def ot_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mix = (1 - t)[:, None, None] * eye + t[:, None, None] * a  # (B, 2, 2)
        gain = (a - eye) @ torch.linalg.inv(mix)
        return GAUSS_M1 - GAUSS_M0 + (gain @ (x - mean_at(t))[..., None])[..., 0]

    def independent_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t[:, None, None]
        var = (1 - tt) ** 2 * GAUSS_S0 + tt**2 * GAUSS_S1
        cov = tt * GAUSS_S1 - (1 - tt) * GAUSS_S0
        return GAUSS_M1 - GAUSS_M0 + (cov @ torch.linalg.inv(var) @ (x - mean_at(t))[..., None])[..., 0]

    m_ot, c_ot = flow_map(ot_velocity)
    torch.testing.assert_close(m_ot, a, rtol=0, atol=1e-8)
    torch.testing.assert_close(c_ot, GAUSS_M1 - a @ GAUSS_M0, rtol=0, atol=1e-8)
    m_ind, c_ind = flow_map(independent_velocity)
    torch.testing.assert_close(m_ind @ GAUSS_S0 @ m_ind.T, GAUSS_S1, rtol=0, atol=1e-8)
    torch.testing.assert_close(c_ind, GAUSS_M1 - m_ind @ GAUSS_M0, rtol=0, atol=1e-8)
    assert float((m_ind - m_ind.T).abs().max()) > 0.05  # not symmetric: not the gradient of a convex map

    def cost(m: torch.Tensor) -> float:  # E ||M (x - m0) + m1 - x||^2 for x ~ N(m0, S0)
        d = m - eye
        return float(torch.trace(d @ GAUSS_S0 @ d.T) + ((GAUSS_M1 - GAUSS_M0) ** 2).sum())

    assert cost(m_ind) > cost(a) + 1e-3, (cost(m_ind), cost(a))
