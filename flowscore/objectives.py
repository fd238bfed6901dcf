r"""The training objective as one object: :class:`Objective`.

An objective is what a training step needs to know about the mathematics (the EDM pattern: the loss is a
small object, the loop knows nothing about noise levels). Given a model and a batch of data it draws
whatever randomness it needs (times, noise, a coupling, reference points), builds its regression target
and weighting, and returns the **per-sample** loss ``(B,)``; the trainer averages it, differentiates it and
steps the optimiser.

Your own objective is a subclass that implements :meth:`Objective.loss`; everything else has a default::

    class MyCFM(fs.Objective):
        def loss(self, model, x_data, y=None, generator=None):
            t = torch.rand(x_data.shape[0], generator=generator, device=x_data.device)
            noise = torch.randn(x_data.shape, generator=generator, device=x_data.device)
            tt = t.view(-1, *[1] * (x_data.dim() - 1))
            x = tt * x_data + (1 - tt) * noise
            out = model(x, t) if y is None else model(x, t, y)
            return (out - (x_data - noise)).flatten(1).pow(2).sum(1)

    fs.Trainer(fs.TrainConfig(steps=2000), "runs/mine", model=MyNet(), data=x, objective=MyCFM()).train()

The hooks, in the order the trainer calls them:

* :meth:`bind` once with the (encoded) training set, before anything else: objectives that need the whole
  data set (the exact marginal of fm/sm, reference targets) keep what they need;
* :meth:`wrap` the network into the model that is trained and sampled (preconditioning);
* :meth:`floor`: the lowest expected loss a perfect model reaches, or None with :attr:`floor_absent` saying
  why;
* :meth:`loss` every step (under ``torchrun`` each process gets its slice of the batch; built-in objectives
  instead draw on the whole batch with :meth:`draw` and score their slice with :meth:`per_sample`, so that
  1 and N processes train on the same pairs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .conditioning import Model


class Objective:
    """A training objective: ``loss(model, x_data, y, generator) -> (B,)`` per-sample losses.

    Attributes:
        name: how runs and messages call it (``"cfm"``, ``"dsm"``, ...; ``"custom"`` for your own).
        prediction: what a model trained on it returns (``"velocity"``, ``"score"``, ``"noise"`` or
            ``"data"``), read by :func:`flowscore.sample` to convert it.
        two_time: True for flow-map objectives, whose model is called as ``model(x, t, s[, y])`` and
            returns the average velocity from time ``t`` to time ``s``.
        floor_absent: why :meth:`floor` returns None (a sentence), shown next to the loss.
    """

    name: str = "custom"
    prediction: str = "velocity"
    two_time: bool = False
    floor_absent: str = "this objective does not define a loss floor"

    def loss(
        self,
        model: Model,
        x_data: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(B,)`` per-sample losses of ``model`` on the batch ``x_data`` ``(B, *dims)`` with labels ``y``
        ``(B,)`` (``-1``: no label; None without labels), drawing its randomness from ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(model, x_data, y, generator)")

    def bind(self, x_data: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Called once with the whole (encoded) training set ``(N, *dims)`` and its labels before training;
        the default keeps nothing."""

    def wrap(self, net: nn.Module) -> nn.Module:
        """The model trained and sampled for the network ``net``; the default is ``net`` itself."""
        return net

    def floor(self, x_data: torch.Tensor, labels: torch.Tensor | None = None, **options: Any) -> Any:
        """The loss floor on the training set (a :class:`flowscore.LossFloor`), or None (see
        :attr:`floor_absent`)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """What a run stores about the objective (JSON): its name and class; built-in objectives add their
        options so that they can be rebuilt."""
        return {"name": self.name, "class": type(self).__qualname__}


__all__ = ["Objective"]
