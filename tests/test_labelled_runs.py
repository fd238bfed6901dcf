"""Labelled data through the command line: train on an .npz with x and y, sample per class with guidance,
evaluate per class; TensorBoard logs.

Ground truth: the class centres of the data the test writes (samples of class k must sit at centre k), and
the scalars the run's own log.csv holds (TensorBoard must show the same numbers).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from conftest import run_cli

import flowscore as fs

CENTRES = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])  # three classes
STD = 0.3


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory) -> tuple[str, str]:
    """A run trained by the CLI on three labelled Gaussian blobs (an .npz with x and y)."""
    folder = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    x = CENTRES[y] + STD * rng.standard_normal((3000, 2))
    data = os.path.join(folder, "blobs.npz")
    np.savez(data, x=x.astype(np.float32), y=y)
    run_dir = os.path.join(folder, "run")
    from flowscore import cli

    code = cli.main(
        [
            "train",
            "--data",
            data,
            "--steps",
            "600",
            "--batch-size",
            "256",
            "--width",
            "64",
            "--depth",
            "3",
            "--p-uncond",
            "0.2",
            "--warmup",
            "50",
            "--out",
            run_dir,
            "--no-progress",
            "--checkpoint-every",
            "600",
            "--log-every",
            "100",
        ]
    )
    assert code == 0
    return str(folder), run_dir


def test_cli_trains_a_conditional_model_on_npz_labels(labelled_run):
    _, run_dir = labelled_run
    run = fs.load_run(run_dir)
    assert run.labelled and run.num_classes == 3 and fs.models.builtin_config(run.model)["num_classes"] == 3
    assert run.config.p_uncond == 0.2 and sum(run.class_counts) == 2700
    assert run.held_out_labels.shape == (300,)


def test_cli_samples_each_class_with_guidance(labelled_run, capsys):
    folder, run_dir = labelled_run
    for label in range(3):
        for w in ("0", "2"):
            out = os.path.join(folder, f"s{label}_{w}.npy")
            code, stdout, err = run_cli(
                capsys,
                "sample",
                "--run",
                run_dir,
                "--n",
                "400",
                "--class",
                str(label),
                "--guidance",
                w,
                "--out",
                out,
                "--no-progress",
            )
            assert code == 0, err
            x = np.load(out)
            nearest = np.argmin(((x[:, None, :] - CENTRES[None]) ** 2).sum(-1), axis=1)
            assert (nearest == label).mean() > 0.95, (label, w)
            if w == "0":
                assert np.abs(x.mean(0) - CENTRES[label]).max() < 0.3
    # guidance sharpens the class: fewer points far from its centre than without it
    far = [
        np.mean(np.linalg.norm(np.load(os.path.join(folder, f"s2_{w}.npy")) - CENTRES[2], axis=1) > 3 * STD)
        for w in ("0", "2")
    ]
    assert far[1] <= far[0] + 0.02
    # without --class: one class per sample, drawn from the training mix, written next to the samples
    out = os.path.join(folder, "mix.npy")
    code, stdout, err = run_cli(
        capsys, "sample", "--run", run_dir, "--n", "600", "--out", out, "--no-progress"
    )
    assert code == 0, err
    labels = np.load(os.path.join(folder, "mix.labels.npy"))
    assert labels.shape == (600,) and set(labels.tolist()) == {0, 1, 2}
    nearest = np.argmin(((np.load(out)[:, None, :] - CENTRES[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.95
    # the unconditional model (-1) covers every class
    code, _, err = run_cli(
        capsys,
        "sample",
        "--run",
        run_dir,
        "--n",
        "600",
        "--class",
        "-1",
        "--out",
        os.path.join(folder, "uncond.npy"),
        "--no-progress",
    )
    assert code == 0, err
    nearest = np.argmin(
        ((np.load(os.path.join(folder, "uncond.npy"))[:, None] - CENTRES[None]) ** 2).sum(-1), 1
    )
    assert all(0.2 < (nearest == k).mean() < 0.47 for k in range(3))


@pytest.mark.parametrize(
    ("flags", "match"), [(["--class", "3"], r"\[-1, 2\]"), (["--class", "x"], "integer")]
)
def test_cli_refuses_bad_classes(labelled_run, capsys, flags, match):
    folder, run_dir = labelled_run
    out = os.path.join(folder, "bad.npy")
    code, _, err = run_cli(capsys, "sample", "--run", run_dir, "--out", out, *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(match, err) and not os.path.exists(out)


def test_cli_eval_reports_each_class(labelled_run, capsys):
    import json

    folder, run_dir = labelled_run
    out = os.path.join(folder, "eval.json")
    code, stdout, err = run_cli(
        capsys, "eval", "--run", run_dir, "--n", "200", "--no-likelihood", "--json", out
    )
    assert code == 0, err
    assert "class 2" in stdout
    with open(out) as handle:
        per_class = json.load(handle)["per_class"]
    assert [c["label"] for c in per_class] == [0, 1, 2]
    run = fs.load_run(run_dir)
    for entry in per_class:
        held = run.held_out[run.held_out_labels == entry["label"]]
        assert entry["n"] == min(200, held.shape[0] // 2)
        assert entry["w2"] < 3 * entry["w2_floor"]  # class samples are as close as held-out halves, roughly


def test_unlabelled_run_takes_no_class(tmp_path, capsys):
    data = tmp_path / "xy.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(300, 2)), y=np.arange(300) % 2)
    code, _, err = run_cli(
        capsys,
        "train",
        "--data",
        str(data),
        "--no-labels",
        "--steps",
        "5",
        "--batch-size",
        "32",
        "--width",
        "16",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    )
    assert code == 0, err
    assert not fs.load_run(tmp_path / "r").labelled
    code, _, err = run_cli(
        capsys, "sample", "--run", str(tmp_path / "r"), "--class", "1", "--out", str(tmp_path / "s.npy")
    )
    assert code == 2 and "without class labels" in err


def test_bad_labels_in_npz_leave_no_run(tmp_path, capsys):
    data = tmp_path / "bad.npz"
    np.savez(data, x=np.zeros((10, 2)), y=np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, -1]))
    code, _, err = run_cli(
        capsys, "train", "--data", str(data), "--out", str(tmp_path / "r"), "--no-progress"
    )
    assert code == 2 and "0..K-1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# -- TensorBoard -------------------------------------------------------------------------------------------
def _events(folder) -> object:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_logs_the_scalars_of_log_csv_and_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    images = (np.clip(y[:, None, None, None] * 5 + rng.normal(size=(120, 1, 6, 6)), 0, 16)).astype(np.float32)
    data = tmp_path / "images.npz"
    np.savez(data, x=images, y=y)
    config = fs.TrainConfig(
        data=str(data),
        steps=12,
        batch_size=16,
        width=8,
        checkpoint_every=6,
        log_every=3,
        tensorboard=True,
        device="cpu",
        loss_floor=False,
    )
    fs.Trainer(config, tmp_path / "r", progress=False).train()
    events = _events(tmp_path / "r" / "tensorboard")
    log = fs.load_run(tmp_path / "r").log
    ema = events.Scalars("loss/ema")
    assert [e.step for e in ema] == [row["step"] for row in log] == [3, 6, 9, 12]
    for event, row in zip(ema, log, strict=True):
        assert event.value == pytest.approx(row["loss_ema"], rel=1e-5)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([row["lr"] for row in log], rel=1e-5)
    grids = events.Images("samples")
    assert [g.step for g in grids] == [6, 12] and (grids[0].width, grids[0].height) == (
        48,
        48,
    )  # 8 x 8 of 6 x 6


def test_tensorboard_floor_excess_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    base = dict(
        data="moons",
        data_n=600,
        n_holdout=60,
        batch_size=32,
        width=16,
        depth=2,
        checkpoint_every=10,
        log_every=5,
        tensorboard=True,
        device="cpu",
        lr_schedule="constant",
    )
    fs.Trainer(fs.TrainConfig(steps=10, **base), tmp_path / "r", progress=False).train()
    fs.Trainer.resume(tmp_path / "r", steps=20, progress=False).train(resume=True)
    events = _events(tmp_path / "r" / "tensorboard")
    run = fs.load_run(tmp_path / "r")
    floor = run.loss_floor["value"]
    assert [e.value for e in events.Scalars("loss/floor")] == pytest.approx([floor] * 4)
    excess = events.Scalars("loss/excess")
    assert [e.step for e in excess] == [5, 10, 15, 20]
    for event, row in zip(excess, run.log, strict=True):
        assert event.value == pytest.approx(row["loss_ema"] - floor, rel=1e-5, abs=1e-6)
    se = run.loss_floor.standard_error  # the excess with its uncertainty: a band of -+ 2 standard errors
    for name, sign in (("loss/excess_low", -1), ("loss/excess_high", 1)):
        band = [e.value for e in events.Scalars(name)]
        assert band == pytest.approx([e.value + sign * 2 * se for e in excess], rel=1e-5, abs=1e-6)
    assert [e.step for e in events.Images("samples")] == [10, 20]  # a scatter plot per checkpoint
    # logging (and its sample grids) never touches the run's random numbers: the same weights without it
    fs.Trainer(
        fs.TrainConfig(steps=20, **{**base, "tensorboard": False}), tmp_path / "plain", progress=False
    ).train()
    plain = fs.load_run(tmp_path / "plain").model.state_dict()
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, plain[name]), name


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    config = fs.TrainConfig(data="moons", data_n=200, steps=2, tensorboard=True, device="cpu")
    with pytest.raises(ValueError, match="pip install tensorboard"):
        fs.Trainer(config, tmp_path / "r", progress=False).train()
    assert not (tmp_path / "r").exists()


def test_a_run_stored_before_labels_existed_resumes_without_them(tmp_path):
    """A stored config without the label fields is a run trained before labels: it resumes unlabelled."""
    from flowscore import checkpoint
    from flowscore.runs import CHECKPOINT_FILE, RUN_FILE

    data = tmp_path / "xy.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(300, 2)), y=np.arange(300) % 2)
    base = dict(data=str(data), batch_size=32, width=16, depth=2, loss_floor=False, device="cpu")
    fs.Trainer(fs.TrainConfig(steps=5, labels=False, **base), tmp_path / "r", progress=False).train()
    new_fields = ("labels", "p_uncond", "precision", "compile", "tensorboard")
    for name in (RUN_FILE, CHECKPOINT_FILE):
        tensors, state = checkpoint.load_checkpoint(tmp_path / "r" / name)
        state["config"] = {k: v for k, v in state["config"].items() if k not in new_fields}
        state.pop("labels", None)
        if isinstance(state.get("model"), dict):
            state["model"].pop("num_classes", None)
        checkpoint.save_checkpoint(tmp_path / "r" / name, tensors, state)
    assert fs.load_run(tmp_path / "r").config.labels is False
    fs.Trainer.resume(tmp_path / "r", steps=8, progress=False).train(resume=True)
    assert fs.load_run(tmp_path / "r").step == 8 and not fs.load_run(tmp_path / "r").labelled
