"""Gaussian paths against independent ground truth: closed-form schedules, autograd, finite differences,
torch.distributions, and sampling statistics. All in float64 unless a test says otherwise."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    DIRECTION_DENOMINATORS,
    EDGE_TIMES,
    PATH_NAMES,
    REFERENCE,
    VE_SIGMA_MAX,
    VE_SIGMA_MIN,
    VP_LINEAR_BETA_MAX,
    VP_LINEAR_BETA_MIN,
    VP_LINEAR_T_CLAMP,
    bcast,
    check_finite_or_value_error,
    make_path,
    reference_schedule,
    reference_targets,
    rel_err,
    zero_quantities,
)

from flowscore import KINDS, GaussianMixture, get_path

F64 = torch.float64


def interior_grid(name: str, n: int = 41) -> torch.Tensor:
    """Times in (0, 1); on vp-linear stop before the documented d_beta clamp at 1 - t_clamp."""
    upper = 1 - 2 * VP_LINEAR_T_CLAMP if name == "vp-linear" else 0.995
    return torch.linspace(0.005, upper, n, dtype=F64)


def batch_for(
    t: torch.Tensor, dims: tuple[int, ...] = (3, 2), seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (t.shape[0], *dims)
    return torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64)


# -- the schedules
@pytest.mark.parametrize("name", PATH_NAMES)
def test_schedule_matches_closed_form(name: str) -> None:
    path = make_path(name)
    t = torch.linspace(0, 1, 101, dtype=F64)
    alpha_fn, beta_fn = REFERENCE[name]
    torch.testing.assert_close(path.alpha(t), alpha_fn(t), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(path.beta(t), beta_fn(t), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["linear", "vp", "custom"])
def test_generative_endpoints_are_exact(name: str) -> None:
    path = make_path(name)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    assert path.alpha(ends).tolist() == [0.0, 1.0]
    assert path.beta(ends).tolist() == [1.0, 0.0]


def test_vp_linear_and_ve_endpoints() -> None:
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    big_t0 = VP_LINEAR_BETA_MIN + 0.5 * (VP_LINEAR_BETA_MAX - VP_LINEAR_BETA_MIN)
    vpl = make_path("vp-linear")
    torch.testing.assert_close(vpl.alpha(ends), torch.tensor([math.exp(-big_t0 / 2), 1.0], dtype=F64))
    assert vpl.beta(ends)[1].item() == 0.0
    torch.testing.assert_close(
        make_path("ve").beta(ends), torch.tensor([VE_SIGMA_MAX, VE_SIGMA_MIN], dtype=F64)
    )


@pytest.mark.parametrize("name", PATH_NAMES)
def test_derivatives_match_autograd_and_finite_differences(name: str) -> None:
    path = make_path(name)
    t = interior_grid(name)
    _, _, d_alpha, d_beta = reference_schedule(name, t)
    torch.testing.assert_close(path.d_alpha(t), d_alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path.d_beta(t), d_beta, rtol=1e-9, atol=1e-12)  # reference lacks expm1
    t, h = t[t < 0.999], 1e-6  # central differences lose accuracy where beta' blows up (vp-linear at t -> 1)
    fd_alpha = (path.alpha(t + h) - path.alpha(t - h)) / (2 * h)
    fd_beta = (path.beta(t + h) - path.beta(t - h)) / (2 * h)
    torch.testing.assert_close(path.d_alpha(t), fd_alpha, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(path.d_beta(t), fd_beta, rtol=1e-6, atol=1e-7)


def test_vp_linear_d_beta_clamp_is_documented_behaviour() -> None:
    """d_beta diverges like 1/sqrt(1 - t) at t = 1; flowscore evaluates it at min(t, 1 - t_clamp)."""
    path = make_path("vp-linear")
    t_c = torch.tensor([1 - VP_LINEAR_T_CLAMP], dtype=F64)
    late = torch.tensor([1 - VP_LINEAR_T_CLAMP / 2, 1 - 1e-9, 1.0], dtype=F64)
    d_beta = path.d_beta(late)
    assert torch.isfinite(d_beta).all()
    torch.testing.assert_close(d_beta, path.d_beta(t_c).expand(3))
    torch.testing.assert_close(path.d_beta(t_c), reference_schedule("vp-linear", t_c)[3], rtol=1e-9, atol=0)


def test_vp_linear_products_keep_their_exact_limits_at_the_data_end() -> None:
    """beta beta' = exp(-T) T' / 2 -> -beta_min / 2 at t = 1 although beta' alone diverges: the schedule's
    closed-form product, g^2 -> beta_min, and a mixture's marginal velocity all reach their exact limits."""
    path = make_path("vp-linear")
    t = torch.tensor([1 - 1e-3, 1 - 1e-6, 1 - 1e-9, 1.0], dtype=F64)
    big_t = VP_LINEAR_BETA_MIN * (1 - t) + 0.5 * (VP_LINEAR_BETA_MAX - VP_LINEAR_BETA_MIN) * (1 - t) ** 2
    rate = VP_LINEAR_BETA_MIN + (1 - t) * (VP_LINEAR_BETA_MAX - VP_LINEAR_BETA_MIN)  # -T'
    torch.testing.assert_close(
        path.schedule(t).beta_d_beta, -0.5 * rate * torch.exp(-big_t), rtol=1e-12, atol=0
    )
    # g^2 = 2 beta (alpha' beta - alpha beta') / alpha = 2 (alpha' beta^2 - alpha beta beta') / alpha
    alpha, beta = torch.exp(-big_t / 2), torch.sqrt(-torch.expm1(-big_t))
    want_g2 = 2 * (0.5 * rate * alpha * beta**2 + alpha * 0.5 * rate * torch.exp(-big_t)) / alpha
    torch.testing.assert_close(path.diffusion_sq(t), want_g2, rtol=1e-10, atol=0)
    assert abs(path.diffusion_sq(1.0).item() - VP_LINEAR_BETA_MIN) < 1e-7  # float32 scalar
    # a mixture's marginal velocity at t = 1 (alpha = 1): alpha' x - beta beta' grad log p_data(x)
    means, stds = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64), torch.tensor([0.5, 0.4], dtype=F64)
    mixture = GaussianMixture(means, stds)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    log_w = -((x[:, None] - means) ** 2).sum(-1) / (2 * stds**2) - 2 * torch.log(stds)
    resp = torch.softmax(log_w, 1)
    score = -(resp[..., None] * (x[:, None] - means) / stds[:, None] ** 2).sum(1)
    want = 0.5 * VP_LINEAR_BETA_MIN * (x + score)  # alpha'(1) = beta_min / 2, beta beta'(1) = -beta_min / 2
    torch.testing.assert_close(mixture.velocity(x, 1.0, path), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mixture.velocity(x, 1 - 1e-9, path), want, rtol=1e-6, atol=1e-8)


def test_schedule_is_a_named_tuple_of_the_four_functions() -> None:
    path = make_path("vp")
    t = torch.tensor([0.1, 0.7], dtype=F64)
    s = path.schedule(t)
    assert isinstance(s, tuple) and s._fields == ("alpha", "beta", "d_alpha", "d_beta")
    alpha, beta, d_alpha, d_beta = reference_schedule("vp", t)
    for got, want in ((s.alpha, alpha), (s.beta, beta), (s.d_alpha, d_alpha), (s.d_beta, d_beta)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="t must lie"):
        path.schedule(1.5)


def test_get_path_applies_or_refuses_options_on_an_instance() -> None:
    ve = get_path("ve", sigma_max=50.0)
    assert get_path(ve) is ve
    other = get_path(ve, sigma_min=0.01)
    assert other.sigma_min == 0.01 and other.sigma_max == 50.0 and ve.sigma_min == 0.002
    with pytest.raises(ValueError, match="bad options"):
        get_path(ve, beta_min=0.2)
    custom = get_path("custom", alpha=lambda t: t, beta=lambda t: 1 - t)
    squared = get_path(custom, alpha=lambda t: t**2)
    torch.testing.assert_close(squared.alpha(torch.tensor([0.5])), torch.tensor([0.25]))
    torch.testing.assert_close(squared.beta(torch.tensor([0.5])), torch.tensor([0.5]))


@pytest.mark.parametrize(
    "options",
    [
        {"sigma_max": math.inf},
        {"sigma_min": math.nan},
        {"sigma_min": 0.0},
        {"sigma_min": 5.0, "sigma_max": 1.0},
    ],
)
def test_ve_refuses_non_finite_or_unordered_sigmas(options) -> None:
    with pytest.raises(ValueError, match="sigma"):
        get_path("ve", **options)


def test_vp_is_variance_preserving_and_linear_is_not() -> None:
    """The seed calls alpha = t, beta = 1 - t the "VP path": it is the linear (CondOT) path."""
    t = torch.linspace(0, 1, 21, dtype=F64)
    for name in ("vp", "vp-linear"):
        path = make_path(name)
        torch.testing.assert_close(path.alpha(t) ** 2 + path.beta(t) ** 2, torch.ones_like(t))
    linear = make_path("linear")
    assert (linear.alpha(t) ** 2 + linear.beta(t) ** 2 - 1).abs().max() > 0.49  # = 0.5 at t = 1/2


# -- conditional score, velocity, log-density
def reference_log_density(x: torch.Tensor, x_data: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    """(B,) log N(x; alpha x_data, beta^2 I), written out."""
    d = x[0].numel()
    sq = ((x - bcast(alpha, x) * x_data) ** 2).flatten(1).sum(1)
    return -0.5 * sq / beta**2 - d * torch.log(beta) - 0.5 * d * math.log(2 * math.pi)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_conditional_score_is_autograd_of_log_density(name: str) -> None:
    path = make_path(name)
    t = interior_grid(name)
    x_data, noise = batch_for(t)
    alpha, beta, _, _ = reference_schedule(name, t)
    x = (bcast(alpha, x_data) * x_data + bcast(beta, x_data) * noise).requires_grad_(True)
    (expected,) = torch.autograd.grad(reference_log_density(x, x_data, alpha, beta).sum(), x)
    x = x.detach()
    for i in range(t.shape[0]):  # row by row: the relative error must hold at every t, not only on average
        assert rel_err(path.conditional_score(x, x_data, t)[i], expected[i]) < 1e-10
    torch.testing.assert_close(path.target(x_data, t, noise, "score"), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_conditional_log_prob_matches_torch_normal(name: str) -> None:
    path = make_path(name)
    t = interior_grid(name, 9)
    x_data, noise = batch_for(t, dims=(4,))
    alpha, beta, _, _ = reference_schedule(name, t)
    x = bcast(alpha, x_data) * x_data + bcast(beta, x_data) * noise
    normal = torch.distributions.Normal(bcast(alpha, x_data) * x_data, bcast(beta, x_data))
    torch.testing.assert_close(path.conditional_log_prob(x, x_data, t), normal.log_prob(x).sum(1))


def time_derivative_by_autograd(fn, t: torch.Tensor) -> torch.Tensor:
    """d fn(t)[b, ...] / d t[b] for a map whose row b depends on t[b] only (one backward per component)."""
    tt = t.detach().clone().requires_grad_(True)
    out = fn(tt)
    flat = out.flatten(1)
    columns = [torch.autograd.grad(flat[:, j].sum(), tt, retain_graph=True)[0] for j in range(flat.shape[1])]
    return torch.stack(columns, 1).reshape(out.shape)


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("with_noise", [False, True], ids=["from-x", "noise-kw"])
def test_conditional_velocity_is_time_derivative_of_sample(name: str, with_noise: bool) -> None:
    """u(x|x_data) = d/dt path.sample(x_data, t, noise) at fixed (x_data, noise): autograd and central FD."""
    path = make_path(name)
    t = interior_grid(name)
    x_data, noise = batch_for(t)
    x = path.sample(x_data, t, noise)
    velocity = path.conditional_velocity(x, x_data, t, noise=noise if with_noise else None)
    by_autograd = time_derivative_by_autograd(lambda tt: path.sample(x_data, tt, noise), t)
    torch.testing.assert_close(velocity, by_autograd, rtol=1e-10, atol=1e-10)
    keep, h = t < 0.999, 1e-6  # central differences lose accuracy where beta' blows up (vp-linear at t -> 1)
    t, x_data, noise = t[keep], x_data[keep], noise[keep]
    by_fd = (path.sample(x_data, t + h, noise) - path.sample(x_data, t - h, noise)) / (2 * h)
    torch.testing.assert_close(velocity[keep], by_fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_velocity_keyword_form_is_finite_at_the_data_end(name: str) -> None:
    """With ``noise=`` the velocity is division-free: finite at t = 1, = alpha' x_data + beta' noise."""
    path = make_path(name)
    t = torch.ones(4, dtype=F64)
    x_data, noise = batch_for(t)
    x = path.sample(x_data, t, noise)
    velocity = path.conditional_velocity(x, x_data, t, noise=noise)
    expected = bcast(path.d_alpha(t), x) * x_data + bcast(path.d_beta(t), x) * noise
    torch.testing.assert_close(velocity, expected)
    if name == "linear":
        torch.testing.assert_close(velocity, x_data - noise)


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_target_matches_reference(name: str, kind: str) -> None:
    path = make_path(name)
    t = interior_grid(name, 17)
    x_data, noise = batch_for(t, dims=(2, 3))
    expected = reference_targets(name, x_data, noise, t)
    torch.testing.assert_close(path.sample(x_data, t, noise), expected["x"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path.target(x_data, t, noise, kind), expected[kind], rtol=1e-10, atol=1e-12)


# -- singular points: finite or the documented ValueError
PATH_METHOD_DENOMINATORS = {
    "conditional_velocity": {"beta"},  # from x: divides by beta
    "conditional_velocity_noise_kw": set(),
    "conditional_score": {"beta"},
    "conditional_log_prob": {"beta"},
    "target_velocity": set(),
    "target_noise": set(),
    "target_data": set(),
    "target_score": {"beta"},
    "diffusion_sq": {"alpha"},
    "alpha": set(),
    "beta": set(),
    "d_alpha": set(),
    "d_beta": set(),
}


def call_path_method(path, method: str, x_data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    x = x_data + noise  # any point: the singularities depend on t only
    if method == "conditional_velocity_noise_kw":
        return path.conditional_velocity(x, x_data, t, noise=noise)
    if method.startswith("target_"):
        return path.target(x_data, t, noise, method.removeprefix("target_"))
    if method.startswith("conditional_"):
        return getattr(path, method)(x, x_data, t)
    return getattr(path, method)(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("t_value", EDGE_TIMES)
@pytest.mark.parametrize("name", PATH_NAMES)
def test_path_methods_finite_or_documented_error(name: str, t_value: float, dtype: torch.dtype) -> None:
    path = make_path(name)
    gen = torch.Generator().manual_seed(1)
    x_data, noise = (
        torch.randn(3, 2, generator=gen, dtype=dtype),
        torch.randn(3, 2, generator=gen, dtype=dtype),
    )
    zeros = zero_quantities(name, t_value)
    for t in (torch.full((3,), t_value, dtype=dtype), t_value):  # (B,) tensor and Python float
        for method, denominators in PATH_METHOD_DENOMINATORS.items():
            check_finite_or_value_error(
                lambda method=method, t=t: call_path_method(path, method, x_data, noise, t),
                expect_error=bool(zeros & denominators),
            )


# -- the SDE coefficient
def reference_diffusion_sq(name: str, t: torch.Tensor) -> torch.Tensor:
    """Closed forms of g^2 = 2 beta^2 (alpha'/alpha - beta'/beta), derived by hand per path."""
    if name == "linear":
        return 2 * (1 - t) / t
    if name == "vp":
        return math.pi / torch.tan(math.pi * t / 2)
    if name == "vp-linear":  # g^2 = the DDPM rate b(t) = beta_min + (1 - t)(beta_max - beta_min)
        return VP_LINEAR_BETA_MIN + (1 - t) * (VP_LINEAR_BETA_MAX - VP_LINEAR_BETA_MIN)
    if name == "ve":
        return 2 * REFERENCE["ve"][1](t) ** 2 * math.log(VE_SIGMA_MAX / VE_SIGMA_MIN)
    return 2 * (1 - t) * (2 - t) / t  # custom alpha = t^2, beta = 1 - t


@pytest.mark.parametrize("name", PATH_NAMES)
def test_diffusion_sq_closed_form_and_velocity_score_relation(name: str) -> None:
    """g^2 matches its closed form, and velocity = (alpha'/alpha) x + g^2/2 score on conditional targets."""
    path = make_path(name)
    t = interior_grid(name)
    g_sq = path.diffusion_sq(t)
    torch.testing.assert_close(g_sq, reference_diffusion_sq(name, t), rtol=1e-10, atol=1e-12)
    x_data, noise = batch_for(t)
    target = reference_targets(name, x_data, noise, t)
    alpha, _, d_alpha, _ = reference_schedule(name, t)
    rebuilt = bcast(d_alpha / alpha, x_data) * target["x"] + bcast(g_sq / 2, x_data) * target["score"]
    torch.testing.assert_close(rebuilt, target["velocity"], rtol=1e-9, atol=1e-9)


# -- the prior
@pytest.mark.parametrize("name", PATH_NAMES)
def test_prior_std_is_beta_at_noise_end(name: str) -> None:
    path = make_path(name)
    assert path.prior_std == pytest.approx(float(REFERENCE[name][1](torch.tensor(0.0, dtype=F64))), rel=1e-14)


@pytest.mark.parametrize("name", ["linear", "vp-linear", "ve"])
def test_prior_log_prob_matches_torch_normal(name: str) -> None:
    path = make_path(name)
    x = 3 * torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    expected = (
        torch.distributions.Normal(torch.zeros((), dtype=F64), path.prior_std).log_prob(x).flatten(1).sum(1)
    )
    torch.testing.assert_close(path.prior_log_prob(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "ve"])
def test_sample_prior_has_the_prior_std(name: str) -> None:
    """Sample mean and std within 5 standard errors of 0 and prior_std (n = 200k, fixed seed)."""
    path = make_path(name)
    n = 200_000
    draws = path.sample_prior((n // 2, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    assert draws.shape == (n // 2, 2) and draws.dtype == F64
    std = path.prior_std
    assert abs(draws.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(draws.std().item() - std) < 5 * std / math.sqrt(2 * n)


def test_log_snr_closed_form_on_vp() -> None:
    t = interior_grid("vp", 11)
    torch.testing.assert_close(make_path("vp").log_snr(t), 2 * torch.log(torch.tan(math.pi * t / 2)))


def test_custom_path_derivatives_by_autograd_of_user_callables() -> None:
    """The custom path's derivatives equal the hand derivatives 2t and -1 (and user-given ones are used)."""
    t = interior_grid("custom", 7)
    path = make_path("custom")
    torch.testing.assert_close(path.d_alpha(t), 2 * t)
    torch.testing.assert_close(path.d_beta(t), -torch.ones_like(t))
    explicit = get_path("custom", alpha=lambda s: s**2, beta=lambda s: 1 - s, d_alpha=lambda s: 3 * s)
    torch.testing.assert_close(explicit.d_alpha(t), 3 * t)


# -- linear with sigma_min (Lipman et al.'s OT path): alpha = t, beta = 1 - (1 - sigma_min) t
SIGMA_MIN = 0.1
CLOSED_T = torch.linspace(0, 1, 101, dtype=F64)  # the closed interval: beta > 0 everywhere


def sigma_min_reference(t: torch.Tensor, sigma_min: float = SIGMA_MIN) -> tuple[torch.Tensor, ...]:
    """(alpha, beta, alpha', beta', g^2) from sympy: the schedule, its derivatives and
    g^2 = 2 beta^2 (alpha'/alpha - beta'/beta), lambdified to float64 (inf where sympy's value at 0 is)."""
    sympy = pytest.importorskip("sympy")
    s = sympy.Symbol("t")
    alpha, beta = s, 1 - (1 - sympy.Rational(str(sigma_min))) * s
    d_alpha, d_beta = sympy.diff(alpha, s), sympy.diff(beta, s)
    g_sq = 2 * beta**2 * (d_alpha / alpha - d_beta / beta)
    out = []
    for expr in (alpha, beta, d_alpha, d_beta, g_sq):
        fn = sympy.lambdify(s, expr, "math")
        at_zero = expr.subs(s, 0)
        zero = float(at_zero) if at_zero.is_finite else math.inf
        out.append(torch.tensor([float(fn(v)) if v > 0 else zero for v in t.tolist()], dtype=F64))
    return tuple(out)


def test_linear_sigma_min_schedule_matches_sympy() -> None:
    """alpha, beta, their derivatives and g^2 against sympy; beta_0 = 1, beta_1 = sigma_min; g^2(1) = 2
    sigma_min; the default linear path is unchanged (and stores no option)."""
    path = get_path("linear", sigma_min=SIGMA_MIN)
    alpha, beta, d_alpha, d_beta, g_sq = sigma_min_reference(CLOSED_T)
    for got, want in zip(path.schedule(CLOSED_T)[:4], (alpha, beta, d_alpha, d_beta), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    assert path.beta(torch.tensor([0.0, 1.0], dtype=F64)).tolist() == [1.0, SIGMA_MIN]
    interior = CLOSED_T[1:]
    torch.testing.assert_close(path.diffusion_sq(interior), g_sq[1:], rtol=1e-12, atol=0)
    assert path.diffusion_sq(1.0).item() == pytest.approx(2 * SIGMA_MIN, rel=1e-6)
    assert path.config() == {"name": "linear", "sigma_min": SIGMA_MIN}
    assert get_path("linear").config() == {"name": "linear"}
    assert get_path("linear", sigma_min=0).beta(1.0).item() == 0.0
    for bad in (-0.1, 1.0, math.nan, "0.1"):
        with pytest.raises(ValueError, match="sigma_min"):
            get_path("linear", sigma_min=bad)


def sigma_min_targets(t: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """x and the four conditional targets of the sigma_min path, written from the sympy schedule."""
    alpha, beta, d_alpha, d_beta, _ = sigma_min_reference(t)
    x_data, noise = batch_for(t, dims=(3,), seed=seed)
    return {
        "x": bcast(alpha, x_data) * x_data + bcast(beta, x_data) * noise,
        "data": x_data,
        "noise": noise,
        "velocity": bcast(d_alpha, x_data) * x_data + bcast(d_beta, x_data) * noise,
        "score": -noise / bcast(beta, x_data),
    }


@pytest.mark.parametrize("src", KINDS)
@pytest.mark.parametrize("dst", KINDS)
def test_linear_sigma_min_conversions_are_exact_and_finite_up_to_t_1(src: str, dst: str) -> None:
    """Each of the 12 conversions maps the sympy-built target of ``src`` to that of ``dst`` on (0, 1] (t = 1
    included: beta_1 = sigma_min > 0); at t = 0 (alpha = 0) exactly the directions that divide by alpha
    raise, as on the plain linear path."""
    path = get_path("linear", sigma_min=SIGMA_MIN)
    t = CLOSED_T[1:]
    want = sigma_min_targets(t)
    got = path.convert(want[src], want["x"], t, src, dst)
    torch.testing.assert_close(got, want[dst], rtol=1e-10, atol=1e-10)
    back = path.convert(got, want["x"], t, dst, src)
    torch.testing.assert_close(back, want[src], rtol=1e-10, atol=1e-10)
    at_zero = torch.zeros(3, dtype=F64)
    start = sigma_min_targets(at_zero)
    check_finite_or_value_error(
        lambda: path.convert(start[src], start["x"], at_zero, src, dst),
        expect_error=src != dst and "alpha" in DIRECTION_DENOMINATORS[(src, dst)],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_linear_sigma_min_is_finite_at_the_data_end(dtype: torch.dtype) -> None:
    """At t = 1 every path feature is finite: conditional score and log-density (beta = sigma_min), both
    velocity forms, g^2, the prior, and every prediction of the preconditioned wrapper on [0, 1]."""
    path = get_path("linear", sigma_min=SIGMA_MIN)
    gen = torch.Generator().manual_seed(4)
    x_data, noise = (
        torch.randn(3, 2, generator=gen, dtype=dtype),
        torch.randn(3, 2, generator=gen, dtype=dtype),
    )
    for t_value in (1.0 - 1e-7, 1.0):
        for method in PATH_METHOD_DENOMINATORS:
            if method != "diffusion_sq":
                out = call_path_method(path, method, x_data, noise, torch.full((3,), t_value, dtype=dtype))
                assert torch.isfinite(out).all(), (method, t_value)
    x = path.sample(x_data, 1.0, noise)
    torch.testing.assert_close(path.conditional_score(x, x_data, 1.0), -noise / SIGMA_MIN)
    assert path.prior_std == 1.0
    from flowscore import Preconditioned

    t = torch.linspace(0, 1, 1001, dtype=dtype)
    for kind in KINDS:
        model = Preconditioned(lambda x, t: torch.ones_like(x), path, kind, sigma_data=0.5)
        assert torch.isfinite(model(torch.randn(t.shape[0], 3, generator=gen, dtype=dtype), t)).all(), kind


def test_linear_sigma_min_marginal_of_a_gaussian_matches_its_closed_form() -> None:
    """data N(m, s^2 I): x_t ~ N(t m, v I) with v = t^2 s^2 + beta_t^2, score -(x - t m)/v, velocity
    m + (t s^2 + beta beta') (x - t m)/v (E[x_data|x] and E[noise|x] of a Gaussian pair), on [0, 1]."""
    path = get_path("linear", sigma_min=SIGMA_MIN)
    m, s = torch.tensor([[0.7, -1.2]], dtype=F64), 0.6
    mixture = GaussianMixture(m, torch.tensor([s], dtype=F64))
    t = torch.linspace(0, 1, 11, dtype=F64)
    x = 2 * torch.randn(11, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    beta, d_beta = 1 - (1 - SIGMA_MIN) * t, -(1 - SIGMA_MIN)
    v = (t**2 * s**2 + beta**2)[:, None]
    centred = x - t[:, None] * m
    normal = torch.distributions.Normal(t[:, None] * m, v.sqrt())
    torch.testing.assert_close(
        mixture.log_prob(x, t, path), normal.log_prob(x).sum(1), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(mixture.score(x, t, path), -centred / v, rtol=1e-12, atol=1e-12)
    want_velocity = m + (t[:, None] * s**2 + beta[:, None] * d_beta) * centred / v
    torch.testing.assert_close(mixture.velocity(x, t, path), want_velocity, rtol=1e-12, atol=1e-12)


def test_linear_sigma_min_time_of_sigma_inverts_sigma_of_t() -> None:
    """grids: sigma = beta/alpha = (1 - (1 - sigma_min) t)/t is inverted exactly (the closed form used to
    assume sigma_min = 0), and a log-SNR grid ends at sigma(1) = sigma_min."""
    from flowscore.grids import sigma_of_t, t_of_sigma, time_grid

    path = get_path("linear", sigma_min=SIGMA_MIN)
    t = torch.linspace(0.01, 1, 50, dtype=F64)
    sigma = (1 - (1 - SIGMA_MIN) * t) / t
    torch.testing.assert_close(sigma_of_t(path, t), sigma, rtol=1e-14, atol=0)
    torch.testing.assert_close(t_of_sigma(path, sigma), t, rtol=1e-13, atol=1e-15)
    times = time_grid(path, 10, "logsnr")
    log_sigma = torch.log(sigma_of_t(path, times[1:]))
    assert times[0] == 0 and times[-1] == 1 and log_sigma[-1].item() == pytest.approx(math.log(SIGMA_MIN))
    steps = log_sigma.diff()  # evenly spaced in log sigma from sigma_max = 80 (capped) to sigma_min
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-10, atol=0)


# -- custom paths declared from expression strings
def test_custom_path_from_expressions_matches_hand_formulas_and_round_trips() -> None:
    """alpha = sin(pi t / 2)^2, beta = exp(-2 t) (1 - t) + 0.01: values against the formulas written here,
    derivatives against hand derivatives; the config holds the strings and rebuilds the same path."""
    path = get_path("custom", alpha="sin(pi * t / 2) ** 2", beta="exp(-2 * t) * (1 - t) + 0.01")
    t = CLOSED_T
    alpha, beta = torch.sin(math.pi * t / 2) ** 2, torch.exp(-2 * t) * (1 - t) + 0.01
    d_alpha = math.pi * torch.sin(math.pi * t / 2) * torch.cos(math.pi * t / 2)
    d_beta = -torch.exp(-2 * t) * (2 * (1 - t) + 1)
    for got, want in zip(path.schedule(t)[:4], (alpha, beta, d_alpha, d_beta), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    config = path.config()
    assert config == {
        "name": "custom",
        "alpha": "sin(pi * t / 2) ** 2",
        "beta": "exp(-2 * t) * (1 - t) + 0.01",
    }
    rebuilt = get_path(config.pop("name"), **config)
    torch.testing.assert_close(rebuilt.schedule(t)[:4], path.schedule(t)[:4], rtol=0, atol=0)
    explicit = get_path("custom", alpha="t", beta="1 - t", d_alpha="2", d_beta="-1")  # given derivatives win
    assert explicit.d_alpha(0.3).item() == 2.0 and explicit.config()["d_alpha"] == "2"
    assert repr(explicit) == "CustomPath(alpha='t', beta='1 - t', d_alpha='2', d_beta='-1')"


@pytest.mark.parametrize(
    ("beta", "pattern"),
    [
        ("__import__('os').system('true')", "only the functions"),
        ("t.real", "Attribute is not allowed"),
        ("open('f')", "only the functions"),
        ("[t][0]", "not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("1 - t if t else 0", "IfExp is not allowed"),
        ("t < 1", "Compare is not allowed"),
        ("exp(t, 2)", "exactly one argument"),
        ("sqrt(x=t)", "exactly one argument"),
        ("y", "unknown name 'y'"),
        ("True", "not a real number"),
        ("'1'", "not a real number"),
        ("1 -", "not a valid expression"),
        ("9" * 400, "too large"),
        ("-" * 80 + "t", "nested too deeply"),
        ("", "non-empty"),
        (
            "1 - 2 * t",
            r"beta must be finite and >= 0 on \[0, 1\], got -0.00195312 at t = 0.500977",
        ),  # 513/1024
        ("log(t)", "beta must be finite"),
        ("sqrt(1 - t)", "d_beta must be finite"),
        ("10 ** 10 ** 10 * (1 - t)", "beta must be finite"),
        (3, "callable or an expression string"),
    ],
)
def test_custom_path_refuses_anything_but_the_whitelisted_grammar(beta, pattern: str) -> None:
    """One-line ValueError naming the reason; nothing is evaluated with eval (the os call never runs)."""
    with pytest.raises(ValueError, match=pattern) as info:
        get_path("custom", alpha="t", beta=beta)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_a_custom_path_with_callables_still_works_but_cannot_be_stored() -> None:
    from flowscore import TrainConfig

    path = get_path("custom", alpha=lambda t: t, beta="1 - t")  # mixed: usable, not storable
    assert path.beta(0.25).item() == 0.75 and path.options() == {}
    with pytest.raises(ValueError, match="cannot be stored.*expression strings"):
        path.config()
    with pytest.raises(ValueError, match="cannot be stored"):
        TrainConfig(data="moons", path="custom", path_options={"alpha": lambda t: t, "beta": "1 - t"})
    with pytest.raises(ValueError, match="bad options for path 'custom'"):
        TrainConfig(data="moons", path="custom")


def test_torchcfm_sigma_is_the_path_beta_sqrt_of_one_minus_t_squared_plus_sigma_squared() -> None:
    """torchcfm's ConditionalFlowMatcher(sigma) from a N(0, I) source, x = t x1 + (1 - t) x0 + sigma eps,
    has the marginals and the marginal velocity of the custom path alpha = t, beta = sqrt((1-t)^2 + sigma^2):
    the least-squares regression of torchcfm's target x1 - x0 on x (fixed x1, t; float64 Monte Carlo) is the
    path's conditional velocity u(x | x1), and x has the path's conditional std. Not linear's sigma_min."""
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    sigma, n = 0.3, 400_000
    matcher = cfm.ConditionalFlowMatcher(sigma=sigma)
    path = get_path("custom", alpha="t", beta=f"sqrt((1 - t) ** 2 + {sigma} ** 2)")
    gen = torch.Generator().manual_seed(6)
    for t_value in (0.2, 0.7):
        x1 = torch.full((n, 1), 1.5, dtype=F64)
        x0, eps = torch.randn(n, 1, generator=gen, dtype=F64), torch.randn(n, 1, generator=gen, dtype=F64)
        t = torch.full((n,), t_value, dtype=F64)
        x = matcher.sample_xt(x0, x1, t, eps)
        u = matcher.compute_conditional_flow(x0, x1, t, x)
        design = torch.cat([x, torch.ones_like(x)], 1)
        slope, intercept = torch.linalg.lstsq(design, u).solution[:, 0].tolist()
        probe = torch.tensor([[0.0], [1.0]], dtype=F64)
        want = path.conditional_velocity(probe, x1[:2], t[:2])[:, 0]  # intercept, intercept + slope
        assert intercept == pytest.approx(want[0].item(), abs=0.01)
        assert slope == pytest.approx((want[1] - want[0]).item(), abs=0.01)
        assert x.std().item() == pytest.approx(path.beta(t_value).item(), rel=0.01)
    assert path.prior_std == pytest.approx(math.sqrt(1 + sigma**2))  # its t = 0 law is not N(0, I)
    assert abs(path.beta(0.7).item() - get_path("linear", sigma_min=sigma).beta(0.7).item()) > 0.05


# -- paths stored in runs
RUN_TINY = dict(
    data="moons", data_n=600, n_holdout=100, width=16, depth=2, batch_size=32, warmup=5, checkpoint_every=20,
    log_every=10, loss_floor=False, device="cpu", lr_schedule="constant",
)  # fmt: skip


def run_weights(run_dir) -> dict[str, torch.Tensor]:
    from flowscore import checkpoint

    tensors, _ = checkpoint.load_checkpoint(run_dir / "checkpoint.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model", "ema"))}


def train_tiny(run_dir, steps: int, resume: bool = False, **changes):
    from flowscore import TrainConfig, Trainer

    config = TrainConfig.from_dict({**RUN_TINY, "steps": steps, **changes})
    Trainer(config, run_dir, progress=False).train(resume=resume)


def test_linear_sigma_min_and_a_custom_path_round_trip_through_a_run_and_resume_exactly(tmp_path) -> None:
    """The run stores the path's options; load_run rebuilds it (beta_1 = sigma_min); a run stopped at step 20
    and resumed to 40 has the weights of an uninterrupted one; the custom path written as the same formula
    trains to the same weights bit for bit; plain linear trains to others; the model samples finitely."""
    from flowscore import load_run, sample

    sigma_min = {"path": "linear", "path_options": {"sigma_min": SIGMA_MIN}}
    custom = {"path": "custom", "path_options": {"alpha": "t", "beta": f"(1 - t) + {SIGMA_MIN} * t"}}
    train_tiny(tmp_path / "full", 40, **sigma_min)
    train_tiny(tmp_path / "part", 20, **sigma_min)
    train_tiny(tmp_path / "part", 40, resume=True, **sigma_min)
    train_tiny(tmp_path / "custom", 40, **custom)
    train_tiny(tmp_path / "plain", 40)
    run = load_run(tmp_path / "full")
    assert (
        run.path.config() == {"name": "linear", "sigma_min": SIGMA_MIN}
        and run.path.beta(torch.ones((), dtype=F64)).item() == 0.1
    )
    assert run.config.path_options == {"sigma_min": SIGMA_MIN}
    assert load_run(tmp_path / "custom").path.config() == {"name": "custom", **custom["path_options"]}
    full, part = run_weights(tmp_path / "full"), run_weights(tmp_path / "part")
    custom_w, plain = run_weights(tmp_path / "custom"), run_weights(tmp_path / "plain")
    assert full.keys() == part.keys() == custom_w.keys()
    assert all(torch.equal(full[k], part[k]) and torch.equal(full[k], custom_w[k]) for k in full)
    assert not any(torch.equal(full[k], plain[k]) for k in full)
    assert torch.isfinite(sample(run.model, run.path, 64, steps=8)).all()


def test_paths_are_equal_by_value():
    """Two paths built from the same name and options (a custom path: the same expressions, or the same
    callables) are equal and hash alike; other options, expressions, callables or a string are not equal."""
    assert get_path("vp") == get_path("vp") and hash(get_path("vp")) == hash(get_path("vp"))
    assert get_path("linear", sigma_min=0.0) == get_path("linear")
    assert get_path("linear", sigma_min=0.1) != get_path("linear")
    assert get_path("ve", sigma_max=50.0) != get_path("ve") and get_path("vp") != get_path("vp-linear")
    spec = {"alpha": "t", "beta": "1 - t"}
    assert get_path("custom", **spec) == get_path("custom", **spec)
    assert len({get_path("custom", **spec), get_path("custom", **spec)}) == 1
    assert get_path("custom", **spec) != get_path("custom", alpha="t", beta="1 - t**2")
    assert get_path("custom", **spec) != get_path("linear")  # the same schedule, another definition
    alpha, beta = (lambda t: t), (lambda t: 1 - t)
    assert get_path("custom", alpha=alpha, beta=beta) == get_path("custom", alpha=alpha, beta=beta)
    assert get_path("custom", alpha=alpha, beta=beta) != get_path("custom", alpha=lambda t: t, beta=beta)
    assert get_path("vp") != "vp"
