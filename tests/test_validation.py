"""Bad input raises ValueError naming the argument; path names, kinds and options; config round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import PATH_NAMES, make_path

from flowscore import KINDS, get_path, validation

GOOD_T = torch.tensor([0.2, 0.5, 0.8])


def good() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)


# each entry: (callable taking (path, x_data, noise), regex the message must match)
def _sample(x_data=None, noise=None, t=GOOD_T):
    def call(path, xd, nz):
        return path.sample(xd if x_data is None else x_data, t, nz if noise is None else noise)

    return call


BAD_INPUTS = {
    "x_data 1-dim": (_sample(x_data=torch.randn(3)), "x_data"),
    "x_data empty batch": (_sample(x_data=torch.randn(0, 2), t=0.5), "x_data"),
    "x_data not a tensor": (_sample(x_data=[[1.0, 2.0]]), "x_data"),
    "x_data integer": (_sample(x_data=torch.ones(3, 2, dtype=torch.long)), "x_data"),
    "noise wrong shape": (_sample(noise=torch.randn(3, 3)), "noise"),
    "noise integer": (_sample(noise=torch.ones(3, 2, dtype=torch.int32)), "noise"),
    "noise float64 vs float32": (_sample(noise=torch.randn(3, 2, dtype=torch.float64)), "noise.*dtype"),
    "noise on meta device": (_sample(noise=torch.empty(3, 2, device="meta")), "noise.*meta"),
    "t wrong length": (_sample(t=torch.rand(4)), r"\bt\b.*shape"),
    "t 2-dim": (_sample(t=torch.rand(3, 1)), r"\bt\b.*shape"),
    "t below 0": (_sample(t=torch.tensor([0.2, -0.1, 0.3])), r"\bt\b.*\[0, 1\]"),
    "t above 1": (_sample(t=1.5), r"\bt\b.*\[0, 1\]"),
    "t NaN": (_sample(t=torch.tensor([0.2, math.nan, 0.3])), r"\bt\b.*\[0, 1\]"),
    "t NaN float": (_sample(t=math.nan), r"\bt\b.*\[0, 1\]"),
    "t inf": (_sample(t=torch.tensor(math.inf)), r"\bt\b.*\[0, 1\]"),
    "t integer tensor": (_sample(t=torch.tensor([0, 1, 0])), r"\bt\b.*floating"),
    "t bool": (_sample(t=True), r"\bt\b.*bool"),
    "t float64 vs float32": (_sample(t=GOOD_T.double()), r"\bt\b.*dtype"),
    "t on meta device": (_sample(t=torch.empty(3, device="meta")), r"\bt\b.*meta"),
    "target kind": (lambda p, xd, nz: p.target(xd, GOOD_T, nz, "eps"), "kind.*'eps'"),
    "convert src": (lambda p, xd, nz: p.convert(nz, xd, GOOD_T, "epsilon", "score"), "src.*'epsilon'"),
    "convert dst": (lambda p, xd, nz: p.convert(nz, xd, GOOD_T, "score", "x0"), "dst.*'x0'"),
    "convert value shape": (lambda p, xd, nz: p.convert(nz[:2], xd, GOOD_T, "noise", "data"), "value"),
    "convert value dtype": (lambda p, xd, nz: p.convert(nz.double(), xd, GOOD_T, "noise", "data"), "value"),
    "convert x 1-dim": (lambda p, xd, nz: p.convert(nz[0], xd[0], 0.5, "noise", "data"), r"\bx\b"),
    "score x_data shape": (lambda p, xd, nz: p.conditional_score(xd, nz[:, :1], GOOD_T), "x_data"),
    "velocity noise dtype": (
        lambda p, xd, nz: p.conditional_velocity(xd, xd, GOOD_T, noise=nz.double()),
        "noise",
    ),
    "log_prob x integer": (lambda p, xd, nz: p.conditional_log_prob(xd.long(), xd, GOOD_T), r"\bx\b"),
    "prior_log_prob x 1-dim": (lambda p, xd, nz: p.prior_log_prob(xd[0]), r"\bx\b"),
    "alpha t out of range": (lambda p, xd, nz: p.alpha(torch.tensor([2.0])), r"\bt\b"),
    "diffusion_sq t NaN": (lambda p, xd, nz: p.diffusion_sq(math.nan), r"\bt\b"),
}


@pytest.mark.parametrize("name", ["linear", "ve"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(name: str, case: str) -> None:
    call, pattern = BAD_INPUTS[case]
    x_data, noise = good()
    with pytest.raises(ValueError, match=pattern):
        call(make_path(name), x_data, noise)


def test_good_input_passes() -> None:
    """The baseline of the table above: the same calls with good arguments return finite values."""
    path = make_path("linear")
    x_data, noise = good()
    assert torch.isfinite(path.sample(x_data, GOOD_T, noise)).all()
    assert torch.isfinite(path.sample(x_data, 0.5, noise)).all()
    assert torch.isfinite(path.sample(x_data, torch.tensor(0.5), noise)).all()
    for kind in KINDS:
        assert torch.isfinite(path.target(x_data, GOOD_T, noise, kind)).all()


def test_validation_switch_turns_off_value_checks_only() -> None:
    path = make_path("linear")
    x_data, noise = good()
    with validation(False):
        out = path.sample(x_data, torch.tensor([0.2, 1.5, 0.3]), noise)  # range not checked
        with pytest.raises(ValueError, match="noise"):  # shapes still are
            path.sample(x_data, GOOD_T, noise[:2])
    torch.testing.assert_close(out[1], 1.5 * x_data[1] - 0.5 * noise[1])
    with pytest.raises(ValueError, match=r"\bt\b"):  # restored on exit
        path.sample(x_data, torch.tensor([0.2, 1.5, 0.3]), noise)


# -- names, options, config
def test_unknown_path_name() -> None:
    with pytest.raises(ValueError, match="path.*'cosine'.*'linear'"):
        get_path("cosine")


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("ve", {"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min < sigma_max"),
        ("ve", {"sigma_min": 0.0}, "sigma_min"),
        ("ve", {"sigma": 3.0}, "bad options.*'ve'"),
        ("linear", {"beta_min": 0.1}, "bad options.*'linear'"),
        ("vp-linear", {"beta_min": 2.0, "beta_max": 1.0}, "beta_min <= beta_max"),
        ("vp-linear", {"t_clamp": 0.0}, "t_clamp"),
        ("custom", {"alpha": 1.0, "beta": lambda t: 1 - t}, "alpha must be callable"),
    ],
)
def test_bad_path_options(name: str, options: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        get_path(name, **options)


def test_ve_options_work_and_round_trip() -> None:
    path = get_path("ve", sigma_max=50)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(path.beta(t), 50 * (0.002 / 50) ** t)
    assert path.prior_std == 50.0
    config = json.loads(json.dumps(path.config()))  # JSON-serialisable
    assert config == {"name": "ve", "sigma_min": 0.002, "sigma_max": 50.0}
    rebuilt = get_path(**config)
    torch.testing.assert_close(rebuilt.beta(t), path.beta(t), rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in PATH_NAMES if n != "custom"])
def test_config_round_trip(name: str) -> None:
    path = get_path(name)
    rebuilt = get_path(**json.loads(json.dumps(path.config())))
    assert type(rebuilt) is type(path) and rebuilt.config() == path.config()
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for method in ("alpha", "beta", "d_alpha", "d_beta"):
        assert torch.equal(getattr(rebuilt, method)(t), getattr(path, method)(t))


def test_custom_path_cannot_be_stored() -> None:
    with pytest.raises(ValueError, match="custom path"):
        make_path("custom").config()


def test_get_path_passes_a_path_through() -> None:
    path = make_path("vp")
    assert get_path(path) is path
