"""A labelled 2D toy: per-class sample quality of a class-conditional model, W2 over its floor.

Data: 8gaussians with each point's mode (0..7) as its label (``flowscore.data.labelled_toy``), 20,000
points, given to the trainer through the API as a pair ``(x, y)``; every other setting is the default
(``TrainConfig()``: MLP 256 x 4, 10,000 steps, label dropout ``p_uncond`` 0.1). For each class k, ``--n``
ODE samples of class k (rk4, 100 steps, guidance 0) are compared with fresh draws of class k:

    ratio_k = mean_j W2(samples_k, A_kj) / mean_j W2(B_kj, A_kj)

where (A_kj, B_kj), j = 1..``--pairs``, are pairs of independent fresh draws of ``--n`` points of class k
(seeds never used in training): the denominator is the floor, what a perfect sampler reaches with ``--n``
points. Rows for the unconditional model (label -1) and for labels drawn from the training class mix
compare ``--n`` samples with fresh draws of the whole toy. Writes ``bench/results/labels_toy.md``.
Run: ``python bench/bench_labels_toy.py [--n 500] [--pairs 5] [--steps N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from flowscore import _io, workflows
from flowscore.data import labelled_toy
from flowscore.metrics import w2
from flowscore.samplers import DEFAULT_ODE_SAMPLER as ODE_SAMPLER
from flowscore.samplers import DEFAULT_ODE_STEPS as ODE_STEPS
from flowscore.training import TrainConfig, Trainer, load_run

HERE = os.path.dirname(os.path.abspath(__file__))
TOY = "8gaussians"
N_TRAIN = 20_000
GOAL = 1.15


def fresh(n: int, seed: int, label: int | None) -> torch.Tensor:
    """``n`` fresh points of the toy (of class ``label``; None: any class), from a seed unused in training."""
    x, y = labelled_toy(TOY, 40 * n, seed=seed)
    x = x if label is None else x[y == label]
    return x[:n]


def ratio(samples: np.ndarray, n: int, pairs: int, label: int | None, salt: int) -> dict[str, float]:
    floors, values = [], []
    for j in range(pairs):
        a = fresh(n, 20_001 + 1000 * salt + 2 * j, label)
        b = fresh(n, 20_002 + 1000 * salt + 2 * j, label)
        floors.append(float(w2(b, a)))
        values.append(float(w2(torch.from_numpy(samples), a)))
    floor, value = float(np.mean(floors)), float(np.mean(values))
    return {"w2": value, "floor": floor, "ratio": value / floor, "lo": min(floors), "hi": max(floors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="samples per class (default 500)")
    parser.add_argument("--pairs", type=int, default=5, help="fresh reference pairs per class (default 5)")
    parser.add_argument("--steps", type=int, help="training steps (default: the trainer's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = labelled_toy(TOY, N_TRAIN, seed=0)
    config = TrainConfig(**({"steps": args.steps} if args.steps else {}))
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        Trainer(config, os.path.join(work, "run"), data=(x, y), progress=False).train()
        train_s = time.perf_counter() - start
        run = load_run(os.path.join(work, "run"))
    start = time.perf_counter()
    rows = {}
    for k in range(run.num_classes):
        samples = workflows.sample_run(run, args.n, label=k, seed=k)
        rows[f"class {k}"] = ratio(samples, args.n, args.pairs, k, salt=k)
    rows["unconditional (label -1)"] = ratio(
        workflows.sample_run(run, args.n, label=-1, seed=100), args.n, args.pairs, None, salt=100
    )
    rows["labels drawn from the class mix"] = ratio(
        workflows.sample_run(run, args.n, seed=101), args.n, args.pairs, None, salt=101
    )
    sample_s = time.perf_counter() - start
    classes = [r["ratio"] for name, r in rows.items() if name.startswith("class")]
    lines = [
        "# A labelled 2D toy: per-class W2 over its floor",
        "",
        f"`python bench/bench_labels_toy.py --n {args.n} --pairs {args.pairs}"
        f"{f' --steps {args.steps}' if args.steps else ''}` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (a shared 2-core machine).",
        "",
        f"{TOY} with the mode as label, {N_TRAIN} points as `data=(x, y)`; `TrainConfig()` defaults: "
        f"{config.steps} steps, batch {config.batch_size}, p_uncond {config.p_uncond}, class-conditional "
        f"MLP; training {train_s:.0f} s, sampling {sample_s:.0f} s (wall clock, load average "
        f"{os.getloadavg()[0]:.1f} at the end: not a speed figure). Per class: {args.n} ODE samples "
        f"({ODE_SAMPLER}, {ODE_STEPS} steps, guidance 0) against {args.pairs} pairs of fresh draws of "
        f"{args.n} points of that class: floor = mean W2 between the two draws of a pair (its range in "
        "brackets), ratio = mean W2(samples, first draw) / floor. Goal (as for the unconditional toys): "
        f"ratio <= {GOAL}.",
        "",
        "| samples | W2 floor | W2 | ratio |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['floor']:.4f} [{r['lo']:.3f}, {r['hi']:.3f}] | {r['w2']:.4f} | {r['ratio']:.3f} |"
        )
    lines += [
        "",
        f"Per-class ratios: mean {np.mean(classes):.3f}, max {max(classes):.3f}; "
        f"{sum(c <= GOAL for c in classes)} of {len(classes)} classes within the goal.",
        "",
    ]
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    _io.write_bytes(os.path.join(args.out, "labels_toy.md"), text.encode())
    print(text)


if __name__ == "__main__":
    main()
