"""The workflows behind ``flowscore sample``, ``eval``, ``plot`` and ``demo``, on a trained run.

A run (``flowscore.training.load_run``) holds the model, its path and prediction kind, the normalizer that
maps data to the model's space and back, and held-out data. Everything here returns data-space values:
samples are decoded with the normalizer before they are returned or saved.

``run_demo`` is the end-to-end demo: train on a 2D toy with the default settings, sample with an ODE and with
the SDE, write the plots and return W2(samples, held-out) next to the W2 floor, the W2 between two
independent held-out halves of the same size (what a perfect sampler would reach with that many points).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._io import save_json, save_npy

ODE_SAMPLER = "rk4"
ODE_STEPS = 100
SDE_STEPS = 1000  # Euler-Maruyama is first order: on moons 1000 steps gave W2/floor 1.06 vs 1.14 at 500
FIELD_TIMES = (0.1, 0.5, 0.9, 0.99)
DEMO_MARKER = ".flowscore-demo"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def default_steps(sampler: str) -> int:
    """Default number of steps: ``SDE_STEPS`` for the SDE (Euler-Maruyama), ``ODE_STEPS`` for ODE solvers."""
    return SDE_STEPS if sampler == "sde" else ODE_STEPS


# -- sampling ----------------------------------------------------------------------------------------------
def sample_run(
    run: Any, n: int, *, sampler: str, steps: int | None = None, seed: int = 0, trajectory: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``n`` samples of a run in data space, ``(n, *data_shape)`` float32.

    The model's samples are decoded with the run's normalizer. With ``trajectory=True`` also returns the
    decoded states ``(T, n, *data_shape)`` from t = 0 (prior) to t = 1.
    """
    from .samplers import sample

    steps = default_steps(sampler) if steps is None else steps
    out = sample(
        run.model,
        run.path,
        n,
        prediction=run.prediction,
        sampler=sampler,
        steps=steps,
        shape=tuple(run.data_shape),
        generator=_generator(seed),
        return_trajectory=trajectory,
    )
    decode = run.normalizer.decode
    if trajectory:
        x, traj = out
        return decode(x.detach()).float().numpy(), decode(traj.detach()).float().numpy()
    return decode(out.detach()).float().numpy()


# -- evaluation --------------------------------------------------------------------------------------------
def held_out_halves(run: Any, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves ``(a, b)`` of the run's held-out data (data space), each of ``min(n, M // 2)``."""
    held = torch.as_tensor(run.held_out).float()
    half = held.shape[0] // 2
    if half < 2:
        raise ValueError(
            f"the run holds only {held.shape[0]} held-out points; train with more data so that eval has "
            "at least 4 held-out points"
        )
    m = half if n is None else min(n, half)
    return held[:m], held[half : half + m]


def data_log_likelihood(run: Any, x: torch.Tensor, *, steps: int = ODE_STEPS) -> torch.Tensor:
    r"""``(B,)`` log-density of the run's model at data-space ``x`` (nats).

    :math:`\log p_{data}(x) = \log p_{model}(\mathrm{enc}(x)) + \log|\det \partial\,\mathrm{enc}/\partial x|`,
    the normalizer being affine ``encode(x) = (x - shift) / scale``: the log-det is ``-sum(log scale)``
    over every data dim.
    """
    from .likelihood import log_likelihood

    z = run.normalizer.encode(x)
    log_p = log_likelihood(run.model, run.path, z, prediction=run.prediction, steps=steps)
    scale = run.normalizer.scale.to(torch.float64)
    log_det = -torch.log(scale).expand(tuple(x.shape[1:])).sum()
    return log_p.to(torch.float64) + log_det


@dataclass
class EvalSamples:
    """Data-space samples drawn once and shared by :func:`evaluate_run`, :func:`plot_run` and the demo.

    ``ode`` and ``sde`` are ``(n, *data_shape)``; ``trajectory`` is the ODE's ``(T, n, *data_shape)``.
    """

    ode: np.ndarray
    sde: np.ndarray
    trajectory: np.ndarray
    ode_sampler: str


def draw_samples(run: Any, n: int, *, seed: int = 0, ode_sampler: str = ODE_SAMPLER) -> EvalSamples:
    """``n`` ODE samples (with their trajectory) and ``n`` SDE samples of the run, in data space."""
    ode, trajectory = sample_run(run, n, sampler=ode_sampler, seed=seed, trajectory=True)
    sde = sample_run(run, n, sampler="sde", seed=seed + 1)
    return EvalSamples(ode, sde, trajectory, ode_sampler)


EVAL_KEYS = (
    "n",
    "ode_sampler",
    "w2_ode",
    "w2_sde",
    "w2_floor",
    "w2_ratio_ode",
    "w2_ratio_sde",
    "mmd_ode",
    "mmd_sde",
    "mmd_floor",
    "nll",
    "nll_bits_per_dim",
)


def evaluate_run(
    run: Any, *, n: int = 2000, seed: int = 0, samples: EvalSamples | None = None, nll_points: int = 1000
) -> dict[str, Any]:
    """W2 and MMD of ODE and SDE samples to held-out data, their floors, and the held-out NLL.

    Returns a JSON-able dict with the keys :data:`EVAL_KEYS`: ``n`` (points per set), ``w2_ode``,
    ``w2_sde`` (W2 between ``n`` samples and ``n`` held-out points), ``w2_floor`` (W2 between two disjoint
    held-out halves of ``n`` points each: what a perfect sampler reaches with ``n`` points),
    ``w2_ratio_ode``/``w2_ratio_sde`` (W2 / floor; 1 is perfect), ``mmd_ode``, ``mmd_sde``, ``mmd_floor``
    (the same sets), ``nll`` (mean -log p of up to ``nll_points`` held-out points in data space, nats,
    normalizer log-det included; None with ``nll_points=0``) and ``nll_bits_per_dim``. ``samples`` (from
    :func:`draw_samples`) are drawn if not given; ``n`` is capped at half the held-out set.
    """
    from .metrics import mmd, w2

    a, b = held_out_halves(run, n)
    m = a.shape[0]
    if samples is None:
        samples = draw_samples(run, m, seed=seed)
    ode = torch.from_numpy(samples.ode[:m]).flatten(1)
    sde = torch.from_numpy(samples.sde[:m]).flatten(1)
    if ode.shape[0] < m or sde.shape[0] < m:
        raise ValueError(f"evaluate_run needs {m} samples per sampler, got {ode.shape[0]} and {sde.shape[0]}")
    a, b = a.flatten(1), b.flatten(1)
    nll = None
    if nll_points > 0:
        x_nll = torch.as_tensor(run.held_out).float()[:nll_points]
        nll = float(-data_log_likelihood(run, x_nll).mean())
    dims = int(np.prod(tuple(run.data_shape)))
    w2_floor = float(w2(b, a))
    result = {
        "n": m,
        "ode_sampler": samples.ode_sampler,
        "w2_ode": float(w2(ode, a)),
        "w2_sde": float(w2(sde, a)),
        "w2_floor": w2_floor,
        "mmd_ode": float(mmd(ode, a)),
        "mmd_sde": float(mmd(sde, a)),
        "mmd_floor": float(mmd(b, a)),
        "nll": nll,
        "nll_bits_per_dim": None if nll is None else nll / (dims * math.log(2)),
    }
    result["w2_ratio_ode"] = result["w2_ode"] / w2_floor
    result["w2_ratio_sde"] = result["w2_sde"] / w2_floor
    return {key: result[key] for key in EVAL_KEYS}


def format_eval(result: dict[str, Any]) -> str:
    """A small text table of :func:`evaluate_run`'s result."""
    rows = [
        (
            f"ODE ({result['ode_sampler']}) samples",
            result["w2_ode"],
            result["w2_ratio_ode"],
            result["mmd_ode"],
        ),
        ("SDE samples", result["w2_sde"], result["w2_ratio_sde"], result["mmd_sde"]),
        ("floor: held-out halves", result["w2_floor"], 1.0, result["mmd_floor"]),
    ]
    lines = [f"{'vs held-out data':<24} {'W2':>9} {'W2/floor':>9} {'MMD':>10}"]
    lines += [f"{name:<24} {w:>9.4f} {r:>9.3f} {m:>10.3g}" for name, w, r, m in rows]
    nll = "" if result["nll"] is None else f"; held-out NLL = {result['nll']:.4f} nats"
    nll += "" if result["nll"] is None else f" ({result['nll_bits_per_dim']:.4f} bits/dim)"
    lines.append(f"n = {result['n']} points per set{nll}")
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------------------
def _loss_curve(run: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, losses)`` from the run's log (a list of dicts with "step" and "loss")."""
    rows = [r for r in run.log if "loss" in r and "step" in r]
    return np.array([r["step"] for r in rows], dtype=float), np.array([r["loss"] for r in rows], dtype=float)


def _floor_value(run: Any) -> tuple[float | None, float | None]:
    """The run's loss floor and its standard error, or ``(None, None)``."""
    floor = getattr(run, "loss_floor", None)
    if floor is None:
        return None, None
    if isinstance(floor, dict):
        return floor.get("value"), floor.get("standard_error")
    if isinstance(floor, (tuple, list)):
        return float(floor[0]), (float(floor[1]) if len(floor) > 1 else None)
    return float(floor), None


def field_on_grid(
    run: Any, times: tuple[float, ...], limits: tuple[float, float, float, float], size: int = 25
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The learned velocity in data space on a ``size x size`` grid: ``(grid_x, grid_y, (K, size, size, 2))``.

    The model's field (any prediction, via ``samplers.as_field``) lives in normalized space; with the affine
    ``encode(x) = (x - shift) / scale`` the data-space velocity is ``scale * u(encode(x), t)``.
    """
    from .samplers import as_field

    velocity = as_field(run.model, run.path, run.prediction, "velocity")
    gx = np.linspace(limits[0], limits[1], size)
    gy = np.linspace(limits[2], limits[3], size)
    xx, yy = np.meshgrid(gx, gy)
    x = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32))
    z = run.normalizer.encode(x)
    out = []
    with torch.no_grad():
        for t in times:
            u = velocity(z, torch.full((z.shape[0],), float(t)))
            out.append((u * run.normalizer.scale).numpy().reshape(size, size, 2))
    return gx, gy, np.stack(out)


def _plot_limits(points: np.ndarray) -> tuple[float, float, float, float]:
    lo, hi = np.quantile(points, 0.002, axis=0), np.quantile(points, 0.998, axis=0)
    pad = 0.25 * (hi - lo)
    return float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])


def image_range(run: Any) -> tuple[float, float] | None:
    """The pixel range ``(lo, hi)`` of an image run's training data: the image normalizer maps it to [-1, 1],
    so ``lo, hi = shift -/+ scale``; None when the normalizer is not one scalar shift and scale."""
    shift, scale = run.normalizer.shift, run.normalizer.scale
    if shift.numel() != 1 or scale.numel() != 1:
        return None
    return float(shift - scale), float(shift + scale)


def plot_run(
    run: Any, out_dir: str, *, n: int = 2000, seed: int = 0, samples: EvalSamples | None = None
) -> list[str]:
    """Writes the run's figures into ``out_dir`` and returns their paths.

    Always ``loss.png`` (with the loss floor as a band) when the run has a log. 2D data: ``samples.png``
    (ODE and SDE samples vs held-out data), ``trajectories.png`` (ODE paths from the prior) and ``field.png``
    (the learned velocity at a few t). Images: ``samples_grid.png`` (64 ODE and 64 SDE samples side by side,
    gray levels over the training data's pixel range).
    """
    from . import plots

    files = []
    steps, losses = _loss_curve(run)
    if len(steps):
        floor, floor_err = _floor_value(run)
        objective = str(getattr(run.config, "objective", "loss"))
        file = os.path.join(out_dir, "loss.png")
        files.append(
            plots.plot_loss(steps, losses, file, floor=floor, floor_err=floor_err, objective=objective)
        )
    shape = tuple(run.data_shape)
    if len(shape) == 3:
        samples = draw_samples(run, 64, seed=seed) if samples is None else samples
        grids = {f"ODE ({samples.ode_sampler})": samples.ode[:64], "SDE (Euler-Maruyama)": samples.sde[:64]}
        file = os.path.join(out_dir, "samples_grid.png")
        files.append(plots.plot_image_grid(grids, file, value_range=image_range(run)))
        return files
    if shape != (2,):
        return files
    held = torch.as_tensor(run.held_out).float().numpy()[:n]
    samples = draw_samples(run, min(n, 2000), seed=seed) if samples is None else samples
    labels = {f"ODE ({samples.ode_sampler})": samples.ode, "SDE (Euler-Maruyama)": samples.sde}
    files.append(plots.plot_samples(labels, held, os.path.join(out_dir, "samples.png")))
    file = os.path.join(out_dir, "trajectories.png")
    title = f"ODE ({samples.ode_sampler}) trajectories"
    files.append(plots.plot_trajectories(samples.trajectory[:, :300], file, data=held, title=title))
    gx, gy, field = field_on_grid(run, FIELD_TIMES, _plot_limits(held))
    files.append(plots.plot_field(FIELD_TIMES, gx, gy, field, os.path.join(out_dir, "field.png"), data=held))
    return files


# -- the demo ----------------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    out_dir: str
    run_dir: str
    metrics: dict[str, Any]
    files: list[str]
    replaced: bool


def prepare_demo_dir(out_dir: str) -> bool:
    """Checks ``out_dir`` for the demo; returns True if it holds an earlier demo that will be replaced.

    An absent or empty folder, or one made by an earlier demo (it holds ``DEMO_MARKER``) is fine; any other
    existing path raises ``ValueError``, so the demo never deletes a folder it did not create.
    """
    if not os.path.exists(out_dir):
        return False
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} exists and is not a folder; pass another --out")
    entries = os.listdir(out_dir)
    if not entries:
        return False
    if DEMO_MARKER not in entries:
        raise ValueError(
            f"--out {out_dir!r} exists and was not made by `flowscore demo`; pass a new or empty --out folder"
        )
    return True


def run_demo(
    out_dir: str = "demo-out",
    *,
    data: str = "moons",
    steps: int | None = None,
    seed: int = 0,
    n: int = 2000,
    progress: bool = True,
) -> DemoResult:
    """Train on ``data`` with the default settings, sample by ODE and SDE, plot, and measure W2 vs its floor.

    ``out_dir`` is replaced if it holds an earlier demo (see :func:`prepare_demo_dir`). Layout:
    ``out_dir/run`` (the training run), ``samples_ode.npy``, ``samples_sde.npy`` (data space), the PNGs of
    :func:`plot_run`, and ``metrics.json`` (:func:`evaluate_run`).
    """
    from .training import TrainConfig, Trainer, load_run

    replace = prepare_demo_dir(out_dir)
    values: dict[str, Any] = {"data": data, "seed": seed}
    if steps is not None:
        values["steps"] = steps
    config = TrainConfig.from_dict(values)
    if replace:
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, DEMO_MARKER), "w").close()
    run_dir = os.path.join(out_dir, "run")
    Trainer(config, run_dir, progress=progress).train()
    run = load_run(run_dir)
    m = held_out_halves(run, n)[0].shape[0]
    samples = draw_samples(run, m, seed=seed)
    metrics = evaluate_run(run, n=m, samples=samples, nll_points=0)  # the demo reports sample quality only
    save_npy(os.path.join(out_dir, "samples_ode.npy"), samples.ode)
    save_npy(os.path.join(out_dir, "samples_sde.npy"), samples.sde)
    files = plot_run(run, out_dir, n=m, samples=samples)
    save_json(os.path.join(out_dir, "metrics.json"), metrics)
    return DemoResult(out_dir, run_dir, metrics, files, replace)
