"""The sample / eval workflows on a run: honest bits per dimension, --n bounds every part, batched sampling.

Ground truth: a model that is the exact velocity field of a Gaussian (``GaussianMixture`` with one
component), whose data-space density after the normalizer is ``N(mu, sigma^2 I)`` in closed form; the
dequantised negative log-likelihood of integer data then has the closed form
``E_u[-log N(k + u; mu, sigma^2)] = D/2 log(2 pi sigma^2) + (||k - mu||^2 + D/12) / (2 sigma^2)``, and the
discrete probability of a bin ``P(k) = prod_d (Phi((k_d + 1/2 - mu)/sigma) - Phi((k_d - 1/2 - mu)/sigma))``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flowscore as fs
from flowscore import workflows
from flowscore.data import Normalizer
from flowscore.mixtures import GaussianMixture

F64 = torch.float64
D = 3


def gaussian_run(
    mu: float, sigma: float, held_out: torch.Tensor, shift: float = 5.0, scale: float = 2.0, dim: int = D
):
    """A run-like object whose model is the exact field of N(mu, sigma^2 I) in data space (``dim`` dims).

    The model lives in the normalizer's space z = (x - shift) / scale, where the data are
    N((mu - shift) / scale, (sigma / scale)^2 I).
    """
    mean_z = torch.full((1, dim), (mu - shift) / scale, dtype=F64)
    field = GaussianMixture(mean_z, torch.tensor([sigma / scale], dtype=F64)).marginal("linear").velocity
    calls = {"max_batch": 0}

    def model(x, t):
        calls["max_batch"] = max(calls["max_batch"], x.shape[0])
        return field(x.double(), t.double()).to(x.dtype)  # eval works in float32, the field in float64

    run = SimpleNamespace(
        model=model, path=fs.get_path("linear"), prediction="velocity", data_shape=(dim,),
        normalizer=Normalizer(torch.full((dim,), shift), torch.full((dim,), scale)), held_out=held_out,
        config=SimpleNamespace(objective="cfm"), log=[], loss_floor=None,
    )  # fmt: skip
    return run, calls


def expected_nll(k: torch.Tensor, mu: float, sigma: float) -> float:
    """Mean over the rows of k of E_u[-log N(k + u; mu, sigma^2 I)], u ~ U[-1/2, 1/2)^D."""
    sq = ((k - mu) ** 2).sum(1) + D / 12
    return float((0.5 * D * math.log(2 * math.pi * sigma**2) + sq / (2 * sigma**2)).mean())


def discrete_nll(k: torch.Tensor, mu: float, sigma: float) -> float:
    """Mean of -log P(k), P the mass of the unit bin around k under N(mu, sigma^2 I)."""
    normal = torch.distributions.Normal(torch.tensor(mu, dtype=F64), torch.tensor(sigma, dtype=F64))
    mass = normal.cdf(k + 0.5) - normal.cdf(k - 0.5)
    return float(-torch.log(mass).sum(1).mean())


def no_samples(m: int) -> workflows.EvalSamples:
    points = np.zeros((m, D), np.float32)
    return workflows.EvalSamples(points, points, points[None], "rk4")


@pytest.mark.parametrize(("mu", "sigma"), [(5.6, 3.0), (4.0, 0.3)])
def test_bits_per_dim_of_integer_data_is_the_dequantised_closed_form(mu, sigma):
    gen = torch.Generator().manual_seed(0)
    held = torch.round(mu + sigma * torch.randn(1200, D, generator=gen, dtype=F64))
    run, _ = gaussian_run(mu, sigma, held)
    m = 600
    result = workflows.evaluate_run(run, n=m, samples=no_samples(m))
    assert result["dequantized"] is True and result["n"] == m
    a = held[:m]
    expected = expected_nll(a, mu, sigma)
    # the estimate averages one uniform draw per point: its standard error is below 0.05 nats here
    assert result["nll"] == pytest.approx(expected, abs=0.08)
    assert result["bits_per_dim"] == pytest.approx(result["nll"] / (D * math.log(2)), rel=1e-9)
    # an upper bound on the discrete model's bits, and these are >= 0; the sharp Gaussian's continuous
    # density exceeds 1 (log-density at its mode > 0): without dequantisation bits/dim would be negative
    assert result["bits_per_dim"] >= discrete_nll(a, mu, sigma) / (D * math.log(2)) - 0.03
    assert result["bits_per_dim"] > 0
    if sigma < 1:
        assert 0.5 * D * math.log(2 * math.pi * sigma**2) < 0


def test_continuous_data_are_not_dequantised_and_get_the_normalizer_log_det():
    mu, sigma = 0.7, 1.3
    gen = torch.Generator().manual_seed(1)
    held = mu + sigma * torch.randn(400, D, generator=gen, dtype=F64)
    run, _ = gaussian_run(mu, sigma, held, shift=-1.0, scale=0.5)
    result = workflows.evaluate_run(run, n=200, samples=no_samples(200))
    a = held[:200]
    exact = torch.distributions.Normal(mu, sigma).log_prob(a).sum(1)
    assert result["dequantized"] is False
    assert result["nll"] == pytest.approx(float(-exact.mean()), abs=1e-4)


def test_eval_n_bounds_the_likelihood_points_and_no_likelihood_skips_it():
    held = torch.round(5 + 2 * torch.randn(500, D, generator=torch.Generator().manual_seed(2), dtype=F64))
    run, calls = gaussian_run(5.0, 2.0, held)
    workflows.evaluate_run(run, n=37, samples=no_samples(37))
    assert calls["max_batch"] == 37
    run, calls = gaussian_run(5.0, 2.0, held)
    result = workflows.evaluate_run(run, n=37, samples=no_samples(37), likelihood=False)
    assert calls["max_batch"] == 0
    assert (result["nll"], result["bits_per_dim"], result["dequantized"]) == (None, None, None)


def test_constant_held_out_data_give_a_zero_floor_and_no_ratio():
    run, _ = gaussian_run(2.0, 1.0, torch.full((40, D), 2.0, dtype=F64))
    samples = workflows.EvalSamples(*(np.full((20, D), 2.5, np.float32),) * 2, np.zeros((1, 20, D)), "rk4")
    result = workflows.evaluate_run(run, n=20, samples=samples, likelihood=False)
    assert result["w2_floor"] == 0 and result["w2_ratio_ode"] is None and result["w2_ratio_sde"] is None
    assert result["w2_ode"] == pytest.approx(0.5 * math.sqrt(D))
    assert "-" in workflows.format_eval(result)


def test_sample_run_batches_from_one_generator_and_decodes():
    run, _ = gaussian_run(5.0, 2.0, torch.zeros(4, D, dtype=F64))
    run.model = lambda x, t: -x  # cheap; any field will do
    n = workflows.SAMPLE_BATCH + 5
    out = workflows.sample_run(run, n, sampler="euler", steps=2, seed=3)
    assert out.shape == (n, D) and out.dtype == np.float32 and np.isfinite(out).all()
    gen = torch.Generator().manual_seed(3)
    first = fs.sample(run.model, run.path, workflows.SAMPLE_BATCH, sampler="euler", steps=2, shape=(D,),
                      generator=gen)  # fmt: skip
    np.testing.assert_allclose(out[: workflows.SAMPLE_BATCH], (2 * first + 5).numpy(), rtol=1e-6, atol=1e-6)
    second = fs.sample(run.model, run.path, 5, sampler="euler", steps=2, shape=(D,), generator=gen)
    np.testing.assert_allclose(out[workflows.SAMPLE_BATCH :], (2 * second + 5).numpy(), rtol=1e-6, atol=1e-6)


def test_sampling_more_than_memory_holds_is_refused_before_any_work():
    run, calls = gaussian_run(5.0, 2.0, torch.zeros(4, D, dtype=F64))
    with pytest.raises(ValueError, match="memory"):
        workflows.sample_run(run, 10**13)
    assert calls["max_batch"] == 0


def _unbiased_mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased MMD^2 with the RBF kernels at 0.5, 1, 2 times the pooled median distance, by loops."""
    pooled = torch.cat([a, b]).double()
    n = pooled.shape[0]
    dists = sorted(float((pooled[i] - pooled[j]).norm()) for i in range(n) for j in range(i + 1, n))
    median = dists[(len(dists) - 1) // 2] if len(dists) % 2 else dists[len(dists) // 2 - 1]
    h = [0.5 * median, median, 2 * median]

    def k(x, y):
        return sum(math.exp(-float((x - y).pow(2).sum()) / (2 * s * s)) for s in h)

    a, b = a.double(), b.double()
    aa = sum(k(a[i], a[j]) for i in range(len(a)) for j in range(len(a)) if i != j) / (len(a) * (len(a) - 1))
    bb = sum(k(b[i], b[j]) for i in range(len(b)) for j in range(len(b)) if i != j) / (len(b) * (len(b) - 1))
    ab = sum(k(a[i], b[j]) for i in range(len(a)) for j in range(len(b))) / (len(a) * len(b))
    return aa + bb - 2 * ab


def test_eval_reports_the_unbiased_mmd2_under_its_name_and_old_keys_still_read():
    import json

    gen = torch.Generator().manual_seed(4)
    held = 5 + 2 * torch.randn(60, D, generator=gen, dtype=F64)
    run, _ = gaussian_run(5.0, 2.0, held)
    ode = (5 + 2 * torch.randn(30, D, generator=gen)).numpy().astype(np.float32)
    sde = (5 + 2 * torch.randn(30, D, generator=gen)).numpy().astype(np.float32)
    samples = workflows.EvalSamples(ode, sde, ode[None], "rk4")
    result = workflows.evaluate_run(run, n=30, samples=samples, likelihood=False)
    a, b = held[:30].float(), held[30:].float()
    # the median of the pooled distances: torch's median is the lower middle value
    assert result["mmd2_unbiased_ode"] == pytest.approx(_unbiased_mmd2(torch.from_numpy(ode), a), rel=1e-4)
    assert result["mmd2_unbiased_floor"] == pytest.approx(_unbiased_mmd2(b, a), rel=1e-4)
    # the same distribution: the unbiased estimate is near 0 and here below it (what confused users)
    assert min(result["mmd2_unbiased_ode"], result["mmd2_unbiased_sde"], result["mmd2_unbiased_floor"]) < 0
    assert result["mmd_ode"] == result["mmd2_unbiased_ode"] and result.get("mmd_floor") is not None
    assert "mmd_ode" not in json.loads(json.dumps(result)) and result["w2_units"] == "data units"
    text = workflows.format_eval(result)
    assert "MMD^2 (unbiased)" in text.splitlines()[0] and " MMD " not in text


def test_eval_and_plot_progress_lines_name_each_phase_and_only_rank_0_prints(capsys, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    gen = torch.Generator().manual_seed(5)
    run, _ = gaussian_run(0.0, 1.0, torch.randn(40, 2, generator=gen, dtype=F64), dim=2)
    workflows.evaluate_run(run, n=20, progress=True)
    err = capsys.readouterr().err.splitlines()
    phases = ["sampling 20 points: unipc", "sampling 20 points: SDE", "held-out likelihood", "W2", "MMD^2"]
    assert len(err) == len(phases), err
    for line, phase in zip(err, phases, strict=True):
        assert phase in line and line.endswith(" s)"), (phase, line)
    monkeypatch.setenv("RANK", "1")  # under torchrun: only rank 0 shows progress
    workflows.evaluate_run(run, n=20, progress=True, likelihood=False)
    assert capsys.readouterr().err == ""
    workflows.evaluate_run(run, n=20, likelihood=False)
    assert capsys.readouterr().err == ""  # the library is quiet unless asked
    monkeypatch.setenv("RANK", "0")
    workflows.plot_run(run, str(tmp_path), n=20, progress=True)
    err = capsys.readouterr().err.splitlines()
    phases = ["sampling 20 points: unipc", "sampling 20 points: SDE", "velocity field", "drawing 3 figures"]
    assert len(err) == len(phases) and all(p in line for line, p in zip(err, phases, strict=True)), err


def image_run(lo: float = 0.0, hi: float = 16.0, held_out: torch.Tensor | None = None):
    """A run of 1x2x2 images with pixel range [lo, hi] whose model's samples overshoot it: the velocity
    field of N(0, 4 I) in normalised units ([-1, 1] is the pixel range)."""
    field = GaussianMixture(torch.zeros(1, 4, dtype=F64), torch.tensor([2.0], dtype=F64)).marginal("linear")

    def model(x, t):
        return field.velocity(x.double().flatten(1), t.double()).reshape(x.shape).to(x.dtype)

    shift, scale = (hi + lo) / 2, (hi - lo) / 2
    held = torch.zeros(4, 1, 2, 2) if held_out is None else held_out
    return SimpleNamespace(
        model=model, path=fs.get_path("linear"), prediction="velocity", data_shape=(1, 2, 2),
        normalizer=Normalizer(torch.full((1, 1, 1), shift), torch.full((1, 1, 1), scale)), held_out=held,
        config=SimpleNamespace(objective="cfm"), log=[], loss_floor=None,
    )  # fmt: skip


def test_image_samples_are_clamped_to_the_pixel_range_unless_asked_not_to():
    run = image_run()
    raw = workflows.sample_run(run, 200, sampler="euler", steps=10, clamp=False)
    assert raw.min() < 0 and raw.max() > 16  # the model's samples leave the range
    clamped = workflows.sample_run(run, 200, sampler="euler", steps=10)
    np.testing.assert_array_equal(clamped, np.clip(raw, 0.0, 16.0))


def test_image_w2_is_per_pixel_in_normalised_units():
    ot = pytest.importorskip("ot")
    gen = torch.Generator().manual_seed(6)
    held = torch.randint(0, 17, (40, 1, 2, 2), generator=gen).float()
    run = image_run(held_out=held)
    ode = torch.randint(0, 17, (20, 1, 2, 2), generator=gen).float().numpy()
    samples = workflows.EvalSamples(ode, ode, ode[None], "rk4")
    result = workflows.evaluate_run(run, n=20, samples=samples, likelihood=False)

    def exact(x, y):  # W2 in pixel units by POT in float64, then / (scale 8) / sqrt(4 pixels)
        x, y = np.asarray(x, np.float64).reshape(20, -1), np.asarray(y, np.float64).reshape(20, -1)
        cost = ((x[:, None] - y[None]) ** 2).sum(-1)
        return math.sqrt(ot.emd2(np.full(20, 1 / 20), np.full(20, 1 / 20), cost)) / 8 / 2

    assert result["w2_ode"] == pytest.approx(exact(ode, held[:20]), rel=1e-6)
    assert result["w2_floor"] == pytest.approx(exact(held[20:], held[:20]), rel=1e-6)
    assert "per pixel" in result["w2_units"] and "per pixel" in workflows.format_eval(result)


def test_sample_plots_name_class_and_guidance_and_draw_the_data_of_that_class(tmp_path):
    pytest.importorskip("matplotlib")
    gen = torch.Generator().manual_seed(7)
    held = torch.randn(30, 2, generator=gen, dtype=F64)
    labels = torch.arange(30) % 3
    run, _ = gaussian_run(0.0, 1.0, held, dim=2)
    run.labelled, run.held_out_labels, run.num_classes = True, labels, 3
    points, name = workflows.reference_data(run, 2, 100)
    np.testing.assert_array_equal(points, held[2::3].float().numpy())
    assert name == "held-out data, class 2"
    assert workflows.reference_data(run, None, 100)[0].shape == (30, 2)  # classes from the mix: all data
    assert workflows.reference_data(run, -1, 100)[0].shape == (30, 2)  # unconditional: all data
    assert workflows.sample_title("unipc", run, 2, 1.5) == "unipc samples, class 2, guidance 1.5"
    mix = "unipc samples, classes drawn from the training mix"
    assert workflows.sample_title("unipc", run, None, 0.0) == mix
    assert workflows.sample_title("unipc", SimpleNamespace(), None, 0.0) == "unipc samples"
    file = workflows.plot_sample_file(run, points, str(tmp_path / "s.png"), sampler="rk4", label=2)
    assert open(file, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_on_a_terminal_sampling_shows_a_bar_that_counts_every_solver_step(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    run, _ = gaussian_run(5.0, 2.0, torch.zeros(4, D, dtype=F64))
    workflows.sample_run(run, 30, sampler="euler", steps=7, progress=True)
    assert "sampling 30 points: euler, 7 steps" in terminal.getvalue() and "7/7" in terminal.getvalue()
