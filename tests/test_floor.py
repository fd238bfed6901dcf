"""The loss floor against numerical quadrature (float64 numpy, written here) and exact properties."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowscore import get_path
from flowscore.floor import FLOOR_BATCH_ELEMENTS, LossFloor, floor_terms, loss_floor
from flowscore.marginals import EmpiricalMarginal
from flowscore.mixtures import GaussianMixture

DATA_1D = np.array([-1.0, 0.5, 2.0])

SCHEDULES = {  # alpha, beta, alpha', beta' (numpy), independent of flowscore.paths
    "linear": lambda t: (t, 1 - t, np.ones_like(t), -np.ones_like(t)),
    "vp": lambda t: (
        np.sin(np.pi * t / 2),
        np.cos(np.pi * t / 2),
        np.pi / 2 * np.cos(np.pi * t / 2),
        -np.pi / 2 * np.sin(np.pi * t / 2),
    ),
}


def quadrature_floor(data: np.ndarray, name: str, kind: str, t_eps: float, t_lo=None, t_hi=None) -> float:
    """C = mean over t in [t_lo, t_hi] of (1/N) sum_i E_eps (T(x|d_i) - T(x))^2, 1D data, dense grids."""
    t_lo = t_eps if t_lo is None else t_lo
    t_hi = 1 - t_eps if t_hi is None else t_hi
    n_t = 300
    t = t_lo + (t_hi - t_lo) * (np.arange(n_t) + 0.5) / n_t  # midpoint rule
    eps = np.linspace(-9, 9, 801)
    w_eps = np.exp(-0.5 * eps**2) / math.sqrt(2 * math.pi) * (eps[1] - eps[0])
    a, b, da, db = (v[:, None, None] for v in SCHEDULES[name](t))
    total = 0.0
    for d_i in data:
        x = a * d_i + b * eps[None, :, None]  # (T, E, 1)
        logits = -((x - a * data[None, None, :]) ** 2) / (2 * b**2)  # (T, E, N)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        if kind == "velocity":
            cond = da * d_i + db * eps[None, :, None]
            marg = (w * (da * data + db * (x - a * data) / b)).sum(-1, keepdims=True)
        else:
            cond = -eps[None, :, None] / b
            marg = (w * (-(x - a * data) / b**2)).sum(-1, keepdims=True)
        total += (((cond - marg) ** 2)[..., 0] * w_eps).sum(1).mean()
    return total / len(data)


@pytest.mark.parametrize(
    "name, objective, t_eps",
    [("linear", "flow", 1e-3), ("vp", "flow", 1e-3), ("linear", "score", 0.05), ("vp", "score", 0.05)],
)
def test_floor_matches_quadrature(name, objective, t_eps):
    data = torch.tensor(DATA_1D)[:, None]
    kind = "velocity" if objective == "flow" else "score"
    want = quadrature_floor(DATA_1D, name, kind, t_eps)
    got = loss_floor(data, name, objective, n_samples=40_000, t_eps=t_eps, seed=1, progress=False)
    assert abs(got.value - want) < 4 * got.standard_error, (got.value, want, got.standard_error)
    assert got.standard_error < 0.05 * want  # the check has teeth
    # one bin against quadrature on that bin alone
    k = 4
    lo, hi = got.bin_edges[k], got.bin_edges[k + 1]
    want_bin = quadrature_floor(DATA_1D, name, kind, t_eps, lo, hi)
    assert abs(got.per_bin[k] - want_bin) < 4 * got.per_bin_standard_error[k]


def test_per_bin_values_are_consistent_with_the_overall_value():
    data = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = loss_floor(data, "vp", "flow", n_samples=6000, n_bins=7, time_sampler="logit-normal", progress=False)
    assert sum(f.bin_counts) == f.n_samples == 6000
    assert f.bin_edges == pytest.approx(np.linspace(0, 1, 8).tolist())
    weighted = sum(c * v for c, v in zip(f.bin_counts, f.per_bin, strict=True)) / f.n_samples
    assert weighted == pytest.approx(f.value, rel=1e-12)
    assert min(f.per_bin_standard_error) > 0 and f.standard_error > 0


@pytest.mark.parametrize("objective", ["flow", "score"])
@pytest.mark.parametrize("name", ["linear", "vp", "ve"])
def test_floor_of_a_one_point_data_set_is_zero(name, objective):
    data = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    f = loss_floor(data, name, objective, n_samples=2000, t_eps=0.01, progress=False)
    assert abs(f.value) < 1e-12
    assert max(abs(v) for v in f.per_bin) < 1e-12


def test_weighting_multiplies_each_draw():
    data = torch.tensor(DATA_1D)[:, None]
    marginal = EmpiricalMarginal(data, "linear")
    g = torch.Generator().manual_seed(4)
    x_data, noise = data[torch.tensor([0, 1, 2, 1])], torch.randn(4, 1, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)
    _, plain = floor_terms(marginal, x_data, "score", t, noise)
    _, weighted = floor_terms(marginal, x_data, "score", t, noise, weighting="noise")
    assert torch.allclose(weighted, (1 - t) ** 2 * plain, rtol=1e-12)
    # the plain term is (E[eps|x] - eps)^2 / beta^2 with the posterior written out here
    x = t[:, None] * x_data + (1 - t[:, None]) * noise
    w = torch.softmax(-((x - t[:, None] * data.T) ** 2) / (2 * (1 - t[:, None]) ** 2), dim=1)
    post_eps = (w * (x - t[:, None] * data.T) / (1 - t[:, None])).sum(1)
    assert torch.allclose(plain, (post_eps - noise[:, 0]) ** 2 / (1 - t) ** 2, rtol=1e-9)


def test_accepts_a_marginal_reproducible_and_serialisable():
    data = torch.randn(40, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    marginal = EmpiricalMarginal(data, get_path("linear"))
    a = loss_floor(marginal, objective="flow", n_samples=2000, seed=3, progress=False)
    b = loss_floor(data, "linear", "flow", n_samples=2000, seed=3, progress=False)
    assert isinstance(a, LossFloor)
    assert a.value == pytest.approx(b.value, rel=1e-12)
    c = loss_floor(data, "linear", "cfm", n_samples=2000, seed=3, progress=False)  # "flow" is an alias
    assert c.value == b.value and c.objective == "cfm"
    with pytest.raises(ValueError, match="objective"):
        loss_floor(data, "linear", "fm", n_samples=10, progress=False)
    assert json.loads(json.dumps(a.to_dict()))["n_samples"] == 2000


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.zeros(5, 2), "linear"), {"objective": "velocity"}, "objective"),
        ((torch.zeros(5, 2), "linear"), {"n_samples": 0}, "n_samples"),
        ((torch.zeros(5, 2), "linear"), {"n_bins": 1.5}, "n_bins"),
        ((torch.zeros(5, 2),), {}, "path"),
        (([1.0, 2.0], "linear"), {}, "data"),
        ((torch.zeros(5, 2), "linear"), {"t_eps": -0.1}, "t_eps"),
    ],
)
def test_bad_arguments_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        loss_floor(*args, progress=False, **kwargs)


def test_path_must_match_the_marginal():
    marginal = EmpiricalMarginal(torch.zeros(5, 2, dtype=torch.float64), "linear")
    with pytest.raises(ValueError, match="path"):
        loss_floor(marginal, "vp", progress=False)


def test_an_equal_path_built_again_is_the_marginals_path():
    """Equality by value (the path's spec): a custom path from the same expressions, or a built-in one with
    the same options, is the marginal's path; other expressions, options or callables are not."""
    data = torch.randn(30, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    spec = {"alpha": "sin(pi / 2 * t)", "beta": "cos(pi / 2 * t)"}
    marginal = EmpiricalMarginal(data, get_path("custom", **spec))
    again = loss_floor(marginal, get_path("custom", **spec), n_samples=500, seed=1, progress=False)
    same = loss_floor(marginal, n_samples=500, seed=1, progress=False)
    assert again.value == same.value
    # the custom vp path is vp: its floor is vp's (the same alpha and beta), written independently
    vp = loss_floor(data, "vp", n_samples=500, seed=1, progress=False)
    assert again.value == pytest.approx(vp.value, rel=1e-9)
    with pytest.raises(ValueError, match="differs from the marginal's path"):
        loss_floor(
            marginal, get_path("custom", alpha=spec["alpha"], beta="cos(pi / 2 * t) ** 2"), progress=False
        )
    ve = EmpiricalMarginal(data, get_path("ve", sigma_max=50.0))
    assert loss_floor(ve, get_path("ve", sigma_max=50.0), n_samples=200, progress=False).value > 0
    with pytest.raises(ValueError, match="differs"):
        loss_floor(ve, get_path("ve", sigma_max=40.0), progress=False)
    alpha, beta = (lambda t: t), (lambda t: 1 - t)
    own = EmpiricalMarginal(data, get_path("custom", alpha=alpha, beta=beta))
    assert (
        loss_floor(own, get_path("custom", alpha=alpha, beta=beta), n_samples=200, progress=False).value > 0
    )
    with pytest.raises(ValueError, match="differs"):
        loss_floor(own, get_path("custom", alpha=lambda t: t, beta=beta), progress=False)


@pytest.mark.parametrize("name", ["linear", "vp"])
def test_floor_of_a_gaussian_matches_its_closed_form(name):
    # data N(m, s^2 I_D): Var(x_data | x) = s^2 beta^2 / (alpha^2 s^2 + beta^2) per dim, and
    # u(x|x_data) - u(x) = (alpha' - alpha beta'/beta) (x_data - E[x_data|x]), so
    # C(t) = D (alpha' - alpha beta'/beta)^2 s^2 beta^2 / (alpha^2 s^2 + beta^2), averaged over t.
    s, dim, t_eps = 0.7, 2, 1e-3
    mixture = GaussianMixture(torch.tensor([[1.0, -0.5]], dtype=torch.float64), torch.tensor([s]))
    t = t_eps + (1 - 2 * t_eps) * (np.arange(20000) + 0.5) / 20000
    a, b, da, db = SCHEDULES[name](t)
    want = np.mean(dim * (da * b - a * db) ** 2 * s**2 / (a**2 * s**2 + b**2))
    got = loss_floor(mixture.marginal(name), objective="flow", n_samples=20_000, t_eps=t_eps, progress=False)
    assert abs(got.value - want) < 4 * got.standard_error
    assert got.standard_error < 0.02 * want


# -- labels: the conditional floor ---------------------------------------------------------------------------
DATA_LABELLED = np.array([-1.2, -0.6, 1.4, 2.1])
CLASSES = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("name, objective", [("linear", "cfm"), ("vp", "cfm")])
def test_conditional_floor_matches_quadrature_per_class(name, objective):
    # the model sees the class of x_data: the floor is the class-weighted floor of each class's data alone
    data = torch.tensor(DATA_LABELLED)[:, None]
    f = loss_floor(data, name, objective, labels=CLASSES, n_samples=40_000, seed=2, progress=False)
    assert f.conditional and f.unconditional is not None and not f.unconditional.conditional
    want_cond = sum(
        0.5 * quadrature_floor(DATA_LABELLED[2 * k : 2 * k + 2], name, "velocity", 1e-3) for k in (0, 1)
    )
    want_uncond = quadrature_floor(DATA_LABELLED, name, "velocity", 1e-3)
    assert abs(f.value - want_cond) < 4 * f.standard_error, (f.value, want_cond)
    assert abs(f.unconditional.value - want_uncond) < 4 * f.unconditional.standard_error
    # the label is informative here: the conditional floor is clearly lower
    assert f.unconditional.value - f.value > 5 * (f.standard_error + f.unconditional.standard_error)
    assert f.label_dropout_value(0.1) == pytest.approx(0.9 * f.value + 0.1 * f.unconditional.value)
    assert f.label_dropout_value(0.0) == f.value
    assert json.loads(json.dumps(f.to_dict()))["unconditional"]["conditional"] is False


def test_uninformative_labels_give_the_unconditional_floor():
    data = torch.randn(30, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    one_class = loss_floor(data, "vp", "dsm", labels=torch.zeros(30, dtype=torch.long), n_samples=3000,
                           t_eps=0.05, seed=4, progress=False)  # fmt: skip
    assert one_class.value == pytest.approx(one_class.unconditional.value, rel=1e-9)
    # and the label-blind floor of the same draws is the floor computed without labels
    blind = loss_floor(data, "vp", "dsm", n_samples=3000, t_eps=0.05, seed=4, progress=False)
    assert one_class.unconditional.value == pytest.approx(blind.value, rel=1e-9)
    assert not blind.conditional and blind.unconditional is None
    assert blind.label_dropout_value(0.3) == blind.value


def test_conditional_floor_terms_use_the_class_field():
    # the per-draw term with labels is (T(x|x_data) - T(x|y))^2, T(x|y) written out over the class here
    data = torch.tensor(DATA_LABELLED)[:, None]
    marginal = EmpiricalMarginal(data, "linear", labels=CLASSES)
    x_data, y = data[[0, 2, 3, 1]], CLASSES[[0, 2, 3, 1]]
    t = torch.tensor([0.2, 0.5, 0.8, 0.95], dtype=torch.float64)
    noise = torch.randn(4, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, got = floor_terms(marginal, x_data, "velocity", t, noise, y=y)
    x = t[:, None] * x_data + (1 - t[:, None]) * noise
    points = torch.stack([data[CLASSES == c][:, 0] for c in y.tolist()])  # (4, 2): each row's class
    w = torch.softmax(-((x - t[:, None] * points) ** 2) / (2 * (1 - t[:, None]) ** 2), dim=1)
    exact = (w * (points - x) / (1 - t[:, None])).sum(1)  # linear path: u(x|x_i) = (x_i - x) / (1 - t)
    target = x_data[:, 0] - noise[:, 0]
    assert torch.allclose(got, (target - exact) ** 2, rtol=1e-9)


def test_labels_arguments():
    data = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="labels go with a data tensor"):
        loss_floor(EmpiricalMarginal(data, "linear"), labels=CLASSES, progress=False)
    with pytest.raises(ValueError, match="shaped"):
        loss_floor(data, "linear", labels=torch.zeros(3, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="p_uncond"):
        loss_floor(data, "linear", n_samples=10, progress=False).label_dropout_value(1.5)


def test_labelled_mixture_floor():
    # a labelled mixture carries its labels: the floor is conditional, and lower
    mixture = GaussianMixture(
        torch.tensor([[-2.0], [2.0]], dtype=torch.float64),
        torch.tensor([0.5, 0.5]),
        labels=torch.tensor([0, 1]),
    )
    f = loss_floor(mixture.marginal("linear"), objective="cfm", n_samples=4000, progress=False)
    assert f.conditional and f.value < f.unconditional.value


MEMORY_CHILD = """
import sys, torch
from pathlib import Path
import flowscore as fs
def peak():
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith("VmHWM:"))
fs.loss_floor(torch.randn(10, 5), "linear", n_samples=10, progress=False)  # library warm-up
before = peak()
fs.loss_floor(torch.randn(10, 100_000), "linear", "cfm", n_samples=int(sys.argv[1]), progress=False)
print(peak() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
def test_floor_memory_is_bounded_for_wide_data():
    # (10, 100000) data (4 MB): draws x dims per batch are capped (FLOOR_BATCH_ELEMENTS), the marginal
    # streams, and its exact refinement works in slices, so the peak does not grow with the draws (unbounded
    # it reached 14.5 GB for 5 steps of a training run). glibc's mmap threshold is pinned so that freed
    # buffers leave the resident set at once: the peak then measures the live tensors
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}

    def peak_growth(n: int) -> int:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(n)], capture_output=True, text=True, check=True, env=env
        )
        return int(out.stdout.split()[-1])

    batch_tensor = FLOOR_BATCH_ELEMENTS * 8  # one float64 tensor of a whole batch of draws
    few, many = peak_growth(45), peak_growth(90)  # both reach the batch cap (41 draws of 100000 dims)
    assert many < 20 * batch_tensor, many / 2**20
    assert abs(many - few) < batch_tensor, (few / 2**20, many / 2**20)
