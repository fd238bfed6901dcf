"""One CFM training step vs the bare network step, and vs torchcfm / Meta flow_matching, same MLP and batch.

Each variant does: form (x, t, target) -> forward -> loss -> backward (zero_grad included, no optimizer
step). ``bare`` regresses on a precomputed (x, t, target) with the same squared error; ``flowscore`` calls
``flowscore.losses.cfm`` (times, noise and target drawn inside) under ``flowscore.validation(False)``;
``torchcfm`` uses ``ConditionalFlowMatcher(sigma=0)``; ``flow_matching`` uses
``AffineProbPath(CondOTScheduler())``. With labels (the two moons as classes): the same MLP built with
``num_classes=2``, bare on a precomputed (x, t, y, target), and flowscore's cfm with ``y`` after label
dropout (``p_uncond = 0.1``, drawn from the step's generator as the trainer does).
Variants are interleaved in rounds and the median per-step time is reported, to resist machine load.

Run: ``python bench/bench_train_step.py [--rounds 7 --steps 50 --threads 1]``; writes
``bench/results/train_step.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flowscore import get_path, validation
from flowscore.conditioning import drop_labels
from flowscore.data import Normalizer, labelled_toy
from flowscore.losses import cfm
from flowscore.models import MLP

BATCH = 512
BARE = "bare network (precomputed x, t, target)"
Step = tuple[Callable[[], torch.Tensor], MLP]


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).flatten(1).pow(2).sum(1).mean()


def make_variants(model: MLP, labelled: MLP, data: torch.Tensor, labels: torch.Tensor) -> dict[str, Step]:
    gen = torch.Generator().manual_seed(0)
    path = get_path("linear")
    batch, y = data[:BATCH], labels[:BATCH]
    t0, noise0 = torch.rand(BATCH, generator=gen), torch.randn(batch.shape, generator=gen)
    x0 = path.sample(batch, t0, noise0)
    target0 = path.target(batch, t0, noise0, "velocity")
    y0 = drop_labels(y, 0.1, gen)

    def bare() -> torch.Tensor:
        return mse(model(x0, t0), target0)

    def flowscore_step() -> torch.Tensor:
        with validation(False):
            return cfm(model, batch, path, generator=gen)

    def bare_labelled() -> torch.Tensor:
        return mse(labelled(x0, t0, y0), target0)

    def flowscore_labelled() -> torch.Tensor:
        with validation(False):
            return cfm(labelled, batch, path, y=drop_labels(y, 0.1, gen), generator=gen)

    variants: dict[str, Step] = {
        BARE: (bare, model),
        "flowscore cfm": (flowscore_step, model),
        "bare network with labels (num_classes=2, precomputed x, t, y, target)": (bare_labelled, labelled),
        "flowscore cfm with labels (label dropout 0.1)": (flowscore_labelled, labelled),
    }
    try:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        matcher = ConditionalFlowMatcher(sigma=0.0)

        def torchcfm_step() -> torch.Tensor:
            noise = torch.randn(batch.shape, generator=gen)
            t, xt, ut = matcher.sample_location_and_conditional_flow(noise, batch)  # x0 = noise, x1 = data
            return mse(model(xt, t), ut)

        variants["torchcfm ConditionalFlowMatcher"] = (torchcfm_step, model)
    except ImportError:
        pass
    try:
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        meta_path = AffineProbPath(CondOTScheduler())

        def meta_step() -> torch.Tensor:
            noise = torch.randn(batch.shape, generator=gen)
            t = torch.rand(BATCH, generator=gen)
            sample = meta_path.sample(x_0=noise, x_1=batch, t=t)
            return mse(model(sample.x_t, sample.t), sample.dx_t)

        variants["flow_matching AffineProbPath(CondOT)"] = (meta_step, model)
    except ImportError:
        pass
    return variants


def time_steps(step: Callable[[], torch.Tensor], model: MLP, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        step().backward()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    raw, labels = labelled_toy("moons", 20_000)
    data = Normalizer.fit(raw).encode(raw)
    model = MLP(2, width=256, depth=4)
    labelled = MLP(2, width=256, depth=4, num_classes=2)
    variants = make_variants(model, labelled, data, labels)
    for step, net in variants.values():  # warm-up
        time_steps(step, net, 10)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (step, net) in variants.items():
            times[name].append(time_steps(step, net, args.steps))
    medians = {name: statistics.median(v) for name, v in times.items()}
    bare = medians[BARE]
    lines = [
        "# One training step: flowscore CFM vs the bare network and peer libraries",
        "",
        f"MLP(2, width=256, depth=4), batch {BATCH}, moons, float32 CPU, {args.threads} thread(s); "
        f"median over {args.rounds} interleaved rounds of {args.steps} steps (forward + loss + backward).",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| variant | ms / step | ratio to bare |",
        "|---|---:|---:|",
    ]
    for name, value in medians.items():
        lines.append(f"| {name} | {1e3 * value:.3f} | {value / bare:.3f} |")
    lines += [
        "",
        "Goal: flowscore / bare <= 1.03, with and without labels (the labelled rows are divided by the same",
        "unconditional bare step). The ratio is the cost of drawing t and noise (and the label dropout),",
        "forming x and the target, the class embedding and the squared error, relative to a network step;",
        "other processes on the machine add noise.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
