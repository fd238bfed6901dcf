r"""Schrödinger-bridge conditional flow matching as a training objective, and its SDE sampler.

:class:`SBCFM` (``TrainConfig(objective="sbcfm", sb_sigma=σ)``, ``flowscore train --objective sbcfm
--sb-sigma σ``) trains, on each batch of source points :math:`x_s` (the t = 0 end; N(0, I) noise unless
given) and data points :math:`x_d` (t = 1):

* the pairs of the entropic OT plan at the absolute :math:`\epsilon = 2\sigma^2`
  (:func:`flowscore.bridges.sb_couple`), with uniform times ``t`` in ``[t_eps, 1 - t_eps]`` and
  :math:`z \sim N(0, I)`;
* on the Brownian bridge :math:`x = t x_d + (1 - t) x_s + \sigma\sqrt{t(1-t)}\,z` a two-head model
  ``(B, 2, *dims)`` (:class:`SBModel` around a network built with ``heads=2``): head 0 regresses on the
  bridge velocity :math:`u_t` of :func:`flowscore.bridges.sb_cfm_target` (its minimiser is the
  probability-flow velocity :math:`v_t` of the bridge's marginals), head 1 on the score term
  :math:`h_t = \tfrac{\sigma^2}{2}\nabla\log p_t`, through torchcfm's weighted regression
  :math:`\lVert\lambda_t h + z\rVert^2` with :math:`\lambda_t = 2 s_t/\sigma^2`, :math:`s_t =
  \sigma\sqrt{t(1-t)}` (its minimiser is :math:`-E[z \mid x]/\lambda_t = \tfrac{\sigma^2}{2}
  E[-z/s_t \mid x] = \tfrac{\sigma^2}{2}\nabla\log p_t(x)`, since the bridge's conditional score is
  :math:`-z/s_t`).

The per-sample loss is :math:`\lVert v_\theta - u_t\rVert^2 + \lVert\lambda_t h_\theta + z\rVert^2` (sums over
the dims), torchcfm's ``flow_loss + score_loss`` of its SF2M recipe. :func:`sample_sb_sde` integrates the SB's
SDE :math:`dx = [v_\theta + h_\theta]\,dt + \sigma\,dW` from the source to the data (Euler--Maruyama); the
ODE samplers in t integrate :math:`v_\theta` alone (the same marginals). docs/theory.md, section 17.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _validate
from .bridges import bridge_std, sb_cfm_target, sb_couple
from .conditioning import Model
from .losses import prepare_time, sample_time
from .objectives import Batch, Objective

SB_SAMPLERS = ("euler", "midpoint", "heun", "rk4", "dopri5", "sb-sde")
"""The samplers of an SB-CFM model: the velocity integrators in t (its velocity is not a Gaussian path's, so
the log-SNR solvers and the Gaussian-path SDEs do not apply) and the SB's own SDE."""
SB_DEFAULT_SAMPLER = "euler"
"""What :func:`flowscore.sample` runs for an SB-CFM model when no sampler is named (100 Euler steps, the
paper's evaluation)."""


def _heads_of(out: object, x: torch.Tensor, heads: int) -> torch.Tensor:
    """``out`` checked to be ``(B, heads, *dims)`` for ``x`` ``(B, *dims)`` (``(B, *dims)`` when one head)."""
    shape = tuple(x.shape) if heads == 1 else (x.shape[0], heads, *x.shape[1:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"an SB-CFM network with {heads} head(s) must return a tensor shaped {shape} (velocity"
            f"{' and score term' if heads == 2 else ''}), got {got}; build it with heads=2 "
            "(flowscore.MLP(dim, heads=2)) or use SBCFM(score=False)"
        )
    return out


class SBModel(nn.Module):
    r"""The model of an SB-CFM run: ``forward(x, t[, y])`` is the velocity :math:`v_\theta` ``(B, *dims)``
    (head 0 of ``net``), so every velocity integrator samples it; :meth:`heads` returns both heads and
    :meth:`drift` the SB's SDE drift :math:`v_\theta + h_\theta`.

    ``net``: ``net(x, t[, y]) -> (B, 2, *dims)`` (``(B, *dims)`` with ``score=False``); ``sigma``: the
    bridge's diffusion (``sb_sigma``). No weights of its own: a run stores ``net``'s.
    """

    def __init__(self, net: nn.Module, sigma: float, score: bool = True):
        super().__init__()
        self.network = net
        self.sb_sigma = _validate.number(sigma, "sigma", 0.0, low_open=True)
        self.score = bool(score)
        self.prediction = "velocity"

    @property
    def wrapped_network(self) -> nn.Module:
        return self.network

    def heads(self, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        """``(B, 2, *dims)``: the velocity and the score term (with ``score=False`` the velocity
        ``(B, *dims)``)."""
        return _heads_of(self.network(x, t, *args), x, 2 if self.score else 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        out = self.heads(x, t, *args)
        return out[:, 0] if self.score else out

    def drift(self, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        r""":math:`v_\theta + h_\theta = v_\theta + \tfrac{\sigma^2}{2}\nabla\log p_t` ``(B, *dims)``, the
        drift of :func:`sample_sb_sde` (needs ``score=True``)."""
        if not self.score:
            raise ValueError(
                "this SB-CFM model has no score head (trained with score=False): sample it with an ODE "
                "sampler (euler, heun, ...), not sb-sde"
            )
        out = self.heads(x, t, *args)
        return out[:, 0] + out[:, 1]


@dataclass
class SBBatch(Batch):
    """A :class:`~flowscore.objectives.Batch` of SB-CFM: ``noise`` holds the source points paired with the
    data (the t = 0 end), ``bridge`` the bridge noise z ``(B, *dims)``, ``target`` the velocity target."""

    bridge: torch.Tensor | None = None
    target: torch.Tensor | None = None


class SBCFM(Objective):
    r"""Schrödinger-bridge CFM (module docstring): entropic OT pairs at :math:`\epsilon = 2\sigma^2`, the
    Brownian bridge of diffusion ``sigma`` between them, a velocity head and (``score=True``) a score-term
    head.

    Args:
        sigma: the bridge's diffusion :math:`\sigma > 0`, in the units the model is trained in (after the
            data's normalisation: ``TrainConfig.data_std``).
        t_eps: times are uniform in ``[t_eps, 1 - t_eps]``.
        score: also train the score term (head 1), which :func:`sample_sb_sde` needs; False: a one-output
            network trained on the velocity alone (ODE sampling only).
    """

    name = "sbcfm"
    prediction = "velocity"
    any_source = True  # the bridge and its target hold for any source law (a data source: ``source=``)
    floor_absent = (
        "SB-CFM pairs source and data through the batch's entropic OT plan and its path is a Brownian "
        "bridge, not a Gaussian path: the conditional mean of its targets has no closed form, so its floor "
        "is not computed"
    )

    def __init__(self, sigma: float = 1.0, *, t_eps: float = 1e-3, score: bool = True):
        self.sigma = _validate.number(sigma, "sigma", 0.0, low_open=True)
        self.t_eps = _validate.t_eps(t_eps)
        if not isinstance(score, bool):
            raise ValueError(f"score must be true or false, got {score!r}")
        self.score = score

    @property
    def heads(self) -> int:
        """Outputs of the network this objective trains: 2 (velocity and score term), 1 with ``score=False``;
        the trainer builds its built-in network with them."""
        return 2 if self.score else 1

    def draw(
        self,
        x_data: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        t: torch.Tensor | float | None = None,
        noise: torch.Tensor | None = None,
        bridge: torch.Tensor | None = None,
        paired: bool = False,
        source: torch.Tensor | None = None,
    ) -> SBBatch:
        """The batch's ``t`` (uniform in ``[t_eps, 1 - t_eps]``, or the given one clamped there), source
        points ``noise`` (N(0, I), or given; ``source``: the same, the name the trainer uses for a batch of a
        data source) paired with ``x_data`` by
        :func:`~flowscore.bridges.sb_couple` (within the labels ``y``; not when ``paired``), the bridge noise
        ``bridge`` (N(0, I), or given), drawn from ``generator`` in this order; then the bridge sample ``x``
        and its velocity target."""
        x_data = _validate.batch(x_data, "x_data")
        if source is not None:
            if noise is not None:
                raise ValueError("SBCFM.draw: give the source points as source= or noise=, not both")
            noise = source
        if noise is not None:
            noise = _validate.tensor(noise, "source")
            _validate.same_shape(x_data, noise, "x_data", "source")
        if t is None:
            t = sample_time(
                x_data.shape[0], t_eps=self.t_eps, generator=generator, dtype=x_data.dtype,
                device=x_data.device,
            )  # fmt: skip
        else:
            t = prepare_time(t, x_data, self.t_eps)
        if noise is None:
            noise = torch.randn(x_data.shape, generator=generator, dtype=x_data.dtype, device=x_data.device)
        if not paired:
            noise = sb_couple(noise, x_data, self.sigma, y=y, generator=generator)
        if bridge is None:
            bridge = torch.randn(x_data.shape, generator=generator, dtype=x_data.dtype, device=x_data.device)
        x, target = sb_cfm_target(noise, x_data, t, bridge, self.sigma)
        return SBBatch(x_data, y, t, noise, x, bridge=bridge, target=target)

    def per_sample(
        self, model: Model, batch: Batch, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        r"""``(B,)``: :math:`\lVert v_\theta - u_t\rVert^2 + \lVert\lambda_t h_\theta + z\rVert^2` (the second
        term with ``score=True``) of a drawn batch; ``model``: an :class:`SBModel` (or a network returning
        ``(B, 2, *dims)``, ``(B, *dims)`` with ``score=False``)."""
        if not isinstance(batch, SBBatch) or batch.target is None:
            raise ValueError("SBCFM.per_sample needs a batch drawn by SBCFM.draw")
        args = () if batch.y is None else (batch.y,)
        heads = model.heads if isinstance(model, SBModel) else model
        out = _heads_of(heads(batch.x, batch.t, *args), batch.x, 2 if self.score else 1)
        velocity = out[:, 0] if self.score else out
        loss = (velocity - batch.target).flatten(1).pow(2).sum(1)
        if self.score:
            lam = _validate.expand(2 * bridge_std(batch.t, self.sigma) / self.sigma**2, batch.x)
            loss = loss + (lam * out[:, 1] + batch.bridge).flatten(1).pow(2).sum(1)
        return loss

    def loss(
        self,
        model: Model,
        x_data: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return self.per_sample(model, self.draw(x_data, y, generator))

    def wrap(self, net: nn.Module) -> nn.Module:
        """``SBModel(net, sigma, score)`` (``net`` itself if it is one already)."""
        return net if isinstance(net, SBModel) else SBModel(net, self.sigma, self.score)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "sigma": self.sigma, "t_eps": self.t_eps, "score": self.score}


def sb_model_of(model: object) -> SBModel | None:
    """The :class:`SBModel` that ``model`` is (or wraps, e.g. through an adapter), or None."""
    from .samplers import _inner_networks

    return next((m for m in _inner_networks(model) if isinstance(m, SBModel)), None)


def default_sampler(model: object, stochastic: bool = False) -> str:
    """The sampler run for ``model`` when none is named: ``euler`` (``sb-sde`` when ``stochastic``) for an
    SB-CFM model, else :data:`flowscore.samplers.DEFAULT_ODE_SAMPLER` (``sde``)."""
    from .samplers import DEFAULT_ODE_SAMPLER

    if sb_model_of(model) is None:
        return "sde" if stochastic else DEFAULT_ODE_SAMPLER
    return "sb-sde" if stochastic else SB_DEFAULT_SAMPLER


def check_sampler(model: object, sampler: str | None) -> str | None:
    """``sampler`` for ``model``: for an SB-CFM model, :data:`SB_DEFAULT_SAMPLER` when None and a
    ``ValueError`` outside :data:`SB_SAMPLERS`; ``sb-sde`` for any other model is refused."""
    sb = sb_model_of(model)
    if sb is None:
        if sampler == "sb-sde":
            raise ValueError(
                "sampler 'sb-sde' integrates the SDE of a Schrödinger-bridge (SB-CFM) model: train one with "
                "--objective sbcfm, or use 'sde' for a model of a Gaussian path"
            )
        return sampler
    if sampler is None:
        return SB_DEFAULT_SAMPLER
    if sampler not in SB_SAMPLERS:
        raise ValueError(
            f"sampler {sampler!r} assumes a Gaussian path, but an SB-CFM model's velocity is that of a "
            f"Brownian-bridge mixture: use one of {', '.join(SB_SAMPLERS)}"
        )
    if sampler == "sb-sde" and not sb.score:
        raise ValueError("this SB-CFM model has no score head (score=False): sb-sde needs it; use euler")
    return sampler


def sample_sb_sde(
    drift: Model,
    x: torch.Tensor,
    times: torch.Tensor,
    sigma: float,
    *,
    generator: torch.Generator | None = None,
    callback: Any = None,
) -> torch.Tensor:
    r"""Euler--Maruyama on the SB's SDE :math:`dx = b(x, t)\,dt + \sigma\,dW`, t increasing.

    ``drift(x, t) -> (B, *dims)``: :math:`b = v_\theta + \tfrac{\sigma^2}{2}\nabla\log p_t`
    (``SBModel.drift``); ``x``: ``(B, *dims)`` at ``times[0]``; ``times``: 1D increasing grid. Each
    interval is :math:`x \leftarrow x + h\,b + \sigma\sqrt{h}\,z`, :math:`z \sim N(0, I)` from
    ``generator``, except the last, which takes the drift alone: at t = 1 the bridge is pinned to the
    data, and the drift of the last interval already carries x to it, so its noise would only be left on
    the samples. ``callback`` gets
    ``{"i", "t", "t_next", "x"}`` after each step.
    """
    sigma = _validate.number(sigma, "sigma", 0.0, low_open=True)
    grid = times.tolist()
    last = len(grid) - 2
    for i in range(len(grid) - 1):
        t = times[i].to(x.dtype).expand(x.shape[0]).contiguous()
        h = grid[i + 1] - grid[i]
        x = x + h * drift(x, t)
        if i < last:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + sigma * h**0.5 * z
        if callback is not None:
            callback({"i": i, "t": grid[i], "t_next": grid[i + 1], "x": x})
    return x


__all__ = [
    "SBBatch",
    "SBCFM",
    "SBModel",
    "SB_DEFAULT_SAMPLER",
    "SB_SAMPLERS",
    "check_sampler",
    "default_sampler",
    "sample_sb_sde",
    "sb_model_of",
]
