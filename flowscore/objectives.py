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
  data set (the exact marginal of fm/sm, reference targets) keep what they need (:attr:`needs_data`);
* :meth:`wrap` the network into the model that is trained and sampled (preconditioning);
* :meth:`floor`: the lowest expected loss a perfect model reaches, or None with :attr:`floor_absent` saying
  why;
* :meth:`loss` every step (under ``torchrun`` each process gets its slice of the batch and a generator of
  its own; built-in objectives instead draw on the whole batch with :meth:`draw` and score their slice
  with :meth:`per_sample`, so that 1 and N processes train on the same pairs).

The built-in objectives on a Gaussian path :math:`x = \alpha_t x_{data} + \beta_t \varepsilon`
(:class:`GaussianObjective`) are :class:`CFM`, :class:`DSM` (conditional targets), :class:`FM` and
:class:`SM` (the exact marginal field of the training set); :func:`objective_from_config` builds the one a
:class:`~flowscore.config.TrainConfig` describes, and ``flowscore.losses.cfm/dsm/fm/sm`` are thin
functions over them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _validate, couplings
from .conditioning import Model
from .config import GAUSSIAN_ONLY
from .conversions import KINDS
from .couplings import DEFAULT_REG
from .floor import LossFloor, loss_floor
from .losses import (
    DIM_REDUCTIONS,
    TIME_SAMPLERS,
    WEIGHTINGS,
    Marginal,
    TimeSampler,
    Weighting,
    conditional_target,
    loss_weight,
    marginal_target,
    prepare_time,
    regress,
    sample_time,
)
from .models import builtin_config
from .paths import GaussianPath, get_path
from .preconditioning import NETWORK_PATHS, Preconditioned

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass
class Batch:
    """One batch as an objective sees it: the data ``x_data`` ``(B, *dims)`` and labels ``y`` ``(B,)`` (or
    None), and what :meth:`Objective.draw` drew for it (None until drawn): times ``t`` ``(B,)``, ``noise``
    and ``x = alpha_t x_data + beta_t noise`` shaped like ``x_data``, reference points ``reference``
    ``(R, *dims)`` with labels ``reference_y`` ``(R,)``, shared by the whole batch.

    ``batch[part]`` is the slice ``part`` of every per-sample field (the references kept whole): a rank's
    share of the global batch. A subclass may add per-sample fields; they are sliced too.
    """

    x_data: torch.Tensor
    y: torch.Tensor | None = None
    t: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    x: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    reference_y: torch.Tensor | None = None

    SHARED = ("reference", "reference_y")

    def __getitem__(self, part: slice) -> Batch:
        values = {
            f.name: (v if f.name in self.SHARED or v is None else v[part])
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return type(self)(**values)


class Objective:
    """A training objective: ``loss(model, x_data, y, generator) -> (B,)`` per-sample losses.

    Attributes:
        name: how runs and messages call it (``"cfm"``, ``"dsm"``, ...; ``"custom"`` for your own).
        prediction: what a model trained on it returns (``"velocity"``, ``"score"``, ``"noise"`` or
            ``"data"``), read by :func:`flowscore.sample` to convert it.
        two_time: True for flow-map objectives, whose model is called as ``model(x, t, s[, y])`` and
            returns the average velocity from time ``t`` to time ``s``.
        floor_absent: why :meth:`floor` returns None (a sentence), shown next to the loss; None where the
            objective has a floor.
        needs_data: True when :meth:`bind` must see the whole training set (then a ``DataLoader``, which
            never gives it, is refused).
        any_source: True when the objective trains with a data source (``TrainConfig.source``): its
            :meth:`draw` takes ``source=``, the batch of source points the trainer draws in place of N(0, I)
            noise (:mod:`flowscore.source_data`); False where it needs the Gaussian source.
    """

    name: str = "custom"
    prediction: str = "velocity"
    two_time: bool = False
    floor_absent: str | None = "this objective does not define a loss floor"
    needs_data: bool = False
    any_source: bool = False

    def loss(
        self,
        model: Model,
        x_data: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(B,)`` per-sample losses of ``model`` on the batch ``x_data`` ``(B, *dims)`` with labels ``y``
        ``(B,)`` (``-1``: no label; None without labels), drawing its randomness from ``generator``.

        Your objective implements this. An objective that overrides :meth:`draw` and :meth:`per_sample`
        instead (the built-in ones) gets ``per_sample(model, draw(x_data, y, generator))``."""
        if self.draws_globally and type(self).per_sample is not Objective.per_sample:
            return self.per_sample(model, self.draw(x_data, y, generator))
        raise NotImplementedError(f"{type(self).__name__} must implement loss(model, x_data, y, generator)")

    def draw(
        self,
        x_data: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        source: torch.Tensor | None = None,
    ) -> Batch:
        """The randomness of a whole (global) batch, drawn before it is split over processes. The default
        draws nothing: :meth:`per_sample` then calls :meth:`loss`, which draws its own. ``source``: the
        ``(B, *dims)`` source points of a data source (objectives with :attr:`any_source` only)."""
        if source is not None:
            raise ValueError(f"{type(self).__name__} draws its own noise: it takes no source batch")
        return Batch(x_data, y)

    def per_sample(
        self, model: Model, batch: Batch, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(B,)`` losses of a (slice of a) :meth:`draw`-n batch; the default is :meth:`loss`."""
        return self.loss(model, batch.x_data, batch.y, generator)

    @property
    def draws_globally(self) -> bool:
        """Whether :meth:`draw` is overridden: the trainer then draws on the global batch under torchrun."""
        return type(self).draw is not Objective.draw

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

    def quality_warning(self, net: nn.Module) -> str | None:
        """A warning for training ``net`` on this objective where that is known to sample badly, or None
        (the default); the trainer shows it when a run starts."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """What a run stores about the objective (JSON): its name, class, prediction and ``two_time``;
        built-in objectives add their options so that they can be rebuilt (:func:`objective_from_dict`)."""
        return {
            "name": self.name,
            "class": type(self).__qualname__,
            "prediction": self.prediction,
            "two_time": self.two_time,
        }


# -- the built-in objectives on a Gaussian path -----------------------------------------------------------
RAW_OK = {"velocity": ("velocity",), "score": ("velocity", "score", "noise")}
"""Per objective space (cfm/fm: velocity, dsm/sm: score), the predictions that train well without
preconditioning in ``bench/bench_matrix.py`` (its "before" rows)."""


class QualityWarning(UserWarning):
    """A training choice that the quality matrix (``bench/bench_matrix.py``) shows to sample badly."""


class ReferencePool:
    """The training set an objective keeps (:meth:`Objective.bind`) for reference-batch targets, and the
    ``size`` reference points it draws for each batch (without replacement). ``at_most``: a training set
    smaller than ``size`` gives all its points (else :meth:`bind` refuses it)."""

    def __init__(self, size: int, at_most: bool = False):
        self.size = _validate.integer(size, "reference_size", minimum=0)
        self.at_most = bool(at_most)
        self.points: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def bind(self, x_data: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Keeps ``x_data`` ``(N, *dims)`` and its labels when ``size > 0``."""
        if not self.size:
            return
        if self.size > x_data.shape[0] and not self.at_most:
            raise ValueError(
                f"reference_size {self.size} is larger than the {x_data.shape[0]} training points it is "
                "drawn from (without replacement); pass a smaller --reference-size"
            )
        self.points = (x_data, labels)

    def draw(
        self, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(reference, reference_y)``: ``(size, *dims)`` points and their labels (None without labels),
        drawn from ``generator``; ``(None, None)`` when ``size`` is 0 or nothing is bound."""
        if not self.size or self.points is None:
            return None, None
        pool, pool_y = self.points
        pick = torch.randperm(pool.shape[0], generator=generator, device=pool.device)[: self.size]
        return pool[pick], None if pool_y is None else pool_y[pick]


class GaussianObjective(Objective):
    r"""A regression :math:`\lambda(t)\lVert \mathrm{convert}(f_\theta(x, t)) - T\rVert^2` in the objective's
    ``space`` (velocity or score) at ``x = path.sample(x_data, t, noise)``, with ``t`` drawn by
    ``time_sampler`` in ``[t_eps, 1 - t_eps]`` and ``noise`` N(0, I) paired with the data by ``coupling``.
    Subclasses give the target :math:`T` (:meth:`target`).

    Args:
        path: a ``GaussianPath`` or a path name.
        prediction: what the model predicts (default: the objective's space).
        weighting: None, "noise", "likelihood" or a callable ``lambda(t)``
            (:func:`flowscore.losses.loss_weight`).
        time_sampler: "uniform", "logit-normal" or a callable ``(n, generator) -> t``.
        t_eps: times are kept in ``[t_eps, 1 - t_eps]``.
        coupling, coupling_reg: how noise is paired with the data of a batch
            (:func:`flowscore.couplings.couple`; cfm/dsm only).
        reference_size: reference-batch targets: this many points of the bound training set drawn per batch
            (cfm/dsm only, with the independent coupling).
        dim_reduction: "sum" (squared norm) or "mean" over the dims of a sample.
        precondition: :meth:`wrap` wraps the network in :class:`flowscore.Preconditioned` for the path and
            prediction, with ``sigma_data`` the data's per-coordinate standard deviation and
            ``network_path`` ("own": the path's own scalings; "linear": the linear path's network at the
            time of equal log-SNR, :mod:`flowscore.preconditioning`).
    """

    space: str = "velocity"

    def __init__(
        self,
        path: GaussianPath | str = "linear",
        *,
        prediction: str | None = None,
        weighting: str | Weighting | None = None,
        time_sampler: str | TimeSampler = "uniform",
        t_eps: float = 1e-3,
        coupling: str = "independent",
        coupling_reg: float = DEFAULT_REG,
        reference_size: int = 0,
        dim_reduction: str = "sum",
        precondition: bool = False,
        sigma_data: float = 1.0,
        network_path: str = "own",
    ):
        if not isinstance(path, (GaussianPath, str)):
            raise ValueError(f"path must be a GaussianPath or a path name, got {type(path).__name__}")
        self.path = get_path(path)
        self.prediction = _validate.choice(prediction or self.space, KINDS, "prediction")
        if isinstance(weighting, str):
            _validate.choice(weighting, WEIGHTINGS, "weighting")
        if isinstance(time_sampler, str):
            _validate.choice(time_sampler, TIME_SAMPLERS, "time_sampler")
        self.weighting, self.time_sampler = weighting, time_sampler
        self.t_eps = _validate.t_eps(t_eps)
        self.coupling = _validate.choice(coupling, couplings.COUPLINGS, "coupling")
        self.coupling_reg = coupling_reg
        self.reference_size = _validate.integer(reference_size, "reference_size", minimum=0)
        self._references = ReferencePool(self.reference_size)
        self.dim_reduction = _validate.choice(dim_reduction, DIM_REDUCTIONS, "dim_reduction")
        self.precondition = bool(precondition)
        self.sigma_data = _validate.number(sigma_data, "sigma_data", low=0.0, low_open=True)
        self.network_path = _validate.choice(network_path, NETWORK_PATHS, "network_path")
        self.needs_data = self.reference_size > 0

    # -- one batch: draw, target, weight, per-sample loss --------------------------------------------------
    def draw(
        self,
        x_data: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        t: torch.Tensor | float | None = None,
        noise: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        reference_y: torch.Tensor | None = None,
        source: torch.Tensor | None = None,
    ) -> Batch:
        """The batch's ``t`` (drawn by ``time_sampler``, or the given one clamped into ``[t_eps, 1 -
        t_eps]``), ``noise`` (drawn N(0, I), or given; ``source``: the source points of a data source in
        its place, objectives with :attr:`any_source` only), paired with the data by ``coupling`` (within
        the labels ``y``), then ``reference_size`` reference points of the bound training set (without
        replacement; or the given ``reference``), drawn from ``generator`` in this order."""
        x_data = _validate.batch(x_data, "x_data")
        if source is not None:
            if not self.any_source or noise is not None:
                why = "noise is given too" if noise is not None else f"{self.name} {GAUSSIAN_ONLY}"
                raise ValueError(f"a source batch for {type(self).__name__}: {why}")
            noise = _validate.tensor(source, "source")
            _validate.same_shape(x_data, noise, "x_data", "source")
        if t is None:
            t = sample_time(
                x_data.shape[0], time_sampler=self.time_sampler, t_eps=self.t_eps, generator=generator,
                dtype=x_data.dtype, device=x_data.device,
            )  # fmt: skip
        else:
            t = prepare_time(t, x_data, self.t_eps)
        if noise is None:
            noise = torch.randn(x_data.shape, generator=generator, dtype=x_data.dtype, device=x_data.device)
        noise = couplings.couple(
            x_data, noise, self.coupling, reg=self.coupling_reg, y=y, generator=generator
        )
        if reference is None and self._references.points is not None:
            reference, reference_y = self._references.draw(generator)
        return Batch(x_data, y, t, noise, self.path.sample(x_data, t, noise), reference, reference_y)

    def target(self, batch: Batch) -> torch.Tensor:
        """The regression target ``T`` ``(B, *dims)`` in :attr:`space` at ``batch.x``."""
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        r"""``(B,)`` weights :math:`\lambda(t)` (:func:`flowscore.losses.loss_weight`)."""
        return loss_weight(
            self.path,
            t,
            self.space,
            self.weighting,
            time_sampler=self.time_sampler,
            t_eps=self.t_eps,
            sigma_data=self.sigma_data if self.precondition else None,  # "network": that of the scalings
        )

    def per_sample(
        self, model: Model, batch: Batch, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        r"""``(B,)``: :math:`\lambda(t)\lVert \mathrm{convert}_{prediction \to space}(model(x, t[, y])) -
        T\rVert^2` of a drawn batch."""
        target, weight = self.target(batch), self.weight(batch.t)
        return regress(
            model, batch.x, batch.t, batch.y, self.path, self.prediction, self.space, target, weight, "none",
            self.dim_reduction,
        )  # fmt: skip

    # -- data, network, floor --------------------------------------------------------------------------------
    def bind(self, x_data: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Keeps the training set as the pool of reference points (``reference_size > 0``)."""
        self._references.bind(x_data, labels)

    def wrap(self, net: nn.Module) -> nn.Module:
        """``Preconditioned(net, path, prediction, sigma_data, network_path)`` when :attr:`precondition`, else
        ``net``."""
        if not self.precondition:
            return net
        return Preconditioned(
            net, self.path, self.prediction, sigma_data=self.sigma_data, network_path=self.network_path
        )

    @property
    def floor_absent(self) -> str | None:  # type: ignore[override]
        if self.coupling != "independent":
            return (
                f"the {self.coupling} coupling pairs noise and data through the whole batch: the conditional "
                "mean of its target given x has no closed form, so its floor cannot be computed (the "
                "independent coupling's floor is not this loss's floor)"
            )
        if self.reference_size:
            return (
                "reference-batch targets average the target over random reference points: the floor of "
                "that loss is not the plain target's floor and is not computed"
            )
        return None

    def floor(
        self,
        x_data: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        p_uncond: float = 0.0,
        **options: Any,
    ) -> LossFloor | None:
        """:func:`flowscore.loss_floor` of the training set ``x_data`` with this objective's weighting,
        time sampler, ``t_eps`` and dim reduction; with ``labels``, the floor of label dropout with
        probability ``p_uncond`` (:meth:`LossFloor.label_dropout`). ``options``: ``n_samples``, ``seed``,
        ``progress``, ... of :func:`flowscore.loss_floor`. None with :attr:`floor_absent` saying why."""
        if self.floor_absent is not None:
            return None
        floor = loss_floor(
            x_data, self.path, self.name, labels=labels,
            weighting=None if self.weighting is None else self.weight,  # the loss's own weights
            time_sampler=self.time_sampler, t_eps=self.t_eps, dim_reduction=self.dim_reduction, **options,
        )  # fmt: skip
        return floor if labels is None else floor.label_dropout(p_uncond)

    def quality_warning(self, net: nn.Module) -> str | None:
        """The warning for training the raw network ``net`` where that samples badly (a prediction outside
        :data:`RAW_OK` of the objective's space, not preconditioned), or None.

        A raw noise or score output is divided by ``alpha_t`` on its way to the velocity, and a raw data
        output by ``beta_t`` on its way to the velocity and the score, so its error is amplified near one
        end; at the budget that trains a good velocity model such cells sample far worse
        (``bench/results/matrix.md``).
        """
        if self.precondition or isinstance(net, Preconditioned) or self.prediction in RAW_OK[self.space]:
            return None
        objectives = "cfm/fm" if self.space == "velocity" else "dsm/sm"
        return (
            f"a {self.prediction} prediction trained with {objectives} without preconditioning samples far "
            "worse than a preconditioned one at the same budget (bench/results/matrix.md); use "
            "precondition=True (--precondition) with the built-in models, or wrap your network in "
            "flowscore.Preconditioned"
        )

    def to_dict(self) -> dict[str, Any]:
        def named(value: object) -> object:
            return "callable" if callable(value) else value  # a run rebuilds it from its config

        return {
            **super().to_dict(), "path": self.path.config(), "weighting": named(self.weighting),
            "time_sampler": named(self.time_sampler), "t_eps": self.t_eps, "coupling": self.coupling,
            "coupling_reg": self.coupling_reg, "reference_size": self.reference_size,
            "dim_reduction": self.dim_reduction, "precondition": self.precondition,
            "sigma_data": self.sigma_data, "network_path": self.network_path,
        }  # fmt: skip


class _ConditionalObjective(GaussianObjective):
    """cfm/dsm: the target is the conditional one of the objective's space, ``path.target(x_data, t, noise,
    space)``, or with reference points its posterior average over them
    (:func:`flowscore.losses.conditional_target`)."""

    def target(self, batch: Batch) -> torch.Tensor:
        return conditional_target(
            self.path, self.space, batch.x_data, batch.t, batch.noise, batch.reference, batch.reference_y,
            batch.y, self.coupling,
        )  # fmt: skip


class CFM(_ConditionalObjective):
    r"""Conditional flow matching: :math:`\lambda(t)\lVert v_\theta(x, t) - (\alpha'_t x_{data} + \beta'_t
    \varepsilon)\rVert^2` (with reference points: the posterior average of that target over them)."""

    name, space = "cfm", "velocity"
    any_source = True


class DSM(_ConditionalObjective):
    r"""Denoising score matching: :math:`\lambda(t)\lVert s_\theta(x, t) + \varepsilon/\beta_t\rVert^2` (with
    reference points: the posterior average of that target over them). Default prediction: the score."""

    name, space = "dsm", "score"


class _MarginalObjective(GaussianObjective):
    """fm/sm: the target is the exact marginal field of the training set (:meth:`bind` builds its
    ``EmpiricalMarginal``; with labels the class-conditional field), or of a given ``marginal``."""

    needs_data = True

    def __init__(
        self, path: GaussianPath | str | None = None, *, marginal: Marginal | None = None, **options: Any
    ):
        if marginal is not None and not all(hasattr(marginal, a) for a in ("path", "velocity", "score")):
            raise ValueError(
                "marginal must have .path, .velocity(x, t) and .score(x, t) (e.g. flowscore.marginals."
                f"EmpiricalMarginal), got {type(marginal).__name__}"
            )
        if options.get("coupling", "independent") != "independent" or options.get("reference_size", 0):
            raise ValueError(
                f"{self.name} regresses on the exact marginal of the independent coupling: no coupling or "
                "reference_size"
            )
        super().__init__(marginal.path if marginal is not None else (path or "linear"), **options)
        self.marginal = marginal
        self.needs_data = marginal is None

    def bind(self, x_data: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        from .marginals import EmpiricalMarginal

        self.marginal = EmpiricalMarginal(x_data, self.path, labels=labels)

    def target(self, batch: Batch) -> torch.Tensor:
        if self.marginal is None:
            raise ValueError(f"{self.name} needs the training set: call bind(x_data) first")
        return marginal_target(self.marginal, self.space, batch.x, batch.t, batch.y)

    @property
    def floor_absent(self) -> str:  # type: ignore[override]
        return (
            f"{self.name} regresses on the exact marginal field, which a perfect model reaches: its floor "
            "is 0"
        )


class FM(_MarginalObjective):
    r"""Flow matching: :math:`\lambda(t)\lVert v_\theta(x, t) - u_t(x)\rVert^2` with the exact marginal
    velocity :math:`u_t(x)` of the training set."""

    name, space = "fm", "velocity"


class SM(_MarginalObjective):
    r"""Score matching: :math:`\lambda(t)\lVert s_\theta(x, t) - \nabla_x\log p_t(x)\rVert^2` with the exact
    marginal score of the training set. Default prediction: the score."""

    name, space = "sm", "score"


BUILTIN: dict[str, type[GaussianObjective]] = {"cfm": CFM, "dsm": DSM, "fm": FM, "sm": SM}
"""The built-in objectives by name (``TrainConfig.objective``)."""


def objective_from_config(
    config: TrainConfig,
    path: GaussianPath | None = None,
    model: nn.Module | None = None,
    sigma_data: float | None = None,
) -> Objective:
    """The built-in objective a :class:`~flowscore.config.TrainConfig` describes (``path``: its path,
    built from the config when None). Preconditioning (``config.precondition``, ``sigma_data``: the run's,
    None for ``config.data_std``, or 1 when that is None too) applies to flowscore's built-in networks only:
    ``model``, when given and not one of them, is trained as given."""
    path = get_path(config.path, **config.path_options) if path is None else path
    if sigma_data is None:
        sigma_data = 1.0 if config.data_std is None else config.data_std
    precondition = config.precondition and (model is None or builtin_config(model) is not None)
    if config.objective == "sbcfm":  # flowscore.sbcfm: the Brownian bridge, not a Gaussian path
        from .sbcfm import SBCFM

        return SBCFM(config.sb_sigma, t_eps=config.t_eps)
    if config.objective in _flow_maps():  # flowscore.flowmaps: their own time pairs and weighting
        return _flow_maps()[config.objective](
            path, sigma_data=sigma_data, precondition=precondition, reference_size=config.reference_size
        )
    options = dict(
        prediction=config.prediction, weighting=config.resolved_weighting(),
        time_sampler=config.resolved_time_sampler(), t_eps=config.t_eps, sigma_data=sigma_data,
        precondition=precondition, network_path=config.network_path,
    )  # fmt: skip
    if config.objective in ("cfm", "dsm"):
        options.update(
            coupling=config.coupling, coupling_reg=config.coupling_reg, reference_size=config.reference_size
        )
    return BUILTIN[config.objective](path, **options)


def _flow_maps() -> dict[str, type[Objective]]:
    """:data:`flowscore.flowmaps.FLOW_MAP_OBJECTIVES` (imported when needed: flowmaps builds on this
    module)."""
    from .flowmaps import FLOW_MAP_OBJECTIVES

    return dict(FLOW_MAP_OBJECTIVES)


def objective_from_dict(values: dict[str, Any]) -> Objective:
    """A built-in objective from its :meth:`Objective.to_dict` (``ValueError`` for your own objective, whose
    code a run does not store, or for a callable weighting or time sampler)."""
    if isinstance(values, dict) and values.get("name") == "sbcfm":
        from .sbcfm import SBCFM

        try:
            return SBCFM(values["sigma"], t_eps=values["t_eps"], score=values["score"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"objective description {values} is malformed ({err})") from None
    if isinstance(values, dict) and values.get("name") in _flow_maps():
        options = {
            k: v for k, v in values.items() if k not in ("name", "class", "two_time", "prediction", "path")
        }
        try:
            path = values["path"]
            path = get_path(path["name"], **{k: v for k, v in path.items() if k != "name"})
            return _flow_maps()[values["name"]](path, **options)
        except (KeyError, TypeError) as err:
            raise ValueError(f"objective description {values} is malformed ({err})") from None
    if not isinstance(values, dict) or values.get("name") not in BUILTIN:
        raise ValueError(
            f"objective {values.get('name') if isinstance(values, dict) else values!r} is not a built-in "
            "one: pass your objective again"
        )
    if "callable" in (values.get("weighting"), values.get("time_sampler")):
        raise ValueError("an objective with a callable weighting or time sampler cannot be rebuilt: pass it")
    path = values.get("path") or {}
    options = {k: v for k, v in values.items() if k not in ("name", "class", "two_time", "path")}
    try:
        path = get_path(path["name"], **{k: v for k, v in path.items() if k != "name"})
        return BUILTIN[values["name"]](path, **options)
    except (KeyError, TypeError) as err:
        raise ValueError(f"objective description {values} is malformed ({err})") from None


def quality_warning(config: TrainConfig, model: nn.Module) -> str | None:
    """:meth:`GaussianObjective.quality_warning` of the objective ``config`` trains ``model`` with."""
    return objective_from_config(config, model=model).quality_warning(model)


__all__ = [
    "BUILTIN",
    "CFM",
    "DSM",
    "FM",
    "RAW_OK",
    "SM",
    "Batch",
    "GaussianObjective",
    "Objective",
    "QualityWarning",
    "objective_from_config",
    "objective_from_dict",
    "quality_warning",
]
