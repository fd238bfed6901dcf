"""Preconditioning: the scalings against float64 Monte Carlo and closed forms, the wrapper against exact
Gaussian marginals, and the trainer's use of it (stored weights, old runs, sample quality per prediction).

Ground truth: ``path.target`` (the conditional targets, independent of the scalings), the closed-form
marginal fields of a Gaussian (``GaussianMixture``), and W2 against fresh draws of the data.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import flowscore as fs
from flowscore import data, workflows
from flowscore.metrics import w2
from flowscore.preconditioning import Preconditioned, QualityWarning, scalings
from flowscore.runs import _stored_config

PATHS = ("linear", "vp", "vp-linear", "ve")


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_the_network_input_and_target_have_unit_variance(name, sigma_data):
    """c_in x and (conditional velocity target) / c_out have unit variance at every t (float64 Monte Carlo,
    data N(0, sigma_data^2); the target from path.target)."""
    path = fs.get_path(name)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for t_value in (0.0, 0.05, 0.4, 0.9, 0.999):
        t = torch.full((n,), t_value, dtype=torch.float64)
        x_data = sigma_data * torch.randn(n, 1, generator=g, dtype=torch.float64)
        noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
        c_in, c_out = (c[:, None] for c in scalings(path.schedule(t), sigma_data))
        assert float((c_in * path.sample(x_data, t, noise)).var()) == pytest.approx(1.0, abs=0.02)
        assert float((path.target(x_data, t, noise) / c_out).var()) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("kind", fs.KINDS)
def test_every_prediction_is_finite_on_the_closed_interval(name, kind):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        model = Preconditioned(lambda x, t: torch.ones_like(x), name, kind)
        x = torch.randn(t.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=dtype)
        assert torch.isfinite(model(x, t.to(dtype))).all()


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("kind", fs.KINDS)
def test_a_network_that_knows_the_velocity_gives_every_prediction_exactly(name, kind):
    """An oracle network returning the conditional velocity / c_out: the model of each kind returns that
    kind's conditional target, written out here (noise, x_data, -noise / beta, the velocity)."""
    path = fs.get_path(name)
    g = torch.Generator().manual_seed(1)
    x_data = torch.randn(64, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x = path.sample(x_data, t, noise)
    s = path.schedule(t)
    velocity = s.d_alpha[:, None] * x_data + s.d_beta[:, None] * noise

    def oracle(x_in, t_in):
        return velocity / scalings(path.schedule(t_in))[1][:, None]

    expected = {"velocity": velocity, "noise": noise, "data": x_data, "score": -noise / s.beta[:, None]}[kind]
    torch.testing.assert_close(Preconditioned(oracle, path, kind)(x, t), expected, rtol=1e-8, atol=1e-8)


def test_the_wrapper_passes_labels_and_adds_no_weights():
    net = fs.models.MLP(2, width=16, depth=2, num_classes=3)
    model = Preconditioned(net, "linear", "noise")
    assert [k.removeprefix("net.") for k in model.state_dict()] == list(net.state_dict())
    x, t = torch.randn(5, 2), torch.rand(5)
    y = torch.tensor([0, 1, 2, -1, 0])
    c_in, c_out = (c.float()[:, None] for c in scalings(model.path.schedule(t.double())))
    velocity = c_out * net(c_in * x, t, y)
    noise = fs.get_path("linear").convert(velocity, x, t, "velocity", "noise")
    torch.testing.assert_close(model(x, t, y), noise, rtol=1e-5, atol=1e-6)
    assert model.prediction == "noise"
    assert fs.models.builtin_config(model) == net.config()
    with pytest.raises(ValueError, match="prediction"):
        Preconditioned(net, "linear", "epsilon")
    with pytest.raises(ValueError, match="sigma_data"):
        Preconditioned(net, "linear", sigma_data=0.0)


def test_runs_store_the_network_and_load_preconditioned(tmp_path):
    config = fs.TrainConfig(data="moons", steps=20, batch_size=32, warmup=0, loss_floor=False, device="cpu",
                            objective="dsm", prediction="noise", width=16, depth=2)  # fmt: skip
    fs.Trainer(config, tmp_path / "run", progress=False).train()
    run = fs.load_run(tmp_path / "run")
    assert isinstance(run.model, Preconditioned) and run.model.prediction == "noise"
    raw = fs.TrainConfig(**{**config.to_dict(), "precondition": False})
    fs.Trainer(raw, tmp_path / "raw", progress=False).train()  # dsm/noise trains well raw: no warning
    assert isinstance(fs.load_run(tmp_path / "raw").model, fs.models.MLP)
    # a run written before the field existed was not preconditioned, and loads as it was trained
    stored = config.to_dict()
    del stored["precondition"]
    assert _stored_config(stored).precondition is False


class _UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None]], 1))


def test_a_model_you_pass_is_used_as_given(tmp_path):
    config = fs.TrainConfig(steps=5, batch_size=16, warmup=0, loss_floor=False, device="cpu")
    net = _UserNet()
    fs.Trainer(config, tmp_path / "run", model=net, data=torch.randn(200, 2)).train()
    assert fs.load_run(tmp_path / "run", model=_UserNet()).model.__class__ is _UserNet


@pytest.mark.parametrize(
    "path, objective, prediction",
    [
        ("linear", "dsm", "noise"),
        ("linear", "cfm", "score"),
        ("linear", "dsm", "data"),
        ("vp", "cfm", "velocity"),
    ],
)
def test_preconditioned_models_of_several_predictions_sample_well(tmp_path, path, objective, prediction):
    """A few cells of bench/bench_matrix.py at a small budget, against a generous bound on W2 / floor (the
    bench holds the real figures). The vp cell fails with unit-variance data (data_std=1: the velocity is
    uncorrelated with x there and the network stays at zero, docs/theory.md section 16)."""
    config = fs.TrainConfig(data="8gaussians", path=path, objective=objective, prediction=prediction,
                            steps=2000, batch_size=256, warmup=100, loss_floor=False, device="cpu",
                            width=64, depth=3, threads=1)  # fmt: skip
    fs.Trainer(config, tmp_path / "run", progress=False).train()
    run = fs.load_run(tmp_path / "run")
    n = 1000
    a, b = data.toy("8gaussians", n, seed=10_001), data.toy("8gaussians", n, seed=10_002)
    floor = w2(b, a)
    for sampler in (None, "sde"):
        samples = workflows.sample_run(run, n, sampler=sampler, seed=3, threads=1)
        assert w2(torch.from_numpy(samples), a) / floor < 2.0, sampler


def test_training_a_raw_noise_model_warns_and_the_cli_says_it_in_one_line(tmp_path):
    base = dict(
        data="moons", steps=2, batch_size=16, warmup=0, loss_floor=False, device="cpu", width=8, depth=1
    )
    with pytest.warns(QualityWarning, match="noise prediction trained with cfm/fm without preconditioning"):
        fs.Trainer(fs.TrainConfig(prediction="noise", precondition=False, **base), tmp_path / "a").train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fs.Trainer(fs.TrainConfig(prediction="noise", **base), tmp_path / "b").train()
        fs.Trainer(fs.TrainConfig(precondition=False, **base), tmp_path / "c").train()
        raw_dsm_noise = fs.TrainConfig(objective="dsm", prediction="noise", precondition=False, **base)
        fs.Trainer(raw_dsm_noise, tmp_path / "d").train()
    out = subprocess.run(
        [sys.executable, "-m", "flowscore", "train", "--data", "moons", "--steps", "2", "--batch-size", "16",
         "--warmup", "0", "--no-loss-floor", "--width", "8", "--depth", "1", "--prediction", "score",
         "--no-precondition", "--no-progress", "--out", str(tmp_path / "cli")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "preconditioning" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: a score prediction trained with cfm/fm without")


def _vp_linear_closed_form(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0):
    """float64 alpha, beta, alpha', beta' and beta beta' of vp-linear from T(t) = s b0 + s^2 (b1 - b0) / 2."""
    s = 1 - t
    big_t = s * beta_min + 0.5 * s**2 * (beta_max - beta_min)
    d_big_t = -(beta_min + s * (beta_max - beta_min))
    alpha, beta = torch.exp(-big_t / 2), torch.sqrt(-torch.expm1(-big_t))
    beta_d_beta = 0.5 * d_big_t * torch.exp(-big_t)
    return alpha, beta, -0.5 * d_big_t * alpha, beta_d_beta / beta, beta_d_beta


def test_c_out_near_the_data_end_of_vp_linear_follows_the_documented_formula():
    """c_out = sqrt(alpha'^2 + (beta beta' / max(beta, BETA_FLOOR))^2): the exact beta' where beta >= 1e-4.
    It was flat at ~50 on [1 - 1e-5, 1] (the path's clamped d_beta) where the formula gives up to 500."""
    from flowscore.preconditioning import BETA_FLOOR

    t = 1 - torch.tensor([1e-3, 1e-5, 3e-6, 1e-6, 1e-7, 1e-9, 0.0], dtype=torch.float64)
    alpha, beta, d_alpha, _, beta_d_beta = _vp_linear_closed_form(t)
    expected = torch.sqrt(d_alpha**2 + (beta_d_beta / beta.clamp(min=BETA_FLOOR)) ** 2)
    _, c_out = scalings(fs.get_path("vp-linear").schedule(t))
    torch.testing.assert_close(c_out, expected, rtol=1e-10, atol=0)
    assert abs(float(c_out[-1]) - 500) < 1  # |beta beta'| = beta_min / 2 at t = 1, over 1e-4


def test_velocity_converts_to_noise_and_score_that_agree_near_the_data_end_of_vp_linear():
    """For D, E and the exact velocity u = alpha' D + beta' E (closed-form beta', not clamped), converting u
    gives back E and D, and noise = -beta score, for t in (1 - 1e-5, 1) too (the path clamps d_beta there)."""
    path = fs.get_path("vp-linear")
    t = 1 - torch.tensor([1e-4, 9e-6, 1e-6, 1e-8], dtype=torch.float64)
    alpha, beta, d_alpha, d_beta, _ = (c[:, None] for c in _vp_linear_closed_form(t))
    g = torch.Generator().manual_seed(0)
    x_data, noise = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    )
    x, u = alpha * x_data + beta * noise, d_alpha * x_data + d_beta * noise
    e, s, d = (path.convert(u, x, t, "velocity", kind) for kind in ("noise", "score", "data"))
    torch.testing.assert_close(e, noise, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d, x_data, rtol=1e-6, atol=1e-6)
    assert float((s + e / beta).abs().max() / (e / beta).abs().max()) < 1e-9
    at_one = torch.ones(4, dtype=torch.float64)  # at t = 1 itself: score finite, noise = -beta score = 0
    e1, s1 = (path.convert(u, x, at_one, "velocity", kind) for kind in ("noise", "score"))
    assert bool(torch.isfinite(s1).all()) and float(e1.abs().max()) == 0.0


def test_c_out_is_finite_on_a_custom_path_whose_beta_derivative_diverges():
    """beta = sqrt(1 - t): beta' = -1 / (2 sqrt(1 - t)) diverges at t = 1, where c_out was NaN (0 * inf). Now
    c_out = sqrt(alpha'^2 + beta'^2) with |beta'| bounded by D_BETA_CAP, finite on [0, 1]."""
    from flowscore.paths import CustomPath
    from flowscore.preconditioning import D_BETA_CAP

    path = CustomPath(lambda t: t, lambda t: torch.sqrt(1 - t))
    t = torch.tensor([0.0, 0.5, 1 - 1e-6, 1.0], dtype=torch.float64)
    with fs.validation(False):
        _, c_out = scalings(path.schedule(t))
    d_beta = (0.5 / torch.sqrt(1 - t)).clamp(max=D_BETA_CAP)
    torch.testing.assert_close(c_out, torch.sqrt(1 + d_beta**2), rtol=1e-10, atol=0)
