"""Peer samplers for comparisons: k-diffusion's ``sampling.py`` and diffusers' DPMSolverMultistepScheduler.

k-diffusion 0.1.1.post1 (``pip install --no-deps k-diffusion==0.1.1.post1``): its package ``__init__``
imports torchvision and its ``sampling.py`` imports ``torchsde`` (used only by the Brownian-tree noise of
the SDE samplers) and ``utils`` (``append_dims`` only), so :func:`k_diffusion_sampling` loads
``sampling.py`` alone with those two replaced by stand-ins. Each function returns None when the peer is
not installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch


def k_diffusion_sampling() -> types.ModuleType | None:
    """k-diffusion's ``sampling`` module, or None when k-diffusion is not installed."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "_kdiff_sampling"
    if name in sys.modules:
        return sys.modules[name]
    package = types.ModuleType("_kdiff")
    package.__path__ = []
    utils = types.ModuleType("_kdiff.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    saved = {key: sys.modules.get(key) for key in ("_kdiff", "_kdiff.utils", "torchsde")}
    sys.modules.update({"_kdiff": package, "_kdiff.utils": utils})
    if saved["torchsde"] is None and importlib.util.find_spec("torchsde") is None:
        sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
        module_spec = importlib.util.spec_from_file_location("_kdiff.sampling", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except ImportError:
        return None
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    sys.modules[name] = module
    return module


def diffusers_dpm_solver(
    denoiser, x_ve: torch.Tensor, sigmas: torch.Tensor, order: int = 2, scheduler: str = "dpm"
) -> tuple[torch.Tensor, int] | None:
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, ``prediction_type="sample"``), or with
    ``scheduler="unipc"`` its UniPCMultistepScheduler (bh2, data prediction), on the given decreasing
    ``sigmas`` (ending in 0), driving the denoiser ``D(x_ve, sigma)``.

    The scheduler's own sigmas are replaced by ``sigmas`` after ``set_timesteps`` (so it runs on the same
    grid as the other samplers); it steps on the variance-preserving ``x_ve / sqrt(1 + sigma^2)``.
    Returns ``(x_ve at sigma = 0, model calls)`` or None when diffusers is not installed.
    """
    try:
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
    except ImportError:
        return None
    steps = sigmas.shape[0] - 1
    if scheduler == "unipc":
        scheduler = UniPCMultistepScheduler(
            solver_order=order,
            prediction_type="sample",
            predict_x0=True,
            solver_type="bh2",
            final_sigmas_type="zero",
        )
    else:
        scheduler = DPMSolverMultistepScheduler(
            solver_order=order,
            prediction_type="sample",
            algorithm_type="dpmsolver++",
            final_sigmas_type="zero",
        )
    scheduler.set_timesteps(steps)
    scheduler.sigmas = sigmas.to(torch.float32 if x_ve.dtype == torch.float32 else torch.float64).cpu()
    x = x_ve / torch.sqrt(1 + sigmas[0] ** 2)
    calls = 0
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = sigmas[i]
        denoised = denoiser(x * torch.sqrt(1 + sigma**2), sigma.expand(x.shape[0]))
        calls += 1
        x = scheduler.step(denoised, timestep, x).prev_sample
    return x, calls
