"""Few-step sampling accuracy: every flowscore ODE sampler x grid next to k-diffusion and diffusers.

The model is the exact marginal velocity of a Gaussian mixture (``GaussianMixture.marginal(path)``), so all
error is the sampler's. Three mixtures: 2D with 8 modes; 12-D with 10 modes; 64-D with 50 narrow modes
(image-like). Path ``linear``. Every sampler starts from the same states: exact draws of the path's
marginal at sigma = beta/alpha = 80 (EDM's sigma_max; t = 1/81), and integrates to t = 1. The reference is
scipy's DOP853 at rtol = atol = 1e-10 from the same states. Error: the mean over samples of
|x - x_ref| / sqrt(D) (root mean square per coordinate), at budgets of 5, 10, 20, 40 model calls (NFE).

* flowscore: every sampler of ``flowscore.samplers.ODE_SAMPLERS`` (dopri5 aside: adaptive) on every grid of
  ``flowscore.grids.GRIDS`` with as many steps as the budget allows, and the default ``fs.sample(model,
  path, steps=K)`` (sampler and grid chosen by flowscore).
* k-diffusion 0.1.1.post1: euler, heun, dpm_2, lms, dpmpp_2m on Karras sigmas (rho = 7, 0.002 .. 80, then
  0), driving ``flowscore.adapters.to_denoiser`` of the same model.
* diffusers: DPMSolverMultistepScheduler (dpmsolver++, order 2, prediction_type "sample") on the same Karras
  sigmas.

Writes ``bench/results/fewstep.md`` and ``bench/results/fewstep.png``.
A trained model (``--trained STEPS``, writes ``bench/results/fewstep_trained.md``): W2 / floor of samples
of a model trained on 8gaussians with the default settings, at 5, 10, 20 model calls, for the default and
other samplers.

Run: ``OMP_NUM_THREADS=1 python bench/bench_fewstep.py`` (several minutes on one core), then
``python bench/bench_fewstep.py --trained 4000``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

import flowscore as fs
from flowscore.adapters import to_denoiser
from flowscore.grids import GRIDS, t_of_sigma
from flowscore.samplers import CALLS_PER_STEP, ODE_SAMPLERS, defaults

sys.path.insert(0, str(Path(__file__).parent))
from peers import diffusers_dpm_solver, k_diffusion_sampling  # noqa: E402

F64 = torch.float64
RESULTS = Path(__file__).parent / "results"
PATH = "linear"
BUDGETS = (5, 10, 20, 40)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
K_SAMPLERS = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m")
K_TWO_CALLS = ("heun", "dpm_2")  # two model calls per step but the last (Euler to sigma = 0)


def mixtures() -> dict[str, tuple[fs.GaussianMixture, int]]:
    """name -> (mixture, number of samples)."""
    gen = torch.Generator().manual_seed(0)
    angles = torch.arange(8, dtype=F64) * 2 * math.pi / 8
    ring = fs.GaussianMixture(
        2.0 * torch.stack([angles.cos(), angles.sin()], 1), torch.full((8,), 0.15, dtype=F64)
    )
    means12 = 1.5 * torch.randn(10, 12, generator=gen, dtype=F64)
    stds12 = 0.1 + 0.3 * torch.rand(10, generator=gen, dtype=F64)
    weights12 = torch.rand(10, generator=gen, dtype=F64) + 0.5
    mid = fs.GaussianMixture(means12, stds12, weights12 / weights12.sum())
    means64 = torch.randn(50, 64, generator=gen, dtype=F64).clamp(-2, 2) * 0.6
    stds64 = 0.02 + 0.06 * torch.rand(50, generator=gen, dtype=F64)
    narrow = fs.GaussianMixture(means64, stds64)
    return {"2d-8modes": (ring, 500), "12d-10modes": (mid, 400), "64d-50narrow": (narrow, 256)}


def start_states(mixture: fs.GaussianMixture, n: int, t0: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x_data = mixture.sample(n, gen)
    noise = torch.randn(x_data.shape, generator=gen, dtype=F64)
    return fs.get_path(PATH).sample(x_data, torch.full((n,), t0, dtype=F64), noise)


def reference(velocity, x0: torch.Tensor, t0: float) -> torch.Tensor:
    shape = x0.shape

    def rhs(t, flat):
        x = torch.from_numpy(flat).reshape(shape)
        with torch.no_grad():
            return velocity(x, torch.full((shape[0],), t, dtype=F64)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (t0, 1.0), x0.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-10)
    if not sol.success:
        raise RuntimeError(sol.message)
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


class Counted:
    """A denoiser that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.fn(x, sigma)


def karras_sigmas(n: int) -> torch.Tensor:
    """k-diffusion's ``get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, RHO)`` in float64: n sigmas, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    hi, lo = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return torch.cat([(hi + ramp * (lo - hi)) ** RHO, torch.zeros(1, dtype=F64)])


def error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).flatten(1).norm(dim=1).mean() / math.sqrt(ref[0].numel()))


def flowscore_steps(sampler: str, budget: int) -> int:
    if sampler == "edm-heun":
        return (budget + 1) // 2
    return max(1, budget // CALLS_PER_STEP[sampler])


def run_flowscore(model, x0, t0, ref) -> list[dict]:
    rows = []
    for sampler in ODE_SAMPLERS:
        if sampler == "dopri5":
            continue
        for grid in GRIDS:
            for budget in BUDGETS:
                steps = flowscore_steps(sampler, budget)
                if sampler == "rk4" and budget < 4:
                    continue
                result = fs.sample(
                    model,
                    PATH,
                    x_init=x0,
                    t_start=t0,
                    sampler=sampler,
                    steps=steps,
                    grid=grid,
                    return_info=True,
                )
                out, nfe = result.x, result.nfe
                rows.append(
                    dict(
                        lib="flowscore",
                        method=f"{sampler} / {grid}",
                        budget=budget,
                        nfe=nfe,
                        error=error(out, ref),
                    )
                )
    for budget in BUDGETS:
        result = fs.sample(model, PATH, x_init=x0, t_start=t0, steps=budget, return_info=True)
        out, nfe = result.x, result.nfe
        sampler, _, grid = defaults(None, budget, None)
        rows.append(
            dict(
                lib="default",
                method=f"default ({sampler} / {grid})",
                budget=budget,
                nfe=nfe,
                error=error(out, ref),
            )
        )
    return rows


def run_peers(model, x0, t0, ref) -> list[dict]:
    rows = []
    denoiser = to_denoiser(model, PATH, "velocity")
    alpha0 = float(fs.get_path(PATH).alpha(torch.tensor(t0, dtype=F64)))
    x_ve = x0 / alpha0
    kd = k_diffusion_sampling()
    for budget in BUDGETS:
        if kd is not None:
            for name in K_SAMPLERS:
                n = (budget + 1) // 2 if name in K_TWO_CALLS else budget
                sigmas = karras_sigmas(n)
                counted = Counted(denoiser)
                out = getattr(kd, f"sample_{name}")(counted, x_ve.clone(), sigmas, disable=True)
                rows.append(
                    dict(
                        lib="k-diffusion",
                        method=f"k-diffusion {name}",
                        budget=budget,
                        nfe=counted.calls,
                        error=error(out, ref),
                    )
                )
        sigmas = karras_sigmas(budget)
        result = diffusers_dpm_solver(denoiser, x_ve.clone(), sigmas)
        if result is not None:
            out, calls = result
            rows.append(
                dict(
                    lib="diffusers",
                    method="diffusers DPMSolverMultistep",
                    budget=budget,
                    nfe=calls,
                    error=error(out, ref),
                )
            )
    return rows


def summary(problem: str, rows: list[dict]) -> list[dict]:
    out = []
    for budget in BUDGETS:
        at = [r for r in rows if r["budget"] == budget and r["nfe"] <= budget]
        best = {
            lib: min((r for r in at if r["lib"] == lib), key=lambda r: r["error"], default=None)
            for lib in ("flowscore", "k-diffusion", "diffusers", "default")
        }
        out.append(dict(problem=problem, budget=budget, **best))
    return out


def fmt(r) -> str:
    return "n/a" if r is None else f"{r['error']:.2e} ({r['method']}, {r['nfe']})"


def write(all_rows: dict[str, list[dict]], summaries: list[dict], seconds: float) -> None:
    lines = [
        "# Few-step sampling: error vs model calls, flowscore next to k-diffusion and diffusers",
        "",
        "Produced by `bench/bench_fewstep.py` in "
        f"{seconds:.0f} s. Exact Gaussian-mixture velocity fields on the `linear` path (all error is the "
        "sampler's); every sampler starts from the same exact draws of the marginal at sigma = 80 (t = 1/81) "
        "and integrates to t = 1. Reference: scipy DOP853, rtol = atol = 1e-10. Error: mean over samples of "
        "|x - x_ref| / sqrt(D). Budget: model calls (NFE); the NFE actually used is in parentheses. "
        "k-diffusion and diffusers run on Karras sigmas (rho = 7, 80 .. 0.002, then 0).",
        "",
        "A trained model, W2 / floor at 5, 10, 20 model calls: [fewstep_trained.md](fewstep_trained.md).",
        "",
        "## Best at each budget",
        "",
        "| mixture | NFE | flowscore best | k-diffusion best | diffusers DPM++2M | flowscore default "
        "| best fs / best kd | default / best fs |",
        "|---|---:|---|---|---|---|---:|---:|",
    ]
    for s in summaries:
        fsb, kdb, dfb = s["flowscore"], s["k-diffusion"], s["default"]
        r1 = f"{fsb['error'] / kdb['error']:.2f}" if fsb and kdb else "n/a"
        r2 = f"{dfb['error'] / fsb['error']:.2f}" if fsb and dfb else "n/a"
        lines.append(
            f"| {s['problem']} | {s['budget']} | {fmt(fsb)} | {fmt(kdb)} "
            f"| {fmt(s['diffusers'])} | {fmt(dfb)} "
            f"| {r1} | {r2} |"
        )
    lines += ["", "## Where flowscore is short of the goal", ""]
    short = []
    for s in summaries:
        fsb, kdb, dfb = s["flowscore"], s["k-diffusion"], s["default"]
        if fsb and kdb and fsb["error"] > kdb["error"]:
            ratio = fsb["error"] / kdb["error"]
            short.append(f"- {s['problem']}, {s['budget']} NFE: flowscore's best is {ratio:.2f}x "
                         f"k-diffusion's best ({kdb['method']}).")  # fmt: skip
        if fsb and dfb and dfb["error"] > 2 * fsb["error"]:
            ratio = dfb["error"] / fsb["error"]
            short.append(f"- {s['problem']}, {s['budget']} NFE: the default is {ratio:.2f}x "
                         f"flowscore's best ({fsb['method']}).")  # fmt: skip
    lines += short or ["- nowhere."]
    lines += [
        "",
        "The goal (at 10 and 20 model calls: flowscore's best <= k-diffusion's best, the default within 2x "
        "of flowscore's best) is judged at those budgets; 5 and 40 are shown for the trend. Why the default "
        "(unipc on a log-SNR grid ending at sigma_min = 0.5 / steps) trails where it does: at large budgets "
        "the high-order integrators in t (rk4, midpoint on the uniform grid) win on these smooth, nearly "
        "straight linear-path trajectories, while the log-SNR grid's first-order last step from sigma_min "
        "bounds the default's error; at 5 calls no single grid suits every mixture (uniform in t is best for "
        "wide modes, log-SNR spacing for narrow ones). k-diffusion's lms (4th-order Adams-Bashforth in sigma "
        "on the Karras grid) is the strongest peer on the narrow 64-D mixture at 40 calls. k-diffusion's "
        "dpmpp_2m and diffusers' DPMSolverMultistep coincide (same algorithm, same sigmas); flowscore's "
        "dpm++2m / karras and ddim / karras reproduce k-diffusion's dpmpp_2m and euler to 1e-9 "
        "(tests/test_solvers.py).",
    ]
    for problem, rows in all_rows.items():
        lines += [
            "",
            f"## {problem}: every method",
            "",
            "| method | " + " | ".join(f"{b} NFE" for b in BUDGETS) + " |",
            "|---|" + "---:|" * len(BUDGETS),
        ]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for m in methods:
            cells = []
            for b in BUDGETS:
                r = next((r for r in rows if r["method"] == m and r["budget"] == b), None)
                cells.append("" if r is None else f"{r['error']:.2e} ({r['nfe']})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (RESULTS / "fewstep.md").write_text("\n".join(lines) + "\n")


def plot(all_rows: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_rows), figsize=(5.5 * len(all_rows), 4.5))
    for ax, (problem, rows) in zip(np.atleast_1d(axes), all_rows.items(), strict=True):
        best_fs = {}
        for r in rows:
            if r["lib"] == "flowscore" and r["nfe"] <= r["budget"]:
                if r["budget"] not in best_fs or r["error"] < best_fs[r["budget"]]["error"]:
                    best_fs[r["budget"]] = r
        ax.loglog(BUDGETS, [best_fs[b]["error"] for b in BUDGETS], "k-o", lw=2, label="flowscore best")
        default = [r for r in rows if r["lib"] == "default"]
        ax.loglog(
            [r["nfe"] for r in default], [r["error"] for r in default], "r-s", lw=2, label="flowscore default"
        )
        for m in dict.fromkeys(r["method"] for r in rows if r["lib"] in ("k-diffusion", "diffusers")):
            pts = [(r["nfe"], r["error"]) for r in rows if r["method"] == m]
            ax.loglog(*zip(*pts, strict=True), "--", marker=".", label=m)
        ax.set_title(problem)
        ax.set_xlabel("model calls (NFE)")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("mean |x - x_ref| / sqrt(D)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "fewstep.png", dpi=110)


TRAINED_SAMPLERS = (
    ("euler", "uniform"),
    ("midpoint", "uniform"),
    ("heun", "uniform"),
    ("dpm++2m", "uniform"),
    ("dpm++3m", "logsnr"),
    ("unipc", "uniform"),
    ("unipc", "logsnr"),
    ("unipc", "karras"),
)


def trained_rows(toy: str, train_steps: int, n: int = 2000, pairs: int = 3) -> list[dict]:
    """W2(samples, fresh data) / W2 floor (mean over ``pairs`` fresh pairs) of a model trained on ``toy``
    with the default settings for ``train_steps``, at 5, 10, 20 model calls, default and other samplers."""
    import tempfile

    from flowscore import data
    from flowscore.metrics import w2
    from flowscore.training import TrainConfig, Trainer, load_run

    with tempfile.TemporaryDirectory() as work:
        Trainer(TrainConfig(data=toy, steps=train_steps), f"{work}/run", progress=False).train()
        run = load_run(f"{work}/run")
    fresh = [
        (data.toy(toy, n, seed=20_001 + 2 * k), data.toy(toy, n, seed=20_002 + 2 * k)) for k in range(pairs)
    ]
    floor = float(np.mean([w2(b, a) for a, b in fresh]))

    def ratio(x: torch.Tensor) -> float:
        x = run.normalizer.decode(x.float()).detach()
        return float(np.mean([w2(x, a) for a, _ in fresh])) / floor

    rows = []
    with torch.no_grad():
        for budget in (5, 10, 20):
            gen = torch.Generator().manual_seed(3)
            result = fs.sample(run.model, run.path, n, prediction=run.prediction, steps=budget, generator=gen,
                               return_info=True)  # fmt: skip
            x, nfe = result.x, result.nfe
            sampler, _, grid = defaults(None, budget, None)
            rows.append(dict(method=f"default ({sampler} / {grid})", budget=budget, nfe=nfe, ratio=ratio(x)))
            for sampler, grid in TRAINED_SAMPLERS:
                steps = flowscore_steps(sampler, budget)
                gen = torch.Generator().manual_seed(3)
                result = fs.sample(run.model, run.path, n, prediction=run.prediction, sampler=sampler,
                                   steps=steps, grid=grid, generator=gen, return_info=True)  # fmt: skip
                x, nfe = result.x, result.nfe
                rows.append(dict(method=f"{sampler} / {grid}", budget=budget, nfe=nfe, ratio=ratio(x)))
    return rows


def write_trained(toy: str, train_steps: int, rows: list[dict]) -> None:
    lines = [
        "# Few-step sampling of a trained model (`bench/bench_fewstep.py --trained`)",
        "",
        f"{toy}, default training settings, {train_steps} training steps.",
        "",
        "W2(2000 samples, fresh data) / W2 floor (mean over 3 pairs of fresh draws), prior draws at t = 0.",
        "",
        "| sampler | 5 NFE | 10 NFE | 20 NFE |",
        "|---|---:|---:|---:|",
    ]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = [next(f"{r['ratio']:.2f} ({r['nfe']})" for r in rows if r["method"] == m and r["budget"] == b)
                 for b in (5, 10, 20)]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (RESULTS / "fewstep_trained.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    if "--trained" in sys.argv:  # the trained-model table only
        steps = int(sys.argv[sys.argv.index("--trained") + 1])
        write_trained("8gaussians", steps, trained_rows("8gaussians", steps))
        return
    torch.set_default_dtype(F64)
    begin = time.perf_counter()
    t0 = float(t_of_sigma(PATH, SIGMA_MAX))
    all_rows, summaries = {}, []
    for problem, (mixture, n) in mixtures().items():
        model = mixture.marginal(PATH).velocity
        x0 = start_states(mixture, n, t0)
        ref = reference(model, x0, t0)
        rows = run_flowscore(model, x0, t0, ref) + run_peers(model, x0, t0, ref)
        all_rows[problem] = rows
        summaries += summary(problem, rows)
        print(problem, f"{time.perf_counter() - begin:.0f} s", flush=True)
        write(all_rows, summaries, time.perf_counter() - begin)  # partial results as they come
    write(all_rows, summaries, time.perf_counter() - begin)
    plot(all_rows)


if __name__ == "__main__":
    main()
