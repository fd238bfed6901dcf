"""Input checks shared by every public function.

The one home of flowscore's validators: every public function checks its arguments with these, and each
raises ``ValueError`` naming the argument and what was expected. The checks that need to read tensor values
(``t`` in [0, 1], finiteness) cost a device sync on CUDA; :func:`validation` turns them off inside hot loops
(the trainer and the samplers call the public API with already-checked inputs). The switch is a
``ContextVar``, so it is local to a thread or an asyncio task.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar

import numpy as np
import torch

_VALUE_CHECKS: ContextVar[bool] = ContextVar("flowscore_value_checks", default=True)


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager that switches the value checks (range of ``t``, finiteness) on or off.

    Shape, dtype and device checks always run: they are free.
    """
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def value_checks_enabled() -> bool:
    """Whether value checks are on (see :func:`validation`)."""
    return _VALUE_CHECKS.get()


# -- Python scalars ------------------------------------------------------------------------------------------
def integer(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` (never a bool) within ``[minimum, maximum]``, or ``ValueError``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bounds = (
            f" >= {minimum}"
            if maximum is None
            else f" in [{minimum}, {maximum}]"
            if minimum is not None
            else ""
        )
        raise ValueError(f"{name} must be an integer{bounds}, got {value!r}")
    return int(value)


def positive_int(value: object, name: str) -> int:
    """``value`` as an ``int >= 1``, or ``ValueError``."""
    return integer(value, name, minimum=1)


def number(
    value: object,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` in the interval ``low .. high`` (open ends as flagged)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def t_eps(value: object, name: str = "t_eps", *, allow_zero: bool = True) -> float:
    """The one rule for ``t_eps`` (times are kept in ``[t_eps, 1 - t_eps]``): a number in [0, 0.5), or in
    (0, 0.5) with ``allow_zero=False`` (where an endpoint must be avoided, e.g. the samplers)."""
    return number(value, name, 0.0, 0.5, low_open=not allow_zero, high_open=True)


def tensor(value: object, name: str) -> torch.Tensor:
    """``value`` as a floating-point tensor, or ``ValueError``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def finite(value: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` itself; ``ValueError`` if it holds NaN or Inf (a value check)."""
    if value_checks_enabled() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return value


def same_kind(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """``a`` and ``b`` share dtype and device."""
    if a.dtype != b.dtype:
        raise ValueError(f"{name_b} has dtype {b.dtype} but {name_a} has dtype {a.dtype}; they must match")
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; they must match")


def same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} has shape {tuple(b.shape)} but {name_a} has shape {tuple(a.shape)}")


def batch(x: object, name: str) -> torch.Tensor:
    """A float tensor shaped ``(B, *dims)`` with ``B >= 1`` and at least one dim."""
    x = tensor(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name} must be shaped (B, *dims) with at least 2 dims, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (batch size 0)")
    return x


def time(t: object, like: torch.Tensor | None = None, name: str = "t") -> torch.Tensor:
    """Times in [0, 1] as a tensor.

    A Python number becomes a 0-dim tensor (dtype and device of ``like``, else the default dtype). With
    ``like`` (a batch ``(B, *dims)``), a tensor ``t`` must be 0-dim or ``(B,)`` and share ``like``'s dtype
    and device.
    """
    if isinstance(t, bool):
        raise ValueError(f"{name} must be a float or a floating-point tensor, got bool")
    if isinstance(t, (int, float)):
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        device = like.device if like is not None else None
        t = torch.tensor(float(t), dtype=dtype, device=device)
    else:
        t = tensor(t, name)
        if like is not None:
            if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != like.shape[0]):
                raise ValueError(
                    f"{name} must be a float, a 0-dim tensor or shaped (B,) = ({like.shape[0]},), "
                    f"got shape {tuple(t.shape)}"
                )
            same_kind(like, t, "x", name)
    if value_checks_enabled() and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        bad = t[~((t >= 0) & (t <= 1))].flatten()[0].item()
        raise ValueError(f"{name} must lie in [0, 1] (t = 0 noise, t = 1 data), got {bad}")
    return t


def expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(B,)`` or 0-dim ``t`` so that it broadcasts over the trailing dims of ``x``."""
    if t.dim() == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.dim() - 1))


def choice(value: str, options: tuple[str, ...] | list[str], name: str) -> str:
    """``value`` if it is one of ``options``, else ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, options))}")
    return value


# -- class labels --------------------------------------------------------------------------------------------
def labels(y: object, batch: int, name: str = "y") -> torch.Tensor:
    """Labels of a batch passed to a model: an integer tensor ``(B,)`` with values >= -1 (-1: no label)."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(
            f"{name} must be an integer tensor of class labels shaped ({batch},), got {type(y).__name__}"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class labels (-1 = no label), got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must be shaped ({batch},) like the batch, got {tuple(y.shape)}")
    if value_checks_enabled() and y.numel() and int(y.min()) < -1:
        raise ValueError(f"{name} holds {int(y.min())}; class labels are 0..K-1, and -1 means no label")
    return y


FEW_CLASSES = 2**16
"""Class labels ``0..K-1`` may number more classes than points (classes absent from a subset) up to this K;
above it K must be at most the number of points, so that per-class tables (counts, class embeddings, the
members of each class) stay as small as the data, whatever one label says."""


def class_labels(values: object, n: int, name: str = "labels", *, whole_floats: bool = False) -> torch.Tensor:
    """Class labels of ``n`` data points as an int64 tensor ``(n,)`` with values ``0..K-1``, or ValueError.

    A tensor or NumPy array of integers; with ``whole_floats`` (labels read from files) also floats that are
    whole numbers. Refused: booleans, NaN/Inf, fractions, negative values (-1 is only for queries and label
    dropout), a length other than ``n`` and a label ``>= max(n, FEW_CLASSES)`` (checked before any per-class
    table is built).
    """
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    if not isinstance(array, np.ndarray):
        raise ValueError(
            f"{name}: class labels must be an integer tensor or array, got {type(values).__name__}"
        )
    if array.dtype.kind not in ("iuf" if whole_floats else "iu"):
        nan = array.dtype.kind == "f" and bool(np.isnan(array).any())
        hint = " with NaN" if nan else ("; cast with .long()" if array.dtype.kind == "f" else "")
        raise ValueError(f"{name}: class labels must be integers 0..K-1, got dtype {array.dtype}{hint}")
    if array.shape != (n,):
        raise ValueError(
            f"{name}: class labels must be shaped ({n},), one per data point, got shape {array.shape}"
        )
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: class labels contain NaN or Inf; labels are integers 0..K-1")
        fractions = array[array != np.round(array)]
        if fractions.size:
            raise ValueError(f"{name}: class labels must be whole numbers 0..K-1, found {fractions[0]!r}")
    if array.size and array.min() < 0:
        raise ValueError(
            f"{name}: class labels must be 0..K-1, found {array.min()!r} (-1 = 'no label' is for sampling "
            "and label dropout, not for data)"
        )
    top = int(array.max()) if array.size else -1
    if top >= max(n, FEW_CLASSES):
        raise ValueError(
            f"{name}: class label {top} on {n} points is too large (the classes are numbered 0..K-1, and K "
            f"may exceed the number of points only up to {FEW_CLASSES}); renumber the classes 0..K-1"
        )
    out = torch.from_numpy(array.astype(np.int64))
    return out.to(values.device) if isinstance(values, torch.Tensor) else out
