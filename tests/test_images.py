"""An image run end to end through the CLI (``digits``, a tiny UNet, a few dozen steps), and the image grid.

Ground truth is independent of flowscore: the pixel range and the rows of scikit-learn's digits, an Euler
integration of the learned velocity written here, W2 by POT's exact solver in float64, PNG files by their
signature and pixels, the grid layout by its index arithmetic.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import ot
import pytest
import torch
from conftest import is_png, run_cli
from sklearn.datasets import load_digits

from flowscore import TrainConfig, cli, load_run, workflows
from flowscore.models import UNet
from flowscore.plots import image_grid

TRAIN_STEPS = 40
TOML = f"""
[train]
data = "digits"
steps = {TRAIN_STEPS}
batch_size = 64
lr = 3e-3
warmup = 5
width = 8
log_every = 10
checkpoint_every = 20
"""
PIXEL_LO, PIXEL_HI = 0.0, 16.0  # scikit-learn's digits: integer gray levels 0..16


def digits_images() -> np.ndarray:
    return load_digits().images.reshape(-1, 1, 8, 8).astype(np.float64)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def run_dir(workdir: str) -> str:
    config = os.path.join(workdir, "digits.toml")
    with open(config, "w") as fh:
        fh.write(TOML)
    out = os.path.join(workdir, "run")
    assert cli.main(["train", "--config", config, "--out", out, "--no-progress"]) == 0
    return out


def test_image_run_uses_a_unet_and_maps_the_pixel_range_to_minus_one_one(run_dir: str) -> None:
    run = load_run(run_dir)
    net = run.model.wrapped_network  # the built-in UNet, preconditioned by default
    assert isinstance(net, UNet) and (net.base, net.levels) == (8, 1)
    assert run.data_shape == (1, 8, 8) and run.step == TRAIN_STEPS
    # the normalizer maps [0, 16] onto [-1, 1]: shift 8, scale 8 (both extremes occur in the training split)
    extremes = torch.tensor([PIXEL_LO, PIXEL_HI]).reshape(2, 1, 1, 1).expand(2, 1, 8, 8)
    expected = torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1).expand(2, 1, 8, 8)
    torch.testing.assert_close(run.normalizer.encode(extremes), expected)
    held = run.held_out
    assert held.shape == (len(digits_images()) // 10, 1, 8, 8)
    torch.testing.assert_close(run.normalizer.decode(run.normalizer.encode(held)), held, rtol=0, atol=1e-5)
    torch.testing.assert_close(run.normalizer.encode(held), (held.double() - 8) / 8, check_dtype=False)
    # held-out points are real digits, in data units
    real = {row.tobytes() for row in digits_images().astype(np.float32)}
    assert all(row.tobytes() in real for row in held.numpy())
    # the loss went down from its first logged value and stays above the loss floor of the training data
    losses = [row["loss"] for row in run.log]
    assert run.loss_floor is not None and 0 < run.loss_floor["value"] < losses[-1] < losses[0]


def test_sample_writes_decoded_euler_samples_and_a_png(run_dir: str, workdir: str, capsys) -> None:
    out, png = os.path.join(workdir, "samples.npy"), os.path.join(workdir, "samples.png")
    n, steps, seed, label = 16, 20, 3, 7
    argv = [
        "--n",
        str(n),
        "--sampler",
        "euler",
        "--steps",
        str(steps),
        "--seed",
        str(seed),
        "--class",
        str(label),
    ]
    code, stdout, err = run_cli(capsys, "sample", "--run", run_dir, *argv, "--out", out, "--plot", png)
    assert code == 0, err
    samples = np.load(out)
    assert samples.shape == (n, 1, 8, 8) and samples.dtype == np.float32
    # Euler on the learned velocity of class 7 (digits are labelled: a class-conditional UNet) from N(0, I)
    # at t = 0 to t = 1 (linear path: finite at both ends), then the map back to data units x = 8 z + 8
    model = load_run(run_dir).model
    z = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    times = torch.linspace(0, 1, steps + 1)
    y = torch.full((n,), label)
    with torch.no_grad():
        for t0, t1 in zip(times[:-1], times[1:], strict=True):
            z = z + (t1 - t0) * model(z, t0.expand(n), y)
    # decoded images are clamped to the training data's pixel range [0, 16]
    np.testing.assert_allclose(samples, (8 * z + 8).clamp(0, 16).numpy(), rtol=1e-4, atol=1e-3)
    assert samples.min() >= PIXEL_LO and samples.max() <= PIXEL_HI
    assert samples.std() > 2.0  # data units (pixels 0..16), not the model's [-1, 1]
    assert is_png(png)
    pixels = _read_png(png)
    assert pixels.min() < 0.1 and pixels.max() > 0.9


def _read_png(file: str) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    return matplotlib.image.imread(file)[..., :3].mean(-1)


def test_plot_writes_the_loss_and_the_image_grid(run_dir: str, workdir: str, capsys) -> None:
    out = os.path.join(workdir, "plots")
    code, stdout, err = run_cli(capsys, "plot", "--run", run_dir, "--out", out)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["loss.png", "samples_grid.png"]
    assert all(is_png(os.path.join(out, name)) for name in os.listdir(out))
    assert _read_png(os.path.join(out, "samples_grid.png")).std() > 0.1


def test_eval_json_for_images(run_dir: str, workdir: str, capsys) -> None:
    out = os.path.join(workdir, "eval.json")
    code, stdout, err = run_cli(capsys, "eval", "--run", run_dir, "--n", "50", "--json", out, "--no-fid")
    assert code == 0, err
    with open(out) as fh:
        result = json.load(fh)
    assert tuple(result) == workflows.EVAL_KEYS and result["n"] == 50
    assert result["fid"] is None and result["precision"] is None and result["recall"] is None  # --no-fid
    # images skip the SDE samples by default (their many steps would dominate eval's time)
    sde_keys = ("w2_sde", "w2_ratio_sde", "mmd2_unbiased_sde")
    assert all(result[k] is None for k in sde_keys)
    words = ("ode_sampler", "w2_units", "dequantized", "per_class", "fid", "precision", "recall", *sde_keys)
    numbers = {k: v for k, v in result.items() if k not in words}
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert [c["label"] for c in result["per_class"]] == list(range(10))  # digits are labelled
    # integer gray levels: the likelihood is of uniformly dequantised pixels over unit bins, in data units;
    # bits/dim of a discrete distribution is >= 0 (a dequantised bound stays above it)
    assert result["dequantized"] is True
    assert result["bits_per_dim"] == pytest.approx(result["nll"] / (64 * math.log(2)))
    assert result["bits_per_dim"] > 0
    # W2 floor: exact W2 between the two held-out halves, flattened to 64-vectors, in pixel units; eval
    # reports it per pixel in normalised units: [0, 16] -> [-1, 1] divides by 8, and per pixel by sqrt(64)
    held = load_run(run_dir).held_out.double().numpy().reshape(-1, 64)
    half = len(held) // 2
    a, b = held[:50], held[half : half + 50]
    cost = ((a[:, None] - b[None]) ** 2).sum(-1)
    w2_floor = math.sqrt(ot.emd2(np.full(50, 1 / 50), np.full(50, 1 / 50), cost))
    assert w2_floor > 10  # pixel units: typical digit-to-digit distances are ~20-30
    assert result["w2_floor"] == pytest.approx(w2_floor / 8 / 8, rel=1e-6)
    assert "per pixel" in result["w2_units"]
    # nn_ratio: mean distance of the 50 ODE samples (clamped to 0..16) to the nearest training digit over
    # that of 50 held-out digits; the training digits are scikit-learn's rows minus the held-out ones
    run = load_run(run_dir)
    digits = digits_images().reshape(-1, 64)
    held_rows = {row.tobytes() for row in held.astype(np.float64)}
    train = np.array([row for row in digits if row.tobytes() not in held_rows])
    assert len(train) == len(digits) - len(held_rows)  # no training digit equals a held-out one
    samples = workflows.draw_samples(run, 50, seed=0).ode.reshape(50, 64).astype(np.float64).clip(0, 16)

    def nearest(points: np.ndarray) -> np.ndarray:
        return np.sqrt(((points[:, None] - train[None]) ** 2).sum(-1)).min(1)

    assert result["nn_ratio"] == pytest.approx(nearest(samples).mean() / nearest(held[:50]).mean(), rel=1e-6)


def test_eval_sde_on_images_when_asked(run_dir: str, workdir: str, capsys) -> None:
    out = os.path.join(workdir, "eval_sde.json")
    args = ("eval", "--run", run_dir, "--n", "64", "--json", out, "--no-fid", "--no-likelihood", "--sde")
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "SDE samples" in stdout
    with open(out) as fh:
        result = json.load(fh)
    # the SDE row: exact W2 (POT, float64) between the run's SDE samples and the first 64 held-out digits,
    # both in eval's units (pixels [0, 16] -> [-1, 1], then per pixel: / 8 / sqrt(64))
    run = load_run(run_dir)
    sde = workflows.draw_samples(run, 64, seed=0).sde.reshape(64, 64).astype(np.float64)
    held = run.held_out.double().numpy().reshape(-1, 64)[:64]
    cost = ((sde[:, None] - held[None]) ** 2).sum(-1)
    expected = math.sqrt(ot.emd2(np.full(64, 1 / 64), np.full(64, 1 / 64), cost)) / 8 / 8
    assert result["w2_sde"] == pytest.approx(expected, rel=1e-4)
    assert result["w2_ratio_sde"] == pytest.approx(result["w2_sde"] / result["w2_floor"])


def test_eval_without_progress_prints_nothing_on_stderr(run_dir: str, capsys) -> None:
    run = load_run(run_dir)
    capsys.readouterr()
    # n = 120 > the 89 held-out pairs: the image metrics draw more samples than the W2 part
    result = workflows.evaluate_run(run, n=120, likelihood=False, fid=False, progress=False)
    assert result["nn_ratio"] is not None
    assert capsys.readouterr().err == ""


def test_image_grid_places_each_image_in_its_cell() -> None:
    n, ncols, h, w = 7, 3, 2, 4
    images = np.arange(n * h * w, dtype=np.float64).reshape(n, 1, h, w) - 5.0
    grid = image_grid(images, ncols=ncols, value_range=(0.0, 20.0))
    assert grid.shape == (3 * (h + 1) + 1, ncols * (w + 1) + 1, 1)
    expected = np.ones(grid.shape[:2])
    for k in range(n):
        row, col = k // ncols, k % ncols
        for i in range(h):
            for j in range(w):
                value = min(max(images[k, 0, i, j] / 20, 0), 1)
                expected[1 + row * (h + 1) + i, 1 + col * (w + 1) + j] = value
    np.testing.assert_array_equal(grid[..., 0], expected)
    rgb = image_grid(np.stack([images[:, 0], -images[:, 0], images[:, 0]], 1))  # default: min-max
    assert rgb.min() == 0.0 and rgb[1:-1, 1:-1].max() == 1.0 and rgb.shape[2] == 3
    with pytest.raises(ValueError, match="images"):
        image_grid(np.zeros((4, 2, 3, 3)))


def test_image_sets_get_their_own_defaults_and_explicit_values_win() -> None:
    fields = ("steps", "batch_size", "lr", "warmup")
    assert tuple(getattr(TrainConfig(data="digits"), f) for f in fields) == (6000, 128, 2e-3, 200)
    assert tuple(getattr(TrainConfig(data="moons"), f) for f in fields) == (10_000, 512, 2e-3, 500)
    config = TrainConfig(data="digits", steps=7, lr=0.5)
    assert (config.steps, config.batch_size, config.lr) == (7, 128, 0.5)
    assert TrainConfig.from_dict(config.to_dict()) == config
