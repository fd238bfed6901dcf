"""SB-CFM as a training objective (flowscore.sbcfm): targets and loss against torchcfm, the pairing at the
absolute epsilon = 2 sigma^2 against torchcfm's Sinkhorn plan, a trained run against a closed-form target
law, the SB SDE sampler, resume, config and CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import flowscore as fs
from flowscore import checkpoint
from flowscore.runs import CHECKPOINT_FILE
from flowscore.sbcfm import SBCFM, SBModel, sample_sb_sde

F64 = torch.float64


def _torchcfm():
    return pytest.importorskip("torchcfm.conditional_flow_matching")


class TwoHeads(torch.nn.Module):
    """A fixed smooth two-head field (B, 2, D): any function works for comparing two losses."""

    def __init__(self, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = torch.randn(2, dim + 1, dim, generator=g, dtype=F64)

    def forward(self, x, t):
        inp = torch.cat([x, t[:, None]], 1)
        return torch.tanh(torch.einsum("bi,kij->bkj", inp, self.a))


def test_targets_and_loss_equal_torchcfms_sb_matcher_on_the_same_pairs_t_and_noise():
    """Given the same pairs, t and bridge noise: x and the velocity target equal torchcfm's
    SchrodingerBridgeConditionalFlowMatcher's (its 1e-8 in 2t(1-t) is a relative 1e-8/(2t(1-t))), and the
    per-sample loss equals torchcfm's SF2M flow + score regression ((v - u)^2 + (lambda_t h + eps)^2, with
    its compute_lambda) summed over dims."""
    cfm = _torchcfm()
    g = torch.Generator().manual_seed(0)
    b, d, sigma = 64, 3, 0.7
    x_source, x_data = (
        torch.randn(b, d, generator=g, dtype=F64),
        2 + torch.randn(b, d, generator=g, dtype=F64),
    )
    t = 0.05 + 0.9 * torch.rand(b, generator=g, dtype=F64)  # torchcfm's 1e-8: a relative 1e-7 here
    eps = torch.randn(b, d, generator=g, dtype=F64)
    matcher = cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=sigma)
    xt_ref = matcher.sample_xt(x_source, x_data, t, eps)
    ut_ref = matcher.compute_conditional_flow(x_source, x_data, t, xt_ref)
    objective = SBCFM(sigma)
    batch = objective.draw(x_data, t=t, noise=x_source, bridge=eps, paired=True)
    torch.testing.assert_close(batch.x, xt_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batch.target, ut_ref, rtol=1e-6, atol=1e-6)
    net = TwoHeads(d)
    out = net(batch.x, batch.t)
    lam = matcher.compute_lambda(t)[:, None]
    expected = ((out[:, 0] - ut_ref) ** 2).sum(1) + ((lam * out[:, 1] + eps) ** 2).sum(1)
    torch.testing.assert_close(
        objective.per_sample(SBModel(net, sigma), batch), expected, rtol=1e-6, atol=1e-6
    )
    # score=False: the velocity regression alone, on a one-head network
    velocity_only = SBCFM(sigma, score=False)
    flow = velocity_only.per_sample(lambda x, t: net(x, t)[:, 0], batch)
    torch.testing.assert_close(flow, ((out[:, 0] - ut_ref) ** 2).sum(1), rtol=1e-6, atol=1e-6)


def test_pairs_are_drawn_from_torchcfms_sinkhorn_plan_at_epsilon_two_sigma_squared():
    """The objective's pairs: for each data row i, the frequency of each source row j over many draws is
    row i of torchcfm's OTPlanSampler("sinkhorn", reg=2 sigma^2) plan (normalised); the plan at the relative
    regularisation (reg times the mean cost, the trainer's "sinkhorn" coupling) is visibly another one."""
    ot = pytest.importorskip("torchcfm.optimal_transport")
    g = torch.Generator().manual_seed(1)
    b, sigma, draws = 5, 0.8, 4000
    x_source, x_data = 2 * torch.randn(b, 2, generator=g), 2 * torch.randn(b, 2, generator=g)
    plan = torch.as_tensor(ot.OTPlanSampler("sinkhorn", reg=2 * sigma**2).get_map(x_source, x_data))
    expected = (plan / plan.sum(0, keepdim=True)).T.float()  # row i: P(source j | data i)
    objective = SBCFM(sigma)
    counts = torch.zeros(b, b)
    for _ in range(draws):
        chosen = objective.draw(x_data, noise=x_source, generator=g).noise
        j = torch.cdist(chosen, x_source).argmin(1)
        counts[torch.arange(b), j] += 1
    torch.testing.assert_close(counts / draws, expected, atol=0.035, rtol=0)
    cost = torch.cdist(x_source, x_data) ** 2
    relative = torch.as_tensor(
        ot.OTPlanSampler("sinkhorn", reg=2 * sigma**2 * float(cost.mean())).get_map(x_source, x_data)
    )
    other = (relative / relative.sum(0, keepdim=True)).T.float()
    assert float((other - expected).abs().max()) > 0.2


def test_sb_sde_drift_is_velocity_plus_score_term_and_noise_is_sigma_root_h():
    """One Euler--Maruyama step by hand: x + h (v + h_score) + sigma sqrt(h) z with the generator's z; the
    last step has no noise. The model is called once per step (the registry's 1 call per step)."""
    net = TwoHeads(2)
    model = SBModel(net, 0.5)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    times = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    calls = []

    def drift(x, t):
        calls.append(1)
        return model.drift(x, t)

    out = sample_sb_sde(drift, x, times, 0.5, generator=torch.Generator().manual_seed(5))
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    heads = net(x, torch.zeros(7, dtype=F64))
    x1 = x + 0.25 * (heads[:, 0] + heads[:, 1]) + 0.5 * 0.5 * z
    heads = net(x1, torch.full((7,), 0.25, dtype=F64))
    torch.testing.assert_close(out, x1 + 0.75 * (heads[:, 0] + heads[:, 1]))
    assert len(calls) == 2
    nfe = fs.sample(model, "linear", 3, sampler="sb-sde", steps=6, dtype=F64, return_info=True).nfe
    assert nfe == fs.sampler_registry.planned_calls("sb-sde", torch.linspace(0, 1, 7, dtype=F64), None)


def test_sampler_choice_for_sb_models_and_others():
    """An SB model samples with euler by default and refuses the Gaussian-path samplers; sb-sde refuses a
    model that is not an SB one, and an SB model trained without a score head."""
    model = SBModel(TwoHeads(2), 0.5)
    a = fs.sample(model, "linear", 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    b = fs.sample(model, "linear", 4, sampler="euler", generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(a, b)
    for bad in ("unipc", "ddim", "sde", "dpm++2m-sde"):
        with pytest.raises(ValueError, match="Brownian-bridge"):
            fs.sample(model, "linear", 4, sampler=bad)
    with pytest.raises(ValueError, match="Schrödinger-bridge"):
        fs.sample(lambda x, t: -x, "linear", 4, sampler="sb-sde")
    with pytest.raises(ValueError, match="no score head"):
        fs.sample(SBModel(lambda x, t: -x, 0.5, score=False), "linear", 4, sampler="sb-sde")
    # encode: euler by default, back to the start (100 Euler steps of a smooth field); no log-SNR solver
    x = fs.sample(model, "linear", 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    back = fs.encode(model, "linear", x, steps=400)
    start = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(back, start, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="Brownian-bridge"):
        fs.encode(model, "linear", x, sampler="unipc")


def _gauss_file(tmp_path, n=3000):
    """Data N(m, diag(s^2)) in 2-D, saved as .npy, and (m, s)."""
    m, s = np.array([1.0, -0.5]), np.array([0.6, 0.3])
    x = m + s * np.random.default_rng(0).standard_normal((n, 2))
    path = tmp_path / "gauss.npy"
    np.save(path, x.astype(np.float32))
    return path, m, s


SB_TINY = dict(
    objective="sbcfm", sb_sigma=0.3, width=64, depth=3, batch_size=256, lr=2e-3, warmup=20,
    checkpoint_every=100, log_every=50, device="cpu", n_holdout=500,
)  # fmt: skip


def test_trained_sb_run_reaches_the_target_law_by_ode_and_by_sde(tmp_path):
    """A short SB-CFM run on N(m, diag(s^2)) data: euler (the default) and sb-sde samples have the data's
    mean and standard deviations within 0.1, and W2 to fresh draws of the law below 0.2 (the bound of a
    correct model at this budget; a model whose score head were ignored or doubled in the SDE, or whose
    flow went to the source, misses it). The run stores sb_sigma and the objective, and has no floor."""
    path, m, s = _gauss_file(tmp_path)
    cfg = fs.TrainConfig(data=str(path), steps=600, **SB_TINY)
    fs.Trainer(cfg, tmp_path / "run", progress=False).train()
    run = fs.load_run(tmp_path / "run")
    assert run.config.sb_sigma == 0.3 and run.objective["name"] == "sbcfm" and run.objective["sigma"] == 0.3
    assert run.loss_floor is None and "Brownian" in run.loss_floor_absent
    fresh = m + s * np.random.default_rng(1).standard_normal((1000, 2))
    for sampler in ("euler", "sb-sde"):
        x = fs.workflows.sample_run(run, 1000, sampler=None if sampler == "euler" else sampler, seed=3)
        assert np.abs(x.mean(0) - m).max() < 0.1, (sampler, x.mean(0))
        assert np.abs(x.std(0) - s).max() < 0.1, (sampler, x.std(0))
        assert fs.metrics.w2(x, fresh) < 0.2, sampler


def test_sb_run_resumes_bit_identically(tmp_path):
    """60 steps straight and 30 + a resume to 60 (constant learning rate) give the same weights, EMA and
    optimizer state: the pairing, times and bridge noise come from the run's generator."""
    path, _, _ = _gauss_file(tmp_path, 800)
    base = dict(SB_TINY, width=16, depth=2, batch_size=32, checkpoint_every=30, lr_schedule="constant")
    fs.Trainer(fs.TrainConfig(data=str(path), steps=60, **base), tmp_path / "full", progress=False).train()
    fs.Trainer(fs.TrainConfig(data=str(path), steps=30, **base), tmp_path / "part", progress=False).train()
    fs.Trainer.resume(tmp_path / "part", steps=60, progress=False).train(resume=True)
    a, _ = checkpoint.load_checkpoint(tmp_path / "full" / CHECKPOINT_FILE)
    b, _ = checkpoint.load_checkpoint(tmp_path / "part" / CHECKPOINT_FILE)
    for key in a:
        if key.startswith(("model.", "ema.", "optim.")):
            assert torch.equal(a[key], b[key]), key


def test_config_refuses_what_sbcfm_does_not_take():
    """sb_sigma > 0; sb_sigma on another objective, a prediction other than velocity, a coupling, another
    path, a weighting or a time sampler with sbcfm: each a one-line ValueError."""
    for bad in (dict(sb_sigma=0.0), dict(sb_sigma=-1.0)):
        with pytest.raises(ValueError, match="sb_sigma"):
            fs.TrainConfig(objective="sbcfm", **bad)
    with pytest.raises(ValueError, match="sb_sigma"):
        fs.TrainConfig(objective="cfm", sb_sigma=0.5)
    with pytest.raises(ValueError, match="prediction must be velocity"):
        fs.TrainConfig(objective="sbcfm", prediction="noise")
    with pytest.raises(ValueError, match="cfm and dsm only"):
        fs.TrainConfig(objective="sbcfm", coupling="ot")
    for ignored in (dict(path="vp"), dict(path_options={"sigma_min": 0.1}), dict(weighting="noise"),
                    dict(time_sampler="logit-normal")):  # fmt: skip
        with pytest.raises(ValueError, match="its own Brownian bridge"):
            fs.TrainConfig(objective="sbcfm", **ignored)
    with pytest.raises(ValueError, match="sigma"):
        SBCFM(0.0)


def test_cli_trains_an_sb_run_and_samples_it_with_sb_sde(tmp_path):
    """`flowscore train --objective sbcfm --sb-sigma 0.2` stores the objective; `flowscore sample --sampler
    sb-sde` writes finite samples; `--sampler unipc` is refused with one line."""
    path, _, _ = _gauss_file(tmp_path, 600)
    run = tmp_path / "run"
    train = [
        sys.executable, "-m", "flowscore", "train", "--data", str(path), "--objective", "sbcfm",
        "--sb-sigma", "0.2", "--steps", "20", "--batch-size", "32", "--width", "16", "--depth", "2",
        "--warmup", "2", "--out", str(run), "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    subprocess.run(train, check=True, capture_output=True, text=True)
    stored = fs.load_run(run)
    assert stored.config.sb_sigma == 0.2 and stored.objective["name"] == "sbcfm"
    out = tmp_path / "x.npy"
    sample = [sys.executable, "-m", "flowscore", "sample", "--run", str(run), "--n", "50", "--out", str(out)]
    subprocess.run([*sample, "--sampler", "sb-sde", "--no-progress"], check=True, capture_output=True)
    x = np.load(out)
    assert x.shape == (50, 2) and np.isfinite(x).all()
    bad = subprocess.run([*sample, "--sampler", "unipc", "--no-progress"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Brownian-bridge" in bad.stderr


@pytest.mark.parametrize("score", [True, False])
def test_trainer_with_an_sbcfm_objective_builds_the_heads_it_needs(tmp_path, score):
    """Trainer(objective=SBCFM(sigma, score=...)) with the built-in network: two heads with the score term,
    one without; the run reloads (without passing the objective again) with the objective's sigma, samples
    with euler, and sb-sde only with the score head."""
    path, _, _ = _gauss_file(tmp_path, 400)
    cfg = fs.TrainConfig(data=str(path), steps=5, width=16, depth=2, batch_size=32, warmup=1, device="cpu")
    fs.Trainer(cfg, tmp_path / "run", objective=SBCFM(0.4, score=score), progress=False).train()
    run = fs.load_run(tmp_path / "run")  # rebuilt from the stored objective, not the config's cfm
    assert run.model.sb_sigma == 0.4 and run.model.network.heads == (2 if score else 1)
    assert fs.sample(run.model, run.path, 8).shape == (8, 2)
    if score:
        assert fs.sample(run.model, run.path, 8, sampler="sb-sde").shape == (8, 2)
    else:
        with pytest.raises(ValueError, match="no score head"):
            fs.sample(run.model, run.path, 8, sampler="sb-sde")
