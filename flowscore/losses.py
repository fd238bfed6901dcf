r"""The four training objectives on a Gaussian path :math:`x = \alpha_t x_{data} + \beta_t \varepsilon`.

=========  ==========  ===========================================================================
objective  space       target at ``x = path.sample(x_data, t, noise)``
=========  ==========  ===========================================================================
``cfm``    velocity    conditional :math:`u_t(x|x_{data}) = \alpha'_t x_{data} + \beta'_t \varepsilon`
``fm``     velocity    marginal :math:`u_t(x)` (``marginal.velocity(x, t)``, exact)
``dsm``    score       conditional :math:`\nabla_x \log p_t(x|x_{data}) = -\varepsilon/\beta_t`
``sm``     score       marginal :math:`\nabla_x \log p_t(x)` (``marginal.score(x, t)``, exact)
=========  ==========  ===========================================================================

Each loss is :math:`E_{t, x_{data}, \varepsilon}\, \lambda(t) \lVert f_\theta(x, t) - \text{target}\rVert^2`,
the squared norm summed over the dims of a sample and averaged over the batch. The model ``model(x, t)``
may predict any of the four kinds (``prediction=``); its output is mapped into the objective's space with
``path.convert``. The theorems: ``grad L_FM = grad L_CFM`` and ``grad L_SM = grad L_DSM``; the losses
differ by the constant loss floor (:mod:`flowscore.floor`).

Times. With ``t=None`` times are drawn by ``time_sampler`` inside ``[t_eps, 1 - t_eps]``; a given ``t`` is
clamped into the same interval. This keeps every conversion and every weighting finite: the score target
``-noise/beta`` and the conversions out of a ``data`` or ``noise`` prediction divide by ``beta_t`` or
``alpha_t``, which vanish at the endpoints. ``t_eps=0`` is allowed; a singular quantity then raises
``ValueError`` (as ``path.convert`` does) instead of returning Inf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from . import _validate
from .conversions import KINDS
from .paths import GaussianPath, get_path

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TimeSampler = Callable[[int, "torch.Generator | None"], torch.Tensor]
Weighting = Callable[[torch.Tensor], torch.Tensor]

OBJECTIVES: dict[str, str] = {"cfm": "velocity", "fm": "velocity", "dsm": "score", "sm": "score"}
"""Each objective and the space (kind) its regression is done in."""
WEIGHTINGS = ("noise", "likelihood")
TIME_SAMPLERS = ("uniform", "logit-normal")
REDUCTIONS = ("mean", "sum", "none")


class Marginal(Protocol):
    """What ``fm``/``sm`` need: the path and the exact marginal fields (e.g. ``EmpiricalMarginal``)."""

    path: GaussianPath

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


# -- shared pieces: times, weights, predictions ------------------------------------------------------------
def _check_t_eps(t_eps: float) -> float:
    if isinstance(t_eps, bool) or not isinstance(t_eps, (int, float)) or not 0 <= t_eps < 0.5:
        raise ValueError(f"t_eps must be a number in [0, 0.5), got {t_eps!r}")
    return float(t_eps)


def logit_normal(mean: float = 0.0, std: float = 1.0) -> TimeSampler:
    """A time sampler ``(n, generator) -> sigmoid(N(mean, std^2))`` (SD3's logit-normal), shaped ``(n,)``."""
    if not std > 0:
        raise ValueError(f"std must be positive, got {std!r}")

    def sampler(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else "cpu"
        z = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
        return torch.sigmoid(mean + std * z)

    return sampler


def sample_time(
    n: int,
    *,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(n,)`` training times in ``[t_eps, 1 - t_eps]``.

    ``"uniform"``: ``t_eps + (1 - 2 t_eps) U(0, 1)``. ``"logit-normal"``:
    ``t_eps + (1 - 2 t_eps) sigmoid(z)``, ``z ~ N(0, 1)`` (use :func:`logit_normal` for another mean/std).
    A callable ``(n, generator) -> t`` is used as is and its times are clamped into ``[t_eps, 1 - t_eps]``.
    """
    t_eps = _check_t_eps(t_eps)
    dtype = dtype or torch.get_default_dtype()
    gen_device = generator.device if generator is not None else "cpu"
    if callable(time_sampler):
        t = _validate.time(torch.as_tensor(time_sampler(n, generator)).to(dtype), name="time_sampler output")
        if t.shape != (n,):
            raise ValueError(f"time_sampler must return a tensor shaped ({n},), got {tuple(t.shape)}")
        return t.clamp(t_eps, 1 - t_eps).to(device)
    _validate.choice(time_sampler, TIME_SAMPLERS, "time_sampler")
    if time_sampler == "uniform":
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device)
    else:
        u = logit_normal()(n, generator)
    return (t_eps + (1 - 2 * t_eps) * u).to(dtype=dtype, device=device)


def prepare_time(t: torch.Tensor | float, x_data: torch.Tensor, t_eps: float) -> torch.Tensor:
    """A given ``t`` (float, 0-dim or ``(B,)``, in [0, 1]) as ``(B,)``, clamped into [t_eps, 1 - t_eps]."""
    t = _validate.time(t, like=x_data)
    return t.expand(x_data.shape[0]).clamp(t_eps, 1 - t_eps)


def draw(
    x_data: torch.Tensor,
    path: GaussianPath,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    *,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training triple ``(t, noise, x)``: ``t`` ``(B,)``, ``noise`` and ``x = alpha x_data + beta noise``
    shaped like ``x_data``. Missing ``t``/``noise`` are drawn (``t`` by ``time_sampler``, noise N(0, I))."""
    x_data = _validate.batch(x_data, "x_data")
    t_eps = _check_t_eps(t_eps)
    if t is None:
        t = sample_time(
            x_data.shape[0],
            time_sampler=time_sampler,
            t_eps=t_eps,
            generator=generator,
            dtype=x_data.dtype,
            device=x_data.device,
        )
    else:
        t = prepare_time(t, x_data, t_eps)
    if noise is None:
        noise = torch.randn(x_data.shape, generator=generator, dtype=x_data.dtype, device=x_data.device)
    return t, noise, path.sample(x_data, t, noise)


def loss_weight(
    path: GaussianPath, t: torch.Tensor, kind: str, weighting: str | Weighting | None = None
) -> torch.Tensor:
    r"""``(B,)`` weights :math:`\lambda(t)` for a regression in the space ``kind`` ("velocity" or "score").

    * ``None``: 1.
    * ``"noise"``: :math:`\beta_t^2`. In score space this turns the loss into the noise MSE
      :math:`\lVert\hat\varepsilon - \varepsilon\rVert^2` (since :math:`\varepsilon = -\beta_t s`); velocity
      space uses the same factor, so that ``"noise"`` means one thing for every objective.
    * ``"likelihood"``: score space :math:`g_t^2` (``path.diffusion_sq``), which makes the score loss the
      KL bound of score-SDE. Velocity space :math:`4/g_t^2`: on a Gaussian path
      :math:`v - u = (g_t^2/2)(s - \nabla\log p_t)` at the same ``x``, so
      :math:`g_t^2\lVert s - \nabla\log p_t\rVert^2 = (4/g_t^2)\lVert v - u\rVert^2`.
      ``g_t^2`` is infinite where alpha = 0 and 0 where beta = 0: ``ValueError`` there (keep ``t_eps > 0``).
    * a callable ``lambda(t)`` returning a tensor shaped like ``t``.
    """
    _validate.choice(kind, ("velocity", "score"), "kind")
    if weighting is None:
        return torch.ones_like(t)
    if callable(weighting):
        weight = torch.as_tensor(weighting(t), dtype=t.dtype, device=t.device)
        if weight.shape not in (t.shape, ()):
            raise ValueError(
                f"weighting(t) must be shaped like t {tuple(t.shape)}, got {tuple(weight.shape)}"
            )
        return _validate.finite(weight.expand_as(t), "weighting(t)")
    _validate.choice(weighting, WEIGHTINGS, "weighting")
    if weighting == "noise":
        return path.beta(t) ** 2
    g_sq = path.diffusion_sq(t)
    if kind == "score":
        return g_sq
    if _validate.value_checks_enabled() and bool((g_sq <= 0).any()):
        t_bad = t.expand_as(g_sq)[g_sq <= 0].flatten()[0].item()
        raise ValueError(
            f"likelihood weighting 4/g^2 in velocity space is infinite on path {path.name!r} at "
            f"t = {t_bad:g} (g^2 = 0 where beta = 0); use t_eps > 0"
        )
    return 4 / g_sq


def predict(
    model: Model, x: torch.Tensor, t: torch.Tensor, path: GaussianPath, prediction: str, kind: str
) -> torch.Tensor:
    """``model(x, t)`` (a prediction of kind ``prediction``) converted to ``kind`` with ``path.convert``."""
    _validate.choice(prediction, KINDS, "prediction")
    if not callable(model):
        raise ValueError(f"model must be a callable model(x, t), got {type(model).__name__}")
    out = model(x, t)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model(x, t) must return a tensor shaped like x {tuple(x.shape)}, got {shape}")
    return path.convert(out, x, t, prediction, kind)


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B,)`` squared norm ``||prediction - target||^2`` summed over all dims but the first."""
    return (prediction - target).flatten(1).pow(2).sum(1)


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` (scalar), ``"sum"`` (scalar) or ``"none"`` (the ``(B,)`` losses)."""
    _validate.choice(reduction, REDUCTIONS, "reduction")
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def marginal_target(marginal: Marginal, kind: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact marginal field of ``kind`` ("velocity" or "score") at ``(x, t)``, without gradient."""
    with torch.no_grad():
        return marginal.velocity(x, t) if kind == "velocity" else marginal.score(x, t)


def _as_path(path: GaussianPath | str, name: str = "path") -> GaussianPath:
    if isinstance(path, (GaussianPath, str)):
        return get_path(path)
    raise ValueError(f"{name} must be a GaussianPath or a path name, got {type(path).__name__}")


def _as_marginal(marginal: object) -> Marginal:
    if not all(hasattr(marginal, a) for a in ("path", "velocity", "score")):
        raise ValueError(
            "marginal must have .path, .velocity(x, t) and .score(x, t) (e.g. flowscore.marginals."
            f"EmpiricalMarginal), got {type(marginal).__name__}"
        )
    return marginal  # type: ignore[return-value]


def regress(
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    path: GaussianPath,
    prediction: str,
    kind: str,
    target: torch.Tensor,
    weighting: str | Weighting | None,
    reduction: str,
) -> torch.Tensor:
    """The common last step: ``reduce(lambda(t) * ||convert(model(x, t)) - target||^2)`` in space ``kind``."""
    per_sample = squared_error(predict(model, x, t, path, prediction, kind), target)
    if weighting is not None:
        per_sample = loss_weight(path, t, kind, weighting) * per_sample
    return reduce(per_sample, reduction)


# -- the four objectives ----------------------------------------------------------------------------
def cfm(
    model: Model,
    x_data: torch.Tensor,
    path: GaussianPath | str,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    *,
    prediction: str = "velocity",
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Conditional flow matching: :math:`\lambda(t)\lVert v_\theta(x, t) - (\alpha'_t x_{data} +
    \beta'_t \varepsilon)\rVert^2` at ``x = path.sample(x_data, t, noise)``, summed over dims, mean over B.

    Args:
        model: callable ``model(x, t)`` -> ``(B, *dims)`` prediction of kind ``prediction``.
        x_data: ``(B, *dims)`` data batch.
        path: a ``GaussianPath`` or a path name.
        t: ``(B,)``, 0-dim or float times in [0, 1], clamped into ``[t_eps, 1 - t_eps]``; drawn by
            ``time_sampler`` when None.
        noise: ``(B, *dims)`` standard normal noise; drawn when None (with ``generator``).
        prediction: what the model predicts: "velocity", "score", "noise" or "data".
        weighting: None, "noise", "likelihood" or a callable ``lambda(t)``; see :func:`loss_weight`.
        time_sampler: "uniform", "logit-normal" or a callable ``(n, generator) -> t``
            (:func:`sample_time`).
        t_eps: times are kept in ``[t_eps, 1 - t_eps]`` (see the module docstring).
        generator: torch generator for the drawn ``t`` and ``noise``.
        reduction: "mean" (scalar, default), "sum" (scalar) or "none" (``(B,)`` per-sample losses).
    """
    path = _as_path(path)
    t, noise, x = draw(x_data, path, t, noise, time_sampler=time_sampler, t_eps=t_eps, generator=generator)
    target = path.target("velocity", x_data, noise, t)  # alpha' x_data + beta' noise
    return regress(model, x, t, path, prediction, "velocity", target, weighting, reduction)


def fm(
    model: Model,
    x_data: torch.Tensor,
    marginal: Marginal,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    *,
    prediction: str = "velocity",
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Flow matching: :math:`\lambda(t)\lVert v_\theta(x, t) - u_t(x)\rVert^2` with the exact marginal
    velocity ``marginal.velocity(x, t)`` at ``x = marginal.path.sample(x_data, t, noise)``.

    ``marginal`` has ``.path``, ``.velocity(x, t)``, ``.score(x, t)`` (e.g. ``EmpiricalMarginal``); the other
    arguments are those of :func:`cfm`. Same expected gradient as :func:`cfm`; lower by the loss floor.
    """
    marginal = _as_marginal(marginal)
    path = marginal.path
    t, noise, x = draw(x_data, path, t, noise, time_sampler=time_sampler, t_eps=t_eps, generator=generator)
    target = marginal_target(marginal, "velocity", x, t)  # u_t(x), exact
    return regress(model, x, t, path, prediction, "velocity", target, weighting, reduction)


def dsm(
    model: Model,
    x_data: torch.Tensor,
    path: GaussianPath | str,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    *,
    prediction: str = "score",
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Denoising score matching: :math:`\lambda(t)\lVert s_\theta(x, t) + \varepsilon/\beta_t\rVert^2` at
    ``x = path.sample(x_data, t, noise)``. Arguments as in :func:`cfm`; the default prediction is "score".

    With ``weighting="noise"`` this is the DDPM noise MSE :math:`\lVert\hat\varepsilon - \varepsilon\rVert^2`.
    """
    path = _as_path(path)
    t, noise, x = draw(x_data, path, t, noise, time_sampler=time_sampler, t_eps=t_eps, generator=generator)
    target = path.target("score", x_data, noise, t)  # -noise / beta
    return regress(model, x, t, path, prediction, "score", target, weighting, reduction)


def sm(
    model: Model,
    x_data: torch.Tensor,
    marginal: Marginal,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    *,
    prediction: str = "score",
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Score matching: :math:`\lambda(t)\lVert s_\theta(x, t) - \nabla_x\log p_t(x)\rVert^2` with the exact
    marginal score ``marginal.score(x, t)``. Arguments as in :func:`fm`; the default prediction is "score".

    Same expected gradient as :func:`dsm`; lower by the loss floor.
    """
    marginal = _as_marginal(marginal)
    path = marginal.path
    t, noise, x = draw(x_data, path, t, noise, time_sampler=time_sampler, t_eps=t_eps, generator=generator)
    target = marginal_target(marginal, "score", x, t)  # grad log p_t(x), exact
    return regress(model, x, t, path, prediction, "score", target, weighting, reduction)


_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"cfm": cfm, "fm": fm, "dsm": dsm, "sm": sm}


def objective_loss(
    objective: str, model: Model, x_data: torch.Tensor, path_or_marginal: Any, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Dispatch to :func:`cfm`, :func:`fm`, :func:`dsm` or :func:`sm` by name.

    ``cfm``/``dsm`` take a path (a ``GaussianPath`` or a name; a marginal is accepted and its ``.path``
    used); ``fm``/``sm`` need a marginal. Remaining arguments are passed on unchanged.
    """
    _validate.choice(objective, tuple(OBJECTIVES), "objective")
    target = path_or_marginal
    is_path = isinstance(target, (GaussianPath, str))
    if objective in ("cfm", "dsm") and not is_path and hasattr(target, "path"):
        target = target.path
    return _LOSSES[objective](model, x_data, target, *args, **kwargs)


__all__ = [
    "OBJECTIVES",
    "REDUCTIONS",
    "TIME_SAMPLERS",
    "WEIGHTINGS",
    "cfm",
    "draw",
    "dsm",
    "fm",
    "logit_normal",
    "loss_weight",
    "marginal_target",
    "objective_loss",
    "predict",
    "prepare_time",
    "reduce",
    "regress",
    "sample_time",
    "sm",
    "squared_error",
]
