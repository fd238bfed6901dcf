r"""Exact marginal fields of a Gaussian path started from an empirical (finite) data set.

For data points :math:`x_1, \dots, x_N` the marginal at time t is the mixture
:math:`p_t(x) = \frac1N \sum_i N(x; \alpha_t x_i, \beta_t^2 I)` and every marginal field is a posterior
average over the data, with weights

.. math::  w_i(x) = \mathrm{softmax}_i\big(-\lVert x - \alpha_t x_i \rVert^2 / (2\beta_t^2)\big).

:class:`EmpiricalMarginal` computes :math:`E[x_{data}|x] = \sum_i w_i x_i` streamed over chunks of the data
with a running log-sum-exp (as in flash attention), so memory is O(B x chunk), never O(B x N); the velocity,
score and noise follow from it by the linear maps of :mod:`flowscore.conversions`.

>>> m = EmpiricalMarginal(data, get_path("linear"))
>>> m.velocity(x, t)      # u_t(x) = E[u_t(x | x_data) | x]
>>> m.score(x, t)         # grad_x log p_t(x)
>>> m.log_prob(x, t)      # log p_t(x), shaped (B,)
"""

from __future__ import annotations

import math

import torch

from . import _validate
from .conversions import KINDS
from .paths import GaussianPath, get_path

# default B x chunk: about 1M scores per chunk on CPU (4 MiB in float32, cache sized: measured fastest),
# 8M on an accelerator (fewer, larger kernels)
_WORK_ELEMENTS_CPU = 1 << 20
_WORK_ELEMENTS_ACCELERATOR = 1 << 23


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
    ``(B, D)`` batch) and :meth:`_flat_log_prob`; this class checks the inputs and restores the shapes.
    """

    path: GaussianPath
    point_shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def _inputs(self, x: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        x = _validate.tensor(x, "x")
        flat = flat_batch(x, self.point_shape)
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(
                f"x is {x.dtype} on {x.device} but the marginal is {self.dtype} on {self.device}; "
                "they must match"
            )
        t = _validate.time(t, like=x)
        return flat, t

    def field(self, kind: str, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The marginal field of ``kind`` (velocity, score, noise or data) at ``x``, shaped ``(B, *dims)``.

        ``data`` is :math:`E[x_{data}|x_t = x]`, ``noise`` is :math:`E[\\varepsilon|x_t = x]`, ``velocity`` is
        :math:`E[\\alpha'_t x_{data} + \\beta'_t \\varepsilon | x_t = x]`, ``score`` is
        :math:`\\nabla_x \\log p_t(x) = -E[\\varepsilon|x]/\\beta_t`.
        """
        _validate.choice(kind, KINDS, "kind")
        flat, t = self._inputs(x, t)
        return self._flat_field(kind, flat, t).reshape(x.shape)

    def posterior_mean(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """:math:`E[x_{data} | x_t = x]`, shaped ``(B, *dims)``."""
        return self.field("data", x, t)

    def noise(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """:math:`E[\\varepsilon | x_t = x]`, shaped ``(B, *dims)``."""
        return self.field("noise", x, t)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Marginal velocity :math:`\\alpha'_t E[x_{data}|x] + \\beta'_t E[\\varepsilon|x]`, (B, *dims)."""
        return self.field("velocity", x, t)

    def score(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Marginal score :math:`\\nabla_x \\log p_t(x)`, shaped ``(B, *dims)``."""
        return self.field("score", x, t)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """:math:`\\log p_t(x)`, shaped ``(B,)``."""
        flat, t = self._inputs(x, t)
        return self._flat_log_prob(flat, t)

    def _flat_field(self, kind: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _flat_log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _streamed_posterior(
    query: torch.Tensor, table: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of a streamed softmax-weighted average over the rows of ``table``, flash-attention style.

    With scores ``S = query @ table.T`` (``(B, N)``, never formed whole) returns ``(mean, log_sum, idx)``:
    ``idx`` (``(B,)``, long) is the argmax of each row of ``S``, ``mean = softmax(S) @ table`` (``(B, C)``)
    and ``log_sum = log sum_i exp(S[:, i] - S[:, idx])`` (``(B,)``). Memory O(B x chunk). Per chunk: one
    matmul for the scores, one max pass (argmax), one fused softmax, one matmul for the weighted sum; the
    chunk is merged into running ``(M, L, acc)`` (max, sum of ``exp(S - M)``, weighted sum) with a rescale by
    ``exp(M_old - M_new)`` that touches only ``(B, C)`` numbers. The chunk's normaliser is read off the
    softmax at its argmax (``1 / Z``), so no extra pass is needed. When one point carries all the weight
    the result is that point exactly.
    """
    b = query.shape[0]
    rows = torch.arange(b, device=query.device)
    big_m = torch.full((b,), -math.inf, dtype=query.dtype, device=query.device)
    big_l = torch.zeros(b, dtype=query.dtype, device=query.device)
    acc = torch.zeros(b, table.shape[1], dtype=query.dtype, device=query.device)
    idx = torch.zeros(b, dtype=torch.long, device=query.device)
    for start in range(0, table.shape[0], chunk):
        block = table[start : start + chunk]
        scores = query @ block.T
        block_max, block_idx = scores.max(dim=1)
        weights = torch.softmax(scores, dim=1)
        block_z = weights[rows, block_idx].reciprocal()  # softmax at the argmax is exactly 1 / Z
        new_m = torch.maximum(big_m, block_max)
        old_scale, block_scale = torch.exp(big_m - new_m), torch.exp(block_max - new_m) * block_z
        acc.mul_(old_scale.unsqueeze(1)).add_((weights @ block).mul_(block_scale.unsqueeze(1)))
        big_l = big_l * old_scale + block_scale
        idx = torch.where(block_max > big_m, block_idx + start, idx)
        big_m = new_m
    return acc / big_l.unsqueeze(1), big_l.log(), idx


class EmpiricalMarginal(Marginal):
    r"""Exact marginal fields of ``path`` started from the empirical distribution of ``data``.

    Args:
        data: ``(N, *dims)`` float tensor of data points (finite, N >= 1).
        path: a :class:`~flowscore.paths.GaussianPath` or its name.
        chunk_size: data points per streamed chunk; default ``max(64, W // B)`` with ``W = 2**20`` on CPU
            (a cache-sized score block) and ``2**23`` on an accelerator.
        dtype: compute dtype (``torch.float32`` or ``torch.float64``); default the dtype of ``data``.
            Queries ``x`` must have this dtype and the device of ``data``.

    All fields are exact for the finite data set: with the weights
    :math:`w_i = \mathrm{softmax}_i(-\lVert x - \alpha_t x_i\rVert^2 / 2\beta_t^2)`,
    ``posterior_mean = sum_i w_i x_i`` and ``velocity``, ``score``, ``noise`` are
    ``path.convert(posterior_mean, x, t, "data", kind)``. Those conversions divide by beta_t, so at a time
    where beta_t = 0 (t = 1 on ``linear``, ``vp``, ``vp-linear``) they raise the ``ValueError`` of
    :func:`~flowscore.conversions.convert`; ``posterior_mean`` there is the limit beta -> 0, the data point
    nearest to ``x / alpha_t``. ``log_prob`` needs beta_t > 0 (``ValueError`` otherwise).

    Precision: the scores use ``||x - a x_i||^2 = ||x||^2 - 2 a x.x_i + a^2 ||x_i||^2`` (one matmul per chunk,
    on data centred at their mean, the per-query ``||x||^2`` dropped since the softmax ignores it). The
    posterior mean is recovered relative to the most likely data point (the anchor) and the final linear
    combination, where ``x - alpha_t E[x_data|x]`` cancels as t -> 1, is done in float64; ``log_prob`` uses
    the exact float64 distance to the anchor. Errors left in float32 come from the relative weights of
    competing data points: each score carries an absolute error of about ``6e-8 alpha |x_c|^2 / beta^2``
    (``x_c = x - alpha * mean(data)``), which matters only when several points lie within a few beta_t of
    ``x / alpha_t`` at small beta_t. Measured on clustered 3-D data (tests): <= 1e-5 relative error
    except around beta_t ~ 0.01-0.1, where it reaches ~1e-4 (1.4e-3 for the score at beta_t = 0.01); pass
    ``dtype=torch.float64`` when that matters.
    """

    def __init__(
        self,
        data: torch.Tensor,
        path: GaussianPath | str,
        chunk_size: int | None = None,
        dtype: torch.dtype | None = None,
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
        self._flat_data = flat
        self._center = flat.mean(0)
        centred = flat - self._center
        # one table serves both matmuls: [x_i - c, ||x_i - c||^2]
        self._table = torch.cat([centred, centred.pow(2).sum(1, keepdim=True)], 1)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __repr__(self) -> str:
        return f"EmpiricalMarginal(N={len(self)}, point_shape={tuple(self.point_shape)}, path={self.path!r})"

    def _chunk(self, b: int) -> int:
        work = _WORK_ELEMENTS_CPU if self.device.type == "cpu" else _WORK_ELEMENTS_ACCELERATOR
        return self.chunk_size or max(64, work // b)

    def _posterior(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean_offset, log_weight_sum, idx)`` of the posterior over the data at the flat batch ``x``.

        ``idx`` (``(B,)``) is the most likely data point (the anchor ``a``); ``mean_offset`` (``(B, D)``,
        float64) is ``E[x_data|x] - a`` and ``log_weight_sum`` (``(B,)``, float64) is
        ``log sum_i exp(l_i - l_a)`` with ``l_i = -||x - alpha x_i||^2 / (2 beta^2)``. Where beta = 0 the
        posterior is the point mass at the anchor (offset 0, log-sum 0).
        """
        b, d = x.shape
        alpha, beta = (per_row(v, b) for v in self.path.schedule(t)[:2])
        singular = beta == 0
        inv_var = 1 / torch.where(singular, torch.ones_like(beta), beta).pow(2)  # any scale keeps the argmax
        query = torch.cat([x - alpha * self._center, -0.5 * alpha], 1).mul_(alpha * inv_var)
        mean, log_sum, idx = _streamed_posterior(query, self._table, self._chunk(b))
        offset = (mean[:, :d] - self._table[idx, :d]).double()
        log_sum = log_sum.double()
        return offset.masked_fill(singular, 0.0), log_sum.masked_fill(singular.squeeze(1), 0.0), idx

    def _flat_field(self, kind: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        offset, _, idx = self._posterior(x, t)
        mean = self._flat_data[idx].double() + offset
        if kind == "data":
            return mean.to(self.dtype)
        return self.path.convert(mean, x.double(), t.double(), "data", kind).to(self.dtype)

    def _flat_log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log (1/N) sum_i N(x; alpha x_i, beta^2 I)`` = anchor term + ``log_weight_sum`` - normalisers."""
        b, d = x.shape
        t64 = t.double()
        alpha, beta = (per_row(v, b) for v in self.path.schedule(t64)[:2])
        if bool((beta <= 0).any()):
            t_bad = t.expand(b)[(beta <= 0).squeeze(1)][0].item()
            raise ValueError(
                f"log_prob needs beta_t > 0, but beta_t = 0 on path {self.path.name!r} at t = {t_bad:g} "
                "(the marginal is a sum of point masses there)"
            )
        _, log_sum, idx = self._posterior(x, t)
        residual = x.double() - alpha * self._flat_data[idx].double()
        anchor = -0.5 * (residual / beta).pow(2).sum(1)
        log_norm = d * torch.log(beta.squeeze(1)) + 0.5 * d * math.log(2 * math.pi) + math.log(len(self))
        return (anchor + log_sum - log_norm).to(self.dtype)
