"""Importance weights of the time samplers (``losses.time_density_ratio``) against closed forms."""

from __future__ import annotations

import pytest
import torch

from flowscore.losses import logit_normal, sample_time, time_density_ratio

F64 = torch.float64


@pytest.mark.parametrize("sampler", ["logit-normal", "callable"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_density_ratio_reweights_to_uniform_times(sampler, dtype):
    """Mean of the ratio over the sampler's own draws is 1, and the reweighted mean of t^2 is the uniform
    one on [t_eps, 1 - t_eps] in closed form, within 5 standard errors. A callable ``logit_normal(m, s)``
    is clamped (not rescaled) by ``sample_time``: its clamped draws got weights up to 1e30 (mean ~1e26)."""
    t_eps, n = 1e-2, 200_000
    time_sampler = "logit-normal" if sampler == "logit-normal" else logit_normal(0.5, 2.0)
    g = torch.Generator().manual_seed(0)
    t = sample_time(n, time_sampler=time_sampler, t_eps=t_eps, generator=g, dtype=dtype)
    w = time_density_ratio(t, time_sampler, t_eps).double()
    assert bool(torch.isfinite(w).all())
    se = float(w.std()) / n**0.5
    assert abs(float(w.mean()) - 1) < 5 * se + 1e-6, (float(w.mean()), se)
    f = (w * t.double() ** 2).double()
    a, b = t_eps, 1 - t_eps
    exact = (b**3 - a**3) / (3 * (b - a))
    assert abs(float(f.mean()) - exact) < 5 * float(f.std()) / n**0.5 + 1e-6
