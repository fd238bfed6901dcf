"""flowscore: training objectives of flow-matching and diffusion models on Gaussian probability paths.

Time runs from t = 0 (noise) to t = 1 (data); ``x = alpha_t * x_data + beta_t * noise``. The modules follow
the data flow: ``paths`` (and ``conversions``) -> ``marginals``/``mixtures`` -> ``losses``/``floor`` ->
``objectives`` -> ``config``/``runs``/``training`` -> ``samplers``/``likelihood``/``metrics`` ->
``workflows`` (sample, eval, plot a run) -> ``demo``; ``cli`` puts them on the command line.
"""

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
from .flowmaps import MeanFlow, PreconditionedFlowMap, Semigroup, exact_flow_map, flow_map
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
from .samplers import encode, sample, sample_ode, sample_sde
from .training import Trainer

__version__ = "0.1.0"

__all__ = [
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
    "sample_ode",
    "sample_sde",
    "validation",
    "w2",
]
