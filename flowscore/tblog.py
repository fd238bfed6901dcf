"""TensorBoard logging of a training run (``TrainConfig.tensorboard``; needs the ``tensorboard`` package).

Written into ``RUN_DIR/tensorboard``: every ``log_every`` steps the scalars ``loss/window`` (the mean loss
since the last row), ``loss/ema``, ``loss/floor`` and ``loss/excess`` (``loss/ema`` minus the floor: what
training can still gain, with ``loss/excess_low``/``excess_high`` its band of -+ 2 standard errors of the
floor; only when the run has a floor) and ``lr``; at every checkpoint a sample grid of the
EMA model: images as a grid (one row per class for labelled runs), 2D points as a scatter plot (needs
matplotlib). The samples come from Euler steps started from a generator of their own, so logging never
changes the training's random numbers, and a resumed run purges the events after its checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .paths import GaussianPath

FOLDER = "tensorboard"
GRID_STEPS = 32
"""Euler steps of the logged samples (a preview, not a quality measure)."""
GRID_SIZE = 8


class TensorBoardLog:
    """A ``SummaryWriter`` on ``run_dir/tensorboard``; for ``step`` > 0 (a run resumed from the checkpoint of
    that step) TensorBoard drops the earlier session's events after ``step``, which training redoes."""

    def __init__(self, run_dir: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(Path(run_dir) / FOLDER), purge_step=step + 1 if step > 0 else None
        )

    def scalars(self, row: dict[str, Any], floor: Any) -> None:
        """One row of ``log.csv`` (strings or numbers) and the loss floor (a number, or a
        :class:`~flowscore.LossFloor`, whose standard error ``se`` gives ``loss/excess_low`` and
        ``loss/excess_high``, the excess -+ 2 se: the floor is a Monte Carlo estimate, so an excess within
        that band, negative included, is zero within noise)."""
        step = int(row["step"])
        loss_ema = float(row["loss_ema"])
        self.writer.add_scalar("loss/window", float(row["loss"]), step)
        self.writer.add_scalar("loss/ema", loss_ema, step)
        self.writer.add_scalar("lr", float(row["lr"]), step)
        if floor is not None:
            value, se = (
                (floor, None) if isinstance(floor, (int, float)) else (floor.value, floor.standard_error)
            )
            self.writer.add_scalar("loss/floor", value, step)
            self.writer.add_scalar("loss/excess", loss_ema - value, step)
            if se is not None:
                self.writer.add_scalar("loss/excess_low", loss_ema - value - 2 * se, step)
                self.writer.add_scalar("loss/excess_high", loss_ema - value + 2 * se, step)
        self.writer.flush()

    @torch.no_grad()
    def samples(
        self,
        step: int,
        model: nn.Module,
        path: GaussianPath,
        prediction: str,
        data_shape: tuple[int, ...],
        decode: Any,
        num_classes: int | None,
        seed: int,
        device: torch.device,
    ) -> None:
        """A grid (images) or scatter plot (2D points) of the model's samples; other shapes are skipped."""
        from .samplers import sample

        image = len(data_shape) == 3 and data_shape[0] in (1, 3)
        if not image and tuple(data_shape) != (2,):
            return
        n = GRID_SIZE * GRID_SIZE if image else 1000
        labels = None
        if num_classes is not None:  # rows of classes 0, 1, ... (images); every class in turn (points)
            per_row = GRID_SIZE if image else 1
            labels = (torch.arange(n, device=device) // per_row) % min(num_classes, GRID_SIZE if image else n)
        generator = torch.Generator(device=device).manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            x = sample(
                model, path, n, prediction=prediction, sampler="euler", steps=GRID_STEPS, shape=data_shape,
                generator=generator, device=device, y=labels,
            )  # fmt: skip
        finally:
            model.train(was_training)
        if image:
            self.writer.add_image("samples", _grid(x.float().cpu()), step)
        else:
            figure = _scatter(decode(x.float().cpu()), None if labels is None else labels.cpu())
            if figure is not None:
                self.writer.add_figure("samples", figure, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _grid(x: torch.Tensor) -> torch.Tensor:
    """``(n, C, H, W)`` images in the model's space (the image normalizer maps data to [-1, 1]) to one
    ``(C, rows * H, cols * W)`` grid in [0, 1]."""
    n, c, h, w = x.shape
    cols = GRID_SIZE
    rows = math.ceil(n / cols)
    canvas = torch.zeros(rows * cols, c, h, w)
    canvas[:n] = ((x + 1) / 2).clamp(0, 1)
    return canvas.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def _scatter(points: torch.Tensor, labels: torch.Tensor | None) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(4, 4))
    colours = {} if labels is None else {"c": labels, "cmap": "tab10"}
    axes.scatter(points[:, 0], points[:, 1], s=2, **colours)
    axes.set_aspect("equal")
    figure.tight_layout()
    return figure
