"""`flowscore verify`: the CLI entry points, the JSON keys, the plot, atomic writes, bad input."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from flowscore.verify import JSON_KEYS, add_arguments, load_data, main, run_verify, write_json

SMALL = ["--n-batches", "8", "--batch-size", "256", "--n-data", "200", "--no-progress"]


def parse(argv: list[str]) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_main_writes_json_with_exact_keys_and_a_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "sub" / "v.json", tmp_path / "v.png"
    rc = main(
        parse(["--data", "moons", "--path", "vp", "--json", str(out_json), "--plot", str(out_png), *SMALL])
    )
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert tuple(result) == JSON_KEYS
    assert result["objective"] == "flow" and result["path"] == "vp" and result["n_samples"] == 8 * 256
    assert result["grad_relative_difference"] <= 3 * result["grad_relative_standard_error"]
    assert abs(result["loss_gap"] - result["loss_floor"]) < 4 * (
        result["loss_floor_standard_error"] + 0.1 * result["loss_floor"]
    )
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "loss floor C" in table and "grad" in table
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "v.json", "v.png"]  # no temporary files


def test_score_objective_on_an_npy_file(tmp_path):
    points = np.random.default_rng(0).normal(size=(150, 3)).astype(np.float32)
    np.save(tmp_path / "d.npy", points)
    result = run_verify(
        str(tmp_path / "d.npy"), "linear", "score", n_batches=6, batch_size=256, progress=False
    )
    assert result["dim"] == 3 and result["n_data"] == 150 and result["t_eps"] == 0.05
    assert result["grad_relative_difference"] <= 3 * result["grad_relative_standard_error"]
    assert len(result["running"]["n_samples"]) == 6
    assert result["running"]["grad_relative_difference"][-1] == pytest.approx(
        result["grad_relative_difference"]
    )


def test_run_verify_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = run_verify("8gaussians", n_data=100, n_batches=3, batch_size=64, progress=False)
    assert torch.equal(torch.rand(1), before)
    b = run_verify("8gaussians", n_data=100, n_batches=3, batch_size=64, progress=False)
    assert a["grad_relative_difference"] == b["grad_relative_difference"]
    assert a["loss_floor"] == b["loss_floor"]


def test_bad_data_returns_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(parse(["--data", "nosuchtoy", "--json", str(out), *SMALL])) == 2
    assert "data" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((4, 2, 2)))
    assert main(parse(["--data", str(tmp_path / "bad.npy"), "--json", str(out), *SMALL])) == 2
    assert main(parse(["--path", "nosuchpath", "--json", str(out), *SMALL])) == 2
    assert not out.exists()


def test_load_data_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_data(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="NaN"):
        load_data(str(tmp_path / "nan.npy"))
    assert load_data("moons", 10).shape == (10, 2)


def test_write_json_failure_leaves_no_half_written_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text('{"old": true}')
    with pytest.raises(KeyError):
        write_json({"objective": "flow"}, target)  # missing keys: fails mid-way
    assert json.loads(target.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["r.json"]
