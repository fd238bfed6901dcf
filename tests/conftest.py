"""Shared test helpers: closed-form reference schedules, written here independently of ``flowscore.paths``.

Every test of the core compares flowscore against these float64 references (their derivatives by autograd),
never against flowscore's own formulas. The test modules import them with ``from conftest import ...``
(``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path``).
Time convention: t = 0 noise, t = 1 data, ``x = alpha_t * x_data + beta_t * noise``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch

from flowscore import GaussianPath, get_path

PATH_NAMES = ("linear", "vp", "vp-linear", "ve", "custom")
VP_LINEAR_BETA_MIN, VP_LINEAR_BETA_MAX, VP_LINEAR_T_CLAMP = 0.1, 20.0, 1e-5
VE_SIGMA_MIN, VE_SIGMA_MAX = 0.002, 80.0
EDGE_TIMES = (0.0, 1e-7, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-7, 1.0)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread in every test process: the suite runs as ``pytest -n 2`` on 2 cores, and two
    workers with two OpenMP threads each oversubscribe the machine (measured: up to 10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _vp_linear_integral(t: torch.Tensor) -> torch.Tensor:
    """T(t) = int_t^1 b(r) dr for the DDPM rate b(r) = beta_min + (1 - r)(beta_max - beta_min)."""
    s = 1 - t
    return VP_LINEAR_BETA_MIN * s + 0.5 * (VP_LINEAR_BETA_MAX - VP_LINEAR_BETA_MIN) * s**2


# name -> (alpha(t), beta(t)) as elementwise float64 torch functions (differentiable)
REFERENCE: dict[
    str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
] = {
    "linear": (lambda t: t, lambda t: 1 - t),
    "vp": (lambda t: torch.sin(math.pi * t / 2), lambda t: torch.cos(math.pi * t / 2)),
    "vp-linear": (
        lambda t: torch.exp(-_vp_linear_integral(t) / 2),
        lambda t: torch.sqrt(1 - torch.exp(-_vp_linear_integral(t))),
    ),
    "ve": (
        lambda t: torch.ones_like(t),
        lambda t: torch.exp((1 - t) * math.log(VE_SIGMA_MAX) + t * math.log(VE_SIGMA_MIN)),
    ),
    "custom": (lambda t: t**2, lambda t: 1 - t),
}


def make_path(name: str) -> GaussianPath:
    """The flowscore path under test; ``custom`` is alpha = t^2, beta = 1 - t with autograd derivatives."""
    if name == "custom":
        return get_path("custom", alpha=lambda t: t**2, beta=lambda t: 1 - t)
    return get_path(name)


def autograd_derivative(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """Elementwise d fn / dt by autograd (``fn`` acts elementwise on ``t``)."""
    with torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((fn(tt) + 0 * tt).sum(), tt)  # + 0 * t: a constant fn has derivative 0
    return grad.detach()


def reference_schedule(name: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(alpha, beta, d_alpha, d_beta) of the reference schedule at ``t`` (derivatives by autograd)."""
    alpha_fn, beta_fn = REFERENCE[name]
    return alpha_fn(t), beta_fn(t), autograd_derivative(alpha_fn, t), autograd_derivative(beta_fn, t)


def bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast over the trailing dims of ``x``."""
    return coef.reshape(coef.shape + (1,) * (x.dim() - 1))


def reference_targets(
    name: str, x_data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> dict[str, torch.Tensor]:
    """x and the four conditional targets built from (x_data, noise) with the reference schedule."""
    alpha, beta, d_alpha, d_beta = (bcast(c, x_data) for c in reference_schedule(name, t))
    return {
        "x": alpha * x_data + beta * noise,
        "data": x_data,
        "noise": noise,
        "velocity": d_alpha * x_data + d_beta * noise,
        "score": -noise / beta,
    }


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max-norm relative error ``max|actual - expected| / max|expected|``."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def zero_quantities(name: str, t: float) -> set[str]:
    """Which denominators vanish at ``t`` on a path (from the closed forms): "alpha", "beta", "det",
    "beta_det".

    "det" is alpha' beta - alpha beta', the determinant of the velocity parameterization, and "beta_det" is
    beta * det = alpha' beta^2 - alpha beta beta'. Only the endpoints t = 0 (alpha = 0 on linear, vp,
    custom; custom also has alpha' = 0, so det = 0, there) and t = 1 (beta = 0 on all but ve) are singular.
    On vp-linear beta' diverges like 1/sqrt(1 - t) while beta beta' -> -beta_min / 2, so beta * det ->
    beta_min / 2 at t = 1: not a zero.
    """
    zeros = set()
    if t == 0.0 and name in ("linear", "vp", "custom"):
        zeros.add("alpha")
    if t == 0.0 and name == "custom":
        zeros |= {"det", "beta_det"}
    if t == 1.0 and name != "ve":
        zeros.add("beta")
    if t == 1.0 and name in ("linear", "vp", "custom"):
        zeros.add("beta_det")
    return zeros


# each conversion direction -> the denominators it divides by (the table of flowscore.conversions)
DIRECTION_DENOMINATORS: dict[tuple[str, str], set[str]] = {
    ("data", "noise"): {"beta"},
    ("data", "velocity"): {"beta"},
    ("data", "score"): {"beta"},
    ("noise", "data"): {"alpha"},
    ("noise", "velocity"): {"alpha"},
    ("noise", "score"): {"beta"},
    ("velocity", "data"): {"det"},
    ("velocity", "noise"): {"det"},
    ("velocity", "score"): {"beta_det"},
    ("score", "data"): {"alpha"},
    ("score", "noise"): set(),
    ("score", "velocity"): {"alpha"},
}


def check_finite_or_value_error(fn: Callable[[], torch.Tensor], expect_error: bool) -> None:
    """``fn()`` raises ValueError iff ``expect_error``; otherwise its output is finite."""
    if expect_error:
        with pytest.raises(ValueError, match="singular|beta|alpha"):
            fn()
    else:
        out = fn()
        assert torch.isfinite(out).all(), out


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(file: str, min_bytes: int = 2000) -> bool:
    """A PNG file with some content (a blank figure is a few hundred bytes)."""
    with open(file, "rb") as fh:
        return fh.read(8) == PNG_SIGNATURE and os.path.getsize(file) > min_bytes


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``flowscore ARGV`` in process: (exit code, stdout, stderr)."""
    from flowscore import cli

    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
