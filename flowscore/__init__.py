"""flowscore: training objectives of flow-matching and diffusion models on Gaussian probability paths.

Time runs from t = 0 (noise) to t = 1 (data); ``x = alpha_t * x_data + beta_t * noise``.
"""

from ._validate import validation
from .conversions import KINDS, conversion_coefficients, convert
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

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "PATHS",
    "CosinePath",
    "CustomPath",
    "GaussianPath",
    "LinearPath",
    "VEPath",
    "VPLinearPath",
    "conversion_coefficients",
    "convert",
    "get_path",
    "validation",
]
