"""Time grids and the sigma <-> t map, against the reference schedules of ``conftest`` (written there, not
taken from flowscore.paths) and formulas written here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PATH_NAMES, make_path, reference_schedule

from flowscore import get_path
from flowscore.grids import GRIDS, LOGSNR_SIGMA_MIN, sigma_of_t, t_of_sigma, time_grid

F64 = torch.float64


def reference_sigma(name: str, t: torch.Tensor) -> torch.Tensor:
    alpha, beta = reference_schedule(name, t)[:2]
    return beta / alpha


@pytest.mark.parametrize("name", PATH_NAMES)
def test_sigma_to_t_round_trips_on_every_path(name):
    path = make_path(name)
    t = torch.linspace(0.02, 0.98, 49, dtype=F64)
    sigma = reference_sigma(name, t)
    back = t_of_sigma(path, sigma)
    assert (back - t).abs().max() < 1e-9, (back - t).abs().max()
    assert torch.allclose(sigma_of_t(path, t), sigma, rtol=1e-12)


@pytest.mark.parametrize("name", ["linear", "vp"])
def test_sigma_endpoints(name):
    path = make_path(name)
    assert float(sigma_of_t(path, 0.0)) == math.inf and float(sigma_of_t(path, 1.0)) == 0.0
    assert float(t_of_sigma(path, math.inf)) == 0.0 and float(t_of_sigma(path, 0.0)) == 1.0
    # closed forms written here: linear t = 1 / (1 + sigma); vp t = (2 / pi) atan(1 / sigma)
    sigma = torch.tensor([0.01, 1.0, 80.0], dtype=F64)
    expected = 1 / (1 + sigma) if name == "linear" else (2 / math.pi) * torch.atan(1 / sigma)
    assert torch.allclose(t_of_sigma(path, sigma), expected, rtol=1e-13)


def test_sigma_outside_the_path_range_is_refused():
    with pytest.raises(ValueError, match="range"):
        t_of_sigma("ve", 100.0)  # ve's sigma_max is 80
    with pytest.raises(ValueError, match="sigma"):
        t_of_sigma("linear", -1.0)


def test_non_monotone_custom_path_is_refused():
    bumpy = get_path("custom", alpha=lambda t: t, beta=lambda t: (1 - t) * (1 + 0.9 * torch.sin(20 * t)))
    with pytest.raises(ValueError, match="not non-increasing"):
        t_of_sigma(bumpy, 1.0)


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("steps", [1, 2, 7, 30])
def test_grids_are_monotone_and_hit_their_endpoints(name, grid, steps):
    path = make_path(name)
    for t_start, t_end in ((0.0, 1.0), (0.1, 0.9), (1.0, 0.0)):
        times = time_grid(path, steps, grid, t_start=t_start, t_end=t_end)
        assert times.dtype == F64 and times.shape == (steps + 1,)
        assert float(times[0]) == t_start and float(times[-1]) == t_end
        diffs = times[1:] - times[:-1]
        assert bool((diffs > 0).all()) if t_end > t_start else bool((diffs < 0).all())


@pytest.mark.parametrize("name", ["linear", "vp", "vp-linear", "ve"])
def test_karras_and_logsnr_spacing(name):
    path = make_path(name)
    steps, sigma_min, sigma_max, rho = 12, 0.002, 80.0, 7.0
    sigma_start = float(reference_sigma(name, torch.zeros(1, dtype=F64)))
    lead = math.isinf(sigma_start)  # linear, vp: one step from t = 0 to sigma_max (vp-linear starts at ~152)
    tail = name != "ve"  # sigma(1) = 0 < sigma_min except on ve (sigma(1) = sigma_min)
    count = steps + 1 - lead - tail
    hi, lo = (sigma_max if lead else sigma_start), sigma_min  # sigma_max caps only an infinite sigma
    ramp = torch.linspace(0, 1, count, dtype=F64)
    karras = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    times = time_grid(path, steps, "karras")
    inner = times[int(lead) : len(times) - int(tail)]
    assert torch.allclose(reference_sigma(name, inner), karras, rtol=1e-8)
    times = time_grid(path, steps, "logsnr")
    lo = LOGSNR_SIGMA_MIN / steps if tail else sigma_min  # logsnr's default end where beta = 0
    inner = times[int(lead) : len(times) - int(tail)]
    log_sigma = torch.log(reference_sigma(name, inner))
    assert torch.allclose(log_sigma, torch.linspace(math.log(hi), math.log(lo), count, dtype=F64), atol=1e-8)


def test_shift_grid_formula():
    shift = 3.0
    times = time_grid("linear", 10, "shift", shift=shift)
    u = 1 - torch.linspace(0, 1, 11, dtype=F64)  # noise level, 1 at t = 0
    assert torch.allclose(times, 1 - shift * u / (1 + (shift - 1) * u), atol=1e-15)
    assert torch.allclose(time_grid("linear", 10, "shift", shift=1.0), torch.linspace(0, 1, 11, dtype=F64))


@pytest.mark.parametrize("name", ["vp", "vp-linear", "ve"])
def test_linear_grid_is_uniform_in_linears_time(name):
    """``"linear"``: tau = alpha / (alpha + beta), from the reference schedule written in conftest, is evenly
    spaced over the grid; on ``linear`` (sigma_min = 0) the grid is the uniform one exactly."""
    times = time_grid(name, 12, "linear")
    alpha, beta = reference_schedule(name, times)[:2]
    tau = alpha / (alpha + beta)
    assert torch.allclose(tau[1:] - tau[:-1], (tau[-1] - tau[0]) / 12 * torch.ones(12, dtype=F64), atol=1e-9)
    assert float(times[0]) == 0.0 and float(times[-1]) == 1.0
    backwards = time_grid(name, 12, "linear", t_start=1.0, t_end=0.0)
    assert torch.equal(backwards, times.flip(0))
    assert torch.equal(time_grid("linear", 12, "linear"), time_grid("linear", 12, "uniform"))


def test_bad_grid_arguments():
    with pytest.raises(ValueError, match="grid"):
        time_grid("linear", 10, "cosine")
    with pytest.raises(ValueError, match="steps"):
        time_grid("linear", 0)
    with pytest.raises(ValueError, match="differ"):
        time_grid("linear", 5, t_start=0.5, t_end=0.5)
    with pytest.raises(ValueError, match="sigma_min"):
        time_grid("linear", 5, "karras", sigma_min=10.0, sigma_max=1.0)
