"""Faults and hostile input (issue 17, items 9 to 13): races for a run folder, damaged runs on resume,
memory checked before allocating, signals and recursion, and the exit code of each bad input.

Ground truth: the files on disk (their names and bytes before and after), the kernel's lock, the exit codes
the CLI documents (2: bad input, nothing written; 1: a failure while working; 130: interrupted).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from flowscore import TrainConfig, Trainer, checkpoint, load_run, training
from flowscore.runs import CHECKPOINT_FILE, CONFIG_FILE, LOCK_FILE, LOG_FILE, RUN_FILE, RunLock

TINY = dict(
    data="moons", data_n=1200, n_holdout=200, width=32, depth=2, batch_size=64, warmup=5,
    checkpoint_every=10, log_every=5, loss_floor=False, device="cpu",
)  # fmt: skip


def tiny(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "steps": 20, **changes})


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a folder with its bytes (the lock's content, a process id, aside)."""
    return {
        str(p.relative_to(run_dir)): b"" if p.name == LOCK_FILE else p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


# -- 9: two writers race for a new folder --------------------------------------------------------------------
@pytest.mark.parametrize("winner_still_holds_the_lock", [True, False])
def test_the_loser_of_a_race_for_a_new_folder_removes_nothing_of_the_winner(
    tmp_path, monkeypatch, winner_still_holds_the_lock
):
    """A creates the folder; before A locks it, B trains a whole run there. A must then refuse and leave
    every file of B in place (it used to delete run.safetensors, config.json, log.csv and lock)."""
    run_dir = tmp_path / "r"
    make_dir = training._make_dir
    held: list[RunLock] = []

    def slow_make_dir(path: Path) -> bool:
        created = make_dir(path)
        if not held and created:  # the delay between mkdir and locking: the other writer runs now
            monkeypatch.setattr(training, "_make_dir", make_dir)
            Trainer(tiny(), path, progress=False).train()  # B: finds the folder, locks it, trains
            held.append(RunLock(path))
            if winner_still_holds_the_lock:
                held[0].acquire()
        return created

    monkeypatch.setattr(training, "_make_dir", slow_make_dir)
    with pytest.raises(ValueError, match="another process" if winner_still_holds_the_lock else "not empty"):
        Trainer(tiny(steps=30), run_dir, progress=False).train()
    held[0].release()
    names = {p.name for p in run_dir.iterdir()}
    assert {RUN_FILE, CHECKPOINT_FILE, LOG_FILE, CONFIG_FILE, LOCK_FILE} <= names
    assert load_run(run_dir).step == 20


def test_a_users_own_file_named_lock_is_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("my shopping list\n")
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", "5", "--out", str(run_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "not a flowscore lock" in err
    assert snapshot(run_dir) == {LOCK_FILE: b""} and (run_dir / LOCK_FILE).read_text() == "my shopping list\n"


@pytest.mark.parametrize("kind", ["lock as a folder", "lock as a link loop"])
def test_a_lock_that_is_not_a_file_is_bad_input(tmp_path, capsys, kind):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    if kind == "lock as a folder":
        (run_dir / LOCK_FILE).mkdir()
    else:
        os.symlink(LOCK_FILE, run_dir / LOCK_FILE)
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", "5", "--out", str(run_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_bad_input(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", "5", "--out", str(parent / "r"))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    finally:
        parent.chmod(0o700)
    assert not any(parent.iterdir())


def test_an_out_that_is_a_link_loop_is_bad_input(tmp_path, capsys):
    os.symlink("loop", tmp_path / "loop")
    code, _, err = run_cli(
        capsys, "train", "--data", "moons", "--steps", "5", "--out", str(tmp_path / "loop")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


# -- 10: resume checks the run and the checkpoint before it writes anything ----------------------------------
def _rewrite(file: Path, change) -> None:
    """Applies ``change(tensors, state)`` to a safetensors file and writes it back as is (NaN allowed in
    its JSON, as a hostile file may hold)."""
    from safetensors.torch import save

    tensors, state = checkpoint.load_checkpoint(file)
    meta = change(tensors, state)
    meta = json.dumps(state) if meta is None else meta
    file.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata={"flowscore": meta}))


def _group(state: dict, **changes) -> None:
    state["optimizer"]["param_groups"][0].update(changes)


DAMAGED_RUN = {
    "format 2": lambda t, s: s.update(format=2),
    "data_shape": lambda t, s: s.update(data_shape=[3]),
    "path differs from the config": lambda t, s: s.update(path={"name": "vp"}),
    "n_train": lambda t, s: s.update(n_train=5),
    "labels on unlabelled data": lambda t, s: (
        s.update(labels={"num_classes": 2, "class_counts": [500, 500]}),
        t.update(held_out_labels=torch.zeros(200, dtype=torch.int64)),
    )[0],
    "held-out points altered": lambda t, s: t.update(held_out=t["held_out"] + 1),
    "held-out points too many": lambda t, s: t.update(held_out=torch.zeros(3000, 2)),
    "normalizer altered": lambda t, s: t.update({"normalizer.scale": t["normalizer.scale"] * 2}),
    "nested JSON": lambda t, s: "[" * 100_000 + "]" * 100_000,
}  # fmt: skip
DAMAGED_CHECKPOINT = {
    "step -5": lambda t, s: s.update(step=-5),
    "step a string": lambda t, s: s.update(step="12"),
    "maximize": lambda t, s: _group(s, maximize=True),
    "eps -1": lambda t, s: _group(s, eps=-1),
    "betas [5, -3]": lambda t, s: _group(s, betas=[5, -3]),
    "lr NaN": lambda t, s: _group(s, lr=math.nan),
    "loss_ema NaN": lambda t, s: s.update(loss_ema=math.nan),
    "NaN EMA weight": lambda t, s: t.update({"ema.net.0.bias": t["ema.net.0.bias"] * math.nan}),
    "int32 EMA weights": lambda t, s: t.update({k: v.int() for k, v in t.items() if k.startswith("ema.")}),
    "nested JSON": lambda t, s: '{"step": ' + "[" * 100_000 + "]" * 100_000 + "}",
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "r"
    Trainer(tiny(), run_dir, progress=False).train()
    return run_dir


@pytest.mark.parametrize(
    "file, case",
    [(RUN_FILE, c) for c in DAMAGED_RUN] + [(CHECKPOINT_FILE, c) for c in DAMAGED_CHECKPOINT]
    + [(CHECKPOINT_FILE, "a folder"), (LOG_FILE, "a folder")],
)  # fmt: skip
def test_resume_refuses_a_damaged_run_before_writing_anything(trained, tmp_path, capsys, file, case):
    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir)
    if case == "a folder":
        (run_dir / file).unlink()
        (run_dir / file).mkdir()
    else:
        _rewrite(run_dir / file, (DAMAGED_RUN if file == RUN_FILE else DAMAGED_CHECKPOINT)[case])
    before = snapshot(run_dir)
    argv = ["train", "--out", str(run_dir), "--resume", "--steps", "30", "--no-progress"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out, (code, err)
    assert "Traceback" not in err
    assert snapshot(run_dir) == before and (run_dir / file).exists()


def test_resume_of_an_intact_copy_still_works(trained, tmp_path, capsys):
    """The control of the test above: the same copy, undamaged, resumes (exit 0) to the new total."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir)
    code, _, err = run_cli(
        capsys, "train", "--out", str(run_dir), "--resume", "--steps", "30", "--no-progress"
    )
    assert code == 0, err
    assert load_run(run_dir).step == 30


# -- 11: memory is checked before it is allocated -----------------------------------------------------------
@pytest.mark.parametrize("label", [2**31 - 1, 2**20 - 1])
def test_a_huge_label_is_refused_before_per_class_tables_are_built(tmp_path, capsys, monkeypatch, label):
    x = torch.randn(300, 2).numpy()
    y = torch.randint(0, 3, (300,)).numpy()
    y[17] = label
    file = tmp_path / "d.npz"
    import numpy as np

    np.savez(file, x=x, y=y)
    bincount = torch.bincount

    def small_bincount(values, weights=None, minlength=0):
        assert minlength <= 2**16 and int(values.max()) < 2**16, "a per-class table as large as the label"
        return bincount(values, weights, minlength)

    monkeypatch.setattr(torch, "bincount", small_bincount)
    code, _, err = run_cli(capsys, "train", "--data", str(file), "--steps", "5", "--out", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"class label {label} on" in err and not (tmp_path / "r").exists()


def test_empirical_marginal_with_one_huge_label_on_few_points(monkeypatch):
    from flowscore import EmpiricalMarginal

    with pytest.raises(ValueError, match="class label 1000000 on 10 points"):
        EmpiricalMarginal(torch.randn(10, 2), "linear", labels=torch.tensor([0] * 9 + [10**6]))
    # labels with an absent class (K = 4 > 3 points) still work, and each class holds its own points
    data = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]], dtype=torch.float64)
    m = EmpiricalMarginal(data, "linear", labels=torch.tensor([3, 0, 3]))
    x, t = torch.tensor([[4.0, 4.0]], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64)
    # class 0 holds one point: its posterior mean is that point (x_data = [5, 5]); v = (x_data - x) / (1 - t)
    v = m.velocity(x, t, y=torch.tensor([0]))
    torch.testing.assert_close(v, (data[1:2] - x) / (1 - 0.9))


def test_fs_sample_of_too_many_points_is_refused_before_allocating():
    import flowscore as fs

    with pytest.raises(ValueError, match="2147483648 samples of shape \\(2,\\) needs about .* memory"):
        fs.sample(lambda x, t: -x, "linear", 2**31)


def test_the_memory_estimate_of_a_data_file_covers_its_peak(tmp_path):
    """In a fresh process: loading and preparing a float64 .npy for training grows the peak memory by no
    more than the estimate that is checked before reading it."""
    import subprocess
    import sys

    import numpy as np

    from flowscore import data

    array = np.random.default_rng(0).standard_normal((2_000_000, 4))
    np.save(tmp_path / "d.npy", array)
    np.save(tmp_path / "small.npy", array[:1000])
    # the resident size is polled while the big file is prepared, against the resident size just before
    # (not the process's lifetime peak, which the imports' own transient peak may already exceed)
    script = (
        "import resource, sys, threading, time, torch\nfrom flowscore import training, TrainConfig\n"
        "def rss():\n    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()\n"
        "small = TrainConfig(data=sys.argv[2], loss_floor=False, device='cpu', steps=1)\n"
        "training._prepare(small, torch.device('cpu'))  # every module it imports, imported\n"
        "cfg = TrainConfig(data=sys.argv[1], loss_floor=False, device='cpu', steps=1)\n"
        "peak, done = [0], threading.Event()\n"
        "def poll():\n    while not done.is_set():\n"
        "        peak[0] = max(peak[0], rss())\n        time.sleep(2e-4)\n"
        "before = rss()\nthread = threading.Thread(target=poll)\nthread.start()\n"
        "training._prepare(cfg, torch.device('cpu'))\n"
        "done.set()\nthread.join()\nprint(max(peak[0], rss()) - before)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "d.npy"), str(tmp_path / "small.npy")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    estimate = data.load_memory(array.shape, array.itemsize)
    assert array.nbytes < grown <= estimate, (grown, estimate)


def test_sample_reads_only_the_tail_of_a_huge_log(trained, tmp_path):
    from flowscore import runs

    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir)
    rows = "".join(f"{i},0.5,0.5,0.001,80,\n" for i in range(21, 400_021))
    with open(run_dir / LOG_FILE, "a") as handle:
        handle.write(rows)
    run = load_run(run_dir)
    assert len(run.log) == runs.LOG_ROWS_READ and run.log[-1]["step"] == 400_020
    assert [r["step"] for r in run.log[-3:]] == [400_018, 400_019, 400_020]


# -- 12: signals, recursion, overflow ------------------------------------------------------------------------
def _catches_sigterm(pid: int) -> bool:
    """True once process ``pid`` handles SIGTERM (its SigCgt mask in /proc): flowscore's main has begun."""
    import signal

    try:
        with open(f"/proc/{pid}/status") as handle:
            caught = next(int(line.split()[1], 16) for line in handle if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize(
    "signum, delay", [("SIGINT", 0.0), ("SIGINT", 0.3), ("SIGTERM", 0.3), ("SIGTERM", 6.0)]
)  # fmt: skip
def test_an_interrupt_at_any_moment_is_one_line(tmp_path, signum, delay):
    """Ctrl-C or SIGTERM from the moment flowscore's main runs (while torch is still loading) or during
    training: one line, exit 130 (143 for SIGTERM), no traceback."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    argv = ["train", "--data", "moons", "--steps", "100000", "--out", str(tmp_path / "r"), "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowscore", *argv], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal (a test
    )  # fmt: skip  # runner started in the background ignores SIGINT, and its children would inherit that)
    try:
        deadline = time.monotonic() + 60
        while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until flowscore's main runs (before it, Python itself is starting)
        time.sleep(delay)
        proc.send_signal(getattr(signal, signum))
        _, err = proc.communicate(timeout=60)
    finally:  # never leave a 100000-step training behind, whatever failed
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = err.decode()
    assert proc.returncode == (130 if signum == "SIGINT" else 143), err
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("flowscore: interrupted"), err


def test_importing_flowscore_does_not_load_torch():
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "import sys, flowscore, flowscore._main; print('torch' in sys.modules, flowscore.sample.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "sample"], out.stderr


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--data-std", "1e300"], "data_std"),
        (["--data-std", "1e-300"], "data_std"),
        (["--threads", "100000"], "threads"),
        (["--data-n", "1e10"], "data_n"),
        (["--lr", "1e300"], "lr"),
    ],
)
def test_out_of_range_numbers_are_bad_input_before_the_folder_exists(tmp_path, capsys, flags, fragment):
    run_dir = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--steps", "5", *flags, "--out", str(run_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err
    assert not run_dir.exists()


@pytest.mark.parametrize("data_std", [2e-19, 1e-6, 1e6])
def test_what_the_config_accepts_the_run_loader_accepts(tmp_path, data_std):
    """Symmetry: a data_std the config accepts trains a run that load_run reads back (or is refused before
    anything is written)."""
    run_dir = tmp_path / "r"
    try:
        Trainer(tiny(steps=2, checkpoint_every=2, data_std=data_std), run_dir, progress=False).train()
    except ValueError:
        assert not run_dir.exists()
        return
    run = load_run(run_dir)
    torch.testing.assert_close(run.normalizer.decode(run.normalizer.encode(run.held_out)), run.held_out)


def test_nested_toml_is_one_line(tmp_path, capsys):
    file = tmp_path / "c.toml"
    file.write_text("a = " + "[" * 50_000 + "]" * 50_000 + "\n")
    code, _, err = run_cli(capsys, "train", "--config", str(file), "--out", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nested" in err, err


# -- 13: exit codes and truthful messages ------------------------------------------------------------------
def test_sample_with_a_plot_on_a_full_disk_writes_neither(trained, tmp_path, capsys, monkeypatch):
    import errno

    from flowscore import plots

    def full(fig, file):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(plots, "_save", full)
    out, png = tmp_path / "s.npy", tmp_path / "s.png"
    argv = [
        "sample",
        "--run",
        str(trained),
        "--n",
        "10",
        "--steps",
        "4",
        "--out",
        str(out),
        "--plot",
        str(png),
    ]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and "no space left on device" in err and "nothing was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither output, no temporaries


def test_a_run_in_a_folder_named_in_another_encoding_samples_and_resumes(tmp_path, capsys):
    """A folder name that is not UTF-8 (safetensors cannot open such a path): the run is read through Python,
    and `sample` never calls the good checkpoint corrupt."""
    run_dir = os.fsdecode(os.fsencode(str(tmp_path)) + b"/r\xff")
    Trainer(tiny(steps=10), run_dir, progress=False).train()
    code, _, err = run_cli(capsys, "sample", "--run", run_dir, "--n", "8", "--steps", "4",
                           "--out", str(tmp_path / "s.npy"))  # fmt: skip
    assert code == 0 and "delete" not in err, err
    Trainer(tiny(steps=20), run_dir, progress=False).train(resume=True)
    assert load_run(run_dir).step == 20


def test_a_new_demo_removes_the_staging_folders_of_killed_demos(tmp_path):
    import subprocess
    import sys

    from flowscore import demo

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    out = tmp_path / "demo-out"
    stale = [tmp_path / f".demo-out.demo-{dead.pid}-abc", tmp_path / f".demo-out.old-{dead.pid}-x"]
    alive = tmp_path / f".demo-out.demo-{os.getpid()}-def"  # a demo still running
    other = tmp_path / ".demo-out.demo-notes"  # not named by a demo
    for folder in (*stale, alive, other):
        folder.mkdir()
        (folder / "samples_ode.npy").write_bytes(b"x")
    staging = Path(demo._staging_dir(str(out)))
    assert not any(p.exists() for p in stale)
    assert alive.is_dir() and other.is_dir() and staging.is_dir()
    assert staging.name.startswith(f".demo-out.demo-{os.getpid()}-")


@pytest.mark.parametrize("command", ["plot", "demo", "train"])
def test_an_out_folder_that_is_a_link_loop_is_bad_input(trained, tmp_path, capsys, command):
    loop = tmp_path / "loop"
    os.symlink("loop", loop)
    argv = {
        "plot": ["plot", "--run", str(trained), "--out", str(loop)],
        "demo": ["demo", "--steps", "5", "--out", str(loop)],
        "train": ["train", "--data", "moons", "--steps", "5", "--out", str(loop)],
    }[command]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


def test_a_read_only_out_is_bad_input_for_plot_and_demo(trained, tmp_path, capsys, monkeypatch):
    """A folder this process may not write (simulated: the tests may run as root, who writes anywhere)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != folder and access(p, mode, **kw))
    for argv in (["plot", "--run", str(trained), "--out", str(folder / "plots")],
                 ["demo", "--steps", "5", "--out", str(folder / "demo")]):  # fmt: skip
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "writable" in err, err
    assert not any(folder.iterdir())
