"""Flow-map runs end to end: a labelled run with guidance trained into the target sampled by class, `eval` at
1, 2 and 4 calls, `plot` with the map's error over the (t, s) triangle, exact resume, torchrun.

Ground truth: the classes of a labelled toy (nearest component centre, from the data), an independent exact
W2 (scipy's assignment on equal-size sets), a closed-form flow map (one data point: X(x, t, s) is affine in
x) and a zero model (relative error exactly 1), an uninterrupted reference run (bit-identical weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import is_png, run_cli

import flowscore as fs
from flowscore import checkpoint, flowmap_runs
from flowscore.data import labelled_toy
from flowscore.training import CHECKPOINT_FILE
from flowscore.workflows import EVAL_KEYS

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(data="moons", data_n=1000, n_holdout=200, width=32, depth=2, batch_size=64, warmup=5,
            checkpoint_every=20, log_every=10, loss_floor=False, objective="meanflow")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fm") / "run"
    fs.Trainer(fs.TrainConfig(steps=40, **TINY), run_dir, progress=False).train()
    return run_dir


def test_labelled_run_with_guidance_in_the_target_samples_each_class(tmp_path, capsys):
    """MeanFlow(guidance=2) on 8gaussians with its components as classes (label dropout 0.1): the run loads
    with its own objective (guidance kept, the two-time wrapper), `flowscore sample --class k
    --sampler-steps 1` puts the samples on component k, and --guidance works on a flow-map run."""
    x, y = labelled_toy("8gaussians", 4000, seed=0)
    config = fs.TrainConfig(steps=400, batch_size=256, lr=3e-3, warmup=50, width=64, depth=2,
                            loss_floor=False, checkpoint_every=400)  # fmt: skip
    objective = fs.MeanFlow("linear", guidance=2.0, sigma_data=config.data_std)
    run_dir = tmp_path / "run"
    fs.Trainer(config, run_dir, data=(x, y), objective=objective, progress=False).train()
    run = fs.load_run(run_dir)
    assert isinstance(run.model, fs.PreconditionedFlowMap) and run.labelled and run.num_classes == 8
    assert run.objective["name"] == "meanflow" and run.objective["guidance"] == 2.0
    centres = torch.stack([x[y == k].mean(0) for k in range(8)])
    shares = []
    for k in range(8):
        out = tmp_path / f"s{k}.npy"
        code, _, err = run_cli(capsys, "sample", "--run", str(run_dir), "--class", str(k), "--sampler-steps",
                               "1", "--n", "200", "--out", str(out), "--no-progress")  # fmt: skip
        assert code == 0, err
        samples = torch.from_numpy(np.load(out))
        shares.append(float((torch.cdist(samples, centres).argmin(1) == k).float().mean()))
    assert np.mean(shares) >= 0.9 and min(shares) >= 0.7, shares
    out = tmp_path / "g.npy"
    code, text, err = run_cli(capsys, "sample", "--run", str(run_dir), "--class", "3", "--guidance", "1",
                              "--sampler-steps", "2", "--n", "50", "--out", str(out),
                              "--no-progress")  # fmt: skip
    assert code == 0 and "2 flow-map jump(s), class 3, guidance 1" in text, err
    assert np.isfinite(np.load(out)).all()


def test_eval_reports_quality_at_1_2_and_4_calls(tiny_run, tmp_path, capsys):
    """`flowscore eval` on a flow-map run: the usual keys, then calls and w2/w2_ratio/mmd2 per call count;
    --n bounds the sets; a progress line per phase; w2_1call is the exact W2 between the samples of
    `flowscore sample --sampler-steps 1` (same seed) and the first half of the held-out data."""
    from scipy.optimize import linear_sum_assignment

    out = tmp_path / "e.json"
    code, text, err = run_cli(capsys, "eval", "--run", str(tiny_run), "--n", "60", "--json", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert tuple(result)[: len(EVAL_KEYS)] == EVAL_KEYS and result["calls"] == [1, 2, 4]
    assert result["n"] == 60 and result["ode_sampler"] == "jumps" and result["w2_ode"] is None
    for k in (1, 2, 4):
        assert result[f"w2_ratio_{k}call"] == pytest.approx(result[f"w2_{k}call"] / result["w2_floor"])
    assert "flow map, 4 calls" in text and "K calls = K jumps" in text
    assert "1 flow-map jump(s)" in err and "4 flow-map jump(s)" in err and "W2 and MMD^2" in err
    samples = tmp_path / "s.npy"
    code, _, _ = run_cli(capsys, "sample", "--run", str(tiny_run), "--sampler-steps", "1", "--n", "60",
                         "--out", str(samples), "--no-progress")  # fmt: skip
    x = np.load(samples).astype(np.float64)
    held = fs.load_run(tiny_run).held_out.double().numpy()[:60]
    cost = ((x[:, None] - held[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    assert result["w2_1call"] == pytest.approx(np.sqrt(cost[rows, cols].mean()), rel=1e-4)


class OnePointMap(torch.nn.Module):
    """The exact average velocity of the linear path's marginal of one data point ``c``: the flow is
    X(x, t, s) = s c + (1 - s) / (1 - t) (x - t c), affine in x."""

    two_time = True

    def __init__(self, c: torch.Tensor, zero: bool = False):
        super().__init__()
        self.c, self.zero = c, zero
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, s, y=None):
        if self.zero:
            return torch.zeros_like(x)
        t, s = t[:, None], s[:, None]
        end = s * self.c + (1 - s) / (1 - t) * (x - t * self.c)
        return (end - x) / (s - t)


def test_map_error_grid_against_closed_forms():
    c = torch.tensor([[0.7, -0.4]], dtype=torch.float64)
    path = fs.get_path("linear")
    exact = flowmap_runs.map_error_grid(OnePointMap(c[0]).double(), path, c, grid=2, n=16)
    zero = flowmap_runs.map_error_grid(OnePointMap(c[0], zero=True).double(), path, c, grid=2, n=16)
    upper = np.triu(np.ones((2, 2), dtype=bool))
    assert np.isnan(exact[~upper]).all() and np.isfinite(exact[upper]).all()
    assert exact[upper].max() < 1e-4  # the one-point model is the exact map
    assert np.allclose(zero[upper], 1.0)  # X_model = x: the error is the whole displacement


def test_plot_writes_samples_per_call_count_and_the_triangle(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(flowmap_runs, "MAP_POINTS", 200)  # a small exact map: this only checks the figures
    out = tmp_path / "plots"
    code, text, err = run_cli(capsys, "plot", "--run", str(tiny_run), "--out", str(out), "--n", "200",
                              "--no-progress")  # fmt: skip
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["flowmap_error.png", "loss.png", "samples.png"]
    assert all(is_png(str(out / name)) for name in os.listdir(out))


def test_meanflow_resume_is_bit_identical(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    constant = dict(TINY, lr_schedule="constant")  # the same rates whether or not the run stops at 15
    fs.Trainer(fs.TrainConfig(steps=30, **constant), whole, progress=False).train()
    fs.Trainer(fs.TrainConfig(steps=15, **constant), part, progress=False).train()
    fs.Trainer.resume(part, steps=30, progress=False).train(resume=True)
    a, _ = checkpoint.load_checkpoint(whole / CHECKPOINT_FILE)
    b, _ = checkpoint.load_checkpoint(part / CHECKPOINT_FILE)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_semigroup_defaults_on_vectors_and_resume_with_references(tmp_path):
    """Semigroup (and lagrangian) on named vector data default to lr 4e-3 and 256 reference points (stored as
    numbers); meanflow, cfm and data handed to the Trainer keep the plain defaults; explicit values win. A run
    on fewer training points than 256 uses them all, and resumes bit-identically (the reference draws are
    part of the generator's stream)."""
    config = fs.TrainConfig(data="moons", objective="semigroup")
    assert (config.lr, config.reference_size) == (4e-3, 256)
    lagrangian = fs.TrainConfig(data="moons", objective="lagrangian")
    assert (lagrangian.lr, lagrangian.reference_size) == (4e-3, 256)
    assert config.to_dict()["reference_size"] == 256
    others = (dict(objective="meanflow"), dict(objective="cfm"), dict(data="digits", objective="semigroup"))
    for other in others:
        assert fs.TrainConfig(**{"data": "moons", **other}).reference_size == 0
    assert fs.TrainConfig(data="moons", objective="meanflow").lr == 2e-3
    assert fs.TrainConfig(objective="semigroup").reference_size == 0  # data given to the Trainer
    assert fs.TrainConfig(data="moons", objective="semigroup", lr=1e-3, reference_size=0).lr == 1e-3
    small = dict(TINY, objective="semigroup", data_n=300, n_holdout=100, lr_schedule="constant")  # 200 < 256
    whole, part = tmp_path / "whole", tmp_path / "part"
    fs.Trainer(fs.TrainConfig(steps=30, **small), whole, progress=False).train()
    fs.Trainer(fs.TrainConfig(steps=15, **small), part, progress=False).train()
    fs.Trainer.resume(part, steps=30, progress=False).train(resume=True)
    run = fs.load_run(whole)
    assert run.config.reference_size == 256 and run.objective["reference_size"] == 256
    a, _ = checkpoint.load_checkpoint(whole / CHECKPOINT_FILE)
    b, _ = checkpoint.load_checkpoint(part / CHECKPOINT_FILE)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_torchrun_two_processes_train_a_flow_map(tmp_path):
    """torchrun with 2 CPU processes and --objective meanflow: the JVP inside DDP's forward is not supported,
    so the gradients are averaged by hand; the run trains, reports once and samples."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if not isinstance(v, bool)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "flowscore", "train", *flags, "--steps=40", "--no-loss-floor", "--out", str(tmp_path / "ddp"),
        "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained ") == 1, result.stdout
    run = fs.load_run(tmp_path / "ddp")
    assert run.model.two_time and [r["step"] for r in run.log] == [10, 20, 30, 40]
    x = fs.sample(run.model, run.path, 100, steps=2, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(x).all())
