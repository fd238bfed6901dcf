"""W2 and MMD against closed forms and float64 brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from flowscore.metrics import mmd, w2, w2_floor

pytest.importorskip("ot")
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _w2_1d_sorted(a: torch.Tensor, b: torch.Tensor) -> float:
    """W2 of two 1D empirical measures of equal size: sqrt(mean((sort a - sort b)^2))."""
    return float(((a.flatten().sort().values - b.flatten().sort().values) ** 2).mean().sqrt())


def _w2_1d_quantiles(a: list[float], b: list[float]) -> float:
    """W2^2 = int_0^1 (F_a^-1(u) - F_b^-1(u))^2 du, exact for piecewise-constant quantile functions."""
    a, b = sorted(a), sorted(b)
    cuts = sorted({i / len(a) for i in range(len(a) + 1)} | {j / len(b) for j in range(len(b) + 1)})
    total = 0.0
    for lo, hi in itertools.pairwise(cuts):
        mid = 0.5 * (lo + hi)
        total += (hi - lo) * (a[int(mid * len(a))] - b[int(mid * len(b))]) ** 2
    return math.sqrt(total)


def test_w2_1d_equals_the_sorted_formula():
    a = torch.randn(300, 1, generator=_gen(0), dtype=F64)
    b = 0.5 * torch.randn(300, 1, generator=_gen(1), dtype=F64) + 1.0
    assert w2(a, b) == pytest.approx(_w2_1d_sorted(a, b), rel=1e-9)


def test_w2_unequal_sizes_matches_quantile_integral():
    a = [0.0, 1.0, 5.0]
    b = [0.5, 2.0, 2.5, 4.0, 9.0]
    got = w2(torch.tensor(a, dtype=F64)[:, None], np.array(b)[:, None])
    assert got == pytest.approx(_w2_1d_quantiles(a, b), rel=1e-9)


def test_w2_of_a_translated_cloud_is_the_shift():
    a = torch.randn(200, 3, generator=_gen(2), dtype=F64)
    shift = torch.tensor([0.3, -1.2, 0.5], dtype=F64)
    assert w2(a, a + shift) == pytest.approx(float(shift.norm()), rel=1e-9)
    images = torch.randn(50, 1, 2, 2, generator=_gen(3))  # (N, *dims) clouds are flattened
    assert w2(images, images + 0.1) == pytest.approx(0.2, rel=1e-5)


def test_w2_size_limit_and_subsample():
    a = torch.randn(40, 2, generator=_gen(4), dtype=F64)
    with pytest.raises(ValueError, match="max_points"):
        w2(a, a, max_points=30)
    # two-point clouds: subsamples of 30 from 40 keep some mix of the points, exact W2 of the drawn subsets
    a = torch.tensor([[0.0]] * 20 + [[1.0]] * 20, dtype=F64)
    b = torch.tensor([[3.0]] * 40, dtype=F64)
    sub = w2(a, b, max_points=30, subsample=True, generator=_gen(5))
    perm = torch.randperm(40, generator=_gen(5))[:30]
    assert sub == pytest.approx(math.sqrt(float(((a[perm] - 3.0) ** 2).mean())), rel=1e-9)


def test_w2_bad_inputs():
    with pytest.raises(ValueError, match="dimension"):
        w2(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        w2(torch.tensor([[float("nan")]]), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="shaped"):
        w2(torch.zeros(3), torch.zeros(3))


def _mmd_brute_force(a: torch.Tensor, b: torch.Tensor, bandwidths: list[float]) -> float:
    def k(x, y):
        return sum(math.exp(-float(((x - y) ** 2).sum()) / (2 * h * h)) for h in bandwidths)

    n, m = len(a), len(b)
    aa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    bb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    ab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return aa + bb - 2 * ab


def test_mmd_matches_brute_force():
    a = torch.randn(25, 2, generator=_gen(6), dtype=F64)
    b = torch.randn(31, 2, generator=_gen(7), dtype=F64) * 1.3 + 0.4
    assert mmd(a, b, bandwidths=[0.5, 2.0]) == pytest.approx(_mmd_brute_force(a, b, [0.5, 2.0]), rel=1e-10)
    assert mmd(a, b, bandwidths=1.0) == pytest.approx(_mmd_brute_force(a, b, [1.0]), rel=1e-10)
    pooled = torch.cat([a, b])
    dists = [
        float((pooled[i] - pooled[j]).norm()) for i in range(len(pooled)) for j in range(i + 1, len(pooled))
    ]
    median = float(torch.tensor(dists).median())  # the lower median, as torch defines it
    expected = _mmd_brute_force(a, b, [0.5 * median, median, 2 * median])
    assert mmd(a, b) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="2 points"):
        mmd(a[:1], b)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(a, b, bandwidths=[0.0])


def test_w2_floor_is_w2_of_a_random_split():
    samples = torch.randn(60, 1, generator=_gen(8), dtype=F64)
    perm = torch.randperm(60, generator=_gen(9))
    expected = _w2_1d_sorted(samples[perm[:30]], samples[perm[30:60]])
    assert w2_floor(samples, 30, generator=_gen(9)) == pytest.approx(expected, rel=1e-9)
    assert w2_floor(torch.ones(10, 2), 5) == 0.0
    with pytest.raises(ValueError, match="n must"):
        w2_floor(samples, 31)
