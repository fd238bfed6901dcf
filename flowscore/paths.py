r"""Gaussian probability paths :math:`x = \alpha_t\,x_{data} + \beta_t\,\varepsilon`, t = 0 noise, t = 1 data.

One class per schedule; every path exposes the same interface:

>>> path = get_path("linear")
>>> x = path.sample(x_data, t, noise)                    # alpha_t * x_data + beta_t * noise
>>> path.conditional_velocity(x, x_data, t)              # u_t(x | x_data)
>>> path.conditional_score(x, x_data, t)                 # grad_x log N(x; alpha_t x_data, beta_t^2 I)
>>> path.convert(value, x, t, "velocity", "score")       # see flowscore.conversions
>>> path.schedule(t)                                     # Schedule(alpha, beta, d_alpha, d_beta)

Shapes: ``x``, ``x_data``, ``noise`` are ``(B, *dims)``; ``t`` is ``(B,)`` (or 0-dim, or a Python float) and
broadcasts over the trailing dims. ``alpha(t)`` and friends return tensors shaped like ``t``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from . import _expression, _validate, conversions
from .conversions import KINDS, Schedule


class GaussianPath:
    r"""Base class: a path defined by :math:`\alpha_t, \beta_t` and their time derivatives.

    Subclasses implement ``_alpha``, ``_beta``, ``_d_alpha``, ``_d_beta`` on a float tensor ``t`` already
    checked to lie in [0, 1] (and ``_beta_d_beta`` where ``beta * beta'`` needs a closed form). The
    conditional density is :math:`p_t(x|x_{data}) = N(\alpha_t x_{data},
    \beta_t^2 I)`; the prior (the law of ``x`` at t = 0 when ``alpha_0 = 0``) is :math:`N(0, \beta_0^2 I)`.
    """

    name: str = "custom"

    # -- schedule, implemented by subclasses ---------------------------------------------------------
    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _beta(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _d_beta(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _beta_d_beta(self, t: torch.Tensor) -> torch.Tensor | None:
        """Closed form of ``beta * beta'`` where the product is finite but ``beta'`` is not; None: the
        plain product is exact."""
        return None

    def options(self) -> dict[str, Any]:
        """The constructor options; ``get_path(self.name, **self.options())`` rebuilds the path."""
        return {}

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description (stored in checkpoints)."""
        return {"name": self.name, **self.options()}

    def spec(self) -> tuple[Any, ...]:
        """What defines the path, hashable: its class and its options (a custom path's definitions, whose
        callables count by identity). Paths compare equal (``==``) when their specs do: two objects built
        from the same name and options are the same path."""
        return (type(self), *sorted(self.options().items()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GaussianPath):
            return NotImplemented
        return self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(self.spec())

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    # -- public schedule -------------------------------------------------------------------------------
    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """:math:`\\alpha_t`, shaped like ``t``."""
        return self._alpha(_validate.time(t))

    def beta(self, t: torch.Tensor | float) -> torch.Tensor:
        """:math:`\\beta_t`, shaped like ``t``."""
        return self._beta(_validate.time(t))

    def d_alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """:math:`d\\alpha_t/dt`, shaped like ``t``."""
        return self._d_alpha(_validate.time(t))

    def d_beta(self, t: torch.Tensor | float) -> torch.Tensor:
        """:math:`d\\beta_t/dt`, shaped like ``t``."""
        return self._d_beta(_validate.time(t))

    def schedule(self, t: torch.Tensor | float) -> Schedule:
        """The named tuple ``Schedule(alpha, beta, d_alpha, d_beta)`` at ``t``, each shaped like ``t``.

        ``schedule(t).beta_d_beta`` is the product ``beta * beta'`` from its closed form (finite where
        ``beta'`` alone diverges). Pure functions of a schedule: :mod:`flowscore.conversions`.
        """
        return self._schedule(_validate.time(t))

    def _schedule(self, t: torch.Tensor) -> Schedule:
        """:meth:`schedule` at an already-checked tensor ``t``."""
        return Schedule(
            self._alpha(t), self._beta(t), self._d_alpha(t), self._d_beta(t), self._beta_d_beta(t)
        )

    def coefficients(self, t: torch.Tensor | float, src: str, dst: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_value, c_x)`` shaped like ``t`` with ``dst = c_value * value + c_x * x`` (see
        :func:`flowscore.conversions.conversion_coefficients`); ``ValueError`` where singular."""
        t = _validate.time(t)
        schedule = self._schedule(t)
        c_value, c_x = conversions.conversion_coefficients(schedule, src, dst)
        conversions.check_coefficients(c_value, c_x, schedule, src, dst, f" on path {self.name!r}", t)
        return c_value, c_x

    def log_snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """:math:`\\log(\\alpha_t^2/\\beta_t^2)`; -inf where alpha = 0, +inf where beta = 0."""
        t = _validate.time(t)
        return 2 * (torch.log(self._alpha(t)) - torch.log(self._beta(t)))

    def diffusion_sq(self, t: torch.Tensor | float) -> torch.Tensor:
        r"""Squared diffusion coefficient :math:`g_t^2 = 2\beta_t^2(\alpha'_t/\alpha_t - \beta'_t/\beta_t)`.

        This is the g of the forward (score-SDE) process whose marginals are this path, written in
        flowscore's time: ``velocity = (alpha'/alpha) x + (g^2 / 2) score``. Computed as
        ``2 (alpha' beta^2 - alpha beta beta') / alpha`` with the closed-form ``beta beta'``, so its limit at
        t = 1 is exact (``beta_min`` on ``vp-linear``); infinite where alpha = 0 (t = 0 on ``linear`` and
        ``vp``), where it raises ``ValueError``. Shaped like ``t``.
        """
        c_score, _ = self.coefficients(t, "score", "velocity")
        return 2 * c_score

    # -- the prior at t = 0 ----------------------------------------------------------------------------
    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) that samplers start from at t = 0."""
        return float(self._beta(torch.tensor(0.0, dtype=torch.float64)))

    def sample_prior(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draws from the prior N(0, prior_std^2 I)."""
        return self.prior_std * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-density of the prior N(0, prior_std^2 I) at ``x`` (``(B, *dims)``)."""
        x = _validate.batch(x, "x")
        d = x[0].numel()
        s = self.prior_std
        sq = x.flatten(1).pow(2).sum(1)
        return -0.5 * sq / s**2 - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)

    # -- samples and conditional targets --------------------------------------------------------------
    def _batch_and_time(self, x: torch.Tensor, t: torch.Tensor | float, name: str = "x"):
        x = _validate.batch(x, name)
        t = _validate.time(t, like=x)
        return x, t

    def _pair(self, a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> torch.Tensor:
        b = _validate.tensor(b, name_b)
        _validate.same_shape(a, b, name_a, name_b)
        _validate.same_kind(a, b, name_a, name_b)
        return b

    def _point_and_data(
        self, x: torch.Tensor, x_data: torch.Tensor, t: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, x_data, t)`` checked: a batch ``x``, a time for it, ``x_data`` of the same shape and kind."""
        x, t = self._batch_and_time(x, t)
        return x, self._pair(x, x_data, "x", "x_data"), t

    def sample(self, x_data: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """``x = alpha_t * x_data + beta_t * noise``, shaped ``(B, *dims)``."""
        x_data, t = self._batch_and_time(x_data, t, "x_data")
        noise = self._pair(x_data, noise, "x_data", "noise")
        alpha, beta = self._alpha(t), self._beta(t)
        return _validate.expand(alpha, x_data) * x_data + _validate.expand(beta, x_data) * noise

    def target(
        self, x_data: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor, kind: str = "velocity"
    ) -> torch.Tensor:
        """The conditional target of ``kind`` at ``x = sample(x_data, t, noise)``, formed without division.

        velocity ``alpha' x_data + beta' noise``; noise ``noise``; data ``x_data``; score ``-noise / beta``
        (the only one that divides: singular where beta = 0, i.e. at t = 1 on ``linear``, ``vp``,
        ``vp-linear``, where it raises ``ValueError``). On ``vp-linear`` beta' diverges at t = 1: the
        velocity target uses its documented clamp there.
        """
        _validate.choice(kind, KINDS, "kind")
        x_data, t = self._batch_and_time(x_data, t, "x_data")
        noise = self._pair(x_data, noise, "x_data", "noise")
        if kind == "data":
            return x_data
        if kind == "noise":
            return noise
        if kind == "velocity":
            return (
                _validate.expand(self._d_alpha(t), x_data) * x_data
                + _validate.expand(self._d_beta(t), x_data) * noise
            )
        c_noise, _ = self.coefficients(t, "noise", "score")
        return _validate.expand(c_noise, x_data) * noise

    def conditional_velocity(
        self,
        x: torch.Tensor,
        x_data: torch.Tensor,
        t: torch.Tensor | float,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Conditional velocity :math:`u_t(x|x_{data}) = \alpha'_t x_{data} + \beta'_t \varepsilon`.

        Without ``noise`` it is computed from ``x`` as
        :math:`(\beta'_t/\beta_t)\,x + (\alpha'_t - \alpha_t\beta'_t/\beta_t)\,x_{data}`, which is singular
        where beta = 0 (t = 1 on ``linear``, ``vp``, ``vp-linear``): there it raises ``ValueError``. Pass the
        ``noise`` that produced ``x`` to get the division-free form, finite on all of [0, 1].
        """
        if noise is not None:
            return self.target(x_data, t, noise, "velocity")
        x, x_data, t = self._point_and_data(x, x_data, t)
        return self.convert(x_data, x, t, "data", "velocity")

    def conditional_score(
        self, x: torch.Tensor, x_data: torch.Tensor, t: torch.Tensor | float
    ) -> torch.Tensor:
        r"""Conditional score :math:`\nabla_x \log p_t(x|x_{data}) = -(x - \alpha_t x_{data})/\beta_t^2`.

        Singular where beta = 0 (t = 1 on ``linear``, ``vp``, ``vp-linear``): ``ValueError`` there.
        """
        x, x_data, t = self._point_and_data(x, x_data, t)
        return self.convert(x_data, x, t, "data", "score")

    def conditional_log_prob(
        self, x: torch.Tensor, x_data: torch.Tensor, t: torch.Tensor | float
    ) -> torch.Tensor:
        """``(B,)`` log N(x; alpha_t x_data, beta_t^2 I).

        Needs beta_t > 0: where beta = 0 (t = 1 on ``linear``, ``vp``, ``vp-linear``) the density is a Dirac
        and this raises ``ValueError`` instead of returning NaN.
        """
        x, x_data, t = self._point_and_data(x, x_data, t)
        beta_t = self._beta(t)
        if _validate.value_checks_enabled() and bool((beta_t <= 0).any()):
            t_bad = t[beta_t <= 0].flatten()[0].item()
            raise ValueError(f"conditional_log_prob needs beta_t > 0 (t < 1); beta_t = 0 at t = {t_bad:g}")
        alpha, beta = _validate.expand(self._alpha(t), x), _validate.expand(beta_t, x)
        d = x[0].numel()
        sq = ((x - alpha * x_data) / beta).flatten(1).pow(2).sum(1)
        log_beta = torch.log(beta).flatten()
        log_beta = log_beta if log_beta.numel() == x.shape[0] else log_beta.expand(x.shape[0])
        return -0.5 * sq - d * log_beta - 0.5 * d * math.log(2 * math.pi)

    def convert(
        self, value: torch.Tensor, x: torch.Tensor, t: torch.Tensor | float, src: str, dst: str
    ) -> torch.Tensor:
        """Map ``value`` (kind ``src``) at ``(x, t)`` to kind ``dst`` (:func:`flowscore.conversions.convert`).

        ``x``, ``value``: ``(B, *dims)``; ``t``: float, 0-dim or ``(B,)``. ``ValueError`` at a time where
        the direction is singular (naming the path and t); never NaN or Inf for finite inputs.
        """
        x = _validate.batch(x, "x")
        value = _validate.tensor(value, "value")
        _validate.same_shape(x, value, "x", "value")
        _validate.same_kind(x, value, "x", "value")
        t = _validate.time(t, like=x)
        if src == dst:
            _validate.choice(src, KINDS, "src")
            return value
        c_value, c_x = self.coefficients(t, src, dst)
        return _validate.expand(c_value, x) * value + _validate.expand(c_x, x) * x


class LinearPath(GaussianPath):
    r"""``"linear"``: alpha = t, beta = 1 - (1 - sigma_min) t (conditional optimal transport, rectified flow).

    ``sigma_min = 0`` (the default) is the straight line alpha = t, beta = 1 - t, velocity target
    ``x_data - noise``. ``sigma_min`` in (0, 1) is Lipman et al.'s OT path with a minimum noise: the path
    ends at the data blurred by N(0, sigma_min^2 I) (beta_1 = sigma_min), velocity target
    ``x_data - (1 - sigma_min) noise``; beta > 0 on all of [0, 1], so the score, the conversions and the
    diffusion coefficient are finite at t = 1 too (g^2(1) = 2 sigma_min). Not torchcfm's
    ``ConditionalFlowMatcher(sigma)``, which is the path beta = sqrt((1 - t)^2 + sigma^2) (docs/theory.md,
    "sigma_min and torchcfm's sigma"). Not variance preserving.
    """

    name = "linear"

    def __init__(self, sigma_min: float = 0.0):
        self.sigma_min = _validate.number(sigma_min, "sigma_min", 0.0, 1.0, high_open=True)

    def options(self):
        return {"sigma_min": self.sigma_min} if self.sigma_min else {}

    def _alpha(self, t):
        return t.clone()

    def _beta(self, t):
        return 1 - t if not self.sigma_min else (1 - t) + self.sigma_min * t  # exact at both ends

    def _d_alpha(self, t):
        return torch.ones_like(t)

    def _d_beta(self, t):
        return torch.full_like(t, -(1 - self.sigma_min))


class CosinePath(GaussianPath):
    """``"vp"``: alpha = sin(pi t / 2), beta = cos(pi t / 2) (variance preserving, cosine schedule).

    beta is evaluated as sin(pi (1 - t) / 2) so that it is exactly 0 at t = 1 in floating point.
    """

    name = "vp"

    def _alpha(self, t):
        return torch.sin(0.5 * math.pi * t)

    def _beta(self, t):
        return torch.sin(0.5 * math.pi * (1 - t))

    def _d_alpha(self, t):
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * (1 - t))

    def _d_beta(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VPLinearPath(GaussianPath):
    r"""``"vp-linear"``: the DDPM / score-SDE schedule in flowscore's time direction.

    With ``s = 1 - t`` and :math:`T(t) = s\,\beta_{min} + s^2(\beta_{max} - \beta_{min})/2`:
    ``alpha = exp(-T/2)``, ``beta = sqrt(1 - exp(-T))``, ``T' = -(beta_min + s (beta_max - beta_min))``,
    ``alpha' = -T' alpha / 2``, ``beta' = T' exp(-T) / (2 beta)``.

    Endpoints: alpha_0 = exp(-T(0)/2) (about 0.0066 with the defaults, not exactly 0), beta_1 = 0, and
    ``beta'`` diverges like ``1/sqrt(1 - t)`` at t = 1. ``d_beta`` alone is therefore evaluated at
    ``min(t, 1 - t_clamp)`` (default ``t_clamp = 1e-5``, as in score_sde), which keeps it finite on all of
    [0, 1]; it enters only the conditional velocity target and the ``noise -> velocity`` conversion. Every
    product ``beta * beta'`` (the diffusion coefficient, the ``score <-> velocity`` and ``velocity ->
    data/noise`` conversions, the preconditioning's ``c_out``, the marginal velocity of a mixture) uses the
    exact closed form ``beta beta' = exp(-T) T' / 2``, whose limit at t = 1 is ``-beta_min / 2``.
    """

    name = "vp-linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_clamp: float = 1e-5):
        beta_min = _validate.number(beta_min, "beta_min", 0.0)
        beta_max = _validate.number(beta_max, "beta_max", 0.0)
        if not beta_min <= beta_max:
            raise ValueError(f"vp-linear needs 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
        t_clamp = _validate.number(t_clamp, "t_clamp", 0.0, 1.0, low_open=True, high_open=True)
        self.beta_min, self.beta_max, self.t_clamp = beta_min, beta_max, t_clamp

    def options(self):
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, "t_clamp": self.t_clamp}

    def _big_t(self, t):
        s = 1 - t
        return s * self.beta_min + 0.5 * s * s * (self.beta_max - self.beta_min)

    def _d_big_t(self, t):
        return -(self.beta_min + (1 - t) * (self.beta_max - self.beta_min))

    def _alpha(self, t):
        return torch.exp(-0.5 * self._big_t(t))

    def _beta(self, t):
        return torch.sqrt(-torch.expm1(-self._big_t(t)))

    def _d_alpha(self, t):
        return -0.5 * self._d_big_t(t) * self._alpha(t)

    def _d_beta(self, t):
        t = t.clamp(max=1 - self.t_clamp)
        big_t = self._big_t(t)
        return 0.5 * self._d_big_t(t) * torch.exp(-big_t) / torch.sqrt(-torch.expm1(-big_t))

    def _beta_d_beta(self, t):
        return 0.5 * self._d_big_t(t) * torch.exp(-self._big_t(t))


class VEPath(GaussianPath):
    """``"ve"``: variance exploding, alpha = 1, beta = sigma_max^(1-t) * sigma_min^t (geometric).

    beta runs from ``sigma_max`` (default 80) at t = 0 to ``sigma_min`` (default 0.002) at t = 1. Two
    differences from the other paths: beta_1 = sigma_min is not 0 (the path ends at the data blurred by
    sigma_min), and the prior is N(0, sigma_max^2 I), an approximation of p_0 = p_data * N(0, sigma_max^2)
    that is good when sigma_max is much larger than the data's scale.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        sigma_min = _validate.number(sigma_min, "sigma_min", 0.0, low_open=True)
        sigma_max = _validate.number(sigma_max, "sigma_max", 0.0, low_open=True)
        if not sigma_min < sigma_max:
            raise ValueError(f"ve needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def options(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def _alpha(self, t):
        return torch.ones_like(t)

    def _beta(self, t):
        return self.sigma_max * (self.sigma_min / self.sigma_max) ** t

    def _d_alpha(self, t):
        return torch.zeros_like(t)

    def _d_beta(self, t):
        return self._beta(t) * math.log(self.sigma_min / self.sigma_max)


def _derivative(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """Elementwise d fn / dt by autograd (``fn`` must act elementwise)."""
    with torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        y = torch.as_tensor(fn(tt), dtype=t.dtype, device=t.device)
        if not y.requires_grad:
            return torch.zeros_like(t)
        (grad,) = torch.autograd.grad(y.expand_as(tt).sum(), tt, allow_unused=True)
    return torch.zeros_like(t) if grad is None else grad.detach()


Definition = Callable[[torch.Tensor], torch.Tensor] | str
CHECK_POINTS = 1025
"""Times in [0, 1] (evenly spaced, float64) on which a custom path from expressions is checked."""


class CustomPath(GaussianPath):
    """A path from ``alpha(t)``, ``beta(t)``: callables acting elementwise on a tensor ``t``, or expression
    strings in ``t``.

    ``d_alpha``/``d_beta`` default to autograd of ``alpha``/``beta``. The definitions should satisfy
    ``beta >= 0``; for a generative path, ``alpha_0 = 0`` and ``beta_1 = 0`` (or small).

    **From expressions** (``get_path("custom", alpha="t", beta="1 - t")``): numbers, ``t``, ``pi``, ``e``,
    ``+ - * / **`` and the functions of :data:`flowscore._expression.FUNCTIONS` (sin, cos, exp, log, sqrt,
    ...), parsed without ``eval``. Such a path is checked on :data:`CHECK_POINTS` times in [0, 1] (alpha,
    beta and both derivatives finite, beta >= 0; else ``ValueError`` naming the first bad t), and it can be
    stored: :meth:`config` holds the strings, so a run (``TrainConfig(path="custom", path_options={"alpha":
    "t", "beta": "1 - t"})``) reloads it. A path holding any Python callable cannot be stored.
    """

    name = "custom"

    def __init__(
        self,
        alpha: Definition,
        beta: Definition,
        d_alpha: Definition | None = None,
        d_beta: Definition | None = None,
    ):
        given = {"alpha": alpha, "beta": beta, "d_alpha": d_alpha, "d_beta": d_beta}
        fns = {}
        for key, fn in given.items():
            if isinstance(fn, str):
                fns[key] = _expression.compile_expression(fn, f"custom path: {key}")
            elif fn is not None and not callable(fn):
                raise ValueError(
                    f"custom path: {key} must be callable or an expression string in t, got "
                    f"{type(fn).__name__}"
                )
            else:
                fns[key] = fn
        self._given = given
        self.alpha_fn, self.beta_fn, self.d_alpha_fn, self.d_beta_fn = (fns[k] for k in given)
        if self.storable:
            self._check_on_grid()

    @property
    def storable(self) -> bool:
        """Whether every definition is an expression string (then :meth:`config` can store the path)."""
        return all(v is None or isinstance(v, str) for v in self._given.values())

    def _check_on_grid(self) -> None:
        t = torch.linspace(0, 1, CHECK_POINTS, dtype=torch.float64)
        values = dict(zip(("alpha", "beta", "d_alpha", "d_beta"), self._schedule(t)[:4], strict=True))
        for key, value in values.items():
            bad = ~torch.isfinite(value) | ((value < 0) if key == "beta" else torch.zeros_like(t, dtype=bool))
            if bool(bad.any()):
                t_bad, v_bad = t[bad][0].item(), value[bad][0].item()
                rule = "finite and >= 0" if key == "beta" else "finite"
                raise ValueError(
                    f"custom path: {key} must be {rule} on [0, 1], got {v_bad:g} at t = {t_bad:g}"
                )

    def callables(self) -> dict[str, Any]:
        """The constructor's definitions (callables or strings); ``CustomPath(**path.callables())``
        rebuilds the path."""
        return dict(self._given)

    def spec(self) -> tuple[Any, ...]:
        """The class and every definition (expression strings by value, callables by identity)."""
        return (type(self), *((k, v) for k, v in self._given.items() if v is not None))

    def options(self):
        return {k: v for k, v in self._given.items() if v is not None} if self.storable else {}

    def config(self):
        if not self.storable:
            raise ValueError(
                "a custom path holds Python callables and cannot be stored in a checkpoint; declare it from "
                "expression strings, e.g. get_path('custom', alpha='t', beta='1 - t')"
            )
        return super().config()

    def _call(self, fn, t):
        return torch.as_tensor(fn(t), dtype=t.dtype, device=t.device).expand_as(t).clone()

    def _alpha(self, t):
        return self._call(self.alpha_fn, t)

    def _beta(self, t):
        return self._call(self.beta_fn, t)

    def _d_alpha(self, t):
        return self._call(self.d_alpha_fn, t) if self.d_alpha_fn else _derivative(self.alpha_fn, t)

    def _d_beta(self, t):
        return self._call(self.d_beta_fn, t) if self.d_beta_fn else _derivative(self.beta_fn, t)


PATHS: dict[str, type[GaussianPath]] = {
    "linear": LinearPath,
    "vp": CosinePath,
    "vp-linear": VPLinearPath,
    "ve": VEPath,
    "custom": CustomPath,
}


def get_path(name: str | GaussianPath, **options: Any) -> GaussianPath:
    """A path by name: ``"linear"``, ``"vp"``, ``"vp-linear"``, ``"ve"`` or ``"custom"`` (with ``alpha=``,
    ``beta=`` callables or expression strings in t). ``options`` are the schedule constants, e.g.
    ``get_path("ve", sigma_max=50)``, ``get_path("linear", sigma_min=0.1)``.

    Given a path instance, returns it unchanged when there are no ``options``, else a new path of the same
    kind with those options applied over its own (an unknown option raises ``ValueError``).
    """
    if isinstance(name, GaussianPath):
        if not options:
            return name
        base = name.callables() if isinstance(name, CustomPath) else name.options()
        cls, options, name = type(name), {**base, **options}, name.name
    else:
        _validate.choice(name, tuple(PATHS), "path")
        cls = PATHS[name]
    params = {} if cls.__init__ is object.__init__ else inspect.signature(cls.__init__).parameters
    takes = [k for k, p in params.items() if k != "self" and p.kind is not p.VAR_KEYWORD]
    unknown = sorted(set(options) - set(takes))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        allowed = f"takes {', '.join(takes)}" if takes else "takes no options"
        raise ValueError(f"bad options for path {name!r}: it {allowed}, got {', '.join(unknown)}")
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for path {name!r}: {err}") from None
