"""Why ve's SDE misses parity: one linear cfm network sampled on every path through ``network_path="linear"``.

With every path run through the linear path's network at the time of equal log-SNR, the trained network of
any path is linear cfm's (docs/theory.md section 16): a path's ODE is then linear's ODE in other
coordinates, and what is left to differ is the sampler. This bench trains ONE linear cfm network (or reads
``--run``), wraps the same weights for each path and samples it with

* the default ODE sampler and the default SDE (Euler-Maruyama with linear's bounded diffusion carried to the
  path at equal log-SNR, ``g^2 = beta det_v / (alpha + beta)``, ``diffusion="linear"``, on linear's grid,
  uniform in linear's time ``tau = alpha / (alpha + beta)`` mapped to the path, ``grid="linear"``),
* the SDE's defaults of before: the path's own bounded diffusion ``g^2 = beta det_v``
  (``diffusion="bounded"``) on uniform times,
* either change alone: the carried diffusion on uniform times, the path's own on linear's grid.

Ratio = mean_k W2(samples, A_k) / mean_k W2(B_k, A_k) over ``--pairs`` pairs of fresh draws (as
``bench_matrix.py``). Writes ``bench/results/parity_sde.md``.
Run: ``nice -n 10 python bench/bench_parity_sde.py --toy 8gaussians [--run DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile

import numpy as np
import torch

import flowscore as fs
from flowscore import data, grids, workflows
from flowscore.metrics import w2
from flowscore.preconditioning import Preconditioned
from flowscore.training import TrainConfig, Trainer, load_run

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = ("linear", "vp", "vp-linear", "ve")
FINDINGS = """What it shows: with the same weights the ODE ratios agree across the paths (one ODE in other
coordinates, other grids), and so does the SDE now that its defaults are carried over with the network.
The SDE's defaults of before were not: the bounded diffusion g^2 = beta det_v is alpha / 2 times the
score-SDE's g^2, and at equal log-SNR alpha is linear's tau on linear but 1 on ve, so at high noise ve
injected 1 / tau times linear's relative diffusion; and uniform times on ve are uniform in log sigma, which
leaves few steps where the modes form. Carrying both over (linear's g at equal log-SNR, linear's grid: the
defaults now, docs/theory.md section 8) brings ve's SDE to linear's; either alone does part of it."""


def carried_diffusion(path: fs.GaussianPath):
    """Linear's bounded ``g^2`` at equal log-SNR, ``beta det_v / (alpha + beta)``, a function of ``t``."""

    def g_sq(t: torch.Tensor) -> torch.Tensor:
        s = path.schedule(t)
        return s.beta_det_v / (s.alpha + s.beta)

    return g_sq


def linear_grid(path: fs.GaussianPath, steps: int) -> torch.Tensor:
    """``steps + 1`` times of ``path`` at the log-SNR of uniform times on linear (within the path's range)."""
    ends = grids.sigma_of_t(path, torch.tensor([0.0, 1.0], dtype=torch.float64))
    lo, hi = (1 / (1 + float(s)) for s in ends)  # linear's tau = 1 / (1 + sigma)
    tau = torch.linspace(lo, hi, steps + 1, dtype=torch.float64)
    times = grids.t_of_sigma(path, ((1 - tau) / tau).clamp(float(ends[1]), float(ends[0])))
    times[0], times[-1] = 0.0, 1.0
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", default="8gaussians")
    parser.add_argument("--steps", type=int, default=3000, help="training steps of the linear cfm network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", default=None, help="a linear cfm run to read instead of training one")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--sde-steps", type=int, default=1000)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "parity_sde.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        run_dir = args.run or os.path.join(work, "run")
        if args.run is None:
            config = TrainConfig(data=args.toy, steps=args.steps, seed=args.seed, threads=1, loss_floor=False)
            Trainer(config, run_dir, progress=False).train()
        run = load_run(run_dir)
    if run.path != fs.get_path("linear") or run.config.data != args.toy:
        raise SystemExit(f"--run must be a linear run on {args.toy}")
    refs = [(data.toy(args.toy, args.n, seed=10_001 + 2 * k), data.toy(args.toy, args.n, seed=10_002 + 2 * k))
            for k in range(args.pairs)]  # fmt: skip
    floor = float(np.mean([w2(b, a) for a, b in refs]))

    def ratio(x: torch.Tensor | np.ndarray) -> float:
        return float(np.mean([w2(torch.as_tensor(x), a) for a, _ in refs])) / floor

    rows = []
    for name in PATHS:
        path = fs.get_path(name)
        model = Preconditioned(run.model.net, path, "velocity", run.model.sigma_data, network_path="linear")
        on_path = dataclasses.replace(run, model=model.eval(), path=path)
        cells = {
            "ODE": ratio(workflows.sample_run(on_path, args.n, seed=1, threads=1)),
            "SDE": ratio(workflows.sample_run(on_path, args.n, sampler="sde", seed=2, threads=1)),
        }
        for label, diffusion, times in (
            ("bounded g, uniform t (before)", "bounded", None),
            ("carried g, uniform t", carried_diffusion(path), None),
            ("bounded g, linear's grid", "bounded", linear_grid(path, args.sde_steps)),
            ("carried g, linear's grid", carried_diffusion(path), linear_grid(path, args.sde_steps)),
        ):
            grid = {"steps": args.sde_steps, "grid": "uniform"} if times is None else {"times": times}
            x = fs.sample(model, path, args.n, sampler="sde", diffusion=diffusion,
                          generator=torch.Generator().manual_seed(2), **grid)  # fmt: skip
            cells[label] = ratio(run.normalizer.decode(x.float()))
        rows.append((name, cells))
        print(name, {k: round(v, 3) for k, v in cells.items()}, flush=True)
    heads = list(rows[0][1])
    lines = [
        '# Parity on the SDE: one linear cfm network, every path (`network_path="linear"`)',
        "",
        f"`nice -n 10 python bench/bench_parity_sde.py --toy {args.toy} --steps {run.config.steps} "
        f"--n {args.n} --pairs {args.pairs}` on {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}. One linear cfm network (seed {run.config.seed}, {run.config.steps} steps, "
        "defaults), the same weights on every path; W2 / floor over fresh draws (bench_matrix's ratio; the "
        f"linear row is linear cfm's cell). SDE: Euler-Maruyama, {args.sde_steps} steps; column SDE: the "
        "default (carried g on linear's grid, through flowscore.sample's defaults); bounded g^2 = beta "
        "det_v (the path's own, the default before), carried g^2 = beta det_v / (alpha + beta) (linear's "
        "bounded g at equal log-SNR, written out here); linear's grid: uniform in linear's time at equal "
        "log-SNR (written out here).",
        "",
        "| path | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 1) + "|",
        *[f"| {name} | " + " | ".join(f"{c[h]:.3f}" for h in heads) + " |" for name, c in rows],
        "",
        FINDINGS,
    ]
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
