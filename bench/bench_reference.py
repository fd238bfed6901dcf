"""Reference-batch targets against the exact FM/SM gradient: variance and bias per t-bin, and sample quality.

**Gradients.** The data set is ``--n-data`` points of a 2D toy; its exact marginal (``EmpiricalMarginal``)
gives the exact FM/SM target. A small MLP is first trained briefly (``--warm-steps``; CFM for the velocity
model, DSM with the noise weighting for the score model), then frozen. For each objective (cfm against the
exact fm; dsm against the exact sm), each t-bin and each estimator (plain CFM/DSM, reference targets with
R points drawn WITHOUT replacement from the data anew for every batch, and the exact target), K minibatches
of B draws (x_data uniform from the data, t uniform in the bin, noise N(0, I)) are shared by every estimator
(common random numbers). ``g_k`` is the gradient of the minibatch loss with respect to the parameters.

* variance: ``mean_k ||g_k - mean_k g_k||^2`` (the trace of the covariance), and its ratio plain / estimator;
* bias: ``||mean_k (g_k - g_exact_k)||`` against the standard error ``sqrt(tr Cov(g_k - g_exact_k) / K)``
  and the exact gradient's norm ``||mean_k g_exact_k||``.

Goal: with R = 1024, variance ratio >= 3 where each conditional target is noisiest (velocity: t in
[0, 0.5]; score: t in [0.5, 1]) and bias <= 3 SE + 2% of the norm. The exact target's ratio is the ceiling:
what is left comes from drawing x and t.

**Quality.** Train the same MLP with plain CFM and with each reference size, for ``--steps`` steps (equal
steps) and for ``--budget-s`` seconds each (equal wall time; meaningful only on an otherwise idle machine),
sample with rk4 (``--sample-steps``) and report W2 to fresh draws of the toy over the W2 floor (the mean W2
between pairs of fresh draws, as in bench_quality.py).

Writes ``bench/results/reference.md``. Run: ``python bench/bench_reference.py`` (``--quick`` for a small run).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from flowscore import _io, data, get_path, validation
from flowscore.losses import cfm, dsm, fm, sm
from flowscore.marginals import EmpiricalMarginal
from flowscore.metrics import w2
from flowscore.models import MLP
from flowscore.samplers import sample

HERE = os.path.dirname(os.path.abspath(__file__))
GOAL_RATIO, GOAL_SE, GOAL_REL = 3.0, 3.0, 0.02
GOAL_R = 1024
HALVES = {"velocity": (0.0, 0.5), "score": (0.5, 1.0)}


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def warm_model(points: torch.Tensor, kind: str, steps: int, seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP(2, width=128, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    with validation(False):
        for _ in range(steps):
            x_data = points[torch.randint(points.shape[0], (256,), generator=gen)]
            if kind == "velocity":
                loss = cfm(model, x_data, "linear", generator=gen)
            else:
                loss = dsm(model, x_data, "linear", weighting="noise", generator=gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def gradient_stats(
    model: MLP,
    points: torch.Tensor,
    kind: str,
    bin_: tuple[float, float],
    refs: list[int],
    k: int,
    b: int,
    seed: int,
    weighting: str | None = None,
) -> dict[str, dict[str, float]]:
    """Variance and bias of each estimator's minibatch gradient for t uniform in ``bin_``."""
    path = get_path("linear")
    marginal = EmpiricalMarginal(points, path)
    params = [p for p in model.parameters()]
    conditional, exact = (cfm, fm) if kind == "velocity" else (dsm, sm)
    gen = torch.Generator().manual_seed(seed)
    names = ["plain", *[f"R={r}" for r in refs], "exact"]
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    lo, hi = bin_
    with validation(False):
        for _ in range(k):
            x_data = points[torch.randint(points.shape[0], (b,), generator=gen)]
            t = (lo + (hi - lo) * torch.rand(b, generator=gen)).clamp(1e-3, 1 - 1e-3)
            noise = torch.randn(x_data.shape, generator=gen)
            loss = conditional(model, x_data, path, t, noise, weighting=weighting)
            grads["plain"].append(flat_grad(loss, params))
            for r in refs:
                reference = points[torch.randperm(points.shape[0], generator=gen)[:r]]
                loss = conditional(model, x_data, path, t, noise, weighting=weighting, reference=reference)
                grads[f"R={r}"].append(flat_grad(loss, params))
            loss = exact(model, x_data, marginal, t, noise, weighting=weighting)
            grads["exact"].append(flat_grad(loss, params))
    exact_g = torch.stack(grads["exact"]).double()
    norm = float(exact_g.mean(0).norm())
    plain_var = float(torch.stack(grads["plain"]).double().var(0).sum())
    out = {}
    for name in names:
        g = torch.stack(grads[name]).double()
        var = float(g.var(0).sum())
        diff = g - exact_g
        out[name] = {
            "var": var,
            "ratio": plain_var / var if var > 0 else float("inf"),
            "bias": float(diff.mean(0).norm()),
            "se": float((diff.var(0).sum() / k).sqrt()),
            "norm": norm,
        }
    return out


def train(
    points: torch.Tensor, reference_size: int | None, steps: int | None, budget_s: float | None, seed: int
) -> tuple[MLP, int, float]:
    """Plain CFM (``reference_size`` None) or reference targets; stops after ``steps`` or ``budget_s``."""
    torch.manual_seed(seed)
    model = MLP(2, width=128, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    path = get_path("linear")
    step, start = 0, time.perf_counter()
    with validation(False):
        while (steps is None or step < steps) and (
            budget_s is None or time.perf_counter() - start < budget_s
        ):
            x_data = points[torch.randint(points.shape[0], (256,), generator=gen)]
            reference = None
            if reference_size:
                reference = points[torch.randperm(points.shape[0], generator=gen)[:reference_size]]
            loss = cfm(model, x_data, path, generator=gen, reference=reference)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return model, step, time.perf_counter() - start


def quality(model: MLP, name: str, n: int, sample_steps: int, floors: tuple[float, list]) -> float:
    floor, refs = floors
    with torch.no_grad():
        x = sample(
            model, "linear", n, sampler="rk4", steps=sample_steps, generator=torch.Generator().manual_seed(1)
        )
    return float(np.mean([w2(x, a) for a in refs])) / floor


def fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="moons")
    parser.add_argument("--n-data", type=int, default=8192)
    parser.add_argument("--refs", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--bins", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    parser.add_argument("--k", type=int, default=200, help="minibatches per bin and estimator")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warm-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3000, help="training steps of the equal-steps runs")
    parser.add_argument("--budget-s", type=float, default=0.0, help="seconds per equal-time run (0: skip)")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--n", type=int, default=2000, help="samples for W2")
    parser.add_argument("--pairs", type=int, default=3, help="fresh pairs for the W2 floor")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a small run to check that the bench works")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "reference.md"))
    args = parser.parse_args()
    if args.quick:
        args.n_data, args.refs, args.k, args.warm_steps, args.steps = 1024, [64, 256], 10, 50, 50
        args.n, args.pairs, args.sample_steps = 300, 1, 10
    points = data.toy(args.data, args.n_data, seed=0)
    edges = args.bins
    bins = [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    lines = [
        "# Reference-batch targets against the exact FM/SM gradient",
        "",
        f"`python bench/bench_reference.py` ({'--quick, ' if args.quick else ''}data {args.data}, "
        f"N = {args.n_data}, B = {args.batch}, K = {args.k} minibatches per bin, MLP 128x3 warmed "
        f"{args.warm_steps} steps, linear path) on {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. ratio = variance of the plain minibatch "
        "gradient / the estimator's; bias = ||mean (g - g_exact)|| with its standard error (SE) and the "
        "exact gradient's norm. 'exact' is the FM/SM target itself (the ceiling).",
        "",
    ]
    summary = []
    models = {kind: warm_model(points, kind, args.warm_steps, seed=0) for kind in ("velocity", "score")}
    for kind, weighting in (("velocity", None), ("score", None), ("score", "noise")):
        model = models[kind]
        objective = "cfm vs fm" if kind == "velocity" else "dsm vs sm"
        objective += f", weighting={weighting!r}" if weighting else ""
        lines += [
            f"## {kind}: {objective}",
            "",
            "| t bin | estimator | grad variance | ratio | bias | SE | norm | bias ok |",
        ]
        lines.append("|---|---|---|---|---|---|---|---|")
        for i, bin_ in enumerate([*bins, HALVES[kind]]):
            t0 = time.perf_counter()
            stats = gradient_stats(
                model, points, kind, bin_, args.refs, args.k, args.batch, seed=100 + i, weighting=weighting
            )
            for name, s in stats.items():
                ok = s["bias"] <= GOAL_SE * s["se"] + GOAL_REL * s["norm"]
                label = f"**[{bin_[0]}, {bin_[1]}]**" if bin_ == HALVES[kind] else f"[{bin_[0]}, {bin_[1]}]"
                lines.append(
                    f"| {label} | {name} | {fmt(s['var'])} | {s['ratio']:.2f} | {fmt(s['bias'])} | "
                    f"{fmt(s['se'])} | {fmt(s['norm'])} | {'yes' if ok else '**no**'} |"
                )
                if bin_ == HALVES[kind] and name == f"R={GOAL_R}":
                    summary.append((objective, bin_, s["ratio"], ok, stats["exact"]["ratio"]))
            print(f"{objective} bin {bin_}: {time.perf_counter() - t0:.0f}s", flush=True)
        lines.append("")
    lines += [
        "## Goal",
        "",
        f"R = {GOAL_R}: variance ratio >= {GOAL_RATIO} on the noisiest half, bias <= "
        f"{GOAL_SE:g} SE + {GOAL_REL:.0%} of the norm.",
        "",
    ]
    for kind, bin_, ratio, ok, ceiling in summary:
        met = ratio >= GOAL_RATIO and ok
        lines.append(
            f"- {kind}, t in [{bin_[0]}, {bin_[1]}]: ratio {ratio:.2f} (exact target: {ceiling:.2f}), bias "
            f"{'within' if ok else '**outside**'} bounds: goal {'met' if met else '**not met**'}"
        )
    lines.append("")
    if not args.skip_quality:
        fresh = [data.toy(args.data, args.n, seed=10_001 + 2 * k) for k in range(args.pairs)]
        other = [data.toy(args.data, args.n, seed=10_002 + 2 * k) for k in range(args.pairs)]
        floor = float(np.mean([w2(b_, a) for a, b_ in zip(fresh, other, strict=True)]))
        lines += [
            "## Sample quality (cfm, linear path, rk4 sampling)",
            "",
            f"W2 of {args.n} samples ({args.sample_steps} rk4 steps) to fresh draws of the toy, over the W2 "
            f"floor {floor:.4f} (mean over {args.pairs} pairs of fresh draws). Equal steps: {args.steps} "
            "steps of batch 256. "
            + (
                f"Equal time: {args.budget_s:g} s each (steps reached in brackets); timings are only "
                "meaningful on an otherwise idle machine."
                if args.budget_s > 0
                else "Equal time and seconds per step: not measured (run with --budget-s on an idle machine)."
            ),
            "",
            "| estimator | W2 / floor, equal steps | s per step | W2 / floor, equal time [steps] |",
            "|---|---|---|---|",
        ]
        for r in [None, *args.refs]:
            model, steps, seconds = train(points, r, args.steps, None, seed=1)
            ratio = quality(model, args.data, args.n, args.sample_steps, (floor, fresh))
            timed, per_step = "-", "-"
            if args.budget_s > 0:
                per_step = f"{seconds / steps:.4f}"
                tmodel, tsteps, _ = train(points, r, None, args.budget_s, seed=1)
                timed = (
                    f"{quality(tmodel, args.data, args.n, args.sample_steps, (floor, fresh)):.3f} [{tsteps}]"
                )
            lines.append(f"| {'plain' if r is None else f'R={r}'} | {ratio:.3f} | {per_step} | {timed} |")
            print(f"quality R={r}: {ratio:.3f}", flush=True)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    _io.save_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
