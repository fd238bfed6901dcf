"""Presets (issue 18): the sizes of an image run chosen from the data and the device, and the lines a run
prints before and after its first steps (model size, estimated time).

Ground truth: the values the issue names for the CPU preset of MNIST (width 16, batch 64; 6000 steps, which
bench/results/mnist.md measured to train in under 15 minutes here), the
vector defaults as they were before presets (literal numbers the toys' benches rely on), the UNet's own
constructor default (``inspect``), parameters counted on the built module, and tqdm's ETA format.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from flowscore import TrainConfig, Trainer, load_run
from flowscore.models import UNet
from flowscore.runlog import ESTIMATE_STEPS, duration_text
from flowscore.runs import _stored_config

SIZES = ("steps", "batch_size", "lr", "warmup", "width")


def sizes(config: TrainConfig) -> tuple:
    return tuple(getattr(config, name) for name in SIZES)


def test_mnist_defaults_follow_the_device_and_explicit_values_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fast = (6000, 64, 1e-3, 500, 16)
    assert sizes(TrainConfig(data="mnist")) == fast  # a CPU: the fast preset
    assert sizes(TrainConfig(data="mnist", preset="fast", device="cuda")) == fast
    assert sizes(TrainConfig(data="mnist", device="cuda")) == (20_000, 128, 1e-3, 500, 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sizes(TrainConfig(data="mnist")) == (20_000, 128, 1e-3, 500, 32)  # auto finds CUDA
    assert sizes(TrainConfig(data="mnist", device="cpu")) == fast
    assert sizes(TrainConfig(data="mnist", preset="large")) == (20_000, 256, 1e-3, 1000, 64)
    explicit = TrainConfig(data="mnist", preset="fast", width=32, steps=100)
    assert sizes(explicit) == (100, 64, 1e-3, 500, 32)
    assert TrainConfig.from_dict(explicit.to_dict()) == explicit
    with pytest.raises(ValueError, match="preset"):
        TrainConfig(data="mnist", preset="huge")


@pytest.mark.parametrize("preset", ["auto", "fast", "default", "large"])
def test_vector_data_keep_their_defaults_under_every_preset(preset: str) -> None:
    assert sizes(TrainConfig(data="moons", preset=preset)) == (10_000, 512, 2e-3, 500, None)
    digits = TrainConfig(data="digits", preset=preset)
    if preset != "large":  # digits: the defaults of bench/results/digits.md on every machine
        assert sizes(digits) == (6000, 128, 2e-3, 200, 32)


def test_a_run_stored_before_presets_keeps_the_model_it_was_built_with() -> None:
    old = TrainConfig(data="mnist", preset="default").to_dict()
    old.pop("preset")
    old["width"] = None  # runs before presets stored width None: the UNet's default
    config = _stored_config(old)
    assert config.width == inspect.signature(UNet).parameters["base"].default
    assert (config.steps, config.batch_size) == (20_000, 128)


def test_duration_text() -> None:
    assert [duration_text(s) for s in (42, 600, 9000)] == ["42 s", "10.0 min", "2.5 h"]


@pytest.mark.parametrize("steps", [ESTIMATE_STEPS + 4, ESTIMATE_STEPS])
def test_a_run_prints_its_model_size_and_estimated_time(tmp_path, capsys, steps: int) -> None:
    config = TrainConfig(data="digits", steps=steps, width=8, batch_size=16, loss_floor=False, threads=1)
    Trainer(config, tmp_path / "run", progress=True).train()
    err = capsys.readouterr().err.replace("\r", "\n")  # tqdm redraws its bar after a carriage return
    parameters = sum(p.numel() for p in load_run(tmp_path / "run").model.parameters())
    model = re.findall(r"^model: unet \(width 8, 1 level\), ([\d,]+) parameters; (\d+) steps of batch 16 "
                       r"\(preset (\w+)\); cpu, 1 thread$", err, re.M)  # fmt: skip
    assert model == [(f"{parameters:,}", str(steps), "fast" if not torch.cuda.is_available() else "default")]
    estimate = re.findall(r"^estimated time: \d+ s for the (\d+) steps left \(([\d.e+-]+) s per step over "
                          r"steps 2-10; checkpoints not counted\)$", err, re.M)  # fmt: skip
    if steps > ESTIMATE_STEPS:
        assert len(estimate) == 1 and estimate[0][0] == str(steps - ESTIMATE_STEPS)
        assert float(estimate[0][1]) > 0
    else:  # a run this short prints no estimate
        assert estimate == []
    assert re.search(rf"\| {steps}/{steps} \[\d\d:\d\d<\d\d:\d\d", err)  # the bar's ETA (elapsed<left)
