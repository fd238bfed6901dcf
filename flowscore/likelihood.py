r"""Exact log-likelihood of a model through the probability-flow ODE (continuous change of variables).

Along :math:`dx/dt = u_t(x)` the density obeys :math:`d \log p_t(x_t)/dt = -\nabla\cdot u_t(x_t)`, so

.. math:: \log p_1(x) = \log p_0(x_0) - \int_0^1 \nabla\cdot u_t(x_t)\,dt,

where :math:`x_t` is the ODE solution through :math:`x_1 = x`. :func:`log_likelihood` integrates the state
:math:`(x_t, \ell_t)` with :math:`d\ell/dt = -\nabla\cdot u_t` from data (:math:`\ell = 0` at t = 1) back to
noise, then returns ``path.prior_log_prob(x_0) - l_0``. The divergence is exact (one autograd pass per
dimension) or Hutchinson's estimate :math:`E_z[z^\top (\partial u/\partial x) z]` with Rademacher probes ``z``
drawn once per call and held fixed along the trajectory (FFJORD), which keeps the ODE smooth for dopri5 and
the estimate of the integral unbiased.
"""

from __future__ import annotations

import math

import torch

from . import _validate
from ._validate import validation
from .grids import GRIDS, time_grid
from .paths import GaussianPath, get_path
from .samplers import Field, _sampler_or_method, as_field, conversions_finite_at, integrate

EXACT_DIVERGENCE_MAX_DIM = 8


def _divergence(
    velocity: Field, x: torch.Tensor, t: torch.Tensor, probes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, div u)`` at ``(x, t)``: ``u`` ``(B, *dims)``, ``div u`` ``(B,)``, both detached.

    ``probes`` ``(P, B, *dims)``: Hutchinson's mean of ``z^T J z`` over the P probes; ``None``: the exact
    trace of the Jacobian, one vector-Jacobian product per dimension. Each sample's velocity must depend
    only on its own row of ``x`` (true of any per-sample model).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = velocity(x, t)
        if probes is not None:
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for z in probes:
                (vjp,) = torch.autograd.grad(u, x, z, retain_graph=True)
                div = div + (vjp * z).flatten(1).sum(1)
            div = div / probes.shape[0]
        else:
            flat_u = u.flatten(1)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(flat_u.shape[1]):
                (grad,) = torch.autograd.grad(flat_u[:, i].sum(), x, retain_graph=True)
                div = div + grad.flatten(1)[:, i]
    return u.detach(), div.detach()


def _check_options(
    steps: int, sampler: str, grid: str, hutchinson: bool | None, n_probes: int, t_eps: float
) -> None:
    _validate.choice(grid, GRIDS, "grid")
    for name, value in (("steps", steps), ("n_probes", n_probes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _validate.choice(sampler, ("euler", "midpoint", "heun", "rk4", "dopri5"), "sampler")
    if hutchinson is not None and not isinstance(hutchinson, bool):
        raise ValueError(f"hutchinson must be None (auto), True or False, got {hutchinson!r}")
    if not 0 < t_eps < 0.5:
        raise ValueError(f"t_eps must lie in (0, 0.5), got {t_eps!r}")


def log_likelihood(
    model: Field,
    path: GaussianPath | str,
    x: torch.Tensor,
    *,
    prediction: str = "velocity",
    steps: int = 100,
    sampler: str | None = None,
    grid: str = "uniform",
    hutchinson: bool | None = None,
    n_probes: int = 1,
    t_eps: float = 1e-3,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
    method: str | None = None,
) -> torch.Tensor:
    r"""``(B,)`` log-density of the model's probability-flow ODE at the data points ``x`` (nats).

    :math:`\log p(x) = \log p_{prior}(x_{t_0}) - \int_{t_0}^{t_1} \nabla\cdot u_t(x_t)\,dt`, the ODE run from
    :math:`x_{t_1} = x` back to :math:`t_0`, with ``u = as_field(model, path, prediction, "velocity")``.

    Args:
        model: ``model(x, t)`` predicting ``prediction`` (velocity, score, noise or data), differentiable
            in ``x``.
        path: the Gaussian path (instance or name); its prior ``N(0, prior_std^2 I)`` gives ``log p_prior``.
        x: ``(B, *dims)`` data points.
        steps: intervals of the fixed grid (fixed-step integrators); for ``"dopri5"`` (adaptive, ``rtol``,
            ``atol``) it is ignored.
        sampler: the ODE integrator: ``"rk4"`` (None: the default), ``"dopri5"``, or ``"euler"``,
            ``"midpoint"``, ``"heun"``. ``method=`` is its older spelling (DeprecationWarning).
        grid: the fixed grid's spacing (:func:`flowscore.grids.time_grid`): ``"uniform"`` (the default),
            evenly spaced in t, suits data whose finest scale is not far below the noise prior's;
            ``"karras"`` puts its steps where the noise level is small, down to sigma 0.002, which sharp
            data need (dequantised 8-bit images, a narrow mode): near the data end their field changes
            fastest, and an even grid leaves the integral of the divergence unconverged there at a hundred
            steps (``bench/results/likelihood_grid.md``); with broad data at few steps it is the worse one.
        hutchinson: ``None`` (auto): exact divergence when D = prod(dims) <= 8, Hutchinson above; ``True`` /
            ``False`` forces it. ``n_probes`` Rademacher probes per evaluation (from ``generator``).
        t_eps: the ends of the time interval: :math:`t_1 = 1` if the velocity is finite there, else
            ``1 - t_eps`` (a data model on a path with beta_1 = 0: the result is then the density of
            :math:`p_{1 - t_{eps}}`); :math:`t_0 = 0` if finite there, else ``t_eps`` (a score or noise model
            where alpha_0 = 0: the prior stands in for :math:`p_{t_{eps}}`). Both are biases of order t_eps.

    Runs without building a graph for the model's parameters (the result is detached).
    """
    path = get_path(path)
    if isinstance(getattr(model, "x_source", None), torch.Tensor):
        raise ValueError(
            "log_likelihood: this model was trained from a data source, whose density is not known in closed "
            "form (the change of variables needs the source's log-density; docs/theory.md section 17)"
        )
    x = _validate.batch(x, "x")
    _validate.finite(x, "x")
    sampler = _sampler_or_method(sampler, method, "rk4", "log_likelihood")
    _check_options(steps, sampler, grid, hutchinson, n_probes, t_eps)
    velocity = as_field(model, path, prediction, "velocity")
    t_hi = 1.0 if conversions_finite_at(path, prediction, ("velocity",), 1.0) else 1 - t_eps
    t_lo = 0.0 if conversions_finite_at(path, prediction, ("velocity",), 0.0) else t_eps
    if sampler == "dopri5":
        times = torch.tensor([t_hi, t_lo], dtype=torch.float64)
    else:
        times = time_grid(path, steps, grid, t_start=t_hi, t_end=t_lo)  # from the data end down
    times = times.to(dtype=x.dtype, device=x.device)
    dim = x[0].numel()
    use_hutchinson = dim > EXACT_DIVERGENCE_MAX_DIM if hutchinson is None else hutchinson
    probes = None
    if use_hutchinson:
        bits = torch.randint(0, 2, (n_probes, *x.shape), generator=generator, device="cpu")
        probes = (2 * bits - 1).to(dtype=x.dtype, device=x.device)

    def augmented(state: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u, div = _divergence(velocity, state[:, :dim].reshape(x.shape), t, probes)
        return torch.cat([u.flatten(1), -div[:, None]], 1)

    state = torch.cat([x.flatten(1), x.new_zeros(x.shape[0], 1)], 1)
    with torch.no_grad(), validation(False):
        state = integrate(augmented, state, times, sampler, rtol=rtol, atol=atol)
    x_prior = state[:, :dim].reshape(x.shape)
    return path.prior_log_prob(x_prior) - state[:, dim]


def bits_per_dim(
    log_likelihood: torch.Tensor,
    num_dims: int,
    *,
    num_levels: int = 256,
    data_range: float = 2.0,
    bin_width: float | None = None,
) -> torch.Tensor:
    r"""Bits per dimension of discrete data from the continuous log-likelihood of its dequantised version.

    Uniform dequantisation: each discrete value owns a bin of width :math:`w` (in the units in which
    ``log_likelihood`` is a density) and is spread uniformly over it, :math:`x = k + w u`. For the discrete
    model :math:`P(k) = \int_{bin} p`, Jensen's inequality gives
    :math:`\log P(k) \ge E_u \log p(x) + D \log w`, so

    .. math:: \mathrm{bpd} = -\big(\log p(x)/D + \log w\big) / \log 2

    averaged over dequantised points is an upper bound on the discrete model's bits, and its expectation is
    >= 0 (since P(k) <= 1). ``bin_width`` gives :math:`w`; by default ``w = data_range / num_levels``:
    integer data in ``{0, ..., num_levels - 1}`` mapped affinely onto an interval of length ``data_range``
    (``[-1, 1]`` for 8-bit images: 256 levels, range 2). A uniform density on the interval gives
    ``log2(num_levels)`` (8 for 256 levels). ``log_likelihood``: ``(B,)`` nats; returns ``(B,)``.
    """
    ll = _validate.tensor(log_likelihood, "log_likelihood")
    _validate.positive_int(num_dims, "num_dims")
    if bin_width is None:
        _validate.integer(num_levels, "num_levels", minimum=2)
        bin_width = _validate.number(data_range, "data_range", 0, low_open=True) / num_levels
    _validate.number(bin_width, "bin_width", 0, low_open=True)
    return -(ll / num_dims + math.log(bin_width)) / math.log(2)
