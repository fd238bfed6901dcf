r"""Samplers: integrate from the prior at t = 0 (noise) to t = 1 (data), k-diffusion style.

Plain functions over ``(field, x, times)``: a *field* is any callable ``field(x, t)`` with ``x`` shaped
``(B, *dims)`` and ``t`` shaped ``(B,)``, returning ``(B, *dims)``.

* :func:`as_field` turns a model of any prediction (velocity, score, noise, data) into the field of another
  kind through ``path.convert``.
* :func:`sample_ode` integrates the probability-flow ODE :math:`dx/dt = u_t(x)` (euler, midpoint, heun, rk4 on
  the given grid; dopri5, adaptive, via torchdiffeq).
* :func:`sample_sde` runs Euler--Maruyama on :math:`dX = [u_t + \tfrac12 g_t^2 s_t]\,dt + g_t\,dW`, whose
  marginals are the path's for every :math:`g` (Fokker--Planck), then a final deterministic step to t = 1.
* :mod:`flowscore.solvers` adds the few-step solvers in log-SNR (``ddim``, ``dpm++2m``, ``dpm++3m``,
  ``unipc``, ``edm-heun``, ``dpm++2m-sde``) and :mod:`flowscore.grids` the time grids (``GRIDS``).
* :func:`sample` does it all for a model: prior draws (or ``x_init``; the held-out source points of a run
  trained from a data source), time grid, labels and guidance, conversions, solver, the NFE;
  :func:`encode` runs the same ODE solvers from data to noise.

Endpoints. Some conversions are singular at an endpoint (``flowscore.conversions``): from a score or noise
model the velocity is infinite at t = 0 where alpha_0 = 0 (``linear``, ``vp``), and from a data model it is
infinite at t = 1 where beta_1 = 0; the score is infinite at t = 1 for every model. :func:`sample` checks each
endpoint in float64 and, where a field it needs is singular there, uses ``t_eps`` (start) or ``1 - t_eps``
(end) instead; it then treats the prior draw as a sample at ``t_eps`` and closes the gap to t = 1 with the
deterministic step of :func:`final_step`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _validate
from ._validate import validation
from .conditioning import call_model, check_labels, guided_model
from .conversions import KINDS, conversion_coefficients
from .grids import GRIDS, SHIFT, check_times, time_grid
from .paths import GaussianPath, get_path
from .resources import check_sample_memory
from .sampler_registry import REGISTRY, names, spec
from .solvers import EXPONENTIAL, LastCall, sample_dpmpp_2m_sde

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Diffusion = None | float | str | Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None] | None

# every table below is derived from the one registry (flowscore.sampler_registry.REGISTRY)
METHODS = names(family="t")
"""Integrators of the velocity in t (:func:`integrate`, :func:`sample_ode`)."""
FIXED_METHODS = names(family="t", adaptive=False)
ODE_SAMPLERS = names(stochastic=False)
"""Every deterministic sampler: the velocity integrators and :data:`flowscore.solvers.EXPONENTIAL`."""
SDE_SAMPLERS = names(stochastic=True)
"""Stochastic samplers: Euler--Maruyama (:func:`sample_sde`) and the stochastic DPM-Solver++(2M)."""
SAMPLERS = tuple(REGISTRY)
DIFFUSIONS = ("linear", "bounded", "score-sde")
"""The named diffusions of :func:`sample_sde` (:func:`diffusion_schedule`); the first is the default."""
CALLS_PER_STEP = {name: s.calls_per_step for name, s in REGISTRY.items()}
"""Model calls per step of every sampler (dopri5: per adaptive step); exact counts:
:func:`flowscore.sampler_registry.planned_calls`."""
EVALS_PER_STEP = {name: CALLS_PER_STEP[name] for name in FIXED_METHODS}
"""Model calls per step of the fixed-grid velocity integrators (older name; see :data:`CALLS_PER_STEP`)."""


# -- fields --------------------------------------------------------------------------------------------------
def _batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``(B,)`` tensor matching ``x``; a ``(B,)`` tensor is returned as is (same object)."""
    t = _validate.time(t, like=x)
    return t if t.dim() == 1 else t.expand(x.shape[0]).contiguous()


def as_field(model: Field, path: GaussianPath | str, prediction: str, kind: str = "velocity") -> Field:
    """The field ``(x, t) -> kind`` of a model that predicts ``prediction``.

    ``field(x, t) = path.convert(model(x, t), x, t, prediction, kind)`` (the model's output itself when
    ``prediction == kind``), with ``t`` passed to the model as a ``(B,)`` tensor through
    :func:`flowscore.conditioning.call_model` (a wrong output shape raises ``ValueError``).
    ``x``: ``(B, *dims)``; ``t``: float, 0-dim or ``(B,)``. Raises ``ValueError`` (from ``convert``) at a
    time where the conversion is singular.
    """
    path = get_path(path)
    _validate.choice(prediction, KINDS, "prediction")
    _validate.choice(kind, KINDS, "kind")
    if not callable(model):
        raise ValueError(f"model must be callable as model(x, t), got {type(model).__name__}")

    def field(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = _batch_time(t, x)
        out = call_model(model, x, t)
        return out if prediction == kind else path.convert(out, x, t, prediction, kind)

    return field


# -- time grids ----------------------------------------------------------------------------------------------
def _times(times: Sequence[float] | torch.Tensor, x: torch.Tensor, increasing: bool = True) -> torch.Tensor:
    """``times`` checked by :func:`flowscore.grids.check_times` (strictly increasing, or monotone either way
    when not ``increasing``), in the dtype and device of ``x``."""
    return check_times(times, increasing=True if increasing else None).to(dtype=x.dtype, device=x.device)


# -- ODE -----------------------------------------------------------------------------------------------------
def _fixed_step(field: Field, method: str, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One step of size ``h`` (0-dim) from ``(x, t)``, ``t`` shaped ``(B,)``."""
    if method == "euler":
        return x + h * field(x, t)
    if method == "midpoint":
        k1 = field(x, t)
        return x + h * field(x + 0.5 * h * k1, t + 0.5 * h)
    if method == "heun":
        k1 = field(x, t)
        k2 = field(x + h * k1, t + h)
        return x + 0.5 * h * (k1 + k2)
    k1 = field(x, t)
    k2 = field(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = field(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = field(x + h * k3, t + h)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


DOPRI5_MAX_STEPS = 10_000
"""Default bound on the adaptive steps of ``"dopri5"`` (``max_steps``): a stiff field would otherwise make it
take steps without end."""


def _dopri5(
    field: Field, x: torch.Tensor, times: torch.Tensor, rtol: float, atol: float, max_steps: int
) -> torch.Tensor:
    """torchdiffeq's dopri5 on ``times``, stopped with ``ValueError`` after about ``max_steps`` steps (counted
    as ``6 max_steps + 2`` evaluations of ``field``, steps rejected by the error control included)."""
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise ValueError(
            "method 'dopri5' needs torchdiffeq: pip install torchdiffeq (or flowscore[ode]); "
            "the fixed-step methods euler, midpoint, heun, rk4 need nothing"
        ) from None
    batch, calls, limit = x.shape[0], [0], spec("dopri5").calls_per_step * max_steps + 2

    def bounded(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > limit:
            raise ValueError(
                f"dopri5 took more than max_steps = {max_steps} steps (a stiff or non-smooth field at rtol = "
                f"{rtol:g}, atol = {atol:g}); raise max_steps, loosen rtol/atol, or use a fixed-step sampler"
            )
        return field(y, t.expand(batch).contiguous())

    # step_t: the adaptive steps land exactly on the last time instead of overshooting it and interpolating,
    # so the field is never evaluated outside [0, 1]
    return odeint(
        bounded,
        x,
        times,
        method="dopri5",
        rtol=rtol,
        atol=atol,
        options={"step_t": times[-1:]},
    )


def _sampler_or_method(sampler: str | None, method: str | None, default: str, what: str) -> str:
    """``sampler``, or the deprecated ``method=`` keyword (DeprecationWarning), or ``default``."""
    if method is not None:
        warnings.warn(
            f"{what}(method=...) is deprecated: pass sampler=... (one name for it everywhere)",
            DeprecationWarning,
            stacklevel=3,
        )
        if sampler is not None and sampler != method:
            raise ValueError(f"pass sampler= only (got sampler={sampler!r} and the older method={method!r})")
        sampler = method
    return default if sampler is None else sampler


def integrate(
    field: Field,
    x: torch.Tensor,
    times: torch.Tensor,
    sampler: str | None = None,
    *,
    method: str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = DOPRI5_MAX_STEPS,
    return_trajectory: bool = False,
    callback: Callback = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Solve :math:`dx/dt = field(x, t)` along a strictly monotone grid ``times`` (either direction).

    The engine of :func:`sample_ode` and of ``flowscore.likelihood``. ``x``: ``(B, *dims)``, the state at
    ``times[0]``; ``times``: ``(T,)``; ``sampler``: one of :data:`METHODS` (default ``"rk4"``; ``method=`` is
    its deprecated older name). Fixed-step methods take one step per interval; ``dopri5`` steps
    adaptively (``rtol``, ``atol``; ``ValueError`` after ``max_steps`` steps) and reports the state at each
    entry of ``times``. Returns the state at
    ``times[-1]``, and with ``return_trajectory`` also the ``(T, B, *dims)`` states at every entry of
    ``times``. ``callback``, if given, is called after each fixed step with a dict ``{"i", "t", "t_next",
    "x"}`` (the state after step ``i``); dopri5 calls it once, at the end.
    """
    x = _validate.batch(x, "x")
    method = _validate.choice(_sampler_or_method(sampler, method, "rk4", "integrate"), METHODS, "sampler")
    times = _times(times, x, increasing=False)
    if method == "dopri5":
        max_steps = _validate.positive_int(max_steps, "max_steps")
        trajectory = _dopri5(field, x, times, rtol, atol, max_steps)
        if callback is not None:
            grid = times.tolist()
            callback({"i": len(grid) - 2, "t": grid[0], "t_next": grid[-1], "x": trajectory[-1]})
        return (trajectory[-1], trajectory) if return_trajectory else trajectory[-1]
    states = [x]
    grid = times.tolist() if callback is not None else None  # one transfer, none inside the loop
    for i in range(times.shape[0] - 1):
        t = times[i].expand(x.shape[0]).contiguous()
        x = _fixed_step(field, method, x, t, times[i + 1] - times[i])
        if callback is not None:
            callback({"i": i, "t": grid[i], "t_next": grid[i + 1], "x": x})
        if return_trajectory:
            states.append(x)
    return (x, torch.stack(states)) if return_trajectory else x


def sample_ode(
    velocity_field: Field,
    x: torch.Tensor,
    times: Sequence[float] | torch.Tensor,
    sampler: str | None = None,
    *,
    method: str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = DOPRI5_MAX_STEPS,
    return_trajectory: bool = False,
    callback: Callback = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Integrate the probability-flow ODE :math:`dx/dt = u_t(x)` from ``times[0]`` to ``times[-1]``.

    Args:
        velocity_field: ``(x, t) -> u_t(x)``, ``x`` ``(B, *dims)``, ``t`` ``(B,)``.
        x: ``(B, *dims)`` starting points at ``times[0]`` (prior draws when ``times[0] = 0``).
        times: 1D strictly monotone grid in [0, 1] (t = 0 noise, t = 1 data), ``T >= 2`` entries;
            increasing samples (noise -> data), decreasing encodes (data -> noise).
        sampler: ``"euler"`` (the default; order 1, 1 evaluation per step), ``"midpoint"`` and ``"heun"``
            (order 2, 2 evaluations), ``"rk4"`` (order 4, 4 evaluations): one step per interval of
            ``times``; ``"dopri5"`` (adaptive, order 5, torchdiffeq) with tolerances ``rtol``, ``atol``,
            stopped with ``ValueError`` after ``max_steps`` steps. ``method=``: its deprecated older name.
        return_trajectory: also return the ``(T, B, *dims)`` states at every entry of ``times``.
        callback: called after each step, see :func:`integrate`.

    Returns:
        ``(B, *dims)`` state at ``times[-1]`` (and the trajectory). Runs in the caller's grad mode.
    """
    x = _validate.batch(x, "x")
    times = _times(times, x, increasing=False)
    return integrate(
        velocity_field,
        x,
        times,
        _sampler_or_method(sampler, method, "euler", "sample_ode"),
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        return_trajectory=return_trajectory,
        callback=callback,
    )


# -- SDE -----------------------------------------------------------------------------------------------------
def diffusion_schedule(
    path: GaussianPath | str, diffusion: Diffusion = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The squared diffusion :math:`g_t^2` of :func:`sample_sde`, a function of a ``(B,)`` tensor ``t``.

    * ``None`` or ``"linear"`` (the default): the linear path's ``"bounded"`` diffusion carried to ``path``
      at equal log-SNR, :math:`g_t^2 = \beta_t(\alpha'_t\beta_t - \alpha_t\beta'_t)/(\alpha_t + \beta_t)`.
      Every path is the linear one in other coordinates (:math:`x/(\alpha_t + \beta_t)` at linear's time
      :math:`\tau = \alpha_t/(\alpha_t + \beta_t)`), and this is the :math:`g` whose SDE in those
      coordinates is linear's: with the ``"linear"`` grid (:func:`flowscore.grids.time_grid`) the SDE
      samples alike on every path, as the probability-flow ODE does. On ``linear`` (``sigma_min = 0``) it is
      ``"bounded"`` exactly, ``1 - t``.
    * ``"bounded"``: :math:`g_t^2 = \tfrac12\alpha_t\,\mathrm{diffusion\_sq}(t) = \beta_t(\alpha'_t\beta_t -
      \alpha_t\beta'_t)`, computed from ``path.schedule`` in this division-free form. It is finite on all of
      [0, 1] (``1 - t`` on ``linear``), vanishes like beta at t = 1, and the drift :math:`u + \tfrac12 g^2 s
      = (1 + \alpha_t/2)\,u - (\alpha'_t/2)\,x` is bounded (``u - E/2`` on ``linear``, E the noise
      prediction): no t_eps is needed at t = 0 for a velocity model. Its size was chosen on the exact field
      of a mixture (``bench/bench_samplers.py``): a larger g inflates the modes at coarse steps, a smaller
      one corrects less of the model's error. On ``ve`` it injects far more relative noise at the noisy
      end than on ``linear`` (``bench/results/parity_sde.md``).
    * ``"score-sde"``: :math:`g_t^2 = ` ``path.diffusion_sq(t)``, the reverse of the score-SDE forward
      process. Infinite where alpha = 0 (t = 0 on ``linear``, ``vp``): start at ``t_eps``.
    * a float ``c >= 0``: ``c`` times the default (``c = 0`` is the ODE with Euler steps).
    * a callable ``t -> g_t^2`` returning a ``(B,)`` tensor.
    """
    path = get_path(path)
    if callable(diffusion) and not isinstance(diffusion, str):
        return diffusion
    if diffusion is None or isinstance(diffusion, str):
        name = _validate.choice(diffusion or DIFFUSIONS[0], DIFFUSIONS, "diffusion")
        if name == "score-sde":
            return path.diffusion_sq
        own = name == "bounded" or path == get_path("linear")  # on linear itself: its own g, exactly

        def bounded(t: torch.Tensor) -> torch.Tensor:
            s = path.schedule(t)
            return s.beta_det_v if own else s.beta_det_v / (s.alpha + s.beta)  # closed-form products

        return bounded
    if isinstance(diffusion, bool) or not isinstance(diffusion, (int, float)) or diffusion < 0:
        raise ValueError(
            f"diffusion must be None, a name in {DIFFUSIONS}, a float >= 0 or a callable, got {diffusion!r}"
        )
    base, scale = diffusion_schedule(path, None), float(diffusion)
    return lambda t: scale * base(t)


def final_step(
    path: GaussianPath, velocity_field: Field, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor
) -> torch.Tensor:
    r"""Deterministic jump from ``(x, t)`` to ``t_next``: ``x' = alpha(t_next) D + beta(t_next) E``.

    ``D`` and ``E`` are the data and noise predictions at ``(x, t)``, obtained from the velocity by
    ``path.convert`` (finite for t < 1). This is the DDIM step: exact for the probability-flow ODE when the
    posterior means do not change over the step. With ``t_next = 1`` on a path with beta_1 = 0 it returns the
    data prediction itself. ``x``: ``(B, *dims)``; ``t``: ``(B,)``; ``t_next``: 0-dim. Returns ``(B, *dims)``.
    """
    u = velocity_field(x, t)
    data_hat = path.convert(u, x, t, "velocity", "data")
    noise_hat = path.convert(u, x, t, "velocity", "noise")
    alpha, beta, _, _ = path.schedule(t_next)
    return alpha * data_hat + beta * noise_hat


def sample_sde(
    velocity_field: Field,
    score_field: Field,
    x: torch.Tensor,
    times: Sequence[float] | torch.Tensor,
    *,
    path: GaussianPath | str,
    diffusion: Diffusion = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    callback: Callback = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Euler--Maruyama on :math:`dX = [u_t(X) + \tfrac12 g_t^2 s_t(X)]\,dt + g_t\,dW`, t increasing.

    For any :math:`g` the Fokker--Planck equation of this SDE reduces to the continuity equation of the
    probability-flow ODE, so it keeps the path's marginals; ``diffusion`` chooses :math:`g_t^2`
    (:func:`diffusion_schedule`; default ``"linear"``, linear's diffusion at equal log-SNR,
    :math:`\beta_t(\alpha'_t\beta_t - \alpha_t\beta'_t)/(\alpha_t + \beta_t)`).

    Every interval of ``times`` but the last is one Euler--Maruyama step
    :math:`x \leftarrow x + h(u + \tfrac12 g^2 s) + \sqrt{g^2 h}\,z`, :math:`z \sim N(0, I)` drawn from
    ``generator``.
    The last interval ``[times[-2], times[-1]]`` is the deterministic :func:`final_step`
    (:math:`\alpha\hat x_{data} + \beta\hat\varepsilon` at ``times[-1]``), because the score is infinite at
    t = 1 where beta_1 = 0. So pass ``times`` ending ``[..., 1 - eps, 1]`` (what :func:`sample` does).

    Args:
        velocity_field, score_field: ``(x, t) -> (B, *dims)``, ``t`` ``(B,)``.
        x: ``(B, *dims)`` state at ``times[0]``.
        times: 1D strictly increasing grid in [0, 1], ``T >= 2`` entries.
        path: the Gaussian path (for ``g`` and the final step), an instance or a name.
        callback: called after each step with ``{"i", "t", "t_next", "x"}``.
    Returns:
        ``(B, *dims)`` state at ``times[-1]``, and with ``return_trajectory`` the ``(T, B, *dims)`` states.
    """
    path = get_path(path)
    x = _validate.batch(x, "x")
    times = _times(times, x)
    g_sq = diffusion_schedule(path, diffusion)
    states = [x]
    grid = times.tolist() if callback is not None else None
    for i in range(times.shape[0] - 2):
        t, h = times[i].expand(x.shape[0]).contiguous(), times[i + 1] - times[i]
        g2 = _validate.expand(g_sq(t), x)
        drift = velocity_field(x, t) + 0.5 * g2 * score_field(x, t)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + h * drift + torch.sqrt(g2 * h) * z
        states.append(x)
        if callback is not None:
            callback({"i": i, "t": grid[i], "t_next": grid[i + 1], "x": x})
    x = final_step(path, velocity_field, x, times[-2].expand(x.shape[0]).contiguous(), times[-1])
    states.append(x)
    if callback is not None:
        callback({"i": len(grid) - 2, "t": grid[-2], "t_next": grid[-1], "x": x})
    return (x, torch.stack(states)) if return_trajectory else x


# -- defaults ------------------------------------------------------------------------------------------------
DEFAULT_SAMPLER = "unipc"
"""The ODE sampler of :func:`sample` and :func:`encode` when ``sampler=None`` (for every prediction; chosen
from ``bench/bench_fewstep.py``, see ``bench/results/fewstep.md``)."""
DEFAULT_STEPS = {name: s.default_steps for name, s in REGISTRY.items()}
"""Steps when ``steps=None``, per sampler (dopri5 adapts its steps: the grid only sets the reported times)."""
DEFAULT_ODE_SAMPLER = DEFAULT_SAMPLER
"""The ODE solver of :func:`sample` (and of ``flowscore sample``, ``eval``, ``plot``) when none is named."""
DEFAULT_ODE_STEPS = DEFAULT_STEPS[DEFAULT_SAMPLER]
DEFAULT_SDE_STEPS = DEFAULT_STEPS["sde"]


def default_steps(sampler: str) -> int:
    """The default number of steps of ``sampler`` (:data:`DEFAULT_STEPS`)."""
    return DEFAULT_STEPS[_validate.choice(sampler, SAMPLERS, "sampler")]


DEFAULT_GRID = {name: s.default_grid for name, s in REGISTRY.items()}
"""Grid when ``grid=None``, per sampler."""


def defaults(sampler: str | None = None, steps: int | None = None, grid: str | None = None):
    """``(sampler, steps, grid)`` with every None replaced by flowscore's default (validated)."""
    declared = spec(DEFAULT_SAMPLER if sampler is None else sampler)
    steps = declared.default_steps if steps is None else _validate.positive_int(steps, "steps")
    grid = declared.default_grid if grid is None else _validate.choice(grid, GRIDS, "grid")
    sampler = declared.name
    return sampler, steps, grid


# -- the one-call sampler ------------------------------------------------------------------------------------
def _finite_at(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...] | torch.Tensor], t: float) -> bool:
    """Whether ``fn`` (coefficients at a 0-dim float64 time) is finite at ``t``, value checks off."""
    with validation(False), torch.no_grad():
        out = fn(torch.tensor(t, dtype=torch.float64))
    outs = out if isinstance(out, tuple) else (out,)
    return all(bool(torch.isfinite(o).all()) for o in outs)


def conversions_finite_at(path: GaussianPath, prediction: str, kinds: Sequence[str], t: float) -> bool:
    """Whether converting ``prediction`` to every kind in ``kinds`` is finite at time ``t`` on ``path``."""
    return all(
        _finite_at(lambda tt, k=k: conversion_coefficients(path.schedule(tt), prediction, k), t)
        for k in kinds
    )


def _needs(sampler: str, towards_data: bool) -> tuple[str, ...]:
    """The kinds of prediction a sampler evaluates at the grid points it calls the model on."""
    if sampler in METHODS:
        return ("velocity",)
    if sampler == "sde":
        return ("velocity", "score")
    if sampler == "edm-heun":
        return ("data", "noise")
    return ("data",) if towards_data else ("noise",)


def _start(path, prediction, sampler, t_first: float, t_eps: float, diffusion, towards_data: bool) -> float:
    """``t_first`` if every prediction the sampler needs is finite there, else ``t_eps`` inside it."""
    ok = conversions_finite_at(path, prediction, _needs(sampler, towards_data), t_first)
    if sampler == "sde":
        ok = ok and _finite_at(diffusion_schedule(path, diffusion), t_first)
    if ok:
        return t_first
    return t_eps if t_first == 0.0 else 1.0 - t_eps


def _grid_to(
    path: GaussianPath,
    sampler: str,
    prediction: str,
    steps: int,
    grid: str,
    first: float,
    end: float,
    t_eps: float,
    shift: float | None,
    final: bool,
) -> torch.Tensor:
    """The 1D float64 grid of ``steps`` steps from ``first`` to ``end`` (:func:`time_grid`); with ``final``
    its last step is the final step from ``end -/+ t_eps`` (towards data / noise) to ``end``, which needs
    ``steps >= 2`` (``ValueError``)."""
    if not final:
        return time_grid(path, steps, grid, t_start=first, t_end=end, shift=shift)
    if steps < 2:
        raise ValueError(
            f"steps must be >= 2 for sampler {sampler!r} with a {prediction} model on this path (the last "
            f"step is the deterministic final step to t = {end:g})"
        )
    inner_end = end - t_eps if end > first else end + t_eps
    inner = time_grid(path, steps - 1, grid, t_start=first, t_end=inner_end, shift=shift)
    return torch.cat([inner, torch.full((1,), end, dtype=torch.float64)])


def _needs_final_step(path, prediction, sampler, t_last: float) -> bool:
    """The velocity integrators (and ``sde``) close the last interval with :func:`final_step` when the
    velocity (or the score) is singular at the last time; ``sde`` always does."""
    if sampler == "sde":
        return True
    return sampler in METHODS and not conversions_finite_at(path, prediction, _needs(sampler, True), t_last)


class _Reuse:
    """The model, whose first call on the very ``x`` object at the time ``t_value`` returns ``out`` (a call
    already made) instead of calling it again."""

    def __init__(self, model: Field, x: torch.Tensor, t_value: float, out: torch.Tensor):
        self.model, self.x, self.t_value, self.out = model, x, t_value, out

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out, self.out = self.out, None
        if out is not None and x is self.x and bool((t == self.t_value).all()):
            return out
        return self.model(x, t)


def _probe_data_end(fn: _Counted, x: torch.Tensor, t_eps: float) -> tuple[float, Field]:
    """Where :func:`encode` starts by default: t = 1 if the model's output on ``x`` is finite there (that
    output is then reused by the first step: no extra model call), else ``1 - t_eps``.

    The exact marginal of a finite data set (``EmpiricalMarginal``) is singular at t = 1 (its fields divide
    by beta_1 = 0) though every conversion is finite there; such a model starts at ``1 - t_eps``.
    """
    t = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    with torch.no_grad(), validation(False):
        out = call_model(fn, x, t)
    if bool(torch.isfinite(out).all()):
        return 1.0, _Reuse(fn, x, 1.0, out)
    return 1.0 - t_eps, fn


class _Counted:
    """The model with a count of its calls (one call = one NFE, whatever the batch)."""

    def __init__(self, model: Field):
        self.model, self.calls = model, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x, t)


class _Monitor:
    """Callback that records, without a device sync, whether each step's state is finite (and the states
    for a trajectory), and forwards the step's dict (with the NFE so far) to the user's callback."""

    def __init__(self, counter: _Counted, callback: Callback, keep_states: bool):
        self.counter, self.callback, self.keep = counter, callback, keep_states
        self.flags: list[torch.Tensor] = []
        self.steps: list[tuple[float, float]] = []
        self.states: list[torch.Tensor] = []

    def __call__(self, info: dict) -> None:
        x = info["x"]
        self.flags.append(torch.isfinite(x).all())
        self.steps.append((info["t"], info["t_next"]))
        if self.keep:
            self.states.append(x)
        if self.callback is not None:
            self.callback({**info, "nfe": self.counter.calls})

    def check(self, x: torch.Tensor, what: str) -> None:
        """``ValueError`` naming the first step whose state holds NaN or Inf (one sync, here)."""
        if bool(torch.isfinite(x).all()):
            return
        bad = (~torch.stack(self.flags)).nonzero() if self.flags else torch.zeros(0)
        if bad.numel():
            i = int(bad[0, 0])
            t, t_next = self.steps[i]
            where = f"at step {i + 1} of {len(self.flags)} (t = {t:.6g} -> {t_next:.6g})"
        else:
            where = "at the end"
        raise ValueError(
            f"{what} produced NaN or Inf {where}; check the model's output there, or use more steps or "
            "another sampler"
        )


def _run(
    model: Field,
    path: GaussianPath,
    prediction: str,
    sampler: str,
    x: torch.Tensor,
    times: torch.Tensor,
    final: bool,
    callback: Callback,
    *,
    diffusion: Diffusion,
    rtol: float,
    atol: float,
    max_steps: int,
    generator: torch.Generator | None,
    sb_sigma: float | None = None,
) -> torch.Tensor:
    """Run ``sampler`` on the float64 ``times`` from ``x`` (no grad, value checks off), by its family
    (``sb-sde``: ``model`` is the SB drift and ``sb_sigma`` its diffusion)."""
    family = spec(sampler).family
    if sampler == "sb-sde":
        from .sbcfm import sample_sb_sde

        grid = times.to(dtype=x.dtype, device=x.device)
        return sample_sb_sde(model, x, grid, sb_sigma, generator=generator, callback=callback)
    if family == "log-snr":
        return EXPONENTIAL[sampler](model, x, times, path=path, prediction=prediction, callback=callback)
    if sampler == "dpm++2m-sde":
        return sample_dpmpp_2m_sde(
            model, x, times, path=path, prediction=prediction, generator=generator, callback=callback
        )
    grid = times.to(dtype=x.dtype, device=x.device)
    cached = LastCall(model)
    velocity = as_field(cached, path, prediction, "velocity")
    if sampler == "sde":
        score = as_field(cached, path, prediction, "score")
        return sample_sde(
            velocity, score, x, grid, path=path, diffusion=diffusion, generator=generator, callback=callback
        )
    ode_grid = grid[:-1] if final else grid
    x = integrate(
        velocity, x, ode_grid, sampler, rtol=rtol, atol=atol, max_steps=max_steps, callback=callback
    )
    if final:
        n = x.shape[0]
        x = final_step(path, velocity, x, ode_grid[-1].expand(n).contiguous(), grid[-1])
        if callback is not None:
            callback({"i": len(times) - 2, "t": float(times[-2]), "t_next": float(times[-1]), "x": x})
    return x


def _model_and_prediction(model: object, prediction: str | None, sampler: str | None = None) -> str:
    if not callable(model):
        raise ValueError(
            f"model must be callable as model(x, t) or model(x, t, y), got {type(model).__name__}"
        )
    if prediction is None:  # a wrapped model (flowscore.adapters) says what it predicts
        prediction = getattr(model, "prediction", None)
        prediction = prediction if isinstance(prediction, str) and prediction in KINDS else "velocity"
    accepts = KINDS if sampler is None else spec(sampler).accepts
    return _validate.choice(prediction, accepts, "prediction")


DEFAULT_SHAPE = (2,)
"""One sample's shape when ``shape`` is not given and the model does not know it (:func:`data_shape_of`)."""


def _inner_networks(model: object) -> list[object]:
    """``model`` and the networks it wraps (``Preconditioned``, ``torch.compile``, DDP, adapters)."""
    seen: list[object] = []
    while model is not None and all(model is not m for m in seen):
        seen.append(model)
        nxt = getattr(model, "wrapped_network", None)
        for name in ("_orig_mod", "module", "model"):
            if nxt is None and isinstance(getattr(model, name, None), torch.nn.Module):
                nxt = getattr(model, name)
        model = nxt
    return seen


def data_shape_of(model: object) -> tuple[int, ...] | None:
    """The shape of one sample that ``model`` is built for, or None where it is not known.

    The ``data_shape`` attribute of the model or of a network it wraps (``Preconditioned``, compiled, DDP)
    if one has it; else ``(dim,)`` for flowscore's built-in MLP (``config()["dim"]``). A built-in UNet knows
    its channels but not its image size: None (its channels are still checked by :func:`sample`).
    """
    from .models import MLP

    for net in _inner_networks(model):
        shape = getattr(net, "data_shape", None)
        if shape is not None:
            shape = tuple(shape)
            if all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape) and shape:
                return shape
    for net in _inner_networks(model):
        if isinstance(net, MLP):
            return (net.dim,)
    return None


def _sample_shape(model: object, shape: Sequence[int] | None) -> tuple[int, ...]:
    """``shape`` checked against what the model is built for, or that shape (or DEFAULT_SHAPE) if None."""
    from .models import UNet

    known = data_shape_of(model)
    unet = next((net for net in _inner_networks(model) if isinstance(net, UNet)), None)
    if shape is None:
        if known is None and unet is not None:
            raise ValueError(
                f"the UNet (channels = {unet.channels}) does not know its image size: pass "
                "shape=(C, H, W) (a run's data_shape: shape=run.data_shape)"
            )
        return known or DEFAULT_SHAPE
    shape = tuple(shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(
            f"shape must be a tuple of positive integers (the dims of one sample), got {shape!r}"
        )
    if known is not None and shape != known:
        raise ValueError(
            f"shape {shape} differs from the data shape {known} the model was built for; omit shape"
        )
    if unet is not None and (len(shape) != 3 or shape[0] != unet.channels):
        raise ValueError(f"shape {shape} does not fit the UNet: it needs (C, H, W) with C = {unet.channels}")
    return shape


def _explicit_times(times: object, increasing: bool) -> torch.Tensor:
    return check_times(times, increasing=increasing)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SampleResult:
    """What :func:`sample` and :func:`encode` return with ``return_info=True`` (the same fields always).

    Attributes:
        x: ``(n, *shape)`` the samples (or the codes of :func:`encode`).
        nfe: the number of model calls (a guided call on ``[x, x]`` counts once).
        times: ``(T,)`` float64, the grid the sampler ran on (dopri5: the reported times).
        trajectory: ``(T, n, *shape)`` the states at ``times`` with ``return_trajectory=True``, else None.
    """

    x: torch.Tensor
    nfe: int
    times: torch.Tensor
    trajectory: torch.Tensor | None = None


def _warn_flags(return_info: bool, return_nfe: bool, return_trajectory: bool, what: str) -> None:
    if not return_info and (return_nfe or return_trajectory):
        warnings.warn(
            f"{what}(..., return_nfe=/return_trajectory=) returning a tuple is deprecated: pass "
            "return_info=True for a SampleResult(x, nfe, times, trajectory) (return_trajectory=True: states)",
            DeprecationWarning,
            stacklevel=3,
        )


def _run_and_finish(
    counter: _Counted,
    fn: Field,
    *run: Any,
    callback: Callback,
    return_info: bool,
    return_trajectory: bool,
    return_nfe: bool,
    what: str,
    **options: Any,
) -> torch.Tensor | tuple | SampleResult:
    """``_run(fn, *run, monitor, **options)`` without gradients (``run``: path, prediction, sampler, x,
    times, final as :func:`_run` takes them; ``options``: its keywords), watched by a :class:`_Monitor` of
    ``counter`` (which counts ``fn``'s model calls), then :func:`_finish`: what :func:`sample` and
    :func:`encode` return."""
    x, times = run[3], run[4]
    monitor = _Monitor(counter, callback, return_trajectory)
    with torch.no_grad(), validation(False):
        out = _run(fn, *run, monitor, **options)
    return _finish(out, monitor, counter, times, return_info, return_trajectory, return_nfe, x, what)


def _finish(x, monitor, counter, times, return_info, return_trajectory, return_nfe, x_start, what):
    monitor.check(x, what)
    trajectory = torch.stack([x_start, *monitor.states]) if return_trajectory else None
    if return_info:
        return SampleResult(x, counter.calls, times, trajectory)
    out: tuple = (x,)
    if return_trajectory:
        out += (trajectory,)
    if return_nfe:
        out += (counter.calls,)
    return out[0] if len(out) == 1 else out


def sample(
    model: Field,
    path: GaussianPath | str,
    n: int | None = None,
    *,
    prediction: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    grid: str | None = None,
    times: Sequence[float] | torch.Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    x_init: torch.Tensor | None = None,
    t_start: float | None = None,
    y: torch.Tensor | None = None,
    guidance: float = 0.0,
    callback: Callback = None,
    return_nfe: bool = False,
    shift: float = SHIFT,
    t_eps: float = 1e-3,
    diffusion: Diffusion = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = DOPRI5_MAX_STEPS,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    return_trajectory: bool = False,
    return_info: bool = False,
) -> torch.Tensor | tuple | SampleResult:
    """Draw ``n`` samples ``(n, *shape)`` from a model of any prediction, noise (t = 0) -> data (t = 1).

    Args:
        model: ``model(x, t)`` (or ``model(x, t, y)`` with labels) predicting ``prediction``; called through
            :func:`flowscore.conditioning.call_model`, with ``t`` shaped ``(n,)``.
        path: the Gaussian path, an instance or a name.
        n: number of samples (may be omitted with ``x_init``).
        shape: the shape of one sample; None: what the model is built for (:func:`data_shape_of`: a
            ``data_shape`` attribute, or a built-in MLP's ``(dim,)``), else :data:`DEFAULT_SHAPE`. A shape
            that differs from the model's raises ``ValueError``; a built-in UNet needs it (its image size).
        prediction: ``"velocity"``, ``"score"``, ``"noise"`` or ``"data"``; None: the model's ``prediction``
            attribute if it has one (the wrappers of :mod:`flowscore.adapters` do), else ``"velocity"``.
        sampler: one of :data:`SAMPLERS`: the ODE samplers :data:`ODE_SAMPLERS` (euler, midpoint, heun,
            rk4, dopri5 on the velocity in t; ddim, dpm++2m, dpm++3m, unipc, edm-heun in log-SNR, see
            :mod:`flowscore.solvers`) or the SDE samplers :data:`SDE_SAMPLERS` (``"sde"``: Euler--Maruyama
            with ``diffusion``, :func:`sample_sde`; ``"dpm++2m-sde"``). None: :data:`DEFAULT_SAMPLER`.
        steps: intervals of the grid (None: :data:`DEFAULT_STEPS` of the sampler).
        grid: one of :data:`flowscore.grids.GRIDS` (None: :data:`DEFAULT_GRID` of the sampler; ``shift`` for
            ``"shift"``); see :func:`flowscore.grids.time_grid`.
        times: an explicit increasing grid in [0, 1] instead of ``steps``, ``grid`` and ``t_start``.
        x_init: ``(n, *shape)`` start states instead of prior draws (a model of a run trained from a data
            source, ``model.x_source``, starts from ``n`` of its held-out source points when None), at
            ``t_start`` if given, else where the
            grid starts (below): t = 0, or ``t_eps`` where a prediction the sampler needs is singular at 0
            (a score or noise model on ``linear``, ``vp``): ``x_init`` then stands for the state at ``t_eps``.
        y, guidance: integer labels ``(n,)`` (-1: none) and the classifier-free guidance weight w: the
            model becomes ``(1 + w) f(x, t, y) - w f(x, t, -1)`` in one batched call
            (:func:`flowscore.conditioning.guided_model`), for every sampler and prediction.
        callback: called after every step with a dict ``{"i", "t", "t_next", "x", "nfe", ...}``.
        return_info: return a :class:`SampleResult` ``(x, nfe, times, trajectory)``, the same fields always.
        return_trajectory: keep the states on the grid (``SampleResult.trajectory``).
        return_nfe: deprecated (with ``return_trajectory`` and without ``return_info``, the older tuples):
            the number of model calls, ``SampleResult.nfe``.
        rtol, atol, max_steps: ``"dopri5"``'s tolerances and bound on its steps (:func:`integrate`).

    The grid: it starts at ``t_start`` if given, else at t = 0 if every prediction the sampler evaluates there
    is finite (the velocity, the score for ``"sde"``, the data prediction for the log-SNR samplers; from a
    noise or score model the data prediction is singular where alpha = 0), else at ``t_eps``; prior draws
    then stand for samples at that time, scaled to ``N(0, beta_start^2 I)`` (the data's share
    ``alpha x_data`` neglected). The log-SNR samplers end at t = 1 with the data prediction. The velocity
    integrators end at t = 1 if the velocity is finite there, else (a data model on a path with beta_1 = 0),
    and always for ``"sde"``, at ``1 - t_eps`` followed by one :func:`final_step` to t = 1. For ``"dopri5"``
    the grid only sets the reported times.

    Runs under ``torch.no_grad()`` with the value checks off inside the loop; the samples are checked to be
    finite once at the end (``ValueError`` naming the first step where NaN or Inf appeared).

    Returns: ``(n, *shape)`` samples; with ``return_info`` a :class:`SampleResult`. (Deprecated: without
    ``return_info``, ``return_trajectory`` adds the ``(T, n, *shape)`` states and ``return_nfe`` the number
    of model calls to a tuple, in that order.)

    A two-time (flow-map) model (``model.two_time``) is sampled by ``steps`` jumps instead
    (:func:`flowscore.flowmaps.sample_jumps`).
    """
    _warn_flags(return_info, return_nfe, return_trajectory, "sample")
    if getattr(model, "two_time", False):  # a flow-map model: K jumps (flowscore.flowmaps)
        from .flowmaps import sample_two_time

        return sample_two_time(model, path, n, locals())
    from .sbcfm import check_sampler, sb_model_of

    sampler = check_sampler(model, sampler)  # an SB-CFM model: euler by default, no Gaussian-path sampler
    path = get_path(path)
    sampler, steps, grid = defaults(sampler, steps, grid)
    prediction = _model_and_prediction(model, prediction, sampler)
    t_eps = _validate.t_eps(t_eps, allow_zero=False)
    x_init = _from_source(model, sampler, n, x_init, y, generator)
    if x_init is not None:
        x_init = _validate.batch(x_init, "x_init")
        if n is not None and n != x_init.shape[0]:
            raise ValueError(f"n = {n!r} differs from the {x_init.shape[0]} rows of x_init; omit n")
        n, shape, dtype, device = x_init.shape[0], tuple(x_init.shape[1:]), x_init.dtype, x_init.device
    else:
        if n is None:
            raise ValueError("n (the number of samples) is required unless x_init is given")
        n = _validate.positive_int(n, "n")
        shape = _sample_shape(model, shape)
    if y is not None:
        check_labels(y, n)
    sb = sb_model_of(model) if sampler == "sb-sde" else None
    fn = guided_model(model if sb is None else sb.drift, y, guidance)
    if times is not None:
        times = _explicit_times(times, increasing=True)
    else:
        first = (
            _validate.number(t_start, "t_start", 0.0, 1.0, high_open=True) if t_start is not None else None
        )
        if first is None:
            first = 0.0 if sb is not None else _start(path, prediction, sampler, 0.0, t_eps, diffusion, True)
        final = _needs_final_step(path, prediction, sampler, 1.0)
        times = _grid_to(path, sampler, prediction, steps, grid, first, 1.0, t_eps, shift, final)
    final = _needs_final_step(path, prediction, sampler, float(times[-1]))
    dtype = dtype or torch.get_default_dtype()
    check_sample_memory(n, shape, dtype, device, len(times) if return_trajectory else 0)
    if x_init is None:
        x = path.sample_prior((n, *shape), generator=generator, dtype=dtype, device=device)
        t0 = float(times[0])
        if t0 > 0:
            x = x * float(path.beta(torch.tensor(t0, dtype=torch.float64)) / path.prior_std)
    else:
        x = x_init
    counter = _Counted(fn)
    return _run_and_finish(
        counter, counter, path, prediction, sampler, x, times, final, callback=callback, diffusion=diffusion,
        rtol=rtol, atol=atol, max_steps=max_steps, generator=generator,
        sb_sigma=None if sb is None else sb.sb_sigma, return_info=return_info,
        return_trajectory=return_trajectory, return_nfe=return_nfe, what=f"sampler {sampler!r}",
    )  # fmt: skip


ANY_SOURCE_SAMPLERS = ("sb-sde",)
"""The stochastic samplers that need no Gaussian source (``sb-sde``: Schrödinger-bridge CFM's SDE, whose score
term is a head of the model, :mod:`flowscore.sbcfm`); the other SDE samplers use the path's score."""


def _from_source(
    model: Field,
    sampler: str,
    n: int | None,
    x_init: torch.Tensor | None,
    y: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor | None:
    """``x_init``, or for a model of a run trained from a data source (``load_run`` gives it the run's
    held-out source points, encoded, as ``model.x_source``) ``n`` of those points
    (:func:`flowscore.source_data.start_points`); SDE samplers are refused for such a model (they need the
    Gaussian source's score)."""
    x_source = getattr(model, "x_source", None)
    if not isinstance(x_source, torch.Tensor):
        return x_init
    if sampler in SDE_SAMPLERS and sampler not in ANY_SOURCE_SAMPLERS:
        raise ValueError(
            f"sampler {sampler!r}: this model was trained from a data source, and SDE sampling needs the "
            "score of a Gaussian source (docs/theory.md section 17); use an ODE sampler"
        )
    if x_init is not None:
        return x_init
    if n is None:
        raise ValueError("n (the number of samples) is required unless x_init is given")
    from .source_data import start_points

    n = _validate.positive_int(n, "n")
    return start_points(x_source, n, labels=getattr(model, "x_source_labels", None), y=y, generator=generator)


def encode(
    model: Field,
    path: GaussianPath | str,
    x_data: torch.Tensor,
    *,
    prediction: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    grid: str | None = None,
    times: Sequence[float] | torch.Tensor | None = None,
    t_start: float | None = None,
    t_end: float = 0.0,
    y: torch.Tensor | None = None,
    guidance: float = 0.0,
    callback: Callback = None,
    return_nfe: bool = False,
    shift: float = SHIFT,
    t_eps: float = 1e-3,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = DOPRI5_MAX_STEPS,
    return_trajectory: bool = False,
    return_info: bool = False,
) -> torch.Tensor | tuple | SampleResult:
    """Map data to noise with the probability-flow ODE: the inverse of :func:`sample` with the same solvers.

    Integrates from ``t_start`` (default t = 1, or ``1 - t_eps`` where a prediction the sampler needs is
    singular at t = 1, e.g. the noise prediction of a data model, or where the model's own output on
    ``x_data`` at t = 1 is not finite, e.g. the exact marginal of a finite data set, whose fields divide by
    beta_1 = 0: one probing call, counted in the NFE, tells; ``x_data`` then stands for the state at ``1 -
    t_eps``) down to ``t_end`` (default 0). ``x_data``: ``(B, *dims)``; ``sampler``: one of
    :data:`ODE_SAMPLERS` (None: :data:`DEFAULT_SAMPLER`); ``times``: an explicit decreasing grid. The log-SNR
    samplers step on the noise prediction (the mirror image of sampling) and end at ``t_end`` with it; the
    velocity integrators end with :func:`final_step` where the velocity is singular at ``t_end``. Other
    arguments as :func:`sample`. Returns ``(B, *dims)`` states at ``t_end`` (and the trajectory, and the NFE).

    Accuracy at the noise end: where alpha = 0 at ``t_end`` (t = 0 on ``linear``, ``vp``: sigma = infinity),
    the log-SNR samplers' last step is the first-order ``x = beta E`` from the grid's last finite sigma
    (``sigma_max``, 80 by default): the noise prediction's change beyond it is neglected, a relative error
    floor of order ``1 / sigma_max`` that more steps do not remove. Pass ``times=`` from
    :func:`flowscore.grids.time_grid` with a larger ``sigma_max`` (and more steps), or end at ``t_end > 0``.
    """
    _warn_flags(return_info, return_nfe, return_trajectory, "encode")
    from .sbcfm import check_sampler

    sampler = check_sampler(model, sampler)  # an SB-CFM model: euler by default, no log-SNR solver
    path = get_path(path)
    sampler, steps, grid = defaults(sampler, steps, grid)
    prediction = _model_and_prediction(model, prediction, sampler)
    if not spec(sampler).encodes:
        raise ValueError(f"encode needs an ODE sampler, one of {ODE_SAMPLERS}; got {sampler!r}")
    t_eps = _validate.t_eps(t_eps, allow_zero=False)
    x = _validate.batch(x_data, "x_data")
    if y is not None:
        check_labels(y, x.shape[0])
    counter = _Counted(guided_model(model, y, guidance))
    fn: Field = counter
    if times is not None:
        times = _explicit_times(times, increasing=False)
    else:
        t_end = _validate.number(t_end, "t_end", 0.0, 1.0)
        first = _validate.number(t_start, "t_start", 0.0, 1.0) if t_start is not None else None
        if first is None:
            first = _start(path, prediction, sampler, 1.0, t_eps, None, False)
            if first == 1.0:
                first, fn = _probe_data_end(fn, x, t_eps)
        if not first > t_end:
            raise ValueError(
                f"t_start ({first}) must be later than t_end ({t_end}): encode runs data -> noise"
            )
        final = sampler in METHODS and not conversions_finite_at(path, prediction, ("velocity",), t_end)
        times = _grid_to(path, sampler, prediction, steps, grid, first, t_end, t_eps, shift, final)
    final = sampler in METHODS and not conversions_finite_at(
        path, prediction, ("velocity",), float(times[-1])
    )
    return _run_and_finish(
        counter, fn, path, prediction, sampler, x, times, final, callback=callback, diffusion=None, rtol=rtol,
        atol=atol, max_steps=max_steps, generator=None, return_info=return_info,
        return_trajectory=return_trajectory, return_nfe=return_nfe, what=f"encode with {sampler!r}",
    )  # fmt: skip
