r"""Schrödinger-bridge conditional flow matching (SB-CFM, Tong et al. 2023): the Brownian-bridge path between
a source point and a data point, and its entropic-OT pairing at :math:`\epsilon = 2\sigma^2`.

Time runs as everywhere in flowscore: t = 0 at the source, t = 1 at the data (torchcfm's x0 = source, x1 =
data: the same direction). Given a pair :math:`(x_s, x_d)` and a standard normal ``noise`` :math:`z`:

.. math::  x_t = \mu_t + \sigma\sqrt{t(1-t)}\,z, \qquad \mu_t = t\,x_d + (1-t)\,x_s,

the marginal at t of a Brownian motion with diffusion :math:`\sigma` started at :math:`x_s` and pinned at
:math:`x_d` at t = 1 (a Brownian bridge). Its time derivative at fixed :math:`z` is the conditional velocity
target

.. math::  u_t = x_d - x_s + \sigma\,\frac{1 - 2t}{2\sqrt{t(1-t)}}\,z
         = x_d - x_s + \frac{1 - 2t}{2t(1-t)}\,(x_t - \mu_t),

(torchcfm's ``SchrodingerBridgeConditionalFlowMatcher.compute_conditional_flow``, Tong et al. eq. 21). The
noise form is the one computed here: finite on (0, 1). At t = 0 and t = 1 the bridge is pinned
(:math:`x_t = \mu_t`) and the noise term's coefficient diverges like :math:`1/\sqrt{t}`; there the target is
its mean over the noise, :math:`x_d - x_s` (the value torchcfm's regularised denominator also gives), so it is
finite on all of [0, 1].

The pairs come from the entropic OT plan between the source and data batches with the ABSOLUTE
regularisation :math:`\epsilon = 2\sigma^2` (:func:`sb_couple`): the static Schrödinger bridge between the
two empirical laws for the Brownian reference of diffusion :math:`\sigma`, whose conditional paths given the
endpoints are exactly these bridges. Regressing a network on :math:`u_t` at :math:`x_t` learns the drift of
the probability-flow ODE of that bridge's marginals (docs/theory.md, "Schrödinger-bridge CFM").
"""

from __future__ import annotations

import torch

from . import _validate
from .couplings import couple


def sb_epsilon(sigma: float) -> float:
    r"""The entropic regularisation :math:`\epsilon = 2\sigma^2` of SB-CFM (absolute: in units of squared
    distance), for ``sigma > 0``."""
    sigma = _validate.number(sigma, "sigma", 0.0, low_open=True)
    return 2 * sigma * sigma


def sb_couple(
    x_source: torch.Tensor,
    x_data: torch.Tensor,
    sigma: float,
    *,
    y: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``x_source`` reordered to go with ``x_data``: for each data row i, a source row drawn from row i of the
    entropic OT plan at the absolute ``epsilon = 2 sigma^2`` (:func:`flowscore.couplings.entropic_plan`).

    ``x_source``, ``x_data``: ``(B, *dims)``; ``y``: ``(B,)`` labels (pairs within a label); ``generator``
    draws the pairs. As ``sigma -> 0`` the plan tends to exact minibatch OT (``coupling="ot"``).
    """
    reg = sb_epsilon(sigma)
    return couple(x_data, x_source, "sinkhorn", reg=reg, reg_absolute=True, y=y, generator=generator)


def bridge_std(t: torch.Tensor, sigma: float) -> torch.Tensor:
    r""":math:`\sigma\sqrt{t(1-t)}`, the standard deviation of the Brownian bridge at t, shaped like ``t``."""
    return sigma * torch.sqrt(t * (1 - t))


def sb_cfm_target(
    x_source: torch.Tensor,
    x_data: torch.Tensor,
    t: torch.Tensor | float,
    noise: torch.Tensor,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(x, target)``: the Brownian-bridge sample between each pair and its conditional velocity target.

    ``x = t x_data + (1 - t) x_source + sigma sqrt(t (1 - t)) noise`` and
    ``target = x_data - x_source + sigma (1 - 2t) / (2 sqrt(t (1 - t))) noise`` (module docstring), with the
    target ``x_data - x_source`` at t = 0 and t = 1 where the bridge is pinned.

    Args:
        x_source: ``(B, *dims)`` source points (t = 0), already paired with ``x_data`` (:func:`sb_couple`).
        x_data: ``(B, *dims)`` data points (t = 1).
        t: ``(B,)``, 0-dim or a float in [0, 1].
        noise: ``(B, *dims)`` standard normal draws.
        sigma: the bridge's diffusion, >= 0 (0: the straight line of CFM, target ``x_data - x_source``).

    Both outputs are ``(B, *dims)`` in the dtype of ``x_data``, finite for finite inputs on all of [0, 1].
    """
    x_data = _validate.batch(x_data, "x_data")
    for name, other in (("x_source", x_source), ("noise", noise)):
        other = _validate.tensor(other, name)
        _validate.same_shape(x_data, other, "x_data", name)
        _validate.same_kind(x_data, other, "x_data", name)
    sigma = _validate.number(sigma, "sigma", 0.0)
    t = _validate.time(t, like=x_data)
    std = bridge_std(t, sigma)
    inside = (t > 0) & (t < 1)
    root = torch.sqrt(t * (1 - t)).clamp_min(torch.finfo(t.dtype).tiny)  # the clamp only acts at t = 0, 1
    rate = torch.where(inside, (1 - 2 * t) / (2 * root), 0.0)
    t_, std_, rate_ = (_validate.expand(v, x_data) for v in (t, std, sigma * rate))
    x = t_ * x_data + (1 - t_) * x_source + std_ * noise
    target = x_data - x_source + rate_ * noise
    return x, target


__all__ = ["bridge_std", "sb_couple", "sb_cfm_target", "sb_epsilon"]
