"""The end-to-end demo: train on a 2D toy with the default settings, sample by ODE and SDE, plot, and measure.

``run_demo`` returns W2(samples, held-out) next to the W2 floor, the W2 between two independent held-out
halves of the same size (what a perfect sampler would reach with that many points). The demo is built in a
temporary folder beside ``out_dir`` and moved into place only when it is complete: an earlier demo (and any
file of the user's beside it) is untouched until then, and a failed or interrupted demo leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from ._io import check_output_dir, save_json, save_npy
from .workflows import draw_samples, evaluate_run, held_out_halves, plot_run

DEMO_MARKER = ".flowscore-demo"


@dataclass
class DemoResult:
    out_dir: str
    run_dir: str
    metrics: dict[str, Any]
    files: list[str]
    replaced: bool


def prepare_demo_dir(out_dir: str) -> bool:
    """Checks ``out_dir`` for the demo; returns True if it holds an earlier demo that will be replaced.

    An absent or empty folder, or one made by an earlier demo (it holds ``DEMO_MARKER``) is fine; any other
    existing path raises ``ValueError``, so the demo never writes into a folder it did not create.
    """
    check_output_dir(out_dir, "--out")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):  # the demo is built beside it
        raise ValueError(f"--out {out_dir!r}: its folder {parent!r} is not writable; pass another --out")
    if not os.path.exists(out_dir):
        return False
    entries = os.listdir(out_dir)
    if not entries:
        return False
    if DEMO_MARKER not in entries:
        raise ValueError(
            f"--out {out_dir!r} exists and was not made by `flowscore demo`; pass a new or empty --out folder"
        )
    return True


def _staging_dir(out_dir: str) -> str:
    """A new hidden folder beside ``out_dir`` (same file system, so the final moves are renames), named
    ``.NAME.demo-PID-XXXX`` after this process; those of demos whose process is gone (killed) are removed
    first (:func:`remove_stale`)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    remove_stale(out_dir)
    return tempfile.mkdtemp(prefix=f"{_hidden_prefix(out_dir, 'demo')}{os.getpid()}-", dir=parent)


def _hidden_prefix(out_dir: str, kind: str) -> str:
    return f".{os.path.basename(os.path.abspath(out_dir))}.{kind}-"


def remove_stale(out_dir: str) -> list[str]:
    """Deletes the staging (``.NAME.demo-PID-*``) and old-demo (``.NAME.old-PID-*``) folders beside
    ``out_dir`` whose process ``PID`` no longer runs (a demo killed by ``kill -9`` or a power cut); returns
    them. A folder of a running demo, or one not named so, is never touched."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    removed = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        for kind in ("demo", "old"):
            head = _hidden_prefix(out_dir, kind)
            pid = entry[len(head) :].split("-", 1)[0] if entry.startswith(head) else ""
            path = os.path.join(parent, entry)
            if pid.isdigit() and not _alive(int(pid)) and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """True when a process ``pid`` exists (signal 0 probes it without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid: not ours to judge
    return True


def _move_into_place(staging: str, out_dir: str) -> None:
    """Moves the finished demo in ``staging`` to ``out_dir``: a rename when ``out_dir`` is absent, else each
    entry of the new demo replaces the one of the same name (the old ones go to a temporary folder that is
    deleted last); files in ``out_dir`` that the demo does not write are kept."""
    if not os.path.exists(out_dir):
        os.rename(staging, out_dir)
        return
    trash = tempfile.mkdtemp(prefix=f"{_hidden_prefix(out_dir, 'old')}{os.getpid()}-",
                             dir=os.path.dirname(os.path.abspath(out_dir)))  # fmt: skip
    for name in sorted(os.listdir(staging)):
        target = os.path.join(out_dir, name)
        if os.path.lexists(target):
            os.rename(target, os.path.join(trash, name))
        os.rename(os.path.join(staging, name), target)
    os.rmdir(staging)
    shutil.rmtree(trash, ignore_errors=True)


def run_demo(
    out_dir: str = "demo-out",
    *,
    data: str = "moons",
    steps: int | None = None,
    seed: int = 0,
    n: int = 2000,
    progress: bool = True,
    threads: int | None = None,
) -> DemoResult:
    """Train on ``data`` with the default settings, sample by ODE and SDE, plot, and measure W2 vs its floor.

    ``out_dir`` may hold an earlier demo (see :func:`prepare_demo_dir`); it is replaced only once the new demo
    is complete. Layout: ``out_dir/run`` (the training run), ``samples_ode.npy``, ``samples_sde.npy`` (data
    space), the PNGs of :func:`flowscore.workflows.plot_run`, and ``metrics.json``
    (:func:`flowscore.workflows.evaluate_run`, without the likelihood).
    """
    from .training import TrainConfig, Trainer, load_run

    replace = prepare_demo_dir(out_dir)
    values: dict[str, Any] = {"data": data, "seed": seed, "threads": threads}
    if steps is not None:
        values["steps"] = steps
    config = TrainConfig.from_dict(values)
    staging = _staging_dir(out_dir)
    try:
        open(os.path.join(staging, DEMO_MARKER), "w").close()
        Trainer(config, os.path.join(staging, "run"), progress=progress).train()
        run = load_run(os.path.join(staging, "run"))
        m = held_out_halves(run, n)[0].shape[0]
        samples = draw_samples(run, m, seed=seed, threads=threads, progress=progress)
        metrics = evaluate_run(
            run, n=m, samples=samples, likelihood=False, threads=threads, progress=progress
        )
        save_npy(os.path.join(staging, "samples_ode.npy"), samples.ode)
        save_npy(os.path.join(staging, "samples_sde.npy"), samples.sde)
        files = plot_run(run, staging, n=m, samples=samples, threads=threads, progress=progress)
        names = [os.path.basename(f) for f in files]
        save_json(os.path.join(staging, "metrics.json"), metrics)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [os.path.join(out_dir, name) for name in names]
    return DemoResult(out_dir, os.path.join(out_dir, "run"), metrics, files, replace)
