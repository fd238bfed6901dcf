r"""Preconditioning of a network, for any Gaussian path and any prediction.

A network ``F`` is wrapped so that the model predicts ``kind`` (velocity, score, noise or data) as

.. math::  v(x, t) = c_\mathrm{out}(t)\,F(c_\mathrm{in}(t)\,x,\ t), \qquad
           \mathrm{model}(x, t) = \mathrm{convert}_{velocity \to kind}(v(x, t), x, t),

with ``V = alpha^2 sigma_data^2 + beta^2`` (the variance of ``x`` for data of per-coordinate standard
deviation ``sigma_data``):

* ``c_in = 1 / sqrt(V)``: ``F``'s input has unit variance at every ``t``;
* ``c_out = sqrt(alpha'^2 sigma_data^2 + beta'^2)``, the standard deviation of the conditional velocity
  ``alpha' x_data + beta' noise``: ``F``'s regression target has unit variance at every ``t`` (EDM's
  input and output scalings, Karras et al. 2022, appendix B.6, on any path);
* the conversion out of the velocity (:func:`flowscore.conversions.conversion_coefficients`) is finite on
  the whole of ``[0, 1]`` for the noise and data predictions: it never divides by ``alpha``.

Why the network is always a velocity network: a network that outputs a noise (or score) prediction
directly has its error multiplied by ``beta / alpha`` on the way to the data prediction and the velocity,
which is what made unpreconditioned noise and score models sample badly near the noise end. EDM's skip
connection ``c_skip x`` (the best linear predictor of the target) removes that for the data prediction, but
its residual target learned far more slowly than the plain scaled velocity on clustered data
(docs/theory.md, "Preconditioning"), so flowscore takes no skip and parameterises
every prediction through the velocity. For a fixed objective and weighting the four predictions are then
the same model trained on the same loss; the prediction decides only what the model returns.

Endpoints: ``c_in`` is finite on ``[0, 1]`` (``V > 0``). On a path whose ``beta'`` diverges where
``beta = 0`` and that gives ``beta beta'`` in closed form (``vp-linear`` at ``t = 1``), ``c_out`` uses
``beta beta' / max(beta, BETA_FLOOR)``: the exact ``beta'`` wherever ``beta >= BETA_FLOOR`` (not the path's
clamped ``d_beta``), bounded where ``beta`` is smaller. On any other path it uses ``beta'`` bounded by
``D_BETA_CAP`` (a custom path whose ``beta'`` diverges: finite, never NaN). The score diverges where
``beta = 0``: a score model's conversion is taken at ``t`` clamped to at most ``1 - T_CLAMP``.

The time input of ``F`` is ``t`` itself (every path's ``t`` is in ``[0, 1]``, which is what the built-in
models' time embeddings expect).

``network_path="linear"`` (the trainer's default, :attr:`flowscore.TrainConfig.network_path`) runs every
path through the *linear* path's network at the time of equal log-SNR (docs/theory.md section 16, "Parity
of objectives"): with ``k = alpha + beta`` and ``tau = alpha / k`` the path's ``x`` is ``k`` times a point
``x / k`` of ``linear`` at time ``tau``, so

.. math::  v_{lin} = c_{out,lin}\,F(c_{in,lin}(\tau)\,x/k,\ \tau),\quad
           \hat x = x/k + (1 - \tau)\,v_{lin},\quad \hat\varepsilon = x/k - \tau\,v_{lin},

are the data and noise predictions, and every kind is read off them on the path: velocity
``alpha' x_hat + beta' noise_hat``, data ``x_hat``, noise ``noise_hat``, score ``-noise_hat / beta``. The
velocity is then ``(k'/k) x + k tau' v_lin(x / k, tau)``: with matched log-SNR times and the
"linear-velocity" weighting, training any path is linear cfm's training problem for ``F``. On ``linear``
itself (``k = 1``, ``tau = t``) both forms are the same model and the own one is used. ``"own"`` (the
default of this class, and of runs stored before the option existed) is the path's own scalings at its own
``t`` above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import _validate
from .conditioning import call_model
from .conversions import KINDS, Schedule, conversion_coefficients
from .paths import GaussianPath, get_path

if TYPE_CHECKING:
    from .config import TrainConfig

BETA_FLOOR = 1e-4
"""Lower clamp on ``beta`` in ``c_out`` where ``beta'`` diverges (``vp-linear`` at t = 1)."""
D_BETA_CAP = 1 / BETA_FLOOR
"""Bound on ``|beta'|`` in ``c_out`` on a path without a closed-form ``beta beta'`` (a custom path whose
``beta'`` diverges; NaN or Inf there counts as the bound)."""
T_CLAMP = 1e-6
"""A score model's conversion is taken at ``min(t, 1 - T_CLAMP)`` (the score diverges where beta = 0)."""
NETWORK_PATHS = ("own", "linear")
"""``Preconditioned(network_path=)``: the path's own scalings at ``t``, or the linear path's network at the
time of equal log-SNR (module docstring)."""


def scalings(schedule: Schedule, sigma_data: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_in, c_out)``, each shaped like the schedule's entries (formulas in the module docstring).

    ``sigma_data > 0`` is the data's per-coordinate standard deviation (the trainer scales vector data to
    ``TrainConfig.data_std`` and passes it here).
    """
    a, b = schedule.alpha, schedule.beta
    s2 = sigma_data**2
    c_in = (a**2 * s2 + b**2).rsqrt()
    c_out = (schedule.d_alpha**2 * s2 + bounded_d_beta(schedule) ** 2).sqrt()
    return c_in, c_out


def bounded_d_beta(schedule: Schedule) -> torch.Tensor:
    """``beta'`` kept finite, shaped like the schedule's entries: on a path with a closed-form ``beta beta'``
    (``vp-linear``) ``beta beta' / max(beta, BETA_FLOOR)``, else ``beta'`` bounded by ``D_BETA_CAP`` (NaN
    or Inf counts as the bound)."""
    if schedule.has_product:  # beta' diverges where beta = 0 (vp-linear): beta beta' / clamped beta
        return schedule.beta_d_beta / schedule.beta.clamp(min=BETA_FLOOR)
    d_beta = torch.nan_to_num(schedule.d_beta, nan=D_BETA_CAP, posinf=D_BETA_CAP, neginf=-D_BETA_CAP)
    return d_beta.clamp(-D_BETA_CAP, D_BETA_CAP)


class Preconditioned(nn.Module):
    """``model(x, t[, y]) = convert(c_out net(c_in x, t[, y]))`` from the velocity to ``prediction``: a
    network preconditioned for a path and a prediction (module docstring).

    ``net``: any module called as ``net(x, t)`` (or ``net(x, t, y)`` with labels) returning a tensor
    shaped like ``x`` (``(B, *dims)``, ``t`` ``(B,)``). ``path``: a path or its name. ``prediction``: what
    the wrapped model predicts, read by :func:`flowscore.sample` (``model.prediction``). ``sigma_data``:
    the data's per-coordinate standard deviation. ``network_path``: ``"own"`` (the path's scalings at its
    own ``t``) or ``"linear"`` (the linear path's network at the time of equal log-SNR, the trainer's
    default; module docstring). The wrapper adds no weights: its state dict is the network's, under the
    prefix ``net.``.

    The trainer applies it to the built-in models by default (``TrainConfig.precondition``); wrap your own
    network with it to get the same scalings::

        model = fs.Preconditioned(MyNet(), "linear", prediction="noise")
    """

    def __init__(
        self,
        net: nn.Module,
        path: GaussianPath | str,
        prediction: str = "velocity",
        sigma_data: float = 1.0,
        network_path: str = "own",
    ):
        super().__init__()
        if not callable(net):
            raise ValueError(f"net must be callable as net(x, t), got {type(net).__name__}")
        self.net = net
        self.path = get_path(path)
        self.prediction = _validate.choice(prediction, KINDS, "prediction")
        self.sigma_data = _validate.number(sigma_data, "sigma_data", low=0.0, low_open=True)
        self.network_path = _validate.choice(network_path, NETWORK_PATHS, "network_path")
        self._linear = get_path("linear")
        self._through_linear = network_path == "linear" and self.path != self._linear

    @property
    def wrapped_network(self) -> nn.Module:
        """The network ``F`` (read by :func:`flowscore.models.builtin_config`)."""
        return self.net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self._through_linear:
            return self._through_linear_network(x, t, y)
        shape = (-1,) + (1,) * (x.dim() - 1)
        t64 = t.detach().to(torch.float64)
        c_in, c_out = (
            c.to(x.dtype).reshape(shape) for c in scalings(self.path._schedule(t64), self.sigma_data)
        )
        velocity = c_out * call_model(self.net, c_in * x, t, y)
        if self.prediction == "velocity":
            return velocity
        if self.prediction == "score":
            t64 = t64.clamp(max=1.0 - T_CLAMP)
        c_value, c_x = conversion_coefficients(self.path._schedule(t64), "velocity", self.prediction)
        return c_value.to(x.dtype).reshape(shape) * velocity + c_x.to(x.dtype).reshape(shape) * x

    def _through_linear_network(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``network_path="linear"``: the prediction read off linear's data and noise predictions at the
        matched time ``tau = alpha / (alpha + beta)`` and point ``x / (alpha + beta)`` (module docstring)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        t64 = t.detach().to(torch.float64)
        schedule = self.path._schedule(t64)
        k = schedule.alpha + schedule.beta
        tau = schedule.alpha / k
        c_in, c_out = scalings(self._linear._schedule(tau), self.sigma_data)
        tau_in, c_in, c_out = tau.to(t.dtype), (c_in / k).to(x.dtype), c_out.to(x.dtype)
        v_lin = c_out.reshape(shape) * call_model(self.net, c_in.reshape(shape) * x, tau_in, y)
        z = (1 / k).to(x.dtype).reshape(shape) * x  # the point of linear at time tau
        tau = tau.to(x.dtype).reshape(shape)
        if self.prediction == "data":
            return z + (1 - tau) * v_lin
        noise = z - tau * v_lin
        if self.prediction == "noise":
            return noise
        if self.prediction == "score":
            beta = self.path._schedule(t64.clamp(max=1.0 - T_CLAMP)).beta
            return -noise / beta.to(x.dtype).reshape(shape)
        d_alpha, d_beta = (c.to(x.dtype).reshape(shape) for c in (schedule.d_alpha, bounded_d_beta(schedule)))
        return d_alpha * (z + (1 - tau) * v_lin) + d_beta * noise


def __getattr__(name: str) -> object:
    """Names that moved to :mod:`flowscore.objectives` (training policy, not scalings), still importable
    from here: ``for_run``, ``quality_warning``, ``QualityWarning``, ``RAW_OK``."""
    if name in ("QualityWarning", "quality_warning", "RAW_OK"):
        from . import objectives

        return getattr(objectives, name)
    if name == "for_run":
        return _for_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _for_run(net: nn.Module, path: GaussianPath, config: TrainConfig) -> nn.Module:
    """The model a run trains and samples (``objective_from_config(config, path, net).wrap(net)``)."""
    from .objectives import objective_from_config

    return objective_from_config(config, path, net).wrap(net)
