"""A run never loses work: failures keep the last checkpoint, one writer per folder, hostile files refused.

Ground truth: an uninterrupted reference run (bit-identical weights after a failure and a resume), the files
on disk (what exists, their bytes), the kernel (a lock released when its holder is killed), and wall time /
peak memory of a subprocess reading a hostile run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from flowscore import TrainConfig, Trainer, _io, checkpoint, load_run, objectives
from flowscore.runs import CHECKPOINT_FILE, LOCK_FILE, LOG_FILE, RUN_FILE, RunInUse, RunLock, read_log
from flowscore.training import TrainingFailed

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    data="moons", data_n=1200, n_holdout=200, width=32, depth=2, batch_size=64, warmup=20,
    checkpoint_every=50, log_every=25, loss_floor=False, device="cpu",
)  # fmt: skip


def tiny(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "steps": 150, **changes})


def tensors_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_checkpoint(run_dir / CHECKPOINT_FILE)[0]


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    names = [k for k in ta if k.startswith(("model.", "ema."))]
    assert names and names == [k for k in tb if k.startswith(("model.", "ema."))]
    for name in names:
        assert torch.equal(ta[name], tb[name]), name


def failing_on(monkeypatch, error: BaseException, *, after: int) -> None:
    """The checkpoint writer raises ``error`` from its ``after + 1``-th checkpoint on."""
    write = _io.write_bytes
    count = {"checkpoints": 0}

    def writer(file, payload):
        if Path(file).name == CHECKPOINT_FILE:
            count["checkpoints"] += 1
            if count["checkpoints"] > after:
                raise error
        write(file, payload)

    monkeypatch.setattr(_io, "write_bytes", writer)


# -- a failure keeps the last checkpoint; resume ends where an uninterrupted run ends ----------------------
@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left"), "no space left on device while writing the checkpoint"),
        (RuntimeError("boom"), "RuntimeError: boom while writing the checkpoint"),
    ],
)  # fmt: skip
def test_a_failure_keeps_the_last_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, error, expected):
    run_dir = tmp_path / "r"
    failing_on(monkeypatch, error, after=1)  # the checkpoint of step 50 is written, the one of step 100 fails
    with pytest.raises(TrainingFailed) as info:
        Trainer(tiny(), run_dir, progress=False).train()
    message = str(info.value)
    assert expected in message and "the checkpoint of step 50 is kept" in message and "--resume" in message
    assert "\n" not in message
    run = load_run(run_dir)  # loadable as it is
    assert run.step == 50
    assert not list(run_dir.glob(".*.tmp"))
    monkeypatch.undo()
    Trainer(tiny(), run_dir, progress=False).train(resume=True)
    Trainer(tiny(), tmp_path / "reference", progress=False).train()
    assert_same_weights(run_dir, tmp_path / "reference")
    assert [r["step"] for r in load_run(run_dir).log] == list(range(25, 151, 25))


def test_disk_full_through_the_cli_is_one_line_exit_1_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    run_dir = str(tmp_path / "r")
    argv = ["train", "--data", "moons", "--data-n", "1200", "--n-holdout", "200", "--width", "32",
            "--depth", "2", "--batch-size", "64", "--warmup", "20", "--steps", "150", "--checkpoint-every",
            "50", "--log-every", "25", "--no-loss-floor", "--device", "cpu", "--out", run_dir,
            "--no-progress"]  # fmt: skip
    failing_on(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), after=2)
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no space left on device while writing the checkpoint of step 150" in err
    assert "the checkpoint of step 100 is kept" in err
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "train", "--out", run_dir, "--resume", "--no-progress")
    assert code == 0, err
    Trainer(tiny(), tmp_path / "reference", progress=False).train()
    assert_same_weights(Path(run_dir), tmp_path / "reference")


def test_a_failure_before_the_first_checkpoint_removes_only_its_own_files(tmp_path, monkeypatch):
    parent = tmp_path / "runs"
    parent.mkdir()
    (parent / "mine.txt").write_text("keep")
    failing_on(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), after=0)
    with pytest.raises(TrainingFailed, match="no checkpoint had been written"):
        Trainer(tiny(), parent / "r", progress=False).train()
    assert sorted(p.name for p in parent.iterdir()) == ["mine.txt"]
    # an existing empty folder given by the user stays, emptied of the run's files only
    (parent / "given").mkdir()
    with pytest.raises(TrainingFailed):
        Trainer(tiny(), parent / "given", progress=False).train()
    assert (parent / "given").is_dir() and not any((parent / "given").iterdir())


def test_interrupt_after_a_checkpoint_keeps_it(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "r"
    failing_on(monkeypatch, KeyboardInterrupt(), after=1)
    code, _, err = run_cli(
        capsys, "train", "--config", _toml(tmp_path), "--out", str(run_dir), "--no-progress"
    )
    assert code == 130 and len(err.strip().splitlines()) == 1
    assert "the checkpoint of step 50 is kept" in err and "--resume" in err
    assert load_run(run_dir).step == 50


def _toml(tmp_path: Path) -> str:
    file = tmp_path / "tiny.toml"
    file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {**TINY, "steps": 150}.items()))
    return str(file)


# -- divergence ---------------------------------------------------------------------------------------------
def test_a_real_divergence_says_so_and_names_the_fix(tmp_path):
    with pytest.raises(TrainingFailed) as info:
        Trainer(tiny(lr=1e30, warmup=0, grad_clip=None), tmp_path / "r", progress=False).train()
    message = str(info.value)
    assert message.startswith("training diverged at step ") and "(loss nan" in message
    assert "lower --lr (now 1e+30)" in message and "JSON" not in message
    assert not (tmp_path / "r").exists()  # no checkpoint had been written


def test_divergence_after_a_checkpoint_keeps_the_last_finite_one(tmp_path, monkeypatch):
    per_sample = objectives.CFM.per_sample
    calls = {"n": 0}

    def loss_that_diverges(*args, **kwargs):  # the 1 dry run, then training step k is call k + 1
        calls["n"] += 1
        loss = per_sample(*args, **kwargs)
        return loss * float("inf") if calls["n"] > 1 + 61 else loss

    monkeypatch.setattr(objectives.CFM, "per_sample", loss_that_diverges)
    run_dir = tmp_path / "r"
    with pytest.raises(TrainingFailed) as info:
        Trainer(tiny(), run_dir, progress=False).train()
    message = str(info.value)
    assert message.startswith("training diverged at step 62 (loss ")
    assert "the checkpoint of step 50 is kept" in message and "lower --lr" in message
    run = load_run(run_dir)
    assert run.step == 50 and all(torch.isfinite(p).all() for p in run.model.parameters())
    assert [r["step"] for r in run.log] == [25, 50]  # no row of a non-finite loss was written


# -- one writer per run folder ------------------------------------------------------------------------------
def test_a_second_writer_is_refused_and_touches_nothing(tmp_path, capsys):
    run_dir = tmp_path / "r"
    Trainer(tiny(steps=50), run_dir, progress=False).train()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK_FILE}
    with RunLock(run_dir):  # another writer holds the folder
        with pytest.raises(RunInUse, match="being written by another process"):
            Trainer(tiny(steps=100), run_dir, progress=False).train(resume=True)
        code, _, err = run_cli(capsys, "train", "--out", str(run_dir), "--resume", "--steps", "100")
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"process {os.getpid()}" in err
        code, _, err = run_cli(capsys, "train", "--data", "moons", "--out", str(run_dir))
        assert code == 2 and "already exists" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK_FILE} == before
    Trainer(tiny(steps=100), run_dir, progress=False).train(resume=True)  # free again
    assert load_run(run_dir).step == 100


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    script = (
        "import sys, time\nfrom flowscore.runs import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(RunInUse, match=f"process {proc.pid}"):
            RunLock(run_dir).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        RunLock(run_dir).acquire().release()
    finally:
        proc.kill()
        proc.wait()


# -- files left by a crash ----------------------------------------------------------------------------------
def test_a_torn_log_row_is_skipped_and_repaired_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "r"
    Trainer(tiny(steps=100), run_dir, progress=False).train()
    with open(run_dir / LOG_FILE, "a") as handle:
        handle.write("125,0.71,0.7")  # a row cut short by a crash: no newline, too few fields
    assert [r["step"] for r in load_run(run_dir).log] == [25, 50, 75, 100]
    code, _, err = run_cli(capsys, "sample", "--run", str(run_dir), "--n", "10", "--steps", "4",
                           "--out", str(tmp_path / "s.npy"))  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", "--run", str(run_dir), "--n", "20", "--no-likelihood")
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "train", "--out", str(run_dir), "--resume", "--steps", "150", "--no-progress"
    )
    assert code == 0, err
    text = (run_dir / LOG_FILE).read_text()
    assert text.endswith("\n") and "125,0.71,0.7\n" not in text
    assert [r["step"] for r in read_log(run_dir / LOG_FILE)] == [25, 50, 75, 100, 125, 150]
    # a torn row that still parses (a number cut short) is also dropped: it has no newline
    with open(run_dir / LOG_FILE, "a") as handle:
        handle.write("175,0.5,0.5,0.001,80,")
    assert [r["step"] for r in read_log(run_dir / LOG_FILE)][-1] == 150


def test_orphan_temporaries_are_removed_on_resume_and_other_files_kept(tmp_path):
    run_dir = tmp_path / "r"
    Trainer(tiny(steps=50), run_dir, progress=False).train()
    orphans = [run_dir / ".checkpoint.safetensors.k9x.tmp", run_dir / ".log.csv.abc.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"\0" * 1000)  # what kill -9 during a write leaves
    (run_dir / "notes.txt").write_text("mine")
    Trainer(tiny(steps=100), run_dir, progress=False).train(resume=True)
    assert not any(o.exists() for o in orphans)
    assert (run_dir / "notes.txt").read_text() == "mine"


# -- hostile or damaged run files ---------------------------------------------------------------------------
def _rewrite_run_file(run_dir: Path, change) -> None:
    tensors, state = checkpoint.load_checkpoint(run_dir / RUN_FILE)
    change(tensors, state)
    checkpoint.save_checkpoint(run_dir / RUN_FILE, tensors, state)


HOSTILE = {
    "width 60000": lambda t, s: s["model"].update(width=60000),
    "depth 10**7": lambda t, s: s["model"].update(depth=10**7),
    "unknown model key": lambda t, s: s["model"].update(heads=4),
    "bool width": lambda t, s: s["model"].update(width=True),
    "model for other data": lambda t, s: s["model"].update(dim=3),
    "data_shape 10**9": lambda t, s: s.update(data_shape=[10**9]),
    "data_shape of strings": lambda t, s: s.update(data_shape=["2"]),
    "normalizer shape": lambda t, s: t.update(
        {"normalizer.shift": torch.zeros(3), "normalizer.scale": torch.ones(3)}
    ),
    "normalizer negative": lambda t, s: t.update({"normalizer.scale": -torch.ones(2)}),
    "held_out shape": lambda t, s: t.update(held_out=torch.zeros(5, 3)),
    "path name": lambda t, s: s.update(path={"name": "os.system"}),
    "path option": lambda t, s: s.update(path={"name": "ve", "sigma_max": "x"}),
    "config": lambda t, s: s["config"].update(width=-1),
    "loss floor": lambda t, s: s.update(loss_floor="x"),
}  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "r"
    Trainer(tiny(steps=20), run_dir, progress=False).train()
    return run_dir


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_run_descriptions_are_refused(finished_run, tmp_path, case, capsys):
    import shutil

    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir)
    _rewrite_run_file(run_dir, HOSTILE[case])
    start = time.perf_counter()
    with pytest.raises(ValueError, match="damaged|does not fit|weights"):
        load_run(run_dir)
    assert time.perf_counter() - start < 0.5
    code, _, err = run_cli(capsys, "sample", "--run", str(run_dir), "--out", str(tmp_path / "s.npy"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "s.npy").exists()


def test_hostile_checkpoint_is_refused(finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir)
    tensors, state = checkpoint.load_checkpoint(run_dir / CHECKPOINT_FILE)
    dropped = {k: v for k, v in tensors.items() if k != "ema.net.0.bias"}
    checkpoint.save_checkpoint(run_dir / CHECKPOINT_FILE, dropped, state)
    with pytest.raises(ValueError, match="weights"):
        load_run(run_dir)
    checkpoint.save_checkpoint(run_dir / CHECKPOINT_FILE, tensors, {**state, "step": "12"})
    with pytest.raises(ValueError, match="step"):
        load_run(run_dir)


@pytest.mark.parametrize("change", [{"width": 60000}, {"depth": 10**7}])
def test_a_hostile_model_size_is_refused_fast_and_small(finished_run, tmp_path, change):
    """In a fresh process: the refusal takes well under a second and allocates far less than the model."""
    import shutil

    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir)
    _rewrite_run_file(run_dir, lambda t, s: s["model"].update(change))
    script = (
        "import resource, sys, time\nfrom flowscore import load_run\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nstart = time.perf_counter()\n"
        "try:\n    load_run(sys.argv[1])\nexcept ValueError:\n    pass\nelse:\n    sys.exit(3)\n"
        "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(run_dir)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    seconds, grown_kib = out.stdout.split()
    files = sum(p.stat().st_size for p in run_dir.iterdir())
    assert float(seconds) < 0.5
    assert int(grown_kib) * 1024 < 4 * files + 64 * 2**20  # the model would be 3 x 60000^2 x 4 bytes = 43 GB


def test_a_model_too_large_for_memory_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="memory"):
        Trainer(tiny(width=65536, depth=256), tmp_path / "r", progress=False).train()
    with pytest.raises(ValueError, match="memory.*batch-size"):
        Trainer(tiny(batch_size=10**9), tmp_path / "r", progress=False).train()
    assert not (tmp_path / "r").exists()


def test_a_folder_left_by_a_writer_killed_before_writing_can_be_reused(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("12345\n")  # the lock of a process that no longer exists
    (run_dir / ".run.safetensors.x1.tmp").write_bytes(b"\0" * 10)
    argv = ["train", "--config", _toml(tmp_path), "--steps", "50", "--out", str(run_dir), "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert load_run(run_dir).step == 50 and not list(run_dir.glob(".*.tmp"))
