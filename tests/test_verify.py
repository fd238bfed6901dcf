"""`flowscore verify`: the verdict, the statistics, the CLI contract (flags, JSON keys, plot), bad input."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import is_png, run_cli

import flowscore.verify as verify
from flowscore.config import DATA_STD
from flowscore.verify import (
    JSON_KEYS,
    GradientStatistics,
    TimeDesign,
    add_arguments,
    load_points,
    main,
    run_verify,
    write_json,
)

SMALL = ["--max-samples", "4096", "--batch-size", "512", "--n-data", "200", "--no-progress"]


def parse(argv: list[str]) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"bare {name} in the JSON")

    return json.loads(text, parse_constant=refuse)


# -- the statistics, against numpy ---------------------------------------------------------------------------
def test_gradient_statistics_match_a_numpy_batch_computation():
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.3, 2.0, size=(40, 7))
    grads = rng.normal(1.0, 0.5, size=(40, 7))
    gaps = rng.normal(5.0, 1.0, size=(40, 16))
    stats = GradientStatistics(7, batch_size=16)
    for d, g, u in zip(diffs, grads, gaps, strict=True):
        stats.add(torch.from_numpy(d).float(), torch.from_numpy(g).float(), torch.from_numpy(u).float())
    scale = np.linalg.norm(grads.mean(0))
    expected_rel = np.linalg.norm(diffs.mean(0)) / scale
    expected_se = math.sqrt(diffs.var(0, ddof=1).sum() / 40) / scale
    s = stats.summary()
    assert s["grad_relative_difference"] == pytest.approx(expected_rel, rel=1e-5)
    assert s["grad_relative_standard_error"] == pytest.approx(expected_se, rel=1e-5)
    assert s["loss_gap"] == pytest.approx(gaps.mean(), rel=1e-6)
    assert s["loss_gap_standard_error"] == pytest.approx(gaps.std(ddof=1) / math.sqrt(gaps.size), rel=1e-5)
    n, rel, se = zip(*stats.history, strict=True)
    assert n[-1] == 40 * 16 and n[0] == 16 and math.isnan(rel[0])  # one batch: no standard error yet
    k = 10
    assert rel[k - 1] == pytest.approx(np.linalg.norm(diffs[:k].mean(0)) / np.linalg.norm(grads[:k].mean(0)))


@pytest.mark.parametrize(
    ("rel", "se", "expected"),
    [
        (0.004, 0.004, ("equal", 0.016)),  # consistent with 0 and resolved: bound = rel + 3 se
        (0.05, 0.01, ("differ", 0.08)),  # 5 standard errors
        (0.02, 0.01, ("inconclusive", 0.05)),  # consistent with 0, standard error above the target
        (0.0, 0.0, ("equal", 0.0)),  # a one-point data set
    ],
)
def test_verdict(rel, se, expected):
    name, bound = verify.verdict(rel, se, target_se=0.005)
    assert name == expected[0] and bound == pytest.approx(expected[1])
    assert verify.verdict(math.nan, math.nan, 0.005)[0] == "inconclusive"


def test_importance_weights_give_the_uniform_time_average():
    # E_uniform[t^2] on [0.1, 0.9] = (0.9^3 - 0.1^3) / (3 * 0.8), from weighted draws of a skewed design
    design = TimeDesign.uniform(0.1, n_bins=8).adapted(torch.linspace(1, 30, 8, dtype=torch.float64))
    assert design.probs.sum().item() == pytest.approx(1.0)
    assert design.probs.min().item() >= verify.DEFENSIVE / 8 - 1e-12
    t, weight, which = design.sample(400_000, torch.Generator().manual_seed(0), torch.float64)
    assert t.min() >= 0.1 and t.max() <= 0.9
    assert torch.equal(which, torch.bucketize(t, design.edges[1:-1], right=True))
    expected = (0.9**3 - 0.1**3) / (3 * 0.8)
    estimate = (weight * t**2).mean().item()
    se = (weight * t**2).std().item() / math.sqrt(t.numel())
    assert abs(estimate - expected) < 4 * se and se < 1e-3
    uniform = TimeDesign.uniform(0.1)
    assert torch.equal(uniform.adapted(torch.zeros(16, dtype=torch.float64)).probs, uniform.probs)


# -- the CLI contract ----------------------------------------------------------------------------------------
def test_main_writes_json_with_exact_keys_and_a_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "sub" / "v.json", tmp_path / "v.png"
    argv = ["--data", "moons", "--path", "vp", "--json", str(out_json), "--plot", str(out_png), *SMALL]
    assert main(parse(argv)) == 0
    result = strict_json(out_json.read_text())
    assert tuple(result) == JSON_KEYS
    assert result["objective"] == "cfm" and result["path"] == "vp" and result["n_samples"] == 4096
    assert result["grad_relative_difference"] <= 3 * result["grad_relative_standard_error"]
    assert abs(result["loss_gap"] - result["loss_floor"]) < 4 * (
        result["loss_floor_standard_error"] + 0.1 * result["loss_floor"]
    )
    assert is_png(str(out_png))
    table = capsys.readouterr().out
    assert "loss floor C" in table and "verdict:" in table and "L_CFM - L_FM" in table
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "v.json", "v.png"]  # no temporary files


@pytest.mark.parametrize(("given", "canonical"), [("flow", "cfm"), ("score", "dsm"), ("dsm", "dsm")])
def test_objective_aliases_are_echoed_in_the_json_and_resolved_everywhere_else(
    tmp_path, capsys, given, canonical
):
    out = tmp_path / "v.json"
    assert main(parse(["--objective", given, "--json", str(out), *SMALL])) == 0
    assert strict_json(out.read_text())["objective"] == given
    table = capsys.readouterr().out
    assert f"L_{canonical.upper()} - L_{verify.MARGINAL_TWIN[canonical].upper()}" in table


@pytest.mark.parametrize(("flag", "value"), [("--objective", "fm"), ("--path", "nosuchpath")])
def test_the_flowscore_cli_refuses_bad_choices_in_one_line(capsys, tmp_path, flag, value):
    code, out, err = run_cli(capsys, "verify", flag, value, "--json", str(tmp_path / "v.json"), *SMALL)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and flag in err
    assert not os.listdir(tmp_path)


def test_sequential_stopping_reaches_each_verdict():
    common = dict(n_data=200, batch_size=256, progress=False, floor_samples=512)
    # a loose target is reached at the first look (MIN_BATCHES batches): "equal"
    loose = run_verify("moons", "linear", "cfm", target_se=0.5, **common)
    assert loose["verdict"] == "equal" and loose["stopped"] == "target"
    assert loose["n_samples"] == verify.MIN_BATCHES * 256
    assert loose["bound"] == pytest.approx(
        loose["grad_relative_difference"] + 3 * loose["grad_relative_standard_error"]
    )
    # an impossible target with a small cap: "inconclusive", every allowed draw used
    capped = run_verify("moons", "linear", "cfm", target_se=1e-6, max_samples=3000, **common)
    assert capped["verdict"] == "inconclusive" and capped["stopped"] == "cap" and capped["n_samples"] == 2816
    assert "inconclusive at the cap" in verify.verdict_line(capped)
    fixed = run_verify("moons", "linear", "cfm", n_batches=3, **common)
    assert fixed["n_samples"] == 768 and fixed["stopped"] == "n_batches"
    assert len(fixed["running"]["n_samples"]) == 3


def test_images_npz_and_npy_files_are_read_as_train_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 17, size=(60, 1, 4, 4)).astype(np.uint8)
    np.savez(tmp_path / "img.npz", data=images)
    result = run_verify(str(tmp_path / "img.npz"), "vp", "dsm", n_batches=3, batch_size=64, progress=False)
    assert result["data_shape"] == [1, 4, 4] and result["n_data"] == 60
    assert math.isfinite(result["grad_relative_difference"])
    np.save(tmp_path / "v.npy", rng.normal(3.0, 5.0, size=(300, 3)))
    points = load_points(str(tmp_path / "v.npy"), n_data=100, seed=1)
    assert points.shape == (100, 3)  # a random subset of n_data points ...
    assert torch.allclose(points.mean(0), torch.zeros(3), atol=1e-5)  # ... normalised as train does
    assert torch.allclose(points.std(0, unbiased=False), torch.full((3,), DATA_STD), atol=1e-5)


def test_digits_run_with_the_mlp_on_flattened_images():
    pytest.importorskip("sklearn")
    result = run_verify("digits", "linear", "cfm", n_data=100, n_batches=2, batch_size=32, progress=False)
    assert result["data_shape"] == [1, 8, 8] and math.isfinite(result["loss_gap"])


def test_labels_flag_checks_the_conditional_theorem_and_reports_both_floors(tmp_path, capsys):
    """--labels: the network sees the classes (a .npz with y here), the table shows the conditional floor and
    the label-blind one; data without labels is refused in one line before the run."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.stack([3.0 * y, np.zeros(300)], 1) + 0.3 * rng.standard_normal((300, 2))
    np.savez(tmp_path / "l.npz", x=x, y=y)
    out = tmp_path / "v.json"
    assert main(parse(["--data", str(tmp_path / "l.npz"), "--labels", "--json", str(out), *SMALL])) == 0
    text = capsys.readouterr().out
    assert "given the labels" in text and "without the labels" in text
    result = run_verify(str(tmp_path / "l.npz"), labels=True, n_batches=2, batch_size=64, progress=False)
    assert result["labels"] and result["loss_floor"] < result["loss_floor_label_blind"]
    assert main(parse(["--data", str(tmp_path / "l.npz"), *SMALL])) == 0  # the same data, label-blind
    capsys.readouterr()
    np.save(tmp_path / "plain.npy", x)
    assert main(parse(["--data", str(tmp_path / "plain.npy"), "--labels", *SMALL])) == 2
    assert "no class labels" in capsys.readouterr().err


def test_run_verify_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    kw = dict(n_data=100, n_batches=3, batch_size=64, progress=False)
    a = run_verify("8gaussians", **kw)
    assert torch.equal(torch.rand(1), before)
    b = run_verify("8gaussians", **kw)
    assert a["grad_relative_difference"] == b["grad_relative_difference"]
    assert a["loss_floor"] == b["loss_floor"]


# -- bad input: refused before the run, one line, nothing written -------------------------------------------
@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if the experiment starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run started before the arguments were checked")

    monkeypatch.setattr(verify, "run_verify", refuse)


def bad_arguments(tmp_path):
    np.save(tmp_path / "complex.npy", np.ones((10, 2), dtype=np.complex64))
    np.save(tmp_path / "nofeatures.npy", np.zeros((10, 0), dtype=np.float32))
    np.save(tmp_path / "ok.npy", np.ones((10, 2), dtype=np.float32))
    (tmp_path / "adir.json").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    j, p = str(tmp_path / "out" / "v.json"), str(tmp_path / "out" / "v.png")
    cases = {
        "complex data": ["--data", str(tmp_path / "complex.npy"), "--json", j],
        "(N, 0) data": ["--data", str(tmp_path / "nofeatures.npy"), "--json", j],
        "unknown toy": ["--data", "nosuchtoy", "--json", j],
        "json is a folder": ["--json", str(tmp_path / "adir.json"), "--plot", p],
        "plot is not a png": ["--json", j, "--plot", str(tmp_path / "out" / "v.pdf")],
        "plot in a read-only folder": ["--json", j, "--plot", str(locked / "v.png")],
        "json under a file": ["--json", str(tmp_path / "ok.npy" / "v.json")],
        "json and plot the same": ["--json", p, "--plot", p],
        "json overwrites the data": ["--data", str(tmp_path / "ok.npy"), "--json", str(tmp_path / "ok.npy")],
        "bad target": ["--target-se", "0", "--json", j],
        "odd batch": ["--batch-size", "513", "--json", j],
        "cap below two batches": ["--max-samples", "100", "--json", j],
        "bad t_eps": ["--t-eps", "0.5", "--json", j],
        "t_eps 0 (float32 times would reach beta = 0)": ["--t-eps", "0", "--json", j],
    }
    if os.geteuid() == 0:  # root may write into a read-only folder
        del cases["plot in a read-only folder"]
    return cases


def test_bad_arguments_are_refused_before_the_run(tmp_path, capsys, no_run):
    for name, argv in bad_arguments(tmp_path).items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert main(parse([*argv, "--no-progress"])) == 2, name
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("flowscore: error:"), (name, err)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, name  # nothing written


def test_json_never_holds_a_bare_nan(tmp_path):
    result = {key: 1.0 for key in JSON_KEYS} | {"objective": "dsm", "path": "ve", "n_samples": 2}
    result["grad_relative_difference"] = math.nan
    result["loss_floor_standard_error"] = math.inf
    write_json(result, tmp_path / "r.json")
    loaded = strict_json((tmp_path / "r.json").read_text())
    assert loaded["grad_relative_difference"] is None and loaded["loss_floor_standard_error"] is None
    assert loaded["loss_gap"] == 1.0


def test_write_json_failure_leaves_no_half_written_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text('{"old": true}')
    with pytest.raises(KeyError):
        write_json({"objective": "cfm"}, target)  # missing keys: fails before anything is written
    assert json.loads(target.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["r.json"]


# -- flow maps and the CLI's error handling ------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["meanflow", "semigroup", "lagrangian"])
def test_flow_map_objectives_through_the_cli_give_the_same_verdict_and_json_fields(
    tmp_path, capsys, objective
):
    """`flowscore verify --objective meanflow|semigroup|lagrangian`: the target with the conditional velocity
    vs the exact marginal one (a two-time network); the JSON holds exactly JSON_KEYS, the loss gap agrees with
    E|T_cond - T_marg|^2 and the gradients agree (the statistics: tests/test_theorems.py)."""
    out = tmp_path / "v.json"
    code, table, err = run_cli(capsys, "verify", "--objective", objective, "--json", str(out), *SMALL)
    assert code == 0, err
    result = strict_json(out.read_text())
    assert tuple(result) == JSON_KEYS and result["objective"] == objective and result["n_samples"] == 4096
    assert result["grad_relative_difference"] <= 3 * result["grad_relative_standard_error"]
    gap, floor = result["loss_gap"], result["loss_floor"]
    assert abs(gap - floor) < 4 * result["loss_floor_standard_error"] + 0.1 * floor
    assert f"L_{objective.upper()} - L_{verify.MARGINAL_TWIN[objective].upper()}" in table
    assert "verdict:" in table and "C at theta" in table


def test_verify_main_reports_errors_as_the_flowscore_cli_does(capsys, monkeypatch):
    """verify.main runs through the CLI's error handling (flowscore.cli.run_parsed): a failure inside the
    run gives the same line and exit status as `flowscore verify`."""
    from flowscore import cli

    def broken(*args, **kwargs):
        raise ValueError("the experiment broke")

    monkeypatch.setattr(verify, "run_verify", broken)
    assert main(parse(SMALL)) == 2
    direct = capsys.readouterr().err
    assert cli.main(["verify", *SMALL]) == 2
    assert capsys.readouterr().err == direct
    assert direct.startswith("flowscore: error: the experiment broke; ") and len(direct.splitlines()) == 1
    monkeypatch.setattr(verify, "run_verify", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    assert main(parse(SMALL)) == cli.EXIT_FAILED  # a failure while working, as the CLI reports it
