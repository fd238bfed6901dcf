"""Speed and memory of EmpiricalMarginal. Run ``python bench/bench_marginal.py``; writes results/marginal.md.

1. Time ``m.velocity`` at N = 50,000, D = 64, B = 1024 next to the bare ``torch.softmax(x @ X.T, -1) @ X``
   of the same shapes (median of interleaved repeats after a warm-up), at 1 thread and torch's default.
2. Peak memory (VmHWM delta, in a fresh subprocess) of ``m.velocity`` at D = 2, B = 1024 for N = 100,000 and
   N = 1,000,000, next to the size of the data itself: the streamed computation is O(B x chunk), not O(B x N).
"""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from flowscore.marginals import EmpiricalMarginal
from flowscore.paths import get_path

RESULTS = Path(__file__).resolve().parent / "results" / "marginal.md"


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
    m = EmpiricalMarginal(data, get_path("linear"))  # its table ([x_i - mean, |x_i - mean|^2]) counts
    m.velocity(x, 0.5)
    print(data.numel() * data.element_size(), vm_hwm_bytes() - before, m._chunk(1024))


def memory_row(n: int) -> tuple[int, int, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(n)], capture_output=True, text=True, check=True
    )
    data_bytes, peak, chunk = (int(v) for v in out.stdout.split())
    return data_bytes, peak, chunk


def time_pair(threads: int, repeats: int = 7) -> tuple[float, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n, d, b = 50_000, 64, 1024
    data, x = torch.randn(n, d), torch.randn(b, d)
    m = EmpiricalMarginal(data, get_path("linear"))
    calls = {"ours": lambda: m.velocity(x, 0.5), "bare": lambda: torch.softmax(x @ data.T, -1) @ data}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for f in calls.values():
        f()
    for _ in range(repeats):
        for k, f in calls.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["bare"])


def main() -> None:
    default_threads = torch.get_num_threads()
    lines = [
        "# EmpiricalMarginal benchmark",
        "",
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
        f"default threads {default_threads}, load average {os.getloadavg()[0]:.1f} "
        f"(other jobs share the CPU: compare the two columns of a row, not rows across runs)",
        "",
        "## Speed: velocity at N = 50,000, D = 64, B = 1024 (median of 7 interleaved repeats)",
        "",
        "| threads | m.velocity (s) | softmax(x @ X.T) @ X (s) | ratio (goal <= 1.4) |",
        "|---:|---:|---:|---:|",
    ]
    for threads in sorted({1, default_threads}):
        ours, bare = time_pair(threads)
        lines.append(f"| {threads} | {ours:.3f} | {bare:.3f} | {ours / bare:.2f} |")
    torch.set_num_threads(default_threads)
    lines += [
        "",
        "## Peak memory: build + one velocity call, D = 2, B = 1024 (VmHWM growth in a fresh process)",
        "",
        "| N | data (MiB) | chunk | peak growth (MiB) | bare B x N scores would need (MiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in (100_000, 1_000_000):
        data_bytes, peak, chunk = memory_row(n)
        bare_mib = 1024 * n * 4 / 2**20
        lines.append(f"| {n:,} | {data_bytes / 2**20:.1f} | {chunk} | {peak / 2**20:.1f} | {bare_mib:,.0f} |")
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        memory_child(int(sys.argv[2]))
    else:
        main()
