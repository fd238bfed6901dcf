"""The quality matrix: every path x objective x prediction, sampled by the default ODE and SDE samplers.

Each cell trains ``TrainConfig(data=toy, path=..., objective=..., prediction=...)`` with every other field
at its default except ``steps`` (the same budget for every cell, ``--steps``), then draws ``N`` samples with
the default ODE sampler and the default SDE sampler at their default steps, and reports

    ratio = mean_k W2(samples, A_k) / mean_k W2(B_k, A_k)

over ``K`` pairs (A_k, B_k) of fresh independent draws of the toy (the averaged floor of
``bench_quality.py``). cfm and dsm run on three toys; fm and sm (exact marginal targets, O(batch x N) per
step) on one toy with ``--small-n`` points: a perfect fm/sm model reproduces its training set, so there
B_k are ``N`` draws (with replacement) from a fresh set of as many points as the run trained on.
``--baseline`` adds the cells of the linear path without preconditioning and with unit-variance data
(``precondition=False, data_std=1``): the state before issue 11. Goal: every cell <= 1.3.

Parity (issue 16): by default only the velocity prediction runs (preconditioned predictions are one
model; ``--predictions velocity score noise data`` brings the axis back), each cell over ``--seeds``
training seeds (its ratio is the mean over seeds), and each row also reports its ratio to the linear cfm
cell of the same toy, budget and defaults (``vs lin-cfm``). ``--defaults before`` trains every cell with
the defaults of before issue 16 written out (weighting "noise" for dsm and for cfm on ve, none otherwise;
uniform times), with the path's own network (``network_path="own"``); ``--defaults network`` or
``linear-velocity`` names that weighting, with matched log-SNR times and the own network; ``--defaults
after`` (default) leaves weighting, time sampler and ``network_path`` at the config's defaults (every path
through linear's network at the matched time). ``--small`` adds the fm/sm cells. Goal of issue 16: every
``vs lin-cfm`` ratio <= 1.1. ``results/matrix.jsonl`` holds the rows of the earlier all-predictions matrix
(``matrix.md``), trained with the defaults of before issue 16.

Cells run in ``--workers`` processes of one thread each; finished cells are kept in ``--cache`` (JSON lines),
so an interrupted run resumes and ``--report`` rewrites the table alone. Writes ``bench/results/matrix.md``.
Run: ``nice -n 19 python bench/bench_matrix.py [--steps 4000] [--workers 2] [--seeds 2] [--baseline]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from typing import Any

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOYS = ("moons", "8gaussians", "checkerboard")
PATHS = ("linear", "vp", "vp-linear", "ve")
PREDICTIONS = ("velocity", "score", "noise", "data")
GOAL = 1.3
PARITY_GOAL = 1.1
VARIANTS = ("before", "network", "linear-velocity", "after-bounded", "after")
"""``--defaults``: before issue 16; that weighting with the auto time sampler and the path's own network
(``network_path="own"``, the defaults before the option); or the config's defaults (every path through
linear's network at the matched time). ``after-bounded``: the same cells sampled by the SDE's defaults of
before (the path's own bounded diffusion on uniform times), read from the cache only."""
SDE_DEFAULT = "linear"
"""The SDE defaults the "after" cells are sampled with (``flowscore.samplers.DIFFUSIONS[0]``, with the
"linear" grid): kept in each cached row as ``sde``; "after" rows cached without it are "bounded"."""


FINDINGS = """What the matrix taught (docs/theory.md, section 16):

* Raw networks: a score, noise or data prediction trained with cfm, and a data prediction trained with dsm,
  sample far worse than a velocity ("before" rows): the conversion to the velocity divides the network's
  error by alpha (noise, score) or beta (data) near one end. Preconditioning (every prediction through one
  velocity network with unit-variance input and target) makes the four predictions one model: each row
  above is (nearly) constant across its predictions.
* EDM's skip connection (c_skip x + c_out F) was tried first: its residual target is uncorrelated with x by
  construction and the MLP on 8gaussians barely learned it. flowscore takes no skip.
* The vp path with unit-variance data makes the velocity uncorrelated with x; on symmetric data
  (8gaussians) every network stayed at zero (W2 / floor 2.6). Data are scaled to data_std = 0.5 instead.
* ve with cfm failed (3.9 / 4.5) with the unweighted loss: the velocity's scale spans orders of magnitude
  over t and t near 0 dominates. The auto weighting is "noise" there (uniform in the network's error); ve
  cfm and ve dsm are then the same loss, hence their identical rows.
"""


def before_defaults(path: str, objective: str) -> dict[str, Any]:
    """The weighting and time sampler the defaults gave a preconditioned cell before issue 16."""
    noise = objective in ("dsm", "sm") or path == "ve"
    return {"weighting": "noise" if noise else None, "time_sampler": "uniform"}


PARITY_FINDINGS = """What the parity bench taught (docs/theory.md, section 16, "Parity of objectives"):
* After (the defaults): every path runs through linear's network at the time of equal log-SNR, with
  matched times and the linear-velocity weighting, so every (path, objective) trains linear cfm's problem
  exactly (tests/test_parity.py; cfm = dsm per sample, so cfm alone is trained). The ODE ratios to linear
  cfm are 0.99-1.01 on every path and toy (two seeds), and the SDE's 0.98-1.02 (table "After"): every
  cell within 1.1 of linear cfm's, ODE and SDE. The linear rows are bit for bit the before table's (the
  same model, weight 1 and uniform times; linear's SDE defaults are what they were).
* The SDE's defaults are linear's diffusion and grid carried to the path at equal log-SNR
  (flowscore.samplers.diffusion_schedule, "linear"; docs/theory.md section 8). With the SDE defaults of
  before (table "After, sampled by the SDE defaults of before": the same networks, the path's own bounded
  diffusion on uniform times) 8gaussians ve's SDE was 1.33 (1.29 at seed 0, 1.36 at seed 1; moons ve
  1.07) while its ODE was 1.00: the network was as good as linear cfm's, the sampler was not carried over
  with it. results/parity_sde.md samples ONE linear cfm network on every path: ve's default SDE of before
  0.99 against linear's 0.77, 0.74 with linear's diffusion and grid. The bounded g^2 = beta det_v is alpha
  / 2 times the score-SDE's: at equal log-SNR that is linear's tau / 2 on linear but 1 / 2 on ve (1 / tau
  times the relative diffusion at high noise), and uniform times on ve are uniform in log sigma. Now
  8gaussians ve's SDE is 0.98 of linear cfm's, and vp's (0.93 before, better than linear's) is 1.00.
* Before that, with the path's own network (table "network"): vp-linear moved from 1.24 / 1.29 (before,
  seed 0) to 1.07 / 1.02, checkerboard vp / vp-linear stayed at 1.12-1.14 and ve's SDE on 8gaussians at
  1.32; the exact linear cfm weight on the own network ("linear-velocity") made ve far worse (moons 2.34 /
  2.41): on ve the data part of the own network's target is of size 1 / sigma. With linear's network that
  weight is uniform in the network's error, and ve's ODE matches linear cfm.
* Seed noise: linear cfm itself moves by up to 17 % between two training seeds (8gaussians 0.79 / 0.77 at
  seed 0, 0.66 / 0.67 at seed 1), so two seeds resolve a 1.1x goal only roughly; the 8gaussians ve SDE
  cell missed at both seeds with the old SDE defaults and meets the goal at both with the new.
"""


def cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for toy, path, objective, prediction, seed in itertools.product(
        args.toys, PATHS, ("cfm", "dsm"), args.predictions, range(args.seeds)
    ):
        out.append(dict(toy=toy, path=path, objective=objective, prediction=prediction, precondition=True,
                        seed=seed))  # fmt: skip
    if args.small:
        for path, objective, prediction, seed in itertools.product(
            ("linear",), ("fm", "sm"), args.predictions, range(args.seeds)
        ):
            out.append(dict(toy=args.toys[0], path=path, objective=objective, prediction=prediction,
                            precondition=True, data_n=args.small_n, seed=seed))  # fmt: skip
    if args.defaults == "before":
        out = [{**c, **before_defaults(c["path"], c["objective"])} for c in out]
    elif not args.defaults.startswith("after"):  # a weighting named, with the default (auto) time sampler
        out = [{**c, "weighting": args.defaults} for c in out]
    network_path = "linear" if args.defaults.startswith("after") else "own"
    out = [{**c, "network_path": network_path} for c in out]
    if args.defaults.startswith("after"):
        out = [{**c, "sde": "bounded" if args.defaults == "after-bounded" else SDE_DEFAULT} for c in out]
    if args.baseline:
        for objective, prediction in itertools.product(("cfm", "dsm"), PREDICTIONS):
            out.append(dict(toy=args.toys[0], path="linear", objective=objective, prediction=prediction,
                            precondition=False, data_std=1.0, seed=0, network_path="own"))  # fmt: skip
    return out


def priority(cell: dict[str, Any]) -> tuple:
    """Run order: the "before" cells, then one cell per prediction of every path and toy, then the rest."""
    first = {("cfm", "velocity"), ("dsm", "noise"), ("cfm", "data"), ("dsm", "score")}
    linear_cfm = cell["path"] == "linear" and cell["objective"] == "cfm"
    return (cell["precondition"], "data_n" in cell, cell["seed"], not linear_cfm,
            (cell["objective"], cell["prediction"]) not in first)  # fmt: skip


def key(cell: dict[str, Any], steps: int) -> str:
    return json.dumps({**cell, "steps": steps}, sort_keys=True)


def measure(job: tuple[dict[str, Any], int, int, int]) -> dict[str, Any]:
    """Trains one cell and measures the W2 ratios of its ODE and SDE samples (one thread)."""
    cell, steps, n, pairs = job
    torch.set_num_threads(1)
    from flowscore import data, workflows
    from flowscore.metrics import w2
    from flowscore.samplers import DEFAULT_ODE_SAMPLER
    from flowscore.training import TrainConfig, Trainer, load_run

    options = {k: v for k, v in cell.items() if k not in ("toy", "sde")}  # seed, weighting/time_sampler
    config = TrainConfig(data=cell["toy"], steps=steps, threads=1, loss_floor=False, **options)
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        Trainer(config, os.path.join(work, "run"), progress=False).train()
        train_s = time.perf_counter() - start
        run = load_run(os.path.join(work, "run"))
        run_points = cell.get("data_n", 0) - run.held_out.shape[0]  # the training points of a small set
        ode = workflows.sample_run(run, n, sampler=DEFAULT_ODE_SAMPLER, seed=1, threads=1)
        sde = workflows.sample_run(run, n, sampler="sde", seed=2, threads=1)
    floors, odes, sdes = [], [], []
    for k in range(pairs):
        a, b = data.toy(cell["toy"], n, seed=10_001 + 2 * k), data.toy(cell["toy"], n, seed=10_002 + 2 * k)
        if "data_n" in cell:  # a perfect fm/sm model reproduces its small training set: the floor of one
            train = data.toy(cell["toy"], run_points, seed=20_000 + k)
            b = train[torch.randint(run_points, (n,), generator=torch.Generator().manual_seed(k))]
        floors.append(w2(b, a))
        odes.append(w2(torch.from_numpy(ode), a) if np.isfinite(ode).all() else float("inf"))
        sdes.append(w2(torch.from_numpy(sde), a) if np.isfinite(sde).all() else float("inf"))
    floor = float(np.mean(floors))
    return {**cell, "steps": steps, "train_s": train_s, "floor": floor,
            "ratio_ode": float(np.mean(odes)) / floor, "ratio_sde": float(np.mean(sdes)) / floor}  # fmt: skip


CELL_FIELDS = ("toy", "path", "objective", "prediction", "precondition")
OPTIONAL_FIELDS = ("data_n", "data_std", "weighting", "time_sampler")
"""Besides these, ``network_path``: rows written before it existed were trained with the path's own
network."""


def load_cache(file: str) -> dict[str, dict[str, Any]]:
    done = {}
    if os.path.exists(file):
        with open(file) as handle:
            for line in handle:
                if line.strip():
                    r = json.loads(line)
                    cell = {k: r[k] for k in CELL_FIELDS}
                    cell["seed"] = r.get("seed", 0)  # rows written before --seeds: the default seed 0
                    cell.update({k: r[k] for k in OPTIONAL_FIELDS if k in r})
                    cell["network_path"] = r.get("network_path", "own")
                    if cell["network_path"] == "linear":  # the "after" rows: which SDE defaults
                        cell["sde"] = r.get("sde", "bounded")
                    done[key(cell, r["steps"])] = r
    return done


def _fmt(v: float, goal: float = GOAL) -> str:
    text = "inf" if not np.isfinite(v) else f"{v:.2f}"
    return f"**{text}**" if not v <= goal else text


def seed_means(rows: list[dict[str, Any]], seeds: set[int] | None = None) -> dict[tuple, dict[str, Any]]:
    """Per (toy, path, objective, prediction): the ratios averaged over the seeds present (or over those of
    ``seeds`` present), with the list of seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if seeds is None or r["seed"] in seeds:
            groups.setdefault((r["toy"], r["path"], r["objective"], r["prediction"]), []).append(r)
    return {
        k: {"ratio_ode": float(np.mean([r["ratio_ode"] for r in g])),
            "ratio_sde": float(np.mean([r["ratio_sde"] for r in g])), "seeds": sorted(r["seed"] for r in g)}
        for k, g in groups.items()
    }  # fmt: skip


def table(rows: list[dict[str, Any]], predictions: list[str], parity: bool) -> tuple[list[str], dict]:
    """Markdown rows (toy, path, objective; per prediction ODE / SDE; with ``parity`` the ratio of the first
    prediction to the linear cfm cell of the same toy over the same seeds), and per toy the worst ``vs
    lin-cfm`` ratio. Timings are left out: the cells ran on a shared machine."""
    means = seed_means(rows)
    head = "| toy | path | objective | " + " | ".join(f"{p} ODE / SDE" for p in predictions)
    head += " | vs lin-cfm ODE / SDE |" if parity else " |"
    lines = [head + " seeds |", "|---" * head.count("|") + "|"]
    worst: dict[str, float] = {}
    for toy, path, objective in dict.fromkeys((k[0], k[1], k[2]) for k in means):
        by = {p: means.get((toy, path, objective, p)) for p in predictions}
        parts = [f"{_fmt(m['ratio_ode'])} / {_fmt(m['ratio_sde'])}" if m else "–" for m in by.values()]
        first = by[predictions[0]]
        if parity:
            ref = (
                seed_means(rows, set(first["seeds"])).get((toy, "linear", "cfm", predictions[0]))
                if first
                else None
            )
            if first and ref and ref["seeds"] == first["seeds"]:
                r_ode, r_sde = first["ratio_ode"] / ref["ratio_ode"], first["ratio_sde"] / ref["ratio_sde"]
                worst[toy] = max(worst.get(toy, 0.0), r_ode, r_sde)
                parts.append(f"{_fmt(r_ode, PARITY_GOAL)} / {_fmt(r_sde, PARITY_GOAL)}")
            else:
                parts.append("–")
        seeds = sorted({s for m in by.values() if m for s in m["seeds"]})
        lines.append(
            f"| {toy} | {path} | {objective} | " + " | ".join(parts) + f" | {','.join(map(str, seeds))} |"
        )
    return lines, worst


def report(variants: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    """The markdown page: one table per set of defaults ("before", "after") found in the cache."""
    from flowscore.samplers import DEFAULT_ODE_SAMPLER, DEFAULT_ODE_STEPS, DEFAULT_SDE_STEPS

    lines = [
        "# Parity of objectives: every path x objective, ODE and SDE, against linear cfm",
        "",
        f"`nice -n 10 python bench/bench_matrix.py --steps {args.steps} --n {args.n} --pairs {args.pairs} "
        f"--seeds {args.seeds} --workers {args.workers} --defaults VARIANT` on "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread per cell "
        f"({args.workers} cell(s) at a time) on a shared machine (timings are not comparable). Each cell: "
        f"`TrainConfig(data=toy, path, objective, prediction, seed)`, {args.steps} steps, every other field "
        f"at its default (preconditioned built-in MLP); then {args.n} samples by the default ODE sampler "
        f"({DEFAULT_ODE_SAMPLER}, {DEFAULT_ODE_STEPS} steps) and the default SDE (Euler-Maruyama, "
        f"{DEFAULT_SDE_STEPS} steps). Ratio = mean_k W2(samples, A_k) / mean_k W2(B_k, A_k) over "
        f"{args.pairs} pairs of fresh draws, averaged over the training seeds (goal <= {GOAL}, bold: "
        "missed); "
        f"vs lin-cfm = that ratio over the linear cfm cell's of the same toy, budget and defaults (goal of "
        f"issue 16 <= {PARITY_GOAL}, bold: missed).",
    ]
    titles = {
        "before": "Before: the defaults of before issue 16 (weighting noise for dsm and for cfm on ve, none "
        "otherwise; uniform times)",
        "after": "After: the current defaults (`--defaults after`: every path through linear's network at "
        "the matched time, network_path linear; weighting linear-velocity, matched log-SNR times; the SDE "
        "with linear's diffusion and grid carried to the path)",
        "after-bounded": "After, sampled by the SDE defaults of before (the path's own bounded diffusion, "
        "uniform times; the networks of the After table)",
        "network": "Weighting network, matched log-SNR times, the path's own network (`--defaults network`: "
        "the defaults before network_path existed)",
        "linear-velocity": "Weighting linear-velocity, matched log-SNR times (`--defaults linear-velocity`; "
        "its linear rows are the before rows: weight exactly 1, the same uniform times)",
    }
    for name, rows in variants.items():
        main = [r for r in rows if r["precondition"] and "data_n" not in r]
        small = [r for r in rows if "data_n" in r]
        base = [r for r in rows if not r["precondition"]]
        if not rows:
            continue
        body, worst = table(main, args.predictions, parity=True)
        lines += ["", f"## {titles[name]}", "", *body, ""]
        lines.append("Worst vs lin-cfm per toy: " + ", ".join(f"{t} {v:.2f}" for t, v in worst.items()) + ".")
        if small:
            lines += ["", f"fm and sm (exact marginal targets) on {small[0]['data_n']} training points:", ""]
            lines += table(small, args.predictions, parity=False)[0]
        if base:
            lines += ["", "The same cells without preconditioning, unit-variance data "
                      "(`precondition=False, data_std=1`):", ""]  # fmt: skip
            lines += table(base, list(PREDICTIONS), parity=False)[0]
    lines += ["", PARITY_FINDINGS.rstrip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps of every cell")
    parser.add_argument("--n", type=int, default=2000, help="samples and fresh data points per set")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of fresh reference draws to average")
    parser.add_argument("--toys", nargs="+", default=list(TOYS))
    parser.add_argument("--small-n", type=int, default=512, help="training points of the fm and sm cells")
    parser.add_argument(
        "--baseline", action="store_true", help="also the linear path without preconditioning"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=[], help="run only cells whose description has these")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per cell (0..SEEDS-1), averaged")
    parser.add_argument(
        "--predictions", nargs="+", default=["velocity"], choices=PREDICTIONS,
        help="predictions to train (preconditioned, they are one model: velocity alone by default)",
    )  # fmt: skip
    parser.add_argument(
        "--defaults",
        choices=VARIANTS,
        default="after",
        help="the weighting and time sampler of the cells to run (see the module docstring)",
    )
    parser.add_argument("--small", action="store_true", help="also the fm and sm cells (--small-n points)")
    parser.add_argument("--cache", default=os.path.join(HERE, "results", "parity.jsonl"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "parity.md"))
    parser.add_argument("--report", action="store_true", help="rewrite the table from the cache alone")
    args = parser.parse_args()
    from flowscore.samplers import DIFFUSIONS

    if DIFFUSIONS[0] != SDE_DEFAULT:
        raise SystemExit(f"the SDE's default diffusion is {DIFFUSIONS[0]!r}: update SDE_DEFAULT")
    if args.defaults == "after-bounded" and not args.report:
        raise SystemExit("--defaults after-bounded is read from the cache only: add --report")
    done = load_cache(args.cache)
    todo = [c for c in cells(args) if key(c, args.steps) not in done]
    todo = [c for c in todo if all(word in json.dumps(c) for word in args.only)]
    todo.sort(key=priority)
    if not args.report and todo:
        print(f"{len(todo)} cells to run ({len(done)} cached)", flush=True)
        jobs = [(c, args.steps, args.n, args.pairs) for c in todo]
        with mp.get_context("spawn").Pool(args.workers) as pool, open(args.cache, "a") as cache:
            for r in pool.imap_unordered(measure, jobs):
                cache.write(json.dumps(r) + "\n")
                cache.flush()
                raw = "" if r["precondition"] else "(raw) "
                name = f"{r['toy']} {r['path']} {r['objective']} {r['prediction']} seed {r['seed']} {raw}"
                print(f"{name}ODE {r['ratio_ode']:.2f} "
                      f"SDE {r['ratio_sde']:.2f} ({r['train_s']:.0f} s)", flush=True)  # fmt: skip
        done = load_cache(args.cache)
    variants = {}
    for name in VARIANTS:
        cells_of = cells(argparse.Namespace(**{**vars(args), "defaults": name}))
        variants[name] = [done[key(c, args.steps)] for c in cells_of if key(c, args.steps) in done]
    text = report(variants, args)
    with open(args.out, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
