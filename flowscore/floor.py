r"""The loss floor: the lowest value the conditional losses (CFM, DSM) can reach.

For the velocity (``objective="cfm"``) or score (``"dsm"``) regression target :math:`T`,

.. math::  L_{cond}(\theta) = L_{marg}(\theta) + C,\qquad
           C = E_{t,\,x_{data},\,\varepsilon}\ \lambda(t)\,\lVert T(x|x_{data}) - T(x)\rVert^2 \ \ge 0,

where :math:`T(x|x_{data})` is the conditional target (``path.target``) and
:math:`T(x) = E[T(x|x_{data})|x]` the exact marginal field. A perfect model reaches ``L_marg = 0``, so ``C``
is what it reaches on CFM/DSM. :func:`loss_floor` estimates ``C`` by Monte Carlo with the exact marginal of
the data set (the data set itself is the distribution), overall and per bin of t, with standard errors.

With class labels y (a model ``f(x, t, y)`` that sees the class of ``x_data``) the best prediction is the
class-conditional field :math:`T(x|y) = E[T(x|x_{data})|x, y]`, and the conditional floor

.. math::  C_{cond} = E\,\lambda(t)\lVert T(x|x_{data}) - T(x|y)\rVert^2
           = C - E\,\lambda(t)\lVert T(x|y) - T(x)\rVert^2 \le C

is lower by what the label tells about ``x_data``. A model trained with labels dropped (replaced by -1)
with probability p learns ``T(x|y)`` and ``T(x)`` separately, so its floor is
``(1 - p) C_cond + p C`` (:meth:`LossFloor.label_dropout_value`).

A training run computes the floor of its objective on its training data once, when it starts
(:func:`_loss_floor`, absent with the reason when the data set is too large or streamed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from . import _validate
from .losses import (
    OBJECTIVES,
    TimeSampler,
    Weighting,
    draw,
    loss_weight,
    marginal_target,
    objective_name,
    squared_error,
)
from .marginals import EmpiricalMarginal
from .paths import GaussianPath, get_path

if TYPE_CHECKING:
    from .config import TrainConfig
    from .prepare import _Prepared

FLOOR_OBJECTIVES = ("cfm", "dsm")
"""The conditional objectives that have a floor (``"flow"`` and ``"score"`` are accepted as aliases)."""
FLOOR_BATCH_ELEMENTS = 1 << 22
"""At most this many numbers (draws x dims) per batch of draws, whatever ``batch_size`` says: bounds the
memory of high-dimensional data (the marginal itself streams over the data in chunks)."""


@dataclass(frozen=True)
class LossFloor:
    """Monte Carlo estimate of the loss floor ``C``.

    ``value`` +- ``standard_error`` is the overall mean over ``n_samples`` draws of ``(t, x_data, noise)``;
    ``per_bin[k]`` is the mean of the draws whose t lies in ``[bin_edges[k], bin_edges[k + 1])`` (the last bin
    closed), i.e. ``E[. | t in bin k]``, from ``bin_counts[k]`` draws. Hence
    ``sum_k bin_counts[k] * per_bin[k] / n_samples == value``. An empty bin has ``per_bin`` and standard
    error 0 (and count 0).

    ``conditional`` says whether the model sees the class labels (the floor of ``f(x, t, y)``); a conditional
    floor carries in ``unconditional`` the floor of a label-blind model ``f(x, t)``, estimated on the same
    draws (so that their difference has a small standard error).
    """

    value: float
    standard_error: float
    bin_edges: list[float]
    per_bin: list[float]
    per_bin_standard_error: list[float]
    bin_counts: list[int]
    n_samples: int
    objective: str
    conditional: bool = False
    unconditional: LossFloor | None = None
    p_uncond: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields (``unconditional`` nested)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: object, _nested: bool = True) -> LossFloor:
        """The floor of a :meth:`to_dict` (as a run stores it; keys it does not know are ignored);
        ``ValueError`` when it is malformed."""
        if not isinstance(values, dict):
            raise ValueError(f"a loss floor must be a dict, got {type(values).__name__}")
        known = {f.name for f in fields(cls)} - {"unconditional"}
        inner = values.get("unconditional")
        if inner is not None and not _nested:
            raise ValueError("a loss floor's unconditional floor has no unconditional floor of its own")
        for key in ("value", "standard_error"):
            if isinstance(values.get(key), bool) or not isinstance(values.get(key), (int, float)):
                raise ValueError(f"a loss floor's {key} must be a number, got {values.get(key)!r}")
        try:
            return cls(
                **{k: v for k, v in values.items() if k in known},
                unconditional=None if inner is None else cls.from_dict(inner, _nested=False),
            )
        except TypeError as err:
            raise ValueError(f"a loss floor is malformed ({err})") from None

    def __getitem__(self, key: str) -> Any:
        """``floor["value"]``, as when a run's floor was a dict (older code reads it so)."""
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """``floor.get("value")``, as for a dict."""
        return getattr(self, key, default) if key in {f.name for f in fields(self)} else default

    def label_dropout(self, p_uncond: float) -> LossFloor:
        r"""The floor of the loss trained with label dropout: :math:`p\,C + (1 - p)\,C_y`.

        With probability ``p = p_uncond`` a point's label is -1 and the best prediction is the exact
        marginal field of all the data (floor ``C``, ``unconditional``); otherwise it is the field of its
        class (the conditional floor ``C_y``, ``value``). The predictions for different labels are separate
        functions, so the floor is that mixture. Both floors come from the same draws, so the standard error
        is bounded by the sum of the two weighted errors. Returns this floor with ``value`` and
        ``standard_error`` of the mixture and ``p_uncond`` set (itself for an unconditional floor).
        """
        p = _validate.number(p_uncond, "p_uncond", 0.0, 1.0)
        if self.unconditional is None:
            return self
        se = (1 - p) * self.standard_error + p * self.unconditional.standard_error
        return replace(self, value=self.label_dropout_value(p), standard_error=se, p_uncond=p)

    def label_dropout_value(self, p_uncond: float) -> float:
        """The floor of a model trained with labels dropped with probability ``p_uncond``:
        ``(1 - p) * value + p * unconditional.value`` (``value`` itself for an unconditional floor)."""
        p = _validate.number(p_uncond, "p_uncond", 0.0, 1.0)
        if self.unconditional is None:
            return self.value
        return (1 - p) * self.value + p * self.unconditional.value


def excess_text(loss: float, value: float | None, standard_error: float | None, absent: str | None) -> str:
    """``"loss floor F +- se (excess E +- se, ...)"``: the loss's excess over the floor with the floor's
    standard error (a Monte Carlo estimate: an excess within 2 standard errors of 0, negative included, is 0
    within noise); ``"no loss floor: why"`` without a floor."""
    if value is None:
        return f"no loss floor: {absent or 'not computed'}"
    se = standard_error or 0.0
    excess = loss - value
    verdict = "0 within noise" if abs(excess) <= 2 * se else ("above" if excess > 0 else "BELOW the floor")
    return f"loss floor {value:.4g} ± {se:.2g} (excess {excess:+.3g} ± {se:.2g}: {verdict})"


def floor_terms(
    marginal: Any,
    x_data: torch.Tensor,
    kind: str,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    y: torch.Tensor | None = None,
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    dim_reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(t, c)``, both ``(B,)``: times and :math:`\lambda(t)\lVert T(x|x_{data}) - T(x)\rVert^2` per draw.

    ``kind`` is "velocity" or "score"; ``t``/``noise`` are drawn as in the losses when None. With class
    labels ``y`` (``(B,)``, the classes of ``x_data``; a labelled marginal) the exact field is the
    class-conditional one, :math:`T(x|y)`.
    """
    t, c, _ = _floor_terms(
        marginal,
        x_data,
        kind,
        t,
        noise,
        y=y,
        both=False,
        weighting=weighting,
        time_sampler=time_sampler,
        t_eps=t_eps,
        generator=generator,
        dim_reduction=dim_reduction,
    )
    return t, c


def _floor_terms(
    marginal: Any,
    x_data: torch.Tensor,
    kind: str,
    t: torch.Tensor | None,
    noise: torch.Tensor | None,
    *,
    y: torch.Tensor | None,
    both: bool,
    weighting: str | Weighting | None,
    time_sampler: str | TimeSampler,
    t_eps: float,
    generator: torch.Generator | None,
    dim_reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(t, c, c_unconditional)``: :func:`floor_terms` given ``y`` and, when ``both``, the label-blind
    terms on the same draws (else None)."""
    path = marginal.path
    t, noise, x = draw(x_data, path, t, noise, time_sampler=time_sampler, t_eps=t_eps, generator=generator)
    conditional = path.target(x_data, t, noise, kind)
    weight = loss_weight(path, t, kind, weighting, time_sampler=time_sampler, t_eps=t_eps)

    def term(labels: torch.Tensor | None) -> torch.Tensor:
        exact = marginal_target(marginal, kind, x, t, labels)
        return weight * squared_error(conditional, exact, dim_reduction)

    return t, term(y), (term(None) if both else None)


def draw_data(marginal: Any, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws of ``x_data`` from the distribution behind ``marginal`` (see :func:`draw_labelled`)."""
    return draw_labelled(marginal, n, generator)[0]


def draw_labelled(
    marginal: Any, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` draws of ``x_data`` from the distribution behind ``marginal``, and their class labels ``(n,)``
    (None when the marginal has no labels).

    An ``EmpiricalMarginal`` (anything with a ``.data`` tensor, and ``.labels``) is sampled uniformly with
    replacement; a mixture marginal must offer ``sample_data(n, generator=)`` returning ``(x, y)``, or a
    ``.mixture`` with ``sample(n, generator=)``.
    """
    data = getattr(marginal, "data", None)
    if isinstance(data, torch.Tensor):
        idx = torch.randint(
            0, data.shape[0], (n,), generator=generator, device=generator.device if generator else "cpu"
        ).to(data.device)
        labels = getattr(marginal, "labels", None)
        return data[idx], None if labels is None else labels[idx]
    if hasattr(marginal, "sample_data"):
        x, y = marginal.sample_data(n, generator=generator)
        return x.to(marginal.dtype), None if getattr(marginal, "num_classes", None) is None else y
    mixture = getattr(marginal, "mixture", None)
    if mixture is not None and hasattr(mixture, "sample"):
        return mixture.sample(n, generator=generator).to(marginal.dtype), None
    raise ValueError(
        f"cannot draw data from {type(marginal).__name__}: expected a .data tensor, a "
        "sample_data(n, generator) method or a .mixture with sample(n, generator)"
    )


def as_marginal(
    data: Any,
    path: GaussianPath | str | None,
    chunk_size: int | None = None,
    labels: torch.Tensor | None = None,
) -> Any:
    """``data`` as an exact marginal on ``path``: a tensor becomes an ``EmpiricalMarginal`` (float64; with
    ``labels`` ``(N,)`` a labelled one); a marginal (with ``.path``, ``.velocity``, ``.score``) is used as
    is, must live on ``path`` if given, and carries its own labels."""
    if isinstance(data, torch.Tensor):
        if path is None:
            raise ValueError("path is required when data is a tensor")
        data = _validate.batch(data, "data")
        return EmpiricalMarginal(data.double(), get_path(path), chunk_size=chunk_size, labels=labels)
    if not all(hasattr(data, a) for a in ("path", "velocity", "score")):
        raise ValueError(f"data must be a tensor (N, *dims) or a marginal, got {type(data).__name__}")
    if labels is not None:
        raise ValueError(
            "labels go with a data tensor; a marginal carries its own (EmpiricalMarginal(data, path, "
            "labels=y), or GaussianMixture(..., labels=classes))"
        )
    if path is not None:
        path = get_path(path)
        if path != data.path:  # by value (GaussianPath.spec): an equal path built again is the same path
            raise ValueError(f"path {path!r} differs from the marginal's path {data.path!r}")
    return data


def _mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error ``std / sqrt(n)`` (0 for fewer than two values)."""
    n = values.numel()
    if n == 0:
        return 0.0, 0.0
    se = values.std().item() / math.sqrt(n) if n > 1 else 0.0
    return values.mean().item(), se


def summarize(
    t: torch.Tensor,
    c: torch.Tensor,
    n_bins: int,
    objective: str,
    unconditional: LossFloor | None = None,
) -> LossFloor:
    """A :class:`LossFloor` from per-draw times ``t`` and floor terms ``c``, both ``(n,)``; bins on [0, 1].
    Given the ``unconditional`` floor of the same draws, the result is the conditional floor."""
    t, c = t.double().cpu(), c.double().cpu()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    which = torch.bucketize(t, edges[1:-1], right=True)  # bin k holds edges[k] <= t < edges[k + 1]
    per_bin = [_mean_and_error(c[which == k]) for k in range(n_bins)]
    value, se = _mean_and_error(c)
    return LossFloor(
        value=value,
        standard_error=se,
        bin_edges=edges.tolist(),
        per_bin=[m for m, _ in per_bin],
        per_bin_standard_error=[s for _, s in per_bin],
        bin_counts=torch.bincount(which, minlength=n_bins).tolist(),
        n_samples=c.numel(),
        objective=objective,
        conditional=unconditional is not None,
        unconditional=unconditional,
    )


def loss_floor(
    data: Any,
    path: GaussianPath | str | None = None,
    objective: str = "cfm",
    *,
    n_samples: int = 100_000,
    n_bins: int = 10,
    weighting: str | Weighting | None = None,
    time_sampler: str | TimeSampler = "uniform",
    t_eps: float = 1e-3,
    seed: int = 0,
    batch_size: int = 8192,
    chunk_size: int | None = None,
    progress: bool = True,
    dim_reduction: str = "sum",
    labels: torch.Tensor | None = None,
) -> LossFloor:
    r"""Monte Carlo estimate of the loss floor :math:`C = E\,\lambda(t)\lVert T(x|x_{data}) - T(x)\rVert^2`.

    Args:
        data: ``(N, *dims)`` tensor (its empirical distribution is the data distribution; computed in
            float64), or an exact marginal (``EmpiricalMarginal`` or a mixture marginal).
        path: the Gaussian path (instance or name); optional when ``data`` is a marginal.
        objective: ``"cfm"`` (velocity target: the floor of CFM; alias ``"flow"``) or ``"dsm"`` (score
            target: the floor of DSM; alias ``"score"``).
        n_samples: number of draws of ``(t, x_data, noise)``; the standard error falls as ``1/sqrt(n)``.
        n_bins: equal-width bins of t on [0, 1] for ``per_bin``.
        weighting, time_sampler, t_eps: as in :func:`flowscore.losses.cfm` (t in ``[t_eps, 1 - t_eps]``).
            The score floor grows like ``1/beta_t^2`` near t = 1 until the posterior collapses on one data
            point; a larger ``t_eps`` (e.g. 0.02) keeps its variance moderate.
        seed: seed of the draws (reproducible).
        batch_size: draws per batch, capped so that a batch holds at most ``FLOOR_BATCH_ELEMENTS`` numbers
            (memory ``batch x chunk`` for the marginal, ``batch x dims`` for the draws).
        chunk_size: data points per chunk of the marginal (tensor ``data`` only).
        progress: show a tqdm bar (only if the run lasts more than about a second).
        dim_reduction: ``"sum"`` (squared norm, as the losses by default) or ``"mean"`` over the dims.
        labels: ``(N,)`` integer class labels ``0..K-1`` of a tensor ``data`` (a marginal carries its own).

    Returns:
        :class:`LossFloor` with the overall value, per-bin values and their standard errors. With labels
        (given here, or a labelled marginal) it is the conditional floor (a model ``f(x, t, y)``), with the
        label-blind floor of the same draws in ``.unconditional``: both cost a pass over the data per draw.
    """
    objective = objective_name(objective, FLOOR_OBJECTIVES)
    _validate.positive_int(n_samples, "n_samples")
    _validate.positive_int(n_bins, "n_bins")
    _validate.positive_int(batch_size, "batch_size")
    marginal = as_marginal(data, path, chunk_size, labels)
    labelled = getattr(marginal, "num_classes", None) is not None
    kind = OBJECTIVES[objective]
    dims = math.prod(getattr(marginal, "point_shape", ()))
    batch_size = max(1, min(batch_size, FLOOR_BATCH_ELEMENTS // dims))
    generator = torch.Generator().manual_seed(seed)
    ts, cs, blind = [], [], []
    bar = tqdm(
        total=n_samples, desc=f"loss floor ({objective})", delay=1.0, disable=not progress, leave=False
    )
    with bar, torch.no_grad():
        for start in range(0, n_samples, batch_size):
            x_data, y = draw_labelled(marginal, min(batch_size, n_samples - start), generator)
            t, c, c_blind = _floor_terms(
                marginal,
                x_data,
                kind,
                None,
                None,
                y=y,
                both=labelled,
                weighting=weighting,
                time_sampler=time_sampler,
                t_eps=t_eps,
                generator=generator,
                dim_reduction=dim_reduction,
            )
            ts.append(t)
            cs.append(c)
            blind.append(c_blind)
            bar.update(x_data.shape[0])
    t = torch.cat(ts)
    unconditional = summarize(t, torch.cat(blind), n_bins, objective) if labelled else None
    return summarize(t, torch.cat(cs), n_bins, objective, unconditional)


__all__ = [
    "FLOOR_OBJECTIVES",
    "LossFloor",
    "as_marginal",
    "draw_data",
    "draw_labelled",
    "excess_text",
    "floor_terms",
    "loss_floor",
    "summarize",
]


# -- the floor of a training run ---------------------------------------------------------------------------
FLOOR_MAX_SIZE = 1_000_000
"""The loss floor is computed when (training points) x (dims per point) is at most this."""


FLOOR_WORK = 4e8
"""Monte Carlo draws of the floor: ``clamp(FLOOR_WORK / (N * D), 2000, 20000)`` (cost ~ draws x N x D)."""


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
    if prepared.source is not None:
        from .source_data import FLOOR_ABSENT

        return None, FLOOR_ABSENT
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
