"""How flowscore calls a model: ``model(x, t)``, or ``model(x, t, y)`` when there are class labels.

Labels ``y`` are integer class indices shaped ``(B,)``; ``-1`` means "no label" (the unconditional branch of
classifier-free guidance). Every loss, sampler and likelihood calls the model through :func:`call_model`, so
the check of what a model returns lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _validate

Model = Callable[..., torch.Tensor]
"""``model(x, t) -> (B, *dims)`` or ``model(x, t, y) -> (B, *dims)``."""


check_labels = _validate.labels
"""The check of a batch's labels (``flowscore._validate.labels``): integer ``(B,)``, values >= -1."""


def call_model(model: Model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``model(x, t)`` (or ``model(x, t, y)`` when ``y`` is given), checked to be a tensor shaped like ``x``.

    ``x``: ``(B, *dims)``; ``t``: ``(B,)``; ``y``: ``(B,)`` integer labels or None. A wrong shape (which
    would broadcast silently) raises ``ValueError``; so does NaN or Inf while value checks are on.
    """
    if not callable(model):
        raise ValueError(
            f"model must be callable as model(x, t) or model(x, t, y), got {type(model).__name__}"
        )
    out = model(x, t) if y is None else model(x, t, y)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        call = "model(x, t)" if y is None else "model(x, t, y)"
        raise ValueError(f"{call} must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    return _validate.finite(out, "the model's output")


def guided_model(model: Model, y: torch.Tensor | None, guidance: float = 0.0) -> Callable:
    """The unconditional-looking model ``(x, t) -> prediction`` of ``model`` with the labels ``y`` fixed.

    With ``guidance`` w != 0 it is classifier-free guidance, ``(1 + w) f(x, t, y) - w f(x, t, -1)``, computed
    in ONE batched model call on ``[x, x]`` with labels ``[y, -1]``. Every conversion between velocity, score,
    noise and data is affine in the prediction with the same coefficient on ``x``, so guiding any one of them
    gives the same guided field in every space. ``y`` is ``(B,)`` integer labels (-1: no label), or None for
    an unconditional model (then ``guidance`` must be 0).
    """
    w = _validate.number(guidance, "guidance")
    if y is None:
        if w != 0:
            raise ValueError(
                "guidance needs class labels y (classifier-free guidance mixes f(x, t, y) and f(x, t, -1))"
            )
        return lambda x, t: call_model(model, x, t)

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = check_labels(y, x.shape[0])
        if w == 0:
            return call_model(model, x, t, labels)
        both = call_model(
            model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, -1)])
        )
        conditional, unconditional = both.chunk(2)
        return (1 + w) * conditional - w * unconditional

    return field


def drop_labels(y: torch.Tensor, p_uncond: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes ``-1`` with probability ``p_uncond``.

    ``y``: ``(B,)`` integer labels; returns a new tensor, ``y`` is left as it is. One uniform per label is
    drawn from ``generator`` (on ``y``'s device) whenever ``p_uncond > 0``, so a trainer that draws it from
    its run generator resumes bit-identically. Training on the dropped labels teaches one network both
    ``f(x, t, y)`` and the unconditional ``f(x, t, -1)`` that :func:`guided_model` combines.
    """
    p = _validate.number(p_uncond, "p_uncond", 0.0, 1.0)
    if isinstance(y, torch.Tensor) and y.dim() != 1:
        raise ValueError(f"y must be a 1-D tensor of class labels (B,), got shape {tuple(y.shape)}")
    y = check_labels(y, len(y) if isinstance(y, torch.Tensor) else 0)
    if p == 0:
        return y.clone()
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, -1), y)
