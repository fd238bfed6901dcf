"""torchrun, 2 CPU processes (gloo, DDP): the same weights as one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowscore import checkpoint
from flowscore.training import CHECKPOINT_FILE, TrainConfig, Trainer, load_run

ROOT = Path(__file__).resolve().parents[1]

CONFIG = dict(
    data="moons", data_n=1200, n_holdout=200, width=32, depth=2, batch_size=64, warmup=10, steps=40,
    checkpoint_every=20, log_every=10, loss_floor=False, device="cpu",
)  # fmt: skip


def _toml(values: dict) -> str:
    def fmt(v):
        return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)

    return "".join(f"{k} = {fmt(v)}\n" for k, v in values.items())


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(_toml(CONFIG))
    ddp_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "flowscore", "train", "--config", str(config_file), "--out", str(ddp_dir), "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained ") == 1, result.stdout  # rank 0 reports, once

    Trainer(TrainConfig.from_dict(CONFIG), tmp_path / "single", progress=False).train()

    ddp, _ = checkpoint.load_checkpoint(ddp_dir / CHECKPOINT_FILE)
    single, _ = checkpoint.load_checkpoint(tmp_path / "single" / CHECKPOINT_FILE)
    for prefix in ("model", "ema"):
        a, b = checkpoint.unprefixed(prefix, ddp), checkpoint.unprefixed(prefix, single)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{prefix}.{name}")
    # one copy of the run files, written by rank 0; the logged loss is the mean over both ranks
    ddp_log, single_log = load_run(ddp_dir).log, load_run(tmp_path / "single").log
    assert [r["step"] for r in ddp_log] == [10, 20, 30, 40]
    for a, b in zip(ddp_log, single_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # the weights really moved (the comparison is not between two initialisations)
    init = load_run(ddp_dir).model
    assert not all(
        torch.equal(p, q)
        for p, q in zip(init.state_dict().values(), checkpoint.unprefixed("model", ddp).values(), strict=True)
    )


OWN_MODEL_SCRIPT = """
import sys

import torch
from torch import nn

from flowscore import TrainConfig, Trainer
from flowscore.data import labelled_toy


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 8)
        self.net = nn.Sequential(nn.Linear(11, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x, t, y):
        return self.net(torch.cat([x, t[:, None], self.embed(torch.where(y < 0, 2, y))], 1))


def build():
    torch.manual_seed(0)
    return Net()


CONFIG = dict(batch_size=64, warmup=10, steps=30, checkpoint_every=15, log_every=10, loss_floor=False,
              device="cpu", p_uncond=0.3)
DATA = labelled_toy("2gaussians", 800, seed=0)

if __name__ == "__main__":
    Trainer(TrainConfig(**CONFIG), sys.argv[1], model=build(), data=DATA, progress=False).train()
"""


@pytest.mark.slow
def test_torchrun_trains_an_own_model_on_labels_like_one_process(tmp_path):
    """Label dropout is drawn on the global batch before each rank takes its slice: two ranks match one."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "own_model.py"
    script.write_text(OWN_MODEL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
        str(tmp_path / "ddp"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = TrainConfig(**module.CONFIG)
    Trainer(config, tmp_path / "single", model=module.build(), data=module.DATA, progress=False).train()
    ddp, _ = checkpoint.load_checkpoint(tmp_path / "ddp" / CHECKPOINT_FILE)
    single, _ = checkpoint.load_checkpoint(tmp_path / "single" / CHECKPOINT_FILE)
    for prefix in ("model", "ema"):
        a, b = checkpoint.unprefixed(prefix, ddp), checkpoint.unprefixed(prefix, single)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{prefix}.{name}")
    moved = checkpoint.unprefixed("model", single)["embed.weight"]
    assert not torch.equal(moved, module.build().embed.weight.detach())
