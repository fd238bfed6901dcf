r"""``flowscore eval`` and ``flowscore plot`` on a flow-map run (``--objective meanflow``, ``semigroup`` or
``lagrangian``).

A flow-map model samples by K jumps (K model calls, :func:`flowscore.flowmaps.sample_jumps`), so its quality
is reported at each of :data:`CALLS` instead of by ODE and SDE samplers, and its map is compared with the
exact flow map of the training data over the ``(t, s)`` triangle (:func:`map_error_grid`):

* :func:`evaluate_flow_map_run`: W2 and unbiased MMD^2 of the samples at 1, 2 and 4 calls against held-out
  data, next to the floors of :func:`flowscore.workflows.evaluate_run` (whose keys it keeps; the ODE/SDE
  and likelihood entries are None: a jump sampler has no ODE, SDE or tractable density);
* :func:`plot_flow_map_run`: ``loss.png``, ``samples.png`` (2D: the samples at each K) or
  ``samples_grid.png`` (images), and for 2D runs ``flowmap_error.png``, the relative RMS error of the
  model's map :math:`X_\theta(x, t, s) = x + (s - t)\,u_\theta(x, t, s)` against the exact map.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .data import is_image
from .flowmaps import flow_map

CALLS = (1, 2, 4)
"""The model calls (jumps) at which ``flowscore eval`` and ``flowscore plot`` show a flow-map run."""
GRID = 6
"""Cells per side of :func:`map_error_grid`'s ``(t, s)`` triangle (times ``0, 1/GRID, ..., 1``)."""
MAP_POINTS = 2000
"""At most this many training points span the exact map of :func:`map_error_grid` (a random subset)."""


def call_keys(calls: int) -> tuple[str, str, str]:
    """``("w2_Kcall", "w2_ratio_Kcall", "mmd2_unbiased_Kcall")`` for K = ``calls``."""
    return f"w2_{calls}call", f"w2_ratio_{calls}call", f"mmd2_unbiased_{calls}call"


def evaluate_flow_map_run(
    run: Any,
    *,
    n: int = 2000,
    seed: int = 0,
    threads: int | None = None,
    fid: bool = True,
    progress: bool = False,
) -> Any:
    """W2 and unbiased MMD^2 of a flow-map run's samples at each of :data:`CALLS` model calls.

    ``m = min(n, M // 2, metrics.MAX_W2_POINTS)`` samples per K (seed ``seed`` for every K: the same prior
    draws), against ``m`` held-out points, with the floors between two held-out halves, in the units of
    :func:`flowscore.workflows.metric_space`. Returns an :class:`~flowscore.workflows.EvalResult` with the
    keys :data:`~flowscore.workflows.EVAL_KEYS` (``ode_sampler`` "jumps"; the ODE, SDE and likelihood
    entries None; ``per_class`` and the image metrics of the 1-call samples) followed by ``calls`` (the
    list :data:`CALLS`) and, per K, ``w2_Kcall``, ``w2_ratio_Kcall`` (None when the floor is 0) and
    ``mmd2_unbiased_Kcall`` (:func:`call_keys`). ``progress``: a line or bar per phase on stderr.
    """
    from . import workflows as wf
    from .image_metrics import evaluate_images
    from .metrics import MAX_W2_POINTS, mmd, w2

    a, b = wf.held_out_halves(run, min(n, MAX_W2_POINTS))
    m = a.shape[0]
    samples = {
        k: wf.sample_run(run, m, steps=k, seed=seed, threads=threads, progress=progress) for k in CALLS
    }
    a_m, b_m = wf.metric_space(run, a), wf.metric_space(run, b)
    result: dict[str, Any] = dict.fromkeys(wf.EVAL_KEYS)
    with wf.Progress(f"W2 and MMD^2 of {m} points at {len(CALLS)} call counts", enabled=progress):
        w2_floor = float(w2(b_m, a_m))
        result.update(
            n=m, ode_sampler="jumps", w2_floor=w2_floor, mmd2_unbiased_floor=float(mmd(b_m, a_m)),
            w2_units=wf.W2_UNITS["images" if is_image(tuple(run.data_shape)) else "points"],
        )  # fmt: skip
        extra: dict[str, Any] = {"calls": list(CALLS)}
        for k, x in samples.items():
            x_m = wf.metric_space(run, torch.from_numpy(x))
            w2_key, ratio_key, mmd_key = call_keys(k)
            extra[w2_key] = float(w2(x_m, a_m))
            extra[ratio_key] = extra[w2_key] / w2_floor if w2_floor > 0 else None
            extra[mmd_key] = float(mmd(x_m, a_m))
    if getattr(run, "labelled", False) and getattr(run, "held_out_labels", None) is not None:
        result["per_class"] = wf.evaluate_classes(run, n=n, seed=seed, threads=threads, progress=progress)
    result.update(evaluate_images(run, samples[CALLS[0]], n=n, seed=seed, fid_features=fid, threads=threads))
    return wf.EvalResult([*((key, result[key]) for key in wf.EVAL_KEYS), *extra.items()])


def format_flow_map_eval(result: dict[str, Any]) -> str:
    """The text table of :func:`evaluate_flow_map_run`'s result."""
    from .image_metrics import format_images
    from .workflows import MMD_HEADER

    def ratio(value: float | None) -> str:
        return f"{value:>9.3f}" if value is not None else f"{'-':>9}"

    lines = [f"{'vs held-out data':<24} {'W2':>9} {'W2/floor':>9} {MMD_HEADER:>17}"]
    for k in result["calls"]:
        w2_key, ratio_key, mmd_key = call_keys(k)
        name = f"flow map, {k} call{'s' if k > 1 else ''}"
        lines.append(f"{name:<24} {result[w2_key]:>9.4f} {ratio(result[ratio_key])} {result[mmd_key]:>17.3g}")
    floor_ratio = 1.0 if result["w2_floor"] > 0 else None
    lines.append(
        f"{'floor: held-out halves':<24} {result['w2_floor']:>9.4f} {ratio(floor_ratio)} "
        f"{result['mmd2_unbiased_floor']:>17.3g}"
    )
    lines.append(f"n = {result['n']} points per set; K calls = K jumps on the uniform grid")
    lines.append(f"W2 in {result['w2_units']}; MMD^2 unbiased: about 0 (may be < 0) when equal")
    lines += [line for line in [format_images(result)] if line]
    if result.get("per_class"):
        lines += ["", f"{'per class (1 call)':<24} {'W2':>9} {'W2/floor':>9} {MMD_HEADER:>17} {'n':>6}"]
        for entry in result["per_class"]:
            name = f"class {entry['label']}"
            if entry["w2"] is None:
                lines.append(f"{name:<24} {'-':>9} {'-':>9} {'-':>17} {0:>6}")
                continue
            lines.append(
                f"{name:<24} {entry['w2']:>9.4f} {ratio(entry['w2_ratio'])} {entry['mmd2_unbiased']:>17.3g} "
                f"{entry['n']:>6}"
            )
    return "\n".join(lines)


def map_error_grid(
    model: Any,
    path: Any,
    points: torch.Tensor,
    *,
    grid: int = GRID,
    n: int = 128,
    seed: int = 7,
    labels: torch.Tensor | None = None,
    model_label: int | None = None,
) -> np.ndarray:
    r"""``(grid, grid)`` relative RMS error of a two-time model's map against the exact flow map of
    ``points`` (``(N, *dims)`` in the model's space): cell ``[i, j]`` is the pair ``t = i / grid``,
    ``s = (j + 1) / grid`` (NaN where ``s <= t``), with

    .. math::  \frac{\mathrm{RMS}(X_\theta(x, t, s) - X(x, t, s))}{\mathrm{RMS}(X(x, t, s) - x)},

    over ``n`` start points ``x = alpha_t x_data + beta_t noise`` (``x_data`` drawn from ``points``) and
    ``X`` the exact map of ``EmpiricalMarginal(points)`` (float64, tolerance 1e-6). ``labels``: with a
    class-conditional model, the points' labels ``(N,)``; each start point then carries its class and the
    exact map is the class's own (the model is called with the labels); else ``model_label`` (e.g. -1, the
    unconditional model of a class-conditional run) is passed to the model for every point when given.
    """
    from .marginals import EmpiricalMarginal

    gen = torch.Generator().manual_seed(seed)
    points = points.double()
    exact = EmpiricalMarginal(points, path, labels=labels, dtype=torch.float64)
    ts = np.linspace(0.0, 1.0, grid + 1)
    out = np.full((grid, grid), np.nan)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    for i in range(grid):
        for j in range(i + 1, grid + 1):
            t, s = float(ts[i]), float(ts[j])
            idx = torch.randint(0, points.shape[0], (n,), generator=gen)
            noise = torch.randn(points[idx].shape, generator=gen, dtype=torch.float64)
            x = path.sample(points[idx], torch.full((n,), t, dtype=torch.float64), noise)
            y = None if labels is None else labels[idx]
            target = exact.flow_map(x, t, s, y=y, rtol=1e-6, atol=1e-6)
            if y is None and model_label is not None:
                y = torch.full((n,), model_label, dtype=torch.long)
            got = flow_map(model, path, x.to(dtype), t, s, y=y).double()
            out[i, j - 1] = relative_rms(got, target, x)
    return out


def plot_flow_map_run(
    run: Any,
    out_dir: str,
    *,
    n: int = 2000,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = False,
) -> list[str]:
    """The figures of a flow-map run (module docstring) written into ``out_dir`` all or none
    (:func:`flowscore.workflows.plot_run`'s staging); returns their paths."""
    from . import plots
    from . import workflows as wf
    from .image_metrics import training_images

    kind = wf.plot_kind_or_none(tuple(run.data_shape))
    figures: list[tuple[str, Any]] = []
    steps, losses = wf._loss_curve(run)
    objective = str((getattr(run, "objective", None) or {}).get("name") or run.config.objective)
    if len(steps):
        floor, floor_err = wf._floor_value(run)
        figures.append(("loss.png", lambda f: plots.plot_loss(
            steps, losses, f, floor=floor, floor_err=floor_err, objective=objective)))  # fmt: skip
    if kind is None:
        return wf._write_all(out_dir, figures, progress)
    count = 64 if kind == "images" else min(n, 2000)
    sets = {
        f"{k} call{'s' if k > 1 else ''} ({k} jump{'s' if k > 1 else ''})": wf.sample_run(
            run, count, steps=k, seed=seed, threads=threads, progress=progress
        )
        for k in CALLS
    }
    if kind == "images":
        gray = wf.image_range(run)
        figures.append(("samples_grid.png", lambda f: plots.plot_image_grid(sets, f, value_range=gray)))
        return wf._write_all(out_dir, figures, progress)
    held = torch.as_tensor(run.held_out).float().numpy()[:n]
    figures.append(("samples.png", lambda f: plots.plot_samples(sets, held, f, data_label="held-out data")))
    train = training_images(run)  # the training split, reloaded (None for data passed in code)
    points = torch.as_tensor(run.held_out).float() if train is None else train
    which = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))[:MAP_POINTS]
    reference = "held-out data" if train is None else "training data"
    label = -1 if getattr(run, "labelled", False) else None  # a class-conditional run: its unconditional map
    with wf.Progress(f"map error over the (t, s) triangle, {GRID * (GRID + 1) // 2} pairs", enabled=progress):
        err = map_error_grid(
            run.model, run.path, run.normalizer.encode(points[which]), seed=seed + 7, model_label=label
        )
    title = f"{objective}: error of X(x, t, s)\nagainst the exact map of the {reference}"
    figures.append(("flowmap_error.png", lambda f: plots.plot_flowmap_error(err, f, title=title)))
    return wf._write_all(out_dir, figures, progress)


def relative_rms(got: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> float:
    """``RMS(got - target) / RMS(target - start)`` over every entry."""
    return math.sqrt(float((got - target).pow(2).mean()) / float((target - start).pow(2).mean()))
