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
the squared norm summed over the dims of a sample (the theory's norm; ``dim_reduction="mean"`` averages
over them instead, as torchcfm and Meta flow_matching do) and averaged over the batch. The model
``model(x, t)`` (or ``model(x, t, y)`` with class labels ``y``) may predict any of the four kinds
(``prediction=``); its output is mapped into the objective's space with ``path.convert``.

Summing over the D dims of a sample makes the loss, and its gradient, D times the per-dim mean. With
Adam(W) that scale does not change the updates (Adam divides it out), so learning rates carry over between
the two reductions; a gradient-norm clip does not: ``clip`` under ``"sum"`` acts like ``clip / D`` under
``"mean"``, and plain SGD needs a learning rate D times smaller.

The theorems: ``grad L_FM = grad L_CFM`` and ``grad L_SM = grad L_DSM``; the losses differ by the constant
loss floor (:mod:`flowscore.floor`).

Times. With ``t=None`` times are drawn by ``time_sampler`` inside ``[t_eps, 1 - t_eps]``; a given ``t`` is
clamped into the same interval. This keeps every conversion and every weighting finite: the score target
``-noise/beta`` and the conversions out of a ``data`` or ``noise`` prediction divide by ``beta_t`` or
``alpha_t``, which vanish at the endpoints. ``t_eps=0`` is allowed; a singular quantity then raises
``ValueError`` (as ``path.convert`` does) instead of returning Inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from . import _validate, grids
from .conditioning import Model, call_model, check_labels
from .conversions import KINDS
from .couplings import DEFAULT_REG, reference_target
from .paths import GaussianPath, get_path

TimeSampler = Callable[[int, "torch.Generator | None"], torch.Tensor]
Weighting = Callable[[torch.Tensor], torch.Tensor]

OBJECTIVES: dict[str, str] = {"cfm": "velocity", "fm": "velocity", "dsm": "score", "sm": "score"}
"""Each objective and the space (kind) its regression is done in."""
OBJECTIVE_ALIASES: dict[str, str] = {"flow": "cfm", "score": "dsm"}
"""Older names still accepted where a conditional objective is meant (``loss_floor``, ``verify``)."""
WEIGHTINGS = ("noise", "likelihood", "network", "linear-velocity")
TIME_SAMPLERS = ("uniform", "logit-normal")
REDUCTIONS = ("mean", "sum", "none")
DIM_REDUCTIONS = ("sum", "mean")


def objective_name(objective: str, allowed: tuple[str, ...] = tuple(OBJECTIVES)) -> str:
    """The canonical objective name (``cfm``, ``fm``, ``dsm``, ``sm``) of ``objective``, aliases resolved."""
    name = OBJECTIVE_ALIASES.get(objective, objective) if isinstance(objective, str) else objective
    if name not in allowed:
        aliases = [a for a, c in OBJECTIVE_ALIASES.items() if c in allowed]
        _validate.choice(objective, (*allowed, *aliases), "objective")
    return name


class Marginal(Protocol):
    """What ``fm``/``sm`` need: the path and the exact marginal fields (e.g. ``EmpiricalMarginal``)."""

    path: GaussianPath

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


# -- shared pieces: times, weights, predictions ------------------------------------------------------------
def logit_normal(mean: float = 0.0, std: float = 1.0) -> TimeSampler:
    """A time sampler ``(n, generator) -> sigmoid(N(mean, std^2))`` (SD3's logit-normal), shaped ``(n,)``.

    The sampler carries its density on (0, 1) as ``sampler.density(u)``, which the likelihood weighting
    needs (:func:`loss_weight`).
    """
    mean = _validate.number(mean, "mean")
    std = _validate.number(std, "std", 0.0, low_open=True)

    def sampler(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else "cpu"
        z = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
        return torch.sigmoid(mean + std * z)

    def density(u: torch.Tensor) -> torch.Tensor:
        u = u.clamp(1e-12, 1 - 1e-12)
        z = (torch.log(u) - torch.log1p(-u) - mean) / std
        return torch.exp(-0.5 * z**2) / (std * math.sqrt(2 * math.pi) * u * (1 - u))

    sampler.density = density  # type: ignore[attr-defined]
    return sampler


def snr_matched(
    path: GaussianPath | str, reference: GaussianPath | str = "linear", t_eps: float = 1e-3
) -> TimeSampler:
    r"""A time sampler for ``path`` whose times have the noise levels of ``reference``'s uniform times.

    Draws :math:`u \sim U(u_{lo}, u_{hi})` and returns :math:`t = \lambda_{path}^{-1}(\lambda_{reference}(u))`
    ``(n,)`` (float64), with :math:`\lambda = \log(\alpha^2/\beta^2)` the log-SNR: the log-SNR of the
    draws has the law of the reference's at uniform times. ``[u_lo, u_hi]`` is the part of
    ``[t_eps, 1 - t_eps]`` whose log-SNR on the reference the path reaches within ``[t_eps, 1 - t_eps]`` (the
    uniform law is conditioned on the common range, so every draw lies in ``[t_eps, 1 - t_eps]`` and the
    law has a density). On the reference itself the times are ``t_eps + (1 - 2 t_eps) U(0, 1)``, the
    ``"uniform"`` draws of :func:`sample_time` bit for bit. Every Gaussian path is a rescaling of another at
    equal log-SNR (docs/theory.md, section 16), so with preconditioning these times train the network on the
    noise levels uniform times give the reference.

    The sampler carries ``sampler.density(v)``, the density of ``v = (t - t_eps) / (1 - 2 t_eps)`` on
    [0, 1] (the convention of :func:`time_density_ratio`, which the likelihood weighting uses), and
    ``sampler.time_density(t)``, the density of ``t``: :math:`p(t) = \lambda'_{path}(t) /
    (\lambda'_{reference}(u)\,(u_{hi} - u_{lo}))` at :math:`u = \lambda_{reference}^{-1}(\lambda_{path}(t))`,
    0 outside the range. Needs ``t_eps > 0`` (the log-SNR is infinite at the ends) unless ``path`` is the
    reference.
    """
    path, reference = _as_path(path), _as_path(reference, "reference")
    t_eps = _validate.t_eps(t_eps)
    f64 = torch.float64

    def uniform(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else "cpu"
        return t_eps + (1 - 2 * t_eps) * torch.rand(n, generator=generator, dtype=f64, device=device)

    def uniform_density(v: torch.Tensor) -> torch.Tensor:
        return ((v >= 0) & (v <= 1)).to(v.dtype)

    if path == reference:
        uniform.density = uniform_density  # type: ignore[attr-defined]
        uniform.time_density = lambda t: uniform_density((t - t_eps) / (1 - 2 * t_eps)) / (1 - 2 * t_eps)  # type: ignore[attr-defined]
        return uniform
    if t_eps == 0:
        raise ValueError(
            f"matched log-SNR times need t_eps > 0 on path {path.name!r} (the log-SNR is infinite at t = 0 "
            "or 1); use t_eps > 0 or time_sampler='uniform'"
        )
    ends = torch.tensor([t_eps, 1 - t_eps], dtype=f64)
    s_path, s_ref = grids.sigma_of_t(path, ends), grids.sigma_of_t(reference, ends)
    hi, lo = min(float(s_path[0]), float(s_ref[0])), max(float(s_path[1]), float(s_ref[1]))
    if not lo < hi:
        raise ValueError(
            f"paths {path.name!r} and {reference.name!r} share no noise level within [t_eps, 1 - t_eps]"
        )
    u_lo, u_hi = (float(u) for u in grids.t_of_sigma(reference, torch.tensor([hi, lo], dtype=f64)))

    def sampler(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else "cpu"
        u = u_lo + (u_hi - u_lo) * torch.rand(n, generator=generator, dtype=f64, device=device).cpu()
        sigma = grids.sigma_of_t(reference, u).clamp(lo, hi)
        return grids.t_of_sigma(path, sigma).clamp(t_eps, 1 - t_eps).to(device)

    def d_log_sigma(p: GaussianPath, t: torch.Tensor) -> torch.Tensor:
        s = p.schedule(t)  # d log(beta / alpha) / dt = beta beta' / beta^2 - alpha' / alpha
        return s.beta_d_beta / s.beta**2 - s.d_alpha / s.alpha

    def time_density(t: torch.Tensor) -> torch.Tensor:
        t64 = torch.as_tensor(t, dtype=f64).detach().cpu()
        sigma = grids.sigma_of_t(path, t64.clamp(t_eps, 1 - t_eps))
        inside = (
            (t64 >= t_eps) & (t64 <= 1 - t_eps) & (sigma >= lo * (1 - 1e-12)) & (sigma <= hi * (1 + 1e-12))
        )
        u = grids.t_of_sigma(reference, sigma.clamp(lo, hi)).clamp(t_eps, 1 - t_eps)
        p = d_log_sigma(path, t64.clamp(t_eps, 1 - t_eps)) / d_log_sigma(reference, u) / (u_hi - u_lo)
        return torch.where(inside, p, torch.zeros_like(p)).to(torch.as_tensor(t).device)

    def density(v: torch.Tensor) -> torch.Tensor:
        return time_density(t_eps + (1 - 2 * t_eps) * v) * (1 - 2 * t_eps)

    sampler.density = density  # type: ignore[attr-defined]
    sampler.time_density = time_density  # type: ignore[attr-defined]
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
    t_eps = _validate.t_eps(t_eps)
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


def time_density_ratio(t: torch.Tensor, time_sampler: str | TimeSampler, t_eps: float) -> torch.Tensor:
    """``(B,)`` ratio ``p_uniform(t) / p(t)`` of the uniform law on ``[t_eps, 1 - t_eps]`` to the sampler's.

    Multiplying a loss term by it makes the average over the sampler's times estimate the same integral over
    t as uniform times (importance weighting): its mean over the sampler's draws is 1. 1 for ``"uniform"``;
    ``"logit-normal"`` and samplers made by :func:`logit_normal` know their density ``p_u`` on (0, 1), those
    made by :func:`snr_matched` the density ``p(t)`` of their times (``time_density``); any other callable
    raises ``ValueError``.

    The two draw differently (:func:`sample_time`): ``"logit-normal"`` rescales ``u`` into
    ``t = t_eps + (1 - 2 t_eps) u``, so the ratio is ``1 / p_u(u)``; a callable's draws are clamped into
    ``[t_eps, 1 - t_eps]``, so inside the ratio is ``(1 / (1 - 2 t_eps)) / p_u(t)`` and the clamped draws
    (point masses at the ends, which uniform times never hit) get weight 0. A sampler whose times already lie
    in ``[t_eps, 1 - t_eps]`` with density ``time_density(t)`` has the ratio ``(1 / (1 - 2 t_eps)) / p(t)``.
    """
    if time_sampler == "uniform":
        return torch.ones_like(t)
    time_density = getattr(time_sampler, "time_density", None)
    if callable(time_density):
        return (1 / ((1 - 2 * t_eps) * time_density(t.double()))).to(t.dtype)
    rescaled = time_sampler == "logit-normal"
    if rescaled:
        time_sampler = logit_normal()
    density = getattr(time_sampler, "density", None)
    if not callable(density):
        raise ValueError(
            "weighting='likelihood' needs a time sampler whose density is known ('uniform', 'logit-normal', "
            "flowscore.losses.logit_normal(mean, std) or snr_matched(path)), since it divides by that "
            "density to stay a bound; use one of those, or pass your own weighting callable"
        )
    if rescaled:
        u = ((t - t_eps) / (1 - 2 * t_eps)).double()
        return (1 / density(u)).to(t.dtype)
    low, high = (torch.tensor(v, dtype=t.dtype, device=t.device) for v in (t_eps, 1 - t_eps))
    inside = (t > low) & (t < high)  # compared in t's dtype: sample_time clamped in it
    ratio = 1 / ((1 - 2 * t_eps) * density(t.double()))
    return torch.where(inside, ratio, torch.zeros_like(ratio)).to(t.dtype)


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
    coupling: str = "independent",
    coupling_reg: float = DEFAULT_REG,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training triple ``(t, noise, x)``: ``t`` ``(B,)``, ``noise`` and ``x = alpha x_data + beta noise``
    shaped like ``x_data``. Missing ``t``/``noise`` are drawn (``t`` by ``time_sampler``, noise N(0, I)),
    then the noise is paired with the data by ``coupling`` (:func:`flowscore.couplings.couple`, within the
    labels ``y`` when given): :meth:`flowscore.objectives.GaussianObjective.draw`."""
    from .objectives import CFM

    objective = CFM(
        _as_path(path), time_sampler=time_sampler, t_eps=t_eps, coupling=coupling, coupling_reg=coupling_reg
    )
    batch = objective.draw(x_data, y, generator, t=t, noise=noise)
    return batch.t, batch.noise, batch.x


def loss_weight(
    path: GaussianPath,
    t: torch.Tensor,
    kind: str,
    weighting: str | Weighting | None = None,
    *,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    sigma_data: float | None = None,
) -> torch.Tensor:
    r"""``(B,)`` weights :math:`\lambda(t)` for a regression in the space ``kind`` ("velocity" or "score").

    * ``None``: 1.
    * ``"noise"``: the weight that turns the regression into the noise-prediction error
      :math:`\lVert\hat\varepsilon - \varepsilon\rVert^2`, per sample, in either space: the square of the
      ``kind -> noise`` conversion coefficient. Score space :math:`\beta_t^2` (since
      :math:`\varepsilon = -\beta_t s`); velocity space :math:`\alpha_t^2/(\alpha'_t\beta_t -
      \alpha_t\beta'_t)^2` (``t^2`` on ``linear``), since :math:`\varepsilon = (\alpha' x - \alpha u)/
      (\alpha'\beta - \alpha\beta')`. So ``"noise"`` means the same number for cfm, fm, dsm and sm.
    * ``"likelihood"``: score space :math:`g_t^2` (``path.diffusion_sq``): with uniform times, DSM/SM so
      weighted is (up to a constant) the bound of Song et al. (2021) on the negative log-likelihood of the
      reverse score-SDE with :math:`g^2 = ` ``path.diffusion_sq`` (``sample_sde(diffusion="score-sde")``).
      Velocity space :math:`4/g_t^2`: on a Gaussian path :math:`v - u = (g_t^2/2)(s - \nabla\log p_t)` at
      the same ``x``, so :math:`g_t^2\lVert s - \nabla\log p_t\rVert^2 = (4/g_t^2)\lVert v - u\rVert^2`.
      With a non-uniform ``time_sampler`` the weight is multiplied by :func:`time_density_ratio` so that it
      stays that bound (a sampler of unknown density is refused). ``g_t^2`` is infinite where alpha = 0 and
      0 where beta = 0: ``ValueError`` there (keep ``t_eps > 0``).
    * ``"network"``: uniform in the error of the preconditioned network ``F`` of
      :class:`flowscore.Preconditioned` (``v = c_out F(c_in x, t)``, ``c_out`` of
      :func:`flowscore.preconditioning.scalings` with ``sigma_data``, default
      :data:`flowscore.config.DATA_STD`): velocity space :math:`k/c_{out}^2`, score space
      :math:`k c^2/c_{out}^2` with :math:`c = \beta_t(\alpha'_t\beta_t - \alpha_t\beta'_t)/\alpha_t` the
      ``score -> velocity`` coefficient and the constant :math:`k = 1 + \sigma_{data}^2` (``c_out^2`` of
      ``linear``, so that cfm on ``linear`` keeps the weight 1). The loss per sample is then
      :math:`k\lVert F - F^*\rVert^2` with :math:`F^* = ` (conditional velocity) / ``c_out``, for cfm and
      dsm alike (the conditional score converts exactly to the conditional velocity at the same ``x``):
      the two are one loss.
    * ``"linear-velocity"``: the loss per sample is the error of the ``linear`` path's velocity implied by the
      model at the same log-SNR, :math:`(1 + \sigma_t)^2\lVert\hat\varepsilon - \varepsilon\rVert^2` with
      :math:`\sigma_t = \beta_t/\alpha_t`: the ``"noise"`` weight times :math:`(1 + \sigma_t)^2`, i.e.
      velocity space :math:`(\alpha_t + \beta_t)^2/(\alpha'_t\beta_t - \alpha_t\beta'_t)^2` (1 on
      ``linear``), score space :math:`\beta_t^2(\alpha_t + \beta_t)^2/\alpha_t^2`. With matched log-SNR
      times (:func:`snr_matched`) every path then trains on linear cfm's loss over the noise levels.
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
        c_value, _ = path.coefficients(t, kind, "noise")
        return c_value**2
    if weighting == "network":
        return network_weight(path, t, kind, sigma_data)
    if weighting == "linear-velocity":  # in float64: exactly 1 on linear
        t64 = t.detach().to(torch.float64)
        c_noise, _ = path.coefficients(t64, kind, "noise")
        alpha, beta = path.alpha(t64), path.beta(t64)  # alpha = 0 (t_eps = 0): not finite, ValueError
        weight = (c_noise * (alpha + beta) / alpha) ** 2
        return _validate.finite(weight, "linear-velocity weight").to(t.dtype)
    g_sq = path.diffusion_sq(t)
    ratio = time_density_ratio(t, time_sampler, t_eps)
    if kind == "score":
        return g_sq * ratio
    if _validate.value_checks_enabled() and bool((g_sq <= 0).any()):
        t_bad = t.expand_as(g_sq)[g_sq <= 0].flatten()[0].item()
        raise ValueError(
            f"likelihood weighting 4/g^2 in velocity space is infinite on path {path.name!r} at "
            f"t = {t_bad:g} (g^2 = 0 where beta = 0); use t_eps > 0"
        )
    return 4 / g_sq * ratio


def network_weight(
    path: GaussianPath, t: torch.Tensor, kind: str, sigma_data: float | None = None
) -> torch.Tensor:
    """The ``"network"`` weighting of :func:`loss_weight`: ``(1 + sigma_data^2) (c_kind->velocity)^2 /
    c_out^2``, shaped like ``t``, computed in float64 and returned in ``t``'s dtype (1 for cfm on
    ``linear``, whose ``c_out^2`` is the constant ``1 + sigma_data^2``)."""
    from .config import DATA_STD  # config and preconditioning import this module
    from .preconditioning import scalings

    sigma = DATA_STD if sigma_data is None else _validate.number(sigma_data, "sigma_data", 0.0, low_open=True)
    t64 = t.detach().to(torch.float64)
    c_value, _ = path.coefficients(t64, kind, "velocity")
    _, c_out = scalings(path.schedule(t64), sigma)
    return ((1 + sigma**2) * c_value**2 / c_out**2).to(t.dtype)


def predict(
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    path: GaussianPath,
    prediction: str,
    kind: str,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """``model(x, t[, y])``, a prediction of kind ``prediction``, converted to ``kind``."""
    _validate.choice(prediction, KINDS, "prediction")
    return path.convert(call_model(model, x, t, y), x, t, prediction, kind)


def squared_error(prediction: torch.Tensor, target: torch.Tensor, dim_reduction: str = "sum") -> torch.Tensor:
    """``(B,)`` squared norm ``||prediction - target||^2`` over all dims but the first (``"sum"``), or the
    mean square over them (``"mean"``)."""
    _validate.choice(dim_reduction, DIM_REDUCTIONS, "dim_reduction")
    sq = (prediction - target).flatten(1).pow(2)
    return sq.sum(1) if dim_reduction == "sum" else sq.mean(1)


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` (scalar), ``"sum"`` (scalar) or ``"none"`` (the ``(B,)`` losses)."""
    _validate.choice(reduction, REDUCTIONS, "reduction")
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def marginal_target(
    marginal: Marginal, kind: str, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
) -> torch.Tensor:
    """The exact marginal field of ``kind`` ("velocity" or "score") at ``(x, t)``, without gradient; with
    labels ``y`` the class-conditional field (``y = -1``: of all the data) of a labelled marginal, e.g.
    ``EmpiricalMarginal(data, path, labels=...)``."""
    with torch.no_grad():
        if y is None:
            return marginal.velocity(x, t) if kind == "velocity" else marginal.score(x, t)
        if getattr(marginal, "num_classes", None) is None:
            raise ValueError(
                "labels y with fm/sm need a labelled marginal (EmpiricalMarginal(data, path, labels=...)), "
                "whose class-conditional field is the target"
            )
        return marginal.field(kind, x, t, y=y)


def conditional_target(
    path: GaussianPath,
    kind: str,
    x_data: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_y: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    coupling: str = "independent",
) -> torch.Tensor:
    """The target of cfm/dsm: ``path.target(x_data, t, noise, kind)``, or with ``reference`` its posterior
    average over ``{x_data} + reference`` (:func:`flowscore.couplings.reference_target`).

    A reference's weights ``p_t(x | x_ref)`` are those of the independent coupling: with another
    ``coupling`` it is refused (``ValueError``).
    """
    if reference is not None and coupling != "independent":
        raise ValueError(
            f"reference targets assume the independent coupling (weights p_t(x | x_ref)), got coupling="
            f"{coupling!r}; use one or the other"
        )
    return reference_target(path, x_data, t, noise, reference, kind, y=y, reference_y=reference_y)


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
    y: torch.Tensor | None,
    path: GaussianPath,
    prediction: str,
    kind: str,
    target: torch.Tensor,
    weight: torch.Tensor,
    reduction: str = "mean",
    dim_reduction: str = "sum",
) -> torch.Tensor:
    """The last step: ``reduce(weight * ||convert(model(x, t[, y])) - target||^2)`` in space ``kind``."""
    if y is not None:
        y = check_labels(y, x.shape[0])
    per_sample = weight * squared_error(
        predict(model, x, t, path, prediction, kind, y), target, dim_reduction
    )
    return reduce(per_sample, reduction)


def _conditional(
    objective: Any,
    model: Model,
    x_data: torch.Tensor,
    t: torch.Tensor | float | None,
    noise: torch.Tensor | None,
    y: torch.Tensor | None,
    generator: torch.Generator | None,
    reference: torch.Tensor | None,
    reference_y: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    """``reduce(objective.per_sample(model, objective.draw(...)))``: the four functions below over the
    objectives of :mod:`flowscore.objectives`."""
    _validate.choice(reduction, REDUCTIONS, "reduction")
    batch = objective.draw(
        x_data, y, generator, t=t, noise=noise, reference=reference, reference_y=reference_y
    )
    return reduce(objective.per_sample(model, batch), reduction)


# -- the four objectives ----------------------------------------------------------------------------
def cfm(
    model: Model,
    x_data: torch.Tensor,
    path: GaussianPath | str,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    *,
    y: torch.Tensor | None = None,
    prediction: str = "velocity",
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    dim_reduction: str = "sum",
    coupling: str = "independent",
    coupling_reg: float = DEFAULT_REG,
    reference: torch.Tensor | None = None,
    reference_y: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Conditional flow matching: :math:`\lambda(t)\lVert v_\theta(x, t) - (\alpha'_t x_{data} +
    \beta'_t \varepsilon)\rVert^2` at ``x = path.sample(x_data, t, noise)``, summed over dims, mean over B.

    Args:
        model: callable ``model(x, t)`` (or ``model(x, t, y)``) -> ``(B, *dims)`` prediction of kind
            ``prediction``.
        x_data: ``(B, *dims)`` data batch.
        path: a ``GaussianPath`` or a path name.
        t: ``(B,)``, 0-dim or float times in [0, 1], clamped into ``[t_eps, 1 - t_eps]``; drawn by
            ``time_sampler`` when None.
        noise: ``(B, *dims)`` standard normal noise; drawn when None (with ``generator``). Points of
            another data set instead make the loss of a data-to-data flow (the source at t = 0; CFM's
            gradient theorem holds for any source, docs/theory.md section 17).
        y: ``(B,)`` integer class labels passed to the model as ``model(x, t, y)`` (-1: no label).
        prediction: what the model predicts: "velocity", "score", "noise" or "data".
        weighting: None, "noise", "likelihood" or a callable ``lambda(t)``; see :func:`loss_weight`.
        time_sampler: "uniform", "logit-normal" or a callable ``(n, generator) -> t``
            (:func:`sample_time`).
        t_eps: times are kept in ``[t_eps, 1 - t_eps]`` (see the module docstring).
        generator: torch generator for the drawn ``t`` and ``noise``.
        reduction: over the batch: "mean" (scalar, default), "sum" (scalar) or "none" (``(B,)``).
        dim_reduction: over the dims of a sample: "sum" (the squared norm, default) or "mean".
        coupling: how noise is paired with the data of the batch: "independent" (default), "ot" (exact
            minibatch OT) or "sinkhorn" (entropic OT, ``coupling_reg``); within labels when ``y`` is given
            (:func:`flowscore.couplings.pairing`). The model then learns the coupled path's velocity.
        coupling_reg: Sinkhorn regularisation, relative to the batch's mean squared distance.
        reference: ``(R, *dims)`` reference points: the target becomes the posterior average of the
            conditional targets over ``{x_data_i} + reference`` (:func:`flowscore.couplings.reference_target`;
            all data: the FM target). Only with the independent coupling.
        reference_y: ``(R,)`` labels of the reference points; needed with ``reference`` when ``y`` is given.
    """
    from .objectives import CFM

    objective = CFM(
        _as_path(path), prediction=prediction, weighting=weighting, time_sampler=time_sampler, t_eps=t_eps,
        coupling=coupling, coupling_reg=coupling_reg, dim_reduction=dim_reduction,
    )  # fmt: skip
    return _conditional(objective, model, x_data, t, noise, y, generator, reference, reference_y, reduction)


def fm(
    model: Model,
    x_data: torch.Tensor,
    marginal: Marginal,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    *,
    y: torch.Tensor | None = None,
    prediction: str = "velocity",
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    dim_reduction: str = "sum",
) -> torch.Tensor:
    r"""Flow matching: :math:`\lambda(t)\lVert v_\theta(x, t) - u_t(x)\rVert^2` with the exact marginal
    velocity ``marginal.velocity(x, t)`` at ``x = marginal.path.sample(x_data, t, noise)``.

    ``marginal`` has ``.path``, ``.velocity(x, t)``, ``.score(x, t)`` (e.g. ``EmpiricalMarginal``); the other
    arguments are those of :func:`cfm`. Same expected gradient as :func:`cfm`; lower by the loss floor.
    """
    from .objectives import FM

    objective = FM(
        marginal=_as_marginal(marginal), prediction=prediction, weighting=weighting,
        time_sampler=time_sampler, t_eps=t_eps, dim_reduction=dim_reduction,
    )  # fmt: skip
    return _conditional(objective, model, x_data, t, noise, y, generator, None, None, reduction)


def dsm(
    model: Model,
    x_data: torch.Tensor,
    path: GaussianPath | str,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    *,
    y: torch.Tensor | None = None,
    prediction: str = "score",
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    dim_reduction: str = "sum",
    coupling: str = "independent",
    coupling_reg: float = DEFAULT_REG,
    reference: torch.Tensor | None = None,
    reference_y: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Denoising score matching: :math:`\lambda(t)\lVert s_\theta(x, t) + \varepsilon/\beta_t\rVert^2` at
    ``x = path.sample(x_data, t, noise)``. Arguments as in :func:`cfm`; the default prediction is "score".

    With ``weighting="noise"`` this is the DDPM noise MSE :math:`\lVert\hat\varepsilon - \varepsilon\rVert^2`.
    With a ``reference`` the target is the posterior average of ``-noise / beta`` over ``{x_data_i} +
    reference`` (all data: the SM target). With a ``coupling`` other than "independent" the regression
    learns ``E[-noise / beta | x]`` of the coupled path, which is not the score of its marginal (Tweedie's
    formula needs the independent coupling): it is a parameterisation of the coupled velocity (use it
    through ``path.convert`` for ODE sampling), not a score for SDE sampling or likelihoods.
    """
    from .objectives import DSM

    objective = DSM(
        _as_path(path), prediction=prediction, weighting=weighting, time_sampler=time_sampler, t_eps=t_eps,
        coupling=coupling, coupling_reg=coupling_reg, dim_reduction=dim_reduction,
    )  # fmt: skip
    return _conditional(objective, model, x_data, t, noise, y, generator, reference, reference_y, reduction)


def sm(
    model: Model,
    x_data: torch.Tensor,
    marginal: Marginal,
    t: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    *,
    y: torch.Tensor | None = None,
    prediction: str = "score",
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    dim_reduction: str = "sum",
) -> torch.Tensor:
    r"""Score matching: :math:`\lambda(t)\lVert s_\theta(x, t) - \nabla_x\log p_t(x)\rVert^2` with the exact
    marginal score ``marginal.score(x, t)``. Arguments as in :func:`fm`; the default prediction is "score".

    Same expected gradient as :func:`dsm`; lower by the loss floor.
    """
    from .objectives import SM

    objective = SM(
        marginal=_as_marginal(marginal), prediction=prediction, weighting=weighting,
        time_sampler=time_sampler, t_eps=t_eps, dim_reduction=dim_reduction,
    )  # fmt: skip
    return _conditional(objective, model, x_data, t, noise, y, generator, None, None, reduction)


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
    "DIM_REDUCTIONS",
    "OBJECTIVES",
    "OBJECTIVE_ALIASES",
    "REDUCTIONS",
    "TIME_SAMPLERS",
    "WEIGHTINGS",
    "cfm",
    "conditional_target",
    "draw",
    "dsm",
    "fm",
    "logit_normal",
    "loss_weight",
    "marginal_target",
    "network_weight",
    "objective_loss",
    "objective_name",
    "predict",
    "prepare_time",
    "reduce",
    "regress",
    "sample_time",
    "sm",
    "snr_matched",
    "squared_error",
    "time_density_ratio",
]
