"""``flowscore verify`` with its defaults: draws, seconds and verdict on moons and on a 3-cluster set.

Each case runs :func:`flowscore.verify.run_verify` with the defaults (target standard error 0.5 %, the cap
``DEFAULT_MAX_SAMPLES``, all variance reductions, one thread), then the same with ``--plain`` (no variance
reduction) for a fixed number of batches, to report the draws the plain estimator would need for the same
standard error (it falls as ``1 / sqrt(draws)``). The 3-cluster set is generated here (3 isotropic Gaussian
clusters in 2D, 1,500 points, written to an .npy file so that the file loader is exercised); it was not used
to tune the defaults.

Wall time depends on the machine's load; the CPU time of the process (one thread) is printed next to it.

Run: ``python bench/bench_verify.py [--plain-batches 64]``; writes ``bench/results/verify.md``.
Quick check: ``python bench/bench_verify.py --quick`` (small caps, does not write the results file).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flowscore.verify import DEFAULT_MAX_SAMPLES, DEFAULT_TARGET_SE, run_verify

PLAIN = {"antithetic": False, "control_variate": False, "importance": False}


def three_clusters(file: Path, n: int = 1500, seed: int = 11) -> str:
    """3 Gaussian clusters (centres on a triangle of side ~3.5, std 0.3) saved as float32 (n, 2)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[-1.8, -1.0], [1.8, -1.0], [0.0, 2.1]])
    points = centres[rng.integers(0, 3, n)] + 0.3 * rng.standard_normal((n, 2))
    np.save(file, points.astype(np.float32))
    return str(file)


def timed(**kwargs) -> tuple[dict, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_verify(progress=False, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain-batches", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="small caps; no results file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cap = 8 * 2048 if args.quick else DEFAULT_MAX_SAMPLES
    plain_batches = 4 if args.quick else args.plain_batches
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clusters = three_clusters(Path(tmp) / "clusters3.npy")
        cases = [("moons", "cfm"), ("moons", "dsm"), (clusters, "cfm"), (clusters, "dsm")]
        for data, objective in cases:
            name = "3 clusters (.npy)" if data == clusters else data
            result, wall, cpu = timed(data=data, objective=objective, max_samples=cap)
            plain, _, _ = timed(data=data, objective=objective, n_batches=plain_batches, **PLAIN)
            plain_need = plain["n_samples"] * (plain["grad_relative_standard_error"] / DEFAULT_TARGET_SE) ** 2
            row = (
                f"| {name} | {objective} | {result['n_samples']:,} | {wall:.1f} | {cpu:.1f} | "
                f"{100 * result['grad_relative_difference']:.2f} +- "
                f"{100 * result['grad_relative_standard_error']:.2f} | {result['verdict']} "
                f"(within {100 * result['bound']:.2f}%) | {plain_need / 1e6:.1f} M |"
            )
            print(row, flush=True)
            rows.append(row)
    header = [
        "# `flowscore verify` with its defaults",
        "",
        f"Produced by `bench/bench_verify.py` on {platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"{os.cpu_count()} cores. Defaults: path linear, target standard error "
        f"{100 * DEFAULT_TARGET_SE:g}%, cap {DEFAULT_MAX_SAMPLES:,} draws, all variance reductions. The last "
        f"column: draws the plain estimator (`--plain`) would need for the same standard error, extrapolated "
        f"from {plain_batches} batches.",
        "",
        "| data | objective | draws | wall s | CPU s | rel. difference (%) | verdict | plain needs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if not args.quick:
        out = Path(__file__).parent / "results" / "verify.md"
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
