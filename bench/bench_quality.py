"""Sample quality of the default training settings on three 2D toys: W2 to fresh data over the W2 floor.

For each of moons, 8gaussians, checkerboard: train with ``TrainConfig(data=name)`` (all defaults), draw
``N`` samples with the ODE (rk4, 100 steps) and with the SDE (Euler-Maruyama, 500 steps), and compare

    ratio = W2(samples, A) / W2(B, A)

where A and B are two fresh, independent draws of ``N`` points of the toy (seeds never used in training):
W2(B, A) is the floor, the W2 a perfect sampler reaches with ``N`` points. Goal: ratio <= 1.15.
Writes ``bench/results/quality.md``. Run: ``python bench/bench_quality.py [--n 2000] [--toys moons ...]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from flowscore import _io, data, demo
from flowscore.metrics import w2
from flowscore.training import TrainConfig, Trainer, load_run

TOYS = ("moons", "8gaussians", "checkerboard")
GOAL = 1.15
HERE = os.path.dirname(os.path.abspath(__file__))


def measure(name: str, n: int, work: str) -> dict[str, float]:
    """Train on ``name`` with the defaults into ``work`` and measure W2 ratios of ODE and SDE samples."""
    config = TrainConfig(data=name)
    start = time.perf_counter()
    Trainer(config, os.path.join(work, name), progress=False).train()
    train_s = time.perf_counter() - start
    run = load_run(os.path.join(work, name))
    start = time.perf_counter()
    samples = demo.draw_samples(run, n, seed=1)
    sample_s = time.perf_counter() - start
    # two independent fresh draws (seeds unused in training); not halves of one draw: toys are ordered by mode
    a, b = data.toy(name, n, seed=10_001), data.toy(name, n, seed=10_002)
    floor = w2(b, a)
    ode, sde = w2(torch.from_numpy(samples.ode), a), w2(torch.from_numpy(samples.sde), a)
    return {
        "steps": config.steps, "train_s": train_s, "sample_s": sample_s, "floor": floor,
        "w2_ode": ode, "w2_sde": sde, "ratio_ode": ode / floor, "ratio_sde": sde / floor,
    }  # fmt: skip


def report(results: dict[str, dict[str, float]], n: int) -> str:
    lines = [
        "# Sample quality with the default training settings",
        "",
        f"`python bench/bench_quality.py --n {n}` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Each toy: `TrainConfig(data=name)` "
        f"(defaults), then {n} samples by ODE ({demo.ODE_SAMPLER}, {demo.ODE_STEPS} steps) and SDE "
        f"(Euler-Maruyama, {demo.SDE_STEPS} steps). A, B: two fresh independent draws of {n} points of the "
        f"toy. Floor = W2(B, A); ratio = W2(samples, A) / floor; goal <= {GOAL}.",
        "",
        "| data | steps | train s | W2 floor | W2 ODE | ratio ODE | W2 SDE | ratio SDE | goal met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        met = "yes" if max(r["ratio_ode"], r["ratio_sde"]) <= GOAL else "**no**"
        lines.append(
            f"| {name} | {r['steps']} | {r['train_s']:.0f} | {r['floor']:.4f} | {r['w2_ode']:.4f} | "
            f"{r['ratio_ode']:.3f} | {r['w2_sde']:.4f} | {r['ratio_sde']:.3f} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples and fresh data points per set")
    parser.add_argument("--toys", nargs="+", default=list(TOYS), choices=data.TOYS)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "quality.md"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.toys:
            results[name] = measure(name, args.n, work)
            r = results[name]
            print(f"{name}: floor {r['floor']:.4f}  ODE {r['ratio_ode']:.3f}  SDE {r['ratio_sde']:.3f}  "
                  f"(train {r['train_s']:.0f} s, sample {r['sample_s']:.0f} s)", flush=True)  # fmt: skip
    text = report(results, args.n)
    _io.save_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
