"""The workflows behind ``flowscore sample``, ``eval`` and ``plot``, on a trained run.

A run (:func:`flowscore.runs.load_run`) holds the model, its path and prediction kind, the normalizer that
maps data to the model's space and back, and held-out data. Everything here returns data-space values:
samples are decoded with the normalizer before they are returned or saved. Each workflow checks what it can
(the data shape it can plot, the memory its output needs) before it computes or writes anything, runs the
model on the thread count of :func:`flowscore.resources.choose_threads` (or ``threads``), and samples in
batches of :data:`SAMPLE_BATCH` points so that memory does not grow with ``n``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from . import resources
from .data import is_image
from .samplers import ANY_SOURCE_SAMPLERS, CALLS_PER_STEP, SDE_SAMPLERS, default_steps
from .sbcfm import default_sampler

LABEL_SEED_OFFSET = 2**32
"""Labels drawn by :func:`sample_run` come from a generator seeded ``LABEL_SEED_OFFSET + seed``, apart from
the noise (seed ``seed``): the same seed gives the same noise whatever the classes asked for."""
SAMPLE_BATCH = 8192
"""Points per batch of :func:`sample_run` (a batch of samples is independent of the others)."""
FIELD_TIMES = (0.1, 0.5, 0.9, 0.99)
EVAL_KEYS = (
    "n",
    "ode_sampler",
    "w2_ode",
    "w2_sde",
    "w2_floor",
    "w2_ratio_ode",
    "w2_ratio_sde",
    "w2_units",
    "mmd2_unbiased_ode",
    "mmd2_unbiased_sde",
    "mmd2_unbiased_floor",
    "nll",
    "bits_per_dim",
    "dequantized",
    "per_class",
    "fid",
    "precision",
    "recall",
    "nn_ratio",
)
"""The keys of :func:`evaluate_run`'s result, in order (the last four: :mod:`flowscore.image_metrics`)."""
CLASS_KEYS = ("label", "n", "w2", "w2_floor", "w2_ratio", "mmd2_unbiased", "mmd2_unbiased_floor")
"""The keys of each entry of ``per_class`` in :func:`evaluate_run`'s result."""
W2_UNITS = {
    "points": "data units",
    "images": "normalised per pixel: W2 / sqrt(D) with the data's pixel range mapped to [-1, 1]",
}
"""``w2_units`` of :func:`evaluate_run`: vectors are measured in data units; images in the model's
normalised units (the training data's pixel range mapped to [-1, 1]) divided by ``sqrt(D)``, D the pixels
times channels, i.e. the root-mean-square per-pixel displacement of the optimal coupling (1 = half the
pixel range), comparable across image sizes."""


class _Renamed(dict):
    """A result dict whose earlier key names still read (``result["mmd_ode"]``, ``result.get(...)``); only
    the current names are stored, so JSON holds only them."""

    renamed: ClassVar[dict[str, str]] = {}

    def __missing__(self, key: str) -> Any:
        if key in self.renamed:
            return self[self.renamed[key]]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self or key in self.renamed else default


class EvalResult(_Renamed):
    """:func:`evaluate_run`'s result; ``mmd_ode``, ``mmd_sde``, ``mmd_floor`` (the names before the unbiased
    MMD^2 estimate was called what it is) read ``mmd2_unbiased_*``."""

    renamed: ClassVar[dict[str, str]] = {
        "mmd_ode": "mmd2_unbiased_ode", "mmd_sde": "mmd2_unbiased_sde", "mmd_floor": "mmd2_unbiased_floor",
    }  # fmt: skip


class ClassResult(_Renamed):
    """One entry of ``per_class``; ``mmd`` and ``mmd_floor`` read ``mmd2_unbiased`` and its floor."""

    renamed: ClassVar[dict[str, str]] = {"mmd": "mmd2_unbiased", "mmd_floor": "mmd2_unbiased_floor"}


class Progress:
    """Progress of one long phase of a command, on stderr.

    A tqdm bar (``total`` updates, ``None``: a count) when stderr is a terminal; otherwise one line per
    phase: ``what ...`` when it starts, completed by `` done (S s)`` when it ends. Nothing when ``enabled``
    is False or on a process other than rank 0 of ``torchrun`` (environment ``RANK``).
    """

    def __init__(self, what: str, total: float | None = None, enabled: bool = True, unit: str = "step"):
        self.what, self.total, self.unit = what, total, unit
        self.enabled = enabled and os.environ.get("RANK", "0") == "0"
        self.bar: Any = None
        self.start = 0.0

    def __enter__(self) -> Progress:
        self.start = time.perf_counter()
        if not self.enabled:
            return self
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total, desc=self.what, unit=self.unit, dynamic_ncols=True, file=sys.stderr
            )
        else:
            print(f"{self.what} ...", end="", file=sys.stderr, flush=True)
        return self

    def update(self, count: float = 1) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def __exit__(self, kind: Any, *_: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f" done ({elapsed:.1f} s)" if kind is None else " stopped", file=sys.stderr, flush=True)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def plot_kind_or_none(data_shape: tuple[int, ...]) -> str | None:
    """:func:`plot_kind`, or None for a shape that cannot be plotted."""
    try:
        return plot_kind(data_shape)
    except ValueError:
        return None


def plot_kind(data_shape: tuple[int, ...]) -> str:
    """``"points"`` for 2D points, ``"images"`` for 1- or 3-channel images; ``ValueError`` otherwise."""
    shape = tuple(data_shape)
    if shape == (2,):
        return "points"
    if len(shape) == 3 and shape[0] in (1, 3):
        return "images"
    raise ValueError(f"plots need 2D points or 1- or 3-channel images, but this run's data has shape {shape}")


def _model_threads(run: Any, threads: int | None, batch: int, passes: float) -> int | None:
    """The thread count for running the run's model on ``batch`` points ``passes`` times per step."""
    from .models import builtin_config

    if threads is not None:
        return threads
    config = builtin_config(run.model)
    if config is None:
        return None
    return resources.threads_for(None, config, tuple(run.data_shape), batch, passes)


def _threads(count: int | None) -> contextlib.AbstractContextManager[Any]:
    return resources.using_threads(count) if count is not None else contextlib.nullcontext()


def _passes(sampler: str) -> float:
    return float(CALLS_PER_STEP[sampler])  # one table: flowscore.sampler_registry


def check_sample_memory(run: Any, n: int, *, sampler: str | None = None, steps: int | None = None,
                        trajectory: bool = False) -> None:  # fmt: skip
    """``ValueError`` when ``n`` samples (and their trajectory) of the run cannot fit in memory."""
    sampler = default_sampler(run.model) if sampler is None else sampler
    per_point = 4.0 * math.prod(run.data_shape)
    needed = n * per_point * (1 + ((steps or default_steps(sampler)) + 2 if trajectory else 0))
    from .models import builtin_config, forward_cost

    config = builtin_config(run.model)
    if config is not None:
        needed += min(n, SAMPLE_BATCH) * (forward_cost(config, tuple(run.data_shape))[1] + 8 * per_point)
    resources.check_memory(needed, "cpu", f"sampling {n} points", "pass a smaller --n")


def _batches(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, SAMPLE_BATCH):
        yield start, min(n, start + SAMPLE_BATCH)


def _sampling_what(sampler: str, n: int, steps: int | None) -> str:
    kind = "SDE (Euler-Maruyama)" if sampler == "sde" else sampler
    return f"sampling {n} points: {kind}, {steps or default_steps(sampler)} steps"


# -- sampling ----------------------------------------------------------------------------------------------
def check_class(run: Any, label: int | None, guidance: float = 0.0) -> None:
    """``ValueError`` unless ``label`` and ``guidance`` suit the run: labels only for a labelled run, within
    ``-1 .. num_classes - 1`` (-1: the unconditional model); guidance only with labels."""
    from . import _validate

    _validate.number(guidance, "guidance")
    if not getattr(run, "labelled", False):
        if label is not None or guidance != 0:
            raise ValueError(
                "this run was trained without class labels, so it takes no class and no guidance; train on "
                "labelled data (digits, mnist, an .npz with 'y') for class-conditional sampling"
            )
        return
    if label is None:
        return
    k = run.num_classes
    top = f"{k - 1}" if k is not None else "K-1"
    _validate.integer(label, f"class (0..{top}, or -1 for the unconditional model)", minimum=-1,
                      maximum=None if k is None else k - 1)  # fmt: skip


def draw_labels(run: Any, n: int, label: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """The class of each of ``n`` samples: None for an unlabelled run; ``label`` when given; else drawn
    from the training points per class (so the samples follow the data's class mix), or -1 (the
    unconditional model) when the run does not know them."""
    if not getattr(run, "labelled", False):
        return None
    if label is not None:
        return torch.full((n,), int(label), dtype=torch.long)
    counts = getattr(run, "class_counts", None)
    if not counts or sum(counts) == 0:
        return torch.full((n,), -1, dtype=torch.long)
    weights = torch.tensor(counts, dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def sample_run(
    run: Any,
    n: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    grid: str | None = None,
    seed: int = 0,
    trajectory: bool = False,
    threads: int | None = None,
    progress: bool = False,
    label: int | None = None,
    guidance: float = 0.0,
    return_labels: bool = False,
    clamp: bool = True,
    x_init: Any = None,
) -> Any:
    """``n`` samples of a run in data space, ``(n, *data_shape)`` float32.

    Start points: prior draws, or for a run trained from a data source its held-out source points
    (:func:`flowscore.samplers.sample`); ``x_init`` ``(n, *data_shape)``: your own, in the units of the
    run's source: data units for a data source (encoded with the run's normalizer, like the data), the
    prior's own for N(0, I).

    ``sampler``, ``steps``, ``grid`` None: the defaults of :func:`flowscore.samplers.sample`. The model's
    samples are decoded with the run's normalizer; samples of an image run are then clamped to the
    training data's pixel range (:func:`image_range`; ``clamp=False`` keeps them as decoded; trajectories
    are never clamped). ``progress``: a bar per solver step (:class:`Progress`). Points are drawn in
    batches of :data:`SAMPLE_BATCH` from one generator seeded by ``seed`` (the classes from another, see
    :data:`LABEL_SEED_OFFSET`). With ``trajectory=True`` also returns the decoded states
    ``(T, n, *data_shape)`` from t = 0 (prior) to t = 1.

    Labelled runs: ``label`` k samples class k, -1 the unconditional model, None a class per point drawn
    from the training class frequencies (:func:`draw_labels`); ``guidance`` w is classifier-free guidance,
    ``(1 + w) f(x, t, y) - w f(x, t, -1)`` (``flowscore.samplers.sample``'s ``y`` and ``guidance``). With
    ``return_labels=True`` the labels ``(n,)`` (or None) come last in the returned tuple.
    """
    from .samplers import sample

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    check_class(run, label, guidance)
    x_start = None if x_init is None else start_points(run, n, x_init)
    if (
        getattr(run, "source", None) is not None
        and sampler in SDE_SAMPLERS
        and sampler not in ANY_SOURCE_SAMPLERS
    ):
        raise ValueError(
            f"sampler {sampler!r}: this run was trained from a data source, and SDE sampling needs the score "
            "of a Gaussian source (docs/theory.md section 17); use an ODE sampler"
        )
    check_sample_memory(run, n, sampler=sampler, steps=steps, trajectory=trajectory)
    generator = _generator(seed)
    shape = tuple(run.data_shape)
    out = np.empty((n, *shape), dtype=np.float32)
    all_labels = np.empty(n, dtype=np.int64)
    paths = []
    decode = run.normalizer.decode
    name = sampler or default_sampler(run.model)
    jumps = getattr(run.model, "two_time", False)  # a flow-map model: K jumps, one call each
    passes = (1.0 if jumps else _passes(name)) * (2 if guidance else 1)
    count = _model_threads(run, threads, min(n, SAMPLE_BATCH), passes)
    label_generator = _generator(LABEL_SEED_OFFSET + seed)  # the noise draws do not depend on the labels
    pixel_range = image_range(run) if clamp and is_image(shape) else None
    if jumps:
        from .flowmaps import DEFAULT_JUMPS

        per_batch, what = (
            steps or DEFAULT_JUMPS,
            f"sampling {n} points: {steps or DEFAULT_JUMPS} flow-map jump(s)",
        )
    else:
        per_batch = None if name == "dopri5" else steps or default_steps(name)
        what = _sampling_what(name, n, steps)
    total = None if per_batch is None else per_batch * math.ceil(n / SAMPLE_BATCH)
    bar = Progress(what, total, enabled=progress)

    def step(_: dict[str, Any]) -> None:
        bar.update()

    with _threads(count), bar:
        for start, stop in _batches(n):
            labels = draw_labels(run, stop - start, label, label_generator)
            if labels is not None:
                all_labels[start:stop] = labels.numpy()
            res = sample(
                run.model, run.path, stop - start, prediction=run.prediction, sampler=sampler, steps=steps,
                grid=grid, shape=shape, generator=generator, return_trajectory=trajectory, y=labels,
                guidance=guidance if labels is not None else 0.0, return_info=True,
                callback=step if progress else None, x_init=None if x_start is None else x_start[start:stop],
            )  # fmt: skip
            if trajectory:
                paths.append(decode(res.trajectory.detach()).float().numpy())
            x = decode(res.x.detach()).float()
            out[start:stop] = (x if pixel_range is None else x.clamp(*pixel_range)).numpy()
    result: tuple[Any, ...] = (out, np.concatenate(paths, axis=1)) if trajectory else (out,)
    if return_labels:
        result += (all_labels if getattr(run, "labelled", False) else None,)
    return result if len(result) > 1 else result[0]


def start_points(run: Any, n: int, x_init: Any) -> torch.Tensor:
    """``x_init`` (an array or tensor ``(n, *data_shape)``) as the model's start points: encoded with the
    run's normalizer for a run with a data source, as given (the prior's units) otherwise; one-line
    ``ValueError`` for a wrong shape or non-finite values."""
    x = torch.as_tensor(np.asarray(x_init) if not isinstance(x_init, torch.Tensor) else x_init).float()
    shape = tuple(run.data_shape)
    if tuple(x.shape) != (n, *shape):
        raise ValueError(f"x_init must be shaped {(n, *shape)} (n start points), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x_init contains NaN or Inf")
    return run.normalizer.encode(x) if getattr(run, "source", None) is not None else x


# -- evaluation --------------------------------------------------------------------------------------------
def held_out_halves(run: Any, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves ``(a, b)`` of the run's held-out data (data space), each of ``min(n, M // 2)``."""
    held = torch.as_tensor(run.held_out).float()
    half = held.shape[0] // 2
    if half < 2:
        raise ValueError(
            f"the run holds only {held.shape[0]} held-out points; train with more data (or a larger "
            "n_holdout) so that eval has at least 4 held-out points"
        )
    m = half if n is None else min(n, half)
    return held[:m], held[half : half + m]


def is_discrete(x: torch.Tensor) -> bool:
    """True when every value of ``x`` is an integer (pixel levels, counts): such data is dequantised."""
    return bool((x == torch.round(x)).all())


def data_log_likelihood(
    run: Any,
    x: torch.Tensor,
    *,
    dequantize: bool = False,
    steps: int | None = None,
    grid: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``(B,)`` log-density of the run's model at data-space ``x`` (nats, float64).

    :math:`\log p_{data}(x) = \log p_{model}(\mathrm{enc}(x)) + \log|\det \partial\,\mathrm{enc}/\partial x|`,
    the normalizer being affine ``encode(x) = (x - shift) / scale``: the log-det is ``-sum(log scale)``
    over every data dim. ``dequantize``: ``x`` holds integers, each the centre of a unit bin; the density is
    taken at ``x + u``, ``u ~ U[-1/2, 1/2)^D`` drawn from ``generator`` (uniform dequantisation: its mean is a
    lower bound on ``log P(x)`` of the discrete model, see :func:`flowscore.likelihood.bits_per_dim`).
    ``steps``: of the likelihood ODE (default: that of :func:`flowscore.likelihood.log_likelihood`);
    ``grid``: its spacing, None: ``"karras"`` for dequantised data (the density is sharp at the scale of a
    bin, which karras' smallest noise level resolves), else ``"uniform"``.
    """
    from .likelihood import log_likelihood

    x = torch.as_tensor(x)
    if dequantize:
        x = x + torch.rand(x.shape, generator=generator, dtype=x.dtype) - 0.5
    z = run.normalizer.encode(x)
    log_p = log_likelihood(
        run.model, run.path, z, prediction=run.prediction, generator=generator,
        grid=grid or ("karras" if dequantize else "uniform"), **({} if steps is None else {"steps": steps}),
    )  # fmt: skip
    scale = run.normalizer.scale.to(torch.float64)
    log_det = -torch.log(scale).expand(tuple(x.shape[1:])).sum()
    return log_p.to(torch.float64) + log_det


@dataclass
class EvalSamples:
    """Data-space samples drawn once and shared by :func:`evaluate_run`, :func:`plot_run` and the demo.

    ``ode`` and ``sde`` are ``(n, *data_shape)`` (``sde`` None for a run trained from a data source: SDE
    sampling needs the Gaussian source); ``trajectory`` is the ODE's ``(T, n, *data_shape)``.
    """

    ode: np.ndarray
    sde: np.ndarray | None
    trajectory: np.ndarray
    ode_sampler: str


def draw_samples(
    run: Any,
    n: int,
    *,
    seed: int = 0,
    ode_sampler: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    sde: bool = True,
) -> EvalSamples:
    """``n`` ODE samples (with their trajectory) and ``n`` SDE samples of the run, in data space.

    ``sde=False`` draws no SDE samples (``sde`` None), as for a run trained from a data source.

    ``ode_sampler`` None: :data:`flowscore.samplers.DEFAULT_ODE_SAMPLER` (for an SB-CFM run ``euler``, and
    ``sb-sde`` instead of ``sde``, :func:`flowscore.sbcfm.default_sampler`); steps: the samplers' defaults.
    ``progress``: a bar (or a line) per sampler on stderr (:class:`Progress`).
    """
    ode_sampler = default_sampler(run.model) if ode_sampler is None else ode_sampler
    ode, trajectory = sample_run(
        run, n, sampler=ode_sampler, seed=seed, trajectory=True, threads=threads, progress=progress
    )
    stochastic = default_sampler(run.model, stochastic=True)  # sb-sde for an SB-CFM run
    stochastic_samples = None
    if sde and (getattr(run, "source", None) is None or stochastic in ANY_SOURCE_SAMPLERS):
        stochastic_samples = sample_run(
            run, n, sampler=stochastic, seed=seed + 1, threads=threads, progress=progress
        )
    return EvalSamples(ode, stochastic_samples, trajectory, ode_sampler)


def evaluate_run(
    run: Any,
    *,
    n: int = 2000,
    seed: int = 0,
    samples: EvalSamples | None = None,
    likelihood: bool = True,
    threads: int | None = None,
    fid: bool = True,
    progress: bool = False,
    sde: bool | None = None,
) -> EvalResult:
    """W2 and MMD of ODE and SDE samples to held-out data, their floors, and the held-out likelihood.

    ``n`` bounds every part: ``m = min(n, M // 2, metrics.MAX_W2_POINTS)`` points per set, ``M`` the
    held-out points. Returns a JSON-able dict with the keys :data:`EVAL_KEYS`: ``n`` (= m), ``ode_sampler``,
    ``w2_ode``, ``w2_sde`` (W2 between m samples and m held-out points), ``w2_floor`` (W2 between two
    disjoint held-out halves of m points each: what a perfect sampler reaches with m points),
    ``w2_ratio_ode``/``w2_ratio_sde`` (W2 / floor, 1 is perfect; None when the floor is 0, e.g. constant
    data), ``w2_units`` (:data:`W2_UNITS`: data units for vectors; for images normalised per pixel),
    ``mmd2_unbiased_ode``, ``mmd2_unbiased_sde``, ``mmd2_unbiased_floor`` (the unbiased estimate of MMD^2,
    :func:`flowscore.metrics.mmd`, of the same sets: its expectation is 0 for equal distributions, so a
    good model's value is near 0 and may be negative), ``nll`` (mean -log p in data space of the
    m held-out points, nats, normalizer log-det included), ``bits_per_dim`` (``nll / (D log 2)``) and
    ``dequantized``: True when the held-out data are integers (pixel levels), whose likelihood is then
    taken with uniform dequantisation over unit bins, so that ``bits_per_dim`` is an upper bound on the
    discrete model's bits (>= 0 in expectation). ``likelihood=False`` skips it (the three keys are None).
    ``samples`` (from :func:`draw_samples`) are drawn if not given. ``progress``: a bar (or a line) per
    phase on stderr: sampling, likelihood, W2 and MMD, per class (:class:`Progress`). Image runs also get
    ``fid``, ``precision``, ``recall`` (``fid=False`` skips them) and ``nn_ratio`` on up to ``n`` ODE samples
    (:func:`flowscore.image_metrics.evaluate_images`); None for other runs. The result is an
    :class:`EvalResult` (a dict; the keys of earlier versions ``mmd_ode``... still read). A flow-map run
    (a two-time model) is evaluated at 1, 2 and 4 model calls instead
    (:func:`flowscore.flowmap_runs.evaluate_flow_map_run`: the same keys, then ``calls`` and ``w2_Kcall``...).
    ``sde``: draw and measure SDE samples; None (default): yes for vectors, no for images, where the SDE
    sampler's many steps dominate eval's time and FID is taken on ODE samples (the ``*_sde`` keys are None).
    """
    from .image_metrics import evaluate_images
    from .likelihood import bits_per_dim
    from .metrics import MAX_W2_POINTS, mmd, w2

    if getattr(run.model, "two_time", False) and samples is None:  # a flow-map run: quality per call count
        from .flowmap_runs import evaluate_flow_map_run

        return evaluate_flow_map_run(run, n=n, seed=seed, threads=threads, fid=fid, progress=progress)
    a, b = held_out_halves(run, min(n, MAX_W2_POINTS))
    m = a.shape[0]
    if samples is None:
        if sde is None:
            sde = not is_image(tuple(run.data_shape))
        samples = draw_samples(run, m, seed=seed, threads=threads, progress=progress, sde=sde)
    sde_n = m if samples.sde is None else samples.sde.shape[0]
    if samples.ode.shape[0] < m or sde_n < m:
        raise ValueError(
            f"evaluate_run needs {m} samples per sampler, got {samples.ode.shape[0]} and {sde_n}"
        )
    ode = metric_space(run, torch.from_numpy(samples.ode[:m]))
    sde = None if samples.sde is None else metric_space(run, torch.from_numpy(samples.sde[:m]))
    nll = bpd = dequantized = None
    if likelihood and getattr(run, "source", None) is None:  # a data source's density is not known
        dequantized = is_discrete(a)
        count = _model_threads(run, threads, m, 8.0)
        with _threads(count), Progress(f"held-out likelihood of {m} points", enabled=progress):
            ll = data_log_likelihood(run, a, dequantize=dequantized, generator=_generator(seed + 2))
        if not bool(torch.isfinite(ll).all()):
            raise ValueError(
                "the held-out likelihood is not finite for this model; pass --no-likelihood to skip it"
            )
        dims = math.prod(tuple(run.data_shape))
        nll, bpd = float(-ll.mean()), float(bits_per_dim(ll, dims, bin_width=1.0).mean())
    a, b = metric_space(run, a), metric_space(run, b)
    with Progress(f"W2 (exact, POT) of {m} points: 3 pairs of sets", 3, enabled=progress, unit="W2") as bar:
        w2_values = []
        for x in (ode, sde, b):
            w2_values.append(None if x is None else float(w2(x, a)))
            bar.update()
    with Progress(f"MMD^2 (unbiased) of {m} points: 3 pairs of sets", enabled=progress):
        mmd_values = [None if x is None else float(mmd(x, a)) for x in (ode, sde, b)]
    w2_floor = w2_values[2]
    result = {
        "n": m,
        "ode_sampler": samples.ode_sampler,
        "w2_ode": w2_values[0],
        "w2_sde": w2_values[1],
        "w2_floor": w2_floor,
        "w2_units": W2_UNITS["images" if is_image(tuple(run.data_shape)) else "points"],
        "mmd2_unbiased_ode": mmd_values[0],
        "mmd2_unbiased_sde": mmd_values[1],
        "mmd2_unbiased_floor": mmd_values[2],
        "nll": nll,
        "bits_per_dim": bpd,
        "dequantized": dequantized,
    }
    result["w2_ratio_ode"] = result["w2_ode"] / w2_floor if w2_floor > 0 else None
    result["w2_ratio_sde"] = result["w2_sde"] / w2_floor if w2_floor > 0 and sde is not None else None
    result["per_class"] = None
    if getattr(run, "labelled", False) and getattr(run, "held_out_labels", None) is not None:
        result["per_class"] = evaluate_classes(run, n=n, seed=seed, threads=threads, progress=progress)
    images = evaluate_images(
        run, samples.ode, n=n, seed=seed, fid_features=fid, threads=threads, progress=progress
    )
    result.update(images)
    return EvalResult((key, result[key]) for key in EVAL_KEYS)


def metric_space(run: Any, x: torch.Tensor) -> torch.Tensor:
    """Data-space points ``(B, *data_shape)`` as the ``(B, D)`` vectors W2 and MMD are measured on
    (:data:`W2_UNITS`): vectors as they are; images encoded by the run's normalizer (pixel range -> [-1, 1])
    and divided by ``sqrt(D)``."""
    x = torch.as_tensor(x).float()
    if not is_image(tuple(run.data_shape)):
        return x.flatten(1)
    return run.normalizer.encode(x).flatten(1) / math.sqrt(math.prod(tuple(run.data_shape)))


def evaluate_classes(
    run: Any,
    *,
    n: int = 2000,
    seed: int = 0,
    guidance: float = 0.0,
    threads: int | None = None,
    progress: bool = False,
) -> list[ClassResult]:
    """Per class k of a labelled run (keys :data:`CLASS_KEYS`): W2 and unbiased MMD^2 between ``m`` ODE
    samples of class k (with ``guidance``) and ``m`` held-out points of class k, and their floors between
    two disjoint halves of those held-out points, in the units of :func:`metric_space`;
    ``m = min(n, M_k // 2, metrics.MAX_W2_POINTS)``. A class with fewer than 4 held-out points gets None
    values. ``progress``: one bar over the classes."""
    from .metrics import MAX_W2_POINTS, mmd, w2

    held = torch.as_tensor(run.held_out).float()
    labels = torch.as_tensor(run.held_out_labels)
    count = run.num_classes if run.num_classes is not None else int(labels.max()) + 1 if labels.numel() else 0
    out = []
    with Progress(f"per class: sampling, W2 and MMD^2 of {count} classes", count, progress, "class") as bar:
        for k in range(count):
            points = held[labels == k]
            half = points.shape[0] // 2
            entry = ClassResult(dict.fromkeys(CLASS_KEYS))
            entry.update(label=k, n=0)
            if half >= 2:
                m = min(n, half, MAX_W2_POINTS)
                a, b = metric_space(run, points[:m]), metric_space(run, points[half : half + m])
                x = sample_run(run, m, label=k, guidance=guidance, seed=seed + 1000 + k, threads=threads)
                x = metric_space(run, torch.from_numpy(x))
                floor = float(w2(b, a))
                entry.update(n=m, w2=float(w2(x, a)), w2_floor=floor, mmd2_unbiased=float(mmd(x, a)),
                             mmd2_unbiased_floor=float(mmd(b, a)))  # fmt: skip
                entry["w2_ratio"] = entry["w2"] / floor if floor > 0 else None
            out.append(entry)
            bar.update()
    return out


MMD_HEADER = "MMD^2 (unbiased)"


def format_eval(result: dict[str, Any]) -> str:
    """A small text table of :func:`evaluate_run`'s result."""

    def ratio(value: float | None) -> str:
        return f"{value:>9.3f}" if value is not None else f"{'-':>9}"

    if result.get("calls"):  # a flow-map run
        from .flowmap_runs import format_flow_map_eval

        return format_flow_map_eval(result)
    ode_name = f"ODE ({result['ode_sampler']}) samples"
    floor_ratio = 1.0 if result["w2_floor"] > 0 else None
    rows = [
        (ode_name, result["w2_ode"], result["w2_ratio_ode"], result["mmd2_unbiased_ode"]),
        ("SDE samples", result["w2_sde"], result["w2_ratio_sde"], result["mmd2_unbiased_sde"]),
        ("floor: held-out halves", result["w2_floor"], floor_ratio, result["mmd2_unbiased_floor"]),
    ]
    lines = [f"{'vs held-out data':<24} {'W2':>9} {'W2/floor':>9} {MMD_HEADER:>17}"]
    lines += [f"{name:<24} {w:>9.4f} {ratio(r)} {m:>17.3g}" for name, w, r, m in rows if w is not None]
    nll = ""
    if result.get("nll") is not None:
        kind = ", dequantised" if result.get("dequantized") else ""
        nll = f"; held-out NLL = {result['nll']:.4f} nats ({result['bits_per_dim']:.4f} bits/dim{kind})"
    lines.append(f"n = {result['n']} points per set{nll}")
    units = result.get("w2_units")
    lines.append(f"W2 in {units or W2_UNITS['points']}; MMD^2 unbiased: about 0 (may be < 0) when equal")
    from .image_metrics import format_images

    lines += [line for line in [format_images(result)] if line]
    if result.get("per_class"):
        header = f"{'per class (ODE samples)':<24} {'W2':>9} {'W2/floor':>9} {MMD_HEADER:>17} {'n':>6}"
        lines += ["", header]
        for entry in result["per_class"]:
            if entry["w2"] is None:
                lines.append(f"{'class ' + str(entry['label']):<24} {'-':>9} {'-':>9} {'-':>17} {0:>6}")
                continue
            lines.append(
                f"{'class ' + str(entry['label']):<24} {entry['w2']:>9.4f} {ratio(entry['w2_ratio'])} "
                f"{entry['mmd2_unbiased']:>17.3g} {entry['n']:>6}"
            )
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------------------
def _loss_curve(run: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, losses)`` from the run's log (a list of dicts with "step" and "loss")."""
    rows = [r for r in run.log if r.get("loss") is not None and r.get("step") is not None]
    return np.array([r["step"] for r in rows], dtype=float), np.array([r["loss"] for r in rows], dtype=float)


def _floor_value(run: Any) -> tuple[float | None, float | None]:
    """The run's loss floor and its standard error, or ``(None, None)``."""
    floor = getattr(run, "loss_floor", None)
    if floor is None:
        return None, None
    if isinstance(floor, dict) or hasattr(floor, "standard_error"):  # a dict or a LossFloor
        return floor.get("value"), floor.get("standard_error")
    if isinstance(floor, (tuple, list)):
        return float(floor[0]), (float(floor[1]) if len(floor) > 1 else None)
    return float(floor), None


def field_on_grid(
    run: Any, times: tuple[float, ...], limits: tuple[float, float, float, float], size: int = 25
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The learned velocity in data space on a ``size x size`` grid: ``(grid_x, grid_y, (K, size, size, 2))``.

    The model's field (any prediction, via ``samplers.as_field``) lives in normalized space; with the affine
    ``encode(x) = (x - shift) / scale`` the data-space velocity is ``scale * u(encode(x), t)``.
    """
    from .samplers import as_field

    velocity = as_field(run.model, run.path, run.prediction, "velocity")
    gx = np.linspace(limits[0], limits[1], size)
    gy = np.linspace(limits[2], limits[3], size)
    xx, yy = np.meshgrid(gx, gy)
    x = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32))
    z = run.normalizer.encode(x)
    out = []
    with torch.no_grad():
        for t in times:
            u = velocity(z, torch.full((z.shape[0],), float(t)))
            out.append((u * run.normalizer.scale).numpy().reshape(size, size, 2))
    return gx, gy, np.stack(out)


def _plot_limits(points: np.ndarray) -> tuple[float, float, float, float]:
    """Axis limits around the 0.2%..99.8% quantiles of ``(N, 2)`` points, never of zero width."""
    lo, hi = np.quantile(points, 0.002, axis=0), np.quantile(points, 0.998, axis=0)
    span = np.maximum(hi - lo, 1e-3 * (1 + np.abs(lo) + np.abs(hi)))
    centre = (lo + hi) / 2
    lo, hi = centre - 0.75 * span, centre + 0.75 * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def image_range(run: Any) -> tuple[float, float] | None:
    """The pixel range ``(lo, hi)`` of an image run's training data: the image normalizer maps it to [-1, 1],
    so ``lo, hi = shift -/+ scale``; None when the normalizer is not one scalar shift and scale."""
    shift, scale = run.normalizer.shift, run.normalizer.scale
    if shift.numel() != 1 or scale.numel() != 1:
        return None
    return float(shift - scale), float(shift + scale)


def plot_run(
    run: Any,
    out_dir: str,
    *,
    n: int = 2000,
    seed: int = 0,
    samples: EvalSamples | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Writes the run's figures into ``out_dir`` and returns their paths.

    Always ``loss.png`` (with the loss floor as a band) when the run has a log. 2D data: ``samples.png``
    (ODE and SDE samples vs held-out data), ``trajectories.png`` (ODE paths from the prior) and ``field.png``
    (the learned velocity at a few t). Images: ``samples_grid.png`` (64 ODE and 64 SDE samples side by side,
    gray levels over the training data's pixel range). Other data shapes: ``loss.png`` only. A flow-map run:
    :func:`flowscore.flowmap_runs.plot_flow_map_run` (samples at 1, 2, 4 calls; the map's error over the
    ``(t, s)`` triangle).

    Every figure is drawn into a temporary folder inside ``out_dir`` and moved into place only when all of
    them succeeded: a failure leaves no partial set of figures. ``progress``: a bar (or a line) per phase
    on stderr: sampling, the velocity field, drawing (:class:`Progress`).
    """
    from . import plots

    if getattr(run.model, "two_time", False) and samples is None:  # a flow-map run: jumps and the map error
        from .flowmap_runs import plot_flow_map_run

        return plot_flow_map_run(run, out_dir, n=n, seed=seed, threads=threads, progress=progress)
    shape = tuple(run.data_shape)
    kind = plot_kind_or_none(shape)
    steps, losses = _loss_curve(run)
    figures: list[tuple[str, Any]] = []  # (file name, draw(file))
    if len(steps):
        floor, floor_err = _floor_value(run)
        stored = getattr(run, "objective", None) or {}  # the objective trained (your own one's name)
        objective = str(stored.get("name") or getattr(run.config, "objective", "loss"))
        figures.append(("loss.png", lambda f: plots.plot_loss(
            steps, losses, f, floor=floor, floor_err=floor_err, objective=objective)))  # fmt: skip
    if kind == "images":
        if samples is None:
            samples = draw_samples(run, 64, seed=seed, threads=threads, progress=progress)
        ode, sde = _sampler_titles(run, samples)
        grids = {ode: samples.ode[:64], **({} if samples.sde is None else {sde: samples.sde[:64]})}
        gray = image_range(run)
        figures.append(("samples_grid.png", lambda f: plots.plot_image_grid(grids, f, value_range=gray)))
    elif kind == "points":
        held = torch.as_tensor(run.held_out).float().numpy()[:n]
        if samples is None:
            samples = draw_samples(run, min(n, 2000), seed=seed, threads=threads, progress=progress)
        ode, sde = _sampler_titles(run, samples)
        labels = {ode: samples.ode, **({} if samples.sde is None else {sde: samples.sde})}
        title = f"ODE ({samples.ode_sampler}) trajectories"
        limits = _plot_limits(np.concatenate([held.reshape(-1, 2), samples.ode.reshape(-1, 2)]))
        with Progress(f"velocity field at {len(FIELD_TIMES)} times", enabled=progress):
            gx, gy, field = field_on_grid(run, FIELD_TIMES, limits)
        trajectory = samples.trajectory[:, :300]
        figures.append(("samples.png", lambda f: plots.plot_samples(labels, held, f)))
        figures.append(
            ("trajectories.png", lambda f: plots.plot_trajectories(trajectory, f, data=held, title=title))
        )
        figures.append(("field.png", lambda f: plots.plot_field(FIELD_TIMES, gx, gy, field, f, data=held)))
    return _write_all(out_dir, figures, progress)


def sample_title(sampler: str, run: Any, label: int | None, guidance: float) -> str:
    """``"<sampler> samples"`` with, for a labelled run, the class (or "classes drawn from the training mix",
    or "unconditional" for -1) and a non-zero guidance weight."""
    title = f"{sampler} samples"
    if getattr(run, "labelled", False):
        title += {None: ", classes drawn from the training mix", -1: ", unconditional (class -1)"}.get(
            label, f", class {label}"
        )
        title += f", guidance {guidance:g}" if guidance else ""
    return title


def reference_data(run: Any, label: int | None, n: int) -> tuple[np.ndarray, str]:
    """``(points, name)``: at most ``n`` held-out points (data space) to draw samples of class ``label``
    against: the held-out points of that class when the run knows their labels, all of them otherwise
    (``label`` None or -1, or an unlabelled run)."""
    held = torch.as_tensor(run.held_out).float()
    labels = getattr(run, "held_out_labels", None)
    if label is not None and label >= 0 and labels is not None:
        points = held[torch.as_tensor(labels) == label][:n]
        if points.shape[0]:
            return points.numpy(), f"held-out data, class {label}"
        return held[:n].numpy(), f"held-out data (none of class {label})"
    return held[:n].numpy(), "held-out data"


def plot_sample_file(
    run: Any, x: np.ndarray, file: str, *, sampler: str, label: int | None = None, guidance: float = 0.0
) -> str:
    """The PNG of ``flowscore sample --plot``: 2D samples ``(N, 2)`` over the held-out data of their class
    (:func:`reference_data`), or a grid of the first 64 images; titled by :func:`sample_title`."""
    from . import plots

    title = sample_title(sampler, run, label, guidance)
    if plot_kind(tuple(run.data_shape)) == "points":
        data, name = reference_data(run, label, max(2000, len(x)))
        return plots.plot_samples({title: x}, data, file, data_label=name)
    return plots.plot_image_grid(x[:64], file, title=title, value_range=image_range(run))


def _sampler_titles(run: Any, samples: EvalSamples) -> tuple[str, str]:
    """The titles of :func:`plot_run`'s ODE and SDE panels (:func:`sample_title`: the class mix of a
    labelled run)."""
    ode = sample_title(f"ODE ({samples.ode_sampler})", run, None, 0.0)
    return ode, sample_title("SDE (Euler-Maruyama)", run, None, 0.0)


def _write_all(out_dir: str, figures: list[tuple[str, Any]], progress: bool = False) -> list[str]:
    """Draws every ``(name, draw)`` into a temporary folder in ``out_dir``, then moves them all into place."""
    if not figures:
        return []
    bar = Progress(f"drawing {len(figures)} figures", len(figures), progress, "figure")
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".plots-", dir=out_dir)
    try:
        with bar:
            for name, draw in figures:
                draw(os.path.join(staging, name))
                bar.update()
        files = []
        for name, _ in figures:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            files.append(os.path.join(out_dir, name))
        return files
    except BaseException:
        if created:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                os.rmdir(out_dir)
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
