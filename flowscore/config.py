"""The training configuration: :class:`TrainConfig`, its per-data defaults, its validation and its help text.

``TrainConfig`` is the one source of truth for a run's settings: ``flowscore train`` generates one flag per
field from it (type, default and the help of :data:`FIELD_HELP`), a ``--config`` TOML file holds its fields,
and every run folder stores it (``flowscore.runs``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import torch

from . import _validate
from .conversions import KINDS
from .couplings import COUPLINGS, DEFAULT_REG
from .losses import (
    OBJECTIVE_ALIASES,
    OBJECTIVES,
    TIME_SAMPLERS,
    WEIGHTINGS,
    TimeSampler,
    objective_name,
    snr_matched,
)
from .models import MODELS
from .paths import get_path
from .preconditioning import NETWORK_PATHS

VECTOR_DEFAULTS: dict[str, Any] = {"steps": 10_000, "batch_size": 512, "lr": 2e-3, "warmup": 500}
"""Values of the fields left None in a :class:`TrainConfig` (2D toys and other vector data; every preset)."""
OBJECTIVE_VECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "semigroup": {"lr": 4e-3, "reference_size": 256},
    "lagrangian": {"lr": 4e-3, "reference_size": 256},
}
"""Per objective, on vector data named by ``TrainConfig.data`` (a toy or a file; not data handed to the
Trainer, which may be a DataLoader), its values of the fields left None in place of :data:`VECTOR_DEFAULTS`'
(and of ``reference_size``'s 0): semigroup and lagrangian train with a higher learning rate and with their
velocity averaged over 256 reference points (at most the training set), bench/results/flowmap_tuning.md."""
PRESETS = ("auto", "fast", "default", "large")
"""The values of ``TrainConfig.preset``: "auto" is "fast" on a CPU and "default" on a CUDA device."""
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {"digits": (1, 8, 8), "mnist": (1, 28, 28)}
"""The per-point shape of each named image set (the presets are chosen from it)."""
IMAGE_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "small": {  # images of at most 8 x 8 (a UNet of one level): digits
        "fast": {"steps": 6000, "batch_size": 128, "lr": 2e-3, "warmup": 200, "width": 32},
        "default": {"steps": 6000, "batch_size": 128, "lr": 2e-3, "warmup": 200, "width": 32},
        "large": {"steps": 12_000, "batch_size": 256, "lr": 2e-3, "warmup": 500, "width": 64},
    },
    "large": {  # larger images (a UNet of two levels): mnist
        "fast": {"steps": 6000, "batch_size": 64, "lr": 1e-3, "warmup": 500, "width": 16},
        "default": {"steps": 20_000, "batch_size": 128, "lr": 1e-3, "warmup": 500, "width": 32},
        "large": {"steps": 20_000, "batch_size": 256, "lr": 1e-3, "warmup": 1000, "width": 64},
    },
}
"""Per image size (:func:`image_size_class`) and preset, the values of the fields left None: ``width`` is the
UNet's base channels. "fast" fits a CPU (digits: see ``bench/results/digits.md``; mnist:
``bench/results/images.md``), "default" and "large" a GPU (starting points, not tuned)."""
IMAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    name: {key: IMAGE_PRESETS["small" if max(shape[1:]) <= 8 else "large"]["default"][key]
           for key in VECTOR_DEFAULTS}
    for name, shape in IMAGE_SHAPES.items()
}  # fmt: skip
"""Per named image set, the values of :data:`PER_DATA_FIELDS` of the "default" preset (the "auto" preset on
a CUDA device; on a CPU it is "fast": :func:`per_data_defaults`)."""
PER_DATA_FIELDS = tuple(VECTOR_DEFAULTS)
"""The fields whose default depends on the data set (None until :meth:`TrainConfig.fill_defaults`); image
presets also fill ``width``."""
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "device", "threads", "compile", "tensorboard")
"""Config fields that may differ when a run is resumed (changing ``steps`` changes a cosine schedule)."""
PATH_NAMES = ("linear", "vp", "vp-linear", "ve", "custom")
LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")
MAX_BATCH_SIZE = 2**31 - 1
MAX_THREADS = 1024
"""The most torch CPU threads a config may ask for (a sanity bound: far more fail to start or crash)."""
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""Rates are applied to float32 weights: a larger one overflows (lr, weight_decay)."""
DATA_STD = 0.5
"""The default ``data_std``: vector data are scaled to this per-feature standard deviation (EDM's
sigma_data; at 1 the vp path makes the velocity uncorrelated with x, docs/theory.md section 16)."""

FLOW_MAPS = ("meanflow", "semigroup", "lagrangian")
"""The flow-map objectives (:mod:`flowscore.flowmaps`): a two-time model ``model(x, t, s[, y])``."""
BRIDGES = ("sbcfm",)
"""The Schrödinger-bridge objective (:mod:`flowscore.sbcfm`): a two-head model on the Brownian bridge."""

CHOICES: dict[str, tuple[str, ...]] = {
    "path": PATH_NAMES,
    "objective": (*OBJECTIVES, *FLOW_MAPS, *BRIDGES),
    "prediction": tuple(KINDS),
    "lr_schedule": LR_SCHEDULES,
    "network_path": NETWORK_PATHS,
    "model": tuple(MODELS),
    "weighting": ("auto", *WEIGHTINGS),
    "time_sampler": ("auto", *TIME_SAMPLERS),
    "coupling": COUPLINGS,
    "precision": PRECISIONS,
    "preset": PRESETS,
}
"""The allowed values of the string fields (``weighting`` also takes None: no weighting)."""

FIELD_HELP: dict[str, str] = {
    "data": "a 2D toy name (moons, 8gaussians, ...), digits, mnist, or a .npy/.npz file of shape (N, D) or "
    "(N, C, H, W); an .npz may hold the data as 'x' and integer class labels 0..K-1 as 'y'",
    "labels": "use the data's class labels when it has them (digits, mnist, an .npz with 'y'): a "
    "class-conditional model, sampled per class with classifier-free guidance; false: ignore them",
    "p_uncond": "probability of replacing a training label by -1 (no label), which trains the unconditional "
    "model that guidance needs; used when the data has labels",
    "data_n": "points of the data set to use (toys: how many to draw; images and files: a random subset); "
    "none: the whole set",
    "path": "the Gaussian path x = alpha_t x_data + beta_t noise (custom: alpha and beta as expressions "
    "in t in path_options)",
    "path_options": "the path's schedule constants as JSON, e.g. '{\"sigma_min\": 0.1}' for linear, "
    '\'{"sigma_max": 50}\' for ve, \'{"alpha": "t", "beta": "1 - t"}\' for custom',
    "objective": "training objective: cfm, fm (velocity), dsm, sm (score); meanflow, semigroup, lagrangian "
    "(flow maps: a two-time model sampled in a few jumps); sbcfm (Schrödinger-bridge CFM: entropic OT pairs "
    "at epsilon = 2 sb_sigma^2, the Brownian bridge between them, a velocity and a score-term head; sampled "
    "with euler or sb-sde)",
    "prediction": "what the network predicts (converted to the objective's space by the path)",
    "precondition": "EDM-style input/output scalings of the built-in models for the path and prediction "
    "(flowscore.Preconditioned), so that the network's target has unit variance at every t; a model you "
    "pass yourself is used as given",
    "network_path": "with precondition, the network every path runs through (cfm, dsm, fm, sm): linear (the "
    "linear path's network at the time of equal log-SNR, x rescaled: with the auto weighting and times every "
    "path trains linear cfm's problem), or own (the path's own scalings at its own t, as runs stored before "
    "this option)",
    "data_std": "standard deviation each feature of vector data is scaled to (EDM's sigma_data; images are "
    "mapped to [-1, 1]); also the sigma_data of the preconditioning; none: train in data units, no rescale "
    "(vector data; sigma_data is then the data's measured standard deviation)",
    "source": "the source distribution at t = 0: empty for a standard normal, or a data set of the kinds "
    "--data takes (a toy name, a .npy/.npz file): a data-to-data flow (cfm; no score, SDE or likelihood)",
    "preset": "the sizes of a run on a named image set (digits, mnist) left unset: UNet width, steps, batch "
    "size, lr and warm-up; fast fits a CPU (a run of minutes), default and large a GPU; auto: fast on a CPU, "
    "default on CUDA; explicit flags win; vector data have one set of defaults",
    "steps": "optimizer steps (with --resume: the new total)",
    "batch_size": "points per step (split over torchrun processes; a DataLoader given to the Trainer "
    "sets its own)",
    "lr": "peak learning rate of AdamW",
    "lr_schedule": "after warm-up: cosine decay to 0, or constant",
    "weight_decay": "AdamW weight decay",
    "warmup": "steps of linear learning-rate warm-up",
    "ema_decay": "decay of the exponential moving average of the weights (the EMA is what is sampled)",
    "grad_clip": "clip the gradient norm to this value; none or 0: no clipping",
    "seed": "seed of the data split, the initialisation and every draw of the training",
    "checkpoint_every": "steps between checkpoints (and one at the end)",
    "log_every": "steps between rows of log.csv",
    "model": "network: auto (MLP for vectors, UNet for images), mlp or unet",
    "width": "MLP hidden units or UNet base channels; none: the model's default",
    "depth": "MLP hidden layers or UNet levels; none: the model's default",
    "weighting": "loss weighting lambda(t): auto (with time-sampler auto and preconditioning: "
    "linear-velocity with network-path linear, network with network-path own, each uniform in the "
    "preconditioned network's error; with another time sampler: noise for dsm/sm, for cfm/fm none, but "
    "noise on a preconditioned ve path), noise, likelihood, network, linear-velocity or none",
    "time_sampler": "distribution of the training times t: auto (with preconditioning: the times whose "
    "log-SNR has the law of uniform times on the linear path; uniform without), uniform or logit-normal",
    "t_eps": "training times lie in [t_eps, 1 - t_eps]",
    "coupling": "pairing of noise and data in each batch (cfm, dsm): independent, ot (exact minibatch "
    "optimal transport) or sinkhorn (entropic OT, --coupling-reg); on the global batch under torchrun",
    "coupling_reg": "Sinkhorn regularisation, relative to the batch's mean squared distance",
    "sb_sigma": "sbcfm: the diffusion sigma of the Brownian bridge, in the units the model is trained in "
    "(after the data_std scaling); the pairs are entropic OT at the absolute epsilon = 2 sigma^2",
    "reference_size": "reference-batch targets (cfm, dsm; meanflow, semigroup: their velocity): the target "
    "is the posterior average over the own point and this many training points drawn each step; 0: plain "
    "targets; none: "
    + "; ".join(f"{k} on vectors {v['reference_size']}" for k, v in OBJECTIVE_VECTOR_DEFAULTS.items())
    + " (at most the training set), 0 otherwise",
    "n_holdout": "points kept out of training for eval; none: min(2000, N // 10)",
    "loss_floor": "compute the loss floor of the training data and log it next to the loss (cfm, dsm; with "
    "labels: the floor of label dropout, p_uncond x unconditional + (1 - p_uncond) x class-conditional; "
    "none for a DataLoader)",
    "device": "auto, cpu, cuda or cuda:N",
    "threads": "torch CPU threads; none: chosen from the work per step (one for small models)",
    "precision": "fp32, or bf16: the model's forward pass under CUDA autocast to bfloat16 (CUDA only)",
    "compile": "torch.compile the model before training (a one-off compilation; needs a C++ compiler on the "
    "CPU)",
    "tensorboard": "also write TensorBoard logs to RUN_DIR/tensorboard: loss, loss floor, excess loss and lr "
    "every log_every steps, a sample grid at every checkpoint (needs the tensorboard package)",
}
"""The help text of each field (also the ``--help`` of ``flowscore train``). No measured numbers here."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; the defaults train a good model on a 2D toy.

    ``steps``, ``batch_size``, ``lr`` and ``warmup`` left None take per-data defaults
    (:data:`IMAGE_PRESETS` of ``preset`` for ``"digits"`` and ``"mnist"``, which also set ``width``;
    :data:`VECTOR_DEFAULTS` otherwise). Each
    field's meaning is in :data:`FIELD_HELP`; the allowed strings in :data:`CHOICES`. ``data`` stays empty
    when the data is given to :class:`~flowscore.training.Trainer` as tensors, a Dataset or a DataLoader.
    """

    data: str = ""
    data_n: int | None = None
    labels: bool = True
    p_uncond: float = 0.1
    path: str = "linear"
    path_options: dict[str, Any] = field(default_factory=dict)
    objective: str = "cfm"
    prediction: str = "velocity"
    precondition: bool = True
    network_path: str = "linear"
    data_std: float | None = DATA_STD
    source: str = ""
    preset: str = "auto"
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
    time_sampler: str = "auto"
    t_eps: float = 1e-3
    coupling: str = "independent"
    coupling_reg: float = DEFAULT_REG
    reference_size: int | None = None
    sb_sigma: float = 1.0
    n_holdout: int | None = None
    loss_floor: bool = True
    device: str = "auto"
    threads: int | None = None
    precision: str = "fp32"
    compile: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.fill_defaults()
        self.validate()

    def fill_defaults(self) -> None:
        """Sets ``steps``, ``batch_size``, ``lr`` and ``warmup`` left None (and ``width`` of the named image
        sets): :func:`per_data_defaults` of ``data``, ``preset`` and ``device``, with the objective's
        :data:`OBJECTIVE_VECTOR_DEFAULTS` on vector data; and ``reference_size`` (0 unless the objective
        sets it). A stored config therefore always holds numbers."""
        preset = self.preset if self.preset in PRESETS else "default"  # validate() names a bad one
        defaults = {**per_data_defaults(self.data, preset, self.device), "reference_size": 0}
        if isinstance(self.data, str) and self.data and self.data not in IMAGE_SHAPES and not self.source:
            defaults.update(OBJECTIVE_VECTOR_DEFAULTS.get(self.objective, {}))
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a dict of field values; an unknown key raises ``ValueError`` naming it."""
        if not isinstance(values, dict):
            raise ValueError(f"config must be a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
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
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {str(file)!r} cannot be read ({err})") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(file)!r} is not valid TOML: {err}") from None
        except RecursionError:
            raise ValueError(f"config file {str(file)!r} is nested too deeply to be a config") from None
        if set(values) == {"train"} and isinstance(values["train"], dict):
            values = values["train"]
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_weighting(self) -> str | None:
        """``weighting`` with "auto" resolved. With ``time_sampler="auto"``: :func:`parity_defaults` (when
        preconditioned, "linear-velocity" with ``network_path="linear"``, "network" with "own"). With a
        time sampler named explicitly (as every run stored before the auto time sampler existed has), the
        rule of those runs, so that they resume as trained: "noise" for dsm/sm; for cfm/fm none, except on
        the ``ve`` path with preconditioning ("noise")."""
        if self.weighting != "auto":
            return self.weighting
        if self.time_sampler == "auto":
            return parity_defaults(
                self.path, self.objective, self.precondition, path_options=self.path_options,
                t_eps=self.t_eps, network_path=self.network_path,
            )["weighting"]  # fmt: skip
        return _explicit_times_weighting(self.path, self.objective, self.precondition)

    def resolved_time_sampler(self) -> str | TimeSampler:
        """``time_sampler`` with "auto" resolved by :func:`parity_defaults` (a callable on a preconditioned
        path other than ``linear``, else "uniform"); a named sampler as it is."""
        if self.time_sampler != "auto":
            return self.time_sampler
        return parity_defaults(
            self.path, self.objective, self.precondition, path_options=self.path_options, t_eps=self.t_eps
        )["time_sampler"]

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad field."""
        if not isinstance(self.data, str):
            raise ValueError("data must be a data set name or a .npy/.npz file path, e.g. data='moons'")
        for name in ("steps", "checkpoint_every", "log_every"):
            _validate.integer(getattr(self, name), name, minimum=1)
        _validate.integer(self.batch_size, "batch_size", minimum=1, maximum=MAX_BATCH_SIZE)
        for name in ("data_n", "width", "depth", "threads"):
            if getattr(self, name) is not None:
                top = MAX_THREADS if name == "threads" else None
                _validate.integer(getattr(self, name), name, minimum=1, maximum=top)
        if self.n_holdout is not None:
            _validate.integer(self.n_holdout, "n_holdout", minimum=0)
        _validate.integer(self.warmup, "warmup", minimum=0)
        for name in ("loss_floor", "labels", "compile", "tensorboard", "precondition"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _validate.number(self.p_uncond, "p_uncond", low=0, high=1, high_open=True)
        if self.data_std is not None:
            _validate.number(self.data_std, "data_std", low=0, low_open=True)
            square = torch.tensor(self.data_std, dtype=torch.float32) ** 2
            if not (bool(torch.isfinite(square)) and square > 0):
                raise ValueError(
                    f"data_std {self.data_std!r} is out of range: its square must be finite and non-zero in "
                    "float32 (data_std between about 1e-19 and 1e19)"
                )
        if not isinstance(self.source, str):
            raise ValueError("source must be empty (a standard normal), a data set name or a .npy/.npz path")
        _validate.integer(self.seed, "seed", minimum=0)
        _validate.number(self.lr, "lr", low=0, low_open=True, high=FLOAT32_MAX)
        _validate.number(self.weight_decay, "weight_decay", low=0, high=FLOAT32_MAX)
        _validate.number(self.ema_decay, "ema_decay", low=0, high=1, high_open=True)
        _validate.t_eps(self.t_eps)
        if self.grad_clip is not None:
            _validate.number(self.grad_clip, "grad_clip", low=0)
        for name, options in CHOICES.items():
            value = getattr(self, name)
            if name == "weighting" and value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
            _validate.choice(value, options, name)
        if self.objective in FLOW_MAPS and self.prediction != "velocity":
            raise ValueError(
                f"objective {self.objective!r} trains an average velocity: prediction must be velocity"
            )
        _validate.number(self.sb_sigma, "sb_sigma", low=0, low_open=True)
        if self.objective in BRIDGES and self.prediction != "velocity":
            raise ValueError(
                f"objective {self.objective!r} trains a velocity (and a score term): prediction "
                "must be velocity"
            )
        if self.objective in BRIDGES:
            path = f"path={self.path!r}" + (f" with {self.path_options}" if self.path_options else "")
            ignored = [path] if self.path != "linear" or self.path_options else []
            ignored += [f"weighting={self.weighting!r}"] if self.weighting not in ("auto", None) else []
            ignored += (
                [f"time_sampler={self.time_sampler!r}"]
                if self.time_sampler not in ("auto", "uniform")
                else []
            )
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)}: objective {self.objective!r} trains on its own Brownian bridge "
                    "with uniform times and no weighting; leave path, weighting and time_sampler at their "
                    "defaults"
                )
        if self.objective not in BRIDGES and self.sb_sigma != 1.0:
            raise ValueError(
                f"sb_sigma is the bridge diffusion of objective 'sbcfm', not of {self.objective!r}"
            )
        _validate.number(self.coupling_reg, "coupling_reg", low=0, low_open=True)
        _validate.integer(self.reference_size, "reference_size", minimum=0)
        if self.coupling != "independent" and self.objective not in ("cfm", "dsm"):
            raise ValueError(
                f"coupling={self.coupling!r}: for the conditional objectives cfm and dsm only; objective "
                f"{self.objective!r} regresses on the exact marginal of the independent coupling"
            )
        if self.reference_size and self.objective not in ("cfm", "dsm", *FLOW_MAPS):
            raise ValueError(
                f"reference_size={self.reference_size}: for cfm, dsm and the flow maps "
                f"({', '.join(FLOW_MAPS)}) only; objective {self.objective!r} regresses on the exact marginal"
            )
        if self.reference_size and self.coupling != "independent":
            raise ValueError(
                "reference_size needs coupling='independent' (reference weights p_t(x | x_ref) are those of "
                "the independent coupling); use one or the other"
            )
        if not isinstance(self.path_options, dict):
            raise ValueError(f"path_options must be a dict, got {type(self.path_options).__name__}")
        get_path(self.path, **self.path_options).config()  # refuses a path that a run cannot store
        self.resolved_time_sampler()  # e.g. t_eps = 0 with matched log-SNR times
        check_device(self.device)
        if self.source:
            check_source_config(self)


SOURCE_OBJECTIVES = ("cfm", "sbcfm")
"""The objectives that train with a data source (their conditional target holds for any source law; sbcfm:
Schrödinger-bridge CFM, :mod:`flowscore.sbcfm`, issue 19)."""
GAUSSIAN_ONLY = "needs the standard normal source (docs/theory.md section 17, 'A source other than N(0, I)')"
"""The end of every refusal of a setting that a data source (``TrainConfig.source``) does not allow."""


def check_source_config(config: TrainConfig) -> None:
    """One-line ``ValueError`` for a setting that needs the N(0, I) source when a data source is given
    (``source=`` of the config, or of the Trainer): a score objective or prediction, an exact-marginal
    objective (fm/sm), reference targets, flow maps, or a path that does not start at the source."""
    if config.objective not in SOURCE_OBJECTIVES:
        raise ValueError(
            f"objective {config.objective!r} with a data source: only cfm regresses on a conditional target "
            f"that holds for any source; {config.objective} {GAUSSIAN_ONLY}"
        )
    if config.prediction == "score":
        raise ValueError(
            f"prediction 'score' with a data source: the score of a path from a data source has no "
            f"conditional form (Tweedie's formula {GAUSSIAN_ONLY}); use velocity, data or noise (= source)"
        )
    if config.reference_size:
        raise ValueError(
            f"reference_size with a data source: the reference weights p_t(x | x_ref) {GAUSSIAN_ONLY}"
        )
    path = get_path(config.path, **config.path_options)
    alpha, beta = (float(v) for v in path.schedule(torch.zeros((), dtype=torch.float64))[:2])
    if abs(alpha) > 1e-6 or abs(beta - 1) > 1e-6:
        raise ValueError(
            f"path {config.path!r} with a data source: x = alpha_t x_data + beta_t x_source must start at "
            "the "
            f"source (alpha_0 = 0, beta_0 = 1), got alpha_0 = {alpha:.3g}, beta_0 = {beta:.3g}; use linear "
            "(any sigma_min), vp or a custom path that does"
        )


def parity_defaults(
    path_name: str,
    objective: str,
    precondition: bool = True,
    *,
    path_options: dict[str, Any] | None = None,
    t_eps: float = 1e-3,
    network_path: str = "linear",
) -> dict[str, Any]:
    """The default ``{"weighting": ..., "time_sampler": ...}`` of ``objective`` on the path ``path_name``
    (with ``path_options``), chosen so that every (path, objective) trains like linear cfm at the same
    steps (issue 16; docs/theory.md section 16, "Parity of objectives").

    Preconditioned: times :func:`flowscore.losses.snr_matched` to ``linear`` (the noise levels of uniform
    times on linear; on ``linear`` itself exactly the "uniform" times) and, with ``network_path="linear"``
    (every path through linear's network at the matched time), the weighting "linear-velocity": the loss
    per sample is then linear cfm's, ``(1 + sigma_data^2) ||F - F*||^2`` at the matched time, for every path
    and objective. With ``network_path="own"`` (the path's own scalings, runs stored before) the weighting
    "network", uniform in that network's error. Both make cfm and dsm one loss, and fm and sm. Without
    preconditioning:
    "noise" for dsm/sm, none for cfm/fm, uniform times (the raw network's error depends on its
    prediction, so no weighting is uniform in it for every prediction).
    """
    if (
        objective not in OBJECTIVES and objective not in OBJECTIVE_ALIASES
    ):  # a flow map: its own law of (t, s)
        return {"weighting": None, "time_sampler": "uniform"}
    space = OBJECTIVES[objective_name(objective)]
    if not precondition:
        return {"weighting": "noise" if space == "score" else None, "time_sampler": "uniform"}
    path = get_path(path_name, **(path_options or {}))
    sampler = "uniform" if path == get_path("linear") else snr_matched(path, "linear", t_eps)
    weighting = "linear-velocity" if network_path == "linear" else "network"
    return {"weighting": weighting, "time_sampler": sampler}


def _explicit_times_weighting(path_name: str, objective: str, precondition: bool) -> str | None:
    """The auto weighting with an explicitly named time sampler (the rule before :func:`parity_defaults`)."""
    if objective not in OBJECTIVES and objective not in OBJECTIVE_ALIASES:  # a flow map: its own weighting
        return None
    if OBJECTIVES[objective_name(objective)] == "score" or (path_name == "ve" and precondition):
        return "noise"
    return None


def image_size_class(shape: tuple[int, ...]) -> str:
    """The key of :data:`IMAGE_PRESETS` for images of ``shape`` ``(C, H, W)``: "small" up to 8 x 8 pixels
    (the built-in UNet then has one level), "large" above."""
    return "small" if max(shape[1:]) <= 8 else "large"


def resolve_preset(preset: str, device: str = "auto") -> str:
    """``preset`` with "auto" resolved: "default" when ``device`` is (or "auto" finds) a CUDA device, else
    "fast"."""
    if preset != "auto":
        return preset
    named = isinstance(device, str)  # validate() refuses anything else
    cuda = named and (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()))
    return "default" if cuda else "fast"


def per_data_defaults(data: object, preset: str = "auto", device: str = "auto") -> dict[str, Any]:
    """The values of :data:`PER_DATA_FIELDS` for ``data``: for a named image set (:data:`IMAGE_SHAPES`)
    those of :data:`IMAGE_PRESETS` for its size and :func:`resolve_preset` (with ``width``), else
    :data:`VECTOR_DEFAULTS` (every preset)."""
    if not isinstance(data, str):
        return {}
    if data in IMAGE_SHAPES:
        return dict(IMAGE_PRESETS[image_size_class(IMAGE_SHAPES[data])][resolve_preset(preset, device)])
    return dict(VECTOR_DEFAULTS)


def check_device(name: object) -> str:
    """``name`` if it is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``ValueError`` otherwise."""
    message = f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}"
    if not isinstance(name, str):
        raise ValueError(message)
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(message) from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(message)
    return name


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of a config's ``device`` (``"auto"``: CUDA when available); ``ValueError`` if unusable."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def field_types() -> dict[str, tuple[type, bool]]:
    """``{field: (base type, accepts None)}`` of :class:`TrainConfig`, read from its annotations."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        out[f.name] = (typing.get_origin(base) or base, optional)
    return out


def field_default(name: str) -> Any:
    """The dataclass default of field ``name`` (``default_factory`` called)."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
