"""EmpiricalMarginal against an independent float64 brute force (plain logsumexp over all points)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import reference_schedule

from flowscore.marginals import EmpiricalMarginal
from flowscore.paths import get_path

PATHS = ("linear", "vp", "vp-linear", "ve")
TIMES = (0.001, 0.1, 0.5, 0.9, 0.999)
N, DIM, B = 400, 3, 64

# float32 relative-error bounds (worst row over the batch), 1e-5 except where several data points compete
# at small beta: the float32 scores carry an absolute error ~6e-8 |x|^2 / beta^2 there. Measured on this
# data (fields / log_prob): linear t=0.9 (beta 0.1) 8.9e-5 / 1.3e-4; vp t=0.9 (beta 0.16) 2.1e-5 / 1.7e-5;
# vp-linear t=0.999 (beta 0.01) 2.5e-4 / 5.7e-5; ve t=0.9 (beta 0.006) 3.5e-3 / 5.3e-4. Bounds ~3x those.
# One-hot posteriors (t = 0.999 on linear, vp, ve) are exact to ~5e-8 thanks to the anchor.
TOL32_HARD = {("linear", 0.9): 4e-4, ("vp", 0.9): 1e-4, ("vp-linear", 0.999): 1e-3, ("ve", 0.9): 1e-2}


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(4, dim, generator=g, dtype=torch.float64)
    k = torch.randint(0, 4, (n,), generator=g)
    return (centers[k] + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)).float()


DATA = clustered(N, DIM, 0)


def brute_force(data: torch.Tensor, x: torch.Tensor, t: float, path) -> dict[str, torch.Tensor]:
    """All marginal quantities in float64 from the full (B, N) logit matrix, written from the definitions."""
    xs, xd = x.double(), data.double()
    a, b, da, db = (float(v) for v in reference_schedule(path.name, torch.tensor([t], dtype=torch.float64)))
    logits = -((xs[:, None] - a * xd[None]) ** 2).sum(-1) / (2 * b * b)  # log N(x; a x_i, b^2) + const
    w = torch.softmax(logits, 1)
    cond_noise = (xs[:, None] - a * xd[None]) / b  # (B, N, D): noise given x and x_i
    noise = (w[..., None] * cond_noise).sum(1)
    data_mean = w @ xd
    d = xd.shape[1]
    log_prob = (
        torch.logsumexp(logits, 1) - math.log(len(xd)) - d * math.log(b) - 0.5 * d * math.log(2 * math.pi)
    )
    return {
        "data": data_mean,
        "noise": noise,
        "velocity": (w[..., None] * (da * xd[None] + db * cond_noise)).sum(1),  # E[u(x|x_i)]
        "score": (w[..., None] * (-cond_noise / b)).sum(1),  # E[grad log N(x; a x_i, b^2)]
        "log_prob": log_prob,
    }


def queries(path, t: float, seed: int = 1, data: torch.Tensor = DATA, b: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data), (b,), generator=g)
    noise = torch.randn(b, data.shape[1], generator=g)
    return path.sample(data[idx], t, noise.to(data.dtype))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().reshape(len(ref), -1), ref.reshape(len(ref), -1)
    return float(((got - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).max())


@pytest.mark.parametrize("name", PATHS)
def test_matches_float64_brute_force(name):
    path = get_path(name)
    m = EmpiricalMarginal(DATA, path, chunk_size=96)  # several chunks, last one partial
    for t in TIMES:
        x = queries(path, t)
        t32 = float(torch.tensor(t))  # the float32 time both sides see
        ref = brute_force(DATA, x, t32, path)
        tol = TOL32_HARD.get((name, t), 1e-5)
        for kind in ("data", "noise", "velocity", "score"):
            assert rel_err(m.field(kind, x, t), ref[kind]) < tol, (name, t, kind)
        assert rel_err(m.log_prob(x, t)[:, None], ref["log_prob"][:, None]) < tol, (name, t)


@pytest.mark.parametrize("name", PATHS)
def test_float64_mode_matches_brute_force_tightly(name):
    path = get_path(name)
    m = EmpiricalMarginal(DATA, path, chunk_size=96, dtype=torch.float64)
    assert m.dtype == torch.float64
    for t in TIMES:
        x = queries(path, t).double()
        ref = brute_force(DATA, x, t, path)
        for kind in ("data", "noise", "velocity", "score"):
            assert rel_err(m.field(kind, x, t), ref[kind]) < 1e-9, (name, t, kind)
        assert rel_err(m.log_prob(x, t)[:, None], ref["log_prob"][:, None]) < 1e-12


def test_per_sample_times_and_methods_agree():
    path = get_path("vp")
    m = EmpiricalMarginal(DATA, path)
    t = torch.linspace(0.05, 0.95, B)
    x = queries(path, 0.5)
    for i in (0, 40, B - 1):
        single = m.velocity(x[i : i + 1], float(t[i]))
        assert rel_err(m.velocity(x, t)[i : i + 1], single.double()) < 3e-5  # float32, different blocking
    assert torch.equal(m.field("score", x, t), m.score(x, t))
    assert torch.equal(m.field("data", x, t), m.posterior_mean(x, t))
    assert torch.equal(m.field("noise", x, t), m.noise(x, t))


@pytest.mark.parametrize("name", PATHS)
def test_score_is_gradient_of_log_prob(name):
    path = get_path(name)
    m = EmpiricalMarginal(DATA.double(), path)
    for t in (0.2, 0.7):
        x = queries(path, t).double().requires_grad_(True)
        (grad,) = torch.autograd.grad(m.log_prob(x, t).sum(), x)
        assert rel_err(m.score(x.detach(), t), grad) < 1e-9


@pytest.mark.parametrize("name", PATHS)
def test_velocity_is_converted_score(name):
    path = get_path(name)
    m = EmpiricalMarginal(DATA.double(), path)
    x = queries(path, 0.6).double()
    assert rel_err(m.velocity(x, 0.6), path.convert(m.score(x, 0.6), x, 0.6, "score", "velocity")) < 1e-10


@pytest.mark.parametrize("name", PATHS)
def test_one_point_marginal_is_the_conditional(name):
    path = get_path(name)
    point = torch.tensor([[0.7, -1.2, 0.4]], dtype=torch.float64)
    m = EmpiricalMarginal(point, path)
    x = queries(path, 0.3, data=point).double()
    x_data = point.expand_as(x)
    assert rel_err(m.velocity(x, 0.3), path.conditional_velocity(x, x_data, 0.3)) < 1e-12
    assert rel_err(m.score(x, 0.3), path.conditional_score(x, x_data, 0.3)) < 1e-12
    assert rel_err(m.log_prob(x, 0.3)[:, None], path.conditional_log_prob(x, x_data, 0.3)[:, None]) < 1e-12


def test_chunk_size_does_not_change_the_result():
    path = get_path("linear")
    x = queries(path, 0.7)
    whole = EmpiricalMarginal(DATA, path, chunk_size=N)
    for chunk in (3, 64):
        part = EmpiricalMarginal(DATA, path, chunk_size=chunk)
        assert rel_err(part.velocity(x, 0.7), whole.velocity(x, 0.7).double()) < 3e-5  # both float32
        assert rel_err(part.log_prob(x, 0.7)[:, None], whole.log_prob(x, 0.7)[:, None].double()) < 1e-5


def test_nearly_uniform_and_one_hot_limits():
    path = get_path("linear")
    m = EmpiricalMarginal(DATA, path)
    x = torch.randn(5, DIM)
    # t = 0: alpha = 0, every point equally likely: the posterior mean is the data mean
    assert rel_err(m.posterior_mean(x, 0.0), DATA.double().mean(0).expand(5, DIM)) < 1e-6
    # t = 1 (beta = 0): the limit is the nearest data point; x exactly on data points gives them back
    x_on = DATA[[3, 17, 250]]
    assert torch.equal(m.posterior_mean(x_on, 1.0), x_on)
    x_near = x_on + 1e-3
    assert torch.equal(m.posterior_mean(x_near, 1.0), x_on)
    # and the score at t -> 1 is the conditional score of the nearest point, in float32
    t = float(torch.tensor(1 - 1e-4))  # the float32 time, so that both sides see the same beta
    x_close = path.sample(x_on, t, torch.randn(3, DIM))
    ref = path.conditional_score(x_close.double(), x_on.double(), t)
    assert rel_err(m.score(x_close, t), ref) < 1e-5


def test_far_query_does_not_underflow():
    path = get_path("linear")
    m = EmpiricalMarginal(DATA, path, chunk_size=50)
    x = torch.full((2, DIM), 40.0)
    t = 0.999
    ref = brute_force(DATA, x, float(torch.tensor(t)), path)
    assert rel_err(m.posterior_mean(x, t), ref["data"]) < 1e-5
    assert rel_err(m.log_prob(x, t)[:, None], ref["log_prob"][:, None]) < 1e-6


def test_image_shaped_data():
    path = get_path("vp")
    data = clustered(50, 12, 3).reshape(50, 3, 2, 2)
    m = EmpiricalMarginal(data, path, chunk_size=16)
    x = queries(path, 0.4, data=data.reshape(50, 12), b=6).reshape(6, 3, 2, 2)
    got = m.velocity(x, 0.4)
    assert got.shape == x.shape
    ref = brute_force(data.reshape(50, 12), x.reshape(6, 12), float(torch.tensor(0.4)), path)
    assert rel_err(got, ref["velocity"]) < 1e-5


def test_singular_endpoints_raise():
    m = EmpiricalMarginal(DATA, "linear")
    x = torch.randn(4, DIM)
    with pytest.raises(ValueError, match="singular"):
        m.velocity(x, 1.0)
    with pytest.raises(ValueError, match="beta_t > 0"):
        m.log_prob(x, 1.0)
    ve = EmpiricalMarginal(DATA, "ve")  # beta_1 = sigma_min > 0: finite everywhere
    for t in (0.0, 1.0):
        for kind in ("velocity", "score", "noise", "data"):
            assert torch.isfinite(ve.field(kind, x, t)).all()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.tensor([[0.0, float("nan")]]), "NaN"),
        (torch.tensor([[0.0, float("inf")]]), "NaN or Inf"),
        (torch.zeros(0, 2), "empty"),
        (torch.zeros(5), "shaped"),
        (torch.zeros(5, 2, dtype=torch.long), "floating"),
        ([[0.0, 1.0]], "torch.Tensor"),
    ],
)
def test_bad_data(data, match):
    with pytest.raises(ValueError, match=match):
        EmpiricalMarginal(data, "linear")


def test_bad_arguments():
    m = EmpiricalMarginal(DATA, "linear")
    with pytest.raises(ValueError, match="data points have shape"):
        m.velocity(torch.zeros(4, DIM + 1), 0.5)
    with pytest.raises(ValueError, match="float64"):
        m.velocity(torch.zeros(4, DIM, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="kind"):
        m.field("density", torch.zeros(4, DIM), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.velocity(torch.zeros(4, DIM), 1.5)
    with pytest.raises(ValueError, match="NaN"):
        m.velocity(torch.full((4, DIM), float("nan")), 0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        EmpiricalMarginal(DATA, "linear", chunk_size=0)
    with pytest.raises(ValueError, match="dtype"):
        EmpiricalMarginal(DATA, "linear", dtype=torch.float16)
    with pytest.raises(ValueError, match="path"):
        EmpiricalMarginal(DATA, "cosine")
    assert len(m) == N and m.data is DATA and m.path.name == "linear"
