"""Training: :class:`Trainer` (AdamW, warm-up, EMA, checkpoints, exact resume, torchrun DDP) and its loop.

The run folder it writes (and :func:`load_run`) is described in :mod:`flowscore.runs`; the settings in
:mod:`flowscore.config` (both re-exported here).

The loop knows nothing about noise levels: the :class:`~flowscore.objectives.Objective` (the built-in one
of ``config.objective``, or your own ``objective=``) draws a batch's times, noise, coupling and references,
wraps the network (preconditioning) and returns the per-sample loss; the loop averages it and steps AdamW.

Each step draws its randomness (batch indices, label dropout, then the objective's draws) from one
``torch.Generator`` seeded by ``seed`` whose state is in the checkpoint, so ``train(resume=True)`` after a
crash ends with weights bit-identical (on the CPU) to an uninterrupted run. Under ``torchrun`` every rank
draws the same global batch; a built-in objective draws on the whole of it and each rank trains on its
slice, so with DDP averaging the gradients the update equals the one-process update. Your own objective
gets its rank's slice and a generator of that rank's own.

Bring your own: ``Trainer(config, run_dir, model=MyNet(), data=...)`` trains any ``nn.Module`` called as
``model(x, t)`` (or ``model(x, t, y)`` with labels) on a tensor, a pair ``(x, y)``, a ``Dataset`` (read into
memory, then handled like a named data set) or a ``DataLoader`` (streamed, see
:mod:`flowscore.sources`). With class labels each training label is replaced by -1 with probability
``p_uncond`` (classifier-free guidance); the built-in models get a class embedding.

Nothing is lost: every input is checked and the memory a step needs is estimated before the run folder is
touched; once a checkpoint exists nothing removes the folder. A failure (a full disk, a diverging loss, any
exception) raises :class:`TrainingFailed`, whose message names the cause and the checkpoint kept, which
``resume`` continues. A failure before the first checkpoint removes only the files this process wrote.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import gc
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _validate, checkpoint, resources, runs, sources
from . import data as datasets
from .conditioning import call_model, drop_labels
from .config import (  # noqa: F401  (re-exported: flowscore.training.TrainConfig and its defaults)
    FLOW_MAPS,
    IMAGE_DEFAULTS,
    RESUMABLE_CHANGES,
    VECTOR_DEFAULTS,
    TrainConfig,
    resolve_device,
)
from .floor import LossFloor
from .models import CUSTOM, check_description, describe, model_config, model_from_config
from .objectives import BUILTIN, Objective, QualityWarning, objective_from_config
from .paths import GaussianPath, get_path
from .resources import TRAINING_PASSES, step_memory  # noqa: F401  (re-exported)
from .runs import (  # noqa: F401  (re-exported: the run folder format)
    CHECKPOINT_FILE,
    LOG_FIELDS,
    LOG_FILE,
    RUN_FILE,
    Run,
    RunInUse,
    load_run,
)
from .tblog import FOLDER as TENSORBOARD_FOLDER

LOSS_EMA_DECAY = 0.99
FLOOR_MAX_SIZE = 1_000_000
"""The loss floor is computed when (training points) x (dims per point) is at most this."""
FLOOR_WORK = 4e8
"""Monte Carlo draws of the floor: ``clamp(FLOOR_WORK / (N * D), 2000, 20000)`` (cost ~ draws x N x D)."""


class TrainingFailed(RuntimeError):
    """Training stopped after it started writing: the message names the cause and what was kept."""


class _Diverged(Exception):
    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step} (loss {loss:.4g})")
        self.step, self.loss = step, loss


# -- learning rate and EMA ---------------------------------------------------------------------------------
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


# -- distributed -------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over ranks (a copy; ``value`` itself on a single process)."""
        if self.world == 1:
            return value
        out = value.clone()
        torch.distributed.all_reduce(out)
        return out / self.world

    def first_flagged(self, step: torch.Tensor) -> int:
        """The smallest non-negative ``step`` over ranks (each rank's value is -1 when unset), or -1."""
        if self.world == 1:
            return int(step)
        unset = torch.iinfo(torch.long).max
        out = torch.where(step >= 0, step, unset)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MIN)
        return -1 if int(out) == unset else int(out)


def _init_distributed(device: torch.device) -> _Dist:
    """Joins the torchrun process group (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    dist = torch.distributed
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


# -- the prepared run --------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    train: torch.Tensor  # encoded training data on the device (for a DataLoader: its first batch)
    held_out: torch.Tensor  # data space, CPU
    normalizer: datasets.Normalizer
    path: GaussianPath
    model: nn.Module
    data_sha256: str
    threads: int
    labels: torch.Tensor | None = None  # training labels on the device (a DataLoader: its first batch's)
    held_out_labels: torch.Tensor | None = None  # CPU
    num_classes: int | None = None
    class_counts: list[int] | None = None  # training points per class
    stream: sources.LoaderStream | None = None
    n_train: int = 0
    objective: Objective = dataclasses.field(default_factory=Objective)

    @property
    def description(self) -> dict[str, Any]:
        return describe(self.model)

    def label_info(self) -> dict[str, Any] | None:
        """What the run file stores about the labels, or None for an unlabelled run."""
        if self.labels is None:
            return None
        return {"num_classes": self.num_classes, "class_counts": self.class_counts}


def _prepare(
    config: TrainConfig,
    device: torch.device,
    world: int = 1,
    model: nn.Module | None = None,
    data: object = None,
    objective: Objective | None = None,
) -> _Prepared:
    """Loads and checks everything the run needs (raises ``ValueError`` before any file is written)."""
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if model is not None and (config.model != "auto" or config.width is not None or config.depth is not None):
        raise ValueError(
            "model= is given, so config.model, width and depth have no say: leave them at auto / none"
        )
    path = get_path(config.path, **config.path_options)
    _check_objective(config, objective, path)
    _check_options(config, device)
    raw, labels, stream = sources.read_data(config, data)
    shape = tuple(raw.shape[1:])
    if stream is None:
        n_holdout = min(2000, raw.shape[0] // 10) if config.n_holdout is None else config.n_holdout
        train, held_out = datasets.split(raw, n_holdout, seed=config.seed)
        normalizer = datasets.Normalizer.fit(train, std=config.data_std)
        sha = sources.checksum(raw, labels)
    else:  # streamed: used as it comes
        train, held_out = raw, raw[:0].clone()
        normalizer = datasets.Normalizer(torch.zeros(1), torch.ones(1))
        sha = ""
    num_classes = counts = train_labels = held_labels = None
    if labels is not None:
        if stream is None:
            num_classes = datasets.num_classes(labels)
            train_labels, held_labels = datasets.split(labels, held_out.shape[0], seed=config.seed)
            counts = torch.bincount(train_labels, minlength=num_classes).tolist()
        else:
            num_classes, train_labels, held_labels = sources.loader_classes(stream, model), labels, labels[:0]
            if num_classes is None and model is None:
                raise ValueError(
                    "a DataLoader with labels and the built-in model: the number of classes is unknown; give "
                    "the dataset a `classes` attribute, or pass model=MLP(dim, num_classes=K) (or UNet)"
                )
    batch = config.batch_size // world if stream is None else train.shape[0]
    on_device = train.numel() * 4 if device.type != "cpu" and stream is None else 0
    if model is None:
        kind = config.model if config.model != "auto" else ("unet" if datasets.is_image(shape) else "mlp")
        opts = {"width": config.width, "depth": config.depth}
        if kind == "unet":
            opts = {"base": config.width, "levels": config.depth}
        two_time = objective.two_time if objective is not None else config.objective in FLOW_MAPS
        model_cfg = model_config(kind, shape, num_classes=num_classes, two_time=two_time or None, **opts)
        needed = step_memory(model_cfg, shape, batch) + on_device
    else:
        model_cfg = describe(model)
        needed = 4.0 * 5 * model_cfg["parameters"] + on_device
    resources.check_memory(
        needed, device, f"training with batch_size {config.batch_size} and this model",
        "pass a smaller --batch-size (or --width/--depth)",
    )  # fmt: skip
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = model_from_config(model_cfg)
        threads = resources.threads_for(config.threads, model_cfg, shape, batch, TRAINING_PASSES)
    else:
        flops = 2.0 * model_cfg["parameters"] * batch * TRAINING_PASSES  # a dense layer: 2 flops per weight
        threads = config.threads or resources.choose_threads(flops)
    prepared = _Prepared(
        normalizer.encode(train).to(device), held_out, normalizer, path, model.to(device), sha, threads,
        labels=None if train_labels is None else train_labels.to(device), held_out_labels=held_labels,
        num_classes=num_classes, class_counts=counts, stream=stream,
        n_train=train.shape[0] if stream is None else sources.loader_size(stream),
        objective=objective_from_config(config, path, model) if objective is None else objective,
    )  # fmt: skip
    _bind(prepared)
    _dry_run(config, prepared)
    return prepared


OBJECTIVE_FIELDS = ("objective", "prediction", "weighting", "time_sampler", "t_eps", "coupling",
                    "coupling_reg", "reference_size")  # fmt: skip
"""Config fields that describe the built-in objective: left at their defaults when ``objective=`` is given."""


def _check_objective(config: TrainConfig, objective: Objective | None, path: GaussianPath) -> None:
    """An ``objective=`` given to the Trainer is an :class:`Objective`, the config's objective fields are left
    at their defaults, and a built-in one lives on the config's path."""
    if objective is None:
        return
    if not isinstance(objective, Objective):
        raise ValueError(
            f"objective must be a flowscore.Objective (a subclass implementing loss(model, x_data, y, "
            f"generator)), got {type(objective).__name__}"
        )
    from .config import field_default

    changed = [name for name in OBJECTIVE_FIELDS if getattr(config, name) != field_default(name)]
    if changed:
        raise ValueError(
            f"objective= is given, so config.{', '.join(changed)} have no say: leave them at their defaults"
        )
    own_path = getattr(objective, "path", None)
    if isinstance(own_path, GaussianPath) and own_path.config() != path.config():
        raise ValueError(
            f"the objective is on the path {own_path.config()} but config.path is {path.config()}: the run "
            "is sampled on config.path; give both the same path"
        )


def _bind(prepared: _Prepared) -> None:
    """Hands the (encoded) training set to the objective (:meth:`Objective.bind`); refuses an objective that
    needs the whole data set when a DataLoader streams it."""
    objective = prepared.objective
    if prepared.stream is None:
        objective.bind(prepared.train, prepared.labels)
    elif objective.needs_data:
        raise ValueError(
            f"objective {objective.name} needs the whole training set (the exact marginal of fm/sm, or the "
            "pool of reference_size points), which a DataLoader does not give; use cfm or dsm without "
            "reference targets, or pass the data as tensors"
        )


def _check_options(config: TrainConfig, device: torch.device) -> None:
    """``precision="bf16"`` needs CUDA; ``tensorboard`` needs its package (checked before anything is
    written)."""
    if config.precision == "bf16" and device.type != "cuda":
        raise ValueError(
            f"precision bf16 autocasts the model to bfloat16 on CUDA; on {device.type} it would not speed up "
            "training (no bf16 matrix units) and costs accuracy: use precision fp32, or device cuda"
        )
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError(
                "tensorboard logging needs the tensorboard package: pip install tensorboard (or drop "
                "--tensorboard)"
            ) from None


def _dry_run(config: TrainConfig, prepared: _Prepared) -> None:
    """One loss evaluation on two points (eval mode, no gradient, a generator of its own), to reject a bad
    model, or a bad objective/prediction/weighting combination, before anything is written; with label
    dropout also one call of the model on the label -1 ("no label") that the dropout feeds it."""
    x_data = prepared.train[:2]
    y = None if prepared.labels is None else prepared.labels[:2]
    objective = prepared.objective
    was_training = prepared.model.training
    model = objective.wrap(prepared.model).eval()
    call = "model(x, t)" if y is None else "model(x, t, y) with integer labels y"
    try:
        with torch.no_grad(), _autocast(config, x_data.device):
            try:
                generator = torch.Generator(x_data.device).manual_seed(0)
                per_sample = objective.per_sample(model, objective.draw(x_data, y, generator), generator)
            except (TypeError, RuntimeError, IndexError) as err:
                raise ValueError(
                    f"the model failed on a batch of 2 points ({type(err).__name__}: "
                    f"{' '.join(str(err).split())}); it is called as {call} and must return a tensor shaped "
                    "like x"
                ) from None
            if y is not None and config.p_uncond > 0:
                _check_no_label(model, x_data, config.p_uncond)
    finally:
        prepared.model.train(was_training)
    if not isinstance(per_sample, torch.Tensor) or tuple(per_sample.shape) != (x_data.shape[0],):
        got = tuple(per_sample.shape) if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
        raise ValueError(
            f"the objective {type(objective).__name__} must return the per-sample losses shaped (B,) = "
            f"({x_data.shape[0]},), got {got}"
        )
    loss = per_sample.mean()
    if not bool(torch.isfinite(loss)):
        raise ValueError(
            f"the {objective.name} loss is not finite on a batch of 2 points with this configuration"
        )


def _check_no_label(model: nn.Module, x_data: torch.Tensor, p_uncond: float) -> None:
    """Calls ``model(x, t, y)`` once with ``y = -1``: label dropout feeds it that label."""
    t = torch.full((x_data.shape[0],), 0.5, dtype=x_data.dtype, device=x_data.device)
    no_label = torch.full((x_data.shape[0],), -1, dtype=torch.long, device=x_data.device)
    try:
        call_model(model, x_data, t, no_label)
    except (TypeError, RuntimeError, IndexError, ValueError) as err:
        raise ValueError(
            f"the model failed on the label -1 ({type(err).__name__}: {' '.join(str(err).split())[:200]}): "
            f'label dropout (p_uncond = {p_uncond:g}) replaces labels by -1, "no label", so the model must '
            'accept it: give its embedding an extra "no label" row and map -1 to it (e.g. '
            "nn.Embedding(K + 1, d) indexed by torch.where(y < 0, K, y)), or set p_uncond=0"
        ) from None


def _autocast(config: TrainConfig, device: torch.device) -> Any:
    """bfloat16 autocast on CUDA for ``precision="bf16"``, else a no-op context."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.precision == "bf16" and
                          device.type == "cuda")  # fmt: skip


def _loss_floor(
    config: TrainConfig, prepared: _Prepared, progress: bool
) -> tuple[LossFloor | None, str | None]:
    """``(floor, None)``: the floor of the objective trained, on the (encoded) training data (with labels:
    of label dropout, :meth:`LossFloor.label_dropout`), or ``(None, why it is absent)``."""
    train = prepared.train
    if not config.loss_floor:
        return None, "not computed (loss_floor=False)"
    if prepared.stream is not None:
        return None, "the data come from a DataLoader, and the floor needs the whole data set"
    if train.numel() > FLOOR_MAX_SIZE:
        return None, (
            f"the training set is too large for its exact marginal ({train.shape[0]} points x "
            f"{train[0].numel()} dims > {FLOOR_MAX_SIZE})"
        )
    objective = prepared.objective
    if objective.floor_absent is not None:
        return None, objective.floor_absent
    n_samples = int(min(20_000, max(2_000, FLOOR_WORK / train.numel())))
    labels = None if prepared.labels is None else prepared.labels.cpu()
    floor = objective.floor(
        train.cpu(),
        labels,
        p_uncond=config.p_uncond,
        n_samples=n_samples,
        seed=config.seed,
        progress=progress,
    )
    return (floor, None) if floor is not None else (None, objective.floor_absent or "no floor")


# -- the trainer -------------------------------------------------------------------------------------------
class Trainer:
    """Trains ``config`` into ``run_dir``: AdamW, linear LR warm-up (+ cosine), grad clipping, EMA.

    ``Trainer(config, run_dir).train()`` starts a run: every input is checked (and the data loaded) before
    ``run_dir`` is created, and a non-empty ``run_dir`` is refused. ``train(resume=True)`` continues from
    ``run_dir``'s checkpoint (or starts afresh when there is none); ``config`` may then be None (the stored
    one is used) and only ``RESUMABLE_CHANGES`` fields may differ from the stored config. A run folder that
    another process is writing is refused (:class:`flowscore.runs.RunInUse`, a ``ValueError``).

    ``model``: any ``nn.Module`` called as ``model(x, t)``, or ``model(x, t, y)`` when the data has labels
    (None: the built-in MLP or UNet of ``config.model``); it is trained in place, and the run stores only
    its weights (``load_run(run_dir, model=...)`` loads them back into a module you build). ``data``: a
    tensor ``(N, *dims)``, a pair ``(x, y)`` with integer labels ``0..K-1``, a map-style ``Dataset`` of
    ``x`` or ``(x, y)`` items, or a ``DataLoader`` (None: ``config.data``, which must then be empty when
    ``data`` is given). Resuming such a run takes the same ``model`` and ``data`` again (tensors and
    Datasets are checked against the run's checksum; a DataLoader's position is restored as
    :mod:`flowscore.sources` describes).

    ``objective``: the training objective (:class:`flowscore.Objective`; None: the built-in one of
    ``config.objective``, whose fields then describe it). Your own objective trains with everything the
    built-in ones get; the run stores its :meth:`~flowscore.Objective.to_dict`, never its code, so resuming
    takes it again, and ``load_run(run_dir, model=...)`` reads its prediction from the run.

    Failures after the run started raise :class:`TrainingFailed` (see the module docstring).
    """

    def __init__(
        self,
        config: TrainConfig | dict[str, Any] | None,
        run_dir: str | Path,
        *,
        model: nn.Module | None = None,
        data: object = None,
        progress: bool = True,
        objective: Objective | None = None,
    ):
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        if config is not None and not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, a dict or None, got {type(config).__name__}")
        if config is not None:
            config.validate()
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch nn.Module, got {type(model).__name__}")
        self.config = config
        self.run_dir = Path(run_dir)
        self.model = model
        self.data = data
        self.progress = progress
        self.objective = objective

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        *,
        steps: int | None = None,
        model: nn.Module | None = None,
        data: object = None,
        progress: bool = True,
        objective: Objective | None = None,
    ) -> Trainer:
        """A trainer that continues ``run_dir`` with its stored config (``steps``: a new total); a run trained
        on your own model, data or objective takes them again."""
        config = runs.stored_config(Path(run_dir))
        if steps is not None:
            config = dataclasses.replace(config, steps=steps)
        return cls(config, run_dir, model=model, data=data, progress=progress, objective=objective)

    # -- set-up ------------------------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool) -> None:
        """Refuses a run_dir that is a file, or a non-empty one without ``resume`` (reads only)."""
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise ValueError(f"run_dir {str(d)!r} exists and is not a directory; choose another run_dir")
        odd = [n for n in runs.RUN_FILES if os.path.islink(d / n) or os.path.lexists(d / n)
               and not os.path.isfile(d / n)]  # fmt: skip
        if resume and odd:
            raise ValueError(
                f"{', '.join(odd)} in {str(d)!r} is not a regular file; move it away (a run folder holds "
                "only its own files)"
            )
        if not resume and d.is_dir() and not runs.holds_nothing(d):
            raise ValueError(
                f"run_dir {str(d)!r} is not empty; pass resume=True to continue it or pick a new one"
            )

    def _restore(self, resume: bool) -> tuple[runs.RunFile, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The run file and checkpoint to continue from (checked: :func:`flowscore.runs.read_resume_state`),
        or None when there is no checkpoint; refuses a changed config."""
        d = self.run_dir
        if not resume or not os.path.lexists(d / CHECKPOINT_FILE):
            return None
        stored = runs.stored_config(d)
        changed = [k for k, v in self.config.to_dict().items() if stored.to_dict()[k] != v]
        bad = [k for k in changed if k not in RESUMABLE_CHANGES]
        if bad:
            raise ValueError(
                f"cannot resume {str(d)!r} with a different {', '.join(bad)}; only "
                f"{', '.join(RESUMABLE_CHANGES)} may change (or start a new run)"
            )
        return runs.read_resume_state(d)

    # -- the run -----------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict[str, Any]:
        """Runs (or continues) training to ``config.steps``; returns its step, loss EMA and loss floor."""
        if self.config is None:
            if not resume:
                raise ValueError(
                    "config is None: pass a TrainConfig, or resume=True to continue a stored run"
                )
            self.config = runs.stored_config(self.run_dir)
        config = self.config
        self._check_run_dir(resume)
        device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        dist = _init_distributed(device)
        try:
            if config.batch_size % dist.world:
                raise ValueError(
                    f"batch_size {config.batch_size} must be divisible by the {dist.world} processes"
                )
            prepared = _prepare(config, device, dist.world, self.model, self.data, self.objective)
            warning = prepared.objective.quality_warning(prepared.model)
            if warning and dist.main and not resume:
                warnings.warn(warning, QualityWarning, stacklevel=2)
            with resources.using_threads(prepared.threads):
                result = self._run(config, prepared, device, dist, resume)
            dist.barrier()  # no rank tears the group down while another still talks to it
            return result
        finally:
            if dist.owns_group:
                gc.collect()  # free DDP's reducer (held in reference cycles) while gloo is still up
                torch.distributed.destroy_process_group()

    def _run(
        self, config: TrainConfig, prepared: _Prepared, device: torch.device, dist: _Dist, resume: bool
    ) -> dict[str, Any]:
        lock = runs.RunLock(self.run_dir)
        created = False
        if dist.main:
            created = _make_dir(self.run_dir)
            lock.acquire()  # refused: nothing is removed (the folder is another writer's now)
        loop: _Loop | None = None
        started = False
        try:
            if dist.main:
                self._check_run_dir(resume)  # again, now that this process holds the folder
            dist.barrier()
            restored = self._restore(resume)
            if restored is not None:
                run_file, *restored = restored
                if run_file.data_sha256 != prepared.data_sha256:
                    raise ValueError(
                        f"the data of {str(self.run_dir)!r} changed since the run started; start a new run"
                    )
                run_state = checkpoint.read_state(self.run_dir / RUN_FILE)
                _check_same_model(self.run_dir, run_state.get("model"), prepared.description)
                _check_same_objective(self.run_dir, run_state.get("objective"), prepared.objective)
                _check_same_split(self.run_dir, run_file, prepared)
                floor, absent = _stored_floor(run_state)
            else:
                floor, absent = None, None
                if dist.main:
                    floor, absent = _loss_floor(config, prepared, self.progress)
            loop = _Loop(config, prepared, device, dist, self.run_dir, floor, absent)
            if restored is not None:
                loop.load(*restored)
            if dist.main:
                runs.remove_temporaries(self.run_dir)
                started = True
                if restored is None:
                    loop.phase = f"writing {RUN_FILE}"
                    runs.write_run_file(
                        self.run_dir, config=config, model=prepared.model, path=prepared.path,
                        held_out=prepared.held_out, normalizer=prepared.normalizer,
                        n_train=prepared.n_train, data_sha256=prepared.data_sha256,
                        loss_floor=None if floor is None else floor.to_dict(), loss_floor_absent=absent,
                        objective=prepared.objective.to_dict(), labels=prepared.label_info(),
                        held_out_labels=prepared.held_out_labels,
                    )  # fmt: skip
            dist.barrier()
            return loop.run(self.progress)
        except BaseException as err:
            if dist.main:
                self._fail(err, loop, created, started)
            raise
        finally:
            lock.release()

    def _fail(self, err: BaseException, loop: _Loop | None, created: bool, started: bool) -> None:
        """After a failure: removes this process's own files when no checkpoint exists, and re-raises the
        failure of a started run as :class:`TrainingFailed` naming the cause and the checkpoint kept (input
        errors and Ctrl-C propagate as they are)."""
        kept = runs.checkpoint_step(self.run_dir)
        if kept is None and (started or created):
            _remove_own_files(self.run_dir, created, written=started)
        if not started or isinstance(err, KeyboardInterrupt):
            return
        if isinstance(err, _Diverged):
            what = str(err)
            fix = f"lower --lr (now {self.config.lr:g}) or set --grad-clip, and start a new run"
        else:
            if isinstance(err, OSError) and err.errno:
                cause = os.strerror(err.errno).lower()
            else:
                cause = f"{type(err).__name__}: {' '.join(str(err).split())}"
            what = f"{cause} while {loop.phase if loop is not None else 'starting'}"
            fix = f"fix that, then continue it (`flowscore train --out {self.run_dir} --resume`)"
            if kept is None:
                fix = "fix that and train again"
        if kept is None:
            raise TrainingFailed(
                f"{what}; no checkpoint had been written, so the run was removed; {fix}"
            ) from err
        raise TrainingFailed(f"{what}; the checkpoint of step {kept} is kept; {fix}") from err


def _check_same_model(run_dir: Path, stored: object, given: dict[str, Any]) -> None:
    """``ValueError`` when a resumed run is given another model than the one it was trained with."""
    try:
        stored = check_description(stored)  # fills options a run stored before they existed
    except ValueError:
        pass
    if stored == given:
        return
    if isinstance(stored, dict) and stored.get("kind") == CUSTOM and given.get("kind") != CUSTOM:
        raise ValueError(
            f"run {str(run_dir)!r} was trained with your own model ({stored.get('class')}, "
            f"{stored.get('parameters')} weights); pass it again: Trainer(..., model=...)"
        )
    raise ValueError(
        f"run {str(run_dir)!r} was trained with the model {stored}, not {given}; pass the same model to "
        "resume"
    )


def _check_same_split(run_dir: Path, run_file: runs.RunFile, prepared: _Prepared) -> None:
    """``ValueError`` when what the run file stores about the data (training points, held-out points and
    labels, normalizer, classes) is not what the same data gives again: the file was altered."""
    if prepared.stream is not None:
        return
    stored = (run_file.n_train, run_file.held_out, run_file.normalizer.state_dict(), run_file.labels,
              run_file.held_out_labels)  # fmt: skip
    given = (prepared.n_train, prepared.held_out, prepared.normalizer.state_dict(), prepared.label_info(),
             prepared.held_out_labels)  # fmt: skip
    if not _same(stored, given):
        raise ValueError(
            f"{RUN_FILE} of {str(run_dir)!r} does not match its data (its training or held-out points, "
            "normalizer or labels were altered); restore a good copy of the run folder, or start a new run"
        )


def _same(a: object, b: object) -> bool:
    """Equality of nested tuples, dicts, lists and tensors (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
        )  # fmt: skip
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _make_dir(run_dir: Path) -> bool:
    """Creates ``run_dir`` (and its parents); True if this call created it (atomic: one process wins).
    A folder that cannot be created (no permission, a read-only disk, a link loop) is a ``ValueError``."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir()
    except FileExistsError:
        if not run_dir.is_dir():
            raise ValueError(
                f"run_dir {str(run_dir)!r} exists and is not a directory; choose another"
            ) from None
        return False
    except OSError as err:
        cause = os.strerror(err.errno).lower() if err.errno else str(err)
        raise ValueError(f"run_dir {str(run_dir)!r} cannot be created ({cause}); choose another") from None
    return True


def _remove_own_files(run_dir: Path, created: bool, written: bool = True) -> None:
    """After a failure before the first checkpoint, while holding the lock: deletes what this process
    wrote, never another process's files. ``written``: this process started writing the run's files
    (which it does only into a folder that held nothing but a lock and temporaries, checked under the
    lock), so every run file there is its own; otherwise it wrote only its lock. The folder itself goes
    too when this process created it and nothing else is in it."""
    if written:
        runs.remove_temporaries(run_dir)
        shutil.rmtree(run_dir / TENSORBOARD_FOLDER, ignore_errors=True)
        for name in runs.RUN_FILES:
            if name != runs.LOCK_FILE:
                with contextlib.suppress(FileNotFoundError):
                    (run_dir / name).unlink()
    with contextlib.suppress(OSError):
        if written or (created and [p.name for p in run_dir.iterdir()] == [runs.LOCK_FILE]):
            (run_dir / runs.LOCK_FILE).unlink()  # a later writer that opened it re-opens (RunLock.acquire)
    if created:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when empty


class _Loop:
    """The training state (model, EMA, optimizer, generator, loss statistics) and the step loop."""

    def __init__(
        self,
        config: TrainConfig,
        prepared: _Prepared,
        device: torch.device,
        dist: _Dist,
        run_dir: Path,
        floor: LossFloor | None,
        floor_absent: str | None = None,
    ):
        self.config, self.prepared, self.device, self.dist, self.run_dir = (
            config,
            prepared,
            device,
            dist,
            run_dir,
        )
        self.floor, self.floor_absent = floor, floor_absent
        self.floor_value = None if floor is None else floor.value
        self.objective = prepared.objective
        self.model = prepared.model
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.net: nn.Module = self.model
        if dist.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if config.compile:
            self.net = torch.compile(self.net)
        self.net = self.objective.wrap(self.net)
        self.ema_model = self.objective.wrap(self.ema)
        self.stream = prepared.stream
        self.tensorboard: Any = None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.step = 0
        self.resumed: dict[str, Any] | None = None  # the schedule's continuation (resumed_schedule)
        self.window_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.window_count = 0
        self.loss_ema: torch.Tensor | None = None
        # the first step whose loss was not finite (-1: none yet) and that loss, kept on the device
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.phase = "starting"

    # -- state -------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self.window_sum = self.dist.mean(self.window_sum)
        if self.loss_ema is not None:
            self.loss_ema = self.dist.mean(self.loss_ema)
        optim_tensors, optim_meta = checkpoint.optimizer_to_flat(self.optimizer.state_dict())
        tensors = {
            **checkpoint.prefixed("model", self.model.state_dict()),
            **checkpoint.prefixed("ema", self.ema.state_dict()),
            **checkpoint.prefixed("optim", optim_tensors),
            "rng.generator": self.generator.get_state(),
            "rng.torch": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "format": 1, "step": self.step, "config": self.config.to_dict(), "model": describe(self.model),
            "optimizer": optim_meta, "window_sum": self.window_sum.item(), "window_count": self.window_count,
            "loss_ema": None if self.loss_ema is None else self.loss_ema.item(), "lr_resumed": self.resumed,
        }  # fmt: skip
        if self.stream is not None:
            loader_tensors, state["loader"] = self.stream.state()
            tensors.update(loader_tensors)
        return tensors, state

    def load(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(checkpoint.unprefixed("model", tensors))
            self.ema.load_state_dict(checkpoint.unprefixed("ema", tensors))
            optim = checkpoint.optimizer_from_flat(
                checkpoint.unprefixed("optim", tensors), state["optimizer"]
            )
            self.optimizer.load_state_dict(optim)
            self.generator.set_state(tensors["rng.generator"])
            if self.stream is not None:  # before torch's generator is restored: it replays the epoch
                self.stream.load(tensors, state["loader"])
            torch.set_rng_state(tensors["rng.torch"])
            if self.device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
            self.step = int(state["step"])
            self.window_sum.fill_(state["window_sum"])
            self.window_count = int(state["window_count"])
            if state["loss_ema"] is not None:
                self.loss_ema = torch.tensor(state["loss_ema"], dtype=torch.float64, device=self.device)
            resumed = _checked_resumed(state.get("lr_resumed"), self.step, self.config.lr)
            self.resumed, note = resumed_schedule(
                self.config, int(state["config"]["steps"]), self.step, resumed
            )
            if note is not None and self.dist.main:
                print(note, flush=True)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(
                f"checkpoint in {str(self.run_dir)!r} does not match this run ({type(err).__name__}: {err}); "
                "start a new run"
            ) from None

    def check_finite(self) -> None:
        """Raises :class:`_Diverged` if some loss so far was NaN or Inf (one device sync; a collective)."""
        step = self.dist.first_flagged(self.bad_step)
        if step >= 0:
            raise _Diverged(step, float(self.bad_loss) if int(self.bad_step) == step else math.nan)

    def save(self) -> None:
        self.check_finite()
        tensors, state = self.state()  # collective on every rank
        if self.dist.main:
            self.phase = f"writing the checkpoint of step {self.step}"
            checkpoint.save_checkpoint(self.run_dir / CHECKPOINT_FILE, tensors, state)

    # -- one update --------------------------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None, slice]:
        """The global batch ``(x_data, y, part)`` drawn from the run's generator (indices, then label
        dropout), and this rank's ``part`` of it. A DataLoader gives each rank its own batch, whole.

        With labels each label is replaced by -1 with probability ``p_uncond`` before the objective draws
        (so a coupling pairs within each label after the dropout, the dropped points among themselves)."""
        config, gen = self.config, self.generator
        labels, train = self.prepared.labels, self.prepared.train
        part = slice(None)
        if self.stream is None:
            idx = torch.randint(train.shape[0], (config.batch_size,), generator=gen, device=self.device)
            x_data, y = train[idx], None if labels is None else labels[idx]
            if self.dist.world > 1:
                share = config.batch_size // self.dist.world
                part = slice(self.dist.rank * share, (self.dist.rank + 1) * share)
        else:
            x_data, y = self.stream.next()
            x_data = x_data.to(self.device, torch.float32, non_blocking=True)
            y = None if labels is None or y is None else y.to(self.device, non_blocking=True)
        if y is not None and config.p_uncond > 0:
            y = drop_labels(y, config.p_uncond, gen)
        return x_data, y, part

    def rank_generator(self) -> torch.Generator:
        """A generator of this rank's own for an objective that draws on its slice (:meth:`Objective.loss`):
        seeded from the run's generator (one seed per rank, drawn by every rank, so the run's generator
        stays the same on all ranks and in the checkpoint)."""
        seeds = torch.randint(2**62, (self.dist.world,), generator=self.generator, device=self.device)
        return torch.Generator(self.device).manual_seed(int(seeds[self.dist.rank]))

    def update(self) -> torch.Tensor:
        config, objective = self.config, self.objective
        lr = learning_rate(config, self.step, self.resumed)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with _validate.validation(False):
            x_data, y, part = self.batch()
            if objective.draws_globally:  # on the global batch: 1 and N processes train on the same pairs
                batch, generator = objective.draw(x_data, y, self.generator)[part], None
            else:
                batch, generator = (
                    objective.draw(x_data[part], None if y is None else y[part]),
                    self.rank_generator(),
                )
        with _validate.validation(False), _autocast(config, self.device):
            loss = objective.per_sample(self.net, batch, generator).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        ema_update(self.ema, self.model, ema_decay_at(config.ema_decay, self.step))
        self.step += 1
        return loss.detach()

    def record(self, loss: torch.Tensor) -> None:
        loss = loss.double()
        first = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(first, self.step, self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.window_sum += loss
        self.window_count += 1
        if self.loss_ema is None:
            self.loss_ema = loss.clone()
        else:
            self.loss_ema.mul_(LOSS_EMA_DECAY).add_(loss, alpha=1 - LOSS_EMA_DECAY)

    def log_row(self, steps_per_s: float) -> dict[str, Any]:
        self.check_finite()
        window = self.dist.mean(self.window_sum).item() / max(self.window_count, 1)
        ema = self.dist.mean(self.loss_ema).item()
        self.window_sum.zero_()
        self.window_count = 0
        return {
            "step": self.step, "loss": f"{window:.6g}", "loss_ema": f"{ema:.6g}",
            "lr": f"{learning_rate(self.config, self.step - 1, self.resumed):.6g}",
            "steps_per_s": f"{steps_per_s:.4g}",
            "loss_floor": "" if self.floor_value is None else f"{self.floor_value:.6g}",
        }  # fmt: skip

    def log_samples(self) -> None:
        """A sample grid of the EMA model into the TensorBoard log (its own generator: see tblog)."""
        prepared = self.prepared
        self.tensorboard.samples(
            self.step, self.ema_model, prepared.path, self.objective.prediction,
            tuple(prepared.train.shape[1:]), prepared.normalizer.decode,
            prepared.num_classes if prepared.labels is not None else None, self.config.seed, self.device,
        )  # fmt: skip

    def run(self, progress: bool) -> dict[str, Any]:
        config, main = self.config, self.dist.main
        log_file = self.run_dir / LOG_FILE
        if main:
            self.phase = f"writing {LOG_FILE}"
            runs.truncate_log(log_file, self.step)
        bar = None
        if main and progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=self.step, desc="train", dynamic_ncols=True)
        handle = open(log_file, "a", newline="") if main else None  # noqa: SIM115
        writer = csv.DictWriter(handle, LOG_FIELDS, lineterminator="\n") if handle else None
        if main and config.tensorboard:
            from .tblog import TensorBoardLog

            self.phase = "opening the TensorBoard log"
            self.tensorboard = TensorBoardLog(self.run_dir, self.step)
        self.model.train()
        tick, tick_step = time.perf_counter(), self.step
        try:
            while self.step < config.steps:
                self.phase = f"training step {self.step + 1}"
                self.record(self.update())
                if bar is not None:
                    bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    now = time.perf_counter()
                    row = self.log_row((self.step - tick_step) / max(now - tick, 1e-9))
                    tick, tick_step = now, self.step
                    if writer is not None:
                        self.phase = f"writing {LOG_FILE}"
                        writer.writerow(row)
                        handle.flush()
                    if bar is not None:
                        bar.set_postfix(loss=row["loss_ema"], floor=self.floor_text())
                    if self.tensorboard is not None:
                        self.phase = "writing the TensorBoard log"
                        self.tensorboard.scalars(row, self.floor)
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save()
                    if self.tensorboard is not None:
                        self.phase = "writing TensorBoard samples"
                        self.log_samples()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            if bar is not None:
                bar.close()
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass
        ema = None if self.loss_ema is None else self.dist.mean(self.loss_ema).item()
        return {
            "step": self.step, "loss_ema": ema, "loss_floor": self.floor_value,
            "loss_floor_standard_error": None if self.floor is None else self.floor.standard_error,
            "loss_floor_absent": self.floor_absent,
        }  # fmt: skip

    def floor_text(self) -> str:
        """The floor with its standard error for the progress bar (``-`` when absent)."""
        if self.floor is None:
            return "-"
        return f"{self.floor.value:.4g}±{self.floor.standard_error:.2g}"


def _check_same_objective(run_dir: Path, stored: object, given: Objective) -> None:
    """``ValueError`` when a resumed run is given another objective than the one it was trained with (a run
    trained on your own objective needs it again). Runs stored before objectives were stored: not checked."""
    if not isinstance(stored, dict):
        return
    mine = given.to_dict()
    if stored.get("name") == mine["name"] and stored.get("class") == mine["class"]:
        return
    if stored.get("name") not in BUILTIN and mine["name"] in BUILTIN:
        raise ValueError(
            f"run {str(run_dir)!r} was trained with your own objective ({stored.get('class')}); pass it "
            "again: Trainer(..., objective=...)"
        )
    raise ValueError(
        f"run {str(run_dir)!r} was trained with the objective {stored.get('class')} ({stored.get('name')}), "
        f"not {mine['class']} ({mine['name']}); pass the same objective to resume"
    )


def _stored_floor(run_state: dict[str, Any]) -> tuple[LossFloor | None, str | None]:
    """The loss floor a run stored (and why it is absent), as when it started."""
    stored = run_state.get("loss_floor")
    floor = None if stored is None else LossFloor.from_dict(stored)
    absent = run_state.get("loss_floor_absent")
    return floor, absent if isinstance(absent, str) else None
