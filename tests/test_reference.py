"""Reference-batch targets against float64 brute-force posteriors written out here (reference schedules)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import PATH_NAMES, make_path, reference_schedule

from flowscore import couplings
from flowscore.couplings import reference_target, rows_in
from flowscore.losses import cfm, dsm, fm, sm
from flowscore.marginals import EmpiricalMarginal
from flowscore.training import TrainConfig, Trainer

DT = torch.float64
KINDS = ("velocity", "score", "noise", "data")


def brute_target(name: str, x: torch.Tensor, t: torch.Tensor, candidates: list[torch.Tensor], kind: str):
    """Per sample i, the posterior average over the rows of ``candidates[i]`` of the conditional target of
    ``kind`` at ``x[i]``, weights softmax(-||x - alpha c||^2 / 2 beta^2), all in float64."""
    alpha, beta, d_alpha, d_beta = reference_schedule(name, t.double())
    out = []
    for i, cands in enumerate(candidates):
        c = cands.double().flatten(1)
        xi = x[i].double().flatten()
        eps = (xi - alpha[i] * c) / beta[i]
        w = torch.softmax(-0.5 * eps.pow(2).sum(1), 0)[:, None]
        per = {"data": c, "noise": eps, "velocity": d_alpha[i] * c + d_beta[i] * eps, "score": -eps / beta[i]}
        out.append((w * per[kind]).sum(0))
    return torch.stack(out).reshape(x.shape)


def draws(seed: int, n_data: int, b: int, shape=(2,), dtype=DT, t_range=(0.02, 0.98)):
    g = torch.Generator().manual_seed(seed)
    data = (torch.randn(n_data, *shape, generator=g, dtype=DT) * 1.5 + 0.3).to(dtype)
    idx = torch.randint(n_data, (b,), generator=g)
    t = (t_range[0] + (t_range[1] - t_range[0]) * torch.rand(b, generator=g, dtype=DT)).to(dtype)
    noise = torch.randn(b, *shape, generator=g, dtype=DT).to(dtype)
    return data, idx, t, noise


@pytest.fixture(params=["direct", "streamed"])
def posterior_route(request, monkeypatch):
    """Both routes of the reference posterior: every distance at once (small problems), or streamed through
    EmpiricalMarginal's kernel (forced by a zero size limit)."""
    if request.param == "streamed":
        monkeypatch.setattr(couplings, "_DIRECT_ENTRIES", 0)
    return request.param


@pytest.mark.parametrize("name", PATH_NAMES)
def test_reference_all_data_is_the_exact_marginal_target(name, posterior_route):
    """reference = the whole data set: the target is the FM/SM (and noise, data) field of the data, to float64
    precision, against the brute-force posterior over all data points (both routes)."""
    data, idx, t, noise = draws(0, 40, 24, t_range=(0.001, 0.999))
    path = make_path(name)
    x = path.sample(data[idx], t, noise)
    for kind in KINDS:
        got = reference_target(path, data[idx], t, noise, data, kind)
        want = brute_target(name, x, t, [data] * len(idx), kind)
        err = (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-3)
        assert float(err.max()) < 1e-9, (kind, float(err.max()))


@pytest.mark.parametrize("name", ["linear", "vp-linear", "ve"])
def test_reference_all_data_in_float32_is_close_to_the_float64_truth(name, posterior_route):
    data, idx, t, noise = draws(1, 200, 64, (3,), torch.float32, t_range=(0.05, 0.95))
    path = make_path(name)
    x = path.sample(data[idx], t, noise)
    for kind in ("velocity", "score"):
        got = reference_target(path, data[idx], t, noise, data, kind).double()
        want = brute_target(name, x, t, [data] * len(idx), kind)
        scale = want.norm(dim=1).clamp_min(1.0)
        assert float(((got - want).norm(dim=1) / scale).max()) < 2e-4, kind


@pytest.mark.parametrize("name", PATH_NAMES)
def test_reference_target_is_the_posterior_over_own_point_and_references(name, posterior_route):
    data, idx, t, noise = draws(2, 30, 16, (1, 2, 2))
    refs = data[:10]  # the own points data[idx] are mostly not among them
    path = make_path(name)
    x = path.sample(data[idx], t, noise)
    own_in = [int(i) < 10 for i in idx]
    assert any(own_in) and not all(own_in)
    # an own point that is a reference is counted once
    candidates = [
        refs if inside else torch.cat([data[i : i + 1], refs]) for i, inside in zip(idx, own_in, strict=True)
    ]
    for kind in KINDS:
        got = reference_target(path, data[idx], t, noise, refs, kind)
        want = brute_target(name, x, t, candidates, kind)
        err = (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1).clamp_min(1e-3)
        assert float(err.max()) < 1e-9, kind


def test_no_reference_is_plain_cfm_and_dsm():
    data, idx, t, noise = draws(3, 20, 12)
    model = lambda x, t: torch.sin(x) * (1 + t[:, None])  # noqa: E731
    empty = data[:0]
    for loss in (cfm, dsm):
        plain = loss(model, data[idx], "vp", t, noise)
        assert torch.equal(loss(model, data[idx], "vp", t, noise, reference=None), plain)
        assert torch.equal(loss(model, data[idx], "vp", t, noise, reference=empty), plain)
        assert not torch.allclose(loss(model, data[idx], "vp", t, noise, reference=data), plain)


@pytest.mark.parametrize("name", ["linear", "vp", "ve"])
def test_losses_with_all_data_as_reference_equal_fm_and_sm(name):
    data, idx, t, noise = draws(4, 50, 32, (3,))
    path = make_path(name)
    marginal = EmpiricalMarginal(data, path)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, generator=g, dtype=DT)
    model = lambda x, t: torch.tanh(x @ w) * (1 + t[:, None])  # noqa: E731
    pairs = ((cfm, fm), (dsm, sm))
    for conditional, marginal_loss in pairs:
        got = conditional(model, data[idx], path, t, noise, reference=data, reduction="none")
        want = marginal_loss(model, data[idx], marginal, t, noise, reduction="none")
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_reference_target_is_unbiased_over_reference_draws():
    """Exchangeability, exactly: for a fixed x, averaging the target over the own point's posterior
    p(x_data | x) and over every reference subset of size R drawn without replacement gives the exact
    marginal field. (Counting an own point twice when it is also a reference would not.)"""
    g = torch.Generator().manual_seed(5)
    data = torch.randn(6, 2, generator=g, dtype=DT) * 2
    path, name = make_path("vp"), "vp"
    t = torch.tensor([0.6], dtype=DT)
    x = torch.tensor([[0.7, -0.4]], dtype=DT)
    alpha, beta = (v.item() for v in reference_schedule(name, t)[:2])
    posterior = torch.softmax(-((x - alpha * data) ** 2).sum(1) / (2 * beta**2), 0)
    for kind in ("velocity", "score"):
        want = brute_target(name, x, t, [data], kind)[0]
        for r in (1, 2, 4):
            total = torch.zeros(2, dtype=DT)
            subsets = list(itertools.combinations(range(6), r))
            for own in range(6):
                noise = ((x - alpha * data[own]) / beta).reshape(1, 2)
                for subset in subsets:
                    target = reference_target(path, data[own : own + 1], t, noise, data[list(subset)], kind)
                    total += posterior[own] * target[0] / len(subsets)
            assert torch.allclose(total, want, rtol=1e-10), (kind, r)


def test_class_aware_reference_uses_references_of_the_own_label():
    data, idx, t, noise = draws(6, 40, 20)
    labels = torch.arange(40) % 3
    y = labels[idx].clone()
    y[:4] = -1  # the unconditional branch: every reference
    refs, ref_y = data[20:], labels[20:]
    path = make_path("linear")
    x = path.sample(data[idx], t, noise)
    candidates = []
    for i, label in zip(idx.tolist(), y.tolist(), strict=True):
        pool = refs if label == -1 else refs[ref_y == label]
        candidates.append(pool if i >= 20 else torch.cat([data[i : i + 1], pool]))
    got = reference_target(path, data[idx], t, noise, refs, "velocity", y=y, reference_y=ref_y)
    want = brute_target("linear", x, t, candidates, "velocity")
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_reference_velocity_is_finite_at_the_data_end():
    """At t = 1 (beta = 0, t_eps = 0) the posterior is the own point: the plain, division-free target."""
    data, idx, _, noise = draws(7, 10, 5)
    t = torch.ones(5, dtype=DT)
    got = reference_target(make_path("linear"), data[idx], t, noise, data, "velocity")
    assert torch.allclose(got, data[idx] - noise)


def test_rows_in_matches_exact_row_comparison():
    g = torch.Generator().manual_seed(8)
    table = torch.randn(50, 5, generator=g)
    rows = torch.cat(
        [table[[3, 17, 49]], torch.randn(4, 5, generator=g), table[[0]].nextafter(table[[0]] + 1)]
    )
    rows[0, 0] = table[3, 0] = 0.0
    table[3, 0] = -0.0  # equal values, different bits
    want = (rows[:, None, :] == table[None]).all(-1).any(1)
    assert (
        rows_in(rows, table).tolist()
        == want.tolist()
        == [True, True, True, False, False, False, False, False]
    )
    assert rows_in(rows, table[:0]).tolist() == [False] * 8
    assert not math.isnan(float(rows_in(rows.double(), table.double()).sum()))


def test_reference_arguments_are_checked():
    data, idx, t, noise = draws(9, 10, 4)
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="reference must be shaped"):
        cfm(model, data[idx], "linear", t, noise, reference=torch.zeros(3, 3, dtype=DT))
    with pytest.raises(ValueError, match="dtype"):
        cfm(model, data[idx], "linear", t, noise, reference=data.float())
    with pytest.raises(ValueError, match="reference_y"):
        cfm(model, data[idx], "linear", t, noise, y=torch.zeros(4, dtype=torch.long), reference=data)
    with pytest.raises(ValueError, match="reference_y"):
        cfm(model, data[idx], "linear", t, noise, reference_y=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        dsm(model, data[idx], "linear", t, noise, reference=torch.full((2, 2), math.nan, dtype=DT))


# -- the trainer ---------------------------------------------------------------------------------------------
TINY = dict(
    data="moons", data_n=600, n_holdout=100, width=16, depth=2, batch_size=32, warmup=5, steps=20,
    checkpoint_every=10, log_every=10, device="cpu",
)  # fmt: skip


def test_trainer_with_reference_targets_trains_and_logs_no_loss_floor(tmp_path):
    for objective, prediction in (("cfm", "velocity"), ("dsm", "noise")):
        config = TrainConfig(**TINY, objective=objective, prediction=prediction, reference_size=200)
        result = Trainer(config, tmp_path / objective, progress=False).train()
        assert result["step"] == 20 and math.isfinite(result["loss_ema"])
        assert result["loss_floor"] is None  # the floor of the plain target is not this loss's floor


def test_trainer_refuses_more_references_than_training_points_before_writing(tmp_path):
    config = TrainConfig(**TINY, reference_size=501)  # 600 points, 100 held out
    with pytest.raises(ValueError, match="reference_size 501"):
        Trainer(config, tmp_path / "run", progress=False).train()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective, prediction", [("fm", "velocity"), ("sm", "score")])
def test_train_config_refuses_references_for_the_marginal_objectives(objective, prediction):
    with pytest.raises(ValueError, match="for cfm, dsm and the flow maps"):
        TrainConfig(**TINY, objective=objective, prediction=prediction, reference_size=10)
    with pytest.raises(ValueError, match="reference_size"):
        TrainConfig(**TINY, reference_size=-1)
