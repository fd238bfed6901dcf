r"""The source distribution of a run: the standard normal (the default) or a data set (data-to-data flows).

A run's path goes from its source at t = 0 to the data at t = 1, :math:`x = \alpha_t x_{data} + \beta_t
x_{source}`. By default the source is N(0, I) (then ``x_source`` is the path's noise). ``TrainConfig.source``
(a toy name or a ``.npy``/``.npz`` file, as ``data`` takes) or ``Trainer(..., source=...)`` (a tensor, a
pair ``(x, y)``, a map-style Dataset or a DataLoader, which is read once into memory) makes it a data set:
each step draws a batch of source points in place of the normal noise (:meth:`Source.draw`), the coupling
(independent, ot, sinkhorn, within labels) pairs them with the data points, and the objective regresses on
the conditional velocity of each pair. With class labels on both sides a data point of class k draws a
source point of class k (a data point whose label was dropped to -1: any source point).

Like the data, the source is split: its held-out points (never trained on) are stored in the run, and
sampling a run starts from them (:func:`flowscore.workflows.sample_run`), or from your own points
(``x_init``). Only what holds for any source is allowed with a data source: the objective cfm, the
velocity, data or noise (= source) prediction, a path that starts at the source (alpha_0 = 0, beta_0 = 1),
ODE samplers; the score, DSM, the exact marginals, the loss floor, SDE sampling and the likelihood need the
Gaussian source and are refused (docs/theory.md section 17, "A source other than N(0, I)").

**Normalisation** (:func:`fit_normalizer`). With the Gaussian source, vector data are scaled per feature to
standard deviation ``data_std`` (as before). With a data source both sides are encoded by ONE affine map
``(x - shift) / scale``: the shift is the mean of the training data and source pooled, and the scale is one
number for every feature, chosen so that the pooled points have root-mean-square per-feature standard
deviation ``data_std``. A translation and an isotropic scaling map the squared-distance optimal transport
problem, straight paths and the OT map of data units onto those of the encoded units, which a per-feature
scaling would not. ``data_std=None`` trains in data units (no rescale, either source); the preconditioning's
``sigma_data`` is then the training data's measured root-mean-square per-feature standard deviation (1 for
constant data). Samples are decoded with the same map, so they come back in data units.

:func:`pair_marginal_velocity` is the exact marginal velocity of two finite point sets under a coupling
(independent, or a given plan) on the Gaussian-smoothed straight path, the ground truth for data-to-data
flows (docs/theory.md section 17).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from . import _validate, sources
from . import data as datasets

if TYPE_CHECKING:
    from .config import TrainConfig

SOURCE_SEED_OFFSET = 7919
"""A named toy source is drawn with seed ``config.seed + SOURCE_SEED_OFFSET``, so that ``source="moons"``
with ``data="moons"`` gives two different samples of the same law."""
FLOOR_ABSENT = (
    "non-Gaussian source: the loss floor is computed from the exact marginal of a Gaussian path, which a "
    "data source does not give (docs/theory.md section 17)"
)
"""The stored reason why a run with a data source has no loss floor."""
SOURCE_KINDS = (
    "empty (N(0, I)), a toy name or .npy/.npz file, a tensor, a pair (x, y), a Dataset or a DataLoader"
)


@dataclass
class Source:
    """The data source of a run: ``train`` ``(N, *dims)`` (read in data units on the CPU; once the run's
    normalizer is fitted, :meth:`encoded` on the device), ``held_out`` ``(M, *dims)`` in data units on the
    CPU, their labels (int64, or None), the checksum of the whole source and ``name`` (``config.source``, or
    the kind of object given to the Trainer)."""

    train: torch.Tensor
    held_out: torch.Tensor
    sha256: str
    name: str
    labels: torch.Tensor | None = None
    held_out_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._by_label: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if self.labels is not None:
            order = torch.argsort(self.labels, stable=True)
            counts = torch.bincount(self.labels)
            starts = torch.cumsum(counts, 0) - counts
            self._by_label = (order, starts, counts)

    def encoded(self, normalizer: datasets.Normalizer, device: torch.device) -> Source:
        """This source with its training points encoded by ``normalizer`` and moved, with their labels, to
        ``device`` (the held-out points stay in data units)."""
        labels = None if self.labels is None else self.labels.to(device)
        train = normalizer.encode(self.train).to(device)
        return Source(train, self.held_out, self.sha256, self.name, labels, self.held_out_labels)

    def draw(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(n, *dims)`` training source points drawn uniformly with replacement from ``generator``; with
        labels on both sides (``y`` ``(n,)``), a point of label k draws among the source points of label
        k (``y = -1``: among all). One draw of ``n`` numbers from ``generator`` either way."""
        device = self.train.device
        size = self.train.shape[0]
        if self._by_label is None or y is None:
            return self.train[torch.randint(size, (n,), generator=generator, device=device)]
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        order, starts, counts = (v.to(device) for v in self._by_label)
        labelled = y >= 0
        k = y.clamp(min=0)
        own = order[starts[k] + (u * counts[k]).long().clamp(max=counts[k] - 1)]
        anyone = (u * size).long().clamp(max=size - 1)
        return self.train[torch.where(labelled, own, anyone)]

    def info(self) -> dict[str, Any]:
        """What the run file stores about the source (JSON)."""
        return {"name": self.name, "n_train": self.train.shape[0], "sha256": self.sha256,
                "labelled": self.labels is not None}  # fmt: skip


def read_source(config: TrainConfig, source: object) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``(points, labels or None, name)`` of ``config.source`` or the ``source`` argument (a DataLoader is
    read once, one epoch, into memory). Labels are dropped when ``config.labels`` is false."""
    if source is None:
        raw, labels = datasets.load_labelled(config.source, seed=config.seed + SOURCE_SEED_OFFSET)
        name = config.source
    else:
        if config.source:
            raise ValueError(
                f"source given twice: config.source = {config.source!r} and the source argument; leave "
                "config.source empty when passing source= to the Trainer"
            )
        name = type(source).__name__
        if isinstance(source, DataLoader):
            batches = [sources.LoaderStream(source)._checked(item) for item in source]
            if not batches:
                raise ValueError("source: the DataLoader yields no batches")
            has_y = batches[0][1] is not None
            source = (
                torch.cat([b[0] for b in batches]),
                torch.cat([b[1] for b in batches]) if has_y else None,
            )
            source = source if has_y else source[0]
        raw, labels = sources.as_tensors(source, "source")
    return raw, (labels if config.labels else None), name


def prepare_source(
    config: TrainConfig, source: object, data_shape: tuple[int, ...], data_labels: torch.Tensor | None
) -> Source:
    """The source read and split like the data, in data units on the CPU (:meth:`Source.encoded` once the
    normalizer is fitted); one-line ``ValueError`` for a source that does not fit the data (its point
    shape, or a class of the data's labels with no source point)."""
    raw, labels, name = read_source(config, source)
    if tuple(raw.shape[1:]) != tuple(data_shape):
        raise ValueError(
            f"source points have shape {tuple(raw.shape[1:])} but data points {tuple(data_shape)}: a flow "
            "maps one onto the other, so both must have the same shape"
        )
    if data_labels is None:
        labels = None
    elif labels is not None:
        missing = sorted(set(data_labels.unique().tolist()) - set(labels.unique().tolist()))
        if missing:
            raise ValueError(
                f"the data has classes {missing[:5]} that the source lacks: with labels on both sides a data "
                "point of class k is paired with source points of class k; pass labels=False to ignore them"
            )
    n_holdout = min(2000, raw.shape[0] // 10) if config.n_holdout is None else config.n_holdout
    train, held_out = datasets.split(raw, n_holdout, seed=config.seed)
    train_labels = held_labels = None
    if labels is not None:
        train_labels, held_labels = datasets.split(labels, held_out.shape[0], seed=config.seed)
    return Source(train, held_out, sources.checksum(raw, labels), name, train_labels, held_labels)


def fit_normalizer(
    train: torch.Tensor, data_std: float | None, source_train: torch.Tensor | None = None
) -> tuple[datasets.Normalizer, float]:
    """``(normalizer, sigma_data)``: the affine map of a run's data (and source) and the preconditioning's
    ``sigma_data`` (module docstring). ``train``, ``source_train``: ``(N, *dims)`` data units."""
    if data_std is None:
        if datasets.is_image(tuple(train.shape[1:])):
            raise ValueError(
                "data_std none is for vector data: images are always mapped to [-1, 1]; leave data_std at "
                "its default"
            )
        spread = float(train.double().var(0, unbiased=False).mean().sqrt()) if train.shape[0] > 1 else 0.0
        zeros = torch.zeros(train.shape[1:])
        return datasets.Normalizer(zeros, torch.ones_like(zeros)), spread if spread > 0 else 1.0
    if source_train is None:
        return datasets.Normalizer.fit(train, std=data_std), data_std
    pooled = torch.cat([train, source_train]).double()
    if datasets.is_image(tuple(train.shape[1:])):
        return datasets.Normalizer.fit(pooled, std=data_std), data_std
    rms = float(pooled.var(0, unbiased=False).mean().sqrt())
    scale = torch.full(train.shape[1:], rms / data_std if rms > 0 else 1.0, dtype=torch.float64)
    return datasets.Normalizer(pooled.mean(0), scale), data_std


def sample_indices(m: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n,)`` indices into ``m`` stored source points: random permutations of ``0..m-1`` one after the
    other (each point once before any point is reused)."""
    rounds = math.ceil(n / m)
    device = None if generator is None else generator.device
    return torch.cat([torch.randperm(m, generator=generator, device=device) for _ in range(rounds)])[:n]


def start_points(
    x_source: torch.Tensor,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(n, *dims)`` start points for sampling, drawn from the stored source points ``x_source`` ``(M,
    *dims)`` (:func:`sample_indices`: each once before any is reused); with ``labels`` ``(M,)`` and sample
    labels ``y`` ``(n,)``, a sample of class k starts from a source point of class k (-1: any)."""
    m = x_source.shape[0]
    if m == 0:
        raise ValueError(
            "the run holds no held-out source points (n_holdout = 0): pass your own start points, x_init "
            "(--x-init FILE.npy)"
        )
    device, gen = x_source.device, generator
    if labels is None or y is None:
        return x_source[sample_indices(m, n, gen).to(device)]
    y = y.cpu()
    labels = labels.cpu()
    index = torch.empty(n, dtype=torch.long)
    for k in y.unique().tolist():
        rows = y == k
        pool = torch.arange(m) if k < 0 else torch.nonzero(labels == k).flatten()
        if pool.numel() == 0:
            raise ValueError(
                f"the run holds no held-out source point of class {k}: pass start points of that class as "
                "x_init (--x-init FILE.npy)"
            )
        index[rows] = pool[sample_indices(pool.numel(), int(rows.sum()), gen).cpu()]
    return x_source[index.to(device)]


def pair_marginal_velocity(
    x: torch.Tensor,
    t: torch.Tensor | float,
    x_source: torch.Tensor,
    x_data: torch.Tensor,
    sigma: float,
    *,
    plan: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The exact marginal velocity at ``x`` of the smoothed straight path between two finite point sets.

    Pairs :math:`(s_i, d_j)` are drawn from ``plan`` (``(N, M)``, non-negative; None: the independent
    coupling, :math:`\pi_{ij} = 1/(NM)`), and :math:`x_t = \mu_{ij}(t) + \sigma z`, :math:`\mu_{ij}(t) = t
    d_j + (1 - t) s_i`, :math:`z \sim N(0, I)` (torchcfm's I-CFM / OT-CFM path with constant ``sigma``),
    whose conditional velocity is :math:`d_j - s_i`. The marginal velocity is its posterior mean

    .. math::  v_t(x) = \sum_{ij} w_{ij}(x)\,(d_j - s_i), \qquad
               w_{ij}(x) \propto \pi_{ij}\exp\!\big(-\lVert x - \mu_{ij}(t)\rVert^2 / (2\sigma^2)\big),

    the field whose flow carries the law of :math:`x_0` to that of :math:`x_1` (docs/theory.md section 17).
    ``sigma > 0``: at 0 the marginal of two finite sets is a sum of point masses. ``x``: ``(B, *dims)``;
    ``t``: ``(B,)``, 0-dim or a float in [0, 1]; ``x_source`` ``(N, *dims)``, ``x_data`` ``(M, *dims)``.
    Returns ``(B, *dims)`` in the dtype of ``x``, computed in float64 with a log-sum-exp over the N x M
    pairs (memory O(B N M): for small sets).
    """
    x = _validate.batch(x, "x")
    sigma = _validate.number(sigma, "sigma", 0.0, low_open=True)
    b = x.shape[0]
    s = _validate.batch(x_source, "x_source").reshape(x_source.shape[0], -1).double()
    d = _validate.batch(x_data, "x_data").reshape(x_data.shape[0], -1).double()
    if s.shape[1] != x[0].numel() or d.shape[1] != x[0].numel():
        raise ValueError(
            f"x, x_source and x_data must have points of one shape, got {tuple(x.shape[1:])}, "
            f"{tuple(x_source.shape[1:])} and {tuple(x_data.shape[1:])}"
        )
    n, m = s.shape[0], d.shape[0]
    if plan is None:
        log_plan = torch.zeros(n, m, dtype=torch.float64)
    else:
        plan = _validate.tensor(plan, "plan").double()
        if plan.shape != (n, m) or bool((plan < 0).any()) or not bool(plan.sum() > 0):
            raise ValueError(f"plan must be a non-negative ({n}, {m}) tensor with a positive sum")
        log_plan = plan.log()
    t = _validate.time(t, like=x).double().expand(b).reshape(b, 1, 1, 1)
    flat = x.reshape(b, 1, 1, -1).double()
    mu = t * d.reshape(1, 1, m, -1) + (1 - t) * s.reshape(1, n, 1, -1)  # (B, N, M, D)
    logits = log_plan.to(flat.device) - (flat - mu).pow(2).sum(-1) / (2 * sigma * sigma)
    weights = torch.softmax(logits.reshape(b, -1), 1).reshape(b, n, m)
    u = d.reshape(1, m, -1) - s.reshape(n, 1, -1)  # (N, M, D)
    v = torch.einsum("bnm,nmd->bd", weights, u.to(weights.device))
    return v.to(x.dtype).reshape(x.shape)


__all__ = [
    "FLOOR_ABSENT",
    "Source",
    "fit_normalizer",
    "pair_marginal_velocity",
    "prepare_source",
    "sample_indices",
    "start_points",
]
