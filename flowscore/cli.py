"""The ``flowscore`` command line: ``paths``, ``verify``, ``train``, ``sample``, ``eval``, ``plot``, ``demo``.

``flowscore --help`` and ``flowscore COMMAND --help`` list the flags. ``python -m flowscore`` is the same
program. Errors in the input (a missing file, NaN in the data, an unknown sampler, an existing ``--out``
without ``--resume``, ...) print exactly one line ``flowscore: error: <what is wrong>; <how to fix>`` on
stderr and exit with status 2; nothing is created before the input is checked, and every output file is
written atomically (a temporary file, then ``os.replace``). Ctrl-C prints one line and exits with 130.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import torch

from . import _io, demo
from .data import TOYS
from .paths import PATHS, get_path
from .samplers import SAMPLERS

OBJECTIVES = ("cfm", "dsm", "fm", "sm")
PREDICTIONS = ("velocity", "score", "noise", "data")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """Bad input: reported as one line ``flowscore: error: <what>; <fix>`` with exit status 2."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}; {fix}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with a one-line note on what was kept (exit status 130)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one-line :class:`CLIError` instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message, f"see `{self.prog} --help`")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- small helpers for files and runs ----------------------------------------------------------------------
def _check_output_file(file: str, suffix: str, flag: str) -> str:
    """An output path with the right suffix whose folder exists or can be created (checked, not created)."""
    if not file.endswith(suffix):
        raise CLIError(f"{flag} {file!r} must end in {suffix}", f"pass a file name like out{suffix}")
    if os.path.isdir(file):
        raise CLIError(
            f"{flag} {file!r} is a directory", f"pass a file name like {file.rstrip('/')}/out{suffix}"
        )
    parent = os.path.dirname(os.path.abspath(file))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise CLIError(
            f"{flag} {file!r} cannot be written ({parent!r} is not a writable folder)", "choose another path"
        )
    return file


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def load_run_or_fail(run_dir: str) -> Any:
    """``flowscore.training.load_run(run_dir)``, turning a missing or corrupt run into a :class:`CLIError`."""
    if not os.path.isdir(run_dir):
        raise CLIError(f"run dir {run_dir!r} does not exist", "pass the --out folder of `flowscore train`")
    from .training import load_run

    try:
        return load_run(run_dir)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # any failure to read a run means the folder is not a usable run
        raise CLIError(
            f"run dir {run_dir!r} is not a readable flowscore run ({_one_line(err)})",
            "pass the --out folder of a finished `flowscore train`, or train again",
        ) from None


# -- paths -------------------------------------------------------------------------------------------------
PATH_TABLE_TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)


def path_table(times: Sequence[float] = PATH_TABLE_TIMES) -> str:
    """Text table of alpha, beta, alpha', beta' and SNR = alpha^2 / beta^2 of each named path at ``times``."""
    header = (
        f"{'path':<10} {'t':>5} {'alpha':>10} {'beta':>10} {'alpha_dot':>10} {'beta_dot':>10} {'SNR':>10}"
    )
    lines = [header, "-" * len(header)]
    t = torch.tensor(times, dtype=torch.float64)
    for name in (n for n in PATHS if n != "custom"):
        path = get_path(name)
        alpha, beta, d_alpha, d_beta = path.alpha(t), path.beta(t), path.d_alpha(t), path.d_beta(t)
        with np.errstate(divide="ignore"):
            snr = np.divide(alpha.numpy() ** 2, beta.numpy() ** 2)
        for k, tk in enumerate(times):
            values = (alpha[k].item(), beta[k].item(), d_alpha[k].item(), d_beta[k].item(), snr[k])
            lines.append(f"{name:<10} {tk:>5.2f} " + " ".join(f"{float(v) + 0.0:>10.4g}" for v in values))
    return "\n".join(lines)


def path_schedules(n: int = 401) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """``(t, {name: {"alpha", "beta", "log_snr"}})`` on ``n`` times in [0, 1] for every named path."""
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    out = {}
    for name in (n for n in PATHS if n != "custom"):
        path = get_path(name)
        out[name] = {
            "alpha": path.alpha(t).numpy(),
            "beta": path.beta(t).numpy(),
            "log_snr": path.log_snr(t).numpy(),
        }
    return t.numpy(), out


def cmd_paths(args: argparse.Namespace) -> int:
    if args.plot:
        _check_output_file(args.plot, ".png", "--plot")
    print(path_table())
    if args.plot:
        from .plots import plot_paths

        t, schedules = path_schedules()
        plot_paths(t, schedules, args.plot)
        print(f"wrote {args.plot}")
    return 0


# -- verify ------------------------------------------------------------------------------------------------
def _add_verify(sub: Any) -> None:
    parser = sub.add_parser("verify", help="check the formulas and losses numerically against ground truth")
    try:
        from . import verify
    except ImportError as err:
        message = _one_line(err)

        def unavailable(_: argparse.Namespace) -> int:
            raise CLIError(f"verify is not available ({message})", "reinstall flowscore")

        parser.set_defaults(func=unavailable)
        return
    verify.add_arguments(parser)
    parser.set_defaults(func=verify.main)


# -- train -------------------------------------------------------------------------------------------------
TRAIN_FLAGS = {  # flag dest -> TrainConfig field
    "data": "data",
    "path": "path",
    "objective": "objective",
    "prediction": "prediction",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "seed": "seed",
    "checkpoint_every": "checkpoint_every",
}


def _toml_values(file: str) -> dict[str, Any]:
    """The TrainConfig fields in a ``--config`` TOML file, not yet validated."""
    from .training import TrainConfig

    try:
        return TrainConfig.read_toml(file)
    except ValueError as err:
        raise CLIError(f"--config: {_one_line(err)}", "pass a TOML file of TrainConfig fields") from None


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given explicitly on the command line."""
    return {
        field: getattr(args, dest) for dest, field in TRAIN_FLAGS.items() if getattr(args, dest) is not None
    }


def train_config(args: argparse.Namespace) -> Any:
    """The new run's ``TrainConfig``: defaults < ``--config`` TOML < explicit flags."""
    from .training import TrainConfig

    values = _toml_values(args.config) if args.config else {}
    values.update(_flag_values(args))
    if not values.get("data"):
        raise CLIError("no data set given", "pass --data NAME (e.g. moons) or --data FILE.npy")
    return TrainConfig.from_dict(values)


def resume_config(args: argparse.Namespace) -> Any:
    """The stored config of the run in ``--out`` with the explicit flags (and ``--config``) applied.

    The trainer refuses changes other than ``training.RESUMABLE_CHANGES`` (e.g. ``--steps``, a new total).
    """
    from .training import RUN_FILE, TrainConfig, Trainer

    if not os.path.isfile(os.path.join(args.out, RUN_FILE)):
        raise CLIError(
            f"--resume given but {args.out!r} is not a flowscore run (no {RUN_FILE})",
            "pass the --out folder of an earlier `flowscore train`, or drop --resume",
        )
    try:
        stored = Trainer.resume(args.out, progress=False).config.to_dict()
    except Exception as err:  # an unreadable run file means the folder is not a usable run
        raise CLIError(
            f"run dir {args.out!r} is not a readable flowscore run ({_one_line(err)})",
            "start a new run with another --out",
        ) from None
    stored.update(_toml_values(args.config) if args.config else {})
    stored.update(_flag_values(args))
    return TrainConfig.from_dict(stored)


def _check_train_out(run_dir: str, resume: bool) -> None:
    if resume and not os.path.isdir(run_dir):
        raise CLIError(
            f"--resume given but run dir {run_dir!r} does not exist", "drop --resume to start a new run"
        )
    if not resume and os.path.exists(run_dir) and (not os.path.isdir(run_dir) or os.listdir(run_dir)):
        raise CLIError(
            f"--out {run_dir!r} already exists", "pass --resume to continue that run, or choose a new --out"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from .training import CHECKPOINT_FILE, Trainer

    run_dir = args.out
    _check_train_out(run_dir, args.resume)
    config = resume_config(args) if args.resume else train_config(args)
    created = not os.path.exists(run_dir)
    try:
        result = Trainer(config, run_dir, progress=not args.no_progress).train(resume=args.resume)
    except KeyboardInterrupt:
        if created and not os.path.isfile(os.path.join(run_dir, CHECKPOINT_FILE)):
            shutil.rmtree(run_dir, ignore_errors=True)
            raise Interrupted("interrupted before the first checkpoint; the run was removed") from None
        raise Interrupted(f"interrupted; continue with `flowscore train --out {run_dir} --resume`") from None
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    floor = result.get("loss_floor")
    floor_text = "" if floor is None else f", loss floor {floor:.4g}"
    print(f"trained {run_dir}: step {result['step']}, loss (EMA) {result['loss_ema']:.4g}{floor_text}")
    return 0


# -- sample, eval, plot, demo ------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    _check_output_file(args.out, ".npy", "--out")
    if args.plot:
        _check_output_file(args.plot, ".png", "--plot")
    run = load_run_or_fail(args.run)
    x = demo.sample_run(run, args.n, sampler=args.sampler, steps=args.steps, seed=args.seed)
    if not np.isfinite(x).all():
        raise CLIError(
            f"the {args.sampler} sampler produced NaN or Inf",
            "use more --steps, or another --sampler (e.g. heun or rk4)",
        )
    _io.save_npy(args.out, x)
    print(
        f"wrote {args.out}: {x.shape[0]} samples of shape {tuple(x.shape[1:])} ({args.sampler}, data space)"
    )
    if args.plot:
        from . import plots

        held = np.asarray(torch.as_tensor(run.held_out).float())
        if x.ndim == 2 and x.shape[1] == 2:
            plots.plot_samples({f"{args.sampler} samples": x}, held[: max(2000, len(x))], args.plot)
        elif x.ndim == 4:
            plots.plot_image_grid(
                x[:64], args.plot, title=f"{args.sampler} samples", value_range=demo.image_range(run)
            )
        else:
            raise CLIError(
                f"--plot needs 2D points or images, got samples of shape {x.shape[1:]}", "drop --plot"
            )
        print(f"wrote {args.plot}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.json:
        _check_output_file(args.json, ".json", "--json")
    run = load_run_or_fail(args.run)
    result = demo.evaluate_run(run, n=args.n, seed=args.seed)
    print(demo.format_eval(result))
    if args.json:
        _io.save_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    out_dir = args.out or os.path.join(args.run, "plots")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CLIError(f"--out {out_dir!r} exists and is not a folder", "pass a folder for the PNGs")
    run = load_run_or_fail(args.run)
    for file in demo.plot_run(run, out_dir, n=args.n, seed=args.seed):
        print(f"wrote {file}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    replace = demo.prepare_demo_dir(args.out)
    if replace:
        print(f"note: replacing the earlier demo in {args.out}/ (a demo overwrites its own folder)")
    result = demo.run_demo(
        args.out, data=args.data, steps=args.steps, seed=args.seed, n=args.n, progress=not args.no_progress
    )
    for file in result.files:
        print(f"wrote {file}")
    print()
    print(demo.format_eval(result.metrics))
    print(f"run: {result.run_dir}   samples: {args.out}/samples_ode.npy, {args.out}/samples_sde.npy")
    return 0


# -- registration ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``flowscore`` argument parser with all subcommands."""
    parser = _Parser(
        prog="flowscore",
        description="Flow matching and diffusion objectives on Gaussian paths (t = 0 noise, t = 1 data).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "paths", help="table (and plot) of alpha_t, beta_t, their derivatives and SNR per path"
    )
    p.add_argument("--plot", metavar="FILE.png", help="also write a PNG of alpha_t, beta_t and log-SNR")
    p.set_defaults(func=cmd_paths)

    _add_verify(sub)

    p = sub.add_parser("train", help="train a model (defaults train a good 2D model)")
    p.add_argument("--data", help="a toy name (moons, 8gaussians, ...) or a file (.npy)")
    p.add_argument("--path", choices=[n for n in PATHS if n != "custom"], help="Gaussian path")
    p.add_argument("--objective", choices=OBJECTIVES, help="training objective")
    p.add_argument("--prediction", choices=PREDICTIONS, help="what the network predicts")
    p.add_argument("--steps", type=_positive, help="training steps (with --resume: the new total)")
    p.add_argument("--batch-size", type=_positive)
    p.add_argument("--lr", type=_positive_float, help="learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=_positive, help="steps between checkpoints")
    p.add_argument("--config", metavar="FILE.toml", help="TrainConfig fields; explicit flags override it")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples of a trained run (saved in data space)")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--n", type=_positive, default=1000, help="number of samples (default 1000)")
    p.add_argument("--sampler", choices=SAMPLERS, default="heun", help="ODE solver or sde (default heun)")
    p.add_argument("--steps", type=_positive, help="solver steps (default 100 for ODEs, 500 for sde)")
    p.add_argument("--out", required=True, metavar="FILE.npy")
    p.add_argument(
        "--plot", metavar="FILE.png", help="also plot the samples (2D: vs held-out data; images: grid)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="W2 and MMD to held-out data next to their floors, and held-out NLL")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument(
        "--n", type=_positive, default=2000, help="points per set (capped at half the held-out data)"
    )
    p.add_argument("--json", metavar="FILE.json", help="also write the numbers as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "plot", help="PNGs of a run: loss and floor, samples, trajectories, field / image grid"
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--out", metavar="DIR", help="folder for the PNGs (default RUN_DIR/plots)")
    p.add_argument("--n", type=_positive, default=2000, help="2D samples per sampler to plot (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="train on a 2D toy, sample by ODE and SDE, plot, print W2 vs its floor")
    p.add_argument(
        "--out", default="demo-out", metavar="DIR", help="demo folder (an earlier demo there is replaced)"
    )
    p.add_argument("--data", default="moons", choices=TOYS, help="2D toy data set (default moons)")
    p.add_argument("--steps", type=_positive, help="training steps (default: the trainer's default)")
    p.add_argument("--n", type=_positive, default=2000, help="samples per sampler for W2 (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except CLIError as err:
        return _fail(str(err))
    except (ValueError, OSError) as err:
        return _fail(f"{_one_line(err)}; check the arguments (see `flowscore --help`)")
    except KeyboardInterrupt as err:
        note = _one_line(err) if isinstance(err, Interrupted) else "interrupted"
        print(f"flowscore: {note}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(message: str) -> int:
    print(f"flowscore: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT
