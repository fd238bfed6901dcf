r"""Flow maps: the exact map of a marginal, the map of any model, and the objectives that learn it.

The flow map :math:`X(x, t, s)` is the probability-flow ODE's solution at time ``s`` started from ``x`` at
time ``t`` (t = 0 noise, t = 1 data; either direction), and the **average velocity** is
:math:`u(x, t, s) = (X(x, t, s) - x) / (s - t)`, with :math:`u(x, t, t) = v(x, t)` the instantaneous
velocity. A model of ``u`` samples in K calls by K jumps :math:`x \leftarrow x + (s - t)\,u(x, t, s)`.
docs/theory.md, section 18, derives the identities used here.

* :func:`exact_flow_map`: an adaptive float64 Dormand--Prince 5(4) solve of any velocity field, batched,
  per-row ``t`` and ``s`` in either direction; :meth:`flowscore.marginals.Marginal.flow_map`
  (``EmpiricalMarginal``, ``GaussianMixture``) calls it with the exact marginal velocity.
* :func:`flow_map`: the map of any model (a velocity/score/noise/data model by an ODE solve of its
  velocity; a two-time model by one jump).
* :class:`MeanFlow`, :class:`Semigroup` and :class:`Lagrangian`: the objectives
  (:class:`flowscore.objectives.Objective`, with ``two_time = True``), and :class:`PreconditionedFlowMap`,
  the wrapper of a two-time network.
* :func:`sample_jumps`: K jumps on a grid, what :func:`flowscore.sample` does with a two-time model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import _validate
from .conditioning import Model, check_labels, guided_model
from .couplings import reference_target
from .objectives import Objective, ReferencePool
from .paths import GaussianPath, get_path

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity(x, t) -> (B, *dims)`` with ``x`` ``(B, *dims)`` and ``t`` ``(B,)``."""

# Dormand--Prince 5(4): nodes, stages, 5th-order weights, and the difference of the 5th and 4th-order weights
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _pair_times(t: object, s: object, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` and ``s`` (floats, 0-dim or ``(B,)``, in [0, 1]) as float64 ``(B,)`` tensors on ``like``'s
    device."""
    b = like.shape[0]
    ref = torch.empty((b,), dtype=torch.float64, device=like.device)
    out = []
    for value, name in ((t, "t"), (s, "s")):
        if isinstance(value, torch.Tensor):
            value = _validate.tensor(value, name).detach().to(device=like.device, dtype=torch.float64)
        out.append(_validate.time(value, like=ref, name=name).expand(b).contiguous())
    return out[0], out[1]


def exact_flow_map(
    velocity: Velocity,
    x: torch.Tensor,
    t: torch.Tensor | float,
    s: torch.Tensor | float,
    rtol: float = 1e-8,
    atol: float = 1e-8,
    max_steps: int = 100_000,
) -> torch.Tensor:
    r""":math:`X(x, t, s)`: the solution at time ``s`` of :math:`dx/dt = v(x, t)` started from ``x`` at ``t``.

    An adaptive Dormand--Prince 5(4) solve in float64, batched: each row runs over its own interval through
    :math:`\tau \in [0, 1]`, :math:`x(\tau) = X(x, t, t + \tau(s - t))`,
    :math:`dx/d\tau = (s - t)\,v(x, t + \tau (s - t))`, with one step size for the batch, accepted when every
    row's RMS error is within ``atol + rtol * |x|`` (per coordinate). Rows with ``s < t`` run backwards in
    time; rows with ``s = t`` stay where they are.

    Args:
        velocity: ``(x, t) -> (B, *dims)``, called with float64 ``x`` ``(B, *dims)`` and ``t`` ``(B,)``.
        x: ``(B, *dims)`` start points; ``t``, ``s``: floats or ``(B,)`` tensors in [0, 1].
        rtol, atol: the local error tolerances of each step (the global error is of the same order for the
            contracting or mildly expanding flows of Gaussian paths; the tests check it against an
            independent solver).
        max_steps: ``ValueError`` when more accepted and rejected steps are needed.

    Returns: ``(B, *dims)`` in ``x``'s dtype.
    """
    x = _validate.batch(x, "x")
    _validate.finite(x, "x")
    rtol = _validate.number(rtol, "rtol", low=0.0, low_open=True)
    atol = _validate.number(atol, "atol", low=0.0, low_open=True)
    t, s = _pair_times(t, s, x)
    y = x.to(torch.float64)
    shape = (-1,) + (1,) * (x.dim() - 1)
    gap = (s - t).reshape(shape)

    def f(y: torch.Tensor, tau: float) -> torch.Tensor:
        times = (t + tau * (s - t)).clamp(0.0, 1.0)
        return gap * velocity(y, times).to(torch.float64)

    tau, h, steps = 0.0, 0.05, 0
    k1 = f(y, 0.0)
    while tau < 1.0:
        if steps >= max_steps:
            raise ValueError(
                f"exact_flow_map needed more than max_steps = {max_steps} steps; loosen rtol/atol"
            )
        steps += 1
        h = min(h, 1.0 - tau)
        ks = [k1]
        for i in range(1, 6):
            yi = y + h * sum(a * k for a, k in zip(_A[i], ks, strict=False))
            ks.append(f(yi, tau + _C[i] * h))
        y_new = y + h * sum(b * k for b, k in zip(_B, ks, strict=True))
        k7 = f(y_new, tau + h)
        err = h * sum(e * k for e, k in zip(_E, [*ks, k7], strict=True))
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        ratio = (err / scale).pow(2).flatten(1).mean(1).sqrt()
        norm = float(ratio.max()) if ratio.numel() else 0.0
        if not math.isfinite(norm):
            raise ValueError("exact_flow_map: the velocity is not finite along the solve")
        if norm <= 1.0:
            tau, y, k1 = tau + h, y_new, k7
        h *= min(5.0, max(0.2, 0.9 * (norm if norm > 0 else 1e-10) ** -0.2))
        if tau < 1.0 and h < 1e-14:
            raise ValueError("exact_flow_map: the step size underflowed (a singular velocity?)")
    return y.to(x.dtype)


def call_flow_map(
    model: Model, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None = None
) -> torch.Tensor:
    """``model(x, t, s)`` (or ``model(x, t, s, y)``), checked to be a tensor shaped like ``x`` ``(B, *dims)``;
    ``t``, ``s`` ``(B,)``."""
    out = model(x, t, s) if y is None else model(x, t, s, y)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"a two-time model must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    return out


def is_two_time(model: object) -> bool:
    """Whether ``model`` is a flow-map model called as ``model(x, t, s[, y])`` (its ``two_time`` attribute,
    set by :class:`PreconditionedFlowMap` and the built-in models built with ``two_time=True``)."""
    return bool(getattr(model, "two_time", False))


def _guided_jump_field(model: Model, y: torch.Tensor | None, guidance: float) -> Callable:
    """``(x, t, s) -> u``: the model with labels ``y`` fixed; with ``guidance`` w != 0 the combination
    ``(1 + w) u(x, t, s, y) - w u(x, t, s, -1)`` in one batched call."""
    w = _validate.number(guidance, "guidance")
    if y is None and w != 0:
        raise ValueError("guidance needs class labels y")

    def field(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if y is None:
            return call_flow_map(model, x, t, s)
        labels = check_labels(y, x.shape[0])
        if w == 0:
            return call_flow_map(model, x, t, s, labels)
        both = call_flow_map(
            model,
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([s, s]),
            torch.cat([labels, torch.full_like(labels, -1)]),
        )
        conditional, unconditional = both.chunk(2)
        return (1 + w) * conditional - w * unconditional

    return field


def flow_map(
    model: Model,
    path: GaussianPath | str,
    x: torch.Tensor,
    t: torch.Tensor | float,
    s: torch.Tensor | float,
    *,
    prediction: str | None = None,
    y: torch.Tensor | None = None,
    guidance: float = 0.0,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    t_eps: float = 1e-3,
) -> torch.Tensor:
    r"""The flow map :math:`X(x, t, s)` ``(B, *dims)`` of a model: where its probability-flow ODE takes ``x``.

    A two-time model (:func:`is_two_time`) jumps once, :math:`x + (s - t)\,u(x, t, s)`. Any other model
    (``prediction`` velocity, score, noise or data; None: its ``prediction`` attribute, else velocity) is
    converted to its velocity on ``path`` and solved by :func:`exact_flow_map` (float64 state, the model
    called in ``x``'s dtype) to ``rtol``/``atol``. Where the model's velocity is singular at an endpoint
    (a noise or score model at t = 0 where alpha = 0, a data model at t = 1 where beta = 0) it is evaluated
    at ``t_eps`` (resp. ``1 - t_eps``) instead. ``y``/``guidance``: labels and classifier-free guidance as in
    :func:`flowscore.sample`. Runs under ``torch.no_grad()``.
    """
    from .samplers import _model_and_prediction, as_field, conversions_finite_at

    x = _validate.batch(x, "x")
    path = get_path(path)
    if y is not None:
        check_labels(y, x.shape[0])
    t64, s64 = _pair_times(t, s, x)
    with torch.no_grad():
        if is_two_time(model):
            tt, ss = t64.to(x.dtype), s64.to(x.dtype)
            u = _guided_jump_field(model, y, guidance)(x, tt, ss)
            return x + (ss - tt).reshape((-1,) + (1,) * (x.dim() - 1)) * u
        prediction = _model_and_prediction(model, prediction)
        field = as_field(guided_model(model, y, guidance), path, prediction, "velocity")
        t_eps = _validate.t_eps(t_eps, allow_zero=False)
        low = 0.0 if conversions_finite_at(path, prediction, ("velocity",), 0.0) else t_eps
        high = 1.0 if conversions_finite_at(path, prediction, ("velocity",), 1.0) else 1.0 - t_eps

        def velocity(z: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
            return field(z.to(x.dtype), times.clamp(low, high).to(x.dtype))

        return exact_flow_map(velocity, x, t64, s64, rtol=rtol, atol=atol)


# -- two-time networks -------------------------------------------------------------------------------------
class PreconditionedFlowMap(nn.Module):
    r"""``model(x, t, s[, y]) = c_out(t) net(c_in(t) x, t, s[, y])``: a two-time network preconditioned for a
    path, returning the average velocity from ``t`` to ``s``.

    ``c_in``, ``c_out`` are :func:`flowscore.preconditioning.scalings` at ``t`` (unit-variance input, and the
    output scaled like the conditional velocity, which is also the scale of ``u(x, t, t) = v``). The
    scalings are computed without detaching ``t``, so a forward-mode JVP in ``t`` (:class:`MeanFlow`)
    differentiates them too. Adds no weights (state dict: ``net.``).
    """

    two_time = True
    prediction = "velocity"

    def __init__(self, net: nn.Module, path: GaussianPath | str, sigma_data: float = 1.0):
        super().__init__()
        if not callable(net):
            raise ValueError(f"net must be callable as net(x, t, s), got {type(net).__name__}")
        self.net = net
        self.path = get_path(path)
        self.sigma_data = _validate.number(sigma_data, "sigma_data", low=0.0, low_open=True)

    @property
    def wrapped_network(self) -> nn.Module:
        """The network (read by :func:`flowscore.models.builtin_config`)."""
        return self.net

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        from .preconditioning import scalings

        shape = (-1,) + (1,) * (x.dim() - 1)
        c_in, c_out = (
            c.to(x.dtype).reshape(shape)
            for c in scalings(self.path._schedule(t.to(torch.float64)), self.sigma_data)
        )
        return c_out * call_flow_map(self.net, c_in * x, t, s, y)


# -- time pairs ----------------------------------------------------------------------------------------------
TIME_LAWS = ("logit-normal", "uniform")


def draw_pairs(
    b: int,
    *,
    law: str = "logit-normal",
    mean: float = 0.0,
    std: float = 1.0,
    share_equal: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(t, s)``, each ``(b,)``, with ``t <= s``: two independent draws of ``law`` sorted, except on each
    row with probability ``share_equal``, where ``s = t`` is the first draw alone (those rows are plain flow
    matching, with ``t`` distributed by ``law`` itself: the minimum of two draws would favour the noise end,
    where the velocity is simplest).

    ``law``: ``"logit-normal"`` (:math:`\mathrm{sigmoid}(N(\mathrm{mean}, \mathrm{std}^2))`) or
    ``"uniform"`` on [0, 1]. Four draws per row from ``generator``, in a fixed order.
    """
    _validate.choice(law, TIME_LAWS, "law")
    share = _validate.number(share_equal, "share_equal", 0.0, 1.0)
    if law == "uniform":
        a = torch.rand((2, b), generator=generator, device=device)
    else:
        a = torch.sigmoid(mean + std * torch.randn((2, b), generator=generator, device=device))
    equal = torch.rand(b, generator=generator, device=device) < share
    t = torch.where(equal, a[0], a.min(0).values)
    s = torch.where(equal, a[0], a.max(0).values)
    return t.to(dtype), s.to(dtype)


# -- objectives ----------------------------------------------------------------------------------------------
class _FlowMapObjective(Objective):
    """Shared options of :class:`MeanFlow` and :class:`Semigroup` (see their docstrings)."""

    two_time = True
    prediction = "velocity"
    floor_absent = (
        "a flow-map objective regresses on a target built from the model itself (a fixed-point iteration), "
        "so its loss has no floor"
    )

    def __init__(
        self,
        path: GaussianPath | str = "linear",
        *,
        share_equal: float = 0.5,
        law: str = "uniform",
        mean: float = 0.0,
        std: float = 1.0,
        adaptive_power: float = 0.0,
        adaptive_c: float = 1e-3,
        guidance: float = 0.0,
        sigma_data: float = 0.5,
        precondition: bool = True,
        reference_size: int = 0,
    ):
        self.path = get_path(path)
        self.share_equal = _validate.number(share_equal, "share_equal", 0.0, 1.0)
        self.law = _validate.choice(law, TIME_LAWS, "law")
        self.mean = _validate.number(mean, "mean")
        self.std = _validate.number(std, "std", low=0.0, low_open=True)
        self.adaptive_power = _validate.number(adaptive_power, "adaptive_power", low=0.0)
        self.adaptive_c = _validate.number(adaptive_c, "adaptive_c", low=0.0, low_open=True)
        self.guidance = _validate.number(guidance, "guidance")
        self.sigma_data = _validate.number(sigma_data, "sigma_data", low=0.0, low_open=True)
        self.precondition = bool(precondition)
        self.reference_size = _validate.integer(reference_size, "reference_size", minimum=0)
        self._references = ReferencePool(self.reference_size, at_most=True)
        self.needs_data = self.reference_size > 0

    def options(self) -> dict[str, Any]:
        """The constructor options (JSON); ``type(self)(**options)`` rebuilds the objective."""
        return {
            "path": self.path.config(),
            "share_equal": self.share_equal,
            "law": self.law,
            "mean": self.mean,
            "std": self.std,
            "adaptive_power": self.adaptive_power,
            "adaptive_c": self.adaptive_c,
            "guidance": self.guidance,
            "sigma_data": self.sigma_data,
            "precondition": self.precondition,
            "reference_size": self.reference_size,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **self.options()}

    def wrap(self, net: nn.Module) -> nn.Module:
        """:class:`PreconditionedFlowMap` around a built-in two-time network when ``precondition``; any other
        network as given."""
        from .models import builtin_config

        config = builtin_config(net)
        if not self.precondition or config is None or isinstance(net, PreconditionedFlowMap):
            return net
        if not config.get("two_time"):
            raise ValueError(f"{self.name} trains a two-time network: build the model with two_time=True")
        return PreconditionedFlowMap(net, self.path, self.sigma_data)

    def bind(self, x_data: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Keeps the training set as the pool of reference points (``reference_size > 0``)."""
        self._references.bind(x_data, labels)

    def loss(
        self,
        model: Model,
        x_data: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(B,)`` per-sample loss: time pairs, path points and velocity drawn (:meth:`_draw`), the velocity
        guided where the objective trains guidance, then the objective's ``regress(model, x, t, s, v, y)``."""
        t, s, x, v = self._draw(x_data, generator, y)
        return self.regress(model, x, t, s, self._guided_velocity(model, x, t, v, y), y)

    def _draw(self, x_data: torch.Tensor, generator: torch.Generator | None, y: torch.Tensor | None = None):
        """``(t, s, x, v)``: time pairs ``(B,)``, ``x = alpha_t x_data + beta_t noise`` and the conditional
        velocity ``alpha'_t x_data + beta'_t noise`` ``(B, *dims)``; with ``reference_size`` R > 0, ``v`` is
        its posterior average over the batch's own point and R reference points of the training set (of the
        row's class where ``y`` >= 0; :func:`flowscore.couplings.reference_target`)."""
        b = x_data.shape[0]
        t, s = draw_pairs(
            b,
            law=self.law,
            mean=self.mean,
            std=self.std,
            share_equal=self.share_equal,
            generator=generator,
            device=x_data.device,
            dtype=x_data.dtype,
        )
        noise = torch.randn(x_data.shape, generator=generator, device=x_data.device, dtype=x_data.dtype)
        x = self.path.sample(x_data, t, noise)
        reference, reference_y = self._references.draw(generator)
        if reference is None:
            return t, s, x, self.path.target(x_data, t, noise, "velocity")
        labelled = y is not None and reference_y is not None  # per class, where the run has labels
        v = reference_target(
            self.path, x_data, t, noise, reference, "velocity", y=y if labelled else None,
            reference_y=reference_y if labelled else None,
        )  # fmt: skip
        return t, s, x, v

    def _guided_velocity(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        r"""The velocity the target is built from: ``v`` itself, or with guidance w on the labelled rows
        :math:`(1 + w)\,v - w\,\mathrm{sg}[u_\theta(x, t, t, -1)]` (the model's own unconditional
        velocity)."""
        if self.guidance == 0 or y is None:
            return v
        has = y >= 0
        if not bool(has.any()):
            return v
        with torch.no_grad():
            unconditional = call_flow_map(model, x, t, t, torch.full_like(y, -1))
        guided = (1 + self.guidance) * v - self.guidance * unconditional
        return torch.where(has.reshape((-1,) + (1,) * (x.dim() - 1)), guided, v)

    def _weighted(self, error: torch.Tensor) -> torch.Tensor:
        r"""``(B,)`` squared error summed over dims, times :math:`1/(\lVert e\rVert^2 + c)^p` (stop-gradient)
        when ``adaptive_power`` p > 0."""
        sq = error.flatten(1).pow(2).sum(1)
        if self.adaptive_power == 0:
            return sq
        return sq / (sq.detach() + self.adaptive_c).pow(self.adaptive_power)


class MeanFlow(_FlowMapObjective):
    r"""The MeanFlow objective (Geng et al. 2025) in flowscore's time: regress ``u_theta(x_t, t, s)`` on

    .. math::  \mathrm{sg}\big[v + (s - t)\,(v \cdot \nabla_x + \partial_t)\,u_\theta(x_t, t, s)\big],

    with ``v`` the conditional velocity ``alpha'_t x_data + beta'_t noise`` (the expected gradient equals the
    marginal velocity's: the target is affine in ``v``, docs/theory.md section 18), the total derivative
    from one ``torch.func.jvp`` with tangent ``(v, 1, 0)``. Options (shared with :class:`Semigroup`):

    * ``path``; ``law``, ``mean``, ``std``: the law of the two times, sorted into ``t <= s``
      (:func:`draw_pairs`); ``share_equal``: the share of pairs with ``s = t`` (plain flow matching);
    * ``adaptive_power`` p, ``adaptive_c`` c: MeanFlow's adaptive weighting ``1/(|err|^2 + c)^p``
      (stop-gradient; p = 0 is the plain squared error);
    * ``guidance`` w: classifier-free guidance trained into the target (labelled rows use
      ``(1 + w) v - w u_theta(x, t, t, -1)`` for ``v``), so that one call samples the guided model;
    * ``sigma_data``, ``precondition``: :meth:`wrap` preconditions a built-in two-time network;
    * ``reference_size`` R: with R > 0 the velocity ``v`` (tangent and target) is its posterior average over
      the row's own point and R points of the training set bound by :meth:`bind` (at most all of them; per
      class on labelled rows): an estimate of the marginal velocity with far less variance than the
      conditional one (the stable-target-field idea; biased for R below the training set's size, exact
      at it). ``TrainConfig`` sets it per objective (:data:`flowscore.config.OBJECTIVE_VECTOR_DEFAULTS`).

    ``loss(model, x_data, y, generator)`` returns the per-sample loss ``(B,)``; the model is called as
    ``model(x, t, s[, y])``.
    """

    name = "meanflow"

    def regress(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        v: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""``(B,)`` weighted :math:`\lVert u_\theta - \mathrm{sg}[v + (s - t)\,du_\theta/dt]\rVert^2` at
        given ``x`` ``(B, *dims)``, times ``t``, ``s`` ``(B,)`` and velocity ``v`` ``(B, *dims)`` (the
        conditional, marginal or guided velocity: the JVP tangent and the target's first term).

        Rows with ``s = t`` have the target ``v`` (the JVP's term vanishes): they take a plain forward call,
        and the JVP runs on the other rows only (the model is applied row by row, so the loss is the same)."""

        def jumps(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor, y: torch.Tensor | None):
            u, dudt = total_derivative(model, x, t, s, v, y)
            return u - (v + _column(s - t, x) * dudt).detach()

        return self._weighted(_equal_rows_apart(model, x, t, s, v, y, jumps))


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``values`` shaped ``(B, 1, ...)`` to broadcast over ``like`` ``(B, *dims)``."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def _equal_rows_apart(
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor | None,
    jumps: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """``(B, *dims)`` regression error: ``u_theta(x, t, t) - v`` on the rows with ``s = t`` (one plain call;
    flow matching), ``jumps(x, t, s, v, y)`` on the rows of the others (their objective's error, with graph).
    """
    equal = s == t
    if bool(equal.all()):
        return call_flow_map(model, x, t, s, y) - v.detach()
    rows = ~equal if bool(equal.any()) else slice(None)
    error = jumps(x[rows], t[rows], s[rows], v[rows], None if y is None else y[rows])
    if isinstance(rows, slice):
        return error
    flat = call_flow_map(model, x[equal], t[equal], s[equal], None if y is None else y[equal])
    whole = torch.empty_like(x).index_put((equal.nonzero()[:, 0],), flat - v[equal].detach())
    return whole.index_put((rows.nonzero()[:, 0],), error)


def total_derivative(
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(u, du/dt)``: ``u = model(x, t, s[, y])`` and its total derivative along the velocity ``v``,
    :math:`(v \cdot \nabla_x + \partial_t)\,u`, from one ``torch.func.jvp`` with tangent ``(v, 1, 0)``.

    ``x``, ``v`` ``(B, *dims)``; ``t``, ``s`` ``(B,)``. ``u`` keeps its graph (for the loss's gradient).
    """
    from torch.func import jvp

    def fn(x_: torch.Tensor, t_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        return call_flow_map(model, x_, t_, s_, y)

    return jvp(fn, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))


class Semigroup(_FlowMapObjective):
    r"""Interval splitting (SplitMeanFlow, shortcut models): no JVP. For ``t < s`` and
    ``r = t + lam (s - t)``, ``lam ~ U(0, 1)``, regress ``u_theta(x_t, t, s)`` on

    .. math::  \mathrm{sg}\big[\lambda\,u_\theta(x_t, t, r) + (1 - \lambda)\,u_\theta(x_t + (r - t)\,
               u_\theta(x_t, t, r), r, s)\big],

    the semigroup identity :math:`(s - t)u(x, t, s) = (r - t)u(x, t, r) + (s - r)u(X(x, t, r), r, s)`
    divided by ``s - t``; rows with ``s = t`` regress on the (guided) conditional velocity, which anchors the
    map to the flow. Options as :class:`MeanFlow`; three model calls per row with ``s != t`` (two without
    gradient), one per row with ``s = t``.
    """

    name = "semigroup"

    def loss(
        self,
        model: Model,
        x_data: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        t, s, x, v = self._draw(x_data, generator, y)
        lam = torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)
        r = t + lam * (s - t)
        return self.regress(model, x, t, s, r, self._guided_velocity(model, x, t, v, y), y)

    def regress(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        r: torch.Tensor,
        v: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B,)`` weighted squared error of ``u_theta(x, t, s)`` against the splitting target at ``r``
        (``(B,)``, between ``t`` and ``s``) where ``s != t``, and against ``v`` ``(B, *dims)`` where
        ``s = t``."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        jumps = s != t
        target = v.detach().clone()
        if bool(jumps.any()):
            xj, tj, sj, rj = x[jumps], t[jumps], s[jumps], r[jumps]
            yj = None if y is None else y[jumps]
            lam = ((rj - tj) / (sj - tj)).reshape(shape)
            with torch.no_grad():
                first = call_flow_map(model, xj, tj, rj, yj)
                second = call_flow_map(model, xj + (rj - tj).reshape(shape) * first, rj, sj, yj)
                target[jumps] = lam * first + (1 - lam) * second
        return self._weighted(call_flow_map(model, x, t, s, y) - target)


class Lagrangian(_FlowMapObjective):
    r"""Lagrangian self-distillation (Boffi, Albergo and Vanden-Eijnden 2025): the map's end point moves with
    the velocity found there, :math:`\partial_s X(x, t, s) = v(X(x, t, s), s)`. For ``t != s`` regress

    .. math::  \partial_s X_\theta = u_\theta(x_t, t, s) + (s - t)\,\partial_s u_\theta(x_t, t, s)
               \quad\text{on}\quad \mathrm{sg}\big[u_\theta(X_\theta, s, s)\big],
               \qquad X_\theta = x_t + (s - t)\,u_\theta(x_t, t, s),

    the teacher the model's own instantaneous velocity at the map's end point, :math:`\partial_s u_\theta`
    one ``torch.func.jvp`` with tangent ``(0, 0, 1)`` (:func:`end_derivative`), the gradient through both
    terms of :math:`\partial_s X_\theta`; rows with ``s = t`` regress on the (guided) velocity ``v`` (flow
    matching, the only place the data enter). The other rows' target holds no data, so it carries no noise
    of the conditional velocity, and the conditional-target theorem is flow matching's on the ``s = t`` rows
    (docs/theory.md section 18). Options as :class:`MeanFlow`; per row with ``s != t`` one JVP (backward
    through it) and one call without gradient.
    """

    name = "lagrangian"

    def regress(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        v: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""``(B,)`` weighted :math:`\lVert u_\theta + (s - t)\,\partial_s u_\theta -
        \mathrm{sg}[u_\theta(X_\theta, s, s)]\rVert^2` at given ``x`` ``(B, *dims)``, times ``t``, ``s``
        ``(B,)``, and :math:`\lVert u_\theta - v\rVert^2` on the rows with ``s = t`` (``v`` ``(B, *dims)``:
        the conditional, marginal or guided velocity)."""

        def jumps(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor, y: torch.Tensor | None):
            u, duds = end_derivative(model, x, t, s, y)
            gap = _column(s - t, x)
            with torch.no_grad():
                teacher = call_flow_map(model, x + gap * u, s, s, y)
            return u + gap * duds - teacher

        return self._weighted(_equal_rows_apart(model, x, t, s, v, y, jumps))


def end_derivative(
    model: Model, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(u, du/ds)``: ``u = model(x, t, s[, y])`` and its partial derivative in the end time ``s``, from one
    ``torch.func.jvp`` with tangent ``(0, 0, 1)``. ``x`` ``(B, *dims)``; ``t``, ``s`` ``(B,)``. ``u`` keeps
    its graph."""
    from torch.func import jvp

    def fn(s_: torch.Tensor) -> torch.Tensor:
        return call_flow_map(model, x, t, s_, y)

    return jvp(fn, (s,), (torch.ones_like(s),))


FLOW_MAP_OBJECTIVES: dict[str, type[_FlowMapObjective]] = {
    "meanflow": MeanFlow,
    "semigroup": Semigroup,
    "lagrangian": Lagrangian,
}


# -- sampling ----------------------------------------------------------------------------------------------
def sample_jumps(
    model: Model,
    path: GaussianPath | str,
    n: int | None = None,
    *,
    steps: int | None = None,
    times: Sequence[float] | torch.Tensor | None = None,
    shape: tuple[int, ...] = (2,),
    x_init: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    return_nfe: bool = False,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple:
    r"""Samples ``(n, *shape)`` of a two-time model by ``steps`` jumps :math:`x \leftarrow x + (s - t)\,
    u(x, t, s[, y])` on the uniform grid ``0, 1/K, ..., 1`` (or an explicit increasing ``times``), starting
    from prior draws at t = 0 (or ``x_init`` at ``times[0]``): K model calls (a guided call on ``[x, x]``
    counts once). ``steps`` None: :data:`DEFAULT_JUMPS`.

    The uniform grid: the objectives draw ``(t, s)`` over the whole triangle, so no interval is favoured; a
    trained map's error over the triangle (bench/bench_flowmap.py) is what a better grid would follow.
    ``guidance`` w != 0 combines ``(1 + w) u(.., y) - w u(.., -1)`` of the jumps, which is not the flow map of
    the guided field (train the guidance into the target instead: ``MeanFlow(guidance=w)``; then sample with
    labels and w = 0). Returns as :func:`flowscore.sample`.
    """
    path = get_path(path)
    if times is not None:
        grid = torch.as_tensor(times, dtype=torch.float64).detach().cpu()
        if grid.dim() != 1 or grid.shape[0] < 2 or not bool((grid[1:] > grid[:-1]).all()):
            raise ValueError("times must be a strictly increasing 1D grid with at least 2 entries")
        grid = _validate.time(grid, name="times")
    else:
        k = DEFAULT_JUMPS if steps is None else _validate.positive_int(steps, "steps")
        grid = torch.linspace(0.0, 1.0, k + 1, dtype=torch.float64)
    if x_init is not None:
        x = _validate.batch(x_init, "x_init")
        if n is not None and n != x.shape[0]:
            raise ValueError(f"n = {n!r} differs from the {x.shape[0]} rows of x_init; omit n")
    else:
        if n is None:
            raise ValueError("n (the number of samples) is required unless x_init is given")
        n = _validate.positive_int(n, "n")
        x = path.sample_prior(
            (n, *shape), generator=generator, dtype=dtype or torch.get_default_dtype(), device=device
        )
        if float(grid[0]) > 0:
            x = x * float(path.beta(torch.tensor(float(grid[0]), dtype=torch.float64)) / path.prior_std)
    if y is not None:
        check_labels(y, x.shape[0])
    field = _guided_jump_field(model, y, guidance)
    states = [x]
    with torch.no_grad():
        for i in range(grid.shape[0] - 1):
            t = torch.full((x.shape[0],), float(grid[i]), dtype=x.dtype, device=x.device)
            s = torch.full_like(t, float(grid[i + 1]))
            x = x + float(grid[i + 1] - grid[i]) * field(x, t, s)
            states.append(x)
    _validate.finite(x, "the samples")
    out: tuple = (x,)
    if return_trajectory:
        out += (torch.stack(states),)
    if return_nfe:
        out += (grid.shape[0] - 1,)
    return out[0] if len(out) == 1 else out


def sample_two_time(model: Model, path: GaussianPath | str, n: int | None, options: dict[str, Any]) -> Any:
    """:func:`sample_jumps` with the keyword arguments of :func:`flowscore.sample` (``options``), returning
    what :func:`flowscore.sample` returns (a :class:`~flowscore.samplers.SampleResult` with ``return_info``);
    the options that only concern integrators of a velocity must keep their defaults (``ValueError``
    otherwise). The sample shape is inferred from the model as :func:`flowscore.sample` does."""
    from .samplers import SampleResult, _sample_shape

    if options.get("sampler") not in (None, "jumps"):
        raise ValueError(f"a flow-map model samples by jumps; sampler {options['sampler']!r} does not apply")
    if options.get("prediction") not in (None, "velocity") or options.get("t_start") is not None:
        raise ValueError("a flow-map model samples by jumps from t = 0; prediction and t_start do not apply")
    keys = ("steps", "times", "x_init", "y", "guidance", "generator", "device", "dtype")
    x_init = options.get("x_init")
    shape = (
        tuple(x_init.shape[1:])
        if isinstance(x_init, torch.Tensor)
        else _sample_shape(model, options.get("shape"))
    )
    trajectory = bool(options.get("return_trajectory"))
    x, *rest = sample_jumps(
        model, path, n, shape=tuple(shape), return_nfe=True, return_trajectory=trajectory,
        **{k: options.get(k) for k in keys},
    )  # fmt: skip
    states, nfe = (rest[0] if trajectory else None), rest[-1]
    if options.get("return_info"):
        steps, times = options.get("steps"), options.get("times")
        grid = (
            torch.as_tensor(times, dtype=torch.float64)
            if times is not None
            else torch.linspace(
                0.0, 1.0, (DEFAULT_JUMPS if steps is None else steps) + 1, dtype=torch.float64
            )
        )
        return SampleResult(x, nfe, grid, states)
    out: tuple = (x,)
    if trajectory:
        out += (states,)
    if options.get("return_nfe"):
        out += (nfe,)
    return out[0] if len(out) == 1 else out


DEFAULT_JUMPS = 1
"""Jumps (model calls) of :func:`sample_jumps` when ``steps`` is not given: a flow-map model is a one-step
sampler first."""


__all__ = [
    "DEFAULT_JUMPS",
    "FLOW_MAP_OBJECTIVES",
    "Lagrangian",
    "MeanFlow",
    "PreconditionedFlowMap",
    "Semigroup",
    "TIME_LAWS",
    "call_flow_map",
    "draw_pairs",
    "end_derivative",
    "exact_flow_map",
    "flow_map",
    "is_two_time",
    "sample_jumps",
    "sample_two_time",
    "total_derivative",
]
