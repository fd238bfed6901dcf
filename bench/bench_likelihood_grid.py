"""Convergence of the likelihood ODE on images: the grid of the fixed-step integrator against its steps.

For a trained image run (e.g. ``flowscore train --data mnist``), the dequantised log-likelihood of ``--n``
held-out images (:func:`flowscore.workflows.data_log_likelihood`: rk4, Hutchinson probes and dequantisation
noise drawn from the same seed in every setting, so the settings differ only by the grid) on the grid
``uniform`` (even in t) and ``karras`` (EDM's spacing in sigma, down to 0.002) at several step counts, in nats
per image and in bits per dimension, with the wall time of each setting. The finest uniform grid is the
reference. Writes ``bench/results/likelihood_grid.md``.

Run: ``python bench/bench_likelihood_grid.py --run RUN_DIR [--n 24] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import flowscore as fs
from flowscore import workflows
from flowscore.likelihood import bits_per_dim

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = (("uniform", 100), ("uniform", 200), ("uniform", 400), ("uniform", 800), ("karras", 50),
            ("karras", 100), ("karras", 200))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--n", type=int, default=24, help="held-out images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "likelihood_grid.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = fs.load_run(args.run)
    if run.held_out is None or run.held_out.shape[0] < args.n:
        raise SystemExit(f"the run holds fewer than {args.n} held-out points")
    x = run.held_out[: args.n].float()
    dims = x[0].numel()
    rows = []
    for grid, steps in SETTINGS:
        start = time.perf_counter()
        ll = workflows.data_log_likelihood(
            run, x, dequantize=True, steps=steps, grid=grid, generator=torch.Generator().manual_seed(1)
        )
        seconds = time.perf_counter() - start
        bpd = float(bits_per_dim(ll, dims, bin_width=1.0).mean())  # data units: one pixel level a bin
        rows.append((grid, steps, float(ll.mean()), bpd, seconds))
        print(rows[-1], flush=True)
    ref = next(r for r in rows if r[:2] == ("uniform", 800))
    lines = [
        "# Likelihood ODE on images: grid against steps (bench/bench_likelihood_grid.py)",
        "",
        f"`python bench/bench_likelihood_grid.py --run RUN --n {args.n} --threads {args.threads}`, run "
        f"{os.path.basename(os.path.normpath(args.run))} ({run.config.data}, {run.config.steps} training "
        f"steps), torch {torch.__version__}, CPU. Mean over {args.n} held-out images, dequantised, the same "
        "probes and dequantisation noise in every row (rk4, Hutchinson, one probe).",
        "",
        "| grid | steps | log p (nats / image) | minus the uniform-800 reference | bits / dim | s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for grid, steps, ll, bpd, sec in rows:
        lines.append(f"| {grid} | {steps} | {ll:.2f} | {ll - ref[2]:+.2f} | {bpd:.4f} | {sec:.0f} |")
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
