r"""Few-step solvers in log-SNR for any Gaussian path and any prediction (k-diffusion style plain functions).

Every function here takes ``(model, x, times)`` with the ``path`` and the model's ``prediction`` (velocity,
score, noise or data) as keywords, runs one step per interval of the float64 grid ``times`` and returns the
state at ``times[-1]``. The model is called as ``model(x, t)`` with ``t`` shaped ``(B,)``; its output is
converted to the data prediction ``D`` (and the noise prediction ``E``) by the affine maps of
:mod:`flowscore.conversions`, whose coefficients are computed once per grid point in float64.

The exponential integrators solve the probability-flow ODE exactly in its linear part. With half the log-SNR
:math:`\lambda = \log(\alpha/\beta)` it reads :math:`d(x/\beta)/d e^{\lambda} = D(x, t)`, so over a step
:math:`h = \lambda_{i+1} - \lambda_i`

.. math:: x_{i+1} = \frac{\beta_{i+1}}{\beta_i} x_i + \alpha_{i+1} \int_0^h e^{-(h - u)}
          D(\lambda_i + u)\,du,

and the solvers differ in the polynomial (in lambda) that stands in for ``D``: constant (``ddim``, order 1),
through the last two or three model outputs (``dpm++2m``, ``dpm++3m``, DPM-Solver++ multistep, orders 2 and
3), or UniPC's predictor-corrector (``unipc``: UniP-p plus the UniC corrector, order p + 1, no extra model
call). Multistep solvers warm up with lower orders (the first step is order 1, the second order <= 2), so
their global order holds once those first local errors are small, as at the noise end where D varies slowly:
``dpm++3m`` is of order 3 from high noise only; started on an interior interval (where D varies from the
first step) its warm-up can cap it at order 2. UniPC's corrector lifts its warm-up: order p + 1 anywhere.

Endpoints. ``x / beta`` is infinite where beta = 0, so the last step to the data end (t = 1 on ``linear``,
``vp``, ``vp-linear``; lambda = +inf) is the first-order step :math:`x = \alpha_1 D`, as in k-diffusion and
diffusers; a step from the noise end where alpha = 0 (lambda = -inf) is the first-order
:math:`x_1 = (\beta_1/\beta_0) x_0 + \alpha_1 D` (its multistep history starts after it). Every coefficient
is a finite float64 there: no NaN or Inf. Integrating towards the noise end (decreasing times, data -> noise)
uses the mirror image: the roles of (alpha, D) and (beta, E) swap and lambda changes sign, so the same code
steps on the noise prediction with :math:`x/\alpha`.

``edm_heun`` is EDM's Heun method in sigma = beta/alpha (trapezoid on the slope E of x/alpha) with a final
Euler step; ``dpmpp_2m_sde`` is k-diffusion's stochastic DPM-Solver++(2M) (eta = 1, midpoint form).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .conversions import KINDS, conversion_coefficients
from .grids import check_times
from .paths import GaussianPath
from .sampler_registry import edm_heun_corrects

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None] | None


def _log(v: float) -> float:
    return -math.inf if v <= 0 else math.log(v)


class LastCall:
    """A model whose second call on the very same ``x`` object (and the same ``key``: the ``t`` object, or a
    grid index) reuses the first output: one model call serves several fields at one point (the velocity
    and the score of :func:`flowscore.samplers.sample_sde`, the data and noise predictions here). ``calls``
    counts the model's calls."""

    def __init__(self, model: Model):
        self.model, self.calls = model, 0
        self._x: torch.Tensor | None = None
        self._key: object = None
        self._out: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, key: object = None) -> torch.Tensor:
        key = t if key is None else key
        same_key = self._key is key or (
            isinstance(key, int) and isinstance(self._key, int) and self._key == key
        )
        if self._out is None or self._x is not x or not same_key:
            self._x, self._key, self._out = x, key, self.model(x, t)
            self.calls += 1
        return self._out


class GridModel:
    """A model on a fixed float64 time grid: its output converted to any kind with precomputed coefficients.

    ``model(x, t) -> (B, *dims)`` predicts ``prediction``; ``times`` is the 1D grid. ``predict(x, i,
    kind)`` is the ``kind`` prediction at ``(x, times[i])``; a second request at the same ``x`` object and
    index reuses the model's output (one model call serves D and E). ``nfe`` counts the model calls. A
    conversion that is singular at a grid time (e.g. the data prediction of a noise model where alpha = 0)
    raises ``ValueError`` when it is asked for, before the model is called.
    """

    def __init__(self, model: Model, path: GaussianPath, prediction: str, times: torch.Tensor):
        if prediction not in KINDS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {KINDS}")
        self.model, self.path, self.prediction = model, path, prediction
        times = times.detach().to(device="cpu", dtype=torch.float64)
        self.times = times.tolist()
        schedule = path.schedule(times)
        self.alpha, self.beta = schedule.alpha.tolist(), schedule.beta.tolist()
        with torch.no_grad():
            self._coef = {
                kind: tuple(c.tolist() for c in conversion_coefficients(schedule, prediction, kind))
                for kind in KINDS
            }
        self._cache = LastCall(model)

    def __len__(self) -> int:
        return len(self.times)

    def output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The model's raw output at ``(x, times[i])`` (cached for the same ``x`` object and ``i``)."""
        t = torch.full((x.shape[0],), self.times[i], dtype=x.dtype, device=x.device)
        return self._cache(x, t, key=i)

    @property
    def nfe(self) -> int:
        """The model calls so far."""
        return self._cache.calls

    def finite(self, i: int, kind: str) -> bool:
        c_value, c_x = self._coef[kind][0][i], self._coef[kind][1][i]
        return math.isfinite(c_value) and math.isfinite(c_x)

    def predict(self, x: torch.Tensor, i: int, kind: str) -> torch.Tensor:
        """The ``kind`` prediction at ``(x, times[i])``: ``c_value * output + c_x * x``."""
        if not self.finite(i, kind):
            raise ValueError(
                f"the {kind} prediction of a {self.prediction} model is singular at t = {self.times[i]:g} on "
                f"path {self.path!r} (alpha = {self.alpha[i]:g}, beta = {self.beta[i]:g}); start or end the "
                "grid inside (0, 1) (t_start=, times=) or use another sampler"
            )
        out = self.output(x, i)
        if kind == self.prediction:
            return out
        c_value, c_x = self._coef[kind][0][i], self._coef[kind][1][i]
        return c_value * out if c_x == 0 else c_value * out + c_x * x


def _frame(gm: GridModel) -> tuple[str, list[float], list[float], list[float]]:
    """``(kind, a, s, lam)`` of the exponential integrators in the direction of the grid.

    Towards data (increasing t): the data prediction, ``a = alpha``, ``s = beta``, ``lam = log(alpha/beta)``;
    towards noise: the noise prediction, ``a = beta``, ``s = alpha``, ``lam = log(beta/alpha)``. Either way
    ``x_{i+1} = (s_{i+1}/s_i) x_i + a_{i+1} * (integral of the prediction against e^{-(h - u)})``, lam
    increasing.
    """
    if gm.times[-1] > gm.times[0]:
        kind, a, s = "data", gm.alpha, gm.beta
    else:
        kind, a, s = "noise", gm.beta, gm.alpha
    lam = [_log(ai) - _log(si) if si > 0 else math.inf for ai, si in zip(a, s, strict=True)]
    if s[0] <= 0:
        raise ValueError(
            f"cannot start the exponential integrator at t = {gm.times[0]:g}, where "
            f"{'beta' if kind == 'data' else 'alpha'} = 0; start inside (0, 1)"
        )
    return kind, a, s, lam


def _emit(callback: Callback, i: int, gm: GridModel, x: torch.Tensor, denoised: torch.Tensor | None) -> None:
    if callback is not None:
        callback(
            {
                "i": i,
                "t": gm.times[i],
                "t_next": gm.times[i + 1],
                "x": x,
                "denoised": denoised,
                "nfe": gm.nfe,
            }
        )


def _grid_model(model: Model, path: GaussianPath, prediction: str, times: torch.Tensor) -> GridModel:
    return model if isinstance(model, GridModel) else GridModel(model, path, prediction, check_times(times))


# -- DPM-Solver++ multistep (ddim = order 1) -----------------------------------------------------------------
def _multistep(gm: GridModel, x: torch.Tensor, order: int, callback: Callback) -> torch.Tensor:
    """DPM-Solver++ multistep of ``order`` 1, 2 (the 2M update of the paper) or 3 (exact phi integrals of
    the polynomial through the last outputs, also in its second-order warm-up step)."""
    kind, a, s, lam = _frame(gm)
    history: list[tuple[torch.Tensor, float]] = []  # (prediction, its lam): points with a finite lam only
    for i in range(len(gm) - 1):
        pred = gm.predict(x, i, kind)
        h = lam[i + 1] - lam[i]
        ratio = s[i + 1] / s[i]
        usable = history if math.isfinite(lam[i]) else []
        o = min(order, len(usable) + 1) if math.isfinite(h) else 1
        phi1 = -math.expm1(-h)
        if o == 1:
            x_next = ratio * x + (a[i + 1] * phi1) * pred
        elif o == 2 and order == 2:  # the DPM-Solver++(2M) update of the paper and k-diffusion
            r = (lam[i] - usable[-1][1]) / h
            c = 1 / (2 * r)
            x_next = ratio * x + (a[i + 1] * phi1) * ((1 + c) * pred - c * usable[-1][0])
        elif o == 2:  # warm-up of 3M: D linear in lambda, integrated exactly (phi_2)
            r = (lam[i] - usable[-1][1]) / h
            phi2 = math.expm1(-h) / h + 1
            x_next = ratio * x + a[i + 1] * (phi1 * pred + (phi2 / r) * (pred - usable[-1][0]))
        else:  # third order: D as the quadratic through the last three outputs, exact phi integrals.
            # d1 ~ h D'(0), d2 ~ h^2 D''/2; int_0^h e^{-(h-u)} u^2/2 du = -h^2 phi3, so the D'' term is
            # -2 phi3 d2. (k-diffusion's dpmpp_3m_sde and the DPM-Solver reference code use -phi3 d2, half
            # of it, which leaves an O(h^3) local error: second order. tests/test_solvers.py shows both.)
            (p2, l2), (p1, l1) = usable[-2], usable[-1]
            r0, r1 = (lam[i] - l1) / h, (l1 - l2) / h
            d1_0, d1_1 = (pred - p1) / r0, (p1 - p2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = math.expm1(-h) / h + 1
            phi3 = phi2 / h - 0.5
            x_next = ratio * x + a[i + 1] * (phi1 * pred + phi2 * d1 - 2 * phi3 * d2)
        if math.isfinite(lam[i]):
            history = (history + [(pred, lam[i])])[-2:]
        x = x_next
        _emit(callback, i, gm, x, pred)
    return x


def sample_ddim(
    model: Model,
    x: torch.Tensor,
    times: torch.Tensor,
    *,
    path: GaussianPath,
    prediction: str = "velocity",
    callback: Callback = None,
) -> torch.Tensor:
    r"""DDIM, the first-order exponential integrator: :math:`x_{i+1} = \alpha_{i+1} D_i + \beta_{i+1} E_i`.

    (The same as k-diffusion's Euler step in sigma.) ``x``: ``(B, *dims)`` at ``times[0]``; ``times``: 1D,
    strictly monotone, in [0, 1] (decreasing integrates towards noise). One model call per step.
    """
    return _multistep(_grid_model(model, path, prediction, times), x, 1, callback)


def sample_dpmpp_2m(
    model: Model,
    x: torch.Tensor,
    times: torch.Tensor,
    *,
    path: GaussianPath,
    prediction: str = "velocity",
    callback: Callback = None,
) -> torch.Tensor:
    r"""DPM-Solver++(2M): :math:`x_{i+1} = \tfrac{\beta_{i+1}}{\beta_i} x_i - \alpha_{i+1}(e^{-h_i} - 1)
    \big((1 + \tfrac1{2r_i}) D_i - \tfrac1{2r_i} D_{i-1}\big)`, :math:`r_i = h_{i-1}/h_i`; order 2, one model
    call per step, first and last (to beta = 0) steps of order 1. Arguments as :func:`sample_ddim`."""
    return _multistep(_grid_model(model, path, prediction, times), x, 2, callback)


def sample_dpmpp_3m(
    model: Model,
    x: torch.Tensor,
    times: torch.Tensor,
    *,
    path: GaussianPath,
    prediction: str = "velocity",
    callback: Callback = None,
) -> torch.Tensor:
    r"""DPM-Solver++(3M): the data prediction as the quadratic in lambda through the last three outputs,
    integrated exactly against :math:`e^{-(h-u)}` (:math:`\varphi_2, \varphi_3`; k-diffusion's
    ``dpmpp_3m_sde`` with eta = 0). One model call per step, warm-up of orders 1 and 2. Order 3 only when it
    starts at high noise (the data prediction nearly constant over the warm-up steps, as from t = 0 or
    ``sigma_max``); from an interior time (``t_start``, ``times=``) the warm-up's local errors can make it
    order 2: use ``unipc`` there. Arguments as :func:`sample_ddim`."""
    return _multistep(_grid_model(model, path, prediction, times), x, 3, callback)


# -- UniPC ---------------------------------------------------------------------------------------------------
def _unipc_coefficients(rks: list[float], h: float, order: int, corrector: bool) -> tuple[float, list[float]]:
    """``(B_h, rhos)`` of UniP-p (``corrector=False``) or UniC-p, B(h) = e^h - 1 form ("bh2").

    ``rks``: ``(lam_k - lam_i) / h`` of the older outputs (negative), oldest last. Solves the order
    conditions ``sum_k rho_k r_k^(j-1) = j! phi_{j+1}(h) h / B(h)``, j = 1..p, in float64.
    """
    hh = -h
    h_phi_k = math.expm1(hh) / hh - 1
    b_h = math.expm1(hh)
    b, factorial = [], 1
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    nodes = rks + [1.0]
    if corrector:
        if order == 1:
            return b_h, [0.5]
        matrix = torch.tensor(
            [[r ** (j - 1) for r in nodes] for j in range(1, order + 1)], dtype=torch.float64
        )
        return b_h, torch.linalg.solve(matrix, torch.tensor(b, dtype=torch.float64)).tolist()
    if order == 1:
        return b_h, []
    if order == 2:
        return b_h, [0.5]
    matrix = torch.tensor([[r ** (j - 1) for r in rks] for j in range(1, order)], dtype=torch.float64)
    return b_h, torch.linalg.solve(matrix, torch.tensor(b[:-1], dtype=torch.float64)).tolist()


def sample_unipc(
    model: Model,
    x: torch.Tensor,
    times: torch.Tensor,
    *,
    path: GaussianPath,
    prediction: str = "velocity",
    order: int = 2,
    callback: Callback = None,
) -> torch.Tensor:
    r"""UniPC (Zhao et al. 2023; diffusers' ``UniPCMultistepScheduler``, ``bh2``, data prediction).

    Each step runs the predictor UniP-p on the last p outputs; the model's output at the predicted point
    then corrects that point (UniC-p) before the next step, so the order of accuracy is p + 1 with one model
    call per step. ``order`` p in {1, 2, 3} (default 2: order 3). The warm-up steps use lower orders (p <=
    number of outputs so far); the later steps keep order p up to the end, since there is no corrector
    after the last step and a lower-order last predictor would cap the global order at 2. A last step to
    beta = 0 (lambda = +inf) is the first-order :math:`x = \alpha D` (as diffusers' ``lower_order_final``,
    with which this agrees on such grids). Arguments as :func:`sample_ddim`.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    gm = _grid_model(model, path, prediction, times)
    kind, a, s, lam = _frame(gm)
    history: list[tuple[torch.Tensor, float]] = []
    last: tuple[torch.Tensor, int, int] | None = None  # (x before the predictor, its index, order used)
    n = len(gm) - 1
    for i in range(n):
        pred = gm.predict(x, i, kind)
        if last is not None:  # UniC: correct x_i with the output at the predicted x_i (no new model call)
            x_prev, j, o = last
            h = lam[i] - lam[j]
            m0 = history[-1][0]
            older = history[:-1][::-1][: o - 1]
            rks = [(lk - lam[j]) / h for _, lk in older]
            b_h, rhos = _unipc_coefficients(rks, h, o, corrector=True)
            res = rhos[-1] * (pred - m0)
            for rho, (mk, _), rk in zip(rhos[:-1], older, rks, strict=True):
                res = res + (rho / rk) * (mk - m0)
            x = (s[i] / s[j]) * x_prev - (a[i] * math.expm1(-h)) * m0 - (a[i] * b_h) * res
        if not math.isfinite(lam[i]):
            history = []
        else:
            history = (history + [(pred, lam[i])])[-order:]
        h = lam[i + 1] - lam[i]
        o = min(order, len(history)) if math.isfinite(h) and history else 1
        phi1 = -math.expm1(-h)
        x_next = (s[i + 1] / s[i]) * x + (a[i + 1] * phi1) * pred
        if o > 1:
            older = history[:-1][::-1][: o - 1]
            rks = [(lk - lam[i]) / h for _, lk in older]
            b_h, rhos = _unipc_coefficients(rks, h, o, corrector=False)
            res = sum((rho / rk) * (mk - pred) for rho, (mk, _), rk in zip(rhos, older, rks, strict=True))
            x_next = x_next - (a[i + 1] * b_h) * res
        last = (x, i, o) if math.isfinite(h) else None
        x = x_next
        _emit(callback, i, gm, x, pred)
    return x


# -- EDM's Heun ----------------------------------------------------------------------------------------------
def sample_edm_heun(
    model: Model,
    x: torch.Tensor,
    times: torch.Tensor,
    *,
    path: GaussianPath,
    prediction: str = "velocity",
    callback: Callback = None,
) -> torch.Tensor:
    r"""EDM's Heun sampler (Karras et al. 2022, Algorithm 1 without churn), in any path's time.

    On :math:`y = x/\alpha` the ODE is :math:`dy/d\sigma = E` (sigma = beta/alpha). Euler predictor
    :math:`x' = \alpha_{i+1} D_i + \beta_{i+1} E_i` (= DDIM), then the trapezoid in sigma,
    :math:`x_{i+1} = \alpha_{i+1} D_i + \beta_{i+1}\tfrac{E_i + E'}{2} + \tfrac{\alpha_{i+1}\beta_i}{\alpha_i}
    \tfrac{E_i - E'}{2}`. The corrector is skipped (an Euler step, as EDM's last step) when the step ends
    where alpha or beta is 0 or starts where alpha = 0. Two model calls per step, one on those steps. Use it
    on a ``"karras"`` grid. Arguments as :func:`sample_ddim`.
    """
    gm = _grid_model(model, path, prediction, times)
    for i in range(len(gm) - 1):
        data, noise = gm.predict(x, i, "data"), gm.predict(x, i, "noise")
        a_next, b_next = gm.alpha[i + 1], gm.beta[i + 1]
        x_next = a_next * data + b_next * noise
        if edm_heun_corrects(gm.alpha[i], a_next, b_next):
            noise2 = gm.predict(x_next, i + 1, "noise")
            c = a_next * gm.beta[i] / gm.alpha[i]
            x_next = a_next * data + (0.5 * b_next) * (noise + noise2) + (0.5 * c) * (noise - noise2)
        x = x_next
        _emit(callback, i, gm, x, data)
    return x


# -- stochastic ----------------------------------------------------------------------------------------------
def sample_dpmpp_2m_sde(
    model: Model,
    x: torch.Tensor,
    times: torch.Tensor,
    *,
    path: GaussianPath,
    prediction: str = "velocity",
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback = None,
) -> torch.Tensor:
    r"""Stochastic DPM-Solver++(2M) (k-diffusion's ``dpmpp_2m_sde``, midpoint form), towards data only.

    :math:`x_{i+1} = \tfrac{\beta_{i+1}}{\beta_i} e^{-\eta h} x_i + \alpha_{i+1}(1 - e^{-(1+\eta)h})
    \big(D_i + \tfrac{1}{2r}(D_i - D_{i-1})\big) + \beta_{i+1}\sqrt{1 - e^{-2\eta h}}\,z`, z ~ N(0, I) from
    ``generator``; ``eta = 0`` is the deterministic 2M (midpoint form). The step to beta = 0 is the data
    prediction. One model call per step. Arguments as :func:`sample_ddim`.
    """
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    gm = _grid_model(model, path, prediction, times)
    if gm.times[-1] < gm.times[0]:
        raise ValueError("dpm++2m-sde integrates towards data only (increasing times)")
    _, a, s, lam = _frame(gm)
    previous: tuple[torch.Tensor, float] | None = None  # (D, h) of the previous step, finite lam only
    for i in range(len(gm) - 1):
        data = gm.predict(x, i, "data")
        h = lam[i + 1] - lam[i]
        if not math.isfinite(h):  # from alpha = 0 or to beta = 0: e^{-eta h} = 0 unless eta = 0
            x_next = (s[i + 1] / s[i] * (1.0 if eta == 0 else 0.0)) * x + a[i + 1] * data
            if eta > 0 and s[i + 1] > 0:  # from alpha = 0 the whole noise is fresh
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x_next = x_next + s[i + 1] * z
            previous = None
        else:
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x_next = (s[i + 1] / s[i] * math.exp(-eta_h)) * x + (a[i + 1] * phi) * data
            if previous is not None:
                r = previous[1] / h
                x_next = x_next + (a[i + 1] * 0.5 * phi / r) * (data - previous[0])
            if eta > 0:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x_next = x_next + (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))) * z
            previous = (data, h) if math.isfinite(lam[i]) else None
        x = x_next
        _emit(callback, i, gm, x, data)
    return x


EXPONENTIAL = {
    "ddim": sample_ddim,
    "dpm++2m": sample_dpmpp_2m,
    "dpm++3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
    "edm-heun": sample_edm_heun,
}
"""The deterministic few-step solvers of this module by name (all take ``(model, x, times, *, path,
prediction, callback)``)."""
