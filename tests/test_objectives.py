"""The objective as one object (flowscore.objectives): the built-in ones against their formulas written out,
your own objective through the Trainer (resume, torchrun, sampling quality), the check of label -1 and the
floor with its standard error or the reason it is absent.

Ground truth: the formulas of CFM/DSM/FM/SM on the linear path in closed form (float64, the marginal by
brute force over the data), an uninterrupted run (resume must reproduce it bit for bit on the CPU), the
built-in cfm trained on the same network and budget, W2 between held-out halves (the floor of W2).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import flowscore as fs
from flowscore import checkpoint, losses
from flowscore.data import labelled_toy
from flowscore.objectives import CFM, DSM, FM, SM, Batch, objective_from_config, objective_from_dict
from flowscore.runs import CHECKPOINT_FILE, RUN_FILE

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(batch_size=64, lr=3e-3, warmup=5, lr_schedule="constant", checkpoint_every=15, log_every=5,
            loss_floor=False, device="cpu")  # fmt: skip


def _docstring_example() -> type:
    """``MyCFM``, the hand-written CFM on the linear path of flowscore.objectives' docstring, executed as it
    is written there (so the example a reader copies is the one tested)."""
    doc = fs.objectives.__doc__
    start = doc.index("    class MyCFM(fs.Objective):")
    code = textwrap.dedent(doc[start : doc.index("    fs.Trainer(", start)])
    namespace = {"fs": fs, "torch": torch, "__name__": __name__}
    exec(code, namespace)  # noqa: S102 (flowscore's own docstring)
    return namespace["MyCFM"]


MyCFM = _docstring_example()


class Net(nn.Module):
    """A user's network (not one of flowscore's: trained as given, without preconditioning)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], 1))


def fresh(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return Net(**kwargs)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- the built-in objectives against their formulas ----------------------------------------------------------
def _linear_fields(
    x_data: torch.Tensor, x: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact marginal velocity and score of the empirical measure of ``x_data`` on x = t x_data + (1 - t) eps,
    by brute force in float64: posterior weights softmax(-|x - t x_i|^2 / (2 (1 - t)^2))."""
    tt, s = t[:, None], (1 - t)[:, None]
    d2 = ((x[:, None, :] - tt[:, :, None] * x_data[None]) ** 2).sum(-1)  # (B, N)
    w = torch.softmax(-d2 / (2 * s**2), dim=1)
    mean = w @ x_data  # E[x_data | x]
    velocity = (mean - x) / s  # u = (E[x_data | x] - x) / (1 - t)
    score = -(x - tt * mean) / s**2
    return velocity, score


def test_builtin_objectives_are_their_formulas_on_the_linear_path():
    gen = torch.Generator().manual_seed(3)
    x_data = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(16, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    noise = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 3, generator=gen, dtype=torch.float64)

    def model(x, tt):
        return torch.cat([x, tt[:, None]], 1) @ weights.T

    x = t[:, None] * x_data + (1 - t[:, None]) * noise
    out = model(x, t)
    velocity, score = _linear_fields(x_data, x, t)
    want = {
        "cfm": ((out - (x_data - noise)) ** 2).sum(1),  # target alpha' x_data + beta' noise = x_data - noise
        "dsm": ((out + noise / (1 - t[:, None])) ** 2).sum(1),  # -noise / beta
        "fm": ((out - velocity) ** 2).sum(1),
        "sm": ((out - score) ** 2).sum(1),
    }
    marginal = fs.EmpiricalMarginal(x_data, "linear")
    objectives = {
        "cfm": CFM("linear"), "dsm": DSM("linear", prediction="velocity"), "fm": FM(marginal=marginal),
        "sm": SM(marginal=marginal, prediction="velocity"),
    }  # fmt: skip
    for name, objective in objectives.items():
        batch = objective.draw(x_data, t=t, noise=noise)
        got = objective.per_sample(model, batch)
        if name == "dsm":  # the velocity model's output converted to a score: compare in closed form
            s_model = (t[:, None] * out - x) / (1 - t[:, None])  # linear: s = (t v - x) / (1 - t)
            want[name] = ((s_model + noise / (1 - t[:, None])) ** 2).sum(1)
        if name == "sm":
            s_model = (t[:, None] * out - x) / (1 - t[:, None])
            want[name] = ((s_model - score) ** 2).sum(1)
        torch.testing.assert_close(got, want[name], rtol=1e-9, atol=1e-12, msg=name)
        # the thin functions of flowscore.losses are the same numbers
        target = marginal if name in ("fm", "sm") else "linear"
        thin = losses.objective_loss(name, model, x_data, target, t, noise, reduction="none",
                                     prediction="velocity")  # fmt: skip
        torch.testing.assert_close(thin, want[name], rtol=1e-9, atol=1e-12, msg=name)
    # weighting "noise" in velocity space on linear: t^2 (the noise-prediction error)
    noise_cfm = CFM("linear", weighting="noise")
    got = noise_cfm.per_sample(model, noise_cfm.draw(x_data, t=t, noise=noise))
    torch.testing.assert_close(got, t**2 * want["cfm"], rtol=1e-9, atol=1e-12)


def test_draw_slices_and_reproduces_the_thin_draw():
    """``Batch[part]`` slices per-sample fields, keeps references whole; the draw is losses.draw's."""
    objective = CFM("vp", reference_size=3)
    x_data = torch.randn(8, 2)
    objective.bind(torch.randn(20, 2))
    batch = objective.draw(x_data, generator=torch.Generator().manual_seed(1))
    part = batch[slice(2, 5)]
    assert torch.equal(part.t, batch.t[2:5]) and torch.equal(part.x, batch.x[2:5])
    assert torch.equal(part.reference, batch.reference) and batch.reference.shape == (3, 2)
    t, noise, x = losses.draw(x_data, "vp", generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, batch.t) and torch.equal(noise, batch.noise) and torch.equal(x, batch.x)
    assert isinstance(part, Batch)


def test_objective_from_config_and_its_dict():
    config = fs.TrainConfig(
        data="moons", objective="dsm", path="vp", prediction="noise", time_sampler="logit-normal"
    )
    objective = objective_from_config(config)
    assert isinstance(objective, DSM) and objective.prediction == "noise" and objective.weighting == "noise"
    assert objective.precondition and objective.sigma_data == config.data_std
    # your own network is used as given; flowscore's MLP is preconditioned
    assert not objective_from_config(config, model=fresh()).precondition
    back = objective_from_dict(json.loads(json.dumps(objective.to_dict())))
    assert back.to_dict() == objective.to_dict()
    with pytest.raises(ValueError, match="not a built-in"):
        objective_from_dict(MyCFM().to_dict())
    assert MyCFM().to_dict() == {
        "name": "custom",
        "class": "MyCFM",
        "prediction": "velocity",
        "two_time": False,
    }


# -- your own objective through the Trainer ------------------------------------------------------------------
def test_own_objective_trains_and_resumes_bit_identically(tmp_path):
    data = fs.data.toy("moons", 600)
    config = fs.TrainConfig(steps=30, **BASE)
    whole = tmp_path / "whole"
    fs.Trainer(config, whole, model=fresh(), data=data, objective=MyCFM(), progress=False).train()
    part = tmp_path / "part"
    fs.Trainer(fs.TrainConfig(steps=15, **BASE), part, model=fresh(), data=data, objective=MyCFM(),
               progress=False).train()  # fmt: skip
    with pytest.raises(ValueError, match="your own objective"):  # resuming needs it again
        fs.Trainer.resume(part, steps=30, model=fresh(), data=data, progress=False).train(resume=True)
    fs.Trainer.resume(part, steps=30, model=fresh(), data=data, objective=MyCFM(), progress=False).train(
        resume=True
    )
    a, _ = checkpoint.load_checkpoint(whole / CHECKPOINT_FILE)
    b, _ = checkpoint.load_checkpoint(part / CHECKPOINT_FILE)
    assert_same(a, b)
    run = fs.load_run(part, model=Net())
    assert run.objective["class"] == "MyCFM" and run.prediction == "velocity"
    assert run.loss_floor is None and run.loss_floor_absent == "not computed (loss_floor=False)"
    assert [r["step"] for r in run.log] == [5, 10, 15, 20, 25, 30]
    assert not torch.equal(run.model.net[0].weight, fresh().net[0].weight)  # it trained


def test_own_objective_samples_as_well_as_the_builtin_cfm(tmp_path):
    """Same network, data, steps and seed: MyCFM and the built-in cfm (linear, uniform t, no weighting) are
    the same loss in expectation, so their samples must be as close to held-out data. Tolerance: W2 / W2 floor
    of each within 10% of the other (the two runs differ only by their random draws; over training seeds 0-2
    of this budget the two ratios differed by at most 0.6%, at about 3.7 each), and both far below that of
    the untrained network (about 16)."""
    data = fs.data.toy("moons", 4000, seed=10)
    config = dict(BASE, steps=600, batch_size=256, lr=3e-3, log_every=100, checkpoint_every=600, threads=1)
    ratios = {}
    a, b = fs.data.toy("moons", 1000, seed=2), fs.data.toy("moons", 1000, seed=3)  # fresh draws
    floor = fs.w2(a, b)
    for name, objective in (("mine", MyCFM()), ("builtin", None)):
        run_dir = tmp_path / name
        fs.Trainer(fs.TrainConfig(**config), run_dir, model=fresh(), data=data, objective=objective,
                   progress=False).train()  # fmt: skip
        run = fs.load_run(run_dir, model=Net())
        z = fs.sample(run.model, run.path, 1000, steps=20, generator=torch.Generator().manual_seed(5))
        ratios[name] = fs.w2(run.normalizer.decode(z), a) / floor
    untrained = fs.sample(fresh(), "linear", 1000, steps=20, generator=torch.Generator().manual_seed(5))
    worst = fs.w2(fs.data.Normalizer.fit(data, std=0.5).decode(untrained), a) / floor
    assert abs(ratios["mine"] / ratios["builtin"] - 1) < 0.10, ratios
    assert max(ratios.values()) < 0.4 * worst, (ratios, worst)


DDP_SCRIPT = """
import os
import sys

import torch
from torch import nn

import flowscore as fs

SEEN = []


class MyCFM(fs.Objective):
    def loss(self, model, x_data, y=None, generator=None):
        t = torch.rand(x_data.shape[0], generator=generator)
        SEEN.append((x_data[0].tolist(), t[0].item()))
        noise = torch.randn(x_data.shape, generator=generator)
        x = t[:, None] * x_data + (1 - t[:, None]) * noise
        return (model(x, t) - (x_data - noise)).pow(2).sum(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


if __name__ == "__main__":
    torch.manual_seed(0)
    config = fs.TrainConfig(batch_size=64, warmup=5, steps=20, checkpoint_every=10, log_every=10,
                            loss_floor=False, device="cpu")
    fs.Trainer(config, sys.argv[1], model=Net(), data=fs.data.toy("moons", 800), objective=MyCFM(),
               progress=False).train()
    with open(f"{sys.argv[1]}.seen{os.environ['RANK']}", "w") as handle:
        handle.write(repr(SEEN))
"""


@pytest.mark.slow
def test_own_objective_under_torchrun_gets_each_rank_its_slice_and_generator(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "mine.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [eval((tmp_path / f"ddp.seen{r}").read_text()) for r in (0, 1)]  # noqa: S307 (our own file)
    assert len(seen[0]) == len(seen[1]) == 1 + 20  # the dry run (rank 0 and 1 each), then 20 steps
    for (x0, t0), (x1, t1) in zip(seen[0][1:], seen[1][1:], strict=True):
        assert x0 != x1 and t0 != t1  # different slices of the global batch, different generators
    import importlib.util

    spec = importlib.util.spec_from_file_location("mine", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = fs.load_run(out, model=module.Net())
    assert run.step == 20 and run.objective["class"] == "MyCFM"
    assert all(math.isfinite(r["loss"]) for r in run.log)
    x = fs.sample(run.model, run.path, 64, steps=4)
    assert x.shape == (64, 2) and torch.isfinite(x).all()


def test_objective_and_config_fields_are_not_both_given(tmp_path):
    data = fs.data.toy("moons", 300)
    with pytest.raises(ValueError, match="config.prediction have no say"):
        fs.Trainer(fs.TrainConfig(steps=2, prediction="noise", **BASE), tmp_path / "r", model=fresh(),
                   data=data, objective=MyCFM(), progress=False).train()  # fmt: skip
    with pytest.raises(ValueError, match="must be a flowscore.Objective"):
        fs.Trainer(fs.TrainConfig(steps=2, **BASE), tmp_path / "r", model=fresh(), data=data,
                   objective=lambda *a: 0, progress=False).train()  # fmt: skip

    class Scalar(MyCFM):
        def loss(self, model, x_data, y=None, generator=None):
            return super().loss(model, x_data, y, generator).mean()

    with pytest.raises(ValueError, match=r"per-sample losses shaped \(B,\) = \(2,\), got \(\)"):
        fs.Trainer(fs.TrainConfig(steps=2, **BASE), tmp_path / "r", model=fresh(), data=data,
                   objective=Scalar(), progress=False).train()  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_a_builtin_objective_instance_trains_like_the_config(tmp_path):
    """objective=CFM(path, ...) given to the Trainer is the config's own objective: the same weights."""
    data = fs.data.toy("moons", 600)
    config = fs.TrainConfig(steps=10, **BASE)
    fs.Trainer(config, tmp_path / "a", model=fresh(), data=data, progress=False).train()
    fs.Trainer(
        config, tmp_path / "b", model=fresh(), data=data, objective=CFM("linear"), progress=False
    ).train()
    a, _ = checkpoint.load_checkpoint(tmp_path / "a" / CHECKPOINT_FILE)
    b, _ = checkpoint.load_checkpoint(tmp_path / "b" / CHECKPOINT_FILE)
    assert_same(a, b)


# -- issue 17 item 5: a labelled own model must accept the label -1 ------------------------------------------
class Embedded(nn.Module):
    """A labelled model whose embedding has no "no label" row: label -1 is out of range."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(classes, 4)
        self.net = nn.Linear(2 + 1 + 4, 2)

    def forward(self, x, t, y):
        return self.net(torch.cat([x, t[:, None], self.embed(y)], 1))


def test_a_labelled_model_that_cannot_take_minus_one_is_refused_before_training(tmp_path):
    data = labelled_toy("2gaussians", 400, seed=0)
    torch.manual_seed(0)
    with pytest.raises(ValueError) as info:
        fs.Trainer(fs.TrainConfig(steps=5, **BASE), tmp_path / "r", model=Embedded(), data=data,
                   progress=False).train()  # fmt: skip
    message = str(info.value)
    assert "label -1" in message and "p_uncond=0" in message and "no label" in message
    assert "\n" not in message
    assert not (tmp_path / "r").exists()  # refused before anything was written
    # without label dropout it never sees -1, and trains
    torch.manual_seed(0)
    config = fs.TrainConfig(steps=5, p_uncond=0.0, **BASE)
    result = fs.Trainer(config, tmp_path / "r", model=Embedded(), data=data, progress=False).train()
    assert result["step"] == 5


# -- issue 17 items 6 and 7: the floor with its standard error, or why it is absent --------------------------
def test_the_floor_is_a_loss_floor_with_its_error_or_says_why_it_is_absent(tmp_path):
    tiny = dict(BASE, loss_floor=True, steps=5, log_every=5, checkpoint_every=5)
    data = fs.data.toy("moons", 400)
    result = fs.Trainer(fs.TrainConfig(**tiny), tmp_path / "plain", model=fresh(), data=data,
                        progress=False).train()  # fmt: skip
    run = fs.load_run(tmp_path / "plain", model=Net())
    assert isinstance(run.loss_floor, fs.LossFloor) and run.loss_floor_absent is None
    assert run.loss_floor["value"] == run.loss_floor.value == result["loss_floor"]  # as old code reads it
    assert result["loss_floor_standard_error"] == run.loss_floor.standard_error > 0
    # the floor of the objective trained: with its weighting and time sampler, on the encoded training data
    config = fs.TrainConfig(**tiny, weighting="noise", time_sampler="logit-normal")
    fs.Trainer(config, tmp_path / "weighted", model=fresh(), data=data, progress=False).train()
    weighted = fs.load_run(tmp_path / "weighted", model=Net())
    train = weighted.normalizer.encode(fs.data.split(data, config.n_holdout or 40, seed=0)[0])
    want = fs.loss_floor(train, "linear", "cfm", weighting="noise", time_sampler="logit-normal",
                         n_samples=weighted.loss_floor.n_samples, progress=False)  # fmt: skip
    assert weighted.loss_floor.value == pytest.approx(want.value, rel=1e-6)
    for coupling, why in (("ot", "ot coupling pairs noise and data through the whole batch"),):
        config = fs.TrainConfig(**tiny, coupling=coupling)
        out = fs.Trainer(config, tmp_path / coupling, model=fresh(), data=data, progress=False).train()
        assert out["loss_floor"] is None and why in out["loss_floor_absent"]
        assert why in fs.load_run(tmp_path / coupling, model=Net()).loss_floor_absent
    fm = fs.Trainer(fs.TrainConfig(**tiny, objective="fm"), tmp_path / "fm", model=fresh(), data=data,
                    progress=False).train()  # fmt: skip
    assert "exact marginal field" in fm["loss_floor_absent"]
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    streamed = fs.Trainer(fs.TrainConfig(**tiny), tmp_path / "loader", model=fresh(), data=loader,
                          progress=False).train()  # fmt: skip
    assert "DataLoader" in streamed["loss_floor_absent"]


def test_excess_text_reports_the_uncertainty():
    from flowscore.floor import excess_text

    assert excess_text(1.362, 1.384, 0.016, None) == (
        "loss floor 1.384 ± 0.016 (excess -0.022 ± 0.016: 0 within noise)"
    )
    assert "above" in excess_text(1.5, 1.384, 0.016, None)
    assert "BELOW" in excess_text(1.2, 1.384, 0.016, None)
    assert excess_text(1.0, None, None, "the data come from a DataLoader") == (
        "no loss floor: the data come from a DataLoader"
    )


def test_a_stored_floor_reads_back_as_a_loss_floor_old_formats_included():
    x = torch.randn(60, 2)
    y = (x[:, 0] > 0).long()
    plain = fs.loss_floor(x, "linear", n_samples=400, progress=False)
    assert fs.LossFloor.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    labelled = fs.loss_floor(x, "linear", n_samples=400, labels=y, progress=False)
    # the dict a labelled run stored before LossFloor had p_uncond: to_dict() with the mixture's value
    p = 0.1
    old = {**labelled.to_dict(), "value": labelled.label_dropout_value(p),
           "standard_error": (1 - p) * labelled.standard_error + p * labelled.unconditional.standard_error,
           "p_uncond": p}  # fmt: skip
    back = fs.LossFloor.from_dict(old)
    assert back == labelled.label_dropout(p)
    assert back.value == pytest.approx((1 - p) * labelled.value + p * labelled.unconditional.value)
    for bad in ({"value": "x"}, {"value": 1.0}, [], {**plain.to_dict(), "unconditional": old}):
        with pytest.raises(ValueError):
            fs.LossFloor.from_dict(bad)


def test_an_old_run_without_an_objective_loads_as_trained(tmp_path):
    """A run stored before objectives were stored (no "objective" key, its floor a dict) loads as before."""
    run_dir = tmp_path / "r"
    config = fs.TrainConfig(
        data="moons", data_n=300, steps=5, width=16, depth=1, **dict(BASE, loss_floor=True)
    )
    fs.Trainer(config, run_dir, progress=False).train()
    tensors, state = checkpoint.load_checkpoint(run_dir / RUN_FILE)
    state.pop("objective")
    state.pop("loss_floor_absent", None)
    checkpoint.save_checkpoint(run_dir / RUN_FILE, tensors, state)
    run = fs.load_run(run_dir)
    assert isinstance(run.model, fs.Preconditioned) and run.objective is None
    assert isinstance(run.loss_floor, fs.LossFloor) and run.loss_floor.value == state["loss_floor"]["value"]
