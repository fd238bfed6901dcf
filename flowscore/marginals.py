r"""Exact marginal fields of a Gaussian path started from an empirical (finite) data set.

For data points :math:`x_1, \dots, x_N` the marginal at time t is the mixture
:math:`p_t(x) = \frac1N \sum_i N(x; \alpha_t x_i, \beta_t^2 I)` and every marginal field is a posterior
average over the data, with weights

.. math::  w_i(x) = \mathrm{softmax}_i(l_i), \qquad l_i = -\lVert x - \alpha_t x_i \rVert^2 / (2\beta_t^2).

:class:`EmpiricalMarginal` computes :math:`E[x_{data}|x] = \sum_i w_i x_i` streamed over chunks of the data
with a running log-sum-exp (as in flash attention), so memory is O(B x chunk), never O(B x N); the velocity,
score and noise follow from it by the linear maps of :mod:`flowscore.conversions`.

With class labels :math:`c_i` the class-conditional marginal is the same mixture over the points of one
class, :math:`p_t(x|y) = \frac{1}{N_y}\sum_{i: c_i = y} N(x; \alpha_t x_i, \beta_t^2 I)`, and classifier-free
guidance with weight w gives the field :math:`(1 + w) f(x|y) - w f(x)` of any kind f (every kind is affine in
the posterior mean with the same coefficient on x, so guiding any one of them gives the same field).

>>> m = EmpiricalMarginal(data, get_path("linear"))
>>> m.velocity(x, t)      # u_t(x) = E[u_t(x | x_data) | x]
>>> m.score(x, t)         # grad_x log p_t(x)
>>> m.log_prob(x, t)      # log p_t(x), shaped (B,)
>>> mc = EmpiricalMarginal(data, "linear", labels=labels)
>>> mc.velocity(x, t, y=y)                # u_t(x | y); y = -1 rows: the unconditional u_t(x)
>>> mc.velocity(x, t, y=y, guidance=3.0)  # (1 + 3) u_t(x | y) - 3 u_t(x)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _validate
from .conditioning import check_labels
from .conversions import KINDS
from .paths import GaussianPath, get_path

# default B x chunk: about 1M scores per chunk on CPU (4 MiB in float32, cache sized: measured fastest),
# 8M on an accelerator (fewer, larger kernels)
_WORK_ELEMENTS_CPU = 1 << 20
_WORK_ELEMENTS_ACCELERATOR = 1 << 23
_BLOCK = 128
"""Data points per block of the table: each block is spatially compact (k-d order) and centred at its mean."""
_LOCAL_MAX_DIM = 8
"""Blocks are centred at their own means up to this dimension (beyond it k-d blocks are hardly compact)."""
_GROUP = 32
"""Columns per group in the search for competing points (a max over groups of 32 is cheap)."""
_TARGET = 1e-5
"""Relative error of the fields that the exact refinement is sized for, from a bound on the error of the
streamed sums (the measured errors are well below it)."""
_KAPPA = 2.0
"""Streamed scores err by at most about ``_KAPPA * eps * |score bound|`` (measured: up to 1.15 x, on
clustered, offset, dense 2-D and 256-D data)."""
_REFINE_ELEMENTS = 1 << 22
"""Candidate pairs x dims refined at once (bounds the memory of the exact refinement)."""
_SCORE_LIMIT = {torch.float32: 1e30, torch.float64: 1e200}
"""Largest score magnitude the streamed pass allows; sharper posteriors are point masses (see below)."""
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
"""Streamed weights are ``exp(max(s - max, floor))``: no denormals (whose exp is slow), and the floor's
weight (< 1e-34 in float32) is negligible next to the maximum's 1."""
_MAX_ABS_FLOAT64 = 1e150
"""Largest data or query magnitude of a float64 marginal (its squared distances must fit in float64)."""


def flat_batch(x: torch.Tensor, point_shape: torch.Size, name: str = "x") -> torch.Tensor:
    """``x`` checked to be ``(B, *point_shape)`` and finite, returned flattened to ``(B, D)``."""
    x = _validate.batch(x, name)
    if x.shape[1:] != point_shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, but the data points have shape {tuple(point_shape)}; "
            f"expected (B, {', '.join(map(str, point_shape))})"
        )
    _validate.finite(x, name)
    return x.reshape(x.shape[0], -1)


def per_row(v: torch.Tensor, b: int) -> torch.Tensor:
    """A 0-dim or ``(B,)`` tensor as ``(B, 1)``, for broadcasting over a flat ``(B, D)`` batch."""
    return v.expand(b).reshape(b, 1)


class Marginal:
    """Shared interface of the exact marginals (empirical data, Gaussian mixture).

    Subclasses implement :meth:`_flat_field` (kinds ``data``, ``noise``, ``velocity``, ``score`` on a flat
    ``(B, D)`` batch, optionally given labels) and :meth:`_flat_log_prob`; this class checks the inputs,
    forms the classifier-free-guided combination and restores the shapes. ``num_classes`` is ``K`` for a
    labelled marginal and None otherwise.
    """

    path: GaussianPath
    point_shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    num_classes: int | None = None

    def _inputs(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = _validate.tensor(x, "x")
        flat = flat_batch(x, self.point_shape)
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(
                f"x is {x.dtype} on {x.device} but the marginal is {self.dtype} on {self.device}; "
                "they must match"
            )
        t = _validate.time(t, like=x)
        if y is None:
            return flat, t, None
        if self.num_classes is None:
            raise ValueError("y was given but this marginal has no class labels; build it with labels=")
        y = check_labels(y, x.shape[0]).to(self.device)
        if y.numel() and int(y.max()) >= self.num_classes:
            raise ValueError(
                f"y holds class {int(y.max())} but the marginal has {self.num_classes} classes 0..K-1 "
                "(-1 = no label)"
            )
        return flat, t, y.long()

    def field(
        self,
        kind: str,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor | None = None,
        guidance: float = 0.0,
    ) -> torch.Tensor:
        """The marginal field of ``kind`` (velocity, score, noise or data) at ``x``, shaped ``(B, *dims)``.

        ``data`` is :math:`E[x_{data}|x_t = x]`, ``noise`` is :math:`E[\\varepsilon|x_t = x]`, ``velocity`` is
        :math:`E[\\alpha'_t x_{data} + \\beta'_t \\varepsilon | x_t = x]`, ``score`` is
        :math:`\\nabla_x \\log p_t(x) = -E[\\varepsilon|x]/\\beta_t`. With labels ``y`` (``(B,)`` integers,
        ``-1`` = no label) each row is conditioned on its class, :math:`f(x|y)`; with ``guidance`` w it is
        the classifier-free-guided field :math:`(1 + w) f(x|y) - w f(x)` (rows with ``y = -1`` get f(x)).
        """
        _validate.choice(kind, KINDS, "kind")
        w = _validate.number(guidance, "guidance")
        flat, t, y = self._inputs(x, t, y)
        if w != 0 and y is None:
            raise ValueError("guidance needs class labels y: it mixes f(x|y) and the unconditional f(x)")
        out = self._flat_field(kind, flat, t, y) if w == 0 else self._guided(kind, flat, t, y, w)
        return self._checked(out.to(self.dtype), kind).reshape(x.shape)

    def _checked(self, out: torch.Tensor, what: str) -> torch.Tensor:
        """``out`` itself; ``ValueError`` if the exact value overflowed the marginal's dtype."""
        if _validate.value_checks_enabled() and not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"the {what} at these inputs exceeds the range of {self.dtype}; rescale the data or build "
                "the marginal with dtype=torch.float64"
            )
        return out

    def _guided(self, kind: str, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
        """``(1 + w) f(x|y) - w f(x)`` on a flat batch; rows with ``y = -1`` keep the unconditional f(x)."""
        out = self._flat_field(kind, x, t, None)
        has = y >= 0
        if bool(has.any()):
            t_rows = t if t.dim() == 0 else t[has]
            conditional = self._flat_field(kind, x[has], t_rows, y[has])
            out = out.clone()
            out[has] = (1 + w) * conditional.to(out.dtype) - w * out[has]
        return out

    def posterior_mean(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None, guidance: float = 0.0
    ) -> torch.Tensor:
        """:math:`E[x_{data} | x_t = x]` (given the class ``y`` when passed), shaped ``(B, *dims)``."""
        return self.field("data", x, t, y, guidance)

    def noise(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None, guidance: float = 0.0
    ) -> torch.Tensor:
        """:math:`E[\\varepsilon | x_t = x]` (given the class ``y`` when passed), shaped ``(B, *dims)``."""
        return self.field("noise", x, t, y, guidance)

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None, guidance: float = 0.0
    ) -> torch.Tensor:
        """Marginal velocity :math:`\\alpha'_t E[x_{data}|x] + \\beta'_t E[\\varepsilon|x]`, (B, *dims)."""
        return self.field("velocity", x, t, y, guidance)

    def score(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None, guidance: float = 0.0
    ) -> torch.Tensor:
        """Marginal score :math:`\\nabla_x \\log p_t(x)` (or :math:`\\nabla_x \\log p_t(x|y)`), (B, *dims)."""
        return self.field("score", x, t, y, guidance)

    def log_prob(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:math:`\\log p_t(x)`, or :math:`\\log p_t(x|y)` per row given labels ``y``, shaped ``(B,)``."""
        flat, t, y = self._inputs(x, t, y)
        return self._checked(self._flat_log_prob(flat, t, y).to(self.dtype), "log_prob")

    flow_map_t_end: float = 0.0
    """The exact flow map solves up to ``1 - flow_map_t_end`` (0: the velocity is finite at t = 1)."""
    _solve_dtype: torch.dtype | None = None
    """The dtype the flow map evaluates the velocity in (None: the marginal's dtype)."""

    def flow_map(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        s: torch.Tensor | float,
        y: torch.Tensor | None = None,
        guidance: float = 0.0,
        rtol: float = 1e-8,
        atol: float = 1e-8,
    ) -> torch.Tensor:
        r"""The exact flow map :math:`X(x, t, s)` ``(B, *dims)``: the probability-flow ODE of the marginal
        velocity (class-conditional with ``y``, guided with ``guidance``) from ``x`` at ``t`` to time ``s``.

        ``x`` ``(B, *dims)``; ``t``, ``s`` floats or ``(B,)`` in [0, 1], either order (``s < t`` runs towards
        the noise). Solved by :func:`flowscore.flowmaps.exact_flow_map` (adaptive Dormand--Prince 5(4),
        float64 state) to the local tolerances ``rtol``, ``atol``; the velocity is evaluated in float64 for a
        Gaussian mixture and in the marginal's dtype for data (build it with ``dtype=torch.float64`` for
        float64 accuracy). Times beyond ``1 - flow_map_t_end`` are taken as ``1 - flow_map_t_end``: the
        empirical marginal's velocity is singular at t = 1 (every trajectory ends on a data point), so its
        map to (or from) t = 1 is the map to ``1 - 1e-6`` (a difference of at most ``1e-6`` times the speed).
        Average velocity: ``(flow_map(x, t, s) - x) / (s - t)``.
        """
        from .flowmaps import _pair_times, exact_flow_map

        w = _validate.number(guidance, "guidance")
        flat, _, y = self._inputs(x, 0.0, y)
        if w != 0 and y is None:
            raise ValueError("guidance needs class labels y: it mixes f(x|y) and the unconditional f(x)")
        t64, s64 = _pair_times(t, s, x)
        end = 1.0 - self.flow_map_t_end
        dtype = self._solve_dtype or self.dtype

        def velocity(z: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
            z, times = z.to(dtype), times.clamp(max=end).to(dtype)
            out = self._flat_field("velocity", z, times, y) if w == 0 else self._guided(
                "velocity", z, times, y, w)  # fmt: skip
            return out.to(torch.float64)

        out = exact_flow_map(velocity, flat.to(torch.float64), t64, s64, rtol=rtol, atol=atol)
        return self._checked(out.to(self.dtype), "flow map").reshape(x.shape)

    def _flat_field(
        self, kind: str, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _flat_log_prob(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class Posterior(NamedTuple):
    """The posterior over the data at a flat batch, relative to its most likely point (the anchor).

    ``anchor`` (``(B, D)``, float64) is the anchor point :math:`x_a`; ``offset`` (``(B, D)``, float64) is
    :math:`E[x_{data}|x] - x_a`; ``log_sum`` (``(B,)``, float64) is :math:`\\log \\sum_i \\exp(l_i - l_a)`;
    ``dist2`` (``(B,)``, float64) is :math:`\\lVert x - \\alpha_t x_a \\rVert^2`.
    """

    anchor: torch.Tensor
    offset: torch.Tensor
    log_sum: torch.Tensor
    dist2: torch.Tensor


def _decay(delta: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """:math:`\\exp(-\\delta / (2\\beta^2))` for squared-distance gaps ``delta >= 0``: 1 at a tie, 0 for any
    gap where beta = 0 (the limit of a point mass)."""
    return torch.where(delta == 0, torch.ones_like(delta), torch.exp(-delta / (2 * beta * beta)))


class _Exact:
    """Running exact (float64) posterior sums over the candidate points of each row.

    Per row: ``dist2`` the smallest squared distance ``||x - alpha x_i||^2`` seen and ``anchor`` that point;
    ``total = sum_i exp(-(d_i - dist2) / 2 beta^2)`` and ``acc`` the same sum of ``w_i (x_i - center)``;
    ``ref_score``/``ref_dist2``: the highest streamed (approximate) score among the candidates and the exact
    squared distance of that point, which ties the streamed sums to these exact ones.
    """

    def __init__(self, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, center: torch.Tensor):
        b, d = x.shape
        self.x, self.alpha, self.beta, self.center = x, alpha, beta, center
        self.dist2 = torch.full((b,), math.inf, dtype=torch.float64, device=x.device)
        self.anchor = torch.zeros(b, d, dtype=torch.float64, device=x.device)
        self.total = torch.zeros(b, dtype=torch.float64, device=x.device)
        self.acc = torch.zeros(b, d, dtype=torch.float64, device=x.device)
        self.ref_score = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
        self.ref_dist2 = torch.full((b,), math.inf, dtype=torch.float64, device=x.device)

    def add(self, rows: torch.Tensor, points: torch.Tensor, scores: torch.Tensor) -> None:
        """Merge candidate pairs: ``rows`` ``(P,)``, their data ``points`` ``(P, D)`` float64 (overwritten)
        and streamed logits ``scores`` ``(P,)`` (float64). Each (row, point) pair must be added at most
        once."""
        b = self.dist2.shape[0]
        diff = torch.addcmul(self.x[rows], points, self.alpha[rows, None], value=-1.0)
        dist2 = torch.einsum("pd,pd->p", diff, diff)
        del diff
        new = torch.full((b,), math.inf, dtype=torch.float64, device=rows.device)
        new = new.scatter_reduce(0, rows, dist2, "amin")
        moved = new < self.dist2  # rows whose anchor changes
        if bool(moved.any()):  # the new anchor: a point of this batch at the new minimum
            pick = torch.full((b,), -1, dtype=torch.long, device=rows.device)
            order = torch.arange(rows.shape[0], device=rows.device)
            pick.scatter_reduce_(0, rows, torch.where(dist2 == new[rows], order, -1), "amax")
            self.anchor = torch.where(moved[:, None], points[pick.clamp_min(0)], self.anchor)
        best = torch.minimum(self.dist2, new)
        # rescale the old sums to the new minimum (out of place: autograd may be on); a row seen for the
        # first time has empty sums, a row not in this batch keeps them
        keep = _decay(torch.where(new < math.inf, self.dist2 - best, 0.0), self.beta)
        self.dist2 = best
        w = _decay(dist2 - best[rows], self.beta[rows])
        self.total = (self.total * keep).index_add(0, rows, w)
        offsets = points.sub_(self.center).mul_(w[:, None])  # in place: the caller's fresh gather
        self.acc = (self.acc * keep[:, None]).index_add(0, rows, offsets)
        # the reference: the candidate with the highest streamed score (the exact nearest among equals)
        top = torch.full((b,), -math.inf, dtype=scores.dtype, device=rows.device)
        top = top.scatter_reduce(0, rows, scores, "amax")
        at_top = scores == top[rows]
        ref = torch.full((b,), math.inf, dtype=torch.float64, device=rows.device)
        ref = ref.scatter_reduce(0, rows[at_top], dist2[at_top], "amin")
        better = top > self.ref_score
        self.ref_dist2 = torch.where(better, ref, self.ref_dist2)
        self.ref_score = torch.maximum(self.ref_score, top)


class EmpiricalMarginal(Marginal):
    r"""Exact marginal fields of ``path`` started from the empirical distribution of ``data``.

    Args:
        data: ``(N, *dims)`` float tensor of data points (finite, N >= 1).
        path: a :class:`~flowscore.paths.GaussianPath` or its name.
        chunk_size: data points per streamed chunk, rounded up to whole blocks (of 128 points, fewer for
            small data); default about ``W // B`` with ``W = 2**20`` on CPU (a cache-sized score block)
            and ``2**23`` on an accelerator.
        dtype: compute dtype (``torch.float32`` or ``torch.float64``); default the dtype of ``data``.
            Queries ``x`` must have this dtype and the device of ``data``.
        labels: optional ``(N,)`` integer class labels ``0..K-1`` (``K = max + 1``): the fields then take
            ``y=`` (``(B,)`` labels, ``-1`` = unconditional) and ``guidance=``.

    All fields are exact for the finite data set: with the weights
    :math:`w_i = \mathrm{softmax}_i(-\lVert x - \alpha_t x_i\rVert^2 / 2\beta_t^2)` (over the points of class
    ``y`` when a row has a label), ``posterior_mean = sum_i w_i x_i`` and ``velocity``, ``score``, ``noise``
    are ``path.convert(posterior_mean, x, t, "data", kind)``. Those conversions divide by beta_t, so at a
    time where beta_t = 0 (t = 1 on ``linear``, ``vp``, ``vp-linear``) they raise the ``ValueError`` of
    :func:`~flowscore.conversions.convert`; ``posterior_mean`` there is the limit beta -> 0, the data point
    nearest to ``x / alpha_t`` (the average of equally near ones). ``log_prob`` needs beta_t > 0.

    Algorithm and precision. The data are sorted once into blocks of 128 nearby points (k-d bisection,
    within each class when labelled). A chunk of blocks gets its scores from one matmul,
    :math:`s_i = (\alpha/\beta^2)(y \cdot z_i - \alpha\lVert z_i\rVert^2/2) = l_i + \lVert y\rVert^2/2\beta^2`
    with ``z_i = x_i - c``, ``y = x - alpha c`` about a centre ``c``: each block's own mean in low
    dimension (up to ``_LOCAL_MAX_DIM``, where k-d blocks are compact; one batched matmul with a query per
    block), the data's mean otherwise. The weights are streamed with a running maximum of the logits
    (flash-attention style: memory O(B x chunk)), and the weighted sums are formed block by block about the
    centres and added in float64. In float32 a score errs by up to
    :math:`E \approx \kappa\epsilon(\alpha/\beta^2)(\lVert y\rVert\rho + \alpha\rho^2/2)` (``rho`` the
    radius of the block about its centre, ``kappa = _KAPPA``), which at small beta_t exceeds the gaps between
    competing points. So the pass also collects, per row, the candidates whose logit is within a cut of the
    maximum (found from maxima over groups of 32 columns, against a lower bound of the final maximum from
    the blocks' means and radii), leaves them out of the streamed sums and sums them exactly in float64
    from the direct differences :math:`\lVert x - \alpha x_i\rVert^2`. The cut is ``4E`` (so that the
    nearest point is a candidate) plus ``max(0, log(10 r) - log L)``: ``r`` bounds the relative error one
    streamed point next to the maximum could cause in the fields, against ``_TARGET``, and ``L`` is (a lower
    bound of) the posterior's total weight relative to its largest, as the independent rounding errors of
    many points average out. Afterwards a row whose streamed remainder still exceeds that bound (summed in
    quadrature) is recomputed in float64. ``log_prob`` uses the exact float64 distance to the nearest
    candidate (the anchor). ``bench/bench_marginal.py`` measures the precision against a float64 brute
    force on hostile data and the speed next to the previous single-pass algorithm.
    """

    flow_map_t_end = 1e-6
    """The data end: the velocity is singular at t = 1, the flow map stops at ``1 - 1e-6``."""

    def __init__(
        self,
        data: torch.Tensor,
        path: GaussianPath | str,
        chunk_size: int | None = None,
        dtype: torch.dtype | None = None,
        *,
        labels: torch.Tensor | None = None,
    ):
        data = _validate.batch(data, "data")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        _validate.finite(data, "data")
        self.path = get_path(path) if isinstance(path, str) else path
        if not isinstance(self.path, GaussianPath):
            raise ValueError(f"path must be a GaussianPath or a path name, got {type(path).__name__}")
        self.data = data.to(dtype) if dtype is not None else data
        self.dtype, self.device = self.data.dtype, self.data.device
        self.point_shape = self.data.shape[1:]
        self.chunk_size = chunk_size
        flat = self.data.reshape(self.data.shape[0], -1)
        if self.dtype == torch.float64 and bool((flat.abs() > _MAX_ABS_FLOAT64).any()):
            raise ValueError(
                f"data holds values above {_MAX_ABS_FLOAT64:g} in magnitude, too large for exact squared "
                "distances in float64; rescale the data"
            )
        self._flat_data = flat
        self.labels = (
            None if labels is None else _validate.class_labels(labels, flat.shape[0]).to(self.device)
        )
        self.num_classes = None if self.labels is None else int(self.labels.max()) + 1
        self._build(flat.double())

    def _build(self, flat64: torch.Tensor) -> None:
        """The block table: data sorted into spatially compact blocks (within each class), each centred."""
        n, d = flat64.shape
        classes = (
            [torch.arange(n, device=self.device)]
            if self.labels is None
            else torch.argsort(self.labels, stable=True).split(
                torch.bincount(self.labels, minlength=self.num_classes).tolist()
            )  # the members of each class, in order: O(N log N + K), not O(N K)
        )
        largest = max(len(members) for members in classes)
        block = min(_BLOCK, _GROUP * math.ceil(largest / _GROUP))
        if self.chunk_size is not None:
            block = min(block, _GROUP * math.ceil(self.chunk_size / _GROUP))
        self._block = block
        self._center = flat64.mean(0)
        self._class_means = [flat64[members].mean(0) if len(members) else None for members in classes]
        blocks, self._class_blocks = [], [0]
        for members in classes:  # an empty class has no blocks
            if len(members):
                blocks += [members[part] for part in _spatial_blocks(flat64[members], block)]
            self._class_blocks.append(len(blocks))
        index = torch.zeros(len(blocks), block, dtype=torch.long, device=self.device)
        self._valid = [len(part) for part in blocks]
        for k, part in enumerate(blocks):
            index[k, : len(part)] = part
            index[k, len(part) :] = part[0]  # padding, masked out of the scores
        self._index = index.reshape(-1)
        points = flat64[index]  # (K, block, D)
        mask = (
            torch.arange(block, device=self.device)[None]
            < torch.tensor(self._valid, device=self.device)[:, None]
        )
        centers = (points * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        local = ((points - centers[:, None]) * mask[..., None]).norm(dim=2).amax(1)
        self._radius = float((flat64 - self._center).norm(dim=1).max())
        # blocks centred at their own means where that pays: compact blocks (low dimension), for which the
        # per-block queries cost little next to the scores; otherwise one shared centre and one query
        self._local = d <= _LOCAL_MAX_DIM and float(local.mean()) < 0.25 * self._radius
        self._block_mean, self._block_spread = centers, local  # for the lower bound of the maximum
        self._block_center = centers if self._local else self._center.expand(len(blocks), d).contiguous()
        offsets = (points - self._block_center[:, None]) * mask[..., None]
        self._block_radius = offsets.norm(dim=2).amax(1)
        # a power-of-two scale S with |z / S| <= 1 (exact rescaling): squared norms never overflow
        top = float(self._block_radius.max())
        self._scale = 2.0 ** math.ceil(math.log2(top)) if top > 0 else 1.0
        z = offsets / self._scale
        self._table = torch.cat([z, z.pow(2).sum(2, keepdim=True)], 2).to(self.dtype)  # (K, block, D + 1)
        self._padded = [k for k, v in enumerate(self._valid) if v < block]
        self._class_sizes = [len(members) for members in classes]

    def __len__(self) -> int:
        return self.data.shape[0]

    def __repr__(self) -> str:
        classes = "" if self.num_classes is None else f", num_classes={self.num_classes}"
        return (
            f"EmpiricalMarginal(N={len(self)}, point_shape={tuple(self.point_shape)}{classes}, "
            f"path={self.path!r})"
        )

    def _chunk(self, b: int) -> int:
        """Data points per streamed chunk for a batch of ``b`` queries (a whole number of blocks)."""
        if self.chunk_size:
            return self._block * max(1, math.ceil(self.chunk_size / self._block))
        work = _WORK_ELEMENTS_CPU if self.device.type == "cpu" else _WORK_ELEMENTS_ACCELERATOR
        return self._block * max(1, work // (b * self._block))

    def _points(self, position: torch.Tensor) -> torch.Tensor:
        """Data points ``(P, D)`` in float64 at ``position``s of the block table."""
        return self._flat_data[self._index[position]].double()

    # -- the posterior ----------------------------------------------------------------------------------
    def _posterior(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Posterior:
        """The :class:`Posterior` at the flat batch ``x`` (given the classes ``y``; -1 rows: all data)."""
        x64 = x.double()
        low, high = x64.detach().aminmax()
        if self.dtype == torch.float64 and max(-float(low), float(high)) > _MAX_ABS_FLOAT64:
            raise ValueError(f"x holds values above {_MAX_ABS_FLOAT64:g} in magnitude; rescale data and x")
        alpha, beta = (v.expand(x.shape[0]) for v in self.path.schedule(t.double())[:2])
        everything = (0, self._class_blocks[-1], self._center)
        if y is None:
            return self._block_posterior(x64, alpha, beta, *everything)
        parts = []
        for label in torch.unique(y).tolist():
            rows = (y == label).nonzero().squeeze(1)
            lo, hi, mean = everything if label < 0 else (*self._class_blocks[label : label + 2], None)
            if lo == hi:
                raise ValueError(f"y asks for class {label}, which has no data points")
            mean = self._class_means[label] if mean is None else mean
            parts.append((rows, self._block_posterior(x64[rows], alpha[rows], beta[rows], lo, hi, mean)))
        return _gather_rows(parts, x64)

    def _block_posterior(
        self, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, lo: int, hi: int, mean: torch.Tensor
    ) -> Posterior:
        """The posterior over the blocks ``lo:hi`` (one class, or all data) at float64 queries ``x``."""
        b = x.shape[0]
        # alpha = 0 (t = 0 on linear, vp): every point is equally likely, the posterior is uniform
        flat = alpha == 0
        parts = []
        if bool(flat.any()):
            rows = flat.nonzero().squeeze(1)
            first = self._points(torch.tensor([lo * self._block], device=x.device)).expand(len(rows), -1)
            count = sum(self._valid[lo:hi])  # the points of the blocks lo:hi
            flat_log_sum = torch.full((len(rows),), math.log(count), dtype=torch.float64, device=x.device)
            uniform = Posterior(first, mean - first, flat_log_sum, x[rows].pow(2).sum(1))
            parts.append((rows, uniform))
        if not bool(flat.all()):
            rows = (~flat).nonzero().squeeze(1)
            whole = len(rows) == b
            part = self._stream(x if whole else x[rows], alpha[rows], beta[rows], lo, hi)
            parts.append((None if whole else rows, part))
        return _gather_rows(parts, x)

    def _stream(
        self,
        x: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        lo: int,
        hi: int,
        dtype: torch.dtype | None = None,
        boost: torch.Tensor | None = None,
    ) -> Posterior:
        """One streamed pass over the blocks ``lo:hi`` in ``dtype`` (default the marginal's), with the exact
        refinement of the competing points. ``x`` float64 ``(B, D)``, ``alpha > 0``, ``beta >= 0`` ``(B,)``.

        Rows whose error bound is still above the target afterwards are computed again: with the cut widened
        by what the bound asks for (``boost``, nats per row), and if that is not enough, in float64."""
        dtype = dtype or self.dtype
        b, d = x.shape
        s, radius = self._scale, self._radius
        rho_max = float(self._block_radius[lo:hi].max()) / s  # block radii in units of S are <= 1
        # |y_k| / S <= (|x - alpha c| + alpha R) / S bounds every block's score: the scale is capped so that
        # no score overflows. Sharp rows (beta = 0, or so small that it is capped) are point masses: distinct
        # points differ by astronomically many nats, the streamed sums are dropped and the candidates decide
        far = ((x - alpha[:, None] * self._center).norm(dim=1) + alpha * radius) / s
        limit = _SCORE_LIMIT[dtype] / (far * rho_max + alpha * rho_max**2 / 2 + 1e-300)
        factor = alpha / (beta * beta) * s * s
        sharp = ~(factor <= limit)
        factor = torch.where(sharp, limit, factor)
        beta_or_1 = torch.where(sharp, 1.0, beta)
        eps = torch.finfo(dtype).eps
        # the mean's error allowed by the target, in data units: the fields carry alpha / beta times it,
        # and on the path their scale is about |noise| ~ sqrt(D)
        allowed = _TARGET * math.sqrt(d) * beta_or_1 / alpha
        grad = torch.is_grad_enabled() and x.requires_grad
        floor = _EXP_FLOOR[dtype]

        exact = _Exact(x, alpha, beta, self._center)
        big_m = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)  # running max logit
        # a lower bound of the final running maximum (the exact largest logit's, less the streamed scores'
        # worst error and a margin for rounding): it keeps the early chunks, met while the running maximum
        # is still low, from collecting candidates; worth its cost when there are several chunks
        per_chunk = self._chunk(b) // self._block
        floor_m = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
        if hi - lo > 2 * per_chunk:
            floor_m = self._lower_max(x, alpha, factor / (2 * alpha * s * s), lo, hi)
            floor_m = (
                floor_m
                - _KAPPA * eps * factor * (far * rho_max + alpha * rho_max**2 / 2)
                - 1e-9 * (1 + floor_m.abs())
            )
        acc = torch.zeros(b, d, dtype=torch.float64, device=x.device)  # streamed sum_i w_i (x_i - c)
        acc_total = torch.zeros(b, dtype=torch.float64, device=x.device)  # streamed sum_i w_i
        lower = torch.zeros(b, dtype=torch.float64, device=x.device)  # lower bound of all the weight
        noise2 = torch.zeros(b, dtype=torch.float64, device=x.device)  # bound^2 of the streamed error
        pending: list[tuple[torch.Tensor, ...]] = []
        n_pending = 0
        if not self._local:  # one query, and one error bound, for all blocks
            y, y2, shift, query = self._queries(x, alpha, factor, self._center[None], dtype)
            unit_radius = self._block_radius[lo:hi].amax()[None]
            err, per_weight = self._bounds(y2, alpha, factor, unit_radius, eps)
            ratio = per_weight / allowed
        for k0 in range(lo, hi, per_chunk):
            k1 = min(k0 + per_chunk, hi)
            # the chunk's units: its blocks with their own centres (local), or the whole chunk (shared centre)
            table = self._blocks(k0, k1, dtype)  # (m, block, D + 1)
            if self._local:
                centers, unit_radius = self._block_center[k0:k1], self._block_radius[k0:k1]  # (m, D), (m,)
                y, y2, shift, query = self._queries(x, alpha, factor, centers, dtype)
                err, per_weight = self._bounds(y2, alpha, factor, unit_radius, eps)
                ratio = per_weight / allowed
            else:
                table = table.reshape(1, -1, d + 1)
            units, width = table.shape[:2]
            scores = torch.matmul(query, table.transpose(1, 2))  # (units, B, width)
            scores = self._mask_padding(scores, k0, k1, grad)
            top = scores.amax(2)  # (units, B)
            block_max = top.double() - shift  # the streamed logits' block maxima
            new_m = torch.maximum(big_m, block_max.amax(0))
            rescale = torch.exp(big_m - new_m)
            # scores relative to the running max, l~_i - new_m = (s_i - top_k) + (block_max_k - new_m): only
            # differences are rounded, and the maximum's point gets exactly 0
            relative = (top - (block_max - new_m).to(dtype))[..., None]
            scores = scores - relative if grad else scores.sub_(relative)
            group_max = scores.view(units, b, -1, _GROUP).amax(3)  # (units, B, groups)
            this_chunk = group_max.double().exp().sum((0, 2))
            lower = lower * rescale + this_chunk
            total = torch.maximum(lower, acc_total * rescale + this_chunk)
            # the cut: the score errors (so that the nearest point is a candidate) and, where the bound asks
            # for it, the nats below which a point's weight no longer matters, log(10 r) for one competitor;
            # less by log(total weight), as the independent errors of many points average out
            need = torch.where(sharp, -math.inf, torch.log(10 * ratio) - total.log())
            if boost is not None:
                need = need + boost
            cut = (4 * err + need.clamp_min(0.0)).clamp_max(1e30)  # (units, B), below the final maximum
            start = k0 * self._block
            # collected below the running maximum new_m, less where the final one is known to be higher
            collect = cut - (floor_m - new_m).clamp_min(0.0)
            rows, position, value = _candidates(scores, group_max, collect, start)
            unit = (position - start).div(width, rounding_mode="floor")
            weights = torch.exp(scores.clamp_min(floor)) if grad else scores.clamp_min_(floor).exp_()
            if position.numel():  # the candidates are summed exactly instead
                flat_pos = (unit * b + rows) * width + (position - start) % width
                flat = weights.reshape(-1)
                flat = (
                    flat.index_put((flat_pos,), flat.new_zeros(()))
                    if grad
                    else flat.index_fill_(0, flat_pos, 0)
                )
                weights = flat.view_as(weights)
            # the weighted sums about the units' centres, summed block by block (accurate: see _weighted_sum)
            if self._local:
                block_sum = torch.bmm(weights, table[..., :d])
            else:
                block_sum = _weighted_sum(weights[0], table[0, :, :d], self._block)[None]
            block_sum = block_sum.double() * s  # (units, B, D)
            block_total = weights.sum(2).double()  # (units, B)
            acc = acc * rescale[:, None] + block_sum.sum(0)
            if self._local:
                acc = acc + torch.einsum("mb,md->bd", block_total, centers - self._center)
            acc_total = acc_total * rescale + block_total.sum(0)
            heaviest = torch.minimum(block_max - new_m, 2 * err - cut).exp()
            noise2 = noise2 * rescale**2 + (per_weight.pow(2) * heaviest * block_total).sum(0)
            big_m = new_m
            pending.append((rows, position, value + new_m[rows], cut[unit, rows].double()))
            n_pending += rows.shape[0]
            if n_pending * d > _REFINE_ELEMENTS:
                acc, acc_total = self._flush(exact, pending, acc, acc_total, big_m)
                pending, n_pending = [], 0
        acc, acc_total = self._flush(exact, pending, acc, acc_total, big_m)

        # the streamed remainder, rescaled from the streamed maximum to the exact anchor's weight 1
        tie = torch.where(sharp, 0.0, _decay(exact.ref_dist2 - exact.dist2, beta))
        total = exact.total + tie * acc_total
        offset = (exact.acc + tie[:, None] * acc) / total[:, None] - (exact.anchor - self._center)
        result = Posterior(exact.anchor, offset, total.log(), exact.dist2)
        # a posteriori: the streamed remainder's error bound (its terms summed in quadrature) against the
        # row's actual field scale |E[noise|x]|
        noise = (x - alpha[:, None] * (exact.anchor + offset)).norm(dim=1) / beta_or_1
        bound = alpha * tie * noise2.sqrt() / (total * beta_or_1 * noise.clamp_min(1e-3))
        redo = (~sharp & (bound > 2 * _TARGET)).nonzero().squeeze(1)
        if redo.numel() and dtype != torch.float64:
            if boost is None:  # the remainder's error falls like exp(-cut / 2): widen the cut accordingly
                wider = 2 * torch.log(bound[redo] / _TARGET) + math.log(10)
                part = self._stream(x[redo], alpha[redo], beta[redo], lo, hi, dtype, wider)
            else:
                part = self._stream(x[redo], alpha[redo], beta[redo], lo, hi, torch.float64)
            for whole, piece in zip(result, part, strict=True):
                whole[redo] = piece
        return result

    def _bounds(
        self, y2: torch.Tensor, alpha: torch.Tensor, factor: torch.Tensor, radius: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Error bounds ``(units, B)`` for units (blocks, or a chunk) of ``radius`` ``(units,)`` about their
        centres, queried at ``|y|^2 = y2``: each streamed score's error ``err``, and the posterior mean's
        error per unit of streamed weight (the weights' errors times the distances, and the rounding of the
        float sums about the units' centres)."""
        rho = radius[:, None] / self._scale  # <= 1
        err = _KAPPA * eps * factor * (y2.sqrt() * rho + alpha * rho**2 / 2)
        # |x_i - mean| for the unit's points: within |x / alpha - c_k| + rho_k of x / alpha, as (about) the
        # mean is, and within the data's diameter; a weight errs by up to 2 err
        reach = torch.clamp_max(self._scale * y2.sqrt() / alpha + radius[:, None], 2 * self._radius)
        return err, 2 * err * reach + _KAPPA * eps * radius[:, None]

    def _queries(
        self,
        x: torch.Tensor,
        alpha: torch.Tensor,
        factor: torch.Tensor,
        centers: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, ...]:
        """Per block centre ``c_k`` (``centers`` ``(m, D)``): ``y = (x - alpha c_k) / S`` ``(m, B, D)``, its
        squared norm ``(m, B)``, the shift ``s_i - l_i = factor |y|^2 / (2 alpha)`` ``(m, B)`` and the query
        ``[factor y, -factor alpha / 2]`` ``(m, B, D + 1)`` in ``dtype`` (float64 until then)."""
        y = (x[None] - alpha[None, :, None] * centers[:, None]) / self._scale
        y2 = torch.einsum("mbd,mbd->mb", y, y)
        tail = (-0.5 * factor * alpha).expand(centers.shape[0], -1)[..., None]
        query = torch.cat([factor[:, None] * y, tail], 2).to(dtype)
        return y, y2, factor * y2 / (2 * alpha), query

    def _lower_max(
        self, x: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        """A lower bound ``(B,)`` of the largest logit ``-scale |x - alpha x_i|^2`` over the blocks ``lo:hi``:
        every point of block k lies within ``rho_k`` of its mean ``c_k``, so
        ``|x - alpha x_i| <= |x - alpha c_k| + alpha rho_k``. Cheap: one distance per block."""
        best = torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=x.device)
        step = max(1, _WORK_ELEMENTS_CPU // x.shape[0])
        for k0 in range(lo, hi, step):
            k1 = min(k0 + step, hi)
            centers, radii = self._block_mean[k0:k1], self._block_spread[k0:k1]
            # |x - alpha c|^2 by one matmul, made an upper bound by the float64 rounding of that expansion
            size = x.pow(2).sum(1, keepdim=True) + (alpha[:, None] * centers.norm(dim=1)).pow(2)
            gap2 = size - 2 * alpha[:, None] * (x @ centers.T)
            gap = (gap2.clamp_min(0.0) + 8 * torch.finfo(torch.float64).eps * size).sqrt()
            best = torch.minimum(best, (gap + alpha[:, None] * radii).amin(1))
        return -scale * best * best

    def _mask_padding(self, scores: torch.Tensor, k0: int, k1: int, grad: bool) -> torch.Tensor:
        """``scores`` ``(m, B, block)`` of blocks ``k0:k1`` with -inf at the padding of partial blocks (the
        last block of each class); in place unless ``grad``."""
        padded = [k for k in self._padded if k0 <= k < k1]
        if not padded:
            return scores
        units = scores.shape[0]
        # block k's columns: its own unit, or its place in the one unit of the chunk
        where = [(k - k0, 0) if units > 1 else (0, (k - k0) * self._block) for k in padded]
        if grad:
            mask = torch.zeros(units, 1, scores.shape[2], dtype=torch.bool, device=scores.device)
            for k, (unit, column) in zip(padded, where, strict=True):
                mask[unit, :, column + self._valid[k] : column + self._block] = True
            return scores.masked_fill(mask, -math.inf)
        for k, (unit, column) in zip(padded, where, strict=True):
            scores[unit, :, column + self._valid[k] : column + self._block] = -math.inf
        return scores

    def _blocks(self, k0: int, k1: int, dtype: torch.dtype) -> torch.Tensor:
        """Table blocks ``k0:k1`` ``(m, block, D + 1)`` in ``dtype`` (rebuilt from the data if the table's
        dtype differs)."""
        if dtype == self._table.dtype:
            return self._table[k0:k1]
        points = self._points(torch.arange(k0 * self._block, k1 * self._block, device=self.device))
        z = (points.view(k1 - k0, self._block, -1) - self._block_center[k0:k1, None]) / self._scale
        return torch.cat([z, z.pow(2).sum(2, keepdim=True)], 2).to(dtype)

    def _flush(
        self,
        exact: _Exact,
        pending: list[tuple[torch.Tensor, ...]],
        acc: torch.Tensor,
        acc_total: torch.Tensor,
        running_max: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Settle the pending candidates (``(rows, positions, streamed logits, cuts)``) and return the
        streamed sums ``(acc, acc_total)``: those still within their cut of the running maximum are
        summed exactly; those below it (found while the maximum was lower) go back into the streamed sums
        with their streamed weights ``exp(l~ - running_max)``."""
        if not pending:
            return acc, acc_total
        rows, position, value, cut = (torch.cat(v) for v in zip(*pending, strict=True))
        keep = value >= running_max[rows] - cut
        step = max(1, _REFINE_ELEMENTS // self._flat_data.shape[1])  # pairs x dims per slice
        for part in keep.nonzero().squeeze(1).split(step):
            exact.add(rows[part], self._points(position[part]), value[part])
        for part in (~keep).nonzero().squeeze(1).split(step):
            r, w = rows[part], torch.exp(value[part] - running_max[rows[part]])
            acc = acc.index_add(0, r, w[:, None] * (self._points(position[part]) - self._center))
            acc_total = acc_total.index_add(0, r, w)
        return acc, acc_total

    # -- fields ---------------------------------------------------------------------------------------
    def _flat_field(
        self, kind: str, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        post = self._posterior(x, t, y)
        mean = post.anchor + post.offset
        if kind == "data":
            return mean
        return self.path.convert(mean, x.double(), t.double(), "data", kind)

    def _flat_log_prob(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``log (1/N_y) sum_i N(x; alpha x_i, beta^2 I)`` = anchor term + ``log_sum`` - normalisers."""
        b, d = x.shape
        beta = self.path.schedule(t.double()).beta.expand(b)
        if bool((beta <= 0).any()):
            t_bad = t.expand(b)[beta <= 0][0].item()
            raise ValueError(
                f"log_prob needs beta_t > 0, but beta_t = 0 on path {self.path.name!r} at t = {t_bad:g} "
                "(the marginal is a sum of point masses there)"
            )
        post = self._posterior(x, t, y)
        counts = torch.full((b,), float(len(self)), dtype=torch.float64, device=x.device)
        if y is not None:
            sizes = torch.tensor(self._class_sizes, dtype=torch.float64, device=x.device)
            counts = torch.where(y >= 0, sizes[y.clamp_min(0)], counts)
        anchor = -0.5 * post.dist2 / beta.pow(2)
        log_norm = d * torch.log(beta) + 0.5 * d * math.log(2 * math.pi) + counts.log()
        return anchor + post.log_sum - log_norm


def _gather_rows(parts: list[tuple[torch.Tensor | None, Posterior]], x: torch.Tensor) -> Posterior:
    """One :class:`Posterior` for the rows of ``x`` from ``(rows, posterior of those rows)`` parts (rows
    None: all of them, returned as is)."""
    if len(parts) == 1 and (parts[0][0] is None or len(parts[0][0]) == x.shape[0]):
        rows, only = parts[0]
        return only if rows is None else Posterior(*(v[torch.argsort(rows)] for v in only))
    b, d = x.shape
    out = Posterior(
        x.new_empty(b, d, dtype=torch.float64),
        x.new_empty(b, d, dtype=torch.float64),
        x.new_empty(b, dtype=torch.float64),
        x.new_empty(b, dtype=torch.float64),
    )
    for rows, part in parts:
        for whole, piece in zip(out, part, strict=True):
            whole[rows] = piece
    return out


def _weighted_sum(weights: torch.Tensor, table: torch.Tensor, k: int) -> torch.Tensor:
    """``weights @ table`` (``(B, C) @ (C, F)``) summed over blocks of ``k`` columns whose partial products
    are then added by ``torch.sum``: a matmul accumulates a long sum of one-sided terms (weights >= 0) in
    sequence, with a rounding error that grows with C (measured 6e-6 relative at C = 16384, 1e-7 split)."""
    b, c = weights.shape
    g = c // k
    if g < 2:
        return weights @ table
    whole = g * k
    out = torch.bmm(weights[:, :whole].view(b, g, k).transpose(0, 1), table[:whole].view(g, k, -1)).sum(0)
    return out if whole == c else out + weights[:, whole:] @ table[whole:]


def _spatial_blocks(points: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Indices of ``points`` ``(n, D)`` in blocks of ``size`` (the last one smaller) of nearby points: k-d
    bisection, each cell split along its widest coordinate at a multiple of ``size``."""
    out: list[torch.Tensor] = []
    stack = [torch.arange(points.shape[0], device=points.device)]
    while stack:
        idx = stack.pop()
        if idx.numel() <= size:
            out.append(idx)
            continue
        cell = points[idx]
        widest = int((cell.amax(0) - cell.amin(0)).argmax())
        idx = idx[torch.argsort(cell[:, widest], stable=True)]
        left = size * math.ceil(idx.numel() / size / 2)
        stack += [idx[left:], idx[:left]]  # the left half is taken next: blocks follow the k-d order
    return out


def _candidates(
    scores: torch.Tensor, group_max: torch.Tensor, cut: torch.Tensor, start: int
) -> tuple[torch.Tensor, ...]:
    """The entries of a chunk's relative logits ``scores`` ``(units, B, width)`` (table positions ``start``
    on) with ``score >= -cut`` (``cut`` ``(units, B)``), found from the maxima ``group_max``
    ``(units, B, groups)`` of groups of ``_GROUP`` columns. Returns their rows, table positions and relative
    logits (float64), ``(P,)`` each."""
    _, b, groups = group_max.shape
    hit_block, hit_row, hit_group = (group_max >= -cut[..., None]).nonzero().unbind(1)
    flat_group = (hit_block * b + hit_row) * groups + hit_group
    values = scores.reshape(-1, _GROUP)[flat_group]  # (P_groups, _GROUP)
    cut_at = cut[hit_block, hit_row]
    pair, member = (values >= -cut_at[:, None]).nonzero().unbind(1)
    position = start + hit_block[pair] * scores.shape[2] + hit_group[pair] * _GROUP + member
    return hit_row[pair], position, values[pair, member].double()
