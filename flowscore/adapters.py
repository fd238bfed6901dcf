r"""Adapters between flowscore's model convention and those of other code bases.

flowscore: ``model(x, t)`` (or ``model(x, t, y)``) with t = 0 noise, t = 1 data, ``x = alpha_t x_data +
beta_t noise``, ``t`` shaped ``(B,)``, predicting one of ``velocity``, ``score``, ``noise``, ``data``.

* k-diffusion / EDM denoisers ``D(x, sigma)``: sigma = beta/alpha and the "variance exploding" scaling
  ``x_ve = x / alpha = x_data + sigma * noise``; D is the data prediction E[x_data | x].
  :func:`to_denoiser` and :func:`from_denoiser`.
* diffusers-style discrete models ``model(x_k, k)``: integer timestep ``k`` in ``0..T-1`` (``k = T - 1``
  is the noisiest: the direction is flipped), ``x_k = sqrt(abar_k) x_data + sqrt(1 - abar_k) noise`` with
  ``abar = alphas_cumprod``, predicting ``"epsilon"`` (the noise), ``"v_prediction"`` (``v = sqrt(abar)
  noise - sqrt(1 - abar) x_data``) or ``"sample"`` (the data). :func:`from_discrete` and
  :func:`to_discrete` match a flowscore time to the discrete timestep with the same sigma, interpolating
  log sigma between the timesteps (k-diffusion's ``DiscreteSchedule``), and rescale x.
* time conventions (:func:`wrap_time`): a model that wants ``t`` as a column ``(B, 1)``, flipped (``1 - t``),
  as sigma, as log-sigma, or as a diffusers timestep.

Every wrapped flowscore model carries a ``prediction`` attribute, which ``flowscore.sample`` reads when its
``prediction`` argument is None.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from . import _validate
from .conditioning import call_model
from .conversions import KINDS
from .grids import sigma_of_t, t_of_sigma
from .paths import GaussianPath, get_path

DISCRETE_PREDICTIONS = ("epsilon", "v_prediction", "sample")
TIME_CONVENTIONS = ("column", "flip", "sigma", "log-sigma", "timestep")


class _Wrapped:
    """A callable model with a ``prediction`` attribute (what ``flowscore.sample`` reads)."""

    def __init__(self, fn: Callable[..., torch.Tensor], prediction: str, description: str):
        self._fn, self.prediction, self._description = fn, prediction, description

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._description}, predicts {self.prediction!r}>"


def _call(model: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return call_model(model, x, t, y)


def _column(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _validate.expand(v, x)


def _per_row(v: torch.Tensor, batch: int) -> torch.Tensor:
    return v.expand(batch) if v.dim() == 0 else v


# -- k-diffusion / EDM ---------------------------------------------------------------------------------------
def to_denoiser(model: Callable, path: GaussianPath | str, prediction: str = "velocity") -> _Wrapped:
    """A k-diffusion / EDM denoiser ``D(x_ve, sigma, y=None)`` from a flowscore model.

    ``sigma``: float, 0-dim or ``(B,)`` noise levels beta/alpha (>= 0, within the path's range); ``x_ve``:
    ``(B, *dims)`` in the variance-exploding scaling ``x_data + sigma * noise``. Computes ``t = t(sigma)``
    (:func:`flowscore.grids.t_of_sigma`), ``x = alpha_t x_ve``, calls ``model(x, t)`` and converts its output
    to the data prediction (what D returns). ``ValueError`` where that conversion is singular (a noise
    model at sigma = inf, a data-to-data map never is).
    """
    path = get_path(path)
    _validate.choice(prediction, KINDS, "prediction")

    def denoiser(x_ve: torch.Tensor, sigma: torch.Tensor | float, y: torch.Tensor | None = None):
        x_ve = _validate.batch(x_ve, "x")
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        t64 = _per_row(t_of_sigma(path, sigma.detach().cpu()), x_ve.shape[0])
        t = t64.to(dtype=x_ve.dtype, device=x_ve.device)
        alpha = path.alpha(t64).to(dtype=x_ve.dtype, device=x_ve.device)
        x = _column(alpha, x_ve) * x_ve
        out = _call(model, x, t, y)
        return out if prediction == "data" else path.convert(out, x, t, prediction, "data")

    return _Wrapped(denoiser, "data", f"k-diffusion denoiser of a {prediction} model on {path!r}")


def from_denoiser(denoiser: Callable, path: GaussianPath | str) -> _Wrapped:
    """A flowscore model ``model(x, t, y=None)`` predicting ``"data"`` from a denoiser ``D(x_ve, sigma)``.

    ``model(x, t) = D(x / alpha_t, beta_t / alpha_t)`` (with ``y`` passed on as ``D(x_ve, sigma, y)``).
    Where alpha_t = 0 (t = 0 on ``linear`` and ``vp``) sigma is infinite and a denoiser cannot be evaluated:
    that raises ``ValueError``. Start sampling at a finite sigma, e.g. ``flowscore.sample(model, path, n,
    t_start=float(flowscore.grids.t_of_sigma(path, 80.0)))``.
    """
    path = get_path(path)
    if not callable(denoiser):
        raise ValueError(f"denoiser must be callable as D(x, sigma), got {type(denoiser).__name__}")

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = _validate.batch(x, "x")
        t = _per_row(_validate.time(t, like=x), x.shape[0])
        alpha = path.alpha(t)
        if bool((alpha <= 0).any()):
            raise ValueError(
                "a denoiser D(x, sigma) cannot be evaluated where alpha_t = 0 (sigma = inf, t = 0 on this "
                "path); start sampling at t_start > 0 (e.g. the t of sigma_max = 80)"
            )
        sigma = (path.beta(t) / alpha).to(dtype=x.dtype)
        x_ve = x / _column(alpha, x)
        out = denoiser(x_ve, sigma) if y is None else denoiser(x_ve, sigma, y)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"the denoiser must return a tensor shaped like x {tuple(x.shape)}")
        return out

    return _Wrapped(model, "data", f"flowscore model of a denoiser on {path!r}")


# -- diffusers-style discrete timesteps ----------------------------------------------------------------------
class DiscreteSchedule:
    """``alphas_cumprod`` (T,) as noise levels ``sigma_k = sqrt((1 - abar_k) / abar_k)`` (increasing in k),
    with the fractional timestep of any sigma by linear interpolation of log sigma (k-diffusion)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if abar.dim() != 1 or abar.shape[0] < 2:
            raise ValueError(f"alphas_cumprod must be 1D with >= 2 entries, got shape {tuple(abar.shape)}")
        if not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1)")
        if not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing (timestep T - 1 is the noisiest)")
        self.alphas_cumprod = abar
        self.log_sigmas = 0.5 * (torch.log1p(-abar) - torch.log(abar))

    def __len__(self) -> int:
        return self.alphas_cumprod.shape[0]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timesteps (float64) of ``sigma``; ``ValueError`` outside ``[sigma_0, sigma_{T-1}]``."""
        log_sigma = torch.log(torch.as_tensor(sigma, dtype=torch.float64))
        lo, hi = float(self.log_sigmas[0]), float(self.log_sigmas[-1])
        if bool((log_sigma < lo - 1e-9).any()) or bool((log_sigma > hi + 1e-9).any()):
            raise ValueError(
                f"sigma outside the discrete schedule's range [{math.exp(lo):.4g}, {math.exp(hi):.4g}]: use "
                "times whose noise level the discrete model was trained on"
            )
        log_sigma = log_sigma.clamp(lo, hi)
        k = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, len(self) - 1)
        left, right = self.log_sigmas[k - 1], self.log_sigmas[k]
        return (k - 1).to(torch.float64) + (log_sigma - left) / (right - left)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """sigma at (fractional) timesteps, by the same interpolation of log sigma."""
        k = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, len(self) - 1)
        low = k.floor().long().clamp(max=len(self) - 2)
        w = k - low
        return torch.exp((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1])


def _discrete_scales(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(abar), sqrt(1 - abar))`` of the variance-preserving scaling with noise level sigma."""
    a = torch.rsqrt(1 + sigma**2)
    return a, sigma * a


def _old_keyword(new_value: str, old_value: str | None, new: str, old: str, default: str, what: str) -> str:
    """``new_value``, or the deprecated keyword ``old`` (DeprecationWarning) holding that diffusers word."""
    if old_value is None:
        return new_value
    warnings.warn(
        f"{what}({old}=...) is deprecated: pass {new}=... (diffusers' words: "
        f"{', '.join(DISCRETE_PREDICTIONS)}; prediction= is flowscore's kind: velocity, score, noise, data)",
        DeprecationWarning,
        stacklevel=3,
    )
    if new_value != default and new_value != old_value:
        raise ValueError(f"pass {new}= only (got {new}={new_value!r} and the older {old}={old_value!r})")
    return old_value


def from_discrete(
    model: Callable,
    alphas_cumprod: torch.Tensor,
    path: GaussianPath | str,
    prediction_type: str = "epsilon",
    *,
    quantize: bool = False,
    prediction: str | None = None,
) -> _Wrapped:
    """A flowscore model on ``path`` from a diffusers-style ``model(x_k, timestep)``.

    At flowscore time t: sigma = beta_t/alpha_t, the (fractional, or rounded with ``quantize``) timestep k
    with that sigma (:class:`DiscreteSchedule`), ``x_k = x * sqrt(abar)/alpha_t`` with
    ``sqrt(abar) = 1/sqrt(1 + sigma^2)``, and the output mapped to flowscore's kinds: ``"epsilon"`` is the
    noise prediction, ``"sample"`` the data prediction, ``"v_prediction"`` gives the noise
    ``sqrt(1 - abar) x_k + sqrt(abar) v``. The wrapper predicts ``"noise"`` (epsilon, v) or ``"data"``
    (sample): its ``prediction`` attribute says which. Times whose sigma lies outside the discrete schedule
    raise ``ValueError``.

    Words: ``prediction_type`` is the discrete model's, in diffusers' words (its ``prediction_type``:
    epsilon, v_prediction, sample); the wrapper's ``prediction`` is flowscore's (noise or data).
    ``prediction=`` for the diffusers word is the deprecated older keyword.
    """
    path = get_path(path)
    schedule = DiscreteSchedule(alphas_cumprod)
    prediction = _old_keyword(
        prediction_type, prediction, "prediction_type", "prediction", "epsilon", "from_discrete"
    )
    _validate.choice(prediction, DISCRETE_PREDICTIONS, "prediction_type")

    def wrapped(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = _validate.batch(x, "x")
        t = _per_row(_validate.time(t, like=x), x.shape[0])
        t64 = t.detach().to(device="cpu", dtype=torch.float64)
        sigma = sigma_of_t(path, t64)
        k = schedule.timestep(sigma)
        if quantize:
            k = k.round()
            sigma = schedule.sigma(k)
        a, b = _discrete_scales(sigma)
        scale = (a / path.alpha(t64)).to(dtype=x.dtype, device=x.device)
        x_k = _column(scale, x) * x
        timestep = (k.round().long() if quantize else k.to(x.dtype)).to(x.device)
        out = model(x_k, timestep) if y is None else model(x_k, timestep, y)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"the discrete model must return a tensor shaped like x {tuple(x.shape)}")
        if prediction == "v_prediction":
            a, b = (_column(c.to(dtype=x.dtype, device=x.device), x) for c in (a, b))
            return b * x_k + a * out
        return out

    kind = "data" if prediction == "sample" else "noise"
    return _Wrapped(wrapped, kind, f"flowscore model of a discrete {prediction} model on {path!r}")


def to_discrete(
    model: Callable,
    path: GaussianPath | str,
    prediction: str,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    *,
    kind: str | None = None,
) -> _Wrapped:
    """A diffusers-style ``f(x_k, timestep, y=None)`` predicting ``prediction_type`` (diffusers' words:
    epsilon, v_prediction, sample) from a flowscore model predicting ``prediction`` (flowscore's words:
    velocity, score, noise, data) on ``path``. ``kind=`` is the deprecated older keyword of
    ``prediction_type``.

    The inverse of :func:`from_discrete`: the timestep's sigma (interpolated for fractional timesteps), the
    flowscore time with that sigma, ``x = alpha_t x_k / sqrt(abar)``, the model's output converted to the
    noise and data predictions, then ``v = sqrt(abar) noise - sqrt(1 - abar) data`` for v-prediction.
    """
    path = get_path(path)
    schedule = DiscreteSchedule(alphas_cumprod)
    _validate.choice(prediction, KINDS, "prediction")
    kind = _old_keyword(prediction_type, kind, "prediction_type", "kind", "epsilon", "to_discrete")
    _validate.choice(kind, DISCRETE_PREDICTIONS, "prediction_type")

    def discrete(x_k: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x_k = _validate.batch(x_k, "x")
        timestep = _per_row(torch.as_tensor(timestep).detach().cpu(), x_k.shape[0])
        sigma = schedule.sigma(timestep)
        t64 = t_of_sigma(path, sigma)
        a, b = _discrete_scales(sigma)
        scale = (path.alpha(t64) / a).to(dtype=x_k.dtype, device=x_k.device)
        x = _column(scale, x_k) * x_k
        t = t64.to(dtype=x_k.dtype, device=x_k.device)
        out = _call(model, x, t, y)
        if kind == "sample":
            return path.convert(out, x, t, prediction, "data")
        noise = path.convert(out, x, t, prediction, "noise")
        if kind == "epsilon":
            return noise
        data = path.convert(out, x, t, prediction, "data")
        a, b = (_column(c.to(dtype=x_k.dtype, device=x_k.device), x_k) for c in (a, b))
        return a * noise - b * data

    return _Wrapped(discrete, kind, f"discrete {kind} model of a {prediction} model on {path!r}")


# -- time conventions ----------------------------------------------------------------------------------------
def wrap_time(
    model: Callable,
    convention: str,
    *,
    path: GaussianPath | str | None = None,
    num_timesteps: int = 1000,
    prediction: str = "velocity",
) -> _Wrapped:
    """A flowscore model ``(x, t, y=None)`` from a model that takes its time another way.

    ``convention``: ``"column"`` (t as ``(B, 1)``), ``"flip"`` (``1 - t``: t = 0 is data, as in diffusers'
    flow-matching schedulers' sigma), ``"sigma"`` (beta_t/alpha_t, needs ``path``), ``"log-sigma"`` (its
    log; k-diffusion's c_noise is a quarter of it), ``"timestep"`` (``round((1 - t) (num_timesteps - 1))``
    as a long tensor, flipped like diffusers' timesteps). Only the time changes: ``x`` and the output are
    passed as they are (``prediction``, default ``"velocity"``, is recorded on the wrapper for
    ``flowscore.sample``; for rescaled ``x`` use :func:`from_denoiser` or :func:`from_discrete`).
    """
    _validate.choice(convention, TIME_CONVENTIONS, "convention")
    _validate.choice(prediction, KINDS, "prediction")
    num_timesteps = _validate.integer(num_timesteps, "num_timesteps", minimum=2)
    if convention in ("sigma", "log-sigma"):
        if path is None:
            raise ValueError(f"convention {convention!r} needs path= (sigma = beta/alpha of that path)")
        path = get_path(path)

    def time_of(t: torch.Tensor) -> torch.Tensor:
        if convention == "column":
            return t[:, None]
        if convention == "flip":
            return 1 - t
        if convention == "timestep":
            return torch.round((1 - t) * (num_timesteps - 1)).long()
        sigma = sigma_of_t(path, t.detach()).to(dtype=t.dtype, device=t.device)
        return sigma if convention == "sigma" else torch.log(sigma)

    def wrapped(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = _validate.batch(x, "x")
        t = _per_row(_validate.time(t, like=x), x.shape[0])
        tt = time_of(t)
        return model(x, tt) if y is None else model(x, tt, y)

    return _Wrapped(wrapped, prediction, f"model with t as {convention}")
