"""Precision, speed and memory of EmpiricalMarginal: ``python bench/bench_marginal.py [--part P] [--quick]``.

Three parts (``--part precision|speed|memory|all``, default all):

1. Precision (``results/marginal_precision.md``): float32 ``EmpiricalMarginal`` against a float64 brute force
   (the whole ``(B, N)`` logit matrix, written here) at the same float32 inputs, on hostile data (points
   1e-2 apart, clusters of nearly identical points, a large offset from the origin, high dimension, a dense
   2-D set), all four paths and times up to t -> 1. The previous release's algorithm (one streamed float32
   pass, kept below as ``Baseline``) is shown next to the current one.
2. Speed (``results/marginal.md``): ``m.velocity`` next to the baseline and the bare
   ``torch.softmax(x @ X.T, -1) @ X`` of the same shapes (median of interleaved repeats after a warm-up),
   at 1 thread and torch's default: random 64-D data at t = 0.5 (the original benchmark), clustered 64-D
   data at t = 0.9 and at uniform t, and clustered 2-D data at uniform t.
3. Peak memory (``results/marginal.md``; VmHWM delta in a fresh subprocess) of ``m.velocity`` at D = 2,
   B = 1024 for N = 100,000 and N = 1,000,000, next to the size of the data: O(B x chunk), not O(B x N).

Timing needs an idle machine: run ``--part speed`` (or all) alone. ``--quick`` runs small sizes and writes
nothing (a check that the script works). Run from the repository root with the package importable.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from flowscore.marginals import EmpiricalMarginal, Posterior
from flowscore.paths import get_path

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("linear", "vp", "vp-linear", "ve")
TIMES = (0.0, 1e-3, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999, 0.9999, 1 - 1e-6, 1.0)
KINDS = ("data", "noise", "velocity", "score", "log_prob")


# -- the old algorithm, the baseline --------------------------------------------------------------------
def _old_streamed_posterior(query: torch.Tensor, table: torch.Tensor, chunk: int):
    """The previous release's streamed softmax (one float32 pass, argmax anchor)."""
    b = query.shape[0]
    rows = torch.arange(b, device=query.device)
    big_m = torch.full((b,), -math.inf, dtype=query.dtype, device=query.device)
    big_l = torch.zeros(b, dtype=query.dtype, device=query.device)
    acc = torch.zeros(b, table.shape[1], dtype=query.dtype, device=query.device)
    idx = torch.zeros(b, dtype=torch.long, device=query.device)
    for start in range(0, table.shape[0], chunk):
        block = table[start : start + chunk]
        scores = query @ block.T
        block_max, block_idx = scores.max(dim=1)
        weights = torch.softmax(scores, dim=1)
        block_z = weights[rows, block_idx].reciprocal()
        new_m = torch.maximum(big_m, block_max)
        old_scale, block_scale = torch.exp(big_m - new_m), torch.exp(block_max - new_m) * block_z
        acc.mul_(old_scale.unsqueeze(1)).add_((weights @ block).mul_(block_scale.unsqueeze(1)))
        big_l = big_l * old_scale + block_scale
        idx = torch.where(block_max > big_m, block_idx + start, idx)
        big_m = new_m
    return acc / big_l.unsqueeze(1), big_l.log(), idx


class Baseline(EmpiricalMarginal):
    """EmpiricalMarginal with the previous release's posterior (unlabelled data only)."""

    def __init__(self, data: torch.Tensor, path, chunk_size: int | None = None):
        super().__init__(data, path, chunk_size)
        flat = self._flat_data
        self._old_center = flat.mean(0)
        centred = flat - self._old_center
        self._old_table = torch.cat([centred, centred.pow(2).sum(1, keepdim=True)], 1)

    def _chunk(self, b: int) -> int:
        return self.chunk_size or max(64, (1 << 20) // b)

    def _posterior(self, x: torch.Tensor, t: torch.Tensor, y=None) -> Posterior:
        b, d = x.shape
        alpha, beta = (v.expand(b).reshape(b, 1) for v in self.path.schedule(t)[:2])
        singular = beta == 0
        inv_var = 1 / torch.where(singular, torch.ones_like(beta), beta).pow(2)
        query = torch.cat([x - alpha * self._old_center, -0.5 * alpha], 1).mul_(alpha * inv_var)
        mean, log_sum, idx = _old_streamed_posterior(query, self._old_table, self._chunk(b))
        offset = (mean[:, :d] - self._old_table[idx, :d]).double()
        anchor = self._flat_data[idx].double()
        alpha64 = self.path.schedule(t.double())[0].expand(b)
        dist2 = (x.double() - alpha64[:, None] * anchor).pow(2).sum(1)
        offset = offset.masked_fill(singular, 0.0)
        log_sum = log_sum.double().masked_fill(singular.squeeze(1), 0.0)
        return Posterior(anchor, offset, log_sum, dist2)


# -- data sets and the float64 brute force --------------------------------------------------------------
def clustered(n: int, dim: int, seed: int, centers: int = 4, spread: float = 0.3, scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    c = scale * torch.randn(centers, dim, generator=g, dtype=torch.float64)
    k = torch.randint(0, centers, (n,), generator=g)
    return c[k] + spread * torch.randn(n, dim, generator=g, dtype=torch.float64)


def hostile_sets() -> dict[str, torch.Tensor]:
    """Float32 data sets on which float32 streaming loses precision."""
    base = clustered(400, 3, 0)
    g = torch.Generator().manual_seed(1)
    close = torch.cat([base, base + 1e-2 * torch.randn(base.shape, generator=g, dtype=torch.float64)])
    moons = clustered(20_000, 2, 2, centers=12, spread=0.15)
    return {
        "clustered (N 400, D 3)": base.float(),
        "pairs 1e-2 apart (N 800, D 3)": close.float(),
        "near-identical clusters (20 x 20 within 1e-4, D 3)": clustered(400, 3, 3, 20, 1e-4).float(),
        "offset 1000 (N 400, D 3)": (base + 1000).float(),
        "high D (N 1000, D 256)": clustered(1000, 256, 4, 8, 0.3, 1.0).float(),
        "dense 2-D (N 20000)": moons.float(),
    }


def brute_force(data: torch.Tensor, x: torch.Tensor, t: float, path) -> dict[str, torch.Tensor]:
    """Every marginal quantity in float64 from the whole (B, N) logit matrix (t the float32 time)."""
    xs, xd = x.double(), data.double()
    s = path.schedule(torch.tensor(t, dtype=torch.float64))
    a, b, da, _ = (float(v) for v in s)
    diff = xs[:, None] - a * xd[None]  # (B, N, D)
    dist2 = diff.pow(2).sum(-1)
    if b == 0:
        w = (dist2 == dist2.min(1, keepdim=True).values).double()
        w = w / w.sum(1, keepdim=True)
        return {"data": w @ xd}
    logits = -dist2 / (2 * b * b)
    w = torch.softmax(logits, 1)
    mean = w @ xd
    noise = (w[..., None] * diff).sum(1) / b
    d = xd.shape[1]
    beta_d_beta = float(s.beta_d_beta)  # beta * beta' in closed form (vp-linear clamps beta' near t = 1)
    return {
        "data": mean,
        "noise": noise,
        "velocity": da * mean + beta_d_beta / b * noise,
        "score": -noise / b,
        "log_prob": torch.logsumexp(logits, 1)
        - math.log(len(xd))
        - d * math.log(b)
        - 0.5 * d * math.log(2 * math.pi),
    }


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().reshape(len(ref), -1), ref.reshape(len(ref), -1)
    return float(((got - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).max())


def precision(marginal_cls, data: torch.Tensor, name: str, b: int = 64, times=TIMES) -> dict[float, float]:
    """Worst relative error over kinds and rows, per time."""
    path = get_path(name)
    m = marginal_cls(data, path)
    g = torch.Generator().manual_seed(5)
    out = {}
    for t in times:
        t32 = float(torch.tensor(t, dtype=torch.float32))
        idx = torch.randint(0, len(data), (b,), generator=g)
        x = path.sample(data[idx], t32, torch.randn(b, data.shape[1], generator=g)).float()
        ref = brute_force(data, x, t32, path)
        worst = 0.0
        for kind in ref:
            got = m.log_prob(x, t32)[:, None] if kind == "log_prob" else m.field(kind, x, t32)
            worst = max(worst, rel_err(got, ref[kind][:, None] if kind == "log_prob" else ref[kind]))
        out[t] = worst
    return out


def precision_table(quick: bool) -> list[str]:
    lines = [
        "## Precision: float32 against a float64 brute force at the same inputs",
        "",
        "Worst relative error over 64 queries ``x = path.sample(x_data, t, noise)`` and over the fields "
        "(data, noise, velocity, score, log_prob; at beta = 0 the posterior mean only). Old: one streamed "
        "float32 pass. New: streamed pass + exact float64 refinement of the competing points.",
        "",
    ]
    sets = hostile_sets()
    if quick:
        sets = dict(list(sets.items())[:3])
    times = TIMES if not quick else (0.5, 0.9, 0.999)
    header = "| data | path | " + " | ".join(f"t={t:g}" for t in times) + " |"
    lines += [header, "|---|---|" + "---:|" * len(times)]
    for label, data in sets.items():
        for name in PATHS:
            old = precision(Baseline, data, name, times=times)
            new = precision(EmpiricalMarginal, data, name, times=times)
            cells = [f"{old[t]:.0e} / **{new[t]:.0e}**" for t in times]
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += [
        "",
        "Each cell: old / **new**. Where both are equal and large (offset 1000 on vp at t = 1 - 1e-6) the "
        "float64 reference itself is the limit: there beta * noise is below float32's resolution of x, and "
        "float64's rounding of alpha_t (1e-16) times |x| / beta_t is 1e-4 of the field.",
    ]
    return lines


# -- speed ---------------------------------------------------------------------------------------------
def time_calls(calls: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    for f in calls.values():
        f()
    for _ in range(repeats):
        for k, f in calls.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def speed_cases(n: int, d: int, b: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, object]]:
    """Queries to time: (data, x, t) by label."""
    g = torch.Generator().manual_seed(0)
    path = get_path("linear")
    cases = {
        f"random N {n:,} D {d}, t = 0.5": (
            torch.randn(n, d, generator=g),
            torch.randn(b, d, generator=g),
            0.5,
        )
    }
    for label, dim, size in ((f"clustered N {n:,} D {d}", d, n), (f"clustered N {2 * n:,} D 2", 2, 2 * n)):
        lumpy = clustered(size, dim, 7, 16, 0.3).float()
        idx = torch.randint(0, size, (b,), generator=g)
        for when, t in (("t = 0.9", 0.9), ("uniform t", torch.rand(b, generator=g))):
            if dim == 2 and when == "t = 0.9":
                continue
            x = path.sample(lumpy[idx], t, torch.randn(b, dim, generator=g))
            cases[f"{label}, {when}"] = (lumpy, x, t)
    return cases


def speed_rows(threads: int, n: int, d: int, b: int, repeats: int) -> list[str]:
    torch.set_num_threads(threads)
    path = get_path("linear")
    rows = []
    for label, (data, x, t) in speed_cases(n, d, b).items():
        new, old = EmpiricalMarginal(data, path), Baseline(data, path)
        calls = {
            "new": lambda m=new, x=x, t=t: m.velocity(x, t),
            "old": lambda m=old, x=x, t=t: m.velocity(x, t),
            "bare": lambda data=data, x=x: torch.softmax(x @ data.T, -1) @ data,
        }
        got = time_calls(calls, repeats)
        rows.append(
            f"| {threads} | {label} | {got['new']:.3f} | {got['old']:.3f} | {got['bare']:.3f} | "
            f"**{got['new'] / got['old']:.2f}** | {got['new'] / got['bare']:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


# -- memory --------------------------------------------------------------------------------------------
def vm_hwm_bytes() -> int:
    """Peak resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def memory_child(n: int) -> None:
    """Runs in a subprocess: prints data bytes and the peak-RSS growth of one velocity call."""
    torch.manual_seed(0)
    data, x = torch.randn(n, 2), torch.randn(1024, 2)
    EmpiricalMarginal(torch.randn(5000, 2), "linear").velocity(x, 0.5)  # warm-up: library initialisation
    before = vm_hwm_bytes()
    m = EmpiricalMarginal(data, get_path("linear"))  # its table ([z_i / S, |z_i / S|^2, 1]) counts
    m.velocity(x, 0.5)
    print(data.numel() * data.element_size(), vm_hwm_bytes() - before, m._chunk(1024))


def memory_row(n: int) -> tuple[int, int, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(n)], capture_output=True, text=True, check=True
    )
    data_bytes, peak, chunk = (int(v) for v in out.stdout.split())
    return data_bytes, peak, chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("precision", "speed", "memory", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="small sizes, nothing written: a check")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    n, d, b, repeats = (5_000, 16, 256, 3) if args.quick else (50_000, 64, 1024, 7)
    header = [
        "# EmpiricalMarginal benchmark",
        "",
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
        f"default threads {default_threads}, load average {os.getloadavg()[0]:.1f}",
        "",
    ]
    outputs: dict[str, list[str]] = {}
    if args.part in ("precision", "all"):
        outputs["marginal_precision.md"] = header + precision_table(args.quick)
    lines: list[str] = []
    if args.part in ("speed", "all"):
        lines += [
            f"## Speed: velocity, B = {b} queries (median of {repeats} interleaved repeats)",
            "",
            "The current and the previous algorithm side by side in one run (compare within a row; the goal "
            "is new / old <= 1.1), and the bare ``softmax(x @ X.T) @ X`` of the same shapes.",
            "",
            "| threads | queries | new (s) | old (s) | bare (s) | new / old | new / bare |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for threads in sorted({1, default_threads}):
            lines += speed_rows(threads, n, d, b, repeats)
        torch.set_num_threads(default_threads)
    if args.part in ("memory", "all") and not args.quick:
        lines += [
            "",
            "## Peak memory: build + one velocity call, D = 2, B = 1024 (VmHWM growth in a fresh process)",
            "",
            "| N | data (MiB) | chunk | peak growth (MiB) | bare B x N scores would need (MiB) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for size in (100_000, 1_000_000):
            data_bytes, peak, chunk = memory_row(size)
            bare_mib = 1024 * size * 4 / 2**20
            lines.append(
                f"| {size:,} | {data_bytes / 2**20:.1f} | {chunk} | {peak / 2**20:.1f} | {bare_mib:,.0f} |"
            )
    if lines:
        outputs["marginal.md"] = header + lines
    for name, text_lines in outputs.items():
        text = "\n".join(text_lines) + "\n"
        print(text)
        if not args.quick:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / name).write_text(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        memory_child(int(sys.argv[2]))
    else:
        main()
