"""The error of a trained flow map against the exact flow map over the (t, s) triangle, for a run.

Trains (or reuses with ``--run``) ``flowscore train --data TOY --objective meanflow --steps N`` with the
defaults otherwise, then computes :func:`flowscore.flowmap_runs.map_error_grid` on the run's training split
(at most ``flowmap_runs.MAP_POINTS`` points, in the model's space): per cell ``(t, s)`` the RMS of
``X_model(x, t, s) - X_exact(x, t, s)`` over the RMS of the exact displacement ``X_exact - x``, and the
run's ``flowscore eval`` numbers at 1, 2 and 4 calls.

Writes ``bench/results/flowmap_error_<toy>.png`` and ``bench/results/flowmap_error_<toy>.md``. Run:
``OMP_NUM_THREADS=1 python bench/bench_flowmap_error.py [--toy moons] [--steps 3000] [--run RUN_DIR]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

import flowscore as fs
from flowscore import _io, flowmap_runs, plots, workflows
from flowscore.image_metrics import training_images

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", default="moons")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--objective", default="meanflow", choices=("meanflow", "semigroup"))
    parser.add_argument("--run", default=None, help="an existing flow-map run instead of training one")
    parser.add_argument("--n", type=int, default=2000, help="points per set of the eval (default 2000)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        run_dir = args.run or os.path.join(work, "run")
        if args.run is None:
            config = fs.TrainConfig(
                data=args.toy, objective=args.objective, steps=args.steps, loss_floor=False
            )
            fs.Trainer(config, run_dir, progress=False).train()
        run = fs.load_run(run_dir)
    points = training_images(run)
    points = run.held_out.float() if points is None else points
    which = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    err = flowmap_runs.map_error_grid(
        run.model, run.path, run.normalizer.encode(points[which[: flowmap_runs.MAP_POINTS]]), n=400, seed=7
    )
    map_s = time.perf_counter() - start
    result = workflows.evaluate_run(run, n=args.n)
    name = run.objective["name"]
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"flowmap_error_{run.config.data}.png")
    plots.plot_flowmap_error(err, png, title=f"{name} on {run.config.data}, {run.step} steps: error of "
                             "X(x, t, s)\nagainst the exact map of the training data")  # fmt: skip
    g = err.shape[0]
    c = run.config
    lines = [
        f"# Flow-map error over the (t, s) triangle: {name} on {c.data}",
        "",
        f"`python bench/bench_flowmap_error.py --toy {c.data} --objective {name} --steps {c.steps}` "
        f"(`flowscore train --data {c.data} --objective {name} --steps {c.steps}`, the other settings their "
        f"defaults: batch {c.batch_size}, lr {c.lr}, the default two-time MLP, EMA {c.ema_decay}); "
        f"torch {torch.__version__}, 1 thread, a shared 2-core machine (seconds are not speed figures).",
        "",
        f"Map error: `flowmap_runs.map_error_grid`, {min(points.shape[0], flowmap_runs.MAP_POINTS)} training "
        "points span the exact map (`EmpiricalMarginal.flow_map`, float64, tolerance 1e-6); 400 start points "
        "x_t per cell; cell = RMS(X_model(x, t, s) - X_exact(x, t, s)) / RMS(X_exact - x) in the model's "
        f"space ({map_s:.0f} s). Rows t, columns s:",
        "",
        "| t \\ s | " + " | ".join(f"{(j + 1) / g:.2f}" for j in range(g)) + " |",
        "|---|" + "---:|" * g,
    ]
    for i in range(g):
        cells = " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in err[i])
        lines.append(f"| {i / g:.2f} | {cells} |")
    lines += [
        "",
        f"`flowscore eval` of the run (n = {result['n']} per set, W2 in data units, floor "
        f"{result['w2_floor']:.4f}):",
        "",
        "| calls | W2 | W2 / floor | MMD^2 (unbiased) |",
        "|---:|---:|---:|---:|",
    ]
    for k in result["calls"]:
        w2_key, ratio_key, mmd_key = flowmap_runs.call_keys(k)
        lines.append(f"| {k} | {result[w2_key]:.4f} | {result[ratio_key]:.3f} | {result[mmd_key]:.3g} |")
    lines += [
        "",
        "Reading: the relative error grows towards s = 1 and with t. At s = 1 the exact map of a finite set "
        "ends on its points (the empirical velocity is singular there), which a model that generalises does "
        "not follow; for late t the displacement X - x is small, so the same absolute error weighs more.",
        "",
        f"![map error]({os.path.basename(png)})",
        "",
    ]
    text = "\n".join(lines)
    _io.write_bytes(os.path.join(args.out, f"flowmap_error_{c.data}.md"), text.encode())
    print(text)


if __name__ == "__main__":
    main()
