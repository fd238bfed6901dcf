"""Digits (scikit-learn 8x8, 1797 images): train with the default image settings, sample, check the samples.

Trains ``TrainConfig(data="digits")`` (the defaults of ``config.IMAGE_DEFAULTS["digits"]``, overridable by
``--steps`` / ``--width`` / ``--batch-size`` / ``--lr``), then draws ``--n`` samples by ODE (rk4, 100 steps)
and by SDE (Euler-Maruyama, 500 steps) and measures, in data units (gray levels 0..16):

* an RBF support-vector classifier (with Platt probabilities) fitted on the run's own training split of the
  real digits (with labels): its mean max-probability on the samples vs on the held-out real digits, the
  share classified with probability > 0.9, and the histogram of predicted classes (a model that drops
  classes shows it here);
* the Euclidean distance of each sample to its nearest training image vs the same for held-out real digits
  (memorising samples would sit much closer to the training set than unseen real digits do).

A baseline row, independent Gaussian pixels with the training digits' per-pixel mean and standard deviation,
shows what the two numbers give for images that are not digits.

Writes ``bench/results/digits.png`` (64 ODE, 64 SDE and 64 held-out digits side by side, same gray scale)
and ``bench/results/digits.md``. Run: ``python bench/bench_digits.py [--steps N] [--threads 1]``.
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

from flowscore import _io, data, plots, workflows
from flowscore.models import builtin_config
from flowscore.samplers import DEFAULT_ODE_STEPS as ODE_STEPS
from flowscore.samplers import DEFAULT_SDE_STEPS as SDE_STEPS
from flowscore.training import TrainConfig, Trainer, load_run

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIDENT = 0.9


def train(overrides: dict[str, Any], run_dir: str) -> tuple[Any, float]:
    config = TrainConfig(data="digits", **overrides)
    start = time.perf_counter()
    Trainer(config, run_dir, progress=False).train()
    return load_run(run_dir), time.perf_counter() - start


def real_split(run: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_held, y_held)`` (flattened, data units): the run's own split, with labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = data.load("digits")
    index = torch.arange(raw.shape[0], dtype=torch.float32)[:, None]
    train_idx, held_idx = (
        i[:, 0].long().numpy() for i in data.split(index, run.held_out.shape[0], run.config.seed)
    )
    assert torch.equal(raw[held_idx], run.held_out), "could not reproduce the run's held-out split"
    x = raw.flatten(1).double().numpy()
    return x[train_idx], bunch.target[train_idx], x[held_idx], bunch.target[held_idx]


def nearest_distance(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance of each row of ``x`` to its nearest row of ``reference``."""
    sq = (x**2).sum(1)[:, None] + (reference**2).sum(1)[None] - 2 * x @ reference.T
    return np.sqrt(np.maximum(sq.min(1), 0))


def gaussian_pixels(x_train: np.ndarray, n: int) -> np.ndarray:
    """``n`` images of independent Gaussian pixels with the per-pixel mean and std of ``x_train``."""
    rng = np.random.default_rng(0)
    return x_train.mean(0) + x_train.std(0) * rng.standard_normal((n, x_train.shape[1]))


def describe(name: str, x: np.ndarray, classifier: Any, x_train: np.ndarray) -> dict[str, Any]:
    proba = classifier.predict_proba(x)
    nn = nearest_distance(x, x_train)
    return {
        "name": name, "n": len(x), "max_p": float(proba.max(1).mean()),
        "confident": float((proba.max(1) > CONFIDENT).mean()),
        "hist": np.bincount(proba.argmax(1), minlength=10).tolist(),
        "nn_median": float(np.median(nn)), "nn_p5": float(np.quantile(nn, 0.05)), "nn_min": float(nn.min()),
        "range": (float(x.min()), float(x.max())),
    }  # fmt: skip


def report(
    args: argparse.Namespace, run: Any, train_s: float, sample_s: float, rows: list[dict], acc: float
) -> str:
    c = run.config
    log = run.log[-1]
    n_params = sum(p.numel() for p in run.model.parameters())
    unet = builtin_config(run.model)  # the UNet inside the preconditioning
    floor = run.loss_floor["value"] if run.loss_floor else None
    floor_text = f"{floor:.4g}" if floor is not None else "not computed"
    lines = [
        "# Digits: samples of a model trained with the default image settings",
        "",
        f"`python bench/bench_digits.py{args.cli}` on {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s) (a shared 2-core machine).",
        "",
        f"Settings (`TrainConfig(data='digits')` defaults{' + overrides' if args.cli else ''}): "
        f"UNet base {unet['base']}, levels {unet['levels']} ({n_params:,} parameters), "
        f"{c.objective}/{c.prediction} on the {c.path} path, {c.steps} steps, batch {c.batch_size}, "
        f"lr {c.lr} (warm-up {c.warmup}, {c.lr_schedule}), EMA {c.ema_decay}, grad clip {c.grad_clip}; "
        f"{run.held_out.shape[0]} held-out digits, the rest trained on.",
        "",
        f"Training: {train_s:.0f} s ({c.steps / train_s:.1f} steps/s). Final loss (mean of the last "
        f"{c.log_every} steps) {log['loss']:.4g}, loss EMA {log['loss_ema']:.4g}; loss floor of the training "
        f"data {floor_text} (the loss of the exact empirical-data velocity, i.e. of a model that memorises "
        "the training set; a model that generalises stays well above it). "
        f"Sampling {args.n} ODE + {args.n} SDE samples: {sample_s:.0f} s.",
        "",
        "Classifier: RBF SVC (scikit-learn defaults, `probability=True`: libsvm's Platt scaling with "
        f"pairwise coupling) on the {c.data} training split with labels; accuracy on "
        f"the held-out digits {acc:.3f}. Nearest-neighbour distances are to the training images, in gray "
        "levels (0..16), over 64 pixels.",
        "",
        f"| set | n | mean max-prob | share p > {CONFIDENT} | predicted classes 0..9 | NN dist median | "
        "NN 5% | NN min | value range |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['n']} | {r['max_p']:.3f} | {r['confident']:.3f} | "
            f"{' '.join(map(str, r['hist']))} "
            f"| {r['nn_median']:.2f} | {r['nn_p5']:.2f} | {r['nn_min']:.2f} | "
            f"[{r['range'][0]:.2f}, {r['range'][1]:.2f}] |"
        )
    lines += ["", "![ODE, SDE and held-out digits](digits.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument(
        "--n", type=int, default=500, help="samples per sampler for the numbers (default 500)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)"
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = {"steps": args.steps, "width": args.width, "batch_size": args.batch_size, "lr": args.lr}
    overrides = {k: v for k, v in flags.items() if v is not None}
    args.cli = "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    from sklearn.svm import SVC

    with tempfile.TemporaryDirectory() as work:
        run, train_s = train(overrides, os.path.join(work, "run"))
    start = time.perf_counter()
    samples = workflows.draw_samples(run, args.n, seed=1)
    sample_s = time.perf_counter() - start
    x_train, y_train, x_held, y_held = real_split(run)
    with warnings.catch_warnings():  # `probability` is deprecated from scikit-learn 1.9 (removal: 1.11)
        warnings.simplefilter("ignore", FutureWarning)
        classifier = SVC(probability=True, random_state=0).fit(x_train, y_train)
    acc = float(classifier.score(x_held, y_held))
    ode, sde = (s.reshape(len(s), -1).astype(np.float64) for s in (samples.ode, samples.sde))
    rows = [
        describe(f"ODE ({samples.ode_sampler}, {ODE_STEPS} steps)", ode, classifier, x_train),
        describe(f"SDE (Euler-Maruyama, {SDE_STEPS} steps)", sde, classifier, x_train),
        describe("held-out real digits", x_held, classifier, x_train),
        describe("baseline: Gaussian pixels", gaussian_pixels(x_train, args.n), classifier, x_train),
    ]
    os.makedirs(args.out, exist_ok=True)
    grids = {
        f"ODE ({samples.ode_sampler})": samples.ode[:64],
        "SDE (Euler-Maruyama)": samples.sde[:64],
        "held-out real digits": run.held_out.numpy()[:64],
    }
    plots.plot_image_grid(grids, os.path.join(args.out, "digits.png"), value_range=workflows.image_range(run))
    text = report(args, run, train_s, sample_s, rows, acc)
    _io.write_bytes(os.path.join(args.out, "digits.md"), text.encode())
    print(text)


if __name__ == "__main__":
    main()
