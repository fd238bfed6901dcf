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
_GROUP = 32
"""Columns per group in the search for competing points: a max over groups of 32 costs less than one
argmax over the chunk."""
_TARGET = 1e-5
"""Relative error of the fields that the exact refinement is sized for (from a worst-case bound)."""
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


def class_labels(labels: object, n: int, name: str = "labels") -> torch.Tensor:
    """Class labels of ``n`` data points as an int64 tensor ``(n,)`` with values ``0..K-1``, or ``ValueError``.

    Integer tensors only (a float tensor, even of whole numbers, is refused: cast it with ``.long()``).
    """
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor shaped ({n},), got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        nan = labels.dtype.is_floating_point and bool(torch.isnan(labels).any())
        raise ValueError(
            f"{name} must hold integer class labels 0..K-1, got dtype {labels.dtype}"
            + (" with NaN" if nan else "; cast with .long() if the values are whole numbers")
        )
    if labels.shape != (n,):
        raise ValueError(f"{name} must be shaped ({n},), one label per data point, got {tuple(labels.shape)}")
    if int(labels.min()) < 0:
        raise ValueError(f"{name} holds {int(labels.min())}; data labels are 0..K-1 (-1 is only for queries)")
    return labels.long()


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
        """``(1 + w) f(x|y) - w f(x)`` on a flat batch; the rows with ``y = -1`` keep the unconditional f(x)."""
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

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`\\log p_t(x)`, or :math:`\\log p_t(x|y)` per row given labels ``y``, shaped ``(B,)``."""
        flat, t, y = self._inputs(x, t, y)
        return self._checked(self._flat_log_prob(flat, t, y).to(self.dtype), "log_prob")

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

    def __init__(
        self, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, center: torch.Tensor, dtype: torch.dtype
    ):
        b, d = x.shape
        self.x, self.alpha, self.beta, self.center = x, alpha, beta, center
        self.dist2 = torch.full((b,), math.inf, dtype=torch.float64, device=x.device)
        self.anchor = torch.zeros(b, d, dtype=torch.float64, device=x.device)
        self.total = torch.zeros(b, dtype=torch.float64, device=x.device)
        self.acc = torch.zeros(b, d, dtype=torch.float64, device=x.device)
        self.ref_score = torch.full((b,), -math.inf, dtype=dtype, device=x.device)
        self.ref_dist2 = torch.full((b,), math.inf, dtype=torch.float64, device=x.device)

    def add(self, rows: torch.Tensor, points: torch.Tensor, scores: torch.Tensor) -> None:
        """Merge candidate pairs: ``rows`` ``(P,)``, their data ``points`` ``(P, D)`` float64 and streamed
        ``scores`` ``(P,)``. Each (row, point) pair must be added at most once."""
        b = self.dist2.shape[0]
        diff = self.x[rows] - self.alpha[rows, None] * points
        dist2 = torch.einsum("pd,pd->p", diff, diff)
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
        self.acc = (self.acc * keep[:, None]).index_add(0, rows, w[:, None] * (points - self.center))
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
        chunk_size: data points per streamed chunk; default ``max(64, W // B)`` (rounded to a multiple of 32)
            with ``W = 2**20`` on CPU (a cache-sized score block) and ``2**23`` on an accelerator.
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

    Algorithm and precision: one streamed pass computes every score
    :math:`s_i = (\alpha/\beta^2)(y \cdot z_i - \alpha \lVert z_i\rVert^2 / 2)`, ``z_i = x_i - c``,
    ``y = x - alpha c`` (``c`` the data mean; :math:`s_i = l_i + \lVert y\rVert^2/2\beta^2`) with one matmul
    per chunk, as in flash attention. In float32 each score carries an absolute error up to
    :math:`E \approx \kappa\,\epsilon\,(\alpha/\beta^2)(\lVert y\rVert R + \alpha R^2/2)` (R the data radius
    about c), which at small beta_t is far more than the O(1) gaps between competing points, and the
    weighted sum carries ``eps * R`` while the velocity needs ``(x - alpha E[x_data|x]) / beta``. So the
    pass also finds, per row, the candidates whose score is within a cut of the running maximum (a max over
    groups of 32 columns, then the groups above the cut) and leaves them out of the streamed sums; the
    candidates are then recomputed exactly in float64 from the direct differences
    :math:`\lVert x - \alpha x_i \rVert^2` and summed relative to the nearest one (the anchor). The cut
    ``4E + log(1 + 10 r)`` (``r`` the bound on the error the streamed part could add, relative to the
    target ``_TARGET``) keeps every point whose weight matters out of the approximate sums; a row whose
    remaining streamed weight still exceeds the bound afterwards is recomputed in float64. The posterior is
    then exact up to float64 rounding of the candidates plus a bounded error from points of negligible
    weight; ``log_prob`` uses the exact float64 distance to the anchor.
    """

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
        self.labels = None if labels is None else class_labels(labels, flat.shape[0]).to(self.device)
        if self.labels is None:
            self._order = None
            self._offsets = [0, flat.shape[0]]
            self.num_classes = None
        else:
            self.num_classes = int(self.labels.max()) + 1
            self._order = torch.argsort(self.labels, stable=True)
            counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
            self._offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
        sorted_flat = flat if self._order is None else flat[self._order]
        flat64 = sorted_flat.double()
        self._center = flat64.mean(0)
        self._class_means = (
            None
            if self.labels is None
            else [flat64[lo:hi].mean(0) for lo, hi in zip(self._offsets[:-1], self._offsets[1:], strict=True)]
        )
        centred = flat64 - self._center
        radius = float(centred.norm(dim=1).max())
        # a power-of-two scale S with |z / S| <= 1 (exact rescaling): squared norms never overflow
        self._scale = 2.0 ** math.ceil(math.log2(radius)) if radius > 0 else 1.0
        self._radius = radius
        # one table serves both matmuls: [z_i / S, |z_i / S|^2]
        z = centred / self._scale
        self._table = torch.cat([z, z.pow(2).sum(1, keepdim=True)], 1).to(self.dtype)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __repr__(self) -> str:
        classes = "" if self.num_classes is None else f", num_classes={self.num_classes}"
        return (
            f"EmpiricalMarginal(N={len(self)}, point_shape={tuple(self.point_shape)}{classes}, "
            f"path={self.path!r})"
        )

    def _chunk(self, b: int) -> int:
        if self.chunk_size:
            return self.chunk_size
        work = _WORK_ELEMENTS_CPU if self.device.type == "cpu" else _WORK_ELEMENTS_ACCELERATOR
        return max(64, work // b // _GROUP * _GROUP)

    def _points(self, idx: torch.Tensor) -> torch.Tensor:
        """Data points ``(P, D)`` in float64 at positions ``idx`` of the (class-sorted) table."""
        return (self._flat_data[idx] if self._order is None else self._flat_data[self._order[idx]]).double()

    # -- the posterior ----------------------------------------------------------------------------------
    def _posterior(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Posterior:
        """The :class:`Posterior` at the flat batch ``x`` (given the classes ``y``; -1 rows: all data)."""
        b, d = x.shape
        x64 = x.double()
        if self.dtype == torch.float64 and bool((x64.abs() > _MAX_ABS_FLOAT64).any()):
            raise ValueError(f"x holds values above {_MAX_ABS_FLOAT64:g} in magnitude; rescale the data and x")
        schedule = self.path.schedule(t.double())
        alpha, beta = (v.expand(b) for v in schedule[:2])
        blocks = [(None, 0, len(self), self._center)]
        if y is not None:
            blocks = []
            for label in torch.unique(y).tolist():
                rows = (y == label).nonzero().squeeze(1)
                if label < 0:
                    blocks.append((rows, 0, len(self), self._center))
                    continue
                lo, hi = self._offsets[label], self._offsets[label + 1]
                if lo == hi:
                    raise ValueError(f"y asks for class {label}, which has no data points")
                blocks.append((rows, lo, hi, self._class_means[label]))
        out = Posterior(
            torch.empty(b, d, dtype=torch.float64, device=x.device),
            torch.empty(b, d, dtype=torch.float64, device=x.device),
            torch.empty(b, dtype=torch.float64, device=x.device),
            torch.empty(b, dtype=torch.float64, device=x.device),
        )
        for rows, lo, hi, mean in blocks:
            sel = slice(None) if rows is None else rows
            part = self._block_posterior(x64[sel], alpha[sel], beta[sel], lo, hi, mean)
            for whole, piece in zip(out, part, strict=True):
                whole[sel] = piece
        return out

    def _block_posterior(
        self,
        x: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        lo: int,
        hi: int,
        mean: torch.Tensor,
    ) -> Posterior:
        """The posterior over the table rows ``lo:hi`` (one class, or all data) at float64 queries ``x``."""
        b, d = x.shape
        anchor = torch.empty(b, d, dtype=torch.float64, device=x.device)
        offset, log_sum, dist2 = torch.empty_like(anchor), x.new_empty(b), x.new_empty(b)
        # alpha = 0 (t = 0 on linear, vp): every point is equally likely, the posterior is uniform
        flat = alpha == 0
        if bool(flat.any()):
            first = self._points(torch.tensor([lo], device=x.device))
            anchor[flat] = first
            offset[flat] = mean - first
            log_sum[flat] = math.log(hi - lo)
            dist2[flat] = x[flat].pow(2).sum(1)
        rest = (~flat).nonzero().squeeze(1)
        if rest.numel():
            part = self._stream(x[rest], alpha[rest], beta[rest], lo, hi)
            for whole, piece in zip((anchor, offset, log_sum, dist2), part, strict=True):
                whole[rest] = piece
        return Posterior(anchor, offset, log_sum, dist2)

    def _stream(
        self,
        x: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        lo: int,
        hi: int,
        dtype: torch.dtype | None = None,
    ) -> Posterior:
        """One streamed pass over the table rows ``lo:hi`` in ``dtype`` (default the marginal's) with the
        exact refinement of the competing points; rows whose error bound is still above the target are
        recomputed with a float64 pass. ``x`` float64 ``(B, D)``, ``alpha > 0``, ``beta >= 0`` ``(B,)``."""
        dtype = dtype or self.dtype
        b, d = x.shape
        s, radius = self._scale, self._radius
        y = (x - alpha[:, None] * self._center) / s  # the query about the centre, in units of S
        span = y.norm(dim=1) + alpha / 2 + 1e-300  # bounds |y.z - alpha |z|^2 / 2| / S^2 (|z / S| <= 1)
        factor = alpha / (beta * beta) * s * s  # score = factor * (y.z - alpha |z|^2 / 2) in units of S
        limit = _SCORE_LIMIT[dtype] / span
        # sharp rows: the scores would overflow; then distinct points differ by astronomically many nats,
        # the posterior is the point mass on the nearest candidates, and the streamed sums are dropped
        sharp = ~(factor <= limit)
        factor = torch.where(sharp, limit, factor)
        eps = torch.finfo(dtype).eps
        err = _KAPPA * eps * factor * span  # bound on each streamed score's error, in nats
        # error of the posterior mean, in data units, per unit of streamed (non-candidate) weight: the
        # weights' errors times the distances, and the rounding of the float sums
        per_weight = (4 * err + _KAPPA * eps) * radius
        beta_or_1 = torch.where(sharp, 1.0, beta)
        # the fields (noise, score, velocity) carry alpha / beta times the mean's error; on the path their
        # scale is about |noise| ~ sqrt(D)
        ratio = alpha * per_weight / (_TARGET * math.sqrt(d) * beta_or_1)
        # the cut below the running maximum: the score errors (so that the nearest point is a candidate)
        # plus, where the bound asks for it, the nats below which a point's weight no longer matters:
        # log(10 ratio) - log(total weight), the total weight (relative to the maximum's 1) being a
        # running lower bound. A broad posterior (large total) needs few candidates: its points' rounding
        # errors average out, and the streamed sums are accurate (see _weighted_sum)
        need = torch.where(sharp, -math.inf, torch.log(10 * ratio))
        query = torch.cat([factor[:, None] * y, (-0.5 * factor * alpha)[:, None]], 1).to(dtype)
        base_cut, need = (4 * err).to(dtype), need.to(dtype)
        lower = torch.zeros(b, dtype=dtype, device=x.device)  # a lower bound of the total weight

        exact = _Exact(x, alpha, beta, self._center, dtype)
        big_m = torch.full((b,), -math.inf, dtype=dtype, device=x.device)
        # streamed sums: sum_i w_i [z_i / S, |z_i / S|^2] and sum_i w_i (the latter not by the matmul,
        # whose accumulation of many positive terms is less accurate than torch.sum)
        acc = torch.zeros(b, d + 1, dtype=dtype, device=x.device)
        acc_total = torch.zeros(b, dtype=dtype, device=x.device)
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        n_pending = 0
        chunk = self._chunk(b)
        grad = torch.is_grad_enabled() and x.requires_grad
        floor = _EXP_FLOOR[dtype]
        for start in range(lo, hi, chunk):
            block = self._rows(start, min(start + chunk, hi), dtype)
            scores = query @ block.T  # (B, C)
            new_m, lower, cut, rows, cols, values = _candidates(scores, big_m, lower, acc_total, base_cut, need)
            # exp(s - running max) <= 1, its argument clamped where exp underflows (a slow path of exp)
            if grad:  # the same, out of place
                weights = torch.exp((scores - new_m[:, None]).clamp_min(floor))
                weights = weights.index_put((rows, cols), scores.new_zeros(()))
                rescale = torch.exp(big_m - new_m)
                acc = acc * rescale[:, None] + _weighted_sum(weights, block)
                acc_total = acc_total * rescale + weights.sum(1)
            else:
                weights = scores.sub_(new_m[:, None]).clamp_min_(floor).exp_()
                weights[rows, cols] = 0  # the candidates are summed exactly instead
                rescale = torch.exp(big_m - new_m)
                acc.mul_(rescale[:, None]).add_(_weighted_sum(weights, block))
                acc_total.mul_(rescale).add_(weights.sum(1))
            big_m = new_m
            pending.append((rows, cols + start, values))
            n_pending += rows.shape[0]
            if n_pending * d > _REFINE_ELEMENTS:
                acc, acc_total = self._flush(exact, pending, acc, acc_total, big_m - cut, big_m)
                pending, n_pending = [], 0
        acc, acc_total = self._flush(exact, pending, acc, acc_total, big_m - cut, big_m)

        # the streamed remainder, rescaled from the streamed maximum to the exact anchor's weight 1, and
        # everything summed about the centre (the streamed sums' rounding is relative to |x_i - c|)
        tie = torch.where(sharp, 0.0, _decay(exact.ref_dist2 - exact.dist2, beta))
        rest_total = acc_total.double() * tie
        total = exact.total + rest_total
        about_c = exact.acc + tie[:, None] * acc[:, :d].double() * s
        offset = about_c / total[:, None] - (exact.anchor - self._center)
        # a posteriori: the error the streamed weight may add (independent rounding errors of points
        # weighing at most exp(2 err - cut) each, plus the rounding of the float sums), against the
        # actual scale of the fields
        noise = (x - alpha[:, None] * (exact.anchor + offset)).norm(dim=1) / beta_or_1
        heaviest = torch.exp(2 * err - cut.double()).clamp_max(1.0)
        spread = 4 * err * radius * (heaviest * rest_total).sqrt() + _KAPPA * eps * radius * rest_total
        bound = alpha * spread / (total * beta_or_1 * noise.clamp_min(1.0))
        result = Posterior(exact.anchor, offset, total.log(), exact.dist2)
        redo = (~sharp & (bound > 10 * _TARGET)).nonzero().squeeze(1)
        if redo.numel() and dtype != torch.float64:
            part = self._stream(x[redo], alpha[redo], beta[redo], lo, hi, torch.float64)
            for whole, piece in zip(result, part, strict=True):
                whole[redo] = piece
        return result

    def _rows(self, start: int | torch.Tensor, stop: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Table rows ``start:stop`` (or at the positions ``start`` when ``stop`` is None) in ``dtype``,
        built from the data when that is not the table's dtype."""
        where = start if stop is None else slice(start, stop)
        if dtype == self._table.dtype:
            return self._table[where]
        idx = start if stop is None else torch.arange(start, stop, device=self.device)
        z = (self._points(idx) - self._center) / self._scale
        return torch.cat([z, z.pow(2).sum(1, keepdim=True)], 1).to(dtype)

    def _flush(
        self,
        exact: _Exact,
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        acc: torch.Tensor,
        acc_total: torch.Tensor,
        threshold: torch.Tensor,
        running_max: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Settle the pending candidates (``(rows, table positions, streamed scores)`` triples) and return
        the streamed sums ``(acc, acc_total)``: those still above ``threshold`` (the running maximum minus the cut) are
        refined exactly; those below it (found while the running maximum was lower) go back into ``acc``
        with their streamed weights ``exp(s - running_max)``."""
        if not pending:
            return acc, acc_total
        rows, idx, scores = (torch.cat(v) for v in zip(*pending, strict=True))
        keep = scores >= threshold[rows]
        if bool(keep.any()):
            exact.add(rows[keep], self._points(idx[keep]), scores[keep])
        drop = ~keep
        if bool(drop.any()):
            rows, idx = rows[drop], idx[drop]
            w = torch.exp(scores[drop] - running_max[rows])
            acc = acc.index_add(0, rows, w[:, None] * self._rows(idx, None, acc.dtype))
            acc_total = acc_total.index_add(0, rows, w)
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
            sizes = torch.tensor(self._offsets, dtype=torch.float64, device=x.device).diff()
            counts = torch.where(y >= 0, sizes[y.clamp_min(0)], counts)
        anchor = -0.5 * post.dist2 / beta.pow(2)
        log_norm = d * torch.log(beta) + 0.5 * d * math.log(2 * math.pi) + counts.log()
        return anchor + post.log_sum - log_norm


def _weighted_sum(weights: torch.Tensor, block: torch.Tensor, k: int = 256) -> torch.Tensor:
    """``weights @ block`` (``(B, C) @ (C, F)``) summed over blocks of ``k`` columns whose partial products
    are then added by ``torch.sum``: a matmul accumulates a long sum of one-sided terms (weights >= 0) in
    sequence, with a rounding error that grows with C (measured 6e-6 relative at C = 16384, 1e-7 split)."""
    b, c = weights.shape
    g = c // k
    if g < 2:
        return weights @ block
    whole = g * k
    out = torch.bmm(weights[:, :whole].view(b, g, k).transpose(0, 1), block[:whole].view(g, k, -1)).sum(0)
    return out if whole == c else out + weights[:, whole:] @ block[whole:]


def _candidates(
    scores: torch.Tensor,
    running_max: torch.Tensor,
    lower: torch.Tensor,
    streamed: torch.Tensor,
    base_cut: torch.Tensor,
    need: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The candidates of one chunk of streamed scores ``(B, C)``, from the maxima of groups of ``_GROUP``
    columns. ``lower`` is a running lower bound of the total weight ``sum_i exp(s_i - running_max)`` (each
    group counts its maximum), ``streamed`` the weight streamed so far (without the candidates).

    Returns ``(new_max, lower, cut, rows, cols, values)``: the running maximum and lower bound after this
    chunk, the cut ``base_cut + max(0, need - log(total))`` (all ``(B,)``, ``total`` the larger of the two
    lower bounds), and the entries with ``score >= new_max - cut``: rows, columns and scores (``(P,)``
    each).
    """
    b, c = scores.shape
    whole = c // _GROUP * _GROUP
    group_max = scores[:, :whole].view(b, -1, _GROUP).amax(2)
    if whole < c:
        group_max = torch.cat([group_max, scores[:, whole:].amax(1, keepdim=True)], 1)
    new_max = torch.maximum(running_max, group_max.amax(1))
    rescale = torch.exp(running_max - new_max)
    this_chunk = torch.exp(group_max - new_max[:, None]).sum(1)
    lower = lower * rescale + this_chunk
    total = torch.maximum(lower, streamed * rescale + this_chunk)
    cut = base_cut + (need - total.log()).clamp_min(0.0)
    threshold = new_max - cut
    hit_rows, hit_groups = (group_max >= threshold[:, None]).nonzero().unbind(1)
    cols = hit_groups[:, None] * _GROUP + torch.arange(_GROUP, device=scores.device)
    inside = cols < c
    cols = cols.clamp_max(c - 1)
    values = scores[hit_rows[:, None], cols]
    keep = inside & (values >= threshold[hit_rows, None])
    pair, member = keep.nonzero().unbind(1)
    return new_max, lower, cut, hit_rows[pair], cols[pair, member], values[pair, member]
