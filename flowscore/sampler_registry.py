r"""The one table of flowscore's samplers: each declared once, with the facts the rest of the code reads.

A :class:`SamplerSpec` says how a sampler integrates (``family``: ``"t"`` the velocity integrators in t of
:mod:`flowscore.samplers`, ``"log-snr"`` the exponential integrators of :mod:`flowscore.solvers`, ``"sde"``
the stochastic ones), its model calls per step, its default steps and grid, whether it is stochastic and
whether :func:`flowscore.encode` may run it. :data:`REGISTRY` maps each name to its spec; every older table
(``SAMPLERS``, ``ODE_SAMPLERS``, ``SDE_SAMPLERS``, ``DEFAULT_STEPS``, ``DEFAULT_GRID``, ``EVALS_PER_STEP``)
is derived from it. :func:`planned_calls` is the exact number of model calls a run makes on a given grid
(what ``return_nfe`` reports): the test suite counts the calls of a counting model against it for every
sampler and grid.

Every sampler accepts a model of every prediction (velocity, score, noise, data): the model's output is
converted (:mod:`flowscore.conversions`) to what the sampler steps on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _validate
from .conversions import KINDS
from .grids import GRIDS
from .paths import GaussianPath


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler's facts.

    Attributes:
        name: the name :func:`flowscore.sample` takes (``sampler=``).
        family: ``"t"`` (velocity integrator in t), ``"log-snr"`` (exponential integrator) or ``"sde"``.
        calls_per_step: model calls of one full step (a guided call on ``[x, x]`` counts once); dopri5: per
            adaptive step (6 stages after the first, first same as last).
        default_steps: steps when ``steps=None``.
        default_grid: one of :data:`flowscore.grids.GRIDS`, the grid when ``grid=None``.
        stochastic: draws noise (``generator=``) on every step.
        encodes: :func:`flowscore.encode` may run it (a deterministic sampler that integrates either way).
        adaptive: chooses its own steps (the grid only sets the reported times).
        order: the order of accuracy (0 for the adaptive and stochastic ones, see their docstrings).
        accepts: the predictions of a model it samples (every kind).
    """

    name: str
    family: str
    calls_per_step: int
    default_steps: int
    default_grid: str
    stochastic: bool = False
    encodes: bool = True
    adaptive: bool = False
    order: int = 0
    accepts: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        if self.family not in ("t", "log-snr", "sde") or self.default_grid not in GRIDS:
            raise ValueError(f"bad sampler spec {self!r}")


REGISTRY: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("euler", "t", 1, 100, "uniform", order=1),
        SamplerSpec("midpoint", "t", 2, 50, "uniform", order=2),
        SamplerSpec("heun", "t", 2, 50, "uniform", order=2),
        SamplerSpec("rk4", "t", 4, 25, "uniform", order=4),
        SamplerSpec("dopri5", "t", 6, 1, "uniform", adaptive=True, order=5),
        SamplerSpec("ddim", "log-snr", 1, 50, "logsnr", order=1),
        SamplerSpec("dpm++2m", "log-snr", 1, 25, "logsnr", order=2),
        SamplerSpec("dpm++3m", "log-snr", 1, 25, "logsnr", order=3),
        SamplerSpec("unipc", "log-snr", 1, 50, "logsnr", order=3),
        SamplerSpec("edm-heun", "log-snr", 2, 13, "karras", order=2),
        SamplerSpec("sde", "sde", 1, 1000, "linear", stochastic=True, encodes=False, order=1),
        SamplerSpec("dpm++2m-sde", "sde", 1, 100, "logsnr", stochastic=True, encodes=False, order=1),
        SamplerSpec(
            "sb-sde", "sde", 1, 100, "uniform", stochastic=True, encodes=False, order=1, accepts=("velocity",)
        ),
    )
}
"""Every sampler by name (see :class:`SamplerSpec`)."""


def spec(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` of ``name`` (``ValueError`` naming the choices for an unknown one)."""
    return REGISTRY[_validate.choice(name, tuple(REGISTRY), "sampler")]


def names(*, family: str | None = None, stochastic: bool | None = None, adaptive: bool | None = None):
    """The sampler names (in :data:`REGISTRY` order) whose specs match every filter given."""
    return tuple(
        s.name
        for s in REGISTRY.values()
        if (family is None or s.family == family)
        and (stochastic is None or s.stochastic == stochastic)
        and (adaptive is None or s.adaptive == adaptive)
    )


def edm_heun_corrects(alpha: float, alpha_next: float, beta_next: float) -> bool:
    """Whether an ``edm-heun`` step from alpha to ``(alpha_next, beta_next)`` runs its corrector (2 calls):
    not when it starts where alpha = 0 or ends where alpha or beta is 0 (an Euler step, 1 call)."""
    return alpha > 0 and alpha_next > 0 and beta_next > 0


def planned_calls(name: str, times: torch.Tensor, path: GaussianPath, final_step: bool = False) -> int | None:
    """The model calls that sampler ``name`` makes on the grid ``times`` (None for the adaptive dopri5).

    ``calls_per_step`` per interval, with two exceptions: the deterministic final step of the velocity
    integrators and of ``"sde"`` (``final_step``; always for ``"sde"``) makes 1 call, and an ``edm-heun`` step
    that skips its corrector (:func:`edm_heun_corrects`) makes 1. ``times``: the 1D float64 grid.
    """
    s = spec(name)
    if s.adaptive:
        return None
    intervals = int(times.shape[0]) - 1
    if s.name == "edm-heun":
        schedule = path.schedule(times.to(torch.float64))
        alpha, beta = schedule.alpha.tolist(), schedule.beta.tolist()
        return sum(
            2 if edm_heun_corrects(alpha[i], alpha[i + 1], beta[i + 1]) else 1 for i in range(intervals)
        )
    if s.family == "t" and final_step:
        return s.calls_per_step * (intervals - 1) + 1
    return s.calls_per_step * intervals


__all__ = ["REGISTRY", "SamplerSpec", "edm_heun_corrects", "names", "planned_calls", "spec"]
