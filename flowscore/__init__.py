"""flowscore: training objectives of flow-matching and diffusion models on Gaussian probability paths.

Time runs from t = 0 (noise) to t = 1 (data); ``x = alpha_t * x_data + beta_t * noise``. The modules follow
the data flow: ``paths`` (and ``conversions``) -> ``marginals``/``mixtures`` -> ``losses``/``floor`` ->
``objectives`` -> ``config``/``runs``/``training`` -> ``samplers``/``likelihood``/``metrics`` ->
``workflows`` (sample, eval, plot a run) -> ``demo``; ``cli`` puts them on the command line.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and editors; at run time they load on first use
    from . import (
        adapters,
        couplings,
        data,
        flowmaps,
        grids,
        losses,
        objectives,
        preconditioning,
        samplers,
        solvers,
    )
    from ._validate import validation
    from .adapters import from_denoiser, from_discrete, to_denoiser, to_discrete, wrap_time
    from .config import TrainConfig
    from .conversions import KINDS, Schedule, conversion_coefficients, convert
    from .floor import LossFloor, loss_floor
    from .flowmaps import Lagrangian, MeanFlow, PreconditionedFlowMap, Semigroup, exact_flow_map, flow_map
    from .grids import time_grid
    from .likelihood import log_likelihood
    from .marginals import EmpiricalMarginal
    from .metrics import mmd, w2
    from .mixtures import GaussianMixture
    from .objectives import Objective
    from .paths import (
        PATHS,
        CosinePath,
        CustomPath,
        GaussianPath,
        LinearPath,
        VEPath,
        VPLinearPath,
        get_path,
    )
    from .preconditioning import Preconditioned
    from .runs import Run, load_run
    from .samplers import SampleResult, encode, sample, sample_ode, sample_sde
    from .sbcfm import SBCFM, SBModel
    from .training import Trainer

_EXPORTS: dict[str, str] = {
    "validation": "_validate", "from_denoiser": "adapters", "from_discrete": "adapters",
    "to_denoiser": "adapters", "to_discrete": "adapters", "wrap_time": "adapters", "TrainConfig": "config",
    "KINDS": "conversions", "Schedule": "conversions", "conversion_coefficients": "conversions",
    "convert": "conversions", "LossFloor": "floor", "loss_floor": "floor", "time_grid": "grids",
    "log_likelihood": "likelihood", "EmpiricalMarginal": "marginals", "mmd": "metrics", "w2": "metrics",
    "GaussianMixture": "mixtures", "PATHS": "paths", "CosinePath": "paths", "CustomPath": "paths",
    "GaussianPath": "paths", "LinearPath": "paths", "VEPath": "paths", "VPLinearPath": "paths",
    "get_path": "paths", "Preconditioned": "preconditioning", "Run": "runs", "load_run": "runs",
    "encode": "samplers", "sample": "samplers", "sample_ode": "samplers", "sample_sde": "samplers",
    "Trainer": "training", "Objective": "objectives", "SampleResult": "samplers", "MeanFlow": "flowmaps",
    "PreconditionedFlowMap": "flowmaps", "Semigroup": "flowmaps", "exact_flow_map": "flowmaps",
    "flow_map": "flowmaps", "Lagrangian": "flowmaps", "SBCFM": "sbcfm", "SBModel": "sbcfm",
}  # fmt: skip
"""The public names and the module each lives in (imported on first use)."""


def __getattr__(name: str) -> Any:
    """Imports the module of a public name on first use (PEP 562), so that ``import flowscore`` is quick and
    torch loads only when something needs it (the command line handles Ctrl-C from its first moment)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # a submodule: flowscore.training, flowscore.models, ...
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "SBCFM",
    "SBModel",
    "Lagrangian",
    "MeanFlow",
    "PreconditionedFlowMap",
    "Semigroup",
    "exact_flow_map",
    "flow_map",
    "flowmaps",
    "wrap_time",
    "to_discrete",
    "to_denoiser",
    "time_grid",
    "solvers",
    "samplers",
    "grids",
    "from_discrete",
    "from_denoiser",
    "encode",
    "adapters",
    "KINDS",
    "PATHS",
    "Objective",
    "objectives",
    "Preconditioned",
    "preconditioning",
    "Run",
    "Schedule",
    "TrainConfig",
    "Trainer",
    "CosinePath",
    "CustomPath",
    "EmpiricalMarginal",
    "GaussianMixture",
    "GaussianPath",
    "LinearPath",
    "LossFloor",
    "VEPath",
    "VPLinearPath",
    "conversion_coefficients",
    "convert",
    "couplings",
    "data",
    "get_path",
    "load_run",
    "log_likelihood",
    "loss_floor",
    "losses",
    "mmd",
    "sample",
    "SampleResult",
    "sample_ode",
    "sample_sde",
    "validation",
    "w2",
]
