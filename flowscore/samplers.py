r"""Samplers: integrate from the prior at t = 0 (noise) to t = 1 (data), k-diffusion style.

Plain functions over ``(field, x, times)``: a *field* is any callable ``field(x, t)`` with ``x`` shaped
``(B, *dims)`` and ``t`` shaped ``(B,)``, returning ``(B, *dims)``.

* :func:`as_field` turns a model of any prediction (velocity, score, noise, data) into the field of another
  kind through ``path.convert``.
* :func:`sample_ode` integrates the probability-flow ODE :math:`dx/dt = u_t(x)` (euler, midpoint, heun, rk4 on
  the given grid; dopri5, adaptive, via torchdiffeq).
* :func:`sample_sde` runs Euler--Maruyama on :math:`dX = [u_t + \tfrac12 g_t^2 s_t]\,dt + g_t\,dW`, whose
  marginals are the path's for every :math:`g` (Fokker--Planck), then a final deterministic step to t = 1.
* :func:`sample` does it all for a model: prior draws, time grid, conversions, solver.

Endpoints. Some conversions are singular at an endpoint (``flowscore.conversions``): from a score or noise
model the velocity is infinite at t = 0 where alpha_0 = 0 (``linear``, ``vp``), and from a data model it is
infinite at t = 1 where beta_1 = 0; the score is infinite at t = 1 for every model. :func:`sample` checks each
endpoint in float64 and, where a field it needs is singular there, uses ``t_eps`` (start) or ``1 - t_eps``
(end) instead; it then treats the prior draw as a sample at ``t_eps`` and closes the gap to t = 1 with the
deterministic step of :func:`final_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import _validate
from ._validate import validation
from .conversions import KINDS, conversion_coefficients
from .paths import GaussianPath, get_path

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Diffusion = None | float | str | Callable[[torch.Tensor], torch.Tensor]

FIXED_METHODS = ("euler", "midpoint", "heun", "rk4")
METHODS = FIXED_METHODS + ("dopri5",)
SAMPLERS = METHODS + ("sde",)
DIFFUSIONS = ("bounded", "score-sde")
# model evaluations per step of the fixed-grid methods
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
DEFAULT_ODE_SAMPLER = "rk4"
"""The ODE solver of :func:`sample` (and of ``flowscore sample``, ``eval``, ``plot``) when none is named."""
DEFAULT_ODE_STEPS = 100
DEFAULT_SDE_STEPS = 1000
"""Default steps: ``DEFAULT_SDE_STEPS`` for ``"sde"`` (Euler-Maruyama is first order), else
``DEFAULT_ODE_STEPS`` (quality against steps: ``bench/RESULTS.md``)."""


def default_steps(sampler: str) -> int:
    """The default number of steps of ``sampler``: :data:`DEFAULT_SDE_STEPS` or :data:`DEFAULT_ODE_STEPS`."""
    return DEFAULT_SDE_STEPS if sampler == "sde" else DEFAULT_ODE_STEPS


# -- fields --------------------------------------------------------------------------------------------------
def _batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``(B,)`` tensor matching ``x``; a ``(B,)`` tensor is returned as is (same object)."""
    t = _validate.time(t, like=x)
    return t if t.dim() == 1 else t.expand(x.shape[0]).contiguous()


def as_field(model: Field, path: GaussianPath | str, prediction: str, kind: str = "velocity") -> Field:
    """The field ``(x, t) -> kind`` of a model that predicts ``prediction``.

    ``field(x, t) = path.convert(model(x, t), x, t, prediction, kind)`` (the model's output itself when
    ``prediction == kind``), with ``t`` passed to the model as a ``(B,)`` tensor. ``x``: ``(B, *dims)``;
    ``t``: float, 0-dim or ``(B,)``. Raises ``ValueError`` (from ``convert``) at a time where the
    conversion is singular.
    """
    path = get_path(path)
    _validate.choice(prediction, KINDS, "prediction")
    _validate.choice(kind, KINDS, "kind")
    if not callable(model):
        raise ValueError(f"model must be callable as model(x, t), got {type(model).__name__}")

    def field(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = _batch_time(t, x)
        out = model(x, t)
        return out if prediction == kind else path.convert(out, x, t, prediction, kind)

    return field


class _LastCallCache:
    """Wraps a model so that a second call with the very same ``x`` and ``t`` objects reuses the output.

    :func:`sample_sde` asks for the velocity and the score at the same point: with both fields built on one
    cached model (``as_field``) the model runs once per step.
    """

    def __init__(self, model: Field):
        self.model = model
        self._key: tuple[torch.Tensor, torch.Tensor] | None = None
        self._out: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._key is None or self._key[0] is not x or self._key[1] is not t:
            self._key, self._out = (x, t), self.model(x, t)
        return self._out


# -- time grids ----------------------------------------------------------------------------------------------
def _times(times: Sequence[float] | torch.Tensor, x: torch.Tensor, increasing: bool = True) -> torch.Tensor:
    """``times`` as a 1D tensor (dtype and device of ``x``), >= 2 entries, strictly monotone, in [0, 1]."""
    if not isinstance(times, torch.Tensor):
        times = torch.as_tensor(list(times), dtype=torch.float64)
    times = _validate.tensor(times, "times").to(dtype=x.dtype, device=x.device)
    if times.dim() != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1D grid with at least 2 entries, got shape {tuple(times.shape)}")
    steps = times[1:] - times[:-1]
    if increasing and not bool((steps > 0).all()):
        raise ValueError("times must be strictly increasing (t = 0 noise -> t = 1 data)")
    if not increasing and not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError("times must be strictly monotone")
    return _validate.time(times, name="times")


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


def _dopri5(field: Field, x: torch.Tensor, times: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise ValueError(
            "method 'dopri5' needs torchdiffeq: pip install torchdiffeq (or flowscore[ode]); "
            "the fixed-step methods euler, midpoint, heun, rk4 need nothing"
        ) from None
    batch = x.shape[0]
    # step_t: the adaptive steps land exactly on the last time instead of overshooting it and interpolating,
    # so the field is never evaluated outside [0, 1]
    return odeint(
        lambda t, y: field(y, t.expand(batch).contiguous()),
        x,
        times,
        method="dopri5",
        rtol=rtol,
        atol=atol,
        options={"step_t": times[-1:]},
    )


def integrate(
    field: Field,
    x: torch.Tensor,
    times: torch.Tensor,
    method: str = "rk4",
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Solve :math:`dx/dt = field(x, t)` along a strictly monotone grid ``times`` (either direction).

    The engine of :func:`sample_ode` and of ``flowscore.likelihood``. ``x``: ``(B, *dims)``, the state at
    ``times[0]``; ``times``: ``(T,)``. Fixed-step methods take one step per interval; ``dopri5`` steps
    adaptively (``rtol``, ``atol``) and reports the state at each entry of ``times``. Returns the state at
    ``times[-1]``, and with ``return_trajectory`` also the ``(T, B, *dims)`` states at every entry of
    ``times``.
    """
    x = _validate.batch(x, "x")
    _validate.choice(method, METHODS, "method")
    times = _times(times, x, increasing=False)
    if method == "dopri5":
        trajectory = _dopri5(field, x, times, rtol, atol)
        return (trajectory[-1], trajectory) if return_trajectory else trajectory[-1]
    states = [x]
    for i in range(times.shape[0] - 1):
        t = times[i].expand(x.shape[0]).contiguous()
        x = _fixed_step(field, method, x, t, times[i + 1] - times[i])
        if return_trajectory:
            states.append(x)
    return (x, torch.stack(states)) if return_trajectory else x


def sample_ode(
    velocity_field: Field,
    x: torch.Tensor,
    times: Sequence[float] | torch.Tensor,
    method: str = "euler",
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Integrate the probability-flow ODE :math:`dx/dt = u_t(x)` from ``times[0]`` to ``times[-1]``.

    Args:
        velocity_field: ``(x, t) -> u_t(x)``, ``x`` ``(B, *dims)``, ``t`` ``(B,)``.
        x: ``(B, *dims)`` starting points at ``times[0]`` (prior draws when ``times[0] = 0``).
        times: 1D strictly increasing grid in [0, 1] (t = 0 noise, t = 1 data), ``T >= 2`` entries.
        method: ``"euler"`` (order 1, 1 evaluation per step), ``"midpoint"`` and ``"heun"`` (order 2, 2
            evaluations), ``"rk4"`` (order 4, 4 evaluations): one step per interval of ``times``;
            ``"dopri5"`` (adaptive, order 5, torchdiffeq) with tolerances ``rtol``, ``atol``.
        return_trajectory: also return the ``(T, B, *dims)`` states at every entry of ``times``.

    Returns:
        ``(B, *dims)`` state at ``times[-1]`` (and the trajectory). Runs in the caller's grad mode.
    """
    x = _validate.batch(x, "x")
    times = _times(times, x)
    return integrate(
        velocity_field, x, times, method, rtol=rtol, atol=atol, return_trajectory=return_trajectory
    )


# -- SDE -----------------------------------------------------------------------------------------------------
def diffusion_schedule(
    path: GaussianPath | str, diffusion: Diffusion = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The squared diffusion :math:`g_t^2` of :func:`sample_sde`, a function of a ``(B,)`` tensor ``t``.

    * ``None`` or ``"bounded"`` (the default): :math:`g_t^2 = \tfrac12\alpha_t\,\mathrm{diffusion\_sq}(t)
      = \beta_t(\alpha'_t\beta_t - \alpha_t\beta'_t)`, computed from ``path.schedule`` in this division-free
      form. It is finite on all of [0, 1] (``1 - t`` on ``linear``), vanishes like beta at t = 1, and the
      drift :math:`u + \tfrac12 g^2 s = (1 + \alpha_t/2)\,u - (\alpha'_t/2)\,x` is bounded (``u - E/2`` on
      ``linear``, E the noise prediction): no t_eps is needed at t = 0 for a velocity model. Chosen by
      measurement on the exact field of 8 Gaussians (radius 2, std 0.15), 20000 samples, within-mode variance
      over the true one (1 is exact, standard error 0.007), velocity model, 25 / 100 steps:
      ``linear`` 1.014 / 1.005, ``vp`` 1.034 / 1.000 for this g; twice this g: 1.063 / 1.011 and
      1.135 / 1.025; ``"score-sde"``: 1.072 / 1.022 and 1.142 / 1.024 (a larger g inflates the modes at
      coarse steps; a smaller one corrects less of the model's error).
    * ``"score-sde"``: :math:`g_t^2 = ` ``path.diffusion_sq(t)``, the reverse of the score-SDE forward
      process. Infinite where alpha = 0 (t = 0 on ``linear``, ``vp``): start at ``t_eps``.
    * a float ``c >= 0``: ``c`` times the default (``c = 0`` is the ODE with Euler steps).
    * a callable ``t -> g_t^2`` returning a ``(B,)`` tensor.
    """
    path = get_path(path)
    if callable(diffusion) and not isinstance(diffusion, str):
        return diffusion
    if diffusion is None or isinstance(diffusion, str):
        name = _validate.choice(diffusion or "bounded", DIFFUSIONS, "diffusion")
        if name == "score-sde":
            return path.diffusion_sq

        def bounded(t: torch.Tensor) -> torch.Tensor:
            return path.schedule(t).beta_det_v  # beta (alpha' beta - alpha beta'), closed-form product

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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Euler--Maruyama on :math:`dX = [u_t(X) + \tfrac12 g_t^2 s_t(X)]\,dt + g_t\,dW`, t increasing.

    For any :math:`g` the Fokker--Planck equation of this SDE reduces to the continuity equation of the
    probability-flow ODE, so it keeps the path's marginals; ``diffusion`` chooses :math:`g_t^2`
    (:func:`diffusion_schedule`; default ``"bounded"``, :math:`\beta_t(\alpha'_t\beta_t - \alpha_t\beta'_t)`).

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
    Returns:
        ``(B, *dims)`` state at ``times[-1]``, and with ``return_trajectory`` the ``(T, B, *dims)`` states.
    """
    path = get_path(path)
    x = _validate.batch(x, "x")
    times = _times(times, x)
    g_sq = diffusion_schedule(path, diffusion)
    states = [x]
    for i in range(times.shape[0] - 2):
        t, h = times[i].expand(x.shape[0]).contiguous(), times[i + 1] - times[i]
        g2 = _validate.expand(g_sq(t), x)
        drift = velocity_field(x, t) + 0.5 * g2 * score_field(x, t)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + h * drift + torch.sqrt(g2 * h) * z
        states.append(x)
    x = final_step(path, velocity_field, x, times[-2].expand(x.shape[0]).contiguous(), times[-1])
    states.append(x)
    return (x, torch.stack(states)) if return_trajectory else x


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


def _grid(path, prediction, sampler, steps, t_eps, diffusion, dtype, device) -> tuple[torch.Tensor, bool]:
    """``(times, needs_final_step)``: ``steps`` intervals from 0 (or t_eps) to 1, see :func:`sample`."""
    kinds = ("velocity", "score") if sampler == "sde" else ("velocity",)
    start_ok = conversions_finite_at(path, prediction, kinds, 0.0)
    if sampler == "sde":
        start_ok = start_ok and _finite_at(diffusion_schedule(path, diffusion), 0.0)
    t_start = 0.0 if start_ok else t_eps
    final = sampler == "sde" or not conversions_finite_at(path, prediction, kinds, 1.0)
    if final and steps < 2:
        raise ValueError(
            f"steps must be >= 2 for sampler {sampler!r} with a {prediction} model on this path "
            "(the last step is the deterministic final step from 1 - t_eps)"
        )
    if final:
        inner = torch.linspace(t_start, 1 - t_eps, steps, dtype=torch.float64)
        times = torch.cat([inner, torch.ones(1, dtype=torch.float64)])
    else:
        times = torch.linspace(t_start, 1.0, steps + 1, dtype=torch.float64)
    return times.to(dtype=dtype, device=device), final


def _check_sample_args(n: int, steps: int, sampler: str, t_eps: float, shape: tuple[int, ...]) -> None:
    for name, value in (("n", n), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _validate.choice(sampler, SAMPLERS, "sampler")
    if not 0 < t_eps < 0.5:
        raise ValueError(f"t_eps must lie in (0, 0.5), got {t_eps!r}")
    if not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ValueError(
            f"shape must be a tuple of positive integers (the dims of one sample), got {shape!r}"
        )


def sample(
    model: Field,
    path: GaussianPath | str,
    n: int,
    *,
    prediction: str = "velocity",
    sampler: str | None = None,
    steps: int | None = None,
    shape: tuple[int, ...] = (2,),
    t_eps: float = 1e-3,
    diffusion: Diffusion = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` samples ``(n, *shape)`` from a model of any prediction, noise (t = 0) -> data (t = 1).

    Steps: ``x = path.sample_prior((n, *shape))``; build a grid of ``steps`` intervals; run ``sampler``
    (``"euler"``, ``"midpoint"``, ``"heun"``, ``"rk4"``, ``"dopri5"``: :func:`sample_ode` on the velocity;
    ``"sde"``: :func:`sample_sde` on the velocity and score, ``diffusion`` as there). ``sampler=None``:
    :data:`DEFAULT_ODE_SAMPLER`; ``steps=None``: :func:`default_steps` of the sampler. The model is called as
    ``model(x, t)`` with ``t`` ``(n,)`` and converted by :func:`as_field` (one model call per field
    evaluation, also for the SDE). Runs under ``torch.no_grad()`` with the value checks off inside the loop.

    The grid: it starts at t = 0 if every field needed (and ``g``, for ``"sde"``) is finite there, else at
    ``t_eps`` (then the prior draw stands in for a sample at ``t_eps``: a bias of order ``t_eps``). ODE: it
    ends at t = 1 if the velocity is finite there (``linspace(start, 1, steps + 1)``); otherwise (a data
    model on a path with beta_1 = 0) and always for ``"sde"``, it is ``linspace(start, 1 - t_eps, steps)``
    followed by one :func:`final_step` to t = 1. For ``"dopri5"`` the grid only sets the reported times.

    Returns ``(n, *shape)`` samples, and with ``return_trajectory`` the ``(T, n, *shape)`` states on the grid.
    """
    path = get_path(path)
    shape = tuple(shape)
    sampler = DEFAULT_ODE_SAMPLER if sampler is None else sampler
    steps = default_steps(sampler) if steps is None else steps
    _check_sample_args(n, steps, sampler, t_eps, shape)
    _validate.choice(prediction, KINDS, "prediction")
    dtype = dtype or torch.get_default_dtype()
    times, final = _grid(path, prediction, sampler, steps, t_eps, diffusion, dtype, device)
    cached = _LastCallCache(model)
    velocity = as_field(cached, path, prediction, "velocity")
    x = path.sample_prior((n, *shape), generator=generator, dtype=dtype, device=device)
    with torch.no_grad(), validation(False):
        if sampler == "sde":
            score = as_field(cached, path, prediction, "score")
            return sample_sde(
                velocity,
                score,
                x,
                times,
                path=path,
                diffusion=diffusion,
                generator=generator,
                return_trajectory=return_trajectory,
            )
        ode_times = times[:-1] if final else times
        out = sample_ode(
            velocity, x, ode_times, sampler, rtol=rtol, atol=atol, return_trajectory=return_trajectory
        )
        x, trajectory = out if return_trajectory else (out, None)
        if final:
            x = final_step(path, velocity, x, ode_times[-1].expand(n).contiguous(), times[-1])
            trajectory = torch.cat([trajectory, x[None]]) if return_trajectory else None
    return (x, trajectory) if return_trajectory else x
