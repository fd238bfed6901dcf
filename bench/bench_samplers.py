"""Sampler error against the number of field evaluations (NFE), on an exact Gaussian-mixture field.

Data: 8 isotropic Gaussians (std 0.15) on a circle of radius 2; the model is the mixture's closed-form
marginal velocity (``GaussianMixture.marginal(path).velocity``): the only error is the solver's. For each
path, the same float64 prior draws are pushed through euler / midpoint / heun / rk4 at several step counts
and dopri5 at several tolerances, and compared with a tight reference (dopri5, rtol = atol = 1e-9): mean
|x - x_ref| (the mean Euclidean distance per sample) against NFE. A second table measures the SDE's choice of
g (the default of ``flowscore.samplers.diffusion_schedule``): within-mode variance of SDE samples over the
true one.

Writes ``bench/results/samplers.md`` and ``bench/results/samplers.png``.
Run: ``python bench/bench_samplers.py`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from flowscore import validation
from flowscore.mixtures import GaussianMixture
from flowscore.samplers import EVALS_PER_STEP, sample, sample_ode

F64 = torch.float64
RESULTS = Path(__file__).parent / "results"
PATHS = ("linear", "vp")
STEPS = (4, 8, 16, 32, 64, 128)
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
N_SAMPLES = 1000
N_SDE = 10000


def eight_gaussians() -> GaussianMixture:
    angles = torch.arange(8, dtype=F64) * 2 * math.pi / 8
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
    return GaussianMixture(means, torch.full((8,), 0.15, dtype=F64))


class Counted:
    """A field that counts its calls (one call = one NFE for the whole batch)."""

    def __init__(self, field):
        self.field, self.calls = field, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.field(x, t)


def ode_rows(path: str, mixture: GaussianMixture) -> list[dict]:
    velocity = mixture.marginal(path).velocity
    x0 = path_prior(path)
    reference = sample_ode(velocity, x0, [0.0, 1.0], "dopri5", rtol=1e-9, atol=1e-9)
    rows = []
    for method in EVALS_PER_STEP:
        for steps in STEPS:
            field = Counted(velocity)
            out = sample_ode(field, x0, torch.linspace(0, 1, steps + 1, dtype=F64), method)
            rows.append(row(path, method, f"steps={steps}", field.calls, out, reference))
    for tol in TOLERANCES:
        field = Counted(velocity)
        out = sample_ode(field, x0, [0.0, 1.0], "dopri5", rtol=tol, atol=tol)
        rows.append(row(path, "dopri5", f"tol={tol:g}", field.calls, out, reference))
    return rows


def path_prior(path: str) -> torch.Tensor:
    return torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(0), dtype=F64)


def row(path, method, setting, nfe, out, reference) -> dict:
    error = float((out - reference).norm(dim=1).mean())
    return {"path": path, "method": method, "setting": setting, "nfe": nfe, "error": error}


def sde_rows(mixture: GaussianMixture) -> list[dict]:
    """Within-mode variance ratio (1 = exact) of SDE samples for four choices of g (and grid)."""
    true_var = float(mixture.stds[0]) ** 2
    rows = []
    for path in PATHS:
        velocity = mixture.marginal(path).velocity
        for label, diffusion, grid in (
            ("default (linear's g and grid)", None, None),
            ("bounded, uniform t (the default before)", "bounded", "uniform"),
            ("2 x default", 2.0, None),
            ("score-sde, uniform t", "score-sde", "uniform"),
        ):
            ratios = []
            for steps in (25, 100):
                out = sample(
                    velocity,
                    path,
                    N_SDE,
                    sampler="sde",
                    steps=steps,
                    grid=grid,
                    diffusion=diffusion,
                    dtype=F64,
                    generator=torch.Generator().manual_seed(1),
                )
                within = torch.cdist(out, mixture.means).min(1).values.pow(2).mean() / 2
                ratios.append(float(within) / true_var)
            rows.append({"path": path, "g": label, "25 steps": ratios[0], "100 steps": ratios[1]})
    return rows


def write_markdown(ode: list[dict], sde: list[dict], seconds: float) -> None:
    lines = [
        "# Sampler error vs NFE (exact 8-Gaussian marginal field)",
        "",
        f"{N_SAMPLES} float64 prior draws, error = mean |x - x_ref| against dopri5 at rtol = atol = 1e-9 "
        "(same draws). NFE = field evaluations per batch. Produced by `bench/bench_samplers.py` "
        f"in {seconds:.0f} s.",
        "",
        "| path | method | setting | NFE | mean abs error |",
        "|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['path']} | {r['method']} | {r['setting']} | {r['nfe']} | {r['error']:.3e} |" for r in ode
    ]
    lines += [
        "",
        "## SDE: choice of the diffusion g (velocity model, Euler-Maruyama + final deterministic step)",
        "",
        f"Within-mode variance of {N_SDE} samples over the true 0.15^2 (1 is exact; standard error "
        f"about {1 / math.sqrt(N_SDE):.3f}).",
        "",
        "| path | g^2 | 25 steps | 100 steps |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['path']} | {r['g']} | {r['25 steps']:.3f} | {r['100 steps']:.3f} |" for r in sde]
    (RESULTS / "samplers.md").write_text("\n".join(lines) + "\n")


def write_plot(ode: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PATHS), figsize=(5 * len(PATHS), 4), sharey=True)
    for ax, path in zip(axes, PATHS, strict=True):
        for method in (*EVALS_PER_STEP, "dopri5"):
            pts = [(r["nfe"], r["error"]) for r in ode if r["path"] == path and r["method"] == method]
            ax.loglog(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_title(f"path = {path}")
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean |x - x_ref|")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "samplers.png", dpi=120)
    plt.close(fig)


def main() -> None:
    start = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    mixture = eight_gaussians()
    with validation(False):  # inputs are known good: skip the value checks in the hot loop
        ode = [r for path in PATHS for r in ode_rows(path, mixture)]
        sde = sde_rows(mixture)
    seconds = time.perf_counter() - start
    write_markdown(ode, sde, seconds)
    write_plot(ode)
    for r in ode:
        print(f"{r['path']:7s} {r['method']:9s} {r['setting']:11s} nfe={r['nfe']:5d} error={r['error']:.3e}")
    for r in sde:
        print(r)
    print(f"{seconds:.1f} s")


if __name__ == "__main__":
    main()
