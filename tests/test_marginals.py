"""EmpiricalMarginal against an independent float64 brute force (plain logsumexp over all points)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import reference_schedule

from flowscore.marginals import EmpiricalMarginal
from flowscore.paths import get_path

PATHS = ("linear", "vp", "vp-linear", "ve")
TIMES = (0.001, 0.1, 0.5, 0.9, 0.999, 0.9999)
N, DIM, B = 400, 3, 64
TOL32 = 1e-5  # relative error of float32 fields against the float64 brute force at the same inputs


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
        for kind in ("data", "noise", "velocity", "score"):
            assert rel_err(m.field(kind, x, t), ref[kind]) < TOL32, (name, t, kind)
        assert rel_err(m.log_prob(x, t)[:, None], ref["log_prob"][:, None]) < TOL32, (name, t)


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
        # 1e-10: the reference's own beta = sqrt(1 - exp(-T)) loses ~1e-11 at t = 0.9999 on vp-linear
        assert rel_err(m.log_prob(x, t)[:, None], ref["log_prob"][:, None]) < 1e-10


def test_per_sample_times_and_methods_agree():
    path = get_path("vp")
    m = EmpiricalMarginal(DATA, path)
    t = torch.linspace(0.05, 0.95, B)
    x = queries(path, 0.5)
    for i in (0, 40, B - 1):
        single = m.velocity(x[i : i + 1], float(t[i]))
        assert rel_err(m.velocity(x, t)[i : i + 1], single.double()) < TOL32  # float32, other chunks
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
        assert rel_err(part.velocity(x, 0.7), whole.velocity(x, 0.7).double()) < TOL32  # both float32
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


# -- hostile data: float32 must still match the float64 brute force to 1e-5 ---------------------------------
def hostile(kind: str) -> torch.Tensor:
    """Small float32 data sets on which a plain float32 streamed softmax loses precision."""
    g = torch.Generator().manual_seed(11)
    base = clustered(150, 3, 5).double()
    if kind == "pairs":  # points 1e-2 apart: they compete at small beta
        return torch.cat(
            [base, base + 1e-2 * torch.randn(base.shape, generator=g, dtype=torch.float64)]
        ).float()
    if kind == "near-identical":  # 15 clusters of 10 points within 1e-4
        centers = 1.5 * torch.randn(15, 3, generator=g, dtype=torch.float64)
        return (centers.repeat_interleave(10, 0) + 1e-4 * torch.randn(150, 3, generator=g)).float()
    if kind == "offset":  # far from the origin
        return (base + 1000).float()
    return clustered(200, 64, 6)  # high dimension


@pytest.mark.parametrize("kind", ["pairs", "near-identical", "offset", "high-D"])
@pytest.mark.parametrize("name", PATHS)
def test_float32_precision_on_hostile_data(name, kind):
    data = hostile(kind)
    path = get_path(name)
    m = EmpiricalMarginal(data, path)
    for t in (0.3, 0.7, 0.9, 0.99, 0.999, 0.9999):
        x = queries(path, t, data=data, b=24)
        ref = brute_force(data, x, float(torch.tensor(t)), path)
        for kind_ in ("data", "noise", "velocity", "score"):
            assert rel_err(m.field(kind_, x, t), ref[kind_]) < TOL32, (kind, name, t, kind_)
        assert rel_err(m.log_prob(x, t)[:, None], ref["log_prob"][:, None]) < TOL32, (kind, name, t)


def test_data_near_the_float32_limit():
    # values ~1e38: squared distances overflow float32; the result is right, or a clear ValueError
    data = clustered(60, 3, 7) * 1e37
    path = get_path("linear")
    m = EmpiricalMarginal(data, path)
    g = torch.Generator().manual_seed(3)
    x = path.sample(data[:8], 0.3, 1e37 * torch.randn(8, 3, generator=g))
    ref = brute_force(data, x, float(torch.tensor(0.3)), path)
    for kind in ("data", "velocity"):
        got = m.field(kind, x, 0.3)
        assert torch.isfinite(got).all()
        assert rel_err(got, ref[kind]) < TOL32, kind
    t_close = float(torch.tensor(0.999))
    x_close = path.sample(data[:8], t_close, 1e37 * torch.randn(8, 3, generator=g))
    ref = brute_force(data, x_close, t_close, path)
    assert rel_err(m.posterior_mean(x_close, t_close), ref["data"]) < TOL32
    with pytest.raises(ValueError, match="range of torch.float32"):
        m.score(x_close, t_close)  # -noise / beta ~ 1e37 / 1e-3: beyond float32


# -- class labels: conditional and guided fields ----------------------------------------------------------
LABELS = (DATA[:, 0] > 0).long() + 2 * (DATA[:, 1] > 0.5).long()  # 4 classes, tied to the position


def labelled_queries(path, t: float, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = queries(path, t, seed=seed, b=32)
    y = torch.randint(-1, 4, (32,), generator=torch.Generator().manual_seed(seed))
    return x, y


def brute_force_by_class(x: torch.Tensor, y: torch.Tensor, t: float, path) -> dict[str, torch.Tensor]:
    """Each row's brute force over its class's points (all points where y = -1)."""
    out: dict[str, torch.Tensor] = {}
    for label in (-1, 0, 1, 2, 3):
        rows = y == label
        if not bool(rows.any()):
            continue
        points = DATA if label < 0 else DATA[LABELS == label]
        for kind, value in brute_force(points, x[rows], t, path).items():
            out.setdefault(kind, torch.zeros(len(x), *value.shape[1:], dtype=torch.float64))[rows] = value
    return out


@pytest.mark.parametrize("name", PATHS)
def test_conditional_fields_match_brute_force_over_the_class(name):
    path = get_path(name)
    m = EmpiricalMarginal(DATA, path, labels=LABELS)
    assert m.num_classes == 4 and m.labels.tolist() == LABELS.tolist() and m.data is DATA
    for t in (0.2, 0.6, 0.95, 0.999):
        x, y = labelled_queries(path, t)
        ref = brute_force_by_class(x, y, float(torch.tensor(t)), path)
        for kind in ("data", "noise", "velocity", "score"):
            assert rel_err(m.field(kind, x, t, y=y), ref[kind]) < TOL32, (name, t, kind)
        assert rel_err(m.log_prob(x, t, y=y)[:, None], ref["log_prob"][:, None]) < TOL32, (name, t)
        # without labels (or all -1) it is the unconditional marginal
        unconditional = brute_force(DATA, x, float(torch.tensor(t)), path)["velocity"]
        assert rel_err(m.velocity(x, t), unconditional) < TOL32
        assert torch.equal(m.velocity(x, t, y=torch.full_like(y, -1)), m.velocity(x, t))


@pytest.mark.parametrize("name", PATHS)
def test_guided_field_is_the_guided_brute_force(name):
    path = get_path(name)
    m = EmpiricalMarginal(DATA.double(), path, labels=LABELS)
    x, y = labelled_queries(path, 0.7, seed=4)
    x = x.double()
    conditional = brute_force_by_class(x, y, 0.7, path)
    unconditional = brute_force(DATA, x, 0.7, path)
    for w in (1.0, 3.0):
        for kind in ("velocity", "score", "noise", "data"):
            want = (1 + w) * conditional[kind] - w * unconditional[kind]
            got = m.field(kind, x, 0.7, y=y, guidance=w)
            assert rel_err(got, want) < 1e-9, (name, w, kind)
    # guidance acts the same in every space: the guided velocity is the converted guided score
    guided_score = m.score(x, 0.7, y=y, guidance=2.0)
    assert rel_err(path.convert(guided_score, x, 0.7, "score", "velocity"), m.velocity(x, 0.7, y, 2.0)) < 1e-9


def test_labels_on_image_shaped_data_and_one_class():
    path = get_path("vp")
    data = clustered(40, 12, 3).reshape(40, 3, 2, 2)
    labels = torch.zeros(40, dtype=torch.long)
    m = EmpiricalMarginal(data, path, labels=labels)
    x = queries(path, 0.5, data=data.reshape(40, 12), b=5).reshape(5, 3, 2, 2)
    y = torch.tensor([0, -1, 0, 0, -1])
    # one class holding every point: the conditional field is the unconditional one
    assert rel_err(m.velocity(x, 0.5, y=y), m.velocity(x, 0.5).double()) < TOL32
    assert rel_err(m.velocity(x, 0.5, y=y, guidance=2.0), m.velocity(x, 0.5).double()) < 1e-5


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.zeros(N), "integer"),
        (torch.full((N,), float("nan")), "NaN"),
        (torch.zeros(N - 1, dtype=torch.long), "shaped"),
        (torch.full((N,), -1, dtype=torch.long), "0..K-1"),
        (torch.zeros(N, dtype=torch.bool), "integer"),
        ([0] * N, "tensor"),
    ],
)
def test_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        EmpiricalMarginal(DATA, "linear", labels=labels)


def test_bad_query_labels_and_guidance():
    m = EmpiricalMarginal(DATA, "linear", labels=torch.where(LABELS == 1, 2, LABELS))  # class 1 is empty
    x = torch.zeros(4, DIM)
    with pytest.raises(ValueError, match="4 classes|classes 0..K-1"):
        m.velocity(x, 0.5, y=torch.tensor([0, 4, 0, 0]))
    with pytest.raises(ValueError, match="no data points"):
        m.velocity(x, 0.5, y=torch.tensor([0, 1, 0, 0]))
    with pytest.raises(ValueError, match="shaped"):
        m.velocity(x, 0.5, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        m.velocity(x, 0.5, y=torch.zeros(4))
    with pytest.raises(ValueError, match="-1 means no label"):
        m.velocity(x, 0.5, y=torch.tensor([0, -2, 0, 0]))
    with pytest.raises(ValueError, match="guidance needs class labels"):
        m.velocity(x, 0.5, guidance=1.0)
    with pytest.raises(ValueError, match="no class labels"):
        EmpiricalMarginal(DATA, "linear").velocity(x, 0.5, y=torch.zeros(4, dtype=torch.long))
