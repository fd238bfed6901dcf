r"""Image metrics: FID, precision and recall in Inception features, and the memorisation ratio ``nn_ratio``.

* :func:`fid`: the Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017),
  :math:`\lVert\mu_1-\mu_2\rVert^2 + \mathrm{tr}\,\Sigma_1 + \mathrm{tr}\,\Sigma_2
  - 2\,\mathrm{tr}\,(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})^{1/2}`, in float64 by two symmetric
  eigen-decompositions (negative eigenvalues of the rank-deficient covariances clipped to 0).
* :func:`precision_recall`: Kynkäänniemi et al. 2019: each set's manifold is the union of balls around its
  points with radius the distance to their k-th nearest neighbour in the set; precision is the fraction of
  generated points inside the real manifold, recall the fraction of real points inside the generated one.
* :func:`nn_ratio`: mean distance of each sample to its nearest training image over the mean distance of
  held-out images to their nearest training image, in pixel space (data units): a copy of a training image
  is at distance 0, so the exact marginal of the training set (whose samples are training images) scores
  about 0 and a model that generalises like fresh data about 1.

:func:`evaluate_images` puts them together for ``flowscore eval`` on an image run (keys
:data:`IMAGE_KEYS`): samples against the run's training images, whose features are cached
(:func:`reference_features`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import inception

IMAGE_KEYS = ("fid", "precision", "recall", "nn_ratio")
"""The keys :func:`evaluate_images` adds to ``flowscore eval``'s result."""
DIST_BATCH = 1024
"""Rows per block of the pairwise distances (memory O(DIST_BATCH * N))."""
_EXACT = "donot_use_mm_for_euclid_dist"  # cdist by differences: a copy is at distance exactly 0

ArrayLike = np.ndarray | torch.Tensor


def _matrix(points: ArrayLike, name: str, min_rows: int = 1) -> torch.Tensor:
    """``(N, *dims)`` finite points as a float64 tensor ``(N, D)``."""
    x = torch.as_tensor(points)
    if x.dim() < 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name} must be shaped (N, *dims) with N >= {min_rows}, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _same_dim(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names} must have the same dimension, got {a.shape[1]} and {b.shape[1]}")


# -- FID ---------------------------------------------------------------------------------------------------
def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (D,), sigma (D, D))``: mean and unbiased covariance (ddof 1) of ``(N, D)`` features, float64."""
    x = _matrix(features, "features", min_rows=2).numpy()
    return x.mean(0), np.cov(x, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues < 0 -> 0)."""
    values, vectors = np.linalg.eigh((s + s.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    r"""Fréchet distance between :math:`N(\mu_1, \Sigma_1)` and :math:`N(\mu_2, \Sigma_2)`, float64.

    ``mu`` ``(D,)``, ``sigma`` ``(D, D)`` symmetric PSD (singular allowed). The trace of
    :math:`(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})^{1/2}` is the sum of the square roots of the clipped
    eigenvalues of that symmetric matrix (no complex parts, no ``sqrtm`` of a non-symmetric product)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"means must be (D,) and covariances (D, D) alike, got {mu1.shape}, {sigma1.shape}, "
                         f"{mu2.shape}, {sigma2.shape}")  # fmt: skip
    root = _sqrt_psd(sigma1)
    middle = root @ sigma2 @ root
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)
    return max(value, 0.0)


def fid(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """FID between two feature sets ``(N, D)`` and ``(M, D)`` (N, M >= 2): :func:`frechet_distance` of their
    :func:`feature_stats`. With Inception pool features (:func:`flowscore.inception.inception_features`)
    this is the standard FID; it is biased upwards at small N and M, so compare values at equal sizes."""
    a, b = _matrix(features_a, "features_a", 2), _matrix(features_b, "features_b", 2)
    _same_dim(a, b, "features_a and features_b")
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# -- precision / recall ------------------------------------------------------------------------------------
def _in_balls(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: point i lies in some ball ``|x - centre_j| <= radius_j``."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for start in range(0, points.shape[0], DIST_BATCH):
        d = torch.cdist(points[start : start + DIST_BATCH], centres, compute_mode=_EXACT)
        inside[start : start + DIST_BATCH] = (d <= radii[None, :]).any(1)
    return inside


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """``(N,)`` distance of each point to its k-th nearest other point of the set (float64)."""
    out = torch.empty(points.shape[0], dtype=torch.float64)
    for start in range(0, points.shape[0], DIST_BATCH):
        d = torch.cdist(points[start : start + DIST_BATCH], points, compute_mode=_EXACT)
        out[start : start + DIST_BATCH] = d.kthvalue(k + 1, dim=1).values  # the 1st is the point itself
    return out


def precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake_feats`` ``(M, D)`` against
    ``real_feats`` ``(N, D)`` with k-NN radii, ``1 <= k < min(N, M)``: precision = fraction of fake points
    within the k-NN ball of some real point; recall = fraction of real points within the k-NN ball of some
    fake point. Euclidean distances in float64."""
    real, fake = _matrix(real_feats, "real_feats", 2), _matrix(fake_feats, "fake_feats", 2)
    _same_dim(real, fake, "real_feats and fake_feats")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be an integer in [1, min(N, M) - 1], got {k!r}")
    precision = _in_balls(fake, real, knn_radii(real, k)).double().mean()
    recall = _in_balls(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


# -- memorisation ------------------------------------------------------------------------------------------
def nearest_distance(points: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """``(N,)`` Euclidean distance of each point to its nearest training point (float64)."""
    out = torch.empty(points.shape[0], dtype=torch.float64)
    for start in range(0, points.shape[0], DIST_BATCH):
        d = torch.cdist(points[start : start + DIST_BATCH], train, compute_mode=_EXACT)
        out[start : start + DIST_BATCH] = d.min(1).values
    return out


def nn_ratio(samples: ArrayLike, train: ArrayLike, held_out: ArrayLike) -> float:
    r"""Memorisation ratio :math:`\overline{d}(\text{samples}) / \overline{d}(\text{held-out})`,
    :math:`d(x) = \min_j \lVert x - \text{train}_j\rVert` over the flattened points (pixel space).

    ``samples`` ``(S, *dims)``, ``train`` ``(N, *dims)``, ``held_out`` ``(M, *dims)`` (never in ``train``).
    0: every sample is a training image (the exact marginal); about 1: samples are as far from the training
    set as fresh data are; ``ValueError`` when the held-out images are training images (distance 0)."""
    s, tr, h = _matrix(samples, "samples"), _matrix(train, "train"), _matrix(held_out, "held_out")
    _same_dim(s, tr, "samples and train")
    _same_dim(h, tr, "held_out and train")
    reference = float(nearest_distance(h, tr).mean())
    if not reference > 0:
        raise ValueError("the held-out points are copies of training points: nn_ratio is undefined")
    return float(nearest_distance(s, tr).mean()) / reference


# -- reference features, cached ----------------------------------------------------------------------------
def images_checksum(images: ArrayLike, value_range: tuple[float, float]) -> str:
    """SHA-256 of the images (as float32, C order), their shape and value range."""
    x = np.ascontiguousarray(torch.as_tensor(images).detach().cpu().float().numpy())
    digest = hashlib.sha256(repr((x.shape, [float(v) for v in value_range], inception.SOURCE_SHA1)).encode())
    digest.update(x.tobytes())
    return digest.hexdigest()


def reference_features(
    images: ArrayLike,
    value_range: tuple[float, float],
    *,
    cache: str | Path | None = None,
    progress: bool = False,
    device: str = "cpu",
) -> np.ndarray:
    """Inception features ``(N, 2048)`` of a reference image set, read from / written to
    ``cache/fid-ref-<checksum>.npz`` (default folder: :func:`flowscore.inception.cache_dir`), keyed by
    :func:`images_checksum`: a different image set, size or range never reuses another's features."""
    from . import _io

    folder = Path(cache) if cache is not None else inception.cache_dir()
    file = folder / f"fid-ref-{images_checksum(images, value_range)[:24]}.npz"
    if file.is_file():
        with np.load(file, allow_pickle=False) as stored:
            feats = stored["features"]
        if feats.shape == (len(images), inception.FEATURE_DIM) and np.isfinite(feats).all():
            return feats.astype(np.float64)
    feats = inception.inception_features(
        images, value_range, progress=progress, device=device, desc="reference"
    )
    with _io.atomic_path(file) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, features=feats.astype(np.float32))
    return feats.astype(np.float32).astype(np.float64)


def training_images(run: Any) -> torch.Tensor | None:
    """The run's training images (data space) reloaded from ``run.config.data`` and split as the trainer
    did, or None when the run was trained on data passed in code, or the data cannot be read or no longer
    match the run's checksum."""
    from . import data as datasets
    from .runs import read_run_file
    from .sources import checksum

    config = getattr(run, "config", None)
    if config is None or not getattr(config, "data", ""):  # data passed in code (or no run file)
        return None
    try:
        raw, labels = datasets.load_labelled(config.data, n=config.data_n, seed=config.seed)
    except (ValueError, OSError):  # the file moved or its package is gone: no training images
        return None
    if checksum(raw, labels if config.labels else None) != read_run_file(run.run_dir).data_sha256:
        return None
    train, _ = datasets.split(raw, int(torch.as_tensor(run.held_out).shape[0]), seed=config.seed)
    return train.float()


def evaluate_images(
    run: Any,
    samples: np.ndarray,
    *,
    n: int,
    seed: int = 0,
    fid_features: bool = True,
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, float | None]:
    """``fid``, ``precision``, ``recall`` and ``nn_ratio`` of an image run's samples (data space).

    ``m = min(n, N_train)`` samples (``samples`` first, more drawn with the run's default ODE sampler when
    they are fewer) against ``m`` training images drawn with ``seed`` (FID, precision and recall with k = 3,
    in Inception features; the training features are cached) and ``nn_ratio`` of the m samples against all
    training images, with ``min(m, M)`` held-out images as the reference. Samples are clamped to the
    training data's pixel range. All None for a non-image run; FID, precision and recall None with
    ``fid_features=False`` or without the Inception weights (a warning says what to install); all None
    for a run whose training data cannot be reloaded."""
    from . import resources
    from .data import is_image
    from .workflows import image_range, sample_run

    out: dict[str, float | None] = dict.fromkeys(IMAGE_KEYS)
    if not is_image(tuple(run.data_shape)) or tuple(run.data_shape)[0] not in (1, 3):
        return out
    train = training_images(run)
    value_range = image_range(run)
    if train is None or value_range is None:
        return out
    lo, hi = value_range
    m = min(n, train.shape[0])
    if len(samples) < m:
        extra = sample_run(run, m - len(samples), seed=seed + 3, threads=threads, progress=progress)
        samples = np.concatenate([np.asarray(samples), extra])
    x = torch.as_tensor(samples[:m]).float().clamp(lo, hi)
    held = torch.as_tensor(run.held_out).float()
    out["nn_ratio"] = nn_ratio(x, train, held[: min(m, held.shape[0])])
    if not fid_features or m < 4:
        return out
    if not inception.available():
        warnings.warn(f"FID, precision and recall skipped: {inception.INSTALL_HINT}", stacklevel=2)
        return out
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:m]
    count = threads if threads is not None else resources.choose_threads(2 * 5.7e9 * inception.BATCH)
    with resources.using_threads(count):
        real = reference_features(train[pick.sort().values], value_range, progress=progress)
        fake = inception.inception_features(x, value_range, progress=progress, desc="samples")
    out["fid"] = fid(real, fake)
    out["precision"], out["recall"] = precision_recall(real, fake, k=min(3, m - 1))
    return out


def format_images(result: dict[str, Any]) -> str | None:
    """One line of the image metrics in ``result``, or None when there are none."""
    if all(result.get(key) is None for key in IMAGE_KEYS):
        return None

    def show(key: str) -> str:
        value = result.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"

    return " ".join(f"{key} = {show(key)};" for key in IMAGE_KEYS).rstrip(";") + (
        "  (FID/precision/recall: Inception features vs training images; nn_ratio: pixel space, 0 = copies)"
    )
