r"""Time grids for the samplers, and the map between flowscore's time t and the noise level sigma.

The noise level of a Gaussian path is :math:`\sigma_t = \beta_t/\alpha_t` (k-diffusion's and EDM's sigma: ``x
/ alpha_t = x_data + sigma_t * noise``); the log-SNR is :math:`\log(\alpha_t^2/\beta_t^2) = -2\log\sigma_t`
(:func:`log_snr`, as ``path.log_snr``), and the exponential integrators step in half of it, :math:`\lambda_t =
\log(\alpha_t/\beta_t) = -\log\sigma_t`. sigma decreases from the noise end (t = 0, sigma = inf where alpha_0
= 0) to the data end (t = 1, sigma = 0 where beta_1 = 0).

* :func:`sigma_of_t` and :func:`t_of_sigma`: the two directions, in float64. The inverse is in closed form on
  ``linear`` (t = 1 / (1 + sigma)), ``vp`` (t = (2/pi) atan(1/sigma)), ``vp-linear`` (a quadratic in 1 - t)
  and ``ve`` (a logarithm); on any other path it is a bisection of log sigma in float64, which needs sigma
  to be non-increasing in t (checked).
* :func:`time_grid`: ``steps`` intervals from ``t_start`` to ``t_end`` (both hit exactly), spaced by
  ``"uniform"`` (in t), ``"karras"`` (EDM's rho-spacing in sigma), ``"logsnr"`` (uniform in lambda),
  ``"shift"`` (SD3's time shift) or ``"linear"`` (uniform in the linear path's time at equal log-SNR).
  The sigma grids are bounded by ``sigma_max`` and ``sigma_min``: where the
  path's sigma at ``t_start`` is larger (infinite on ``linear`` at t = 0) the grid starts with one step from
  ``t_start`` to ``t(sigma_max)``, and likewise it ends with one step from ``t(sigma_min)`` to ``t_end``.
"""

from __future__ import annotations

import math

import torch

from . import _validate
from .paths import CosinePath, GaussianPath, LinearPath, VEPath, VPLinearPath, get_path

GRIDS = ("uniform", "karras", "logsnr", "shift", "linear")
SIGMA_MIN, SIGMA_MAX, RHO, SHIFT = 0.002, 80.0, 7.0, 3.0
LOGSNR_SIGMA_MIN = 0.5
"""The ``"logsnr"`` grid ends at ``sigma_min = LOGSNR_SIGMA_MIN / steps`` before its last step to beta = 0
(chosen with ``bench/bench_fewstep.py``: the first-order last step's error shrinks with sigma_min, the
steps in between grow with log(sigma_max / sigma_min))."""
F64 = torch.float64
_BISECTION_STEPS = 80  # halvings of [0, 1]: far below float64 resolution in t
_MONOTONE_POINTS = 2049


def _as_f64(values: torch.Tensor | float | list[float]) -> torch.Tensor:
    return torch.as_tensor(values, dtype=F64).detach().cpu()


def sigma_of_t(path: GaussianPath | str, t: torch.Tensor | float) -> torch.Tensor:
    """``sigma_t = beta_t / alpha_t`` in float64 (CPU), shaped like ``t``: ``inf`` where alpha = 0, 0 where
    beta = 0."""
    path = get_path(path)
    t = _validate.time(_as_f64(t))
    alpha, beta = path.alpha(t), path.beta(t)
    with torch.no_grad():
        return torch.where(alpha > 0, beta / alpha.clamp_min(torch.finfo(F64).tiny), math.inf)


def log_snr(path: GaussianPath | str, t: torch.Tensor | float) -> torch.Tensor:
    r"""The log-SNR :math:`\log(\alpha_t^2/\beta_t^2) = -2\log\sigma_t` in float64: -inf where alpha = 0,
    +inf where beta = 0. The one convention of flowscore (``path.log_snr`` is the same); the exponential
    integrators step in half of it, :math:`\lambda_t = \log(\alpha_t/\beta_t)`."""
    return -2 * torch.log(sigma_of_t(path, t))


def _vp_linear_t(path: VPLinearPath, sigma: torch.Tensor) -> torch.Tensor:
    # sigma^2 = exp(T) - 1 with T = s b0 + s^2 (b1 - b0) / 2, s = 1 - t: the positive root, in the form
    # 2T / (b0 + sqrt(b0^2 + 2 (b1 - b0) T)) that is exact also when b1 = b0
    big_t = torch.log1p(sigma**2)
    b0, db = path.beta_min, path.beta_max - path.beta_min
    s = 2 * big_t / (b0 + torch.sqrt(b0**2 + 2 * db * big_t))
    return 1 - s


def _closed_form_t(path: GaussianPath, sigma: torch.Tensor) -> torch.Tensor | None:
    kind = type(path)
    with torch.no_grad():
        if kind is LinearPath:  # sigma = (1 - (1 - sigma_min) t) / t
            return 1 / (1 - path.sigma_min + sigma)
        if kind is CosinePath:  # sigma = cot(pi t / 2)
            return (2 / math.pi) * torch.atan2(torch.ones_like(sigma), sigma)
        if kind is VPLinearPath:
            return _vp_linear_t(path, sigma)
        if kind is VEPath:  # sigma = sigma_max^(1 - t) sigma_min^t
            return torch.log(path.sigma_max / sigma) / math.log(path.sigma_max / path.sigma_min)
    return None


def _log_sigma_table(path: GaussianPath) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.linspace(0, 1, _MONOTONE_POINTS, dtype=F64)
    log_sigma = torch.log(sigma_of_t(path, t))
    finite = log_sigma[torch.isfinite(log_sigma)]
    if bool((log_sigma[1:] > log_sigma[:-1] + 1e-12).any()) or bool(torch.isnan(log_sigma).any()):
        raise ValueError(
            f"sigma = beta/alpha of path {path!r} is not non-increasing in t, so times cannot be found from "
            "sigmas; pass explicit times= instead of a sigma grid"
        )
    if finite.numel() == 0:
        raise ValueError(f"sigma = beta/alpha of path {path!r} is nowhere finite")
    return t, log_sigma


def _bisect_t(path: GaussianPath, sigma: torch.Tensor) -> torch.Tensor:
    """The t in [0, 1] with sigma(t) = sigma, by bisection of log sigma (non-increasing) in float64."""
    _log_sigma_table(path)  # monotonicity check
    target = torch.log(sigma)
    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    with torch.no_grad():
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            above = torch.log(sigma_of_t(path, mid)) > target  # still too noisy: the root is later
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def t_of_sigma(path: GaussianPath | str, sigma: torch.Tensor | float) -> torch.Tensor:
    """The time t with ``beta_t / alpha_t = sigma``, float64 (CPU), shaped like ``sigma``.

    Closed form on ``linear``, ``vp``, ``vp-linear``, ``ve``; bisection on other paths. ``sigma = inf`` maps
    to the noise end and ``sigma = 0`` to the data end where the path reaches them. A sigma outside the
    path's range ``[sigma(1), sigma(0)]`` (e.g. above ``sigma_max`` on ``ve``) raises ``ValueError``.
    """
    path = get_path(path)
    sigma = _as_f64(sigma)
    if bool(torch.isnan(sigma).any()) or bool((sigma < 0).any()):
        raise ValueError("sigma must be >= 0 (inf for the noise end), got a negative value or NaN")
    ends = sigma_of_t(path, torch.tensor([1.0, 0.0], dtype=F64))
    lowest, highest = float(ends[0]), float(ends[1])
    slack = 1e-9
    if bool((sigma < lowest * (1 - slack)).any()) or bool((sigma > highest * (1 + slack)).any()):
        raise ValueError(
            f"sigma must lie in the range [{lowest:g}, {highest:g}] of path {path!r}, got values in "
            f"[{float(sigma.min()):g}, {float(sigma.max()):g}]"
        )
    t = _closed_form_t(path, sigma)
    if t is None:
        t = _bisect_t(path, sigma.clamp(lowest, highest).clamp_min(torch.finfo(F64).tiny))
        t = torch.where(sigma <= lowest, torch.ones_like(t), t)
        t = torch.where(sigma >= highest, torch.zeros_like(t), t)
    return t.clamp(0.0, 1.0)


def check_times(
    times: torch.Tensor | list[float] | tuple[float, ...],
    *,
    increasing: bool | None = None,
    name: str = "times",
) -> torch.Tensor:
    """``times`` as a float64 CPU 1D tensor, checked once for every sampler: at least 2 entries, in [0, 1],
    strictly increasing (``increasing=True``), strictly decreasing (False) or strictly monotone either way
    (None). ``ValueError`` otherwise."""
    if not isinstance(times, torch.Tensor):
        times = torch.as_tensor(list(times), dtype=F64)
    times = _validate.tensor(times, name).detach().to(device="cpu", dtype=F64)
    if times.dim() != 1 or times.shape[0] < 2:
        raise ValueError(f"{name} must be a 1D grid with at least 2 entries, got shape {tuple(times.shape)}")
    steps = times[1:] - times[:-1]
    up, down = bool((steps > 0).all()), bool((steps < 0).all())
    if increasing is None and not (up or down):
        raise ValueError(f"{name} must be strictly monotone")
    if increasing is not None and not (up if increasing else down):
        direction = "increasing (t = 0 noise -> t = 1 data)" if increasing else "decreasing (data -> noise)"
        raise ValueError(f"{name} must be strictly {direction}")
    if bool((times < 0).any()) or bool((times > 1).any()) or bool(torch.isnan(times).any()):
        raise ValueError(f"{name} must lie in [0, 1] (t = 0 noise, t = 1 data)")
    return times


# -- grids ---------------------------------------------------------------------------------------------------
def _sigma_points(grid: str, count: int, sigma_hi: float, sigma_lo: float, rho: float) -> torch.Tensor:
    """``count`` sigmas from ``sigma_hi`` down to ``sigma_lo`` (both > 0, finite)."""
    if count == 1:
        return torch.tensor([math.sqrt(sigma_hi * sigma_lo)], dtype=F64)
    ramp = torch.linspace(0, 1, count, dtype=F64)
    if grid == "logsnr":
        return torch.exp(math.log(sigma_hi) + ramp * (math.log(sigma_lo) - math.log(sigma_hi)))
    hi, lo = sigma_hi ** (1 / rho), sigma_lo ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_grid(
    path: GaussianPath,
    grid: str,
    steps: int,
    t_start: float,
    t_end: float,
    sigma_min: float | None,
    sigma_max: float | None,
    rho: float,
) -> torch.Tensor:
    s_start, s_end = (float(s) for s in sigma_of_t(path, torch.tensor([t_start, t_end], dtype=F64)))
    if sigma_max is None:
        sigma_max = SIGMA_MAX if math.isinf(s_start) else s_start
    if sigma_min is None:
        sigma_min = (LOGSNR_SIGMA_MIN / steps if grid == "logsnr" else SIGMA_MIN) if s_end == 0 else s_end
    hi, lo = min(s_start, sigma_max), max(s_end, sigma_min)
    if not hi > lo:  # the whole interval lies outside [sigma_min, sigma_max]: plain log-SNR spacing of it
        hi, lo = s_start, s_end
    lead, tail = s_start > hi * (1 + 1e-12), s_end < lo * (1 - 1e-12)
    count = steps + 1 - int(lead) - int(tail)
    if count <= 0 or not (math.isfinite(hi) and lo > 0):
        times = torch.tensor([t_start, t_end], dtype=F64)
        return times if steps == 1 else torch.linspace(t_start, t_end, steps + 1, dtype=F64)
    inner = t_of_sigma(path, _sigma_points(grid, count, hi, lo, rho))
    parts = [torch.tensor([t_start], dtype=F64)] if lead else []
    parts += [inner]
    parts += [torch.tensor([t_end], dtype=F64)] if tail else []
    times = torch.cat(parts)
    times[0], times[-1] = t_start, t_end
    return times


def _linear_time_grid(path: GaussianPath, steps: int, t_start: float, t_end: float) -> torch.Tensor:
    """The ``"linear"`` grid: ``steps + 1`` times evenly spaced in ``tau = 1 / (1 + sigma_t)``."""
    ends = sigma_of_t(path, torch.tensor([t_start, t_end], dtype=F64))
    tau_start, tau_end = (1 / (1 + float(s)) for s in ends)  # sigma = inf: tau = 0
    tau = torch.linspace(tau_start, tau_end, steps + 1, dtype=F64)[1:-1]
    inner = t_of_sigma(path, ((1 - tau) / tau).clamp(float(ends[1]), float(ends[0])))
    times = torch.cat([torch.tensor([t_start], dtype=F64), inner, torch.tensor([t_end], dtype=F64)])
    if not bool((times[1:] > times[:-1]).all()):
        raise ValueError(
            f"the linear grid of {steps} steps on path {path!r} is not strictly increasing in t (the path's "
            "sigma is flat somewhere); use grid='uniform' or explicit times="
        )
    return times


def time_grid(
    path: GaussianPath | str,
    steps: int,
    grid: str = "uniform",
    *,
    t_start: float = 0.0,
    t_end: float = 1.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = RHO,
    shift: float = SHIFT,
) -> torch.Tensor:
    r"""``steps + 1`` float64 times from ``t_start`` to ``t_end`` (both exact), strictly monotone.

    ``t_start > t_end`` gives a decreasing grid (data -> noise, for :func:`flowscore.samplers.encode`): the
    increasing grid from ``t_end`` to ``t_start``, reversed.

    * ``"uniform"``: evenly spaced in t.
    * ``"karras"``: EDM's :math:`\sigma_i = (\sigma_{hi}^{1/\rho} + \tfrac{i}{n-1}(\sigma_{lo}^{1/\rho} -
      \sigma_{hi}^{1/\rho}))^\rho` (``rho``), mapped to t by :func:`t_of_sigma`; ``sigma_hi`` is the path's
      sigma at ``t_start`` capped at ``sigma_max``, ``sigma_lo`` the one at ``t_end`` floored at
      ``sigma_min``. By default (None) they only bound what is unbounded: ``sigma_max = 80`` where sigma is
      infinite at ``t_start`` (alpha = 0), ``sigma_min = 0.002`` where it is 0 at ``t_end`` (beta = 0).
      (EDM's values.)
      Where the path goes beyond them the grid adds that endpoint as one extra step (from ``t_start`` to
      ``t(sigma_max)``, from ``t(sigma_min)`` to ``t_end``), so it always has ``steps`` intervals.
    * ``"logsnr"``: the same with the sigmas evenly spaced in :math:`\log\sigma = -\lambda` (rho -> inf),
      and ``sigma_min = LOGSNR_SIGMA_MIN / steps`` by default where beta = 0 at ``t_end``.
    * ``"shift"``: SD3's shift of the noise level :math:`u = 1 - r` of an even ramp r in [0, 1],
      :math:`u' = \mathrm{shift}\,u / (1 + (\mathrm{shift} - 1) u)`, spread over ``[t_start, t_end]``
      (``shift > 1`` puts more steps at the noisy end).
    * ``"linear"``: evenly spaced in the linear path's time of the same log-SNR, :math:`\tau = \alpha_t /
      (\alpha_t + \beta_t) = 1 / (1 + \sigma_t)`, mapped to t by :func:`t_of_sigma`: the grid that
      ``"uniform"`` is on ``linear``, carried to any path (exactly ``"uniform"`` on ``linear`` with
      ``sigma_min = 0``). The SDE's default (:func:`flowscore.samplers.diffusion_schedule`, ``"linear"``).
    """
    path = get_path(path)
    steps = _validate.positive_int(steps, "steps")
    _validate.choice(grid, GRIDS, "grid")
    t_start = _validate.number(t_start, "t_start", 0.0, 1.0)
    t_end = _validate.number(t_end, "t_end", 0.0, 1.0)
    if t_start == t_end:
        raise ValueError(f"t_start and t_end must differ, both are {t_start}")
    if t_start > t_end:
        return time_grid(
            path,
            steps,
            grid,
            t_start=t_end,
            t_end=t_start,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            shift=shift,
        ).flip(0)
    if grid == "uniform" or (grid == "linear" and path == get_path("linear")):  # linear's own: even in t
        return torch.linspace(t_start, t_end, steps + 1, dtype=F64)
    if grid == "linear":
        return _linear_time_grid(path, steps, t_start, t_end)
    if grid == "shift":
        shift = _validate.number(shift, "shift", 0.0, low_open=True)
        u = 1 - torch.linspace(0, 1, steps + 1, dtype=F64)
        shifted = shift * u / (1 + (shift - 1) * u)
        times = t_start + (t_end - t_start) * (1 - shifted)
        times[0], times[-1] = t_start, t_end
        return times
    if sigma_min is not None:
        sigma_min = _validate.number(sigma_min, "sigma_min", 0.0, low_open=True)
    if sigma_max is not None:
        sigma_max = _validate.number(sigma_max, "sigma_max", 0.0, low_open=True)
    rho = _validate.number(rho, "rho", 0.0, low_open=True)
    if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min} and {sigma_max}")
    times = _sigma_grid(path, grid, steps, t_start, t_end, sigma_min, sigma_max, rho)
    if not bool((times[1:] > times[:-1]).all()):
        raise ValueError(
            f"the {grid} grid of {steps} steps on path {path!r} is not strictly increasing in t (the path's "
            "sigma is flat somewhere); use grid='uniform' or explicit times="
        )
    return times
