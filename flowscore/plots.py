"""Figures: one function per figure, each taking NumPy arrays and a file name and writing one PNG.

matplotlib is an optional dependency (``pip install flowscore[plot]``); it is imported lazily with the Agg
backend, so importing this module never needs a display. Every file is written atomically (a temporary file
in the same folder, then ``os.replace``): an interrupted plot never leaves a half-written PNG behind.

Conventions: 2D point sets are ``(N, 2)`` arrays; a trajectory is ``(T, N, 2)`` (time-major, t = 0 noise
first); images are ``(N, 1, H, W)`` or ``(N, 3, H, W)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _io

_DATA_STYLE = {"s": 3, "alpha": 0.35, "color": "tab:gray", "linewidths": 0}
_SAMPLE_STYLE = {"s": 3, "alpha": 0.6, "linewidths": 0}


def _pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or ``ValueError`` if it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib; install it with `pip install flowscore[plot]`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, file: str | os.PathLike) -> str:
    """Write ``fig`` to ``file`` atomically (:func:`atomic_write`), close it and return the path."""
    try:
        with _io.atomic_path(file) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        return os.fspath(file)
    finally:
        _pyplot().close(fig)


def _points(value: Any, name: str) -> np.ndarray:
    """``value`` as a float ``(N, 2)`` array, or ``ValueError``."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must be 2D points shaped (N, 2), got shape {arr.shape}")
    return arr


def _limits(*sets: np.ndarray, pad: float = 0.15) -> tuple[float, float, float, float]:
    """Common axis limits (x_lo, x_hi, y_lo, y_hi) covering the 0.5%..99.5% quantiles of all sets."""
    allp = np.concatenate([s for s in sets if s.size], 0)
    lo = np.quantile(allp, 0.005, axis=0)
    hi = np.quantile(allp, 0.995, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def _apply_limits(ax: Any, limits: tuple[float, float, float, float]) -> None:
    ax.set_xlim(limits[0], limits[1])
    ax.set_ylim(limits[2], limits[3])
    ax.set_aspect("equal")


def plot_paths(
    t: np.ndarray, schedules: Mapping[str, Mapping[str, np.ndarray]], file: str | os.PathLike
) -> str:
    """Three panels: alpha_t, beta_t and log-SNR = log(alpha_t^2 / beta_t^2) against t, one line per path.

    Args:
        t: ``(T,)`` times in [0, 1] (t = 0 noise, t = 1 data).
        schedules: ``{path name: {"alpha": (T,), "beta": (T,), "log_snr": (T,)}}``; non-finite log-SNR
            values (at the endpoints) are left out of the plot.
        file: the PNG to write.
    """
    plt = _pyplot()
    t = np.asarray(t, dtype=np.float64)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    titles = {
        "alpha": r"$\alpha_t$ (data weight)",
        "beta": r"$\beta_t$ (noise std, symlog scale)",
        "log_snr": "log-SNR",
    }
    for ax, key in zip(axes, ("alpha", "beta", "log_snr"), strict=True):
        for name, sched in schedules.items():
            y = np.asarray(sched[key], dtype=np.float64)
            ok = np.isfinite(y)
            ax.plot(t[ok], y[ok], label=name)
        ax.set_title(titles[key])
        ax.set_xlabel("t   (0 = noise, 1 = data)")
        ax.grid(alpha=0.3)
    axes[2].set_ylabel(r"$\log(\alpha_t^2/\beta_t^2)$")
    axes[1].set_yscale("symlog", linthresh=1e-2)  # ve spans 80 .. 0.002, the others reach 0 at t = 1
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle("Gaussian probability paths  x = alpha_t x_data + beta_t noise")
    fig.tight_layout()
    return _save(fig, file)


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average of ``y`` with a window of at most ``window`` points (same length as ``y``)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    start = np.maximum(idx - window, 0)
    return (c[idx] - c[start]) / (idx - start)


def plot_loss(
    steps: np.ndarray,
    losses: np.ndarray,
    file: str | os.PathLike,
    *,
    floor: float | None = None,
    floor_err: float | None = None,
    objective: str = "loss",
) -> str:
    """Training loss against step with its moving average, and the loss floor as a horizontal band.

    Args:
        steps, losses: ``(S,)`` step numbers and batch losses.
        floor: the lowest value the objective can reach (e.g. ``C = L_CFM - L_FM``); drawn as a line with a
            band of +- ``floor_err`` (its Monte-Carlo standard error, if given).
        objective: the objective's name, for the title and y label.
        file: the PNG to write.
    """
    plt = _pyplot()
    steps = np.asarray(steps, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if steps.shape != losses.shape or steps.ndim != 1:
        raise ValueError(
            f"steps and losses must be (S,) arrays of one length, got {steps.shape}, {losses.shape}"
        )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    window = max(1, len(losses) // 50)
    if window == 1:
        ax.plot(steps, losses, color="tab:blue", lw=1.6, label="logged loss (window mean)")
    else:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="logged loss (window mean)")
        smooth = _moving_average(losses, window)
        ax.plot(steps, smooth, color="tab:blue", lw=1.8, label=f"moving average of {window} points")
    if floor is not None and np.isfinite(floor):
        ax.axhline(floor, color="tab:red", lw=1.4, ls="--", label=f"loss floor = {floor:.4g}")
        if floor_err is not None and np.isfinite(floor_err) and floor_err > 0:
            band = (floor - floor_err, floor + floor_err)
            ax.axhspan(*band, color="tab:red", alpha=0.15, label="floor +- std. err.")
    finite = losses[np.isfinite(losses)]
    if finite.size:
        lo = min(float(np.quantile(finite, 0.01)), floor if floor is not None else np.inf)
        hi = float(np.quantile(finite, 0.98))
        pad = max(0.1 * (hi - lo), 1e-3 * (abs(hi) + abs(lo)) + 1e-12)  # one logged value: hi == lo
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("training step")
    ax.set_ylabel(objective)
    ax.set_title(f"Training loss ({objective}) and its floor")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, file)


def plot_samples(
    samples: Mapping[str, np.ndarray],
    data: np.ndarray,
    file: str | os.PathLike,
    *,
    data_label: str = "data",
) -> str:
    """Scatter plots of 2D samples next to the data: one panel for the data, one per sample set.

    Args:
        samples: ``{label: (N, 2)}``, e.g. ``{"ODE (rk4)": ..., "SDE": ...}``.
        data: ``(M, 2)`` reference data (held-out), drawn in gray under every sample set.
        file: the PNG to write.
        data_label: the data panel's title (e.g. "held-out data, class 3") and legend entry.
    """
    plt = _pyplot()
    data = _points(data, "data")
    sets = {label: _points(s, f"samples[{label!r}]") for label, s in samples.items()}
    limits = _limits(data, *sets.values())
    panels = 1 + len(sets)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4.2), squeeze=False)
    axes = axes[0]
    axes[0].scatter(data[:, 0], data[:, 1], **{**_DATA_STYLE, "alpha": 0.6})
    axes[0].set_title(f"{data_label} (n = {len(data)})")
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for k, (ax, (label, pts)) in enumerate(zip(axes[1:], sets.items(), strict=True)):
        color = colors[k % len(colors)]
        ax.scatter(data[:, 0], data[:, 1], label=data_label, **_DATA_STYLE)
        ax.scatter(pts[:, 0], pts[:, 1], color=color, label="samples", **_SAMPLE_STYLE)
        ax.set_title(f"{label} (n = {len(pts)})")
        ax.legend(loc="upper right", fontsize=8, markerscale=4)
    for ax in axes:
        _apply_limits(ax, limits)
        ax.set_xlabel("x[0]")
    axes[0].set_ylabel("x[1]")
    fig.tight_layout()
    return _save(fig, file)


def plot_trajectories(
    trajectory: np.ndarray,
    file: str | os.PathLike,
    *,
    data: np.ndarray | None = None,
    max_paths: int = 200,
    title: str = "Sampling trajectories",
) -> str:
    """Paths of 2D samples from the prior (t = 0, black dots) to the data (t = 1, blue dots).

    Args:
        trajectory: ``(T, N, 2)``: the states at T times, t = 0 first. At most ``max_paths`` are drawn.
        data: optional ``(M, 2)`` data drawn in gray behind the paths.
        file: the PNG to write.
    """
    plt = _pyplot()
    traj = np.asarray(trajectory, dtype=np.float64)
    if traj.ndim != 3 or traj.shape[2] != 2:
        raise ValueError(f"trajectory must be shaped (T, N, 2), got {traj.shape}")
    traj = traj[:, :max_paths]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    sets = [traj.reshape(-1, 2)]
    if data is not None:
        data = _points(data, "data")
        sets.append(data)
        ax.scatter(data[:, 0], data[:, 1], label="data", **_DATA_STYLE)
    ax.plot(traj[:, :, 0], traj[:, :, 1], color="tab:olive", alpha=0.35, lw=0.7)
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=6, color="black", label="t = 0 (prior)")
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=6, color="tab:blue", label="t = 1 (sample)")
    _apply_limits(ax, _limits(*sets))
    ax.set_title(f"{title} ({traj.shape[1]} paths, {traj.shape[0]} states)")
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.legend(loc="upper right", fontsize=8, markerscale=2)
    fig.tight_layout()
    return _save(fig, file)


def plot_field(
    times: Sequence[float],
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    field: np.ndarray,
    file: str | os.PathLike,
    *,
    data: np.ndarray | None = None,
    label: str = "learned velocity",
) -> str:
    """Stream plots of a 2D vector field at several times, coloured by speed.

    Args:
        times: ``K`` times in [0, 1].
        grid_x, grid_y: ``(W,)`` and ``(H,)`` increasing grid coordinates.
        field: ``(K, H, W, 2)``: the field's components at ``(grid_x[j], grid_y[i])`` for each time.
        data: optional ``(M, 2)`` data drawn in gray.
        file: the PNG to write.
    """
    plt = _pyplot()
    gx, gy = np.asarray(grid_x, dtype=np.float64), np.asarray(grid_y, dtype=np.float64)
    u = np.asarray(field, dtype=np.float64)
    if u.shape != (len(times), len(gy), len(gx), 2):
        expected = (len(times), len(gy), len(gx), 2)
        raise ValueError(f"field must be shaped (K, H, W, 2) = {expected}, got {u.shape}")
    fig, axes = plt.subplots(
        1, len(times), figsize=(4.2 * len(times), 4.0), squeeze=False, layout="constrained"
    )
    for ax, t, uk in zip(axes[0], times, u, strict=True):
        speed = np.hypot(uk[..., 0], uk[..., 1])
        if data is not None:
            d = _points(data, "data")
            ax.scatter(d[:, 0], d[:, 1], **_DATA_STYLE)
        stream = ax.streamplot(
            gx, gy, uk[..., 0], uk[..., 1], color=speed, cmap="viridis", density=0.9, linewidth=0.8
        )
        fig.colorbar(stream.lines, ax=ax, fraction=0.046, pad=0.04, label="speed")
        ax.set_xlim(gx[0], gx[-1])
        ax.set_ylim(gy[0], gy[-1])
        ax.set_aspect("equal")
        ax.set_title(f"t = {t:.2f}")
        ax.set_xlabel("x[0]")
    axes[0][0].set_ylabel("x[1]")
    fig.suptitle(f"{label} field (t = 0 noise, t = 1 data)")
    return _save(fig, file)


def image_grid(
    images: np.ndarray, *, ncols: int | None = None, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Tiles images ``(N, C, H, W)`` into one ``(rows (H + 1) + 1, ncols (W + 1) + 1, C)`` array in [0, 1].

    Image ``k`` fills rows ``1 + r (H + 1) ..`` and columns ``1 + c (W + 1) ..``, ``r, c = divmod(k, ncols)``
    (``ncols`` default ``ceil(sqrt(N))``), on a background of 1 (white) with a 1-pixel border. Values map
    ``value_range = (lo, hi)`` to [0, 1] and are clipped (default: the min and max of ``images``).
    """
    img = np.asarray(images, dtype=np.float64)
    if img.ndim != 4 or img.shape[1] not in (1, 3) or img.shape[0] == 0:
        raise ValueError(f"images must be shaped (N, 1, H, W) or (N, 3, H, W) with N >= 1, got {img.shape}")
    if ncols is not None and (not isinstance(ncols, int) or ncols < 1):
        raise ValueError(f"ncols must be a positive integer or None, got {ncols!r}")
    lo, hi = (np.nanmin(img), np.nanmax(img)) if value_range is None else map(float, value_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi >= lo):
        raise ValueError(f"value_range must be finite (lo, hi) with lo <= hi, got {(lo, hi)}")
    img = np.clip((img - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    n, channels, h, w = img.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    canvas = np.ones((nrows * (h + 1) + 1, ncols * (w + 1) + 1, channels))
    for k in range(n):
        r, c = divmod(k, ncols)
        top, left = 1 + r * (h + 1), 1 + c * (w + 1)
        canvas[top : top + h, left : left + w] = img[k].transpose(1, 2, 0)
    return canvas


def plot_image_grid(
    images: np.ndarray | Mapping[str, np.ndarray],
    file: str | os.PathLike,
    *,
    ncols: int | None = None,
    title: str = "",
    value_range: tuple[float, float] | None = None,
) -> str:
    """One grid of images ``(N, C, H, W)`` (C = 1 gray, 3 RGB), or one titled grid per entry of a mapping.

    Pixels map ``value_range`` (e.g. the data's ``(0, 16)``) to black..white, clipped; ``None``: the min and
    max over all the images shown. Grids of a mapping sit side by side and share ``value_range``.
    """
    plt = _pyplot()
    sets = dict(images) if isinstance(images, Mapping) else {title: images}
    if not sets:
        raise ValueError("images must be an array or a non-empty mapping of arrays")
    arrays = [np.asarray(v, dtype=np.float64) for v in sets.values()]
    if value_range is None and all(a.size for a in arrays):
        value_range = (min(np.nanmin(a) for a in arrays), max(np.nanmax(a) for a in arrays))
    grids = [image_grid(a, ncols=ncols, value_range=value_range) for a in arrays]
    rows = max(g.shape[0] for g in grids) / 9
    cols = sum(g.shape[1] for g in grids) / 9
    fig, axes = plt.subplots(1, len(grids), figsize=(0.6 * cols + len(grids), 0.6 * rows + 1), squeeze=False)
    for ax, grid, (name, array) in zip(axes[0], grids, sets.items(), strict=True):
        if grid.shape[2] == 1:
            ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(grid, interpolation="nearest")
        ax.axis("off")
        ax.set_title(name or f"{len(array)} samples")
    fig.tight_layout()
    return _save(fig, file)


def plot_verify(
    n_samples: Sequence[float],
    relative_difference: Sequence[float],
    standard_error: Sequence[float],
    bin_edges: Sequence[float],
    floor_per_bin: Sequence[float],
    floor_per_bin_error: Sequence[float],
    file: str | os.PathLike,
    *,
    floor: float | None = None,
    target_se: float | None = None,
    title: str = "",
) -> str:
    """Two panels of ``flowscore verify``: gradient agreement against the number of draws; the loss floor per
    bin of t.

    Args:
        n_samples, relative_difference, standard_error: ``(K,)`` the running ``||mean d|| / ||mean g||`` and
            its standard error after each batch; drawn with the standard error, the band of 3 standard
            errors and, if given, the ``target_se`` the run aimed for. Non-finite entries (before two
            batches) are left out.
        bin_edges: ``(M + 1,)`` edges of the t bins; ``floor_per_bin``, ``floor_per_bin_error``: ``(M,)`` the
            floor's mean and standard error per bin (empty bins, with value 0, are left out).
        floor: the overall loss floor C, drawn as a dashed line.
        title: the left panel's title (e.g. "cfm vs fm on linear").
        file: the PNG to write.
    """
    plt = _pyplot()
    n = np.asarray(n_samples, dtype=np.float64)
    rel = np.asarray(relative_difference, dtype=np.float64)
    se = np.asarray(standard_error, dtype=np.float64)
    edges = np.asarray(bin_edges, dtype=np.float64)
    per_bin = np.asarray(floor_per_bin, dtype=np.float64)
    per_bin_se = np.asarray(floor_per_bin_error, dtype=np.float64)
    if not (n.shape == rel.shape == se.shape and n.ndim == 1):
        raise ValueError(f"n_samples, relative_difference, standard_error must be (K,) arrays, got "
                         f"{n.shape}, {rel.shape}, {se.shape}")  # fmt: skip
    if not (edges.ndim == 1 and per_bin.shape == per_bin_se.shape == (edges.size - 1,)):
        raise ValueError(f"bin_edges must be (M + 1,) and the floor per bin (M,), got {edges.shape}, "
                         f"{per_bin.shape}, {per_bin_se.shape}")  # fmt: skip
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ok = np.isfinite(rel) & np.isfinite(se) & (n > 0)
    ax1.plot(n[ok], 100 * rel[ok], color="tab:blue", label="|mean(g_cond - g_marg)| / |mean(g_marg)|")
    ax1.plot(n[ok], 100 * se[ok], color="tab:blue", ls=":", label="standard error")
    ax1.fill_between(n[ok], 0, 300 * se[ok], color="tab:blue", alpha=0.2, label="3 standard errors")
    if target_se is not None:
        ax1.axhline(
            100 * target_se, color="tab:red", ls="--", lw=1, label=f"target std. error {100 * target_se:g}%"
        )
    ax1.set(xscale="log", yscale="log", xlabel="draws", ylabel="relative gradient difference (%)")
    ax1.set_title(f"gradient agreement{': ' + title if title else ''}")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8, loc="lower left")
    centres = 0.5 * (edges[1:] + edges[:-1])
    used = per_bin > 0
    ax2.errorbar(centres[used], per_bin[used], yerr=per_bin_se[used], fmt="o-", capsize=3)
    if floor is not None and np.isfinite(floor):
        ax2.axhline(floor, ls="--", color="gray", label=f"C = {floor:.4g}")
        ax2.legend(fontsize=8)
    ax2.set(xlabel="t (0 noise, 1 data)", ylabel="E[floor | t bin]")
    if used.any():
        ax2.set_yscale("log")
    ax2.set_title("loss floor vs t")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, file)


def plot_flowmap_error(err: np.ndarray, file: str | os.PathLike, *, title: str = "") -> str:
    """The error of a flow map over the ``(t, s)`` triangle: ``err`` ``(G, G)`` with cell ``[i, j]`` at
    ``t = i / G``, ``s = (j + 1) / G`` (NaN below the diagonal, left blank), as a colour map with each
    value written in its cell (:func:`flowscore.flowmap_runs.map_error_grid`)."""
    plt = _pyplot()
    err = np.asarray(err, dtype=np.float64)
    if err.ndim != 2 or err.shape[0] != err.shape[1] or err.shape[0] < 1:
        raise ValueError(f"err must be a square (G, G) array, got shape {err.shape}")
    g = err.shape[0]
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    image = ax.imshow(err, origin="upper", extent=(0.5 / g, 1 + 0.5 / g, (g - 0.5) / g, -0.5 / g),
                      cmap="viridis")  # fmt: skip
    finite = err[np.isfinite(err)]
    middle = float(np.median(finite)) if finite.size else 0.0
    for i in range(g):
        for j in range(g):
            if np.isfinite(err[i, j]):
                ax.text((j + 1) / g, i / g, f"{err[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if err[i, j] < middle else "black")  # fmt: skip
    ax.set_xlabel("s (end time; 1 = data)")
    ax.set_ylabel("t (start time; 0 = noise)")
    ax.set_title(title or "relative error of X(x, t, s)", fontsize=9)
    fig.colorbar(image, ax=ax, label="RMS(X_model - X_exact) / RMS(X_exact - x)")
    fig.tight_layout()
    return _save(fig, file)
