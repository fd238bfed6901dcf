"""What the machine can give a job: free memory, idle CPU cores, the torch thread count that fits the work.

Two questions are answered before anything large is allocated or started:

* **Memory.** :func:`check_memory` compares a job's estimate (from ``flowscore.models.forward_cost`` and
  ``parameter_count``: nothing is built to get it) with :func:`available_memory` and raises a one-line
  ``ValueError`` when it cannot fit, instead of letting the kernel's OOM killer end the process.
* **Threads.** torch's default (one thread per core) spins against any other busy process on the machine:
  a small model then runs far slower than on one thread. :func:`choose_threads` gives one thread per
  :data:`FLOPS_PER_THREAD` of work per step, at least one and at most the cores that are idle now
  (:func:`idle_cores`); :func:`using_threads` applies it for the duration of a job.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

FLOPS_PER_THREAD = 2e9
"""Floating-point operations per step that justify one more thread: below it a step is so short that the
synchronisation of a parallel region, and a thread waiting on a core another process holds, cost more than
the thread gives."""
GIB = 2**30
TRAINING_PASSES = 3.0
"""Model passes per training step, for the memory and thread estimates: forward, and a backward of about
twice its cost."""


# -- memory ----------------------------------------------------------------------------------------------
def _read_int(file: str) -> int | None:
    try:
        with open(file) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that a new allocation on ``device`` can use now, or None when it cannot be told.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (else the free pages), capped by a cgroup v2 memory limit.
    CUDA: ``torch.cuda.mem_get_info``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        free = None
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        free = min(free, max(limit - used, 0))
    return free


def format_bytes(n: float) -> str:
    return f"{n / GIB:.3g} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.3g} MiB"


def check_memory(needed: float, device: torch.device | str, what: str, fix: str) -> None:
    """``ValueError`` "``what`` needs about X but Y are free on DEVICE; ``fix``" when ``needed`` bytes exceed
    :func:`available_memory` (nothing is checked when that is unknown)."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise ValueError(
            f"{what} needs about {format_bytes(needed)} of memory but {format_bytes(free)} are free on "
            f"{torch.device(device)}; {fix}"
        )


# -- threads -----------------------------------------------------------------------------------------------
def cpu_count() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _running_tasks() -> int | None:
    """Runnable tasks on the machine now (``/proc/loadavg``'s ``running/total``), this one included."""
    try:
        with open("/proc/loadavg") as handle:
            return int(handle.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def idle_cores(samples: int = 5, interval: float = 0.005) -> int:
    """Cores not busy with other processes now: :func:`cpu_count` minus the other runnable tasks (the median
    of a few reads of ``/proc/loadavg``; the 1-minute load average where that is missing). At least 1."""
    reads = []
    for k in range(samples):
        running = _running_tasks()
        if running is None:
            break
        reads.append(running - 1)
        if k + 1 < samples:
            time.sleep(interval)
    if reads:
        others = sorted(reads)[len(reads) // 2]
    else:
        try:
            others = round(os.getloadavg()[0])
        except (OSError, AttributeError):
            others = 0
    return max(1, cpu_count() - max(others, 0))


def choose_threads(flops_per_step: float, *, processes: int = 1) -> int:
    """Torch threads for a job of ``flops_per_step`` per step: ``flops_per_step / FLOPS_PER_THREAD``
    rounded down, at least 1, at most the idle cores shared among ``processes`` (e.g. torchrun ranks)."""
    by_work = max(1, int(flops_per_step // FLOPS_PER_THREAD))
    if by_work == 1:
        return 1
    return max(1, min(by_work, idle_cores() // max(processes, 1)))


@contextlib.contextmanager
def using_threads(threads: int) -> Iterator[int]:
    """``torch.set_num_threads(threads)`` inside the block; the previous count is restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def threads_for(
    threads: int | None, model_config: dict[str, Any], data_shape: tuple[int, ...], batch: int, passes: float
) -> int:
    """``threads`` when given, else :func:`choose_threads` of ``passes`` forward passes of the model over
    ``batch`` points per step (training: about 3, forward and backward; a sampler step: its model calls)."""
    if threads is not None:
        return threads
    from .models import forward_cost

    flops = forward_cost(model_config, data_shape)[0] * batch * passes
    return choose_threads(flops, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def step_memory(model_cfg: dict[str, Any], data_shape: tuple[int, ...], batch: int) -> float:
    """Bytes one training step needs beyond the data: the weights five times (model, EMA, gradient, two
    AdamW moments) and the activations of ``batch`` points for a forward and a backward pass."""
    from .models import forward_cost, parameter_count

    activations = forward_cost(model_cfg, data_shape)[1] * batch * TRAINING_PASSES
    return 4.0 * 5 * parameter_count(model_cfg) + activations
