"""The set-up of a training run: everything is loaded and checked before a file is written.

:func:`_prepare` reads the data (:mod:`flowscore.sources`), splits and normalises it, builds the model (or
checks yours), estimates the memory of a step (:mod:`flowscore.resources`), builds the objective of the
config (or checks yours), hands it the training set, and runs one loss evaluation on two points (the dry
run) so that a bad model or objective is a one-line ``ValueError`` before the run folder is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import data as datasets
from . import resources, source_data, sources
from .conditioning import call_model
from .config import BRIDGES, FLOW_MAPS, GAUSSIAN_ONLY, TrainConfig, check_source_config
from .models import describe, model_config, model_from_config
from .objectives import Objective, objective_from_config
from .paths import GaussianPath, get_path
from .resources import TRAINING_PASSES, step_memory


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
    source: source_data.Source | None = None  # a data source (None: N(0, I))
    sigma_data: float = 1.0  # the preconditioning's, in the normalizer's units
    config_data_std: float | None = None

    def normalisation(self) -> dict[str, Any]:
        """What the run file stores (and the summary prints) about the normalisation."""
        return {"data_std": self.config_data_std, "sigma_data": self.sigma_data,
                "shared_with_source": self.source is not None}  # fmt: skip

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
    source: object = None,
) -> _Prepared:
    """Loads and checks everything the run needs (raises ``ValueError`` before any file is written);
    ``source``: a data source given to the Trainer (:mod:`flowscore.source_data`)."""
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if model is not None and (config.model != "auto" or config.width is not None or config.depth is not None):
        raise ValueError(
            "model= is given, so config.model, width and depth have no say: leave them at auto / none"
        )
    path = get_path(config.path, **config.path_options)
    has_source = bool(config.source) or source is not None
    if has_source:
        check_source_config(config)
    _check_objective(config, objective, path, has_source)
    _check_options(config, device)
    raw, labels, stream = sources.read_data(config, data)
    shape = tuple(raw.shape[1:])
    source_set = source_data.prepare_source(config, source, shape, labels) if has_source else None
    if stream is None:
        n_holdout = min(2000, raw.shape[0] // 10) if config.n_holdout is None else config.n_holdout
        train, held_out = datasets.split(raw, n_holdout, seed=config.seed)
        normalizer, sigma_data = source_data.fit_normalizer(
            train, config.data_std, None if source_set is None else source_set.train
        )
        sha = sources.checksum(raw, labels)
    else:  # streamed: used as it comes
        train, held_out = raw, raw[:0].clone()
        normalizer, sigma_data = source_data.fit_normalizer(train, None)
        sigma_data = sigma_data if config.data_std is None else config.data_std
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
        heads = (
            getattr(objective, "heads", 1)
            if objective is not None
            else 2
            if config.objective in BRIDGES
            else 1
        )
        model_cfg = model_config(
            kind, shape, num_classes=num_classes, two_time=two_time or None, heads=heads, **opts
        )
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
        objective=objective_from_config(config, path, model, sigma_data) if objective is None else objective,
        sigma_data=sigma_data, config_data_std=config.data_std,
        source=None if source_set is None else source_set.encoded(normalizer, device),
    )  # fmt: skip
    _bind(prepared)
    _dry_run(config, prepared)
    return prepared


OBJECTIVE_FIELDS = ("objective", "prediction", "weighting", "time_sampler", "t_eps", "coupling",
                    "coupling_reg", "reference_size")  # fmt: skip
"""Config fields that describe the built-in objective: left at their defaults when ``objective=`` is given."""


def _check_objective(
    config: TrainConfig, objective: Objective | None, path: GaussianPath, has_source: bool = False
) -> None:
    """An ``objective=`` given to the Trainer is an :class:`Objective`, the config's objective fields are left
    at their defaults, a built-in one lives on the config's path, and with a data source it is one that
    trains with any source (:attr:`Objective.any_source`)."""
    if objective is None:
        return
    if not isinstance(objective, Objective):
        raise ValueError(
            f"objective must be a flowscore.Objective (a subclass implementing loss(model, x_data, y, "
            f"generator)), got {type(objective).__name__}"
        )
    defaults = TrainConfig()  # the default of each field, filled (reference_size: 0 for cfm)
    changed = [name for name in OBJECTIVE_FIELDS if getattr(config, name) != getattr(defaults, name)]
    if changed:
        raise ValueError(
            f"objective= is given, so config.{', '.join(changed)} have no say: leave them at their defaults"
        )
    if has_source and not (objective.any_source and objective.draws_globally):
        raise ValueError(
            f"objective {type(objective).__name__} ({objective.name}) with a data source: it draws its own "
            f"noise or {GAUSSIAN_ONLY}; an objective for a data source sets any_source = True and its draw "
            "takes source="
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
                drawn = objective.draw(
                    x_data, y, generator, **source_batch(prepared, x_data.shape[0], y, generator)
                )
                per_sample = objective.per_sample(model, drawn, generator)
            except (TypeError, RuntimeError, IndexError) as err:
                raise ValueError(
                    f"the model failed on a batch of 2 points ({type(err).__name__}: "
                    f"{' '.join(str(err).split())}); it is called as {call} and must return a tensor shaped "
                    "like x"
                ) from None
            if y is not None and config.p_uncond > 0:
                _check_no_label(model, x_data, config.p_uncond, objective.two_time)
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


def source_batch(
    prepared: _Prepared, n: int, y: torch.Tensor | None, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``{"source": (n, *dims) source points}`` for :meth:`Objective.draw` (of each data point's label where
    both sides have labels, :meth:`flowscore.source_data.Source.draw`), or ``{}`` with the N(0, I) source
    (the objective draws its noise)."""
    if prepared.source is None:
        return {}
    return {"source": prepared.source.draw(n, y, generator)}


def _check_no_label(model: nn.Module, x_data: torch.Tensor, p_uncond: float, two_time: bool = False) -> None:
    """Calls ``model(x, t, y)`` (a flow-map model: ``model(x, t, t, y)``) once with ``y = -1``: label dropout
    feeds it that label."""
    t = torch.full((x_data.shape[0],), 0.5, dtype=x_data.dtype, device=x_data.device)
    no_label = torch.full((x_data.shape[0],), -1, dtype=torch.long, device=x_data.device)
    try:
        if two_time:
            model(x_data, t, t, no_label)
        else:
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
