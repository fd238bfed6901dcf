"""Flow-map objectives (MeanFlow, Semigroup) on 2D toys: W2 / floor at 1, 2, 4 model calls, next to a
same-budget cfm velocity model sampled by the best few-step solver at the same calls and at 50 calls, and
the trained map's error against the exact flow map over the (t, s) triangle.

Training: ``fs.Trainer`` with the defaults of ``flowscore train --data TOY --objective M`` (``--steps``
overrides the trainer's default budget), for the flow maps and the cfm model alike. W2 / floor as
bench_quality.py: mean over 3 pairs of fresh draws of W2(samples, A_k) over the mean of W2(B_k, A_k), 2000
points. A flow map's 50-call column is its instantaneous velocity ``u(x, t, t)`` sampled by unipc (is the
velocity itself good?). ``--step-ratio``: ms per training step of cfm, meanflow and semigroup in one process,
interleaved.

Map error: on moons, start points x_t drawn from the path's marginal at t, for (t, s) on a grid of the
triangle t < s, the RMS of X_model(x, t, s) - X_exact(x, t, s) (EmpiricalMarginal.flow_map of the training
set, float64) relative to the RMS of the exact displacement; written as a table and a plot.

Run: ``OMP_NUM_THREADS=1 python bench/bench_flowmap.py [--steps N] [--toys moons ...]``. Appends its rows to
bench/results/flowmap.jsonl (toys may run as separate processes) and writes bench/results/flowmap.md from all
rows there (and flowmap_triangle.png).
"""

from __future__ import annotations

import argparse
import json
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

RESULTS = Path(__file__).parent / "results"
TOYS = ("moons", "8gaussians", "checkerboard")
CALLS = (1, 2, 4)
N = 2000
PAIRS = 3


def train_run(toy: str, objective: str, steps: int | None, work: str, seed: int = 0):
    """A run of ``flowscore train --data toy --objective objective --seed seed`` with every other default
    (``steps`` None: the default budget), loaded back; and its wall seconds."""
    config = fs.TrainConfig(data=toy, objective=objective, steps=steps, labels=False, seed=seed)
    start = time.perf_counter()
    folder = os.path.join(work, f"{toy}-{objective}-{seed}")
    fs.Trainer(config, folder, progress=False).train()
    return fs.load_run(folder), time.perf_counter() - start


def step_ratio(rounds: int = 5, steps: int = 20) -> dict[str, float]:
    """ms per training step (median over interleaved rounds, one process, one thread) of cfm and the flow-map
    objectives with the trainer's defaults on moons (their reference points included): the built-in MLP,
    batch 512; forward, loss, backward and the AdamW update."""
    from flowscore.objectives import objective_from_config

    x_data, _ = scaled("moons")
    setups = {}
    for name in ("cfm", "meanflow", "semigroup", "lagrangian"):
        config = fs.TrainConfig(data="moons", objective=name)
        objective = objective_from_config(config, fs.get_path("linear"))
        objective.bind(x_data)  # the pool of reference points, where the defaults use one (semigroup)
        torch.manual_seed(0)
        net = build_model("mlp", (2,), two_time=objective.two_time or None)
        setups[name] = (objective, objective.wrap(net), torch.optim.AdamW(net.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in setups}
    gen = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        for name, (objective, model, opt) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                idx = torch.randint(0, x_data.shape[0], (512,), generator=gen)
                loss = objective.loss(model, x_data[idx], generator=gen).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times[name].append(1000 * (time.perf_counter() - start) / steps)
    return {name: float(np.median(v)) for name, v in times.items()}


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


def best_solver(run, calls: int, sampler: str):
    """Samples of the cfm run with ``sampler`` at ``calls`` model calls (None where it cannot)."""
    if sampler not in ("euler", "dpm++2m", "unipc"):
        return None
    gen = torch.Generator().manual_seed(3)
    result = fs.sample(
        run.model, run.path, N, prediction=run.prediction, sampler=sampler, steps=calls, generator=gen,
        return_info=True,
    )  # fmt: skip
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
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the trainer's)")
    parser.add_argument("--toys", nargs="+", default=list(TOYS))
    parser.add_argument("--objectives", nargs="*", default=["meanflow", "semigroup", "lagrangian"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (default 0)")
    parser.add_argument("--no-cfm", action="store_true")
    parser.add_argument("--triangle", action="store_true")
    parser.add_argument("--step-ratio", action="store_true", help="only time a step of each objective")
    parser.add_argument("--rows", default="flowmap.jsonl", help="rows file under bench/results (appended)")
    parser.add_argument("--out", default="flowmap.md", help="file name under bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows_file = RESULTS / args.rows
    if args.step_ratio:
        ms = step_ratio()
        print({k: round(v, 2) for k, v in ms.items()}, {k: round(v / ms["cfm"], 2) for k, v in ms.items()})
        _append(rows_file, {"kind": "step", "ms": ms, "load": os.getloadavg()[0]})
    with tempfile.TemporaryDirectory() as work:
        for toy, seed in [(t, k) for t in args.toys for k in args.seeds] if not args.step_ratio else ():
            for name in args.objectives:
                run, train_s = train_run(toy, name, args.steps, work, seed)

                def sample(calls: int, model=run.model):
                    if calls == 50:  # its instantaneous velocity u(x, t, t), 50 unipc steps
                        return fs.sample(
                            _Instantaneous(model), "linear", N, sampler="unipc", steps=50,
                            generator=torch.Generator().manual_seed(3),
                        )  # fmt: skip
                    return fs.sample(
                        model, "linear", N, steps=calls, generator=torch.Generator().manual_seed(3)
                    )

                r = ratios(sample, toy, run.normalizer)
                row = {"kind": "w2", "toy": toy, "model": name, "ratios": r, "steps": run.config.steps,
                       "seed": seed, "train_s": train_s, "load": os.getloadavg()[0]}  # fmt: skip
                if args.triangle and toy == "moons":
                    x_data = run.normalizer.encode(data.toy(toy, data.DEFAULT_TOY_N, 0))
                    row["triangle"] = map_error(run.model, toy, x_data).tolist()
                _append(rows_file, row)
                print(toy, name, seed, {k: round(v, 3) for k, v in r.items()}, f"{train_s:.0f}s", flush=True)
            if not args.no_cfm:
                run, train_s = train_run(toy, "cfm", args.steps, work, seed)
                for sampler in ("dpm++2m", "unipc", "euler"):
                    r = ratios(
                        lambda calls, s=sampler, run=run: (
                            best_solver(run, calls, s) if calls != 50 else best_solver(run, 50, "unipc")
                        ),
                        toy,
                        run.normalizer,
                    )
                    row = {"kind": "w2", "toy": toy, "model": f"cfm + {sampler}", "ratios": r,
                           "steps": run.config.steps, "seed": seed, "train_s": train_s,
                           "load": os.getloadavg()[0]}  # fmt: skip
                    _append(rows_file, row)
                    print(toy, "cfm", sampler, seed, {k: round(v, 3) for k, v in r.items()}, flush=True)
    write(rows_file, RESULTS / args.out)


class _Instantaneous(torch.nn.Module):
    """``v(x, t) = u(x, t, t)``: the instantaneous velocity of a two-time model (its s = t pairs)."""

    prediction = "velocity"

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, t)


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def write(rows_file: Path, out: Path) -> None:
    """``out`` (markdown) from every row of ``rows_file``; of rows with the same toy, model, steps and seed
    the last one counts. The main table shows seed 0; where more seeds ran, a second table gives their mean
    and range."""
    rows: dict[tuple, dict] = {}
    seeded: dict[tuple, dict[int, dict]] = {}
    steps_rows = []
    for line in rows_file.read_text().splitlines() if rows_file.exists() else []:
        row = json.loads(line)
        if row["kind"] == "step":
            steps_rows.append(row)
            continue
        key = (row["toy"], row["model"], row["steps"])
        seeded.setdefault(key, {})[row.get("seed", 0)] = row
        if row.get("seed", 0) == 0:
            rows[key] = row
    lines = [
        "# Flow-map objectives on 2D toys (`bench/bench_flowmap.py`)",
        "",
        "Every model trained by `fs.Trainer` with the defaults of `flowscore train --data TOY --objective M` "
        "(the trainer's steps, batch, lr, EMA; built-in MLP, preconditioned; linear path; the flow maps with "
        f"their default options). W2({N} samples, fresh data) / W2 floor (mean over {PAIRS} pairs of fresh "
        "draws). Flow maps: K jumps on the uniform grid (K model calls); their 50-call column is the "
        "instantaneous velocity u(x, t, t) sampled by unipc. cfm: the same-steps velocity model sampled with "
        "the solver named at K model calls (50 calls: unipc). Training seconds and load: on a shared 2-core "
        "machine (load average at the end of the run), not a speed measurement.",
        "",
        "| toy | model | steps | 1 call | 2 calls | 4 calls | 50 calls | train s | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {toy: i for i, toy in enumerate(data.TOYS)}
    rows = dict(sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][0], kv[0][2], kv[0][1])))
    for (toy, name, steps), row in rows.items():
        r = {int(k): v for k, v in row["ratios"].items()}
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in (*CALLS, 50)]
        lines.append(f"| {toy} | {name} | {steps} | " + " | ".join(cells)
                     + f" | {row['train_s']:.0f} | {row['load']:.1f} |")  # fmt: skip
    several = {key: runs for key, runs in seeded.items() if len(runs) > 1}
    if several:
        lines += ["", "Several training seeds (the same recipe): mean (min-max) over the seeds listed.", "",
                  "| toy | model | steps | seeds | 1 call | 2 calls | 4 calls | 50 calls |",
                  "|---|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
        for (toy, name, steps), runs in sorted(
            several.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])
        ):
            cells = []
            for k in (*CALLS, 50):
                got = [float(run["ratios"][str(k)]) for run in runs.values() if str(k) in run["ratios"]]
                cells.append(f"{np.mean(got):.2f} ({min(got):.2f}-{max(got):.2f})" if got else "-")
            lines.append(f"| {toy} | {name} | {steps} | {', '.join(map(str, sorted(runs)))} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    for row in steps_rows:
        ms = row["ms"]
        lines += ["", "One training step (moons, MLP 4x256, batch 512, one thread, interleaved rounds, "
                  "median): "
                  + ", ".join(f"{k} {v:.1f} ms ({v / ms['cfm']:.2f}x cfm)" for k, v in ms.items())
                  + f"; load average {row['load']:.1f}."]  # fmt: skip
    for (toy, name, steps), row in rows.items():
        if "triangle" not in row:
            continue
        err = np.array(row["triangle"], dtype=float)
        lines += [
            "",
            f"Map error of {name} on {toy} ({steps} steps): RMS(X_model - X_exact) / RMS(X_exact - x) over "
            "(t, s), t rows, s columns (grid 1/6):",
            "",
            "| t \\ s | " + " | ".join(f"{(j + 1) / 6:.2f}" for j in range(err.shape[1])) + " |",
            "|---|" + "---:|" * err.shape[1],
        ]
        for i in range(err.shape[0]):
            lines.append(
                f"| {i / 6:.2f} | " + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in err[i]) + " |"
            )
        _plot(name, err)
    notes = out.with_name(out.stem + "_notes.md")  # the reading of the table, written by hand
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    out.write_text("\n".join(lines) + "\n")


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
