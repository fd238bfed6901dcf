"""``flowscore sample --sampler-steps`` (steps of the sampler) and the deprecated ``--steps``."""

from __future__ import annotations

import os

from conftest import run_cli


def test_sample_steps_is_a_deprecated_spelling_of_sampler_steps(tmp_path, capsys) -> None:
    """``sample --steps`` meant sampler steps while ``train --steps`` means training steps:
    ``--sampler-steps`` is the one spelling; ``--steps`` still parses, with one deprecation line on stderr;
    the two disagreeing is bad input (exit 2) before anything is written."""
    missing, out = str(tmp_path / "no-run"), str(tmp_path / "x.npy")
    code, _, err = run_cli(capsys, "sample", "--run", missing, "--steps", "5", "--out", out)
    lines = [line for line in err.splitlines() if "--steps is deprecated" in line]
    assert len(lines) == 1 and "--sampler-steps" in lines[0] and code == 2  # then: no such run
    code, _, err = run_cli(capsys, "sample", "--run", missing, "--sampler-steps", "5", "--out", out)
    assert code == 2 and "deprecated" not in err
    code, _, err = run_cli(
        capsys, "sample", "--run", missing, "--steps", "5", "--sampler-steps", "6", "--out", out
    )
    assert code == 2 and "differ" in err and not os.path.exists(out)
