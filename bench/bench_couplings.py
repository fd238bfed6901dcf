"""Minibatch couplings: straightness and few-step Euler quality, independent vs OT vs Sinkhorn vs torchcfm.

For each 2D toy (``--toys``; a data set of ``--n-data`` points), train the same MLP with CFM on the linear
path for ``--steps`` steps (batch ``--batch``) with each coupling: flowscore ``independent``, ``ot`` (exact,
``ot.emd``), ``sinkhorn`` (``--reg``), and torchcfm's ``ExactOptimalTransportConditionalFlowMatcher``
(which samples B pairs with replacement from the exact plan) when torchcfm is installed
(``pip install --no-deps torchcfm``). Then:

* straightness: the mean over samples and over the times of a fine rk4 solve (``--fine-steps``) of the
  distance ``||x_t - ((1 - t) x_0 + t x_1)||`` of the trajectory from the straight line between its ends;
* Euler with 2, 4, 8 steps and rk4 with ``--fine-steps`` steps: W2 of ``--n`` samples to fresh draws of the
  toy over the W2 floor (mean over ``--pairs`` pairs of fresh draws, as in bench_quality.py);
* time per training step (coupling + loss + backward + Adam), the median of interleaved rounds, and the time
  of the coupling alone at the batch size (flowscore ``couple`` vs torchcfm's ``OTPlanSampler.sample_plan``);
* with ``--budget-s``: the W2 ratios after training each coupling for that many seconds (equal wall time);
* with ``--busy``, only this: ``flowscore train --data 8gaussians`` (default model and batch, the threads
  flowscore chooses) with ``--coupling independent`` and ``ot``, alone and beside one busy single-threaded
  process (``bench_threads.busy_process``), steps/s from the run's log over ``--rounds`` interleaved rounds;
  written to ``bench/results/couplings_busy.md``. Issue 17 measured 17.6 (ot) vs 86.9 (independent) steps/s
  on a busy machine before the coupling's BLAS/OpenMP pools followed the chosen thread count
  (``flowscore.resources.using_threads``). Goal: busy / alone of ``ot`` near that of ``independent``.

Timings are only meaningful on an otherwise idle machine. Goal: Euler with 4 steps, W2 / floor of ``ot`` <=
0.8x that of ``independent``; flowscore's ``ot`` step no slower than torchcfm's.
Writes ``bench/results/couplings.md``. Run: ``python bench/bench_couplings.py`` (``--quick`` for a check).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from flowscore import _io, data, get_path, validation
from flowscore.couplings import couple
from flowscore.floor import loss_floor
from flowscore.losses import cfm
from flowscore.marginals import EmpiricalMarginal
from flowscore.metrics import w2
from flowscore.models import MLP
from flowscore.samplers import sample

HERE = os.path.dirname(os.path.abspath(__file__))
EULER_STEPS = (2, 4, 8)
GOAL = 0.8

Step = Callable[[torch.Tensor], torch.Tensor]


def make_step(name: str, model: MLP, reg: float, gen: torch.Generator) -> Step:
    """``x_data -> loss`` of one training step with coupling ``name`` (noise drawn inside)."""
    path = get_path("linear")
    if name == "torchcfm-ot":
        from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

        matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)

        def torchcfm_step(x_data: torch.Tensor) -> torch.Tensor:
            noise = torch.randn(x_data.shape, generator=gen)
            t = torch.rand(x_data.shape[0], generator=gen)
            t, x, u = matcher.sample_location_and_conditional_flow(noise, x_data, t=t)
            return (model(x, t) - u).pow(2).sum(1).mean()

        return torchcfm_step

    def flowscore_step(x_data: torch.Tensor) -> torch.Tensor:
        return cfm(model, x_data, path, generator=gen, coupling=name, coupling_reg=reg)

    return flowscore_step


def variants(has_torchcfm: bool) -> list[str]:
    return ["independent", "ot", "sinkhorn", *(["torchcfm-ot"] if has_torchcfm else [])]


def train(name: str, points: torch.Tensor, args: argparse.Namespace, budget_s: float | None = None):
    """Train a fresh MLP with coupling ``name``; ``--steps`` steps, or ``budget_s`` seconds when given."""
    torch.manual_seed(0)  # torchcfm draws its pairs with numpy's and torch's global generators
    np.random.seed(0)
    model = MLP(2, width=args.width, depth=args.depth)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    step_fn = make_step(name, model, args.reg, gen)
    steps, start = 0, time.perf_counter()
    with validation(False):
        while (budget_s is None and steps < args.steps) or (
            budget_s is not None and time.perf_counter() - start < budget_s
        ):
            x_data = points[torch.randint(points.shape[0], (args.batch,), generator=gen)]
            loss = step_fn(x_data)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return model, steps


def w2_ratio(x: torch.Tensor, fresh: list[torch.Tensor], floor: float) -> float:
    return float(np.mean([w2(x, a) for a in fresh])) / floor


def evaluate(
    model: MLP, args: argparse.Namespace, fresh: list[torch.Tensor], floor: float
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    out = {}
    with torch.no_grad():
        for steps in EULER_STEPS:
            x = sample(model, "linear", args.n, sampler="euler", steps=steps, generator=gen)
            out[f"euler{steps}"] = w2_ratio(x, fresh, floor)
        result = sample(
            model,
            "linear",
            args.n,
            sampler="rk4",
            steps=args.fine_steps,
            generator=gen,
            return_info=True,
            return_trajectory=True,
        )
        x, trajectory = result.x, result.trajectory
    out["rk4"] = w2_ratio(x, fresh, floor)
    times = torch.linspace(0, 1, trajectory.shape[0]).reshape(-1, 1, 1)
    line = (1 - times) * trajectory[0] + times * trajectory[-1]
    out["straightness"] = float((trajectory - line).norm(dim=-1).mean())
    return out


def coupled_loss(
    name: str, model: MLP, points: torch.Tensor, args: argparse.Namespace, batches: int = 50
) -> float:
    """The trained model's CFM loss under its own coupling (fresh batches, no gradient)."""
    gen = torch.Generator().manual_seed(2)
    np.random.seed(2)
    step_fn = make_step(name, model, args.reg, gen)
    with torch.no_grad(), validation(False):
        losses = [
            step_fn(points[torch.randint(points.shape[0], (args.batch,), generator=gen)])
            for _ in range(batches)
        ]
    return float(torch.stack(losses).mean())


def marginal_velocity_probe(toy: str, args: argparse.Namespace, batches: int = 100) -> list[str]:
    """docs/theory.md: under a coupling pi the regression's minimiser E_pi[u | x] is orthogonal-residual:
    E_pi <g(x), u - v(x)> = 0 for all g only for v = E_pi[u | x]. With v = EmpiricalMarginal.velocity and
    g(x) = x this is 0 under the independent coupling and not under OT. Also E_pi ||u - v(x)||^2: the loss
    floor C(t) under the independent coupling, an upper bound on the coupled floor otherwise."""
    points = data.toy(toy, 512, seed=0).double()
    path = get_path("linear")
    marginal = EmpiricalMarginal(points, path)
    rows = []
    for t_value in (0.25, 0.5, 0.75):
        t = torch.full((args.batch,), t_value, dtype=torch.float64)
        for coupling in ("independent", "ot", "sinkhorn"):
            gen = torch.Generator().manual_seed(3)
            stat, sq = [], []
            for _ in range(batches):
                x_data = points[torch.randint(points.shape[0], (args.batch,), generator=gen)]
                noise = torch.randn(x_data.shape, generator=gen, dtype=torch.float64)
                noise = couple(x_data, noise, coupling, reg=args.reg, generator=gen)
                x = path.sample(x_data, t, noise)
                residual = path.target(x_data, t, noise, "velocity") - marginal.velocity(x, t)
                stat.append((residual * x).sum(1))
                sq.append(residual.pow(2).sum(1))
            v, q = torch.cat(stat), torch.cat(sq)
            se = float(v.std() / len(v) ** 0.5)
            mean = float(v.mean())
            rows.append(
                f"| {t_value} | {coupling} | {mean:.4f} ± {se:.4f} | {mean / se:.1f} | {q.mean():.4f} |"
            )
    return rows


def step_times(points: torch.Tensor, args: argparse.Namespace, names: list[str]) -> dict[str, float]:
    """Median seconds per training step of each coupling, interleaved rounds of ``--time-steps`` steps."""
    runs = {}
    for name in names:
        model = MLP(2, width=args.width, depth=args.depth)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(0)
        runs[name] = (model, opt, make_step(name, model, args.reg, gen), gen)
    times: dict[str, list[float]] = {n: [] for n in names}
    with validation(False):
        for _ in range(args.rounds):
            for name, (_model, opt, step_fn, gen) in runs.items():
                start = time.perf_counter()
                for _ in range(args.time_steps):
                    loss = step_fn(points[torch.randint(points.shape[0], (args.batch,), generator=gen)])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                times[name].append((time.perf_counter() - start) / args.time_steps)
    return {n: statistics.median(v) for n, v in times.items()}


def coupling_times(points: torch.Tensor, args: argparse.Namespace, has_torchcfm: bool) -> dict[str, float]:
    """Median seconds of the coupling alone at the batch size: flowscore ``couple`` vs torchcfm's plan."""
    gen = torch.Generator().manual_seed(0)
    x_data = points[: args.batch]
    noise = torch.randn(x_data.shape, generator=gen)
    fns = {
        "flowscore ot": lambda: couple(x_data, noise, "ot"),
        "flowscore sinkhorn": lambda: couple(x_data, noise, "sinkhorn", reg=args.reg, generator=gen),
    }
    if has_torchcfm:
        from torchcfm.optimal_transport import OTPlanSampler

        sampler = OTPlanSampler(method="exact")
        fns["torchcfm exact"] = lambda: sampler.sample_plan(noise, x_data)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(5):
                fn()
            times[name].append((time.perf_counter() - start) / 5)
    return {n: statistics.median(v) for n, v in times.items()}


def busy_rates(args: argparse.Namespace) -> str:
    """The ``--busy`` table: steps/s of ``flowscore train`` per coupling, alone and beside a busy process."""
    sys.path.insert(0, HERE)
    from bench_threads import busy_process, train_steps_per_s

    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for condition in ("alone", "busy"):
            for coupling in ("independent", "ot"):
                busy = busy_process() if condition == "busy" else None
                try:
                    if busy is not None:
                        time.sleep(1.0)  # let it reach its core
                    rate = train_steps_per_s("8gaussians", args.busy_steps, None, ["--coupling", coupling])
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                rates.setdefault((condition, coupling), []).append(rate)
                print(f"{condition:>5} {coupling:>11}: {rate:8.1f} steps/s", flush=True)
    median = {key: statistics.median(values) for key, values in rates.items()}
    lines = [
        "# Minibatch OT coupling beside a busy process",
        "",
        f"`python bench/bench_couplings.py --busy --busy-steps {args.busy_steps} --rounds {args.rounds}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}: "
        "`flowscore train --data 8gaussians --coupling C` (default model and batch, chosen threads), median "
        "logged steps/s. `busy`: beside one single-threaded numpy loop.",
        "",
        "| coupling | alone (steps/s) | beside a busy process (steps/s) | busy / alone |",
        "|---|---:|---:|---:|",
    ]
    for coupling in ("independent", "ot"):
        alone, busy = median[("alone", coupling)], median[("busy", coupling)]
        lines.append(f"| {coupling} | {alone:.1f} | {busy:.1f} | {busy / alone:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toys", nargs="+", default=["8gaussians", "moons"])
    parser.add_argument("--n-data", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--reg", type=float, default=0.05, help="Sinkhorn regularisation (relative)")
    parser.add_argument("--n", type=int, default=2000, help="samples for W2")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--fine-steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--time-steps", type=int, default=20)
    parser.add_argument("--floor-samples", type=int, default=100_000)
    parser.add_argument("--budget-s", type=float, default=0.0, help="seconds per equal-time run (0: skip)")
    parser.add_argument("--skip-timing", action="store_true", help="no timings (on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="a small run to check that the bench works")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "couplings.md"))
    parser.add_argument("--busy", action="store_true", help="only the busy-machine table (see the docstring)")
    parser.add_argument("--busy-steps", type=int, default=1500, help="training steps per --busy run")
    args = parser.parse_args()
    if args.busy:
        text = busy_rates(args)
        print(text)
        out = os.path.join(HERE, "results", "couplings_busy.md")
        _io.save_text(out, text)
        print(f"wrote {out}")
        return
    if args.quick:
        args.toys, args.n_data, args.steps, args.n, args.pairs = args.toys[:1], 1024, 30, 300, 1
        args.fine_steps, args.rounds, args.time_steps, args.floor_samples = 10, 2, 3, 5000
    try:
        import torchcfm  # noqa: F401

        has_torchcfm = True
    except ImportError:
        has_torchcfm = False
    names = variants(has_torchcfm)
    lines = [
        "# Minibatch couplings: straightness and few-step sampling",
        "",
        f"`python bench/bench_couplings.py{' --quick' if args.quick else ''}` on "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads. Linear path, CFM, MLP {args.width}x{args.depth}, Adam lr {args.lr}, batch "
        f"{args.batch}, {args.steps} steps, data sets of {args.n_data} points; Sinkhorn reg {args.reg} "
        f"(relative to the mean cost). W2 / floor: W2 of {args.n} samples to fresh draws of the toy over the "
        f"mean W2 of {args.pairs} pairs of fresh draws. Straightness: mean distance of rk4 "
        f"({args.fine_steps} "
        "steps) trajectories from the straight line between their ends. "
        + ("" if has_torchcfm else "torchcfm is not installed: its column is missing."),
        "",
    ]
    goals = []
    for toy in args.toys:
        points = data.toy(toy, args.n_data, seed=0)
        fresh = [data.toy(toy, args.n, seed=10_001 + 2 * k) for k in range(args.pairs)]
        floor = float(
            np.mean([w2(data.toy(toy, args.n, seed=10_002 + 2 * k), a) for k, a in enumerate(fresh)])
        )
        results = {}
        for name in names:
            start = time.perf_counter()
            model, _ = train(name, points, args)
            results[name] = evaluate(model, args, fresh, floor)
            results[name]["loss"] = coupled_loss(name, model, points, args)
            print(f"{toy} {name}: {results[name]} ({time.perf_counter() - start:.0f}s)", flush=True)
        cfm_floor = loss_floor(points, "linear", "cfm", n_samples=args.floor_samples, progress=False)
        lines += [
            f"## {toy} (W2 floor {floor:.4f})",
            "",
            "W2 / floor per sampler; 'loss' is the trained model's CFM loss under its own coupling, next to "
            f"the loss floor of the independent coupling, {cfm_floor.value:.4f} ± "
            f"{cfm_floor.standard_error:.4f} (`loss_floor`): a coupled model may end below it "
            "(docs/theory.md).",
            "",
            "| coupling | straightness | Euler 2 | Euler 4 | Euler 8 | rk4 | loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in results.items():
            lines.append(
                f"| {name} | {r['straightness']:.4f} | {r['euler2']:.3f} | {r['euler4']:.3f} | "
                f"{r['euler8']:.3f} | {r['rk4']:.3f} | {r['loss']:.4f} |"
            )
        ratio = results["ot"]["euler4"] / results["independent"]["euler4"]
        goals.append(f"- {toy}: Euler 4 W2/floor, ot / independent = {ratio:.3f} (goal <= {GOAL}): "
                     f"{'met' if ratio <= GOAL else '**not met**'}")  # fmt: skip
        if args.budget_s > 0:
            lines += [
                "",
                f"Equal wall time, {args.budget_s:g} s each:",
                "",
                "| coupling | steps | Euler 4 | rk4 |",
            ]
            lines.append("|---|---|---|---|")
            for name in names:
                model, steps = train(name, points, args, budget_s=args.budget_s)
                r = evaluate(model, args, fresh, floor)
                lines.append(f"| {name} | {steps} | {r['euler4']:.3f} | {r['rk4']:.3f} |")
        lines.append("")
    lines += [
        f"## The coupled regression's minimiser is not the marginal velocity ({args.toys[0]}, 512 points)",
        "",
        f"{100} batches of {args.batch} at fixed t, linear path, float64; v = EmpiricalMarginal.velocity. "
        "E<x, u - v(x)> vanishes for every coupling whose regression minimiser is v; z = mean / SE. "
        "E||u - v(x)||^2 is the loss floor C(t) under the independent coupling and an upper bound on the "
        "coupled floor otherwise.",
        "",
        "| t | coupling | E<x, u - v(x)> ± SE | z | E ‖u - v(x)‖² |",
        "|---|---|---|---|---|",
        *marginal_velocity_probe(args.toys[0], args),
        "",
    ]
    lines += ["## Goal", "", *goals]
    if args.skip_timing:
        lines += ["", "Time per step: not measured (--skip-timing; run on an idle machine)."]
    else:
        points = data.toy(args.toys[0], args.n_data, seed=0)
        per_step = step_times(points, args, names)
        per_coupling = coupling_times(points, args, has_torchcfm)
        lines += [
            "",
            "## Time (only meaningful on an idle machine)",
            "",
            f"Per training step (median of {args.rounds} interleaved rounds of {args.time_steps} steps, "
            f"batch {args.batch}, {args.toys[0]}), and the coupling alone (median of {args.rounds} rounds of "
            "5 calls).",
            "",
            "| variant | ms per step |",
            "|---|---|",
            *[f"| {n} | {1e3 * s:.2f} |" for n, s in per_step.items()],
            "",
            "| coupling alone | ms per call |",
            "|---|---|",
            *[f"| {n} | {1e3 * s:.2f} |" for n, s in per_coupling.items()],
        ]
        if has_torchcfm:
            ratio = per_step["ot"] / per_step["torchcfm-ot"]
            lines += ["", f"- time per step, flowscore ot / torchcfm ot = {ratio:.2f} (goal <= 1)"]
    text = "\n".join(lines) + "\n"
    print(text)
    _io.save_text(args.out, text)


if __name__ == "__main__":
    main()
