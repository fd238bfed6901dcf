"""Digits (scikit-learn 8x8) with a flow-map model: recognisability and class share at 1 and 2 model calls.

Trains ``TrainConfig(data="digits", objective="meanflow")`` (the digits image defaults: class-conditional
UNet, built two-time, label dropout) with ``fs.MeanFlow`` and classifier-free guidance ``w`` trained into
the target (``--guidance``, one run per weight; ``--steps``), then samples by K jumps (K = 1, 2 model calls)
and measures, as bench_digits.py and bench_labels_digits.py do, with an RBF SVC (Platt probabilities) fitted
on the run's own training split:

* the mean max-probability of the classifier on samples whose classes are drawn from the training mix
  (next to the held-out real digits);
* the class share: samples asked for class k (``n / 10`` per class) that the classifier assigns to k.

Writes ``bench/results/flowmap_digits.md`` (and ``flowmap_digits.png``: 64 samples at 1 and 2 calls per
guidance weight). Run: ``OMP_NUM_THREADS=1 python bench/bench_flowmap_digits.py [--steps N]
[--guidance 0 1]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch
from bench_digits import describe, real_split

import flowscore as fs
from flowscore import _io, plots, workflows
from flowscore.objectives import objective_from_config, objective_from_dict

HERE = os.path.dirname(os.path.abspath(__file__))
CALLS = (1, 2)


def train(steps: int, guidance: float, run_dir: str) -> tuple[Any, float]:
    """The run of ``steps`` MeanFlow steps on digits with guidance ``guidance`` in the target."""
    config = fs.TrainConfig(data="digits", steps=steps, loss_floor=False)
    defaults = objective_from_config(dataclasses.replace(config, objective="meanflow")).to_dict()
    objective = objective_from_dict({**defaults, "guidance": guidance})
    start = time.perf_counter()
    fs.Trainer(config, run_dir, progress=False, objective=objective).train()
    return fs.load_run(run_dir), time.perf_counter() - start


def class_share(run: Any, classifier: Any, calls: int, n: int) -> tuple[float, float]:
    """``(share, min over classes)``: samples of class k (``n // 10`` each, K jumps) assigned to k."""
    shares = []
    for k in range(10):
        x = workflows.sample_run(run, max(n // 10, 1), steps=calls, label=k, seed=100 + k)
        shares.append(float((classifier.predict(x.reshape(len(x), -1).astype(np.float64)) == k).mean()))
    return float(np.mean(shares)), float(np.min(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--n", type=int, default=500, help="samples per set (default 500)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument(
        "--run", default=None, help="evaluate this digits flow-map run (e.g. a copy of a checkpoint) instead"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sklearn.svm import SVC

    rows, grids, meta = [], {}, {}
    classifier = held = None
    if args.run is not None:
        given = fs.load_run(args.run)
        args.guidance, args.steps = [float(given.objective.get("guidance", 0.0))], given.step
    for w in args.guidance:
        if args.run is not None:
            run, train_s = given, math.nan
        else:
            with tempfile.TemporaryDirectory() as work:
                run, train_s = train(args.steps, w, os.path.join(work, "run"))
        if classifier is None:
            x_train, y_train, x_held, y_held = real_split(run)
            with warnings.catch_warnings():  # `probability` is deprecated from scikit-learn 1.9
                warnings.simplefilter("ignore", FutureWarning)
                classifier = SVC(probability=True, random_state=0).fit(x_train, y_train)
            meta["acc"] = float(classifier.score(x_held, y_held))
            held = describe("held-out real digits", x_held, classifier, x_train)
            meta["run"] = run
        for calls in CALLS:
            x = workflows.sample_run(run, args.n, steps=calls, seed=1)
            row = describe(f"meanflow w={w:g}, {calls} call(s)", x.reshape(len(x), -1), classifier, x_train)
            row["share"], row["share_min"] = class_share(run, classifier, calls, args.n)
            row["train_s"] = train_s
            rows.append(row)
            grids[f"w={w:g}, {calls} call(s)"] = x[:64]
            print(row["name"], f"max-p {row['max_p']:.3f} share {row['share']:.3f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    run = meta["run"]
    grids["held-out real digits"] = run.held_out.numpy()[:64]
    plots.plot_image_grid(
        grids, os.path.join(args.out, "flowmap_digits.png"), value_range=workflows.image_range(run)
    )
    text = report(args, run, rows, held, meta["acc"])
    _io.write_bytes(os.path.join(args.out, "flowmap_digits.md"), text.encode())
    print(text)


def report(args: argparse.Namespace, run: Any, rows: list[dict], held: dict, acc: float) -> str:
    c = run.config
    cli = f" --steps {args.steps} --guidance {' '.join(f'{w:g}' for w in args.guidance)} --n {args.n}"
    schedule = ""
    if run.step != c.steps:  # a checkpoint of a longer run (--run)
        cli = f" --run RUN --n {args.n}"
        schedule = f" (the checkpoint at step {run.step} of a {c.steps}-step cosine schedule)"
    lines = [
        "# Digits with a flow-map model (MeanFlow): 1 and 2 model calls",
        "",
        f"`python bench/bench_flowmap_digits.py{cli}` on {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, 1 thread (a shared 2-core machine: training seconds are not a speed figure).",
        "",
        f"Settings: `TrainConfig(data='digits', objective='meanflow')` image defaults (class-conditional "
        f"two-time UNet, label dropout {c.p_uncond}, {c.path} path, batch {c.batch_size}, lr {c.lr}, EMA "
        f"{c.ema_decay}), {run.step} steps{schedule}; `fs.MeanFlow` with its default options and guidance w "
        "trained into the target (one run per w); sampling by K jumps on the uniform grid, labels given, no "
        "guidance at sampling time.",
        "",
        f"Classifier: RBF SVC (`probability=True`) on the training split with labels; held-out accuracy "
        f"{acc:.3f}. 'mean max-prob': samples with classes drawn from the training mix; 'class share': "
        f"{args.n // 10} samples asked for each class k, the share the classifier assigns to k (mean over "
        "the classes; min). Goals (issue 15): 1 call max-prob >= 0.90, class share >= 0.95.",
        "",
        "| model | calls | mean max-prob | share p > 0.9 | class share (min) | predicted classes 0..9 | "
        "NN dist median | train s |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name'].split(',')[0]} | {r['name'].split(', ')[1].split()[0]} | {r['max_p']:.3f} | "
            f"{r['confident']:.3f} | {r['share']:.3f} ({r['share_min']:.2f}) | "
            f"{' '.join(map(str, r['hist']))} | {r['nn_median']:.2f} | {r['train_s']:.0f} |".replace(
                "| nan |", "| - |"
            )
        )
    lines.append(
        f"| held-out real digits | - | {held['max_p']:.3f} | {held['confident']:.3f} | {acc:.3f} | "
        f"{' '.join(map(str, held['hist']))} | {held['nn_median']:.2f} | - |"
    )
    lines += ["", "![samples at 1 and 2 calls, held-out digits](flowmap_digits.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
