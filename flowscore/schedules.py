"""The learning-rate schedule (warm-up, constant or cosine, its continuation after a resume to a new total)
and the EMA of the weights, as the :class:`~flowscore.training.Trainer` applies them each update."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from . import _validate
from .config import TrainConfig


def learning_rate(config: TrainConfig, step: int, resumed: dict[str, Any] | None = None) -> float:
    """LR of the update that follows ``step`` completed updates (``step`` = 0, 1, ...).

    Warm-up: ``lr * (step + 1) / warmup`` for ``step < warmup``; then ``lr`` (constant) or
    ``lr * (1 + cos(pi * (step - warmup) / (steps - warmup))) / 2`` (cosine).

    ``resumed``: the cosine's continuation after a resume to a new total (:func:`resumed_schedule`), a
    dict ``{"step": r, "lr": lr_r, "restart": bool}``; from update ``r`` on, with ``k = step - r`` and
    ``T = config.steps``:

    * ``restart`` False (the run stopped before its total): the cosine re-fitted from the rate it had,
      ``lr_r * (1 + cos(pi * k / (T - r))) / 2``: no jump, 0 at the new total;
    * ``restart`` True (the run had reached its total, its rate decayed to ``lr_r`` ~ 0): a new cycle,
      a warm-up ``lr_r + (lr - lr_r) (k + 1) / warmup`` for ``k < warmup``, then
      ``lr * (1 + cos(pi * (k - warmup) / (T - r - warmup))) / 2``.
    """
    if resumed is not None and step >= resumed["step"]:
        return _resumed_rate(config, step - int(resumed["step"]), resumed)
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "constant" or config.steps <= config.warmup:
        return config.lr
    progress = (step - config.warmup) / (config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _resumed_rate(config: TrainConfig, k: int, resumed: dict[str, Any]) -> float:
    """:func:`learning_rate` ``k`` updates after the resume that started ``resumed``."""
    start, rate = int(resumed["step"]), float(resumed["lr"])
    if not resumed["restart"]:
        span = config.steps - start  # > 0: resumed_schedule makes one only for a step before the total
        return rate * 0.5 * (1 + math.cos(math.pi * min(k / max(span, 1), 1.0)))
    if k < config.warmup:
        return rate + (config.lr - rate) * (k + 1) / config.warmup
    span = config.steps - start - config.warmup  # > 0 whenever an update here has k >= warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * min((k - config.warmup) / max(span, 1), 1.0)))


def _checked_resumed(value: object, step: int, lr: float) -> dict[str, Any] | None:
    """A checkpoint's ``lr_resumed`` (see :func:`learning_rate`), or ``ValueError`` if it is damaged."""
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"step", "lr", "restart"}
            and isinstance(value["restart"], bool)):  # fmt: skip
        raise ValueError(f"lr_resumed must be {{'step', 'lr', 'restart'}}, got {value!r}")
    _validate.integer(value["step"], "lr_resumed step", minimum=0, maximum=step)
    _validate.number(value["lr"], "lr_resumed lr", low=0.0, high=lr)
    return value


def resumed_schedule(
    config: TrainConfig, previous_steps: int, step: int, resumed: dict[str, Any] | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """The schedule's continuation when a run stopped at ``step`` (of ``previous_steps``, the total it was
    scheduled for, with its own continuation ``resumed``) resumes to ``config.steps``; and the one line
    that says so (None when nothing changes).

    Nothing changes for a constant schedule, the same total, a resume within the warm-up (which does not
    depend on the total) or a total already reached. Otherwise the cosine is not recomputed for the new
    total (that would jump, e.g. from ~0 back to ``lr``): a run that stopped before its total continues
    its cosine from the rate it had, re-fitted to reach 0 at the new total; a run that had reached its
    total starts a new cycle (warm-up from its final rate to ``lr``, then a cosine to 0 at the new total).
    See :func:`learning_rate`.
    """
    if config.lr_schedule != "cosine" or config.steps == previous_steps or step >= config.steps:
        return resumed, None
    if resumed is None and step < config.warmup:
        return None, None
    rate = learning_rate(dataclasses.replace(config, steps=previous_steps), step, resumed)
    restart = step >= previous_steps
    new = {"step": step, "lr": rate, "restart": restart}
    if restart:
        how = (
            f"the run had reached its total of {previous_steps}, so a new cosine cycle starts: warm-up from "
            f"{rate:.3g} to {config.lr:g} over {config.warmup} steps, then down to 0 at step {config.steps}"
        )
    else:
        how = (
            f"the cosine continues from its rate {rate:.3g} at step {step}, re-fitted to reach 0 at step "
            f"{config.steps} (instead of {previous_steps})"
        )
    return new, f"note: resuming to a new total of {config.steps} steps: {how}"


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay used after update number ``step + 1``: ``min(decay, (1 + step) / (10 + step))``.

    The ramp lets the average forget the random initialisation quickly in short runs.
    """
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema_p <- decay * ema_p + (1 - decay) * p`` for every parameter (buffers are copied)."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)
