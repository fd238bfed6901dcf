"""What a training run reports as it goes, on its main process: a row of ``log.csv`` every ``log_every``
steps (its format, :data:`flowscore.runs.LOG_FIELDS`, and its reading are in :mod:`flowscore.runs`), the
progress bar with the loss EMA and the floor, and with ``TrainConfig.tensorboard`` the TensorBoard log
(:mod:`flowscore.tblog`)."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .floor import LossFloor
from .runs import LOG_FIELDS, LOG_FILE, truncate_log


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
