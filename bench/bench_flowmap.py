"""Flow-map objectives (MeanFlow, Semigroup) on 2D toys: W2 / floor at 1, 2, 4 model calls, next to a
same-budget cfm velocity model sampled by the best few-step solver at the same calls and at 50 calls, and
the trained map's error against the exact flow map over the (t, s) triangle.

Training: a short loop of the trainer's recipe (AdamW, linear warm-up + cosine, grad clip 1, EMA 0.999 with
the trainer's ramp; data scaled to per-feature std 0.5; batch 512; the built-in MLP, two-time for the flow
maps; preconditioned), ``--steps`` updates for every model (the cfm model through ``fs.Trainer`` with the
same steps). W2 / floor as bench_quality.py: mean over 3 pairs of fresh draws of W2(samples, A_k) over the
mean of W2(B_k, A_k), 2000 points.

Map error: on moons, start points x_t drawn from the path's marginal at t, for (t, s) on a grid of the
triangle t < s, the RMS of X_model(x, t, s) - X_exact(x, t, s) (EmpiricalMarginal.flow_map of the training
set, float64) relative to the RMS of the exact displacement; written as a table and a plot.

Run: ``OMP_NUM_THREADS=1 python bench/bench_flowmap.py [--steps 4000] [--toys moons ...]``. Writes
bench/results/flowmap.md (and flowmap_triangle.png).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import flowscore as fs
from flowscore import data
from flowscore.metrics import w2
from flowscore.models import build_model
from flowscore.training import ema_decay_at, ema_update

RESULTS = Path(__file__).parent / "results"
TOYS = ("moons", "8gaussians", "checkerboard")
CALLS = (1, 2, 4)
N = 2000
PAIRS = 3


def train_flow_map(
    objective: fs.flowmaps._FlowMapObjective,
    x_data: torch.Tensor,
    steps: int,
    batch: int = 512,
    lr: float = 2e-3,
    warmup: int = 500,
    seed: int = 0,
) -> torch.nn.Module:
    """The EMA model after ``steps`` updates of ``objective`` on ``x_data`` (already scaled)."""
    torch.manual_seed(seed)
    net = build_model("mlp", x_data.shape[1:], two_time=True)
    model = objective.wrap(net)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rate = (
            lr * (step + 1) / warmup
            if step < warmup
            else (lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1))))
        )
        for group in opt.param_groups:
            group["lr"] = rate
        idx = torch.randint(0, x_data.shape[0], (batch,), generator=gen)
        loss = objective.loss(model, x_data[idx], generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, ema_decay_at(0.999, step))
    return ema


def scaled(toy: str, n: int = data.DEFAULT_TOY_N, seed: int = 0) -> tuple[torch.Tensor, data.Normalizer]:
    x = data.toy(toy, n, seed)
    norm = data.Normalizer.fit(x, std=0.5)
    return norm.encode(x), norm


def ratios(sample, toy: str, norm) -> dict[int, float]:
    fresh = [
        (data.toy(toy, N, seed=30_001 + 2 * k), data.toy(toy, N, seed=30_002 + 2 * k)) for k in range(PAIRS)
    ]
    floor = float(np.mean([w2(b, a) for a, b in fresh]))
    out = {}
    for calls in (*CALLS, 50):
        x = sample(calls)
        if x is None:
            continue
        x = norm.decode(x.float()).detach()
        out[calls] = float(np.mean([w2(x, a) for a, _ in fresh])) / floor
    return out


def cfm_model(toy: str, steps: int, work: str):
    config = fs.TrainConfig(data=toy, steps=steps, labels=False)
    fs.Trainer(config, os.path.join(work, toy), progress=False).train()
    return fs.load_run(os.path.join(work, toy))


def best_solver(run, calls: int, sampler: str):
    """Samples of the cfm run with ``sampler`` at ``calls`` model calls (None where it cannot)."""
    if sampler == "euler":
        steps = calls
    elif sampler in ("dpm++2m", "unipc"):
        steps = calls
    else:
        return None
    gen = torch.Generator().manual_seed(3)
    result = fs.sample(
        run.model,
        run.path,
        N,
        prediction=run.prediction,
        sampler=sampler,
        steps=steps,
        generator=gen,
        return_info=True,
    )
    return result.x if result.nfe == calls else None


def map_error(model, toy: str, x_data: torch.Tensor, grid: int = 6) -> np.ndarray:
    """``(grid, grid)`` relative RMS error of the trained map against the exact map (NaN below the
    diagonal)."""
    path = fs.get_path("linear")
    sub = x_data[torch.randperm(x_data.shape[0], generator=torch.Generator().manual_seed(5))[:4000]].double()
    exact = fs.EmpiricalMarginal(sub, path, dtype=torch.float64)
    ts = np.linspace(0.0, 1.0, grid + 1)
    out = np.full((grid, grid), np.nan)
    gen = torch.Generator().manual_seed(7)
    for i in range(grid):
        for j in range(i + 1, grid + 1):
            t, s = float(ts[i]), float(ts[j])
            xd = sub[torch.randint(0, sub.shape[0], (200,), generator=gen)]
            x = path.sample(
                xd,
                torch.full((200,), t, dtype=torch.float64),
                torch.randn(xd.shape, generator=gen, dtype=torch.float64),
            )
            target = exact.flow_map(x, t, s, rtol=1e-6, atol=1e-6)
            got = fs.flow_map(model, path, x.float(), t, s).double()
            out[i, j - 1] = float((got - target).pow(2).mean().sqrt() / (target - x).pow(2).mean().sqrt())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--toys", nargs="+", default=list(TOYS))
    parser.add_argument("--objectives", nargs="*", default=["meanflow", "semigroup"])
    parser.add_argument("--no-cfm", action="store_true")
    parser.add_argument("--triangle", action="store_true")
    parser.add_argument("--out", default="flowmap.md", help="file name under bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, triangle = [], {}
    with tempfile.TemporaryDirectory() as work:
        for toy in args.toys:
            x_data, norm = scaled(toy)
            for name in args.objectives:
                objective = fs.flowmaps.FLOW_MAP_OBJECTIVES[name]("linear")
                start = time.perf_counter()
                model = train_flow_map(objective, x_data, args.steps)
                train_s = time.perf_counter() - start

                def sample(calls: int, model=model):
                    if calls == 50:
                        return None
                    return fs.sample(
                        model, "linear", N, steps=calls, generator=torch.Generator().manual_seed(3)
                    )

                r = ratios(sample, toy, norm)
                rows.append((toy, name, r, train_s))
                print(toy, name, {k: round(v, 3) for k, v in r.items()}, f"{train_s:.0f}s", flush=True)
                if args.triangle and toy == "moons" and name == args.objectives[0]:
                    triangle[name] = map_error(model, toy, x_data)
            if not args.no_cfm:
                start = time.perf_counter()
                run = cfm_model(toy, args.steps, work)
                train_s = time.perf_counter() - start
                for sampler in ("dpm++2m", "unipc", "euler"):
                    r = ratios(
                        lambda calls, s=sampler, run=run: (
                            best_solver(run, calls, s) if calls != 50 else best_solver(run, 50, "unipc")
                        ),
                        toy,
                        run.normalizer,
                    )
                    rows.append((toy, f"cfm + {sampler}", r, train_s))
                    print(toy, "cfm", sampler, {k: round(v, 3) for k, v in r.items()}, flush=True)
    write(rows, triangle, args)


def write(rows, triangle, args) -> None:
    lines = [
        "# Flow-map objectives on 2D toys (`bench/bench_flowmap.py`)",
        "",
        f"{args.steps} training steps for every model (batch 512, lr 2e-3, EMA 0.999; built-in MLP, "
        "preconditioned; linear path; flow maps with their default options). W2(2000 samples, fresh data) / "
        f"W2 floor (mean over {PAIRS} pairs of fresh draws). Flow maps: K jumps on the uniform grid; "
        "cfm: the "
        "same-steps velocity model by fs.Trainer sampled with the solver named, at K model calls "
        "(50 calls: unipc). Training seconds on a shared 2-core machine: not a speed measurement.",
        "",
        "| toy | model | 1 call | 2 calls | 4 calls | 50 calls | train s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for toy, name, r, train_s in rows:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in (*CALLS, 50)]
        lines.append(f"| {toy} | {name} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    for name, err in triangle.items():
        lines += [
            "",
            f"Map error of {name} on moons: RMS(X_model - X_exact) / RMS(X_exact - x) over (t, s), "
            "t rows, s columns (grid 1/6):",
            "",
            "| t \\ s | " + " | ".join(f"{(j + 1) / 6:.2f}" for j in range(err.shape[1])) + " |",
            "|---|" + "---:|" * err.shape[1],
        ]
        for i in range(err.shape[0]):
            lines.append(
                f"| {i / 6:.2f} | " + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in err[i]) + " |"
            )
        _plot(name, err)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text("\n".join(lines) + "\n")


def _plot(name: str, err: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    n = err.shape[0]
    im = ax.imshow(err, origin="upper", extent=(1 / n, 1 + 1 / n, n / n, 0), cmap="viridis")
    ax.set_xlabel("s (end time)")
    ax.set_ylabel("t (start time)")
    ax.set_title(f"{name}: relative error of X(x, t, s)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(RESULTS / "flowmap_triangle.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
