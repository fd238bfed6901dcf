"""Training: :class:`TrainConfig`, :class:`Trainer` (checkpoints, exact resume, torchrun DDP), ``load_run``.

A run directory holds

* ``run.safetensors``: written once; the config, model and path descriptions, data shape, the held-out
  points (data space), the normalizer, a checksum of the training data and the loss floor;
* ``checkpoint.safetensors``: rewritten atomically every ``checkpoint_every`` steps and at the end; model,
  EMA, AdamW moments, RNG states and the step (see :mod:`flowscore.checkpoint`);
* ``log.csv``: ``step, loss, loss_ema, lr, steps_per_s, loss_floor`` every ``log_every`` steps;
* ``config.json``: the config, for people (never read back).

Each step draws its randomness (batch indices, times, noise) from one ``torch.Generator`` seeded by
``seed`` whose state is in the checkpoint, so ``train(resume=True)`` after a crash ends with weights
bit-identical (on the CPU) to an uninterrupted run. Under ``torchrun`` every rank draws the same global
batch and trains on its slice; DDP averages the gradients, so the update equals the one-process update.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import gc
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import torch
from torch import nn

from . import _io, _validate, checkpoint
from . import data as datasets
from .conversions import KINDS
from .losses import OBJECTIVES, TIME_SAMPLERS, WEIGHTINGS, objective_loss, sample_time
from .models import MODELS, build_model, model_from_config
from .paths import GaussianPath, get_path

RUN_FILE = "run.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "log.csv"
LOG_FIELDS = ("step", "loss", "loss_ema", "lr", "steps_per_s", "loss_floor")
LOSS_EMA_DECAY = 0.99
FLOOR_MAX_SIZE = 1_000_000
"""The loss floor is computed when (training points) x (dims per point) is at most this."""
FLOOR_WORK = 4e8
"""Monte Carlo draws of the floor: ``clamp(FLOOR_WORK / (N * D), 2000, 20000)`` (cost ~ draws x N x D)."""
VECTOR_DEFAULTS: dict[str, Any] = {"steps": 10_000, "batch_size": 512, "lr": 2e-3, "warmup": 500}
"""Values of the fields left None in a :class:`TrainConfig` (2D toys and other vector data)."""
IMAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"steps": 6000, "batch_size": 128, "lr": 2e-3, "warmup": 200},
    "mnist": {"steps": 20_000, "batch_size": 128, "lr": 1e-3, "warmup": 500},
}
"""Per image set, the values of the fields left None. digits: ~4 min on 1 CPU core, then recognisable digits
(``bench/results/digits.md``). mnist: a starting point, not tuned (~0.7 s per step on 1 CPU core)."""
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "device")
"""Config fields that may differ when a run is resumed (changing ``steps`` changes a cosine schedule)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; the defaults train a good model on a 2D toy in ~1-2 min.

    ``steps``, ``batch_size``, ``lr`` and ``warmup`` left None take per-data defaults
    (:data:`IMAGE_DEFAULTS` for ``"digits"`` and ``"mnist"``, :data:`VECTOR_DEFAULTS` otherwise).

    ``data``: a toy name, ``"digits"``, ``"mnist"`` or a ``.npy``/``.npz`` file (see
    :func:`flowscore.data.load`), ``data_n`` points of it (toys: default 20,000). ``weighting="auto"``:
    None for cfm/fm, ``"noise"`` for dsm/sm. ``model="auto"``: MLP for vectors, UNet for images;
    ``width``/``depth`` are the MLP's hidden units and layers, or the UNet's base channels and levels
    (None: the model's defaults). ``n_holdout`` points are kept out of training (None: min(2000, N // 10)).
    ``lr_schedule``: ``"cosine"`` (decay to 0 after warm-up) or ``"constant"``. ``loss_floor``: compute the
    CFM/DSM loss floor of the training data (when N * D <= ``FLOOR_MAX_SIZE``) and log it next to the
    loss. ``grad_clip`` None or 0 disables clipping. ``device``: "auto", "cpu" or "cuda[:N]".
    """

    data: str = ""
    data_n: int | None = None
    path: str = "linear"
    path_options: dict[str, Any] = field(default_factory=dict)
    objective: str = "cfm"
    prediction: str = "velocity"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    warmup: int | None = None
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 100
    model: str = "auto"
    width: int | None = None
    depth: int | None = None
    weighting: str | None = "auto"
    time_sampler: str = "uniform"
    t_eps: float = 1e-3
    n_holdout: int | None = None
    loss_floor: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        self.fill_defaults()
        self.validate()

    def fill_defaults(self) -> None:
        """Sets ``steps``, ``batch_size``, ``lr`` and ``warmup`` left None: ``IMAGE_DEFAULTS[data]`` for the
        named image sets, else ``VECTOR_DEFAULTS`` (a stored config therefore always holds numbers)."""
        defaults = IMAGE_DEFAULTS.get(self.data, VECTOR_DEFAULTS) if isinstance(self.data, str) else {}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a dict of field values; an unknown key raises ``ValueError`` naming it."""
        if not isinstance(values, dict):
            raise ValueError(f"config must be a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_toml(cls, file: str | Path) -> TrainConfig:
        """A config from a TOML file of field values (top level, or a ``[train]`` table)."""
        return cls.from_dict(cls.read_toml(file))

    @staticmethod
    def read_toml(file: str | Path) -> dict[str, Any]:
        """The field values in a TOML file (top level, or a ``[train]`` table), not yet validated."""
        try:
            with open(file, "rb") as handle:
                values = tomllib.load(handle)
        except FileNotFoundError:
            raise ValueError(f"config file {str(file)!r} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(file)!r} is not valid TOML: {err}") from None
        if set(values) == {"train"} and isinstance(values["train"], dict):
            values = values["train"]
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_weighting(self) -> str | None:
        if self.weighting == "auto":
            return "noise" if OBJECTIVES[self.objective] == "score" else None
        return self.weighting

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad field."""
        if not isinstance(self.data, str) or not self.data:
            raise ValueError("data must be a data set name or a .npy/.npz file path, e.g. data='moons'")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            _positive_int(getattr(self, name), name)
        for name in ("data_n", "width", "depth"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
        if self.n_holdout is not None:
            _int(self.n_holdout, "n_holdout", minimum=0)
        _int(self.warmup, "warmup", minimum=0)
        if not isinstance(self.loss_floor, bool):
            raise ValueError(f"loss_floor must be true or false, got {self.loss_floor!r}")
        _int(self.seed, "seed", minimum=0)
        _number(self.lr, "lr", low=0, low_open=True)
        _number(self.weight_decay, "weight_decay", low=0)
        _number(self.ema_decay, "ema_decay", low=0, high=1, high_open=True)
        _number(self.t_eps, "t_eps", low=0, high=0.5, high_open=True)
        if self.grad_clip is not None:
            _number(self.grad_clip, "grad_clip", low=0)
        if not isinstance(self.path, str):
            raise ValueError(f"path must be a path name, got {type(self.path).__name__}")
        _validate.choice(self.path, ("linear", "vp", "vp-linear", "ve"), "path")
        if not isinstance(self.path_options, dict):
            raise ValueError(f"path_options must be a dict, got {type(self.path_options).__name__}")
        get_path(self.path, **self.path_options)
        _validate.choice(self.objective, tuple(OBJECTIVES), "objective")
        _validate.choice(self.prediction, KINDS, "prediction")
        _validate.choice(self.lr_schedule, ("cosine", "constant"), "lr_schedule")
        _validate.choice(self.model, MODELS, "model")
        if self.weighting is not None:
            _validate.choice(self.weighting, ("auto", *WEIGHTINGS), "weighting")
        _validate.choice(self.time_sampler, TIME_SAMPLERS, "time_sampler")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")
        ):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


def _int(value: object, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive_int(value: object, name: str) -> int:
    return _int(value, name, minimum=1)


def _number(
    value: object,
    name: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


# -- learning rate and EMA ---------------------------------------------------------------------------------
def learning_rate(config: TrainConfig, step: int) -> float:
    """LR of the update that follows ``step`` completed updates (``step`` = 0, 1, ...).

    Warm-up: ``lr * (step + 1) / warmup`` for ``step < warmup``; then ``lr`` (constant) or
    ``lr * (1 + cos(pi * (step - warmup) / (steps - warmup))) / 2`` (cosine).
    """
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "constant" or config.steps <= config.warmup:
        return config.lr
    progress = (step - config.warmup) / (config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


# -- the prepared run --------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    train: torch.Tensor  # encoded training data on the device
    held_out: torch.Tensor  # data space, CPU
    normalizer: datasets.Normalizer
    path: GaussianPath
    model: nn.Module
    data_sha256: str


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _prepare(config: TrainConfig, device: torch.device) -> _Prepared:
    """Loads and checks everything the run needs (raises ``ValueError`` before any file is written)."""
    raw = datasets.load(config.data, n=config.data_n, seed=config.seed)
    n_holdout = min(2000, raw.shape[0] // 10) if config.n_holdout is None else config.n_holdout
    train, held_out = datasets.split(raw, n_holdout, seed=config.seed)
    normalizer = datasets.Normalizer.fit(train)
    path = get_path(config.path, **config.path_options)
    opts: dict[str, Any]
    kind = config.model if config.model != "auto" else ("unet" if datasets.is_image(raw.shape[1:]) else "mlp")
    opts = {"width": config.width, "depth": config.depth} if kind == "mlp" else {}
    if kind == "unet":
        opts = {"base": config.width, "levels": config.depth}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(kind, tuple(raw.shape[1:]), **opts)
    prepared = _Prepared(
        normalizer.encode(train).to(device), held_out, normalizer, path, model.to(device), _checksum(raw)
    )
    _dry_run(config, prepared)
    return prepared


def _loss_target(config: TrainConfig, prepared: _Prepared) -> Any:
    """The path (cfm, dsm) or the exact empirical marginal of the training data (fm, sm)."""
    if config.objective in ("cfm", "dsm"):
        return prepared.path
    from .marginals import EmpiricalMarginal

    return EmpiricalMarginal(prepared.train, prepared.path)


def _dry_run(config: TrainConfig, prepared: _Prepared) -> None:
    """One loss evaluation on two points, to reject bad objective/prediction/weighting combinations early."""
    x_data = prepared.train[:2]
    t = torch.full((x_data.shape[0],), 0.5, dtype=x_data.dtype, device=x_data.device)
    with torch.no_grad():
        target = _loss_target(config, prepared)
        loss = objective_loss(
            config.objective, prepared.model, x_data, target, t, torch.zeros_like(x_data),
            prediction=config.prediction, weighting=config.resolved_weighting(), t_eps=config.t_eps,
        )  # fmt: skip
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"the {config.objective} loss is not finite at t = 0.5 with this configuration")


def _loss_floor(
    config: TrainConfig, train: torch.Tensor, path: GaussianPath, progress: bool
) -> dict[str, Any] | None:
    """The CFM/DSM loss floor of the (encoded) training data, or None (fm/sm, large data, floor missing)."""
    if not config.loss_floor or config.objective not in ("cfm", "dsm") or train.numel() > FLOOR_MAX_SIZE:
        return None
    try:
        from .floor import loss_floor
    except ImportError:
        return None
    n_samples = int(min(20_000, max(2_000, FLOOR_WORK / train.numel())))
    floor = loss_floor(
        train.cpu(), path, config.objective, n_samples=n_samples, weighting=config.resolved_weighting(),
        time_sampler=config.time_sampler, t_eps=config.t_eps, seed=config.seed,
        progress=progress,
    )  # fmt: skip
    return floor.to_dict()


# -- log.csv -----------------------------------------------------------------------------------------------
def _read_log(file: Path) -> list[dict[str, Any]]:
    if not file.is_file():
        return []
    with open(file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {k: (None if v in ("", None) else (int(v) if k == "step" else float(v))) for k, v in r.items()}
        for r in rows
    ]


def _truncate_log(file: Path, step: int) -> None:
    """Keeps the header and the rows with ``step <= step`` (rows past the checkpoint are redone)."""
    rows = [r for r in _read_log(file) if r["step"] <= step]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    _io.write_bytes(file, buffer.getvalue().encode())


# -- the trainer -------------------------------------------------------------------------------------------
class Trainer:
    """Trains ``config`` into ``run_dir``: AdamW, linear LR warm-up (+ cosine), grad clipping, EMA.

    ``Trainer(config, run_dir).train()`` starts a run: every input is checked (and the data loaded) before
    ``run_dir`` is created, and a non-empty ``run_dir`` is refused. ``train(resume=True)`` continues from
    ``run_dir``'s checkpoint (or starts afresh when there is none); ``config`` may then be None (the stored
    one is used) and only ``RESUMABLE_CHANGES`` fields may differ from the stored config.
    """

    def __init__(
        self, config: TrainConfig | dict[str, Any] | None, run_dir: str | Path, progress: bool = True
    ):
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        if config is not None and not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, a dict or None, got {type(config).__name__}")
        if config is not None:
            config.validate()
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress

    @classmethod
    def resume(cls, run_dir: str | Path, *, steps: int | None = None, progress: bool = True) -> Trainer:
        """A trainer that continues ``run_dir`` with its stored config (``steps``: a new total)."""
        config = _stored_config(Path(run_dir))
        if steps is not None:
            config = dataclasses.replace(config, steps=steps)
        return cls(config, run_dir, progress)

    # -- set-up ------------------------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The checkpoint to resume from (or None); refuses a non-empty run dir without ``resume``."""
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise ValueError(f"run_dir {str(d)!r} exists and is not a directory; choose another run_dir")
        if not resume:
            if d.exists() and any(d.iterdir()):
                raise ValueError(
                    f"run_dir {str(d)!r} is not empty; pass resume=True to continue it or pick a new one"
                )
            return None
        if not (d / CHECKPOINT_FILE).is_file():
            return None
        stored = _stored_config(d)
        changed = [k for k, v in self.config.to_dict().items() if stored.to_dict()[k] != v]
        bad = [k for k in changed if k not in RESUMABLE_CHANGES]
        if bad:
            raise ValueError(
                f"cannot resume {str(d)!r} with a different {', '.join(bad)}; only "
                f"{', '.join(RESUMABLE_CHANGES)} may change (or start a new run)"
            )
        return checkpoint.load_checkpoint(d / CHECKPOINT_FILE)

    def _write_run_file(self, prepared: _Prepared, floor: dict[str, Any] | None) -> None:
        state = {
            "format": 1, "config": self.config.to_dict(), "model": prepared.model.config(),
            "path": prepared.path.config(), "data_shape": list(prepared.train.shape[1:]),
            "n_train": prepared.train.shape[0], "data_sha256": prepared.data_sha256, "loss_floor": floor,
        }  # fmt: skip
        tensors = {
            "held_out": prepared.held_out,
            **checkpoint.prefixed("normalizer", prepared.normalizer.state_dict()),
        }
        checkpoint.save_checkpoint(self.run_dir / RUN_FILE, tensors, state)
        text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        _io.write_bytes(self.run_dir / "config.json", text.encode())

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict[str, Any]:
        """Runs (or continues) training to ``config.steps``; returns ``{"step", "loss", "loss_ema"}``."""
        if self.config is None:
            if not resume:
                raise ValueError(
                    "config is None: pass a TrainConfig, or resume=True to continue a stored run"
                )
            self.config = _stored_config(self.run_dir)
        config = self.config
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = _resolve_device(config.device, local_rank)
        dist = _init_distributed(device)
        try:
            result = self._train(config, device, dist, resume)
            dist.barrier()  # no rank tears the group down while another still talks to it
            return result
        finally:
            if dist.owns_group:
                gc.collect()  # free DDP's reducer (held in reference cycles) while gloo is still up
                torch.distributed.destroy_process_group()

    def _train(self, config: TrainConfig, device: torch.device, dist: _Dist, resume: bool) -> dict[str, Any]:
        if config.batch_size % dist.world:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by the {dist.world} processes"
            )
        prepared = _prepare(config, device)
        restored = self._check_run_dir(resume)
        if restored is not None:
            _tensors, state = restored
            run_state = checkpoint.load_checkpoint(self.run_dir / RUN_FILE)[1]
            if run_state["data_sha256"] != prepared.data_sha256:
                raise ValueError(
                    f"the data of {str(self.run_dir)!r} changed since the run started; start a new run"
                )
            floor = run_state["loss_floor"]
        else:
            floor = _loss_floor(config, prepared.train, prepared.path, self.progress) if dist.main else None
        dist.barrier()
        if dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if restored is None:
                self._write_run_file(prepared, floor)
        dist.barrier()
        loop = _Loop(config, prepared, device, dist, self.run_dir, floor)
        if restored is not None:
            loop.load(*restored)
        return loop.run(self.progress)


class _Loop:
    """The training state (model, EMA, optimizer, generator, loss statistics) and the step loop."""

    def __init__(
        self,
        config: TrainConfig,
        prepared: _Prepared,
        device: torch.device,
        dist: _Dist,
        run_dir: Path,
        floor: dict[str, Any] | None,
    ):
        self.config, self.prepared, self.device, self.dist, self.run_dir = (
            config,
            prepared,
            device,
            dist,
            run_dir,
        )
        self.floor_value = None if floor is None else floor.get("value")
        self.model = prepared.model
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.net: nn.Module = self.model
        if dist.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.target = _loss_target(config, prepared)
        self.step = 0
        self.window_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.window_count = 0
        self.loss_ema: torch.Tensor | None = None

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
            "format": 1, "step": self.step, "config": self.config.to_dict(), "model": self.model.config(),
            "optimizer": optim_meta, "window_sum": self.window_sum.item(), "window_count": self.window_count,
            "loss_ema": None if self.loss_ema is None else self.loss_ema.item(),
        }  # fmt: skip
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
            torch.set_rng_state(tensors["rng.torch"])
            if self.device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
            self.step = int(state["step"])
            self.window_sum.fill_(state["window_sum"])
            self.window_count = int(state["window_count"])
            if state["loss_ema"] is not None:
                self.loss_ema = torch.tensor(state["loss_ema"], dtype=torch.float64, device=self.device)
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(
                f"checkpoint in {str(self.run_dir)!r} does not match this run ({type(err).__name__}: {err}); "
                "start a new run"
            ) from None

    def save(self) -> None:
        tensors, state = self.state()  # collective on every rank
        if self.dist.main:
            checkpoint.save_checkpoint(self.run_dir / CHECKPOINT_FILE, tensors, state)

    # -- one update --------------------------------------------------------------------------------------
    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch ``(x_data, t, noise)``, drawn from the run's generator."""
        config, train, gen = self.config, self.prepared.train, self.generator
        idx = torch.randint(train.shape[0], (config.batch_size,), generator=gen, device=self.device)
        x_data = train[idx]
        t = sample_time(
            config.batch_size, time_sampler=config.time_sampler, t_eps=config.t_eps, generator=gen,
            dtype=x_data.dtype, device=self.device,
        )  # fmt: skip
        noise = torch.randn(x_data.shape, generator=gen, dtype=x_data.dtype, device=self.device)
        share = config.batch_size // self.dist.world
        part = slice(self.dist.rank * share, (self.dist.rank + 1) * share)
        return x_data[part], t[part], noise[part]

    def update(self) -> torch.Tensor:
        config = self.config
        lr = learning_rate(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x_data, t, noise = self.draw()
        with _validate.validation(False):
            loss = objective_loss(
                config.objective, self.net, x_data, self.target, t, noise, prediction=config.prediction,
                weighting=config.resolved_weighting(), t_eps=config.t_eps,
            )  # fmt: skip
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
        self.window_sum += loss
        self.window_count += 1
        if self.loss_ema is None:
            self.loss_ema = loss.clone()
        else:
            self.loss_ema.mul_(LOSS_EMA_DECAY).add_(loss, alpha=1 - LOSS_EMA_DECAY)

    def log_row(self, steps_per_s: float) -> dict[str, Any]:
        window = self.dist.mean(self.window_sum).item() / max(self.window_count, 1)
        ema = self.dist.mean(self.loss_ema).item()
        self.window_sum.zero_()
        self.window_count = 0
        return {
            "step": self.step, "loss": f"{window:.6g}", "loss_ema": f"{ema:.6g}",
            "lr": f"{learning_rate(self.config, self.step - 1):.6g}", "steps_per_s": f"{steps_per_s:.4g}",
            "loss_floor": "" if self.floor_value is None else f"{self.floor_value:.6g}",
        }  # fmt: skip

    def run(self, progress: bool) -> dict[str, Any]:
        config, main = self.config, self.dist.main
        log_file = self.run_dir / LOG_FILE
        if main:
            _truncate_log(log_file, self.step)
        bar = None
        if main and progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=self.step, desc="train", dynamic_ncols=True)
        handle = open(log_file, "a", newline="") if main else None  # noqa: SIM115
        writer = csv.DictWriter(handle, LOG_FIELDS, lineterminator="\n") if handle else None
        self.model.train()
        tick, tick_step = time.perf_counter(), self.step
        try:
            while self.step < config.steps:
                self.record(self.update())
                if bar is not None:
                    bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    now = time.perf_counter()
                    row = self.log_row((self.step - tick_step) / max(now - tick, 1e-9))
                    tick, tick_step = now, self.step
                    if writer is not None:
                        writer.writerow(row)
                        handle.flush()
                    if bar is not None:
                        bar.set_postfix(loss=row["loss_ema"], floor=row["loss_floor"] or "-")
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            if handle is not None:
                handle.close()
        ema = None if self.loss_ema is None else self.dist.mean(self.loss_ema).item()
        return {"step": self.step, "loss_ema": ema, "loss_floor": self.floor_value}


# -- reading a run -----------------------------------------------------------------------------------------
def _stored_config(run_dir: Path) -> TrainConfig:
    state = checkpoint.load_checkpoint(run_dir / RUN_FILE)[1]
    return TrainConfig.from_dict(state["config"])


@dataclass
class Run:
    """A trained run: ``model`` holds the EMA weights in eval mode on the CPU; ``held_out`` is in data space.

    The model works in the normalizer's space: ``normalizer.decode(sample)`` maps its samples to data.
    """

    config: TrainConfig
    path: GaussianPath
    model: nn.Module
    prediction: str
    normalizer: datasets.Normalizer
    held_out: torch.Tensor
    data_shape: tuple[int, ...]
    log: list[dict[str, Any]]
    loss_floor: dict[str, Any] | None
    step: int
    run_dir: Path


def load_run(run_dir: str | Path) -> Run:
    """Reads a run directory written by :class:`Trainer` (no code is executed: safetensors + JSON + CSV)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise ValueError(
            f"{str(run_dir)!r} is not a flowscore run (no {RUN_FILE}); pass the run_dir of a training"
        )
    run_tensors, run_state = checkpoint.load_checkpoint(run_dir / RUN_FILE)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise ValueError(f"run {str(run_dir)!r} has no checkpoint yet; resume its training first")
    tensors, state = checkpoint.load_checkpoint(run_dir / CHECKPOINT_FILE)
    model = model_from_config(run_state["model"])
    try:
        model.load_state_dict(checkpoint.unprefixed("ema", tensors))
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint of {str(run_dir)!r} does not fit its model ({err}); train again"
        ) from None
    config = TrainConfig.from_dict(run_state["config"])
    return Run(
        config=config,
        path=get_path(
            run_state["path"]["name"], **{k: v for k, v in run_state["path"].items() if k != "name"}
        ),
        model=model.eval().requires_grad_(False),
        prediction=config.prediction,
        normalizer=datasets.Normalizer.from_state_dict(checkpoint.unprefixed("normalizer", run_tensors)),
        held_out=run_tensors["held_out"],
        data_shape=tuple(run_state["data_shape"]),
        log=_read_log(run_dir / LOG_FILE),
        loss_floor=run_state["loss_floor"],
        step=int(state["step"]),
        run_dir=run_dir,
    )
