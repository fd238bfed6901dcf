"""What a training run reports as it goes, on its main process: a row of ``log.csv`` every ``log_every``
steps (its format, :data:`flowscore.runs.LOG_FIELDS`, and its reading are in :mod:`flowscore.runs`), the
progress bar with the loss EMA and the floor, and with ``TrainConfig.tensorboard`` the TensorBoard log
(:mod:`flowscore.tblog`)."""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .floor import LossFloor
from .runs import LOG_FIELDS, LOG_FILE, truncate_log

ESTIMATE_STEPS = 10
"""Steps after which a run prints its estimated time (:func:`estimate_text`): measured on all but the first
of them (which warms the caches and allocators up)."""


class RunLog:
    """Opens the run's reports at ``step`` (a resumed run drops the log rows, and TensorBoard the events,
    after its checkpoint). ``phase(text)`` is told what is being written, for the message of a failure."""

    def __init__(
        self,
        run_dir: Path,
        steps: int,
        step: int,
        progress: bool,
        tensorboard: bool,
        phase: Callable[[str], None],
    ):
        self.phase = phase
        self.bar: Any = None
        self.handle: Any = None
        self.tensorboard: Any = None
        phase(f"writing {LOG_FILE}")
        truncate_log(run_dir / LOG_FILE, step)
        try:
            if progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=steps, initial=step, desc="train", dynamic_ncols=True)
            self.handle = open(run_dir / LOG_FILE, "a", newline="")  # noqa: SIM115
            self.writer = csv.DictWriter(self.handle, LOG_FIELDS, lineterminator="\n")
            if tensorboard:
                from .tblog import TensorBoardLog

                phase("opening the TensorBoard log")
                self.tensorboard = TensorBoardLog(run_dir, step)
        except BaseException:
            self.close()
            raise

    def note(self, text: str) -> None:
        """One line on stderr (above the progress bar, which stays intact), when progress is shown."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def advance(self) -> None:
        """One update done: the progress bar moves on."""
        if self.bar is not None:
            self.bar.update(1)

    def row(self, row: dict[str, Any], floor: LossFloor | None) -> None:
        """Writes ``row`` to ``log.csv`` (flushed), shows its loss EMA and the floor on the progress bar, and
        its scalars in TensorBoard."""
        self.phase(f"writing {LOG_FILE}")
        self.writer.writerow(row)
        self.handle.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=row["loss_ema"], floor=floor_text(floor))
        if self.tensorboard is not None:
            self.phase("writing the TensorBoard log")
            self.tensorboard.scalars(row, floor)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.bar is not None:
            self.bar.close()
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()


def floor_text(floor: LossFloor | None) -> str:
    """The floor with its standard error for the progress bar (``-`` when absent)."""
    if floor is None:
        return "-"
    return f"{floor.value:.4g}±{floor.standard_error:.2g}"


def model_text(description: dict[str, Any], parameters: int, steps: int, batch: int, preset: str | None,
               device: str, threads: int) -> str:  # fmt: skip
    """The line a run prints before it trains: the model's kind, size and parameters, the steps and batch
    (and the preset that chose them), the device and threads, e.g. ``model: unet (width 16, 2 levels),
    275,000 parameters; 3000 steps of batch 64 (preset fast); cpu, 1 thread``."""
    kind = description.get("kind", "model")
    if kind == "unet":
        levels = description["levels"]
        shape = f" (width {description['base']}, {levels} level{'s' if levels != 1 else ''})"
    elif kind == "mlp":
        shape = f" (width {description['width']}, depth {description['depth']})"
    else:
        shape = f" ({description.get('class', 'custom')})"
    chosen = f" (preset {preset})" if preset else ""
    where = f"{device}, {threads} thread{'s' if threads != 1 else ''}" if device == "cpu" else device
    size = f"{parameters:,} parameters"
    return f"model: {kind}{shape}, {size}; {steps} steps of batch {batch}{chosen}; {where}"


def duration_text(seconds: float) -> str:
    """``seconds`` as ``"42 s"``, ``"12.3 min"`` or ``"2.5 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_text(seconds_per_step: float, left: int, first: int, last: int) -> str:
    """The line a run prints after its first :data:`ESTIMATE_STEPS` steps: the time of the ``left`` steps
    still to train at ``seconds_per_step`` (measured on steps ``first`` to ``last``), e.g. ``estimated time:
    10.2 min for the 2990 steps left (0.205 s per step over steps 2-10; checkpoints not counted)``."""
    rate = f"{seconds_per_step:.3g} s per step over steps {first}-{last}"
    total = duration_text(seconds_per_step * left)
    return f"estimated time: {total} for the {left} steps left ({rate}; checkpoints not counted)"
