r"""Linear maps between the four parameterizations of a network on a Gaussian path.

On the path :math:`x = \alpha_t\,x_{data} + \beta_t\,\varepsilon` every parameterization is a fixed linear
combination of the two unknowns :math:`(x_{data}, \varepsilon)`:

==========  =====================================================  ========================
kind        value                                                  coefficients on (D, E)
==========  =====================================================  ========================
data        :math:`x_{data}`                                       (1, 0)
noise       :math:`\varepsilon`                                    (0, 1)
velocity    :math:`\alpha'_t x_{data} + \beta'_t \varepsilon`      (alpha', beta')
score       :math:`-\varepsilon / \beta_t`                         (0, -1) / beta
==========  =====================================================  ========================

For the marginal quantities replace ``(x_data, noise)`` by their posterior means given ``x``: every relation
is linear, so it holds for conditional and marginal fields alike. Given a value ``Q = p D + q E`` of kind
``src`` and the point ``x = alpha D + beta E`` we solve the 2x2 system for ``(D, E)`` and form ``dst``::

    det = p_src * beta - q_src * alpha
    D   = (beta * Q - q_src * x) / det,        E = (p_src * x - alpha * Q) / det
    dst = c_value * Q + c_x * x

with the score handled through ``beta * score = -E`` so that no needless ``1/beta`` appears. The twelve
directions, written out (``det_v = alpha' beta - alpha beta'``):

====================  =====================================================================================
data -> noise         ``(x - alpha D) / beta``                                singular where beta = 0
data -> velocity      ``(beta'/beta) x + (alpha' - alpha beta'/beta) D``       singular where beta = 0
data -> score         ``-(x - alpha D) / beta^2``                             singular where beta = 0
noise -> data         ``(x - beta E) / alpha``                                singular where alpha = 0
noise -> velocity     ``(alpha'/alpha) x + (beta' - alpha' beta/alpha) E``     singular where alpha = 0
noise -> score        ``-E / beta``                                           singular where beta = 0
velocity -> data      ``(beta u - beta' x) / det_v``                          singular where det_v = 0
velocity -> noise     ``(alpha' x - alpha u) / det_v``                        singular where det_v = 0
velocity -> score     ``(alpha u - alpha' x) / (beta det_v)``                 singular where beta det_v = 0
score -> data         ``(x + beta^2 s) / alpha``                              singular where alpha = 0
score -> noise        ``-beta s``                                             never singular
score -> velocity     ``(alpha'/alpha) x + (beta^2 alpha'/alpha - beta beta') s``   singular where alpha = 0
====================  =====================================================================================

``det_v`` is 1 on ``"linear"``, pi/2 on ``"vp"``, positive on ``"vp-linear"`` and ``-beta'`` on ``"ve"``: the
velocity is the best-conditioned parameterization.

Every function here is a pure function of a :class:`Schedule` ``(alpha, beta, d_alpha, d_beta)`` (what
``path.schedule(t)`` returns); nothing here knows about paths. Products that stay finite where a factor does
not are taken from the schedule's closed forms: ``beta * beta'`` (:attr:`Schedule.beta_d_beta`, finite at t =
1 on ``vp-linear`` where beta' diverges like ``1/sqrt(1 - t)``) and ``beta * det_v = alpha' beta^2 - alpha
beta beta'``. So ``score -> velocity`` and ``velocity -> score`` keep their exact finite limits there; on such
a path (:attr:`Schedule.has_product`) ``velocity -> data/noise`` are likewise taken times beta over ``beta *
det_v`` so that they do not use ``beta'`` alone (which ``vp-linear`` clamps near t = 1, see its docstring) and
agree with ``velocity -> score`` at every t (``noise = -beta * score``); ``noise -> velocity`` keeps the
path's ``beta'``, the same finite convention as its velocity target. The endpoints of the paths make some
directions singular: alpha = 0 at t = 0 (``linear``, ``vp``), beta = 0 at t = 1 (``linear``, ``vp``,
``vp-linear``). There the coefficients are infinite and :func:`convert` raises ``ValueError`` naming the
direction and the time, never returning NaN or Inf. A custom path can add singular points (alpha = t^2 also
has det_v = 0 at t = 0). Stay inside ``[eps, 1 - eps]`` (the losses and samplers do, and say so).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validate

KINDS = ("velocity", "score", "noise", "data")


class _ScheduleFields(NamedTuple):
    alpha: torch.Tensor
    beta: torch.Tensor
    d_alpha: torch.Tensor
    d_beta: torch.Tensor


class Schedule(_ScheduleFields):
    r"""``(alpha, beta, d_alpha, d_beta)`` of a path at some times, each shaped like ``t``: a named tuple.

    ``beta_d_beta`` is the product :math:`\beta_t\beta'_t = \tfrac12 d(\beta_t^2)/dt`, given in closed form
    by paths whose ``beta'`` is infinite where ``beta`` is 0 (``vp-linear`` at t = 1); otherwise
    ``beta * d_beta``.
    """

    def __new__(
        cls,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        d_alpha: torch.Tensor,
        d_beta: torch.Tensor,
        beta_d_beta: torch.Tensor | None = None,
    ) -> Schedule:
        self = super().__new__(cls, alpha, beta, d_alpha, d_beta)
        self._beta_d_beta = beta_d_beta
        return self

    @property
    def has_product(self) -> bool:
        """Whether ``beta * beta'`` has a closed form (the path's ``beta'`` diverges where ``beta = 0``)."""
        return self._beta_d_beta is not None

    @property
    def beta_d_beta(self) -> torch.Tensor:
        r""":math:`\beta_t \beta'_t`, finite wherever ``beta^2`` is differentiable."""
        return self.beta * self.d_beta if self._beta_d_beta is None else self._beta_d_beta

    @property
    def det_v(self) -> torch.Tensor:
        r""":math:`\alpha'_t\beta_t - \alpha_t\beta'_t`, the determinant of the velocity parameterization."""
        return self.d_alpha * self.beta - self.alpha * self.d_beta

    @property
    def beta_det_v(self) -> torch.Tensor:
        """``alpha' beta^2 - alpha beta beta' = beta det_v`` with the closed-form product ``beta beta'``:
        finite where ``beta'`` alone is not."""
        return self.d_alpha * self.beta**2 - self.alpha * self.beta_d_beta

    def map(self, fn) -> Schedule:
        """The schedule with ``fn`` applied to every entry (e.g. a reshape for broadcasting)."""
        product = None if self._beta_d_beta is None else fn(self._beta_d_beta)
        return Schedule(*(fn(v) for v in self), beta_d_beta=product)


def _zero_like(v: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(v)


def conversion_coefficients(schedule: Schedule, src: str, dst: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``(c_value, c_x)``, shaped like the schedule, with ``dst = c_value * value + c_x * x``.

    The formulas of the module docstring's table. Unchecked: where a direction is singular the coefficients
    are infinite or NaN (:func:`check_coefficients` turns that into a ``ValueError``).
    """
    _validate.choice(src, KINDS, "src")
    _validate.choice(dst, KINDS, "dst")
    a, b, da, db = schedule
    one = torch.ones_like(a)
    if src == dst:
        return one, _zero_like(a)
    if src == "score":  # score = -noise / beta: go through the noise
        if dst == "noise":
            return -b, _zero_like(a)
        if dst == "velocity":  # (alpha'/alpha) x + (beta^2 alpha'/alpha - beta beta') s
            return b**2 * da / a - schedule.beta_d_beta, da / a
        c_value, c_x = conversion_coefficients(schedule, "noise", dst)
        return -b * c_value, c_x
    if src == "velocity":
        if dst == "score":  # (alpha u - alpha' x) / (beta det_v)
            bdet = schedule.beta_det_v
            return a / bdet, -da / bdet
        if schedule.has_product:  # beta' diverges somewhere: both sides times beta, with beta beta' exact
            bdet = schedule.beta_det_v
            if dst == "data":  # (beta^2 u - beta beta' x) / (beta det_v)
                return b**2 / bdet, -schedule.beta_d_beta / bdet
            return -a * b / bdet, da * b / bdet  # noise: beta (alpha' x - alpha u) / (beta det_v)
        det = schedule.det_v
        if dst == "data":  # (beta u - beta' x) / det_v
            return b / det, -db / det
        return -a / det, da / det  # noise: (alpha' x - alpha u) / det_v
    if src == "data":
        if dst == "noise":  # (x - alpha D) / beta
            return -a / b, 1 / b
        if dst == "score":  # -(x - alpha D) / beta^2
            return a / b**2, -1 / b**2
        ratio = schedule.beta_d_beta / b**2  # beta'/beta
        return da - a * ratio, ratio  # velocity: (beta'/beta) x + (alpha' - alpha beta'/beta) D
    # src == "noise"
    if dst == "data":  # (x - beta E) / alpha
        return -b / a, 1 / a
    if dst == "score":  # -E / beta
        return -1 / b, _zero_like(a)
    return db - da * b / a, da / a  # velocity: (alpha'/alpha) x + (beta' - alpha' beta/alpha) E


def check_coefficients(
    c_value: torch.Tensor,
    c_x: torch.Tensor,
    schedule: Schedule,
    src: str,
    dst: str,
    where: str = "",
    t: torch.Tensor | None = None,
) -> None:
    """``ValueError`` naming the direction (and ``t`` if given) where a coefficient is not finite.

    A value check: skipped inside ``flowscore.validation(False)``.
    """
    if not _validate.value_checks_enabled():
        return
    bad = ~(torch.isfinite(c_value) & torch.isfinite(c_x))
    if not bool(bad.any()):
        return
    first = lambda v: v.expand_as(bad)[bad].flatten()[0].item()  # noqa: E731
    at = f" at t = {first(t):g}" if t is not None else ""
    raise ValueError(
        f"convert {src} -> {dst} is singular{where}{at} (alpha_t = {first(schedule.alpha):g}, "
        f"beta_t = {first(schedule.beta):g}); evaluate at t in [eps, 1 - eps] instead"
    )


def convert(value: torch.Tensor, x: torch.Tensor, schedule: Schedule, src: str, dst: str) -> torch.Tensor:
    """Map a prediction ``value`` of kind ``src`` at ``x`` to the kind ``dst``, given the path's schedule.

    Args:
        value: ``(B, *dims)`` prediction of kind ``src`` (velocity, score, noise or data).
        x: ``(B, *dims)`` point on the path where ``value` was predicted.
        schedule: the path's :class:`Schedule` at the times of ``x``, entries 0-dim or ``(B,)``.
        src, dst: one of ``"velocity"``, ``"score"``, ``"noise"``, ``"data"``.

    Returns:
        ``(B, *dims)`` value of kind ``dst``. Exact for conditional and marginal fields alike (the maps are
        linear). Raises ``ValueError`` where the direction is singular (table in the module docstring);
        never returns NaN or Inf for finite inputs. ``path.convert(value, x, t, src, dst)`` is the same with
        the schedule taken from the path at ``t``.
    """
    x = _validate.batch(x, "x")
    value = _validate.tensor(value, "value")
    _validate.same_shape(x, value, "x", "value")
    _validate.same_kind(x, value, "x", "value")
    c_value, c_x = conversion_coefficients(schedule, src, dst)
    if src == dst:
        return value
    check_coefficients(c_value, c_x, schedule, src, dst)
    return _validate.expand(c_value, x) * value + _validate.expand(c_x, x) * x
