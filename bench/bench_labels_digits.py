"""Digits with labels: does a class-conditional model draw the digit it is asked for? With guidance?

Trains ``TrainConfig(data="digits")`` (the default image settings; the digits' labels make it a
class-conditional UNet trained with label dropout ``p_uncond``), then for every class k = 0..9 and guidance
w in ``--guidance`` (default 0, 1, 3) draws ``--n`` ODE samples (rk4, 100 steps) of class k and measures,
in data units (gray levels 0..16):

* the share of them that an RBF support-vector classifier, fitted on the run's own training split of the
  real digits, assigns to class k (and its mean max-probability);
* how far they are from real digits of their class: the median Euclidean distance of each sample to its
  nearest held-out real digit of class k, next to the same for the training digits of class k (real digits
  that the held-out set has never seen) as the reference; and the median distance to the nearest training
  image (memorising samples would sit much closer to the training set than real held-out digits do).

Writes ``bench/results/labels_digits.png`` (one row per class, eight samples per guidance weight) and
``bench/results/labels_digits.md``. Run: ``python bench/bench_labels_digits.py [--steps N] [--n 50]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch
from bench_digits import nearest_distance, real_split

from flowscore import _io, plots, workflows
from flowscore.conditioning import guided_model
from flowscore.models import builtin_config
from flowscore.samplers import DEFAULT_ODE_SAMPLER as ODE_SAMPLER
from flowscore.samplers import DEFAULT_ODE_STEPS as ODE_STEPS
from flowscore.samplers import sample
from flowscore.training import TrainConfig, Trainer, load_run

HERE = os.path.dirname(os.path.abspath(__file__))
GRID_COLUMNS = 8


def measure(run: Any, classifier: Any, split: tuple, n: int, weights: list[float]) -> tuple[list, dict]:
    """One row per (class, guidance) and the grid images per guidance. For each guidance weight, all ten
    classes are drawn in one batch: labels ``[0] * n + [1] * n + ...`` through ``guided_model``."""
    x_train, y_train, x_held, y_held = split
    rows, grids = [], {}
    labels = torch.arange(10).repeat_interleave(n)
    for i, w in enumerate(weights):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            z = sample(guided_model(run.model, labels, w), run.path, len(labels), prediction=run.prediction,
                       shape=tuple(run.data_shape), generator=generator)  # fmt: skip
        x = run.normalizer.decode(z).numpy().astype(np.float64)
        grids[w] = np.concatenate([x[k * n : k * n + GRID_COLUMNS] for k in range(10)])
        for k in range(10):
            flat = x[k * n : (k + 1) * n].reshape(n, -1)
            proba = classifier.predict_proba(flat)
            held_k = x_held[y_held == k]
            rows.append({
                "label": k, "w": w, "share": float((proba.argmax(1) == k).mean()),
                "max_p": float(proba.max(1).mean()),
                "to_held": float(np.median(nearest_distance(flat, held_k))),
                "real_to_held": float(np.median(nearest_distance(x_train[y_train == k], held_k))),
                "to_train": float(np.median(nearest_distance(flat, x_train))),
            })  # fmt: skip
    return rows, grids


def report(
    args: argparse.Namespace, run: Any, train_s: float, sample_s: float, rows: list, acc: float
) -> str:
    c = run.config
    n_params = sum(p.numel() for p in run.model.parameters())
    unet = builtin_config(run.model)  # the UNet inside the preconditioning
    weights = sorted({r["w"] for r in rows})
    lines = [
        "# Digits with labels: class-conditional samples and classifier-free guidance",
        "",
        f"`python bench/bench_labels_digits.py{args.cli}` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (a shared 2-core machine).",
        "",
        f"Settings (`TrainConfig(data='digits')` defaults{' + overrides' if args.cli else ''}): class-"
        f"conditional UNet base {unet['base']}, levels {unet['levels']}, {run.num_classes} classes "
        f"({n_params:,} parameters), label dropout p_uncond = {c.p_uncond}, {c.objective}/{c.prediction} "
        f"on the {c.path} path, {c.steps} steps, batch {c.batch_size}, lr {c.lr}; "
        f"{run.held_out.shape[0]} held-out digits. Training {train_s:.0f} s; sampling {sample_s:.0f} s "
        f"(wall clock, load average {os.getloadavg()[0]:.1f} at the end: not a speed figure) "
        f"({args.n} samples per class and guidance weight, ODE {ODE_SAMPLER} {ODE_STEPS} steps; guidance w: "
        "(1 + w) f(x, t, y) - w f(x, t, -1)).",
        "",
        f"Classifier: RBF SVC (`probability=True`) on the training split with labels; accuracy on the "
        f"held-out digits {acc:.3f}. Distances in gray levels (0..16) over 64 pixels: median over the "
        "samples of the distance to the nearest held-out real digit of the requested class ('to held-out "
        "k'), the same for the class's real training digits ('real to held-out k', the reference), and to "
        "the nearest training image of any class ('to train').",
        "",
        "## Summary over the 10 classes",
        "",
        "| guidance w | share assigned to the requested class | mean max-prob | to held-out k "
        "| real to held-out k | to train |",
        "|---|---|---|---|---|---|",
    ]
    for w in weights:
        sel = [r for r in rows if r["w"] == w]
        lines.append(
            f"| {w:g} | {np.mean([r['share'] for r in sel]):.3f} (min {min(r['share'] for r in sel):.2f}) | "
            f"{np.mean([r['max_p'] for r in sel]):.3f} | {np.mean([r['to_held'] for r in sel]):.2f} | "
            f"{np.mean([r['real_to_held'] for r in sel]):.2f} | {np.mean([r['to_train'] for r in sel]):.2f} |"
        )
    lines += ["", "## Per class", "", "| class | " + " | ".join(f"share w={w:g}" for w in weights)
              + " | " + " | ".join(f"to held-out w={w:g}" for w in weights) + " | real to held-out |",
              "|---" * (2 + 2 * len(weights)) + "|"]  # fmt: skip
    for k in range(10):
        sel = {r["w"]: r for r in rows if r["label"] == k}
        shares = " | ".join(f"{sel[w]['share']:.2f}" for w in weights)
        dists = " | ".join(f"{sel[w]['to_held']:.2f}" for w in weights)
        lines.append(f"| {k} | {shares} | {dists} | {sel[weights[0]]['real_to_held']:.2f} |")
    lines += [
        "",
        f"![rows: classes 0..9; {GRID_COLUMNS} samples per guidance weight](labels_digits.png)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--p-uncond", type=float)
    parser.add_argument(
        "--n", type=int, default=50, help="samples per class and guidance weight (default 50)"
    )
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in {"steps": args.steps, "p_uncond": args.p_uncond}.items() if v is not None}
    args.cli = "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    from sklearn.svm import SVC

    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        Trainer(TrainConfig(data="digits", **overrides), os.path.join(work, "run"), progress=False).train()
        train_s = time.perf_counter() - start
        run = load_run(os.path.join(work, "run"))
    split = real_split(run)
    x_train, y_train, x_held, y_held = split
    with warnings.catch_warnings():  # `probability` is deprecated from scikit-learn 1.9 (removal: 1.11)
        warnings.simplefilter("ignore", FutureWarning)
        classifier = SVC(probability=True, random_state=0).fit(x_train, y_train)
    acc = float(classifier.score(x_held, y_held))
    start = time.perf_counter()
    rows, grids = measure(run, classifier, split, args.n, args.guidance)
    sample_s = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    figure = {f"guidance w = {w:g}": images for w, images in grids.items()}
    plots.plot_image_grid(
        figure, os.path.join(args.out, "labels_digits.png"), ncols=GRID_COLUMNS,
        value_range=workflows.image_range(run),
    )  # fmt: skip
    text = report(args, run, train_s, sample_s, rows, acc)
    _io.write_bytes(os.path.join(args.out, "labels_digits.md"), text.encode())
    print(text)


if __name__ == "__main__":
    main()
