"""Trainer: exact resume after SIGKILL, determinism, EMA and LR maths, checkpoints, logs, input checks."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flowscore import TrainConfig, Trainer, checkpoint, load_run
from flowscore.runs import CHECKPOINT_FILE, CONFIG_FILE, LOCK_FILE, LOG_FIELDS, LOG_FILE, RUN_FILE
from flowscore.training import ema_decay_at, ema_update, learning_rate

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    data="moons", data_n=1200, n_holdout=200, width=32, depth=2, batch_size=64, warmup=20,
    checkpoint_every=50, log_every=25, loss_floor=False, device="cpu",
)  # fmt: skip


def tiny(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "steps": 150, **changes})


def weights(run_dir: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint.load_checkpoint(run_dir / CHECKPOINT_FILE)
    return checkpoint.unprefixed(prefix, tensors)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- exact resume ----------------------------------------------------------------------------------------
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    steps = 300
    config = tiny(steps=steps, checkpoint_every=50)
    killed = tmp_path / "killed"
    script = (  # each checkpoint is followed by a pause, so that the kill lands mid-run
        "import sys, json, time, torch; torch.set_num_threads(1)\n"
        "from flowscore import checkpoint, training\n"
        "save = checkpoint.save_checkpoint\n"
        "def slow_save(*args):\n    save(*args); time.sleep(0.5)\n"
        "checkpoint.save_checkpoint = slow_save\n"
        "config = training.TrainConfig.from_dict(json.loads(sys.argv[1]))\n"
        "training.Trainer(config, sys.argv[2], progress=False).train()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(config.to_dict()), str(killed)], env=env
    )
    try:
        deadline = time.monotonic() + 60
        while not (killed / CHECKPOINT_FILE).exists():
            assert proc.poll() is None, "training subprocess died before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    step_at_kill = load_run(killed).step
    assert 0 < step_at_kill < steps, "the run must be interrupted mid-way for this test to mean anything"
    assert proc.returncode == -signal.SIGKILL

    Trainer(config, killed, progress=False).train(resume=True)
    reference = tmp_path / "reference"
    Trainer(config, reference, progress=False).train()

    assert_same(weights(killed), weights(reference))
    assert_same(weights(killed, "ema"), weights(reference, "ema"))
    log_killed, log_ref = load_run(killed).log, load_run(reference).log
    assert [r["step"] for r in log_killed] == list(range(25, steps + 1, 25))
    for a, b in zip(log_killed, log_ref, strict=True):  # loss columns agree; steps_per_s is timing
        assert (a["step"], a["loss"], a["loss_ema"], a["lr"]) == (
            b["step"],
            b["loss"],
            b["loss_ema"],
            b["lr"],
        )


def test_resume_in_process_and_extending_steps(tmp_path):
    full = tmp_path / "full"
    Trainer(tiny(steps=150), full, progress=False).train()
    part = tmp_path / "part"
    Trainer(tiny(steps=100), part, progress=False).train()
    assert load_run(part).step == 100
    Trainer.resume(part, steps=150, progress=False).train(resume=True)
    # the finished 100-step cosine is not recomputed for 150 steps (learning_rate: a new cycle starts)
    late = lambda run: [(r["step"], r["lr"]) for r in load_run(run).log if r["step"] > 100]  # noqa: E731
    assert late(part) != late(full) and len(late(full)) > 0
    assert not torch.equal(weights(full)["net.0.weight"], weights(part)["net.0.weight"])
    # so only a constant schedule continues identically
    full_c, part_c = tmp_path / "full_c", tmp_path / "part_c"
    Trainer(tiny(steps=150, lr_schedule="constant"), full_c, progress=False).train()
    Trainer(tiny(steps=100, lr_schedule="constant"), part_c, progress=False).train()
    Trainer.resume(part_c, steps=150, progress=False).train(resume=True)
    assert_same(weights(full_c), weights(part_c))
    assert load_run(part).step == 150


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    Trainer(tiny(steps=60), tmp_path / "a", progress=False).train()
    Trainer(tiny(steps=60), tmp_path / "b", progress=False).train()
    Trainer(tiny(steps=60, seed=1), tmp_path / "c", progress=False).train()
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert_same(a, b)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_changed_config(tmp_path):
    Trainer(tiny(steps=50), tmp_path / "r", progress=False).train()
    with pytest.raises(ValueError, match="lr"):
        Trainer(tiny(steps=50, lr=1e-4), tmp_path / "r", progress=False).train(resume=True)


# -- maths of the optimiser loop --------------------------------------------------------------------------
def test_warmup_and_cosine_learning_rate_values():
    config = tiny(steps=120, lr=0.01, warmup=20)
    assert learning_rate(config, 0) == pytest.approx(0.01 / 20)
    assert learning_rate(config, 9) == pytest.approx(0.01 * 10 / 20)
    assert learning_rate(config, 19) == pytest.approx(0.01)
    assert learning_rate(config, 20) == pytest.approx(0.01)
    assert learning_rate(config, 70) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert learning_rate(config, 120) == pytest.approx(0.0, abs=1e-15)
    constant = tiny(steps=120, lr=0.01, warmup=20, lr_schedule="constant")
    assert [learning_rate(constant, k) for k in (5, 50, 119)] == pytest.approx([0.003, 0.01, 0.01])


def _cosine(lr: float, k: float, span: float) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * min(k / span, 1.0)))


def test_extending_a_finished_run_starts_a_new_cycle_without_a_jump(tmp_path, capsys):
    """Resumed to a new total, the LR of every update (logged at each step) follows the documented new
    cycle: warm-up from the final rate (~0) to lr over `warmup` steps, then a cosine to 0 at the new
    total; before the fix it jumped from ~0 to the 150-step cosine's lr/2 (issue 17, item 4)."""
    lr, warmup, run = 0.01, 20, tmp_path / "r"
    Trainer(
        tiny(steps=60, lr=lr, warmup=warmup, log_every=1, checkpoint_every=60), run, progress=False
    ).train()
    capsys.readouterr()
    Trainer.resume(run, steps=150, progress=False).train(resume=True)
    note = capsys.readouterr().out
    assert "new total of 150" in note and "new cosine cycle" in note and note.count("\n") == 1
    logged = {r["step"]: r["lr"] for r in load_run(run).log}  # the LR of update `step` (1-based)
    assert sorted(logged) == list(range(1, 151))
    expected = {
        s: lr * s / warmup if s <= warmup else _cosine(lr, s - 1 - warmup, 60 - warmup) for s in range(1, 61)
    }
    final = _cosine(lr, 60 - warmup, 60 - warmup)  # the rate the run had reached: 0
    for k in range(90):  # update 61 + k
        expected[61 + k] = (
            final + (lr - final) * (k + 1) / warmup if k < warmup else _cosine(lr, k - warmup, 70)
        )
    for s in range(1, 151):
        assert logged[s] == pytest.approx(expected[s], rel=1e-5, abs=1e-12), s
    steps = [logged[s + 1] - logged[s] for s in range(1, 150)]
    assert max(abs(d) for d in steps) <= lr / warmup * 1.001  # no jump: at most one warm-up increment


def test_resuming_an_unfinished_run_to_a_new_total_refits_its_cosine():
    """A run stopped at update 40 of 100 and resumed to 160: the cosine continues from the rate it had
    and reaches 0 at 160, through the same closed form as the run's own schedule."""
    from flowscore.training import resumed_schedule

    lr, warmup = 0.01, 20
    old, new = tiny(steps=100, lr=lr, warmup=warmup), tiny(steps=160, lr=lr, warmup=warmup)
    resumed, note = resumed_schedule(new, 100, 40)
    rate = _cosine(lr, 40 - warmup, 100 - warmup)
    assert resumed == {"step": 40, "lr": pytest.approx(rate), "restart": False} and "re-fitted" in note
    sequence = [learning_rate(old, k) for k in range(40)] + [
        learning_rate(new, k, resumed) for k in range(40, 160)
    ]
    for k in range(40, 160):
        assert sequence[k] == pytest.approx(_cosine(rate, k - 40, 120), rel=1e-12, abs=1e-15)
    assert sequence[40] == pytest.approx(learning_rate(old, 40), rel=1e-12)  # continuous at the resume
    slope = lr * math.pi / 2 / (100 - warmup)  # the steepest step of the original cosine
    jumps = [abs(b - a) for a, b in zip(sequence[warmup:-1], sequence[warmup + 1 :], strict=True)]
    assert max(jumps) <= slope * 1.001
    # resumed again to another total (at 100 of 160): continues from the rate of the first continuation
    again, _ = resumed_schedule(tiny(steps=200, lr=lr, warmup=warmup), 160, 100, resumed)
    assert again["lr"] == pytest.approx(_cosine(rate, 60, 120)) and again["restart"] is False
    # nothing changes for the same total, a constant schedule, or within the warm-up
    assert resumed_schedule(old, 100, 40) == (None, None)
    assert resumed_schedule(tiny(steps=160, lr_schedule="constant"), 100, 40) == (None, None)
    assert resumed_schedule(new, 100, 10) == (None, None)


def test_logged_lr_matches_schedule(tmp_path):
    config = tiny(steps=100, warmup=40, log_every=10)
    Trainer(config, tmp_path / "r", progress=False).train()
    log = load_run(tmp_path / "r").log
    for row in log:  # the LR of the last update before the row
        expected = config.lr * min(1.0, row["step"] / 40) if row["step"] <= 40 else None
        if expected is not None:
            assert row["lr"] == pytest.approx(expected, rel=1e-5)
    assert log[-1]["lr"] == pytest.approx(learning_rate(config, 99), rel=1e-5)


def test_ema_update_matches_float64_recurrence():
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    reference = [p.detach().double().clone() for p in ema.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = ema_decay_at(0.9, step)
        assert decay == min(0.9, (1 + step) / (10 + step))
        ema_update(ema, model, decay)
        reference = [
            decay * r + (1 - decay) * p.detach().double()
            for r, p in zip(reference, model.parameters(), strict=True)
        ]
    for e, r in zip(ema.parameters(), reference, strict=True):
        torch.testing.assert_close(e.double(), r, rtol=1e-5, atol=1e-6)


def test_trained_ema_is_the_average_of_model_weights(tmp_path, monkeypatch):
    """A checkpoint after every step records the model's weights; the final EMA must be the float64 EMA
    recurrence over them (started from the EMA of the first checkpoint)."""
    config = tiny(steps=30, ema_decay=0.8, checkpoint_every=1)
    saved: list[dict[str, torch.Tensor]] = []
    save = checkpoint.save_checkpoint

    def recording_save(file, tensors, state):
        if Path(file).name == CHECKPOINT_FILE:
            saved.append({k: v.detach().double().clone() for k, v in tensors.items()})
        save(file, tensors, state)

    monkeypatch.setattr(checkpoint, "save_checkpoint", recording_save)
    Trainer(config, tmp_path / "r", progress=False).train()
    assert len(saved) == config.steps
    names = [k[len("model.") :] for k in saved[0] if k.startswith("model.")]
    ema = {name: saved[0]["ema." + name] for name in names}
    for step in range(1, config.steps):
        d = min(0.8, (1 + step) / (10 + step))
        ema = {name: d * ema[name] + (1 - d) * saved[step]["model." + name] for name in names}
    stored = weights(tmp_path / "r", "ema")
    assert_same(weights(tmp_path / "r"), {k[len("model.") :]: v.float() for k, v in saved[-1].items()
                                          if k.startswith("model.")})  # fmt: skip
    for name in names:
        torch.testing.assert_close(stored[name].double(), ema[name], rtol=1e-5, atol=1e-6)
    # the weights moved: the recurrence is not a comparison of constants
    assert not torch.equal(saved[0]["model." + names[0]], saved[-1]["model." + names[0]])


# -- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_atomic_files(tmp_path):
    file = tmp_path / "c.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.uint8), "c": torch.tensor(2.5)}
    state = {"step": 7, "nested": {"x": [1, 2.5, None]}, "s": "é"}
    checkpoint.save_checkpoint(file, tensors, state)
    checkpoint.save_checkpoint(file, tensors, state)  # overwrite in place
    loaded, loaded_state = checkpoint.load_checkpoint(file)
    assert loaded_state == state
    assert_same(loaded, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # no temporary left


def test_optimizer_state_survives_flattening():
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    flat, meta = checkpoint.optimizer_to_flat(opt.state_dict())
    json.dumps(meta)
    clone = torch.optim.AdamW(nn.Linear(4, 3).parameters(), lr=0.5)
    clone.load_state_dict(checkpoint.optimizer_from_flat(flat, meta))
    for p_state, q_state in zip(opt.state.values(), clone.state.values(), strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(p_state[key], q_state[key])
    assert clone.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_or_missing_checkpoint_raises_value_error(tmp_path, damage):
    file = tmp_path / "c.safetensors"
    checkpoint.save_checkpoint(file, {"a": torch.randn(100)}, {"step": 1})
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[:-50])
    elif damage == "garbage":
        file.write_bytes(b"\x00" * 64)
    else:
        file.unlink()
    with pytest.raises(ValueError, match="checkpoint"):
        checkpoint.load_checkpoint(file)


# -- the run directory -----------------------------------------------------------------------------------
def test_load_run_contents_and_loss_floor(tmp_path):
    config = tiny(steps=50, loss_floor=True, data_n=600, n_holdout=100)
    Trainer(config, tmp_path / "r", progress=False).train()
    run = load_run(tmp_path / "r")
    assert run.step == 50 and run.config == config and run.prediction == "velocity"
    assert run.data_shape == (2,) and run.held_out.shape == (100, 2)
    assert run.path.config() == {"name": "linear"}
    assert not run.model.training
    # held-out points are data-space moons points not in the training set, and the normalizer is the
    # mean/std of the other 500, scaled to data_std (float64 recomputation)
    from flowscore.data import load, split

    train, held_out = split(load("moons", n=600, seed=0), 100, seed=0)
    assert torch.equal(run.held_out, held_out)
    t64 = train.double()
    torch.testing.assert_close(run.normalizer.shift.double(), t64.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        run.normalizer.scale.double(), t64.std(0, unbiased=False) / config.data_std, rtol=1e-6, atol=1e-7
    )
    floor = run.loss_floor
    assert floor is not None and floor["value"] > 0
    assert [r["loss_floor"] for r in run.log] == [pytest.approx(floor["value"], rel=1e-5)] * len(run.log)
    with open(tmp_path / "r" / "log.csv") as handle:
        assert tuple(next(csv.reader(handle))) == LOG_FIELDS


def test_fm_objective_trains(tmp_path):
    Trainer(tiny(steps=30, objective="fm", data_n=400, n_holdout=50), tmp_path / "r", progress=False).train()
    log = load_run(tmp_path / "r").log
    assert all(np.isfinite(r["loss"]) for r in log) and log[-1]["loss_floor"] is None


def test_bad_inputs_leave_nothing_behind(tmp_path):
    run_dir = tmp_path / "run"
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((10, 2), np.nan))
    for kwargs, match in [
        ({"data": str(bad)}, "NaN"),
        ({"data": str(tmp_path / "nope.npy")}, "no such file"),
        ({"data": "moons", "n_holdout": 5000}, "n_holdout"),
        ({"data": "moons", "model": "unet"}, "image"),
        *([({"data": "moons", "device": "cuda"}, "CUDA")] if not torch.cuda.is_available() else []),
    ]:
        with pytest.raises(ValueError, match=match):
            Trainer(TrainConfig.from_dict({**TINY, **kwargs, "steps": 5}), run_dir, progress=False).train()
        assert not run_dir.exists()
    run_dir.mkdir()
    (run_dir / "something").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        Trainer(tiny(steps=5), run_dir, progress=False).train()


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"data": "moons", "stepz": 3}, "stepz"),
        ({"data": "moons", "lr": -1.0}, "lr"),
        ({"data": "moons", "steps": 0}, "steps"),
        ({"data": "moons", "objective": "xx"}, "objective"),
        ({"data": "moons", "ema_decay": 1.0}, "ema_decay"),
        ({"data": "moons", "path": "ve", "path_options": {"sigma_min": -1}}, "sigma_min"),
        ({"data": 3}, "data"),
    ],
)
def test_config_validation(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_config_from_toml_and_to_dict(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('data = "8gaussians"\nsteps = 12\nlr = 1\n[path_options]\n')
    config = TrainConfig.from_toml(file)
    assert (config.data, config.steps, config.lr, config.path_options) == ("8gaussians", 12, 1, {})
    assert TrainConfig.from_dict(config.to_dict()) == config
    (tmp_path / "d.toml").write_text('[train]\ndata = "moons"\nbogus = 1\n')
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_toml(tmp_path / "d.toml")


def test_run_files_exist(tmp_path):
    Trainer(tiny(steps=10), tmp_path / "r", progress=False).train()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(
        [RUN_FILE, CHECKPOINT_FILE, LOG_FILE, CONFIG_FILE, LOCK_FILE]
    )


def test_every_config_field_has_help_and_a_cli_type():
    from flowscore import config

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(config.FIELD_HELP) == sorted(fields)
    assert all(config.FIELD_HELP[name].strip() for name in fields)
    assert set(config.field_types()) == set(fields)
    assert all(base in (int, float, str, bool, dict) for base, _ in config.field_types().values())
