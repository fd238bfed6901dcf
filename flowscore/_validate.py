"""Input checks shared by every public function.

Every check raises ``ValueError`` naming the argument and what was expected. The checks that need to
read tensor values (``t`` in [0, 1], finiteness) cost a device sync on CUDA; :func:`validation` turns them
off inside hot loops (the trainer and the samplers call the public API with already-checked inputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_VALUE_CHECKS = True


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager that switches the value checks (range of ``t``, finiteness) on or off.

    Shape, dtype and device checks always run: they are free.
    """
    global _VALUE_CHECKS
    previous = _VALUE_CHECKS
    _VALUE_CHECKS = enabled
    try:
        yield
    finally:
        _VALUE_CHECKS = previous


def value_checks_enabled() -> bool:
    return _VALUE_CHECKS


def tensor(value: object, name: str) -> torch.Tensor:
    """``value`` as a floating-point tensor, or ``ValueError``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def finite(value: torch.Tensor, name: str) -> torch.Tensor:
    if _VALUE_CHECKS and not bool(torch.isfinite(value).all()):
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
    if _VALUE_CHECKS and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        bad = t[~((t >= 0) & (t <= 1))].flatten()[0].item()
        raise ValueError(f"{name} must lie in [0, 1] (t = 0 noise, t = 1 data), got {bad}")
    return t


def expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(B,)`` or 0-dim ``t`` so that it broadcasts over the trailing dims of ``x``."""
    if t.dim() == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.dim() - 1))


def choice(value: str, options: tuple[str, ...] | list[str], name: str) -> str:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, options))}")
    return value
