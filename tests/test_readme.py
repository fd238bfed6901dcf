"""Every code block of README.md runs as written (issue 17: a user walking the README).

Python blocks run with ``exec``, one fresh namespace per block, in a temporary working folder. Bash blocks
run line by line in a temporary folder of their own, in order (a later line uses the runs an earlier one
wrote): ``flowscore ...`` as ``python -m flowscore ...`` (consecutive such lines in one interpreter, each
through ``runpy.run_module("flowscore", run_name="__main__")``, which is what ``-m`` does: a fresh
interpreter per line would spend most of the test importing torch), ``torchrun ...`` as ``python -m
torch.distributed.run ...``, ``./run.sh ...`` as the real ``run.sh`` copied beside a stand-in ``.venv``
whose ``python`` is this interpreter (so its set-up finds everything installed and skips). Every line must
exit with status 0.

The README's commands show the defaults (e.g. 10,000 training steps); to keep this test short,
:data:`SMALLER` appends flags that shrink the work of the slow ones, documented per line. A line
missing from the table runs exactly as written; a table entry whose line left the README fails the test.
A block that fails today for a fault another change fixes is marked in :data:`XFAIL` (strict=False) with
the area that fixes it, so that the marker can be dropped once that lands.

Ground truth: the README itself (what a user types) and the exit status of each line; the numbers are
checked by the tests of each module.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 300

SMALLER: dict[str, str] = {
    "./run.sh demo": "--steps 200 --n 200",  # the demo at 200 training steps and 200 samples
    "./run.sh test": "--version",  # run.sh's set-up and its pytest, without running the suite in the suite
    "flowscore verify --data moons --path linear --objective cfm --json v.json --plot v.png": "--n-batches 2",
    "flowscore train  --data moons --out runs/moons": "--steps 200 --data-n 1000",
    "flowscore train  --data 8gaussians --coupling ot --out runs/ot": (
        "--steps 50 --data-n 1000 --no-loss-floor"
    ),
    "flowscore train  --out runs/moons --resume --steps 20000": "--steps 240",  # the last --steps wins
    "flowscore sample --run runs/moons --n 2000 --sampler sde --sampler-steps 200 --out s.npy --plot s.png": (
        "--n 200"
    ),
    "flowscore eval   --run runs/moons --n 1000 --json eval.json": "--n 100",
    "flowscore plot   --run runs/moons": "--n 100",
    "torchrun --standalone --nproc_per_node=2 -m flowscore train --data moons --out runs/ddp": (
        "--steps 20 --data-n 1200 --no-loss-floor"
    ),
    "flowscore train  --data digits --out runs/digits": (
        "--steps 10 --width 8 --batch-size 32 --no-loss-floor"
    ),
    "flowscore train  --data labelled.npz --out runs/cond": "--steps 100 --no-loss-floor",
    "flowscore eval   --run runs/cond": "--n 40",
    "flowscore train  --data moons --objective semigroup --out runs/sg": (
        "--steps 100 --data-n 1000 --no-loss-floor"
    ),
    "flowscore sample --run runs/sg --sampler-steps 1 --n 2000 --out x.npy": "--n 200",
    "flowscore train  --data 8gaussians --source moons --coupling ot --out runs/m2g": (
        "--steps 50 --data-n 1000 --batch-size 128"
    ),
    "flowscore sample --run runs/m2g --n 1000 --out m2g.npy --plot m2g.png": "--n 200",
    "flowscore train  --data 8gaussians --data-std none --sigma-min 0.1 --coupling ot --out runs/ot": (
        "--steps 50 --data-n 1000 --batch-size 128 --no-loss-floor"
    ),
    "flowscore train  --data mnist --out runs/mnist": "--steps 12 --data-n 600 --no-loss-floor",
    "flowscore sample --run runs/mnist --class 7 --guidance 1 --n 64 --out sevens.npy --plot sevens.png": (
        "--n 8 --sampler-steps 4"
    ),
    "flowscore eval   --run runs/mnist --n 1000 --no-likelihood --json mnist.json": "--n 12 --no-fid",
}
"""README line (its comment removed) -> flags appended to it here (argparse: a repeated flag's last value
wins). Each shrinks only the amount of work: steps, points, batches."""

XFAIL: dict[str, str] = {}
"""A line of a block -> why that block fails today (the block is marked xfail, strict=False)."""


def readme_blocks() -> list[tuple[str, int, str]]:
    """``(language, line number of the opening fence, code)`` of every fenced block of README.md."""
    blocks, lines = [], README.read_text().splitlines()
    start = language = None
    for number, line in enumerate(lines, 1):
        if start is None and line.startswith("```") and line.strip() != "```":
            start, language = number, line[3:].strip()
        elif start is not None and line.strip() == "```":
            blocks.append((language, start, "\n".join(lines[start : number - 1]) + "\n"))
            start = None
    return blocks


def commands(code: str) -> list[str]:
    """The command lines of a bash block, each without its trailing ``# comment``."""
    out = []
    for line in code.splitlines():
        line = re.sub(r"\s+#.*$", "", line).rstrip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _params() -> list:
    params = []
    for language, number, code in readme_blocks():
        marks = [pytest.mark.xfail(reason=why, strict=False) for key, why in XFAIL.items() if key in code]
        marks += [pytest.mark.slow] if language == "bash" else []  # processes that import torch
        params.append(pytest.param(language, code, id=f"{language}-line-{number}", marks=marks))
    return params


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return env


def _run_sh(folder: Path) -> Path:
    """A copy of run.sh in ``folder`` beside a copy of ``pyproject.toml`` and a stand-in ``.venv``
    whose ``python`` runs this interpreter, with the stamp run.sh writes after installing (so it installs
    nothing)."""
    script = folder / "run.sh"
    script.write_text((ROOT / "run.sh").read_text())
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (folder / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    python = folder / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    stamp = subprocess.run(
        "cat pyproject.toml | cksum", shell=True, cwd=folder, capture_output=True, text=True
    )
    (folder / ".venv" / ".flowscore-installed").write_text(stamp.stdout)
    return script


DRIVER = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = ["flowscore", *argv]
    try:
        runpy.run_module("flowscore", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    if code:
        print(f"exit status {code}: flowscore {' '.join(argv)}", file=sys.stderr)
        sys.exit(code)
"""
"""Runs ``flowscore`` command lines (a JSON list of argument lists) one after the other in this process,
as ``python -m flowscore`` runs one; stops at the first that exits non-zero, with its status."""


def words(line: str) -> list[str]:
    """A README line's words with :data:`SMALLER`'s flags appended."""
    return shlex.split(line) + shlex.split(SMALLER.get(line, ""))


def argv(line: str, folder: Path) -> list[str]:
    """The process to start for a README line that is not a ``flowscore`` line."""
    words_ = words(line)
    if words_[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words_[1:]]
    if words_[0] == "./run.sh":
        if not (folder / "run.sh").exists():
            _run_sh(folder)
        return [str(folder / "run.sh"), *words_[1:]]
    raise AssertionError(f"README line {line!r}: no rule to run it here; add one to tests/test_readme.py")


def labelled_npz(folder: Path) -> None:
    """The user's ``labelled.npz`` of the labels section: 8gaussians points and their mode as the class."""
    from flowscore.data import labelled_toy

    x, y = labelled_toy("8gaussians", 2000)
    np.savez(folder / "labelled.npz", x=x.numpy(), y=y.numpy())


@pytest.mark.parametrize(("language", "code"), _params())
def test_readme_block_runs_as_written(language: str, code: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if language == "python":
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})  # noqa: S102
        return
    assert language == "bash", f"README block in {language!r}: no rule to run it"
    if "labelled.npz" in code:
        labelled_npz(tmp_path)
    for what, process in processes(commands(code), tmp_path):
        result = subprocess.run(
            process, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
        )
        assert result.returncode == 0, f"{what} exited {result.returncode}:\n{result.stderr[-3000:]}"


def processes(lines: list[str], folder: Path) -> list[tuple[str, list[str]]]:
    """``(what, argv)`` per process for the lines of a bash block, in order: each run of consecutive
    ``flowscore`` lines in one :data:`DRIVER` process, every other line in its own."""
    out: list[tuple[str, list[str]]] = []
    batch: list[list[str]] = []
    for line in [*lines, None]:
        if line is not None and line.startswith("flowscore "):
            batch.append(words(line)[1:])
            continue
        if batch:
            what = f"the flowscore lines {[' '.join(argv[:1]) for argv in batch]}"
            out.append((what, [sys.executable, "-c", DRIVER, json.dumps(batch)]))
            batch = []
        if line is not None:
            out.append((repr(line), argv(line, folder)))
    return out


def test_every_smaller_entry_is_a_readme_line() -> None:
    lines = {line for language, _, code in readme_blocks() if language == "bash" for line in commands(code)}
    assert set(SMALLER) <= lines, sorted(set(SMALLER) - lines)
    assert all(any(key in code for _, _, code in readme_blocks()) for key in XFAIL)
