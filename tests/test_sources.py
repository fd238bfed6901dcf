"""Data sources (issue 19): a flow from one data set to another, its storage, sampling and refusals.

Ground truth: the closed-form optimal transport map between two Gaussians (the OT-coupled flow must
approach it), the stored source tensor itself (every source batch the trainer draws and every start point
a sample uses must be one of its rows), an uninterrupted run (a resumed run must reproduce it bit for bit),
one Euler step written out by hand (``--x-init``), NumPy statistics of the data (``data_std none``,
the shared normalisation), and, for :func:`pair_marginal_velocity`, a float64 double loop over the pairs
and the continuity equation of the mixture density (finite differences in t, autograd divergence).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from conftest import run_cli

import flowscore as fs
from flowscore import checkpoint, workflows
from flowscore.couplings import rows_in
from flowscore.objectives import CFM, Objective
from flowscore.runs import CHECKPOINT_FILE
from flowscore.source_data import FLOOR_ABSENT, pair_marginal_velocity

SMALL = dict(
    batch_size=64,
    warmup=5,
    lr_schedule="constant",
    width=32,
    depth=2,
    log_every=10,
    device="cpu",
    loss_floor=False,
)


def gaussian(n: int, mean: list[float], cov: list[list[float]], seed: int) -> torch.Tensor:
    """``n`` float32 draws of N(mean, cov) (float64 Cholesky)."""
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.tensor(cov, dtype=torch.float64))
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return (torch.tensor(mean, dtype=torch.float64) + z @ chol.T).float()


def sqrtm(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive definite matrix (eigendecomposition)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(w)) @ v.T


def ot_map(x: np.ndarray, m1, s1, m2, s2) -> np.ndarray:
    """The Brenier map from N(m1, s1) to N(m2, s2): ``m2 + A (x - m1)``,
    ``A = s1^-1/2 (s1^1/2 s2 s1^1/2)^1/2 s1^-1/2``."""
    r = sqrtm(s1)
    r_inv = np.linalg.inv(r)
    a = r_inv @ sqrtm(r @ s2 @ r) @ r_inv
    return np.asarray(m2) + (x - np.asarray(m1)) @ a.T


# -- training with a source ---------------------------------------------------------------------------------
M1, S1 = [-2.0, 1.0], [[0.3, 0.0], [0.0, 1.2]]
M2, S2 = [2.0, -1.0], [[1.0, 0.6], [0.6, 0.8]]


@pytest.mark.parametrize("data_std", [0.5, None])
def test_ot_coupled_flow_between_two_gaussians_approaches_the_closed_form_ot_map(tmp_path, data_std) -> None:
    source, data = gaussian(6000, M1, S1, 1), gaussian(6000, M2, S2, 2)
    config = fs.TrainConfig(
        steps=700, batch_size=256, lr=3e-3, warmup=50, width=64, depth=2, coupling="ot", data_std=data_std,
        checkpoint_every=700, log_every=100, loss_floor=False, device="cpu",
    )  # fmt: skip
    fs.Trainer(config, tmp_path / "r", data=data, source=source, progress=False).train()
    run = fs.load_run(tmp_path / "r")
    start = run.held_out_source[:500].numpy()
    moved = workflows.sample_run(run, 500, x_init=start, sampler="rk4", steps=20)
    exact = ot_map(start.astype(np.float64), M1, np.array(S1), M2, np.array(S2))
    rms = float(np.sqrt(((moved - exact) ** 2).sum(1).mean()))
    spread = float(np.sqrt(np.trace(np.array(S2))))
    # the independent coupling's flow is another map (it fails this bound); the OT-coupled one comes close
    assert rms < 0.1 * spread, rms


class Recording(CFM):
    """The built-in CFM objective that keeps every source batch and label batch it is handed."""

    def __init__(self, path: str = "linear") -> None:
        super().__init__(path)
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

    def draw(self, x_data, y=None, generator=None, **kwargs):
        batch = super().draw(x_data, y, generator, **kwargs)
        self.seen.append((batch.noise.clone(), None if y is None else y.clone(), x_data.clone()))
        return batch


def test_the_trainer_draws_every_source_batch_from_the_source_within_each_label(tmp_path) -> None:
    x, y = fs.data.labelled_toy("2gaussians", 2000)
    source, source_y = fs.data.labelled_toy("moons", 2000, seed=5)
    objective = Recording()
    config = fs.TrainConfig(steps=6, checkpoint_every=6, p_uncond=0.3, **SMALL)
    fs.Trainer(
        config, tmp_path / "r", data=(x, y), source=(source, source_y), objective=objective, progress=False
    ).train()
    run = fs.load_run(tmp_path / "r")
    encoded = run.normalizer.encode(source)
    assert len(objective.seen) >= 6
    for noise, labels, _ in objective.seen[1:]:  # [0]: the dry run
        assert bool(rows_in(noise, encoded).all())  # source points, not normal draws
        # independent coupling: the drawn pairs stay, so a data point of class k has a source point of class k
        owner = torch.tensor([int(source_y[(encoded == row).all(1)][0]) for row in noise])
        kept = labels >= 0
        assert bool((owner[kept] == labels[kept]).all()) and bool(kept.any()) and bool((~kept).any())
    # sampling class k starts from held-out source points of class k
    y = torch.tensor([1] * 20 + [0] * 20)
    res = fs.sample(run.model, run.path, 40, y=y, steps=2, return_info=True, return_trajectory=True)
    held = run.model.x_source
    for k in (0, 1):
        rows = res.trajectory[0][y == k]
        assert bool(rows_in(rows, held[run.held_out_source_labels == k]).all())


def test_a_source_given_as_dataset_or_dataloader_trains_exactly_as_the_same_tensor(tmp_path) -> None:
    from torch.utils.data import DataLoader, Dataset

    class Points(Dataset):  # items x (a TensorDataset's 1-tuples are refused, as for data)
        def __init__(self, x: torch.Tensor) -> None:
            self.x = x

        def __len__(self) -> int:
            return self.x.shape[0]

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.x[i]

    data, source = fs.data.toy("moons", 400), fs.data.toy("circles", 300, seed=3)
    config = fs.TrainConfig(steps=5, checkpoint_every=5, **SMALL)
    forms = {"tensor": source, "dataset": Points(source), "loader": DataLoader(source, batch_size=64)}
    for name, form in forms.items():
        fs.Trainer(config, tmp_path / name, data=data, source=form, progress=False).train()
    ref = checkpoint.load_checkpoint(tmp_path / "tensor" / CHECKPOINT_FILE)[0]
    for name in ("dataset", "loader"):
        got = checkpoint.load_checkpoint(tmp_path / name / CHECKPOINT_FILE)[0]
        assert all(torch.equal(ref[k], got[k]) for k in ref if k.startswith("model."))
    with pytest.raises(ValueError, match="same shape"):
        fs.Trainer(config, tmp_path / "bad", data=data, source=torch.zeros(10, 3), progress=False).train()
    assert not (tmp_path / "bad").exists()


def test_objectives_without_a_conditional_target_for_any_source_are_refused() -> None:
    class Own(Objective):
        def loss(self, model, x_data, y=None, generator=None):
            return model(x_data, torch.rand(x_data.shape[0])).pow(2).flatten(1).sum(1)

    with pytest.raises(ValueError, match="data source"):
        fs.Trainer(fs.TrainConfig(steps=2, **SMALL), "unused", data=torch.randn(100, 2),
                   source=torch.randn(100, 2), objective=Own(), progress=False).train()  # fmt: skip
    assert not os.path.exists("unused")
    with pytest.raises(ValueError, match="takes no source"):
        Objective().draw(torch.zeros(2, 2), source=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="standard normal source"):
        fs.objectives.DSM("linear").draw(torch.zeros(2, 2), source=torch.zeros(2, 2))


@pytest.mark.parametrize(
    "change",
    [dict(objective="dsm"), dict(objective="sm"), dict(objective="fm"), dict(objective="meanflow"),
     dict(prediction="score"), dict(path="ve"), dict(path="vp-linear"), dict(reference_size=8)],
)  # fmt: skip
def test_settings_that_need_the_gaussian_source_are_refused_in_one_line(change) -> None:
    with pytest.raises(ValueError) as err:
        fs.TrainConfig(data="moons", source="8gaussians", **change)
    assert "\n" not in str(err.value) and "source" in str(err.value)
    fs.TrainConfig(data="moons", **change)  # fine with N(0, I)


# -- a stored source: resume, sample, eval -----------------------------------------------------------------
@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("src") / "run")
    config = fs.TrainConfig(data="8gaussians", source="moons", data_n=1500, steps=40, coupling="ot",
                            checkpoint_every=20, **{**SMALL, "loss_floor": True})  # fmt: skip
    fs.Trainer(config, out, progress=False).train()
    return out


def _weights(run_dir: str) -> dict[str, torch.Tensor]:
    tensors, state = checkpoint.load_checkpoint(os.path.join(run_dir, CHECKPOINT_FILE))
    assert state["step"] == 40
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "optim.", "rng."))}


def test_a_run_with_a_source_resumes_bit_identically(tmp_path, source_run) -> None:
    config = fs.TrainConfig(data="8gaussians", source="moons", data_n=1500, steps=20, coupling="ot",
                            checkpoint_every=20, **{**SMALL, "loss_floor": True})  # fmt: skip
    out = str(tmp_path / "half")
    fs.Trainer(config, out, progress=False).train()
    fs.Trainer.resume(out, steps=40, progress=False).train(resume=True)
    whole, resumed = _weights(source_run), _weights(out)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_resuming_with_another_source_is_refused(tmp_path) -> None:
    data, source = torch.randn(300, 2), torch.randn(300, 2) + 3
    config = fs.TrainConfig(steps=4, checkpoint_every=4, **SMALL)
    fs.Trainer(config, tmp_path / "r", data=data, source=source, progress=False).train()
    for other in (source + 1, None):
        with pytest.raises(ValueError, match="source"):
            fs.Trainer.resume(tmp_path / "r", steps=8, data=data, source=other, progress=False).train(True)


def test_the_run_stores_its_source_and_no_floor(source_run) -> None:
    run = fs.load_run(source_run)
    assert run.source["name"] == "moons" and run.loss_floor is None
    assert run.loss_floor_absent == FLOOR_ABSENT
    moons = fs.data.toy("moons", fs.data.DEFAULT_TOY_N, seed=run.config.seed + 7919)
    assert bool(rows_in(run.held_out_source, moons).all())  # held-out points of the source set
    assert run.held_out_source.shape == (2000, 2)
    # the shared map: the pooled training data and source have mean 0 and RMS per-feature std data_std
    train = run.normalizer.decode(run.model.x_source)  # (sanity: decode inverts encode)
    assert torch.allclose(train, run.held_out_source, atol=1e-5)
    scale = run.normalizer.scale
    assert torch.equal(scale, scale[:1].expand_as(scale))  # one scale for every feature


def test_the_shared_normalisation_maps_the_pooled_points_to_mean_zero_and_std_data_std() -> None:
    data, source = gaussian(4000, M2, S2, 3), gaussian(3000, M1, S1, 4)
    normalizer, sigma = fs.source_data.fit_normalizer(data, 0.5, source)
    pooled = np.concatenate([data.numpy(), source.numpy()]).astype(np.float64)
    encoded = (pooled - normalizer.shift.numpy()) / normalizer.scale.numpy()
    assert np.allclose(encoded.mean(0), 0, atol=1e-5)
    assert math.isclose(float(np.sqrt(encoded.var(0).mean())), 0.5, rel_tol=1e-5) and sigma == 0.5


def test_sampling_starts_from_the_held_out_source_points(source_run) -> None:
    run = fs.load_run(source_run)
    res = fs.sample(run.model, run.path, 300, steps=4, return_info=True, return_trajectory=True)
    starts = res.trajectory[0]
    assert bool(rows_in(starts, run.model.x_source).all())
    assert starts.unique(dim=0).shape[0] == 300  # each stored point once before any is reused
    x = workflows.sample_run(run, 50, steps=4)
    assert x.shape == (50, 2) and np.isfinite(x).all()


def test_x_init_is_encoded_from_data_units_and_moved_by_the_model(source_run, tmp_path, capsys) -> None:
    run = fs.load_run(source_run)
    start = np.array([[0.5, -0.2], [-1.0, 1.0], [2.0, 0.0]], dtype=np.float32)
    np.save(tmp_path / "start.npy", start)
    out = str(tmp_path / "s.npy")
    start_file = str(tmp_path / "start.npy")
    code, text, _ = run_cli(capsys, "sample", "--run", source_run, "--x-init", start_file, "--sampler",
                            "euler", "--sampler-steps", "1", "--out", out, "--no-progress")  # fmt: skip
    assert code == 0, text
    z = run.normalizer.encode(torch.from_numpy(start))
    with torch.no_grad():  # one Euler step from t = 0 to 1: z + v(z, 0), decoded
        expected = run.normalizer.decode(z + run.model(z, torch.zeros(3))).numpy()
    assert np.allclose(np.load(out), expected, atol=1e-5)


def test_sde_sampling_and_the_likelihood_of_a_source_run_are_refused(source_run, tmp_path, capsys) -> None:
    run = fs.load_run(source_run)
    out = str(tmp_path / "sde.npy")
    code, _, err = run_cli(capsys, "sample", "--run", source_run, "--sampler", "sde", "--out", out)
    assert code == 2 and "data source" in err and not os.path.exists(out)
    for sampler in ("sde", "dpm++2m-sde"):
        with pytest.raises(ValueError, match="data source"):
            fs.sample(run.model, run.path, 5, sampler=sampler)
        with pytest.raises(ValueError, match="data source"):
            workflows.sample_run(run, 5, sampler=sampler)
    with pytest.raises(ValueError, match="data source"):
        fs.log_likelihood(run.model, run.path, torch.zeros(3, 2))
    result = workflows.evaluate_run(run, n=40)
    assert result["w2_sde"] is None and result["nll"] is None and result["w2_ode"] > 0
    assert "SDE" not in workflows.format_eval(result)


def test_cli_train_refuses_a_gaussian_only_setting_with_a_source_and_writes_nothing(tmp_path, capsys) -> None:
    out = str(tmp_path / "r")
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--source", "8gaussians", "--objective", "dsm",
                           "--out", out, "--no-progress")  # fmt: skip
    assert code == 2 and "source" in err and not os.path.exists(out)


# -- normalisation as a choice -----------------------------------------------------------------------------
def test_data_std_none_trains_in_data_units_and_round_trips(tmp_path, capsys) -> None:
    out = str(tmp_path / "r")
    code, text, _ = run_cli(capsys, "train", "--data", "8gaussians", "--data-std", "none", "--data-n", "800",
                            "--steps", "10", "--batch-size", "32", "--width", "16", "--no-loss-floor",
                            "--out", out, "--no-progress")  # fmt: skip
    assert code == 0 and "data units" in text
    run = fs.load_run(out)
    assert run.config.data_std is None
    assert torch.equal(run.normalizer.shift, torch.zeros(2)) and torch.equal(
        run.normalizer.scale, torch.ones(2)
    )
    data = fs.data.toy("8gaussians", 800, seed=0).numpy().astype(np.float64)
    train, _ = fs.data.split(torch.from_numpy(data), 80, seed=0)
    measured = float(np.sqrt(train.numpy().var(0).mean()))
    assert math.isclose(run.normalisation["sigma_data"], measured, rel_tol=1e-6)
    assert math.isclose(run.model.sigma_data, measured, rel_tol=1e-6)  # the preconditioning's
    code, _, _ = run_cli(capsys, "train", "--out", out, "--resume", "--steps", "12", "--no-progress")
    assert code == 0 and fs.load_run(out).step == 12
    with pytest.raises(ValueError, match="vector data"):
        fs.source_data.fit_normalizer(torch.rand(10, 1, 4, 4), None)


# -- the exact marginal velocity of two finite sets --------------------------------------------------------
def _brute_velocity(x, t, s, d, sigma, plan):
    """float64 double loop over the pairs: sum_ij w_ij (d_j - s_i) / sum_ij w_ij."""
    out = []
    for point in x:
        num, den = torch.zeros(2, dtype=torch.float64), 0.0
        for i in range(s.shape[0]):
            for j in range(d.shape[0]):
                mu = t * d[j] + (1 - t) * s[i]
                w = plan[i, j] * math.exp(-float(((point - mu) ** 2).sum()) / (2 * sigma**2))
                num += w * (d[j] - s[i])
                den += w
        out.append(num / den)
    return torch.stack(out)


def _density(x, t, s, d, sigma, plan):
    """The mixture density sum_ij plan_ij N(x; t d_j + (1 - t) s_i, sigma^2 I) (plan normalised)."""
    mu = t * d[None, :, :] + (1 - t) * s[:, None, :]  # (N, M, 2)
    sq = ((x[:, None, None, :] - mu[None]) ** 2).sum(-1)
    return (plan / plan.sum() * torch.exp(-sq / (2 * sigma**2))).sum((1, 2)) / (2 * math.pi * sigma**2)


@pytest.mark.parametrize("coupled", [False, True])
def test_pair_marginal_velocity_against_a_double_loop_and_the_continuity_equation(coupled) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 2, generator=g, dtype=torch.float64)
    d = torch.randn(4, 2, generator=g, dtype=torch.float64) + 2
    plan = (
        torch.rand(3, 4, generator=g, dtype=torch.float64)
        if coupled
        else torch.ones(3, 4, dtype=torch.float64)
    )
    x = torch.randn(5, 2, generator=g, dtype=torch.float64) + 1
    sigma, t = 0.7, 0.4
    v = pair_marginal_velocity(x, t, s, d, sigma, plan=plan if coupled else None)
    assert torch.allclose(v, _brute_velocity(x, t, s, d, sigma, plan), atol=1e-12)
    # continuity: d p / dt + div(p v) = 0 (finite difference in t, autograd divergence in x)
    h = 1e-5
    dp_dt = (_density(x, t + h, s, d, sigma, plan) - _density(x, t - h, s, d, sigma, plan)) / (2 * h)
    xr = x.clone().requires_grad_(True)
    flux = _density(xr, t, s, d, sigma, plan)[:, None] * pair_marginal_velocity(
        xr, t, s, d, sigma, plan=plan if coupled else None
    )
    div = sum(torch.autograd.grad(flux[:, k].sum(), xr, retain_graph=True)[0][:, k] for k in range(2))
    assert torch.allclose(dp_dt, -div, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="sigma"):
        pair_marginal_velocity(x, t, s, d, 0.0)
