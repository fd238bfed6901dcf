r"""``flowscore verify``: measure the two theorems on a real data set with a fixed random network.

Theorems: :math:`\nabla_\theta L_{FM} = \nabla_\theta L_{CFM}` (``objective="flow"``) and
:math:`\nabla_\theta L_{SM} = \nabla_\theta L_{DSM}` (``"score"``); and :math:`L_{CFM} - L_{FM} = C`, the loss
floor (:mod:`flowscore.floor`). The experiment:

1. a small MLP ``model(x, t)`` with a fixed random initialisation (``seed``), predicting the velocity
   (``flow``) or the score (``score``);
2. ``n_batches`` independent batches of ``(x_data, t, noise)``; in each batch both gradients are taken on the
   SAME draws (common random numbers), the marginal one with the exact ``EmpiricalMarginal`` of the data;
3. with ``d_k = g_cond,k - g_marg,k`` the per-batch difference of the parameter gradients, we report
   ``||mean_k d_k|| / ||mean_k g_marg,k||`` and its standard error ``sqrt(tr Cov(d) / K) / ||mean g_marg||``
   (batch means; under the theorem ``E ||mean d||^2 = tr Cov(d) / K``, so the relative difference is of the
   size of its standard error, and more than 3 standard errors is a significant difference);
4. the loss gap ``L_cond - L_marg`` (per-draw mean, standard error) next to the loss floor ``C`` estimated
   on independent draws.

Times: the flow objective keeps t in ``[1e-3, 1 - 1e-3]``. The score objective defaults to
``t_eps = 0.05``: the DSM target ``-noise / beta_t`` and the score floor grow like ``1/beta_t^2`` as t -> 1
(until the posterior collapses onto single data points), which makes the Monte Carlo variance explode;
t <= 0.95 keeps it moderate (``--t-eps`` changes it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import _io, _validate
from .data import TOYS, toy
from .floor import LossFloor, draw_data, loss_floor
from .losses import cfm, dsm, fm, sample_time, sm
from .marginals import EmpiricalMarginal

DEFAULT_T_EPS = {"flow": 1e-3, "score": 0.05}
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
_PAIRS = {"flow": (cfm, fm, "velocity"), "score": (dsm, sm, "score")}  # conditional, marginal, prediction


class _MLP(nn.Module):
    """``[x, t] -> Linear -> SiLU -> Linear -> SiLU -> Linear``, output shaped like ``x`` ``(B, D)``."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t.expand(x.shape[0])[:, None]], 1))


def load_data(spec: str, n_data: int = 2000, seed: int = 0) -> torch.Tensor:
    """``(N, D)`` float32 data: a toy of ``flowscore.data.TOYS`` (``n_data`` points) or an ``.npy`` file."""
    if spec in TOYS:
        return toy(spec, n_data, seed)
    if not str(spec).endswith(".npy"):
        raise ValueError(f"data must be one of {', '.join(TOYS)} or an .npy file, got {spec!r}")
    if not os.path.isfile(spec):
        raise ValueError(f"data file {spec!r} does not exist")
    array = np.load(spec, allow_pickle=False)
    if array.ndim != 2 or array.shape[0] < 1 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"data file {spec!r} must hold a numeric array of shape (N, D), got {array.shape}")
    return _validate.finite(torch.from_numpy(array.astype(np.float32)), "data")


@dataclass(frozen=True)
class GradientComparison:
    """Per-batch gradients of the conditional and marginal losses on common draws.

    ``diffs`` and ``marginal_grads`` are ``(K, P)`` (K batches, P parameters); ``gaps`` holds the per-draw
    loss differences ``l_cond - l_marg`` (``(K * batch_size,)``).
    """

    diffs: torch.Tensor
    marginal_grads: torch.Tensor
    gaps: torch.Tensor
    batch_size: int

    def running(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(n_samples, rel_diff, rel_se)``, each ``(K,)``: the statistics after the first k batches."""
        k = torch.arange(1, self.diffs.shape[0] + 1, dtype=self.diffs.dtype)[:, None]
        mean_d = self.diffs.cumsum(0) / k
        mean_g = self.marginal_grads.cumsum(0) / k
        var_sum = ((self.diffs**2).cumsum(0) - k * mean_d**2).sum(1) / (k[:, 0] - 1).clamp(min=1)
        scale = mean_g.norm(dim=1)
        rel_se = (var_sum.clamp(min=0) / k[:, 0]).sqrt() / scale
        return k[:, 0] * self.batch_size, mean_d.norm(dim=1) / scale, rel_se

    def summary(self) -> dict[str, float]:
        """Relative gradient difference with its standard error, and the loss gap with its standard error."""
        _, rel, rel_se = self.running()
        gap_se = self.gaps.std().item() / math.sqrt(self.gaps.numel()) if self.gaps.numel() > 1 else 0.0
        return {
            "grad_relative_difference": rel[-1].item(),
            "grad_relative_standard_error": rel_se[-1].item(),
            "loss_gap": self.gaps.mean().item(),
            "loss_gap_standard_error": gap_se,
        }


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=retain_graph)])


def compare_gradients(
    model: nn.Module,
    marginal: Any,
    objective: str = "flow",
    *,
    data: Any = None,
    n_batches: int = 100,
    batch_size: int = 1024,
    t_eps: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> GradientComparison:
    """Gradients of the conditional (CFM/DSM) and marginal (FM/SM) losses on ``n_batches`` common batches.

    ``marginal`` provides the exact target (``.path``, ``.velocity``, ``.score``); ``x_data`` is drawn from
    ``data`` (a marginal with ``.data``, default ``marginal``). Giving a ``data`` from another distribution,
    or a marginal with a wrong field, is a negative control: the difference is then significant.
    """
    _validate.choice(objective, ("flow", "score"), "objective")
    conditional_loss, marginal_loss, prediction = _PAIRS[objective]
    t_eps = DEFAULT_T_EPS[objective] if t_eps is None else t_eps
    data = marginal if data is None else data
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    diffs, grads, gaps = [], [], []
    desc = f"verify {objective}"
    for _ in tqdm(range(n_batches), desc=desc, disable=not progress, leave=False):
        x_data = draw_data(data, batch_size, generator)
        t = sample_time(batch_size, t_eps=t_eps, generator=generator, dtype=x_data.dtype)
        noise = torch.randn(x_data.shape, generator=generator, dtype=x_data.dtype)
        out = model(marginal.path.sample(x_data, t, noise), t)  # one forward serves both losses

        def cached(x: torch.Tensor, tt: torch.Tensor, out: torch.Tensor = out) -> torch.Tensor:
            return out

        kw = dict(prediction=prediction, t_eps=t_eps, reduction="none")
        per_cond = conditional_loss(cached, x_data, marginal.path, t, noise, **kw)
        per_marg = marginal_loss(cached, x_data, marginal, t, noise, **kw)
        g_cond = _flat_grad(per_cond.mean(), params, retain_graph=True)
        g_marg = _flat_grad(per_marg.mean(), params)
        diffs.append(g_cond - g_marg)
        grads.append(g_marg)
        gaps.append((per_cond - per_marg).detach())
    return GradientComparison(torch.stack(diffs), torch.stack(grads), torch.cat(gaps), batch_size)


def run_verify(
    data: str | torch.Tensor = "moons",
    path: str = "linear",
    objective: str = "flow",
    *,
    n_data: int = 2000,
    n_batches: int = 250,
    batch_size: int = 2048,
    seed: int = 0,
    t_eps: float | None = None,
    floor_samples: int | None = None,
    dtype: torch.dtype = torch.float32,
    num_threads: int | None = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the experiment (module docstring) and return its results.

    Args:
        data: a toy name (``flowscore.data.TOYS``, ``n_data`` points), an ``.npy`` file of shape (N, D), or a
            tensor (N, D).
        path: path name ("linear", "vp", "vp-linear", "ve").
        objective: "flow" (FM vs CFM) or "score" (SM vs DSM).
        n_batches, batch_size: the gradients are averaged over ``n_batches`` batches of ``batch_size`` draws.
        seed: seeds the network initialisation, the toy data and the draws.
        t_eps: times in ``[t_eps, 1 - t_eps]``; default 1e-3 (flow), 0.05 (score).
        floor_samples: draws for the independent loss-floor estimate; default ``n_samples // 4`` (its
            per-draw variance is lower than that of the loss gap).
        dtype: compute dtype of the network, the marginal and the draws (float32 is plenty: the gradients
            agree to ~1e-7 relative on the same draws, far below the Monte Carlo error).
        num_threads: torch intra-op threads during the run, restored afterwards (default 1: these small
            problems gain little from more threads and slow down badly when cores are shared); None keeps
            torch's setting.
        progress: show tqdm progress bars.

    Returns:
        dict with the ``JSON_KEYS`` plus ``loss_gap_standard_error``, ``t_eps``, ``n_data``, ``dim``,
        ``running`` (``n_samples``, ``grad_relative_difference``, ``grad_relative_standard_error`` lists) and
        ``floor`` (``LossFloor.to_dict()``).
    """
    with _threads(num_threads):
        return _run_verify(
            data, path, objective, n_data, n_batches, batch_size, seed, t_eps, floor_samples, dtype, progress
        )


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {n!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_verify(
    data: str | torch.Tensor,
    path: str,
    objective: str,
    n_data: int,
    n_batches: int,
    batch_size: int,
    seed: int,
    t_eps: float | None,
    floor_samples: int | None,
    dtype: torch.dtype,
    progress: bool,
) -> dict[str, Any]:
    _validate.choice(objective, ("flow", "score"), "objective")
    for value, name in ((n_batches, "n_batches"), (batch_size, "batch_size"), (n_data, "n_data")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
    t_eps = DEFAULT_T_EPS[objective] if t_eps is None else float(t_eps)
    points = data if isinstance(data, torch.Tensor) else load_data(data, n_data, seed)
    points = _validate.batch(points, "data").to(dtype)
    marginal = EmpiricalMarginal(points, path)
    with torch.random.fork_rng():  # seed the initialisation without touching the global generator
        torch.manual_seed(seed)
        model = _MLP(points.shape[1]).to(dtype)
    comparison = compare_gradients(
        model,
        marginal,
        objective,
        n_batches=n_batches,
        batch_size=batch_size,
        t_eps=t_eps,
        seed=seed,
        progress=progress,
    )
    n_samples = n_batches * batch_size
    floor: LossFloor = loss_floor(
        marginal,
        objective=objective,
        n_samples=floor_samples or max(2, n_samples // 4),
        t_eps=t_eps,
        seed=seed + 1,
        batch_size=batch_size,
        progress=progress,
    )
    n_seen, rel, rel_se = comparison.running()
    return {
        "objective": objective,
        "path": marginal.path.name,
        "n_samples": n_samples,
        **comparison.summary(),
        "loss_floor": floor.value,
        "loss_floor_standard_error": floor.standard_error,
        "t_eps": t_eps,
        "n_data": points.shape[0],
        "dim": points.shape[1],
        "running": {
            "n_samples": n_seen.long().tolist(),
            "grad_relative_difference": rel.tolist(),
            "grad_relative_standard_error": rel_se.tolist(),
        },
        "floor": floor.to_dict(),
    }


def format_table(result: dict[str, Any]) -> str:
    """A readable table of a :func:`run_verify` result."""
    names = {"flow": ("CFM", "FM"), "score": ("DSM", "SM")}[result["objective"]]
    rel, rel_se = result["grad_relative_difference"], result["grad_relative_standard_error"]
    gap, gap_se = result["loss_gap"], result["loss_gap_standard_error"]
    c, c_se = result["loss_floor"], result["loss_floor_standard_error"]
    z_gap = (gap - c) / math.hypot(gap_se, c_se) if gap_se or c_se else 0.0
    t_eps = result["t_eps"]
    rows = [
        f"flowscore verify: grad L_{names[1]} = grad L_{names[0]} and L_{names[0]} - L_{names[1]} = C",
        f"  path {result['path']}, data N = {result['n_data']} x D = {result['dim']}, "
        f"t in [{t_eps:g}, {1 - t_eps:g}], {result['n_samples']} samples",
        "",
        f"  {'quantity':<40}{'value':>14}{'std. error':>14}",
        f"  {'|mean(g_' + names[0] + ' - g_' + names[1] + ')| / |mean(g_' + names[1] + ')|':<40}"
        f"{rel:>14.5f}{rel_se:>14.5f}",
        f"  {'loss gap L_' + names[0] + ' - L_' + names[1]:<40}{gap:>14.5f}{gap_se:>14.5f}",
        f"  {'loss floor C':<40}{c:>14.5f}{c_se:>14.5f}",
        "",
        f"  gradient difference: {rel / rel_se if rel_se else 0.0:.2f} standard errors "
        f"({'consistent with 0' if rel <= 3 * rel_se else 'SIGNIFICANT'})",
        f"  gap - floor: z = {z_gap:+.2f} ({'consistent' if abs(z_gap) <= 3 else 'SIGNIFICANT'})",
    ]
    return "\n".join(rows)


def write_json(result: dict[str, Any], target: str | os.PathLike[str]) -> None:
    """Write exactly the ``JSON_KEYS`` of ``result`` to ``target`` (atomically)."""
    with _io.atomic_path(target) as tmp, open(tmp, "w") as fh:
        json.dump({key: result[key] for key in JSON_KEYS}, fh, indent=2)
        fh.write("\n")


def write_plot(result: dict[str, Any], target: str | os.PathLike[str]) -> None:
    """Two panels: gradient agreement vs number of samples; loss floor per bin of t (error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run, floor = result["running"], result["floor"]
    n = np.asarray(run["n_samples"])
    rel, rel_se = np.asarray(run["grad_relative_difference"]), np.asarray(run["grad_relative_standard_error"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(n, rel, label="|mean(g_cond - g_marg)| / |mean(g_marg)|")
    ax1.fill_between(n, 0, 3 * rel_se, alpha=0.25, label="3 standard errors")
    ax1.set(xscale="log", yscale="log", xlabel="samples", ylabel="relative gradient difference")
    ax1.set_title(f"{result['objective']} on {result['path']}: gradient agreement")
    ax1.legend(fontsize=8)
    edges = np.asarray(floor["bin_edges"])
    centres = 0.5 * (edges[1:] + edges[:-1])
    ax2.errorbar(centres, floor["per_bin"], yerr=floor["per_bin_standard_error"], fmt="o-", capsize=3)
    ax2.axhline(result["loss_floor"], ls="--", color="gray", label=f"C = {result['loss_floor']:.4g}")
    ax2.set(xlabel="t (0 noise, 1 data)", ylabel="E[floor | t bin]", yscale="log")
    ax2.set_title("loss floor vs t")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        with _io.atomic_path(target) as tmp:
            fig.savefig(tmp, format=Path(target).suffix.lstrip(".") or "png", dpi=110)
    finally:
        plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``verify`` options to ``parser``."""
    parser.add_argument(
        "--data", default="moons", help=f"toy name ({', '.join(TOYS)}) or an .npy file (N, D)"
    )
    parser.add_argument("--path", default="linear", help="Gaussian path: linear, vp, vp-linear, ve")
    parser.add_argument("--objective", choices=("flow", "score"), default="flow")
    parser.add_argument("--n-batches", type=int, default=250, help="independent batches (default 250)")
    parser.add_argument("--batch-size", type=int, default=2048, help="draws per batch (default 2048)")
    parser.add_argument("--n-data", type=int, default=2000, help="points of a toy data set (default 2000)")
    parser.add_argument(
        "--t-eps", type=float, default=None, help="t in [t_eps, 1-t_eps]; 1e-3 flow, 0.05 score"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads during the run (default 1)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--plot", default=None, help="write a two-panel figure to this PNG file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(args: argparse.Namespace, print_fn: Callable[[str], None] = print) -> int:
    """Run ``flowscore verify`` with parsed ``args``; 0 on success, 2 on bad input (message on stderr)."""
    try:
        result = run_verify(
            args.data,
            args.path,
            args.objective,
            n_data=args.n_data,
            n_batches=args.n_batches,
            batch_size=args.batch_size,
            seed=args.seed,
            t_eps=args.t_eps,
            num_threads=args.threads,
            progress=not args.no_progress,
        )
    except ValueError as err:
        import sys

        print(f"flowscore verify: error: {err}", file=sys.stderr)
        return 2
    print_fn(format_table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        write_plot(result, args.plot)
    return 0


__all__ = [
    "DEFAULT_T_EPS",
    "JSON_KEYS",
    "GradientComparison",
    "add_arguments",
    "compare_gradients",
    "format_table",
    "load_data",
    "main",
    "run_verify",
    "write_json",
    "write_plot",
]
