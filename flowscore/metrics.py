r"""Sample-based distances between point clouds: exact W2 (POT), unbiased RBF MMD, and the W2 floor.

Point clouds are tensors ``(N, *dims)`` (flattened to ``(N, D)``) or arrays of the same shape; every metric
computes in float64 on the CPU and returns a Python float.

* :func:`w2`: :math:`W_2(a, b) = \big(\min_\pi \sum_{ij} \pi_{ij} \lVert a_i - b_j\rVert^2\big)^{1/2}` between
  the uniform empirical measures, by the exact network simplex of POT (``ot.emd2``). Cost O(N^2) memory and
  about O(N^3) time: limited to ``max_points`` points per cloud (raise, or ``subsample=True``).
* :func:`mmd`: unbiased :math:`\mathrm{MMD}^2` with a sum of RBF kernels.
* :func:`w2_floor`: W2 between two disjoint draws of the same size from one sample: the value that a perfect
  sampler reaches with ``n`` points (W2 of finite samples does not go to 0 at fixed n).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MAX_W2_POINTS = 5000

ArrayLike = torch.Tensor | np.ndarray


def _cloud(points: ArrayLike, name: str) -> torch.Tensor:
    """``(N, *dims)`` finite points as a float64 CPU tensor ``(N, D)``."""
    if isinstance(points, np.ndarray):
        points = torch.from_numpy(points)
    if not isinstance(points, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(points).__name__}")
    if points.dim() < 2 or points.shape[0] < 1:
        raise ValueError(f"{name} must be shaped (N, *dims) with N >= 1, got shape {tuple(points.shape)}")
    points = points.detach().to("cpu", torch.float64).reshape(points.shape[0], -1)
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return points


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _cloud(a, "a"), _cloud(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same point dimension, got {a.shape[1]} and {b.shape[1]}")
    return a, b


def _subsample(points: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    if points.shape[0] <= n:
        return points
    return points[torch.randperm(points.shape[0], generator=generator)[:n]]


def w2(
    a: ArrayLike,
    b: ArrayLike,
    *,
    max_points: int = MAX_W2_POINTS,
    subsample: bool = False,
    generator: torch.Generator | None = None,
) -> float:
    r"""Exact 2-Wasserstein distance between the uniform empirical measures of ``a`` and ``b``.

    ``a``: ``(N, *dims)``, ``b``: ``(M, *dims)`` (N and M may differ). Solves the optimal transport problem
    with squared Euclidean cost by ``ot.emd2`` (POT, exact) and returns the square root. Clouds larger than
    ``max_points`` raise ``ValueError`` unless ``subsample=True``, which draws ``max_points`` of them at
    random without replacement (``generator``); then the value is a random estimate that is biased upwards.
    """
    try:
        import ot
    except ImportError:
        raise ValueError("w2 needs POT: pip install pot (or flowscore[metrics])") from None
    a, b = _pair(a, b)
    for name, pts in (("a", a), ("b", b)):
        if pts.shape[0] > max_points and not subsample:
            raise ValueError(
                f"{name} has {pts.shape[0]} points, more than max_points={max_points} for exact W2 "
                "(O(N^2) memory); pass subsample=True or raise max_points"
            )
    a, b = _subsample(a, max_points, generator), _subsample(b, max_points, generator)
    cost = torch.cdist(a, b).pow(2).numpy()
    wa = np.full(a.shape[0], 1.0 / a.shape[0])
    wb = np.full(b.shape[0], 1.0 / b.shape[0])
    value = float(ot.emd2(wa, wb, cost, numItermax=10_000_000))
    return max(value, 0.0) ** 0.5


def _median_bandwidths(pooled: torch.Tensor, scales: Sequence[float] = (0.5, 1.0, 2.0)) -> tuple[float, ...]:
    """The median pairwise distance of (at most 1000 of) the pooled points times ``scales``."""
    pts = pooled[:1000]
    dist = torch.cdist(pts, pts)
    median = float(dist[torch.triu_indices(pts.shape[0], pts.shape[0], 1).unbind()].median())
    return tuple(s * max(median, 1e-12) for s in scales)


def mmd(a: ArrayLike, b: ArrayLike, bandwidths: Sequence[float] | float | None = None) -> float:
    r"""Unbiased :math:`\mathrm{MMD}^2(a, b)`, kernel :math:`k = \sum_h \exp(-\lVert x-y\rVert^2/(2h^2))`.

    .. math:: \frac{1}{N(N-1)}\sum_{i\ne j} k(a_i, a_j) + \frac{1}{M(M-1)}\sum_{i\ne j} k(b_i, b_j)
              - \frac{2}{NM}\sum_{i,j} k(a_i, b_j)

    ``a``: ``(N, *dims)``, ``b``: ``(M, *dims)``, N, M >= 2. ``bandwidths``: the h's (a float or a sequence);
    ``None`` uses the median pairwise distance of the pooled points times (0.5, 1, 2). Unbiased, so it can be
    slightly negative when the two distributions agree. O((N + M)^2) memory.
    """
    a, b = _pair(a, b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"mmd needs at least 2 points in each cloud, got {a.shape[0]} and {b.shape[0]}")
    if bandwidths is None:
        bandwidths = _median_bandwidths(torch.cat([a, b]))
    bandwidths = (bandwidths,) if isinstance(bandwidths, (int, float)) else tuple(bandwidths)
    if not bandwidths or not all(float(h) > 0 for h in bandwidths):
        raise ValueError(f"bandwidths must be positive, got {bandwidths!r}")

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sq = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-sq / (2 * float(h) ** 2)) for h in bandwidths)

    def within(x: torch.Tensor) -> torch.Tensor:  # mean over i != j
        k = kernel(x, x)
        return (k.sum() - k.diagonal().sum()) / (x.shape[0] * (x.shape[0] - 1))

    return float(within(a) + within(b) - 2 * kernel(a, b).mean())


def w2_floor(
    samples: ArrayLike,
    n: int,
    *,
    repeats: int = 1,
    generator: torch.Generator | None = None,
    max_points: int = MAX_W2_POINTS,
) -> float:
    """W2 between two disjoint random draws of ``n`` points each from ``samples`` (``(N, *dims)``, N >= 2n).

    The W2 that a perfect sampler reaches with ``n`` samples against ``n`` held-out data points: compare a
    sampler's ``w2(samples, held_out)`` with this floor. Averaged over ``repeats`` random splits.
    """
    pts = _cloud(samples, "samples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or 2 * n > pts.shape[0]:
        raise ValueError(f"n must be an integer in [1, N/2] = [1, {pts.shape[0] // 2}], got {n!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    values = []
    for _ in range(repeats):
        perm = torch.randperm(pts.shape[0], generator=generator)
        values.append(w2(pts[perm[:n]], pts[perm[n : 2 * n]], max_points=max_points))
    return float(np.mean(values))
