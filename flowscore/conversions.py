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
velocity is the best-conditioned parameterization. The endpoints of the paths make some directions
singular: alpha = 0 at t = 0 (``linear``, ``vp``), beta = 0 at t = 1 (``linear``, ``vp``, ``vp-linear``).
There the coefficients are infinite and :func:`convert` raises ``ValueError`` naming the direction and the
time, never returning NaN or Inf. A custom path can add singular points (alpha = t^2 also has det_v = 0 at
t = 0). Stay inside ``[eps, 1 - eps]`` (the losses and samplers do, and say so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import _validate

if TYPE_CHECKING:
    from .paths import GaussianPath

KINDS = ("velocity", "score", "noise", "data")


def _coefficients_on_data_noise(kind: str, d_alpha: torch.Tensor, d_beta: torch.Tensor):
    """(p, q) with ``kind = p * x_data + q * noise`` (the score scaled by beta)."""
    one, zero = torch.ones_like(d_alpha), torch.zeros_like(d_alpha)
    if kind == "data":
        return one, zero
    if kind == "noise":
        return zero, one
    if kind == "velocity":
        return d_alpha, d_beta
    return zero, -one  # beta * score = -noise


def conversion_coefficients(
    path: GaussianPath, t: torch.Tensor, src: str, dst: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``(c_value, c_x)``, shaped like ``t``, with ``dst = c_value * value + c_x * x``.

    Raises ``ValueError`` where the direction is singular (see the module docstring).
    """
    _validate.choice(src, KINDS, "src")
    _validate.choice(dst, KINDS, "dst")
    if src == dst:
        return torch.ones_like(t), torch.zeros_like(t)
    alpha, beta, d_alpha, d_beta = path.schedule(t)
    p_s, q_s = _coefficients_on_data_noise(src, d_alpha, d_beta)
    p_d, q_d = _coefficients_on_data_noise(dst, d_alpha, d_beta)
    if {src, dst} == {"noise", "score"}:  # noise = -beta * score: no need to solve for x_data
        c_value = -1 / beta if dst == "score" else -beta
        c_x = torch.zeros_like(beta)
    else:
        src_scale = beta if src == "score" else torch.ones_like(beta)
        divisor = p_s * beta - q_s * alpha
        if dst == "score":
            divisor = divisor * beta
        c_value = src_scale * (p_d * beta - q_d * alpha) / divisor
        c_x = (q_d * p_s - p_d * q_s) / divisor
    if _validate.value_checks_enabled():
        bad = ~(torch.isfinite(c_value) & torch.isfinite(c_x))
        if bool(bad.any()):
            t_bad = t.expand_as(bad)[bad].flatten()[0].item()
            a, b = alpha.expand_as(bad)[bad].flatten()[0].item(), beta.expand_as(bad)[bad].flatten()[0].item()
            raise ValueError(
                f"convert {src} -> {dst} is singular on path {path.name!r} at t = {t_bad:g} "
                f"(alpha_t = {a:g}, beta_t = {b:g}); evaluate at t in [eps, 1 - eps] instead"
            )
    return c_value, c_x


def convert(
    path: GaussianPath,
    value: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor | float,
    src: str,
    dst: str,
) -> torch.Tensor:
    """Map a prediction ``value`` of kind ``src`` at ``(x, t)`` to the kind ``dst``.

    Args:
        path: the Gaussian path the prediction lives on.
        value: ``(B, *dims)`` prediction of kind ``src`` (velocity, score, noise or data).
        x: ``(B, *dims)`` point on the path where ``value`` was predicted.
        t: ``(B,)``, 0-dim or float time in [0, 1].
        src, dst: one of ``"velocity"``, ``"score"``, ``"noise"``, ``"data"``.

    Returns:
        ``(B, *dims)`` value of kind ``dst``. Exact for conditional and marginal fields alike (the maps are
        linear). Raises ``ValueError`` at a time where the direction is singular (table in the module
        docstring); never returns NaN or Inf for finite inputs.
    """
    x = _validate.batch(x, "x")
    value = _validate.tensor(value, "value")
    _validate.same_shape(x, value, "x", "value")
    _validate.same_kind(x, value, "x", "value")
    t = _validate.time(t, like=x)
    if src == dst:
        _validate.choice(src, KINDS, "src")
        return value
    c_value, c_x = conversion_coefficients(path, t, src, dst)
    return _validate.expand(c_value, x) * value + _validate.expand(c_x, x) * x
