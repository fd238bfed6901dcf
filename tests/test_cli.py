"""The ``flowscore`` CLI end to end: train -> sample -> eval -> plot, resume, bad input, paths, entry points.

Ground truth is independent of flowscore: W2 by POT's exact solver in float64 here, the path schedules from
their closed forms, PNG files by their signature. One tiny run (a few hundred steps on 3,000 moons points)
is trained once per module and shared.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import ot
import pytest
import torch
from conftest import is_png, run_cli

import flowscore as fs
from flowscore import checkpoint, cli, load_run, workflows

TRAIN_STEPS = 2000
TOML = """
[train]
data = "moons"
data_n = 6000
n_holdout = 1000
steps = 99999          # overridden by --steps on the command line
batch_size = 256
lr = 3e-3
warmup = 50
width = 128
depth = 3
checkpoint_every = 500
log_every = 50
"""


def exact_w2(a: np.ndarray, b: np.ndarray) -> float:
    """W2 between two equal-size point clouds by POT's exact EMD with squared Euclidean cost (float64)."""
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    weights_a, weights_b = np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b))
    return math.sqrt(ot.emd2(weights_a, weights_b, cost))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def run_dir(workdir: str) -> str:
    """A short training run through the CLI: TOML config + an explicit --steps that overrides it."""
    config = os.path.join(workdir, "train.toml")
    with open(config, "w") as fh:
        fh.write(TOML)
    out = os.path.join(workdir, "run")
    code = cli.main(["train", "--config", config, "--steps", str(TRAIN_STEPS), "--out", out, "--no-progress"])
    assert code == 0
    return out


def test_train_precedence_defaults_toml_flags(run_dir: str) -> None:
    config = load_run(run_dir).config
    assert config.steps == TRAIN_STEPS  # flag beats TOML
    assert (config.batch_size, config.data_n, config.width) == (256, 6000, 128)  # TOML beats defaults
    assert config.objective == "cfm" and config.path == "linear"  # defaults


def test_sample_is_far_closer_to_the_data_than_the_prior(run_dir: str, workdir: str, capsys) -> None:
    out = os.path.join(workdir, "samples.npy")
    code, stdout, _ = run_cli(capsys, "sample", "--run", run_dir, "--n", "1000", "--sampler", "heun",
                              "--sampler-steps", "40", "--out", out, "--seed", "1")  # fmt: skip
    assert code == 0 and "wrote" in stdout
    samples = np.load(out)
    assert samples.shape == (1000, 2) and np.isfinite(samples).all()
    held = load_run(run_dir).held_out.double().numpy()
    # the prior pushed to data space by the normalizer: a Gaussian with the data's mean and std
    rng = np.random.default_rng(0)
    prior = held.mean(0) + held.std(0) * rng.standard_normal((1000, 2))
    w2_model, w2_prior = exact_w2(samples, held), exact_w2(prior, held)
    w2_floor = exact_w2(held[:500], held[500:])  # two data halves: what a perfect sampler reaches, roughly
    print(f"W2 model {w2_model:.3f}, prior {w2_prior:.3f}, data halves {w2_floor:.3f}")
    assert w2_model < 0.5 * w2_prior, (w2_model, w2_prior)


def test_sample_with_a_few_step_sampler_and_grid_matches_the_api(run_dir: str, workdir: str, capsys) -> None:
    out = os.path.join(workdir, "few.npy")
    code, stdout, _ = run_cli(capsys, "sample", "--run", run_dir, "--n", "300", "--sampler", "dpm++3m",
                              "--grid", "karras", "--sampler-steps", "12", "--out", out,
                              "--seed", "2")  # fmt: skip
    assert code == 0 and "dpm++3m" in stdout
    run = load_run(run_dir)
    x = fs.sample(run.model, run.path, 300, prediction=run.prediction, sampler="dpm++3m", grid="karras",
                  steps=12, generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert np.allclose(np.load(out), run.normalizer.decode(x).numpy(), atol=1e-5)
    code, _, err = run_cli(capsys, "sample", "--run", run_dir, "--grid", "cosine", "--out", out)
    assert code != 0 and "--grid" in err


def test_resume_continues_to_the_new_total(run_dir: str, workdir: str, capsys) -> None:
    copy = os.path.join(workdir, "resumed")
    shutil.copytree(run_dir, copy)
    code, stdout, err = run_cli(capsys, "train", "--out", copy, "--resume", "--steps", str(TRAIN_STEPS + 100),
                                "--no-progress")  # fmt: skip
    assert code == 0, err
    run = load_run(copy)
    assert run.step == TRAIN_STEPS + 100
    assert run.log[-1]["step"] == TRAIN_STEPS + 100
    # the resumed model moved on from the stored one
    before, after = load_run(run_dir).model, run.model
    x, t = torch.zeros(4, 2), torch.full((4,), 0.5)
    assert not torch.equal(before(x, t), after(x, t))


def test_eval_json_has_the_documented_keys_and_the_true_floor(run_dir: str, workdir: str, capsys) -> None:
    out = os.path.join(workdir, "eval.json")
    code, stdout, err = run_cli(capsys, "eval", "--run", run_dir, "--n", "300", "--json", out)
    assert code == 0, err
    assert "W2" in stdout and "floor" in stdout
    with open(out) as fh:
        result = json.load(fh)
    assert tuple(result) == workflows.EVAL_KEYS
    assert result["dequantized"] is False  # moons: continuous data
    assert result["per_class"] is None  # moons: no labels
    image_keys = ("fid", "precision", "recall", "nn_ratio")
    assert all(result[k] is None for k in image_keys)  # moons: not images
    words = ("ode_sampler", "w2_units", "dequantized", "per_class", *image_keys)
    numbers = {k: v for k, v in result.items() if k not in words}
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert result["n"] == 300
    held = load_run(run_dir).held_out.double().numpy()
    half = len(held) // 2
    assert result["w2_floor"] == pytest.approx(exact_w2(held[half : half + 300], held[:300]), rel=1e-6)
    assert result["w2_ratio_ode"] == pytest.approx(result["w2_ode"] / result["w2_floor"])
    assert result["w2_ode"] < 3 * result["w2_floor"] and result["w2_sde"] < 3 * result["w2_floor"]


def test_plot_writes_its_pngs(run_dir: str, workdir: str, capsys) -> None:
    out = os.path.join(workdir, "plots")
    code, stdout, err = run_cli(capsys, "plot", "--run", run_dir, "--out", out, "--n", "300")
    assert code == 0, err
    names = sorted(os.listdir(out))
    assert names == ["field.png", "loss.png", "samples.png", "trajectories.png"]
    assert all(is_png(os.path.join(out, n), 5000) for n in names)


def test_paths_table_matches_closed_forms_and_writes_a_png(workdir: str, capsys) -> None:
    png = os.path.join(workdir, "paths.png")
    code, stdout, _ = run_cli(capsys, "paths", "--plot", png)
    assert code == 0 and is_png(png, 5000)
    rows = {}
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == 7 and fields[0] in ("linear", "vp", "vp-linear", "ve"):
            rows[(fields[0], float(fields[1]))] = [float(v) for v in fields[2:]]
    assert len(rows) == 4 * 5
    for t in (0.25, 0.5, 0.75):
        c, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
        expected = {
            "linear": [t, 1 - t, 1, -1, t**2 / (1 - t) ** 2],
            "vp": [s, c, math.pi / 2 * c, -math.pi / 2 * s, (s / c) ** 2],
            "ve": [1, 80 * (0.002 / 80) ** t, 0, 80 * (0.002 / 80) ** t * math.log(0.002 / 80), None],
        }
        for name, values in expected.items():
            for got, want in zip(rows[(name, t)], values, strict=True):
                if want is not None:
                    assert got == pytest.approx(want, rel=1e-3, abs=1e-4), (name, t)
    assert math.isinf(rows[("linear", 1.0)][4])  # SNR = alpha^2 / beta^2 with beta_1 = 0


# -- bad input: one line on stderr, exit 2, nothing created --------------------------------------------------
def _bad_inputs(workdir: str, run_dir: str) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, the path that must not be created)."""
    nan = os.path.join(workdir, "nan.npy")
    np.save(nan, np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
    flat = os.path.join(workdir, "flat.npy")
    np.save(flat, np.arange(10.0))
    corrupt = os.path.join(workdir, "corrupt")
    os.makedirs(corrupt, exist_ok=True)
    with open(os.path.join(corrupt, "run.safetensors"), "wb") as fh:
        fh.write(b"not a safetensors file")
    new = os.path.join(workdir, "never")
    out_npy = os.path.join(workdir, "never.npy")
    return {
        "nan-data": (["train", "--data", nan, "--out", new], new),
        "wrong-shape": (["train", "--data", flat, "--out", new], new),
        "missing-file": (["train", "--data", os.path.join(workdir, "missing.npy"), "--out", new], new),
        "unknown-data": (["train", "--data", "nonsense", "--out", new], new),
        "unknown-option": (["train", "--data", "moons", "--out", new, "--bogus", "1"], new),
        "unknown-objective": (["train", "--data", "moons", "--out", new, "--objective", "xyz"], new),
        "bad-steps": (["train", "--data", "moons", "--out", new, "--steps", "-3"], new),
        "no-data": (["train", "--out", new], new),
        "resume-missing": (["train", "--data", "moons", "--out", new, "--resume"], new),
        "missing-run": (["sample", "--run", new, "--out", out_npy], out_npy),
        "corrupt-run": (["sample", "--run", corrupt, "--out", out_npy], out_npy),
        "corrupt-eval": (
            ["eval", "--run", corrupt, "--json", out_npy[:-4] + ".json"],
            out_npy[:-4] + ".json",
        ),
        "unknown-sampler": (["sample", "--run", run_dir, "--sampler", "leapfrog", "--out", out_npy], out_npy),
        "bad-out-suffix": (
            ["sample", "--run", run_dir, "--out", out_npy[:-4] + ".txt"],
            out_npy[:-4] + ".txt",
        ),
        "unknown-command": (["fly"], new),
    }


BAD = (
    "nan-data", "wrong-shape", "missing-file", "unknown-data", "unknown-option", "unknown-objective",
    "bad-steps", "no-data", "resume-missing", "missing-run", "corrupt-run", "corrupt-eval", "unknown-sampler",
    "bad-out-suffix", "unknown-command",
)  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_creates_nothing(case: str, run_dir: str, workdir: str, capsys) -> None:
    argv, must_not_exist = _bad_inputs(workdir, run_dir)[case]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("flowscore: error: ") and "; " in lines[0]
    assert "Traceback" not in err + stdout
    assert not os.path.exists(must_not_exist)


def test_existing_out_without_resume_is_refused_and_untouched(run_dir: str, capsys) -> None:
    before = {n: os.path.getmtime(os.path.join(run_dir, n)) for n in os.listdir(run_dir)}
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--out", run_dir)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--resume" in err
    assert {n: os.path.getmtime(os.path.join(run_dir, n)) for n in os.listdir(run_dir)} == before


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_half_run(workdir: str, capsys, monkeypatch) -> None:
    def interrupted(file, tensors, state):  # Ctrl-C while the first checkpoint is written
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", interrupted)
    out = os.path.join(workdir, "interrupted")
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--data-n", "500", "--steps", "20",
                           "--no-loss-floor", "--out", out, "--no-progress")  # fmt: skip
    assert code == 130 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "nothing was kept" in err
    assert not os.path.exists(out)


def test_subprocess_error_has_no_traceback(workdir: str) -> None:
    out = os.path.join(workdir, "never2.npy")
    argv = [sys.executable, "-m", "flowscore", "sample", "--run", os.path.join(workdir, "nope"), "--out", out]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not os.path.exists(out)


def test_python_m_equals_console_script() -> None:
    script = shutil.which("flowscore") or os.path.join(os.path.dirname(sys.executable), "flowscore")
    if not os.path.exists(script):
        pytest.skip("the console script is not installed (pip install -e .)")
    by_module = subprocess.run([sys.executable, "-m", "flowscore", "paths"], capture_output=True, text=True)
    by_script = subprocess.run([script, "paths"], capture_output=True, text=True)
    assert by_module.returncode == by_script.returncode == 0
    assert by_module.stdout == by_script.stdout and "vp-linear" in by_module.stdout


def _snapshot(folder: str) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_demo_runs_twice_into_its_own_folder_and_refuses_others(workdir: str, capsys, monkeypatch) -> None:
    parent = os.path.join(workdir, "demos")
    out = os.path.join(parent, "demo")
    argv = ["demo", "--out", out, "--steps", "150", "--n", "150", "--no-progress"]
    code, first, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "W2" in first and "floor" in first
    with open(os.path.join(out, "notes.txt"), "w") as fh:  # the user's file beside the demo
        fh.write("mine")
    earlier = _snapshot(out)

    def interrupted(file, tensors, state):  # a new demo interrupted while it trains
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", interrupted)
        code, _, err = run_cli(capsys, *argv)
    assert code == 130
    assert _snapshot(out) == earlier  # the earlier demo and the user's file, byte for byte
    assert os.listdir(parent) == ["demo"]  # no temporary folder left beside it
    code, second, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "replacing the earlier demo" in second
    with open(os.path.join(out, "notes.txt")) as fh:
        assert fh.read() == "mine"
    assert os.listdir(parent) == ["demo"]
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    ode, held = (
        np.load(os.path.join(out, "samples_ode.npy")),
        load_run(os.path.join(out, "run")).held_out.numpy(),
    )
    half = len(held) // 2
    assert metrics["w2_ode"] == pytest.approx(exact_w2(ode[:150], held[:150]), rel=1e-5)
    assert metrics["w2_floor"] == pytest.approx(exact_w2(held[half : half + 150], held[:150]), rel=1e-5)
    figures = ("loss.png", "samples.png", "trajectories.png", "field.png")
    assert all(is_png(os.path.join(out, n), 5000) for n in figures)
    other = os.path.join(workdir, "not-a-demo")
    os.makedirs(other)
    with open(os.path.join(other, "keep.txt"), "w") as fh:
        fh.write("mine")
    code, _, err = run_cli(capsys, "demo", "--out", other, "--steps", "10")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert os.listdir(other) == ["keep.txt"]


# -- the help shows the code's defaults; every TrainConfig field is a flag -----------------------------------
def _help(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one option per line or two, no wrapping inside a help text
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _shown_defaults(help_text: str) -> dict[str, str]:
    """``{flag: the text of its "(default: ...)"}`` parsed from argparse help."""
    entries = re.split(r"\n  (?=-)", help_text.split("options:", 1)[1])
    out = {}
    for entry in filter(str.strip, entries):
        flag = entry.split()[0].rstrip(",")
        match = re.search(r"\((default: (.*)|required)\)\s*$", " ".join(entry.split()))
        if match:
            out[flag] = match.group(2) or match.group(1)
    return out


def _as_shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def test_train_has_one_flag_per_config_field_showing_its_default(capsys, monkeypatch) -> None:
    shown = _shown_defaults(_help(capsys, monkeypatch, "train"))
    presets = ("fast", "default", "large")
    per_data = {data: [fs.TrainConfig(data=data, preset=p) for p in presets] for data in ("digits", "mnist")}
    vectors = fs.TrainConfig(data="moons")
    for field in dataclasses.fields(fs.TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in shown, f"{flag} is missing or shows no default"
        default = (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        )
        if field.name == "data":
            assert shown[flag] == "required"
        elif field.name == "source":  # the empty string, shown as what it means
            assert default == "" and shown[flag].startswith("empty")
        elif default is None and field.name in ("steps", "batch_size", "lr", "warmup", "width"):
            value = getattr(vectors, field.name)
            assert shown[flag].startswith(f"{_as_shown(value) if value is None else f'{value:g}'} (vectors)")
            for data, configs in per_data.items():  # the value of each preset, in order
                values = "/".join(f"{getattr(c, field.name):g}" for c in configs)
                assert f"{data}: {values}" in shown[flag], (flag, shown[flag])
        else:
            assert shown[flag] == _as_shown(default), (flag, shown[flag], default)


def test_every_shown_default_of_the_other_commands_is_the_code_default(capsys, monkeypatch) -> None:
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("sample", "eval", "plot", "demo", "paths"):
        shown = _shown_defaults(_help(capsys, monkeypatch, name))
        actions = {flag: a for a in commands[name]._actions for flag in a.option_strings}
        for flag, text in shown.items():
            action = actions[flag]
            if action.default is not None:
                assert text == _as_shown(action.default), (name, flag, text)
    shown = _shown_defaults(_help(capsys, monkeypatch, "sample"))
    assert shown["--sampler"] == fs.samplers.DEFAULT_ODE_SAMPLER
    ode_steps, sde_steps = re.match(
        rf"(\d+) for {fs.samplers.DEFAULT_ODE_SAMPLER}, (\d+) for sde", shown["--sampler-steps"]
    ).groups()
    assert shown["--grid"].startswith(f"{fs.samplers.DEFAULT_GRID[fs.samplers.DEFAULT_ODE_SAMPLER]} for ")
    # what the code does with sampler/steps left out: the same draws as with the shown values
    model, path = (lambda x, t: -x), fs.get_path("linear")
    draws = {}
    for key, kwargs in {
        "default": {}, "shown": {"sampler": shown["--sampler"], "steps": int(ode_steps)},
        "sde": {"sampler": "sde"}, "sde shown": {"sampler": "sde", "steps": int(sde_steps)},
    }.items():  # fmt: skip
        draws[key] = fs.sample(model, path, 3, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(draws["default"], draws["shown"]) and torch.equal(draws["sde"], draws["sde shown"])
    assert not torch.equal(
        draws["default"],
        fs.sample(model, path, 3, steps=int(ode_steps) + 1, generator=torch.Generator().manual_seed(0)),
    )


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"flowscore {importlib.metadata.version('flowscore')}"


def test_sigma_flags_are_path_options(workdir: str, capsys) -> None:
    """--sigma-min / --sigma-max are keys of path_options, merged with --path-options, stored, and kept on
    resume; a path that takes no such option is a one-line error."""
    out = os.path.join(workdir, "sigma")
    args = ("--data", "moons", "--data-n", "300", "--threads", "1", "--no-loss-floor", "--width", "16")
    code, _, err = run_cli(
        capsys, "train", *args, "--path", "ve", "--path-options", '{"sigma_max": 50}', "--sigma-min", "0.01",
        "--steps", "4", "--out", out, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert load_run(out).config.path_options == {"sigma_max": 50, "sigma_min": 0.01}
    assert load_run(out).path.config() == {"name": "ve", "sigma_min": 0.01, "sigma_max": 50}
    code, _, err = run_cli(capsys, "train", "--steps", "6", "--sigma-min", "0.01", "--out", out, "--resume")
    assert code == 0, err
    assert load_run(out).config.path_options == {"sigma_max": 50, "sigma_min": 0.01}
    lin = os.path.join(workdir, "lin")
    code, _, err = run_cli(capsys, "train", *args, "--steps", "2", "--sigma-min", "0.1", "--out", lin)
    assert code == 0, err
    path = load_run(lin).path
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(path.beta(t), 1 - 0.9 * t) and torch.allclose(path.alpha(t), t)  # Lipman et al.
    code, _, err = run_cli(
        capsys, "train", *args, "--path", "vp", "--sigma-min", "0.1", "--out", os.path.join(workdir, "bad")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "sigma_min" in err


def test_generated_flags_reach_the_config(workdir: str, capsys) -> None:
    out = os.path.join(workdir, "flags")
    code, _, err = run_cli(
        capsys, "train", "--data", "moons", "--data-n", "400", "--path", "ve", "--path-options",
        '{"sigma_max": 50}', "--grad-clip", "none", "--weighting", "none", "--threads", "1", "--steps", "1e1",
        "--no-loss-floor", "--time-sampler", "logit-normal", "--width", "16", "--out", out, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    config = load_run(out).config
    assert (config.path, config.path_options, config.grad_clip, config.weighting) == (
        "ve",
        {"sigma_max": 50},
        None,
        None,
    )
    assert (config.threads, config.steps, config.loss_floor, config.time_sampler) == (
        1,
        10,
        False,
        "logit-normal",
    )
    for bad in (["--path-options", "[1]"], ["--weighting", "nope"], ["--steps", "1.5"], ["--lr", "nan"]):
        code, _, err = run_cli(capsys, "train", "--data", "moons", *bad, "--out", out + "2")
        assert code == 2 and len(err.strip().splitlines()) == 1 and not os.path.exists(out + "2")


# -- no tracebacks; every command checks what it can before writing anything ---------------------------------
TINY_FLAGS = ("--width", "16", "--depth", "1", "--batch-size", "32", "--steps", "20", "--no-loss-floor",
              "--no-progress")  # fmt: skip


def _train_on(workdir: str, name: str, array: np.ndarray, capsys) -> str:
    data = os.path.join(workdir, f"{name}.npy")
    np.save(data, array)
    out = os.path.join(workdir, f"run-{name}")
    code, _, err = run_cli(capsys, "train", "--data", data, *TINY_FLAGS, "--out", out)
    assert code == 0, err
    return out


def test_constant_data_then_eval_reports_no_ratio(workdir: str, capsys) -> None:
    run_dir = _train_on(workdir, "constant", np.ones((200, 2)), capsys)
    out = os.path.join(workdir, "constant.json")
    code, stdout, err = run_cli(capsys, "eval", "--run", run_dir, "--n", "20", "--json", out)
    assert code == 0, err
    with open(out) as fh:
        result = json.load(fh)
    assert result["w2_floor"] == 0 and result["w2_ratio_ode"] is None and result["dequantized"] is True


def test_few_points_then_plot_and_eval(workdir: str, capsys) -> None:
    run_dir = _train_on(workdir, "few", np.random.default_rng(0).normal(size=(12, 2)), capsys)
    out = os.path.join(workdir, "few-plots")
    code, _, err = run_cli(capsys, "plot", "--run", run_dir, "--out", out, "--n", "50")
    assert code == 0, err
    names = sorted(os.listdir(out))
    assert names == ["field.png", "loss.png", "samples.png", "trajectories.png"]
    code, _, err = run_cli(capsys, "eval", "--run", run_dir)
    assert code == 2 and "held-out points" in err and len(err.strip().splitlines()) == 1


def test_plots_are_all_or_nothing(workdir: str, capsys, monkeypatch) -> None:
    from flowscore import plots

    run_dir = _train_on(workdir, "allornothing", np.random.default_rng(1).normal(size=(300, 2)), capsys)

    def broken(*args, **kwargs):
        raise ValueError("the field figure failed; report it")

    monkeypatch.setattr(plots, "plot_field", broken)
    out = os.path.join(workdir, "partial-plots")
    code, _, err = run_cli(capsys, "plot", "--run", run_dir, "--out", out, "--n", "50", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)
    code, _, err = run_cli(capsys, "plot", "--run", run_dir, "--out", out, "--n", "50")
    lines = err.strip().splitlines()  # one line per phase (stderr is not a terminal), the last one stopped
    assert code == 2 and lines[-2].endswith(" stopped") and lines[-1].startswith("flowscore: error:")
    assert not os.path.exists(out)


def test_sample_plot_of_3d_data_fails_before_writing(workdir: str, capsys) -> None:
    run_dir = _train_on(workdir, "three", np.random.default_rng(2).normal(size=(300, 3)), capsys)
    npy, png = os.path.join(workdir, "three.npy.out.npy"), os.path.join(workdir, "three.png")
    code, _, err = run_cli(capsys, "sample", "--run", run_dir, "--n", "10", "--out", npy, "--plot", png)
    assert code == 2 and "--plot" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(npy) and not os.path.exists(png)
    code, _, err = run_cli(capsys, "sample", "--run", run_dir, "--n", "1e13", "--out", npy)
    assert code == 2 and "memory" in err and not os.path.exists(npy)


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch-size", "1e8"],
        ["--device", "cudaXYZ"],
        ["--device", "cpu:3"],
        ["--width", "65536", "--depth", "256"],
    ],
)
def test_refused_before_anything_is_written(workdir: str, capsys, argv) -> None:
    out = os.path.join(workdir, "never-written")
    code, stdout, err = run_cli(capsys, "train", "--data", "moons", *argv, "--out", out, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(out)


def test_data_that_cannot_be_allocated_is_refused(workdir: str, capsys) -> None:
    from numpy.lib import format as npy_format

    huge = os.path.join(workdir, "huge.npy")
    with open(huge, "wb") as fh:  # a header that promises 1.6 TB, and 32 bytes of data
        npy_format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (10**11, 2)})
        fh.write(np.zeros(4).tobytes())
    out = os.path.join(workdir, "never-huge")
    code, _, err = run_cli(capsys, "train", "--data", huge, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not os.path.exists(out)
