r"""``flowscore verify``: measure the two theorems on a data set with a fixed random network, to a verdict.

Theorems: :math:`\nabla_\theta L_{FM} = \nabla_\theta L_{CFM}` (``objective="cfm"``, alias ``"flow"``) and
:math:`\nabla_\theta L_{SM} = \nabla_\theta L_{DSM}` (``"dsm"``, alias ``"score"``); and
:math:`L_{cond} - L_{marg} = C`, the loss floor (:mod:`flowscore.floor`). The flow-map objectives
(``"meanflow"``, ``"semigroup"``, ``"lagrangian"``, docs/theory.md section 18) are checked the same way: the
objective's stop-gradient target built from the conditional velocity vs from the exact marginal velocity, with
a two-time network ``model(x, t, s)``, pairs ``(t, s)`` with ``s = t`` at the objective's ``share_equal`` and
``s ~ U(t, 1)`` otherwise (:func:`flow_map_terms`); their ``C`` is :math:`E\lVert T_{cond} - T_{marg}
\rVert^2` at the network's weights (:func:`flow_map_floor`). The command line (flags, checks, output,
errors) lives in :mod:`flowscore.cli` (``add_verify_arguments``, ``cmd_verify``). The experiment:

1. the data as ``flowscore train`` sees it: :func:`flowscore.data.load` (toys, ``digits``, ``mnist``,
   ``.npy``/``.npz``; at most ``n_data`` points) normalised by :class:`flowscore.data.Normalizer`; the
   package's :class:`~flowscore.models.MLP` (``MODEL_OPTIONS``; images are flattened by it) with a fixed
   random initialisation (``seed``), predicting the velocity (cfm) or the score (dsm);
2. independent batches of ``(x_data, t, noise)``; in each batch both gradients are taken on the SAME draws
   (common random numbers), the marginal one with the exact :class:`~flowscore.marginals.EmpiricalMarginal`.
   Per draw the difference is ``d = 2 J^T (T_marg - T_cond) = -2 k_t J^T (x_data - E[x_data | x])`` (J the
   Jacobian of the output in the parameters; ``T_cond - T_marg = k_t (x_data - E[x_data | x])`` with
   ``k_t`` the ``x_data`` coefficient of the target: ``alpha' - alpha beta'/beta`` for velocities,
   ``alpha/beta^2`` for scores). Three variance reductions, each with an exactly unchanged expectation
   (tested against the plain estimator under a negative control, where the expectation is not 0):

   - **antithetic noise**: a batch holds pairs ``(x_data, t, noise)``, ``(x_data, t, -noise)``. Where the
     posterior is local (large t) ``x_data - E[x_data | x]`` is to leading order ``-beta noise / alpha``,
     odd in the noise, and the pair cancels it;
   - **a control variate** for small t, where ``E[x_data | x]`` is near the data mean ``mu``: add
     ``c = 2 k_t kappa_t J(x')^T (x_data - mu)`` at ``x' = alpha_t mu + beta_t noise``. Since ``x'`` does
     not depend on ``x_data`` and ``E[x_data] = mu`` exactly (the data are drawn uniformly from the set),
     ``E[c] = 0`` for every t and every ``kappa_t``; ``kappa_t = beta^2 / (alpha^2 sigma^2 + beta^2)``
     (``sigma^2`` the data's mean variance per dim) is the weight of the prior in the posterior mean of a
     Gaussian, so ``c`` cancels the part of ``d`` that the data mean explains. It costs one more forward
     pass of the small network (the exact marginal costs far more);
   - **importance sampling of t**: the first ``PILOT_BATCHES`` batches (uniform t) measure the gradient
     variance in ``T_BINS`` bins of t; later batches draw t with probabilities proportional to each bin's
     rms (mixed with ``DEFENSIVE`` of the uniform law) and weight each draw by ``uniform / probability``;
3. with ``d_k = grad(L_cond - L_marg)`` on batch k and ``g_k = grad L_marg``, the statistic is
   ``rel = ||mean_k d_k|| / ||mean_k g_k||`` with the standard error ``se = sqrt(tr Cov(d) / K) /
   ||mean_k g_k||`` (the batches are independent; under the theorem ``E ||mean d||^2 = tr Cov(d) / K``, so
   ``rel`` is of the size of ``se``);
4. the sample grows batch by batch until ``se <= target_se`` (after at least ``MIN_BATCHES`` batches), or the
   difference is decisive (``rel > DECISIVE * se``), or ``max_samples`` draws are used. Stopping on the size
   of ``se`` alone does not bias ``rel``;
5. the verdict (:func:`verdict`): ``"differ"`` when ``rel > SIGNIFICANCE * se``; else ``"equal"`` within
   ``bound = rel + SIGNIFICANCE * se`` when ``se <= target_se``; else ``"inconclusive"`` (the cap came
   first; ``bound`` is still an upper bound, only wider than asked for). For Gaussian batch means, whatever
   their covariance, ``P(||mean d - E d|| > 3 se ||g||) <= P(chi2_1 > 9) = 0.27 %``, so 3 standard errors is
   both the false-alarm rate of "differ" and the confidence of the bound;
6. the loss gap ``L_cond - L_marg`` (mean over independent draws or antithetic pairs, with its standard
   error) next to the loss floor ``C`` estimated on independent draws.

Times: cfm keeps t in ``[1e-3, 1 - 1e-3]``; dsm defaults to ``t_eps = 0.05``: the DSM target ``-noise /
beta_t`` and the score floor grow like ``1/beta_t^2`` as t -> 1 (until the posterior collapses onto single
data points), which makes the Monte Carlo variance explode; ``--t-eps`` changes it (at least ``MIN_T_EPS``).

The JSON file (``--json``) holds exactly ``JSON_KEYS``; its ``"objective"`` is the name the user passed
(``cfm``, ``dsm``, or the aliases ``flow``, ``score``), so a file written by an older command line reads the
same; :func:`run_verify` also returns the canonical name as ``"canonical_objective"``. A number that is not
finite is written as ``null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _io, _validate
from .conditioning import call_model
from .config import DATA_STD
from .conversions import conversion_coefficients
from .data import TOYS, Normalizer, labelled_toy, load, load_labelled
from .floor import LossFloor, draw_labelled, loss_floor
from .losses import OBJECTIVE_ALIASES, OBJECTIVES, marginal_target, objective_name
from .marginals import EmpiricalMarginal
from .models import build_model
from .objectives import BUILTIN, GaussianObjective
from .paths import get_path
from .resources import using_threads

FLOW_MAP_OBJECTIVES = ("meanflow", "semigroup", "lagrangian")
"""The flow-map objectives verify checks: their target with the conditional velocity vs with the exact
marginal velocity (docs/theory.md section 18)."""
VERIFY_OBJECTIVES = ("cfm", "dsm", *FLOW_MAP_OBJECTIVES)
"""The conditional objectives verify checks (``"flow"``, ``"score"`` are accepted as aliases)."""
VERIFY_ALIASES = {alias: name for alias, name in OBJECTIVE_ALIASES.items() if name in VERIFY_OBJECTIVES}
MARGINAL_TWIN = {
    "cfm": "fm",
    "dsm": "sm",
    "meanflow": "meanflow-marg",
    "semigroup": "semigroup-marg",
    "lagrangian": "lagrangian-marg",
}
"""Each conditional objective and the marginal objective with the same gradient (for a flow map: the same
objective with the exact marginal velocity in its target)."""
DEFAULT_T_EPS = {"cfm": 1e-3, "dsm": 0.05, "meanflow": 1e-3, "semigroup": 1e-3, "lagrangian": 1e-3}
MIN_T_EPS = 1e-6
"""Smallest ``t_eps``: times are float32, and ``1 - t_eps`` must stay below 1 (where beta_t = 0 and the
marginal fields are singular)."""
MODEL_OPTIONS = {"width": 128, "depth": 1, "time_embedding": 4}
"""Options of the :class:`~flowscore.models.MLP` whose gradients are compared (any network would do)."""
DEFAULT_TARGET_SE = 0.005
DEFAULT_MAX_SAMPLES = 1 << 22
DEFAULT_BATCH_SIZE = 2048
DEFAULT_N_DATA = 2000
T_BINS = 16
"""Equal-width bins of t for importance sampling (and its pilot estimate of the per-bin variance)."""
PILOT_BATCHES = 8
"""Batches with uniform times whose per-bin gradient variance sets the importance sampling of t."""
DEFENSIVE = 0.1
"""Share of the uniform law in the importance sampling of t (every weight is at most ``1 / DEFENSIVE``)."""
MIN_BATCHES = 32
"""Batches before the sample may stop growing: enough for a stable estimate of the standard error."""
SIGNIFICANCE = 3.0
"""Standard errors beyond which the difference is significant; also the width of the bound."""
DECISIVE = 5.0
"""Standard errors beyond which the run stops early with "differ" (looking after every batch at this level
adds a negligible false alarm rate to the final 3-standard-error test)."""
VERDICTS = ("equal", "differ", "inconclusive")
VARIANCE_REDUCTIONS = ("antithetic", "control variate", "importance sampling of t")
JSON_KEYS = (
    "objective",
    "path",
    "n_samples",
    "grad_relative_difference",
    "grad_relative_standard_error",
    "loss_gap",
    "loss_floor",
    "loss_floor_standard_error",
)


# -- statistics ---------------------------------------------------------------------------------------------
class GradientStatistics:
    """Running statistics of per-batch gradient differences ``d_k`` and marginal gradients ``g_k``.

    Memory O(P) (P parameters): the mean and the summed squared deviations of ``d`` (Welford, float64), the
    sum of ``g`` and of the loss gaps. ``history`` lists ``(n_samples, rel, se)`` after every batch;
    ``stopped`` says why the sample stopped growing: "target", "decisive", "cap" or "n_batches".
    Independent units of the loss gap: the draws, or the antithetic pairs (their means).
    """

    def __init__(self, n_params: int, batch_size: int):
        self.batch_size = batch_size
        self.n_batches = 0
        self.mean_diff = torch.zeros(n_params, dtype=torch.float64)
        self.diff_sq_dev = 0.0  # sum_k ||d_k - mean d||^2 (Welford)
        self.sum_grad = torch.zeros(n_params, dtype=torch.float64)
        self.gap_mean, self.gap_sq_dev, self.gap_units = 0.0, 0.0, 0
        self.history: list[tuple[int, float, float]] = []
        self.stopped = "cap"

    @property
    def n_samples(self) -> int:
        return self.n_batches * self.batch_size

    def add(self, diff: torch.Tensor, grad: torch.Tensor, gaps: torch.Tensor) -> None:
        """One batch: ``diff``, ``grad`` ``(P,)``; ``gaps`` ``(U,)`` independent loss-gap units."""
        diff, grad, gaps = diff.double(), grad.double(), gaps.double()
        self.n_batches += 1
        delta = diff - self.mean_diff
        self.mean_diff += delta / self.n_batches
        self.diff_sq_dev += float(delta @ (diff - self.mean_diff))
        self.sum_grad += grad
        n_new = gaps.numel()
        total = self.gap_units + n_new
        batch_mean = gaps.mean().item()
        batch_sq_dev = float(((gaps - batch_mean) ** 2).sum())
        shift = batch_mean - self.gap_mean
        self.gap_sq_dev += batch_sq_dev + shift**2 * self.gap_units * n_new / total
        self.gap_mean += shift * n_new / total
        self.gap_units = total
        self.history.append((self.n_samples, *self.relative()))

    def relative(self) -> tuple[float, float]:
        """``(rel, se)``: ``||mean d|| / ||mean g||`` and its standard error (NaN before two batches, or
        when the mean marginal gradient is 0)."""
        scale = self.sum_grad.norm().item() / max(self.n_batches, 1)
        if self.n_batches < 2 or not scale > 0:
            return math.nan, math.nan
        se = math.sqrt(max(self.diff_sq_dev, 0.0) / (self.n_batches - 1) / self.n_batches) / scale
        return self.mean_diff.norm().item() / scale, se

    def summary(self) -> dict[str, float]:
        """Relative gradient difference with its standard error, and the loss gap with its standard error."""
        rel, se = self.relative()
        n = self.gap_units
        gap_se = math.sqrt(self.gap_sq_dev / (n - 1) / n) if n > 1 else math.nan
        return {
            "grad_relative_difference": rel,
            "grad_relative_standard_error": se,
            "loss_gap": self.gap_mean if n else math.nan,
            "loss_gap_standard_error": gap_se,
        }


def verdict(rel: float, se: float, target_se: float, significance: float = SIGNIFICANCE) -> tuple[str, float]:
    """``(verdict, bound)`` for a relative difference ``rel`` with standard error ``se`` (module docstring).

    ``"differ"`` if ``rel > significance * se``; otherwise ``"equal"`` if ``se <= target_se``, else
    ``"inconclusive"``. ``bound = rel + significance * se`` bounds the true relative difference (NaN
    inputs give ``("inconclusive", nan)``).
    """
    if not (math.isfinite(rel) and math.isfinite(se)):
        return "inconclusive", math.nan
    bound = rel + significance * se
    if rel > significance * se:
        return "differ", bound
    return ("equal" if se <= target_se else "inconclusive"), bound


# -- the experiment -----------------------------------------------------------------------------------------
def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=retain_graph)])


@dataclass(frozen=True)
class PriorMean:
    """The prior-mean control variate of a data set: its mean ``mean`` ``(*dims)`` and the mean per-dim
    variance ``variance`` (module docstring, item 2). ``PriorMean.of(points)`` computes both in float64."""

    mean: torch.Tensor
    variance: float

    @classmethod
    def of(cls, points: torch.Tensor) -> PriorMean:
        points64 = points.double()
        variance = points64.var(0, unbiased=False).mean().item() if points.shape[0] > 1 else 1.0
        return cls(points64.mean(0).to(points.dtype), variance if variance > 0 else 1.0)


def _control_terms(
    path: Any, kind: str, prior: PriorMean, x_data: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_prior, factor)``: the points ``alpha_t mean + beta_t noise`` and the per-draw factor
    ``2 k_t kappa_t (x_data - mean)`` of the control variate ``<f(x_prior, t), factor>`` (module doc)."""
    mean = prior.mean.expand_as(x_data)
    schedule = path.schedule(t)
    alpha, beta = schedule.alpha, schedule.beta
    k = conversion_coefficients(schedule, "data", kind)[0]  # the x_data coefficient of the target
    kappa = beta**2 / (alpha**2 * prior.variance + beta**2)
    factor = _validate.expand(2 * k * kappa, x_data) * (x_data - mean)
    return path.sample(mean, t, noise), factor


def batch_terms(
    model: nn.Module,
    marginal: Any,
    objective: str,
    x_data: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    t_eps: float,
    prior: PriorMean | None = None,
    y: torch.Tensor | None = None,
    pair: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gap, control, l_marg)``, each ``(B,)`` with graph: per draw, the gap ``l_cond - l_marg``, the
    prior-mean control variate (mean 0; zeros without ``prior``) and the marginal loss ``l_marg``.

    One forward pass of the network serves both losses (common random numbers): ``objective`` is ``cfm`` or
    ``dsm``, its marginal twin (``fm``/``sm``) takes its exact target from ``marginal``. With class labels
    ``y`` (``(B,)``) the network is ``model(x, t, y)`` and the marginal target is the class's exact field.
    A flow-map ``objective`` (``meanflow``, ``semigroup``, ``lagrangian``) needs ``pair = (s, r)`` (``(B,)``
    each, see :func:`flow_map_terms`).
    """
    if objective in FLOW_MAP_OBJECTIVES:
        if pair is None:
            raise ValueError(f"the {objective} terms need the times pair = (s, r)")
        return flow_map_terms(model, marginal, objective, x_data, t, noise, pair, prior, y)
    kind = OBJECTIVES[objective]
    conditional = BUILTIN[objective](marginal.path, prediction=kind, t_eps=t_eps)
    twin = BUILTIN[MARGINAL_TWIN[objective]](marginal=marginal, prediction=kind, t_eps=t_eps)
    batch = conditional.draw(x_data, y, t=t, noise=noise)
    x = batch.x
    if prior is not None:
        x_prior, factor = _control_terms(marginal.path, kind, prior, x_data, t, noise)
        both = None if y is None else torch.cat([y, y])
        out, out_prior = call_model(model, torch.cat([x, x_prior]), torch.cat([t, t]), both).split(x.shape[0])
    else:
        out = call_model(model, x, t, y)

    def cached(x: torch.Tensor, tt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return out

    per_cond, per_marg = conditional.per_sample(cached, batch), twin.per_sample(cached, batch)
    control = (out_prior * factor).flatten(1).sum(1) if prior is not None else torch.zeros_like(per_marg)
    return per_cond - per_marg, control, per_marg


def _flow_map_objective(objective: str, path: Any) -> Any:
    """The flow-map objective ``objective`` on ``path`` with its default options (no adaptive weighting, no
    guidance: the plain squared error the theorem is about)."""
    from .flowmaps import FLOW_MAP_OBJECTIVES as CLASSES

    return CLASSES[objective](path, precondition=False)


def _target_shift(
    model: nn.Module,
    objective: str,
    x: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    delta: torch.Tensor,
    y: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(u, M delta)``: ``u = model(x, t, s[, y])`` (with graph) and how the flow-map target moves when its
    velocity moves by ``delta`` ``(B, *dims)``: MeanFlow's target is affine in the velocity,
    :math:`T = A\hat v + b` with :math:`A = I + (s - t) J_x u`, so ``M delta = delta + (s - t) J_x u delta``
    (one JVP in ``x``); the splitting and Lagrangian targets hold the velocity only where ``s = t``:
    ``M delta = delta`` there, 0 elsewhere. ``M delta`` is detached."""
    from torch.func import jvp

    from .flowmaps import call_flow_map

    gap = (s - t).reshape((-1,) + (1,) * (x.dim() - 1))
    if objective == "meanflow":
        u, ju = jvp(lambda z: call_flow_map(model, z, t, s, y), (x,), (delta,))
        return u, (delta + gap * ju).detach()
    return call_flow_map(model, x, t, s, y), torch.where(gap == 0, delta, torch.zeros_like(delta)).detach()


def flow_map_terms(
    model: nn.Module,
    marginal: Any,
    objective: str,
    x_data: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    pair: tuple[torch.Tensor, torch.Tensor],
    prior: PriorMean | None = None,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r""":func:`batch_terms` of a flow-map objective: ``(gap, control, l_marg)``, each ``(B,)`` with graph.

    ``l_cond`` and ``l_marg`` are the objective's per-sample losses (``regress``, plain squared error, the
    two-time ``model(x, t, s[, y])``) at ``x = alpha_t x_data + beta_t noise`` and ``pair = (s, r)`` (the end
    time, and the splitting time of ``semigroup``), with the conditional velocity
    ``alpha'_t x_data + beta'_t noise`` resp. the exact ``marginal.velocity(x, t[, y])`` in the target. The
    control variate: :math:`\langle u(x', t, s), \mathrm{sg}[M(x')\,c]\rangle` with ``x'`` and the factor
    ``c`` of the prior-mean control (module docstring, item 2) and ``M`` the target's linear part
    (:func:`_target_shift`): its gradient cancels the part of ``grad l_cond - grad l_marg =
    -2 J^T M (v_cond - v_marg)`` that the data mean explains; its mean is 0 since ``x'`` and ``M(x')`` do not
    depend on ``x_data``.
    """
    fm = _flow_map_objective(objective, marginal.path)
    path = marginal.path
    s, r = pair
    x = path.sample(x_data, t, noise)
    v_cond = path.target(x_data, t, noise, "velocity")
    v_marg = marginal_target(marginal, "velocity", x, t, y).to(x.dtype)
    extra = (r,) if objective == "semigroup" else ()
    per_cond = fm.regress(model, x, t, s, *extra, v_cond, y)
    per_marg = fm.regress(model, x, t, s, *extra, v_marg, y)
    if prior is None:
        return per_cond - per_marg, torch.zeros_like(per_marg), per_marg
    x_prior, factor = _control_terms(path, "velocity", prior, x_data, t, noise)
    u_prior, shifted = _target_shift(model, objective, x_prior, t, s, factor, y)
    return per_cond - per_marg, (u_prior * shifted).flatten(1).sum(1), per_marg


def draw_pair(
    t: torch.Tensor, generator: torch.Generator, share_equal: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, r)`` for times ``t`` ``(B,)``: ``s = t`` with probability ``share_equal``, else ``s ~ U(t, 1)``
    (the conditional law of the larger of two uniform times, the flow-map objectives' default ``law``); the
    splitting time ``r = t + lam (s - t)``, ``lam ~ U(0, 1)``. Three draws per row from ``generator``."""
    u = torch.rand((3, t.shape[0]), generator=generator, dtype=torch.float64).to(t.dtype)
    s = torch.where(u[0] < share_equal, t, t + u[1] * (1 - t))
    return s, t + u[2] * (s - t)


def flow_map_floor(
    model: nn.Module,
    marginal: Any,
    objective: str,
    n_samples: int,
    t_eps: float,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    n_bins: int = 10,
) -> LossFloor:
    r"""The flow-map counterpart of the loss floor: :math:`E\lVert T_{cond} - T_{marg}\rVert^2 =
    E\lVert M (v_{cond} - v_{marg})\rVert^2` at the network's current weights, from ``n_samples``
    independent draws (t uniform on ``[t_eps, 1 - t_eps]``, ``(s, r)`` by :func:`draw_pair`), binned in t.

    With the stop-gradient the losses differ by it plus a term of mean 0, so ``L_cond - L_marg`` equals it;
    unlike cfm's floor it depends on the weights through ``M`` (for ``semigroup`` it is cfm's floor on the
    ``s = t`` share of the pairs). The result's ``objective`` is ``objective``.
    """
    from .floor import summarize

    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    share = _flow_map_objective(objective, marginal.path).share_equal
    path = marginal.path
    times, values = [], []
    done = 0
    while done < n_samples:
        m = min(batch_size, n_samples - done)
        x_data, y = draw_labelled(marginal, m, generator)
        x_data = x_data.to(dtype)
        t = (t_eps + (1 - 2 * t_eps) * torch.rand(m, generator=generator, dtype=torch.float64)).to(dtype)
        noise = torch.randn(x_data.shape, generator=generator, dtype=dtype)
        s, _ = draw_pair(t, generator, share)
        x = path.sample(x_data, t, noise)
        delta = path.target(x_data, t, noise, "velocity") - marginal_target(marginal, "velocity", x, t, y)
        _, shifted = _target_shift(model, objective, x, t, s, delta, y)
        times.append(t.detach())
        values.append(shifted.flatten(1).pow(2).sum(1).detach())
        done += m
    return summarize(torch.cat(times), torch.cat(values), n_bins, objective)


@dataclass(frozen=True)
class TimeDesign:
    """How times are drawn: a bin of ``edges`` (``(M + 1,)``, equal widths over ``[t_eps, 1 - t_eps]``) with
    probability ``probs`` (``(M,)``), then uniformly inside it; a draw in bin m has the importance weight
    ``(1 / M) / probs[m]``, so weighted means estimate the uniform-time expectations of the losses."""

    edges: torch.Tensor
    probs: torch.Tensor

    @classmethod
    def uniform(cls, t_eps: float, n_bins: int = T_BINS) -> TimeDesign:
        edges = torch.linspace(t_eps, 1 - t_eps, n_bins + 1, dtype=torch.float64)
        return cls(edges, torch.full((n_bins,), 1 / n_bins, dtype=torch.float64))

    def adapted(self, rms: torch.Tensor) -> TimeDesign:
        """The design with bin probabilities ``(1 - DEFENSIVE) rms / sum(rms) + DEFENSIVE / M`` (the variance
        of a weighted mean is smallest with probabilities proportional to the per-bin rms; the uniform share
        keeps every weight at most ``1 / DEFENSIVE``). Uniform if ``rms`` is 0 or not finite."""
        total = rms.sum()
        if not (torch.isfinite(total) and total > 0):
            return self
        n_bins = rms.numel()
        return TimeDesign(self.edges, (1 - DEFENSIVE) * rms / total + DEFENSIVE / n_bins)

    def sample(
        self, n: int, generator: torch.Generator, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, weight, bin)``, each ``(n,)``."""
        which = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        low, high = self.edges[which], self.edges[which + 1]
        weight = (1 / self.probs.numel()) / self.probs[which]
        return (low + (high - low) * u).to(dtype), weight.to(dtype), which


def _draws(
    data: Any,
    n: int,
    design: TimeDesign,
    generator: torch.Generator,
    antithetic: bool,
    dtype: torch.dtype,
    objective: GaussianObjective,
    share_equal: float | None = None,
) -> tuple[Any, ...]:
    """``n`` draws ``(x_data, t, noise, weight, bin, y, pair)`` (``y`` the labels, or None): times by the
    (importance) ``design``, the noise by the ``objective``'s draw; ``pair``: with ``share_equal`` (a
    flow-map objective) the ``(s, r)`` of :func:`draw_pair`, else None; antithetic: ``n/2`` draws, then the
    same with ``-noise``."""
    m = n // 2 if antithetic else n
    x_data, y = draw_labelled(data, m, generator)
    x_data = x_data.to(dtype)
    t, weight, which = design.sample(m, generator, dtype)
    noise = objective.draw(x_data, y, generator, t=t).noise
    pair = None if share_equal is None else draw_pair(t, generator, share_equal)
    if not antithetic:
        return x_data, t, noise, weight, which, y, pair
    x_data, t, weight, which = (torch.cat([v, v]) for v in (x_data, t, weight, which))
    pair = None if pair is None else tuple(torch.cat([v, v]) for v in pair)
    y = None if y is None else torch.cat([y, y])
    return x_data, t, torch.cat([noise, -noise]), weight, which, y, pair


def _units(values: torch.Tensor, antithetic: bool) -> torch.Tensor:
    """Per-draw values ``(B,)`` as independent units: the draws, or the means of antithetic pairs."""
    if not antithetic:
        return values
    half = values.shape[0] // 2
    return 0.5 * (values[:half] + values[half:])


def _check_t_eps(value: object, name: str = "t_eps") -> float:
    return _validate.number(value, name, MIN_T_EPS, 0.5, high_open=True)


def batch_gradients(
    model: nn.Module,
    marginal: Any,
    objective: str,
    draws: tuple[torch.Tensor, ...],
    t_eps: float,
    prior: PriorMean | None,
    antithetic: bool,
    n_bins: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(d, g, gaps, bin_sq)`` of one batch of ``draws = (x_data, t, noise, weight, bin, y, pair)``.

    ``d = grad mean(weight (gap + control))`` and ``g = grad mean(weight l_marg)`` (``(P,)``); ``gaps``: the
    weighted loss gaps of the independent units (draws or antithetic pairs). With ``n_bins`` the batch is
    processed bin by bin (same ``d``, ``g``, ``gaps`` up to rounding) and ``bin_sq`` ``(n_bins,)`` holds
    ``||sum of grad s_unit over the bin's units||^2``: under the theorem the units have mean 0, so ``bin_sq``
    divided by the bin's units estimates their mean square (larger where they differ: importance sampling
    is then less efficient, never biased). Without ``n_bins``, ``bin_sq`` is None.
    """
    x_data, t, noise, weight, which, y, pair = draws
    params = [p for p in model.parameters() if p.requires_grad]
    parts = (
        [torch.ones_like(which, dtype=torch.bool)] if n_bins is None else [which == m for m in range(n_bins)]
    )
    n_units = x_data.shape[0] // 2 if antithetic else x_data.shape[0]
    diff, grad, gaps, bin_sq = 0.0, 0.0, [], []
    for part in parts:
        if not bool(part.any()):
            bin_sq.append(0.0)
            continue
        labels = None if y is None else y[part]
        pair_part = None if pair is None else (pair[0][part], pair[1][part])
        gap, control, per_marg = batch_terms(
            model, marginal, objective, x_data[part], t[part], noise[part], t_eps, prior, labels, pair_part
        )
        w = weight[part]
        units = _units(w * (gap + control), antithetic).sum() / n_units
        d_part = _flat_grad(units, params, retain_graph=True)
        diff = diff + d_part
        grad = grad + _flat_grad(_units(w * per_marg, antithetic).sum() / n_units, params)
        gaps.append(_units((w * gap).detach(), antithetic))
        bin_sq.append(float(d_part.double().pow(2).sum()) * n_units**2)
    sq = None if n_bins is None else torch.tensor(bin_sq, dtype=torch.float64)
    return diff, grad, torch.cat(gaps), sq


def compare_gradients(
    model: nn.Module,
    marginal: Any,
    objective: str = "cfm",
    *,
    data: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    target_se: float | None = DEFAULT_TARGET_SE,
    n_batches: int | None = None,
    min_batches: int = MIN_BATCHES,
    antithetic: bool = True,
    control_variate: bool = True,
    importance: bool = True,
    t_eps: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> GradientStatistics:
    """Gradients of the conditional (CFM/DSM) and marginal (FM/SM) losses on common batches, to a verdict
    (a flow-map ``objective``: its target with the conditional vs the exact marginal velocity, on a two-time
    ``model``, :func:`flow_map_terms`).

    ``marginal`` provides the exact target (``.path``, ``.velocity``, ``.score``); ``x_data`` is drawn from
    ``data`` (a marginal with ``.data``, default ``marginal``). Giving a ``data`` from another distribution,
    or a marginal with a wrong field, is a negative control: the difference is then significant.

    Batches are added until ``se <= target_se`` or ``rel > DECISIVE * se``, both looked at from
    ``min_batches`` batches on (``target_se=None``: neither), or ``max_samples`` draws are used (at least
    two batches); ``stats.stopped`` says which. ``n_batches`` instead fixes the number of batches (no early
    stop). Variance reduction (module docstring, item 2): ``antithetic`` noise pairs (the batch size must be
    even), the prior-mean ``control_variate`` (needs a ``.data`` tensor in ``data``; off otherwise, and off
    with class labels, where the network's labels correlate with ``x_data - mean``) and
    ``importance`` sampling of t (after ``PILOT_BATCHES`` uniform batches, if more batches may follow). All
    three leave the expected difference unchanged.
    """
    objective = objective_name(objective, VERIFY_OBJECTIVES)
    batch_size = _validate.integer(batch_size, "batch_size", minimum=2)
    if antithetic and batch_size % 2:
        raise ValueError(f"batch_size must be even with antithetic noise (pairs), got {batch_size}")
    if n_batches is None:
        max_samples = _validate.integer(max_samples, "max_samples", minimum=2 * batch_size)
        max_batches = max_samples // batch_size
    else:
        max_batches = _validate.integer(n_batches, "n_batches", minimum=2)
        min_batches, target_se = max_batches, None
    if target_se is not None:
        _validate.number(target_se, "target_se", 0.0, math.inf, low_open=True)
    t_eps = _check_t_eps(DEFAULT_T_EPS[objective] if t_eps is None else t_eps)
    data = marginal if data is None else data
    points = getattr(data, "data", None)
    labelled = getattr(data, "labels", None) is not None
    usable = control_variate and isinstance(points, torch.Tensor) and not labelled
    prior = PriorMean.of(points) if usable else None
    dtype = next(model.parameters()).dtype
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    design = TimeDesign.uniform(t_eps)
    flow_map = objective in FLOW_MAP_OBJECTIVES
    drawer = BUILTIN["cfm" if flow_map else objective](marginal.path, t_eps=t_eps)
    share = _flow_map_objective(objective, marginal.path).share_equal if flow_map else None
    bin_sum_sq = torch.zeros(T_BINS, dtype=torch.float64)
    bin_count = torch.zeros(T_BINS, dtype=torch.float64)
    stats = GradientStatistics(sum(p.numel() for p in params), batch_size)
    if n_batches is not None:
        stats.stopped = "n_batches"
    bar = tqdm(
        total=max_batches * batch_size,
        desc=f"verify {objective}",
        unit="draws",
        unit_scale=True,
        disable=not progress,
        leave=False,
    )
    with bar:
        while stats.n_batches < max_batches:
            draws = _draws(data, batch_size, design, generator, antithetic, dtype, drawer, share)
            pilot = importance and stats.n_batches < PILOT_BATCHES and max_batches > PILOT_BATCHES
            diff, grad, gaps, bin_sq = batch_gradients(
                model, marginal, objective, draws, t_eps, prior, antithetic, T_BINS if pilot else None
            )
            stats.add(diff, grad, gaps)
            if bin_sq is not None:
                bin_sum_sq += bin_sq
                unit_bins = draws[4][: batch_size // 2] if antithetic else draws[4]
                bin_count += torch.bincount(unit_bins, minlength=T_BINS).double()
                if stats.n_batches == PILOT_BATCHES:
                    design = design.adapted((bin_sum_sq / bin_count.clamp(min=1)).sqrt())
            rel, se = stats.relative()
            bar.update(batch_size)
            if math.isfinite(se):
                bar.set_postfix_str(f"rel. diff {100 * rel:.2f}% +- {100 * se:.2f}%", refresh=False)
            if stats.n_batches >= min(min_batches, max_batches) and math.isfinite(se):
                if target_se is not None and se <= target_se:
                    stats.stopped = "target"
                    break
                if target_se is not None and rel > DECISIVE * se:
                    stats.stopped = "decisive"
                    break
    return stats


# -- data, model, run ---------------------------------------------------------------------------------------
def load_points(
    data: str | os.PathLike[str] | torch.Tensor,
    n_data: int = DEFAULT_N_DATA,
    seed: int = 0,
    normalize: bool = True,
) -> torch.Tensor:
    """The data as ``flowscore train`` sees it: ``(N, *dims)`` float32, normalised (``Normalizer.fit`` to
    the default ``data_std``).

    ``data``: a toy name (``n_data`` points), ``"digits"``, ``"mnist"`` or an ``.npy``/``.npz`` file, read by
    :func:`flowscore.data.load` (at most ``n_data`` points: a random subset of a larger set, by ``seed``), or
    a float tensor ``(N, *dims)`` (used whole). Complex, empty, ``(N, 0)``, NaN/Inf data raise
    ``ValueError``. ``normalize=False`` keeps the values as they are.
    """
    n_data = _validate.positive_int(n_data, "n_data")
    if isinstance(data, torch.Tensor):
        points = _validate.finite(_validate.batch(data, "data"), "data")
        if points[0].numel() == 0:
            raise ValueError(f"data has no features per point (shape {tuple(points.shape)})")
        points = points.float()
    else:
        points = load(data, n=n_data, seed=seed)
    return Normalizer.fit(points, std=DATA_STD).encode(points) if normalize else points


def load_labels(
    data: str | os.PathLike[str], n_data: int = DEFAULT_N_DATA, seed: int = 0, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(points, labels)``: :func:`load_points` with the data set's class labels ``(N,)``: ``"digits"``,
    ``"mnist"``, an ``.npz`` with an array ``y``, or a toy with its components as classes
    (:func:`flowscore.data.labelled_toy`). ``ValueError`` for data without labels."""
    n_data = _validate.positive_int(n_data, "n_data")
    if isinstance(data, str) and data in TOYS:
        points, labels = labelled_toy(data, n_data, seed)
    else:
        points, labels = load_labelled(data, n=n_data, seed=seed)
    if labels is None:
        raise ValueError(
            f"data {str(data)!r} has no class labels; use digits, mnist, a toy or a .npz with 'y'"
        )
    return (Normalizer.fit(points, std=DATA_STD).encode(points) if normalize else points), labels


def make_model(
    point_shape: tuple[int, ...] | torch.Size,
    seed: int = 0,
    num_classes: int | None = None,
    two_time: bool = False,
) -> nn.Module:
    """The package's MLP (``MODEL_OPTIONS``) for points of ``point_shape`` (with a class embedding for
    ``num_classes`` labels; ``two_time``: the flow-map network ``model(x, t, s[, y])``), initialised from
    ``seed`` without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(
            "mlp", tuple(point_shape), num_classes=num_classes, two_time=two_time or None, **MODEL_OPTIONS
        )


def _threads(n: int | None) -> contextlib.AbstractContextManager:
    """``resources.using_threads(n)``, or nothing when ``n`` is None."""
    if n is None:
        return contextlib.nullcontext()
    return using_threads(_validate.positive_int(n, "num_threads"))


def run_verify(
    data: str | os.PathLike[str] | torch.Tensor = "moons",
    path: str = "linear",
    objective: str = "cfm",
    *,
    labels: torch.Tensor | bool | None = None,
    n_data: int = DEFAULT_N_DATA,
    batch_size: int = DEFAULT_BATCH_SIZE,
    target_se: float = DEFAULT_TARGET_SE,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    n_batches: int | None = None,
    antithetic: bool = True,
    control_variate: bool = True,
    importance: bool = True,
    seed: int = 0,
    t_eps: float | None = None,
    floor_samples: int | None = None,
    normalize: bool = True,
    num_threads: int | None = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the experiment (module docstring) and return its results.

    Args:
        data: see :func:`load_points`.
        path: path name ("linear", "vp", "vp-linear", "ve").
        objective: "cfm" (FM vs CFM; alias "flow") or "dsm" (SM vs DSM; alias "score").
        labels: class labels: True takes the data set's own (:func:`load_labels`), a tensor ``(N,)`` goes
            with tensor ``data``. The network is then ``f(x, t, y)``, both losses see the labels and the
            marginal twin's target is the class's exact field: the conditional theorems; the loss floor is the
            conditional one (the label-blind floor is reported next to it).
        n_data: at most this many data points (toys: exactly).
        batch_size: draws per batch (even with ``antithetic``).
        target_se: the sample grows until the relative standard error is at most this ...
        max_samples: ... or this many draws are used (at least ``2 * batch_size``).
        n_batches: a fixed number of batches instead (no early stop; ``target_se`` still decides the verdict).
        antithetic, control_variate, importance: the three variance reductions (module docstring, item 2);
            each leaves the expected difference unchanged.
        seed: seeds the network initialisation, the data subset and the draws.
        t_eps: times in ``[t_eps, 1 - t_eps]``; default ``DEFAULT_T_EPS``.
        floor_samples: draws for the independent loss-floor estimate; default ``n_samples // 4`` (its
            per-draw variance is lower than that of the loss gap).
        normalize: normalise the data as ``flowscore train`` does (default); False uses it as it is.
        num_threads: torch intra-op threads during the run, restored afterwards (default 1: these small
            problems gain little from more threads and slow down badly when cores are shared); None keeps
            torch's setting.
        progress: show progress bars.

    Returns:
        dict with the ``JSON_KEYS`` (``"objective"`` as passed) plus ``canonical_objective``,
        ``marginal_objective``, ``verdict``, ``bound``, ``stopped`` ("target", "decisive", "cap" or
        "n_batches"), ``target_se``, ``max_samples``, ``variance_reduction`` (the names of those used),
        ``loss_gap_standard_error``, ``t_eps``,
        ``n_data``, ``data_shape``, ``seconds``, ``running`` (``n_samples``, ``grad_relative_difference``,
        ``grad_relative_standard_error`` lists, one entry per batch) and ``floor`` (``LossFloor.to_dict()``).
    """
    start = time.perf_counter()
    canonical = objective_name(objective, VERIFY_OBJECTIVES)
    target_se = _validate.number(target_se, "target_se", 0.0, math.inf, low_open=True)
    if floor_samples is not None:
        _validate.positive_int(floor_samples, "floor_samples")
    with _threads(num_threads):
        if labels is True:
            if isinstance(data, torch.Tensor):
                raise ValueError("labels=True needs a data set name or file; pass the labels tensor instead")
            points, labels = load_labels(data, n_data, seed, normalize)
        else:
            points = load_points(data, n_data, seed, normalize)
        labels = None if labels is None or labels is False else labels
        marginal = EmpiricalMarginal(points, get_path(path), labels=labels)
        flow_map = canonical in FLOW_MAP_OBJECTIVES
        model = make_model(points.shape[1:], seed, marginal.num_classes, two_time=flow_map)
        stats = compare_gradients(
            model,
            marginal,
            canonical,
            batch_size=batch_size,
            max_samples=max_samples,
            target_se=target_se,
            n_batches=n_batches,
            antithetic=antithetic,
            control_variate=control_variate,
            importance=importance,
            t_eps=t_eps,
            seed=seed,
            progress=progress,
        )
        t_eps = DEFAULT_T_EPS[canonical] if t_eps is None else float(t_eps)
        n_floor = floor_samples or max(2, stats.n_samples // 4)
        if flow_map:
            floor = flow_map_floor(model, marginal, canonical, n_floor, t_eps, seed + 1, batch_size)
        else:
            floor = loss_floor(
                marginal, objective=canonical, n_samples=n_floor, t_eps=t_eps, seed=seed + 1,
                batch_size=batch_size, progress=progress,
            )  # fmt: skip
    summary = stats.summary()
    result_verdict, bound = verdict(
        summary["grad_relative_difference"], summary["grad_relative_standard_error"], target_se
    )
    history = stats.history
    return {
        "objective": objective,
        "path": marginal.path.name,
        "n_samples": stats.n_samples,
        **summary,
        "loss_floor": floor.value,
        "loss_floor_standard_error": floor.standard_error,
        "labels": labels is not None,
        "loss_floor_label_blind": None if floor.unconditional is None else floor.unconditional.value,
        "canonical_objective": canonical,
        "marginal_objective": MARGINAL_TWIN[canonical],
        "verdict": result_verdict,
        "bound": bound,
        "stopped": stats.stopped,
        "target_se": target_se,
        "max_samples": max_samples,
        "variance_reduction": [
            name
            for name, on in zip(
                VARIANCE_REDUCTIONS, (antithetic, control_variate and labels is None, importance), strict=True
            )
            if on
        ],
        "t_eps": t_eps,
        "n_data": points.shape[0],
        "data_shape": list(points.shape[1:]),
        "seconds": time.perf_counter() - start,
        "running": {
            "n_samples": [h[0] for h in history],
            "grad_relative_difference": [h[1] for h in history],
            "grad_relative_standard_error": [h[2] for h in history],
        },
        "floor": floor.to_dict(),
    }


# -- output -------------------------------------------------------------------------------------------------
def _percent(value: float) -> str:
    return f"{100 * value:.3g}%" if math.isfinite(value) else "n/a"


def verdict_line(result: dict[str, Any]) -> str:
    """The one-line verdict of a :func:`run_verify` result."""
    rel, se = result["grad_relative_difference"], result["grad_relative_standard_error"]
    measured = f"{_percent(rel)} +- {_percent(se)}"
    if result["verdict"] == "differ":
        return (
            f"verdict: the gradients DIFFER: relative difference {measured} "
            f"({rel / se:.1f} standard errors; more than {SIGNIFICANCE:g} is significant)"
        )
    if result["verdict"] == "equal":
        return (
            f"verdict: the gradients are equal within {_percent(result['bound'])} (relative difference "
            f"{measured}, consistent with 0; bound = difference + {SIGNIFICANCE:g} standard errors)"
        )
    return (
        f"verdict: inconclusive at the cap of {result['n_samples']} draws: relative difference {measured}, "
        f"consistent with 0, but the standard error is above the target {_percent(result['target_se'])} "
        f"(equal within {_percent(result['bound'])} only); raise --max-samples or --target-se"
    )


def format_table(result: dict[str, Any]) -> str:
    """A readable table of a :func:`run_verify` result, ending with the verdict."""
    cond, marg = result["canonical_objective"].upper(), result["marginal_objective"].upper()
    rel, rel_se = result["grad_relative_difference"], result["grad_relative_standard_error"]
    gap, gap_se = result["loss_gap"], result["loss_gap_standard_error"]
    c, c_se = result["loss_floor"], result["loss_floor_standard_error"]
    z_gap = (gap - c) / math.hypot(gap_se, c_se) if gap_se or c_se else 0.0
    t_eps = result["t_eps"]
    shape = " x ".join(map(str, result["data_shape"]))
    floor_name = "loss floor C" + (" (given the labels)" if result["labels"] else "")
    if result["canonical_objective"] in FLOW_MAP_OBJECTIVES:  # theta-dependent, see flow_map_floor
        floor_name = "E|T_cond - T_marg|^2 (C at theta)"
    reductions = ", ".join(result["variance_reduction"]) or "none"
    grad_name = f"|mean(g_{cond} - g_{marg})| / |mean(g_{marg})|"
    w = max(40, len(grad_name) + 2)
    rows = [
        f"flowscore verify: grad L_{marg} = grad L_{cond} and L_{cond} - L_{marg} = C",
        f"  path {result['path']}, data N = {result['n_data']} x {shape}, "
        f"t in [{t_eps:g}, {1 - t_eps:g}], {result['n_samples']} draws",
        f"  variance reduction: {reductions}; {result['seconds']:.1f} s",
        "",
        f"  {'quantity':<{w}}{'value':>14}{'std. error':>14}",
        f"  {grad_name:<{w}}{rel:>14.5f}{rel_se:>14.5f}",
        f"  {'loss gap L_' + cond + ' - L_' + marg:<{w}}{gap:>14.5f}{gap_se:>14.5f}",
        f"  {floor_name:<{w}}{c:>14.5f}{c_se:>14.5f}",
        *(
            [f"  {'loss floor without the labels':<{w}}{result['loss_floor_label_blind']:>14.5f}"]
            if result["loss_floor_label_blind"] is not None
            else []
        ),
        "",
        f"  gap - floor: z = {z_gap:+.2f} ({'consistent' if abs(z_gap) <= SIGNIFICANCE else 'SIGNIFICANT'})",
        f"  {verdict_line(result)}",
    ]
    return "\n".join(rows)


def _finite_or_none(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def write_json(result: dict[str, Any], target: str | os.PathLike[str]) -> None:
    """Write exactly the ``JSON_KEYS`` of ``result`` to ``target`` (atomically; a non-finite number: null)."""
    payload = {key: _finite_or_none(result[key]) for key in JSON_KEYS}
    _io.save_text(target, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def write_plot(result: dict[str, Any], target: str | os.PathLike[str]) -> str:
    """Gradient agreement vs number of draws, and the loss floor per bin of t (:func:`plots.plot_verify`)."""
    from .plots import plot_verify

    run, floor = result["running"], result["floor"]
    title = f"{result['canonical_objective']} vs {result['marginal_objective']} on {result['path']}"
    return plot_verify(
        run["n_samples"],
        run["grad_relative_difference"],
        run["grad_relative_standard_error"],
        floor["bin_edges"],
        floor["per_bin"],
        floor["per_bin_standard_error"],
        target,
        floor=result["loss_floor"],
        target_se=result["target_se"],
        title=title,
    )


# -- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: Any) -> Any:
    """Add the ``verify`` flags to ``parser`` (an ``argparse.ArgumentParser``): the command line lives in
    :mod:`flowscore.cli` (:func:`flowscore.cli.add_verify_arguments`); kept for callers of this name."""
    from .cli import add_verify_arguments

    return add_verify_arguments(parser)


def check_arguments(args: Any) -> None:
    """:func:`flowscore.cli.check_verify_arguments`: every argument checked before the run (one
    ``ValueError`` naming the first bad one and its fix)."""
    from .cli import check_verify_arguments

    check_verify_arguments(args)


def main(args: Any, print_fn: Callable[[str], None] = print) -> int:
    """``flowscore verify`` with parsed ``args``, through the CLI's error handling
    (:func:`flowscore.cli.run_parsed`): 0 on any verdict, 2 on bad input (one line on stderr, nothing
    written)."""
    from .cli import cmd_verify, run_parsed

    return run_parsed(lambda: cmd_verify(args, print_fn))


__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_TARGET_SE",
    "DEFAULT_T_EPS",
    "FLOW_MAP_OBJECTIVES",
    "JSON_KEYS",
    "MARGINAL_TWIN",
    "MODEL_OPTIONS",
    "VERDICTS",
    "VERIFY_OBJECTIVES",
    "GradientStatistics",
    "add_arguments",
    "PriorMean",
    "TimeDesign",
    "batch_gradients",
    "batch_terms",
    "check_arguments",
    "compare_gradients",
    "draw_pair",
    "flow_map_floor",
    "flow_map_terms",
    "format_table",
    "load_labels",
    "load_points",
    "main",
    "make_model",
    "run_verify",
    "verdict",
    "verdict_line",
    "write_json",
    "write_plot",
]
