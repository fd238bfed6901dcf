"""Data sets: 2D toys generated on the fly (no download).

``toy(name, n, seed)`` returns an ``(n, 2)`` float32 tensor, each set scaled to roughly unit variance
so that every path's prior N(0, I) is a fair starting point.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _validate

TOYS = ("moons", "8gaussians", "checkerboard", "circles", "spirals", "swissroll", "2gaussians")


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    n_top = n // 2
    n_bottom = n - n_top
    a = rng.uniform(0, math.pi, n_top)
    b = rng.uniform(0, math.pi, n_bottom)
    top = np.stack([np.cos(a), np.sin(a)], 1)
    bottom = np.stack([1 - np.cos(b), 0.5 - np.sin(b)], 1)
    x = np.concatenate([top, bottom]) + 0.05 * rng.standard_normal((n, 2))
    return (x - np.array([0.5, 0.25])) * 1.6


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = 2 * math.pi * rng.integers(0, 8, n) / 8
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return (centers + 0.15 * rng.standard_normal((n, 2))) / 1.0


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2.0 * rng.integers(0, 2, n) + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1) * 0.9


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    n_outer = n // 2
    radius = np.where(np.arange(n) < n_outer, 1.0, 0.5)
    a = rng.uniform(0, 2 * math.pi, n)
    x = np.stack([radius * np.cos(a), radius * np.sin(a)], 1) + 0.04 * rng.standard_normal((n, 2))
    return rng.permutation(x) * 1.8


def _spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    r = np.sqrt(rng.uniform(0, 1, n)) * 3 * math.pi
    arm = rng.integers(0, 2, n)
    a = r + math.pi * arm
    x = np.stack([r * np.cos(a), r * np.sin(a)], 1) / (1.5 * math.pi)
    return x + 0.05 * rng.standard_normal((n, 2))


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    r = 1.5 * math.pi * (1 + 2 * rng.uniform(0, 1, n))
    x = np.stack([r * np.cos(r), r * np.sin(r)], 1) / 7.0
    return x + 0.05 * rng.standard_normal((n, 2))


def _two_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    sign = np.where(rng.uniform(0, 1, n) < 0.5, -1.0, 1.0)
    return np.stack([1.5 * sign, np.zeros(n)], 1) + 0.3 * rng.standard_normal((n, 2))


_MAKERS = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "circles": _circles,
    "spirals": _spirals,
    "swissroll": _swissroll,
    "2gaussians": _two_gaussians,
}


def toy(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` points of the 2D toy ``name`` (one of ``TOYS``), float32 ``(n, 2)``, reproducible by ``seed``."""
    _validate.choice(name, TOYS, "toy data set")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    return torch.from_numpy(_MAKERS[name](n, rng).astype(np.float32))
