"""Sample quality of the default training settings on three 2D toys: W2 to fresh data over the W2 floor.

For each of moons, 8gaussians, checkerboard: train with ``TrainConfig(data=name)`` (all defaults), draw
``N`` samples with the ODE (rk4, 100 steps) and with the SDE (Euler-Maruyama, 500 steps), and compare

    ratio = mean_k W2(samples, A_k) / mean_k W2(B_k, A_k)

where (A_k, B_k), k = 1..K, are pairs of fresh, independent draws of ``N`` points of the toy (seeds never
used in training): W2(B_k, A_k) is the floor, the W2 a perfect sampler reaches with ``N`` points. One pair
is not enough: at N = 2000 the floor of moons alone ranged from 0.063 to 0.164 over three pairs, so a
single-pair ratio says more about the pair than about the model. Goal: ratio <= 1.15.
Writes ``bench/results/quality.md``. Run: ``python bench/bench_quality.py [--n 2000] [--toys moons ...]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from flowscore import _io, data, workflows
from flowscore.metrics import w2
from flowscore.samplers import DEFAULT_ODE_SAMPLER as ODE_SAMPLER
from flowscore.samplers import DEFAULT_ODE_STEPS as ODE_STEPS
from flowscore.samplers import DEFAULT_SDE_STEPS as SDE_STEPS
from flowscore.training import TrainConfig, Trainer, load_run

TOYS = ("moons", "8gaussians", "checkerboard")
GOAL = 1.15
HERE = os.path.dirname(os.path.abspath(__file__))


def measure(name: str, n: int, work: str, pairs: int) -> dict[str, float]:
    """Train on ``name`` with the defaults into ``work`` and measure W2 ratios of ODE and SDE samples."""
    config = TrainConfig(data=name)
    start = time.perf_counter()
    Trainer(config, os.path.join(work, name), progress=False).train()
    train_s = time.perf_counter() - start
    run = load_run(os.path.join(work, name))
    start = time.perf_counter()
    samples = workflows.draw_samples(run, n, seed=1)
    sample_s = time.perf_counter() - start
    # pairs of independent fresh draws (seeds unused in training); not halves of one draw: toys are ordered
    floors, odes, sdes = [], [], []
    for k in range(pairs):
        a, b = data.toy(name, n, seed=10_001 + 2 * k), data.toy(name, n, seed=10_002 + 2 * k)
        floors.append(w2(b, a))
        odes.append(w2(torch.from_numpy(samples.ode), a))
        sdes.append(w2(torch.from_numpy(samples.sde), a))
    floor, ode, sde = (float(np.mean(v)) for v in (floors, odes, sdes))
    return {
        "steps": config.steps, "train_s": train_s, "sample_s": sample_s, "floor": floor,
        "floor_min": min(floors), "floor_max": max(floors),
        "w2_ode": ode, "w2_sde": sde, "ratio_ode": ode / floor, "ratio_sde": sde / floor,
    }  # fmt: skip


def report(results: dict[str, dict[str, float]], n: int, pairs: int) -> str:
    lines = [
        "# Sample quality with the default training settings",
        "",
        f"`python bench/bench_quality.py --n {n}` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Each toy: `TrainConfig(data=name)` "
        f"(defaults), then {n} samples by ODE ({ODE_SAMPLER}, {ODE_STEPS} steps) and SDE "
        f"(Euler-Maruyama, {SDE_STEPS} steps). (A_k, B_k): {pairs} pairs of fresh independent draws of "
        f"{n} points of the toy. Floor = mean_k W2(B_k, A_k) (its range over the pairs in brackets); "
        f"ratio = mean_k W2(samples, A_k) / floor; goal <= {GOAL}.",
        "",
        "| data | steps | train s | W2 floor | W2 ODE | ratio ODE | W2 SDE | ratio SDE | goal met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        met = "yes" if max(r["ratio_ode"], r["ratio_sde"]) <= GOAL else "**no**"
        lines.append(
            f"| {name} | {r['steps']} | {r['train_s']:.0f} | {r['floor']:.4f} "
            f"[{r['floor_min']:.3f}, {r['floor_max']:.3f}] | {r['w2_ode']:.4f} | "
            f"{r['ratio_ode']:.3f} | {r['w2_sde']:.4f} | {r['ratio_sde']:.3f} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples and fresh data points per set")
    parser.add_argument("--pairs", type=int, default=5, help="pairs of fresh reference draws to average")
    parser.add_argument("--toys", nargs="+", default=list(TOYS), choices=data.TOYS)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "quality.md"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.toys:
            results[name] = measure(name, args.n, work, args.pairs)
            r = results[name]
            print(f"{name}: floor {r['floor']:.4f}  ODE {r['ratio_ode']:.3f}  SDE {r['ratio_sde']:.3f}  "
                  f"(train {r['train_s']:.0f} s, sample {r['sample_s']:.0f} s)", flush=True)  # fmt: skip
    text = report(results, args.n, args.pairs)
    _io.save_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
