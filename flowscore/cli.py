"""The ``flowscore`` command line: ``paths``, ``verify``, ``train``, ``sample``, ``eval``, ``plot``, ``demo``.

``flowscore --help`` and ``flowscore COMMAND --help`` list the flags; ``flowscore --version`` the version.
``python -m flowscore`` is the same program. ``flowscore train`` has one flag per field of
:class:`flowscore.config.TrainConfig`, generated from the dataclass (its types, defaults and help text).

Exit status and messages: errors in the input (a missing file, NaN in the data, an unknown sampler, an
existing ``--out`` without ``--resume``, a run folder another process is writing, a job that cannot fit in
memory, ...) print exactly one line ``flowscore: error: <what is wrong>; <how to fix>`` on stderr and exit
with status 2; nothing is created before the input is checked, and every output file is written atomically
(a temporary file, then ``os.replace``). A failure while working (a full disk, a diverging training) prints
one line naming the cause and what was kept, and exits with status 1. Ctrl-C prints one line and exits
with 130; SIGTERM the same line, with 143 (from the program's first moment: :mod:`flowscore._main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np
import torch

from . import __version__, _io, config, flowmaps, runs, workflows
from . import data as datasets
from .data import TOYS
from .grids import GRIDS
from .paths import PATHS, get_path
from .samplers import (
    ANY_SOURCE_SAMPLERS,
    DEFAULT_GRID,
    DEFAULT_ODE_SAMPLER,
    DEFAULT_ODE_STEPS,
    DEFAULT_SDE_STEPS,
    SAMPLERS,
    SDE_SAMPLERS,
)
from .sbcfm import default_sampler

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
PROGRESS_HELP = "no progress on stderr (a bar per long step, or one line per step when not a terminal)"


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
    """An output path with the right suffix whose folder exists or can be created (checked, not created):
    :func:`flowscore._io.check_output_file` as a :class:`CLIError`."""
    try:
        return _io.check_output_file(file, flag, suffix)
    except ValueError as err:
        what, _, fix = str(err).partition("; ")
        raise CLIError(what, fix or "choose another path") from None


def _integer(value: str, minimum: int = 1) -> int:
    """An integer ``>= minimum`` written as ``12``, ``1e8`` or ``1_000`` (a float form must be whole)."""
    text = value.strip().replace("_", "")
    try:
        number = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            as_float = math.nan
        if not (math.isfinite(as_float) and as_float == int(as_float)):
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}") from None
        number = int(as_float)
    if number < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
    return number


def _positive(value: str) -> int:
    return _integer(value, 1)


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def _check_free_space(file: str, size: float, flag: str) -> None:
    """CLIError when the folder of ``file`` (or its nearest existing parent) has fewer than ``size`` bytes
    free."""
    parent = os.path.dirname(os.path.abspath(file))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if size > free:
        raise CLIError(
            f"{flag} {file!r} needs about {size / 2**20:.4g} MiB but {parent!r} has "
            f"{free / 2**20:.4g} MiB free",
            "free some space or write elsewhere",
        )


def load_run_or_fail(run_dir: str) -> Any:
    """``flowscore.runs.load_run(run_dir)``, turning a missing or corrupt run into a :class:`CLIError`."""
    if not os.path.isdir(run_dir):
        raise CLIError(f"run dir {run_dir!r} does not exist", "pass the --out folder of `flowscore train`")
    try:
        return runs.load_run(run_dir)
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
        from . import verify  # noqa: F401  (its dependencies are present)
    except ImportError as err:
        message = _one_line(err)

        def unavailable(_: argparse.Namespace) -> int:
            raise CLIError(f"verify is not available ({message})", "reinstall flowscore")

        parser.set_defaults(func=unavailable)
        return
    add_verify_arguments(parser)
    parser.set_defaults(func=cmd_verify)


def add_verify_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``verify`` flags to ``parser`` (values are checked by :func:`check_verify_arguments`, so
    that every bad one is reported as one line naming it and its fix)."""
    from . import verify as v
    from .data import IMAGE_SETS

    aliases = ", ".join(f"{a} = {c}" for a, c in v.VERIFY_ALIASES.items())
    data_help = (
        f"toy name ({', '.join(TOYS)}), {', '.join(IMAGE_SETS)}, or an .npy/.npz file (N, D) or (N, C, H, W)"
    )
    parser.add_argument("--data", default="moons", help=f"{data_help} (default moons)")
    parser.add_argument(
        "--path", default="linear", choices=[n for n in PATHS if n != "custom"],
        help="Gaussian path (default linear)",
    )  # fmt: skip
    parser.add_argument(
        "--objective", default="cfm", choices=(*v.VERIFY_OBJECTIVES, *v.VERIFY_ALIASES),
        help=f"cfm (checked against fm), dsm (against sm), or the flow maps meanflow, semigroup, lagrangian "
        f"(their target with the conditional velocity against the exact marginal one); aliases {aliases}; "
        "the JSON file echoes the name given (default cfm)",
    )  # fmt: skip
    parser.add_argument(
        "--target-se", type=float, default=v.DEFAULT_TARGET_SE,
        help=f"grow the sample until the relative std. error is at most this (default {v.DEFAULT_TARGET_SE})",
    )  # fmt: skip
    parser.add_argument(
        "--max-samples", type=int, default=v.DEFAULT_MAX_SAMPLES,
        help=f"... or this many draws are used (default {v.DEFAULT_MAX_SAMPLES})",
    )  # fmt: skip
    parser.add_argument(
        "--n-batches", type=int, default=None, help="a fixed number of batches instead (no early stop)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=v.DEFAULT_BATCH_SIZE,
        help=f"draws per batch (default {v.DEFAULT_BATCH_SIZE})",
    )  # fmt: skip
    parser.add_argument(
        "--n-data", type=int, default=v.DEFAULT_N_DATA,
        help=f"at most this many data points (default {v.DEFAULT_N_DATA})",
    )  # fmt: skip
    eps = v.DEFAULT_T_EPS
    parser.add_argument(
        "--t-eps", type=float, default=None,
        help=f"t in [t_eps, 1 - t_eps], t_eps >= {v.MIN_T_EPS:g} (default {eps['cfm']:g} cfm and the flow "
        f"maps; {eps['dsm']:g} dsm)",
    )  # fmt: skip
    parser.add_argument(
        "--labels", action="store_true",
        help="check the class-conditional theorems: the network sees the data set's labels (digits, mnist, "
        "a .npz with 'y', a toy's components)",
    )  # fmt: skip
    parser.add_argument(
        "--plain", action="store_true",
        help="no variance reduction (independent noise, no control variate, uniform t)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="network, data subset and draws (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads during the run (default 1)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results to this JSON file")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="write a two-panel figure (PNG)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_verify_arguments(args: argparse.Namespace) -> None:
    """Every ``verify`` argument checked before the run: one ``ValueError`` naming the first bad one and its
    fix."""
    from . import _validate
    from . import verify as v
    from .losses import objective_name

    objective_name(args.objective, v.VERIFY_OBJECTIVES)
    get_path(args.path)
    _validate.number(args.target_se, "--target-se", 0.0, math.inf, low_open=True)
    batch = _validate.integer(args.batch_size, "--batch-size", minimum=2)
    if not args.plain and batch % 2:
        raise ValueError(f"--batch-size must be even with antithetic noise, got {batch}; pass an even number")
    if args.n_batches is None:
        _validate.integer(args.max_samples, "--max-samples", minimum=2 * batch)
    else:
        _validate.integer(args.n_batches, "--n-batches", minimum=2)
    _validate.positive_int(args.n_data, "--n-data")
    if args.t_eps is not None:
        _validate.number(args.t_eps, "--t-eps", v.MIN_T_EPS, 0.5, high_open=True)
    _validate.positive_int(args.threads, "--threads")
    outputs = [(flag, file) for flag, file in (("--json", args.json), ("--plot", args.plot)) if file]
    data_file = os.path.abspath(args.data) if os.path.splitext(args.data)[1] in (".npy", ".npz") else None
    for flag, file in outputs:
        _io.check_output_file(file, flag, ".png" if flag == "--plot" else None)
        if data_file is not None and os.path.abspath(file) == data_file:
            raise ValueError(f"{flag} {file!r} is the data file; choose another output path")
    if len(outputs) == 2 and os.path.abspath(args.json) == os.path.abspath(args.plot):
        raise ValueError(f"--json and --plot are the same file {args.json!r}; choose two paths")
    if args.plot:
        from .plots import _pyplot

        _pyplot()  # matplotlib present?


def cmd_verify(args: argparse.Namespace, print_fn: Callable[[str], None] = print) -> int:
    """``flowscore verify``: check the arguments, run :func:`flowscore.verify.run_verify`, print its table
    (``print_fn``) and write ``--json`` / ``--plot``; 0 on any verdict (errors: :func:`main`'s handling)."""
    from . import verify as v

    check_verify_arguments(args)
    if args.labels:
        points, labels = v.load_labels(args.data, args.n_data, args.seed)
    else:
        points, labels = v.load_points(args.data, args.n_data, args.seed), None
    result = v.run_verify(
        points, args.path, args.objective, labels=labels, n_data=args.n_data, batch_size=args.batch_size,
        target_se=args.target_se, max_samples=args.max_samples, n_batches=args.n_batches,
        antithetic=not args.plain, control_variate=not args.plain, importance=not args.plain, seed=args.seed,
        t_eps=args.t_eps, normalize=False,  # done above
        num_threads=args.threads, progress=not args.no_progress,
    )  # fmt: skip
    print_fn(v.format_table(result))
    if args.json:
        v.write_json(result, args.json)
    if args.plot:
        v.write_plot(result, args.plot)
    return 0


# -- train -------------------------------------------------------------------------------------------------
def _default_text(name: str) -> str:
    """The ``(default: ...)`` of a TrainConfig field, read from the dataclass and the per-data defaults."""
    value = config.field_default(name)
    if name == "source":
        return "(default: empty, the standard normal N(0, I))"
    if name in config.PER_DATA_FIELDS or name == "width":
        parts = [f"{config.VECTOR_DEFAULTS[name]:g} (vectors)" if name != "width" else "none (vectors)"]
        for objective, values in config.OBJECTIVE_VECTOR_DEFAULTS.items():
            if name in values:
                parts.append(f"{values[name]:g} ({objective} on vectors)")
        for data, shape in config.IMAGE_SHAPES.items():
            presets = config.IMAGE_PRESETS[config.image_size_class(shape)]
            parts.append(f"{data}: " + "/".join(f"{presets[p][name]:g}" for p in config.PRESETS[1:]))
        return f"(default: {'; '.join(parts)}; images by --preset {'/'.join(config.PRESETS[1:])})"
    if value == "":
        return "(required)"
    if value is None:
        return "(default: none)"
    if isinstance(value, bool):
        return f"(default: {str(value).lower()})"
    if isinstance(value, dict):
        return f"(default: {json.dumps(value)})"
    return f"(default: {value})"


def _field_parser(name: str, base: type, optional: bool) -> Callable[[str], Any]:
    """The argparse ``type`` of a TrainConfig field: ints (also ``1e4``), floats, JSON dicts, choices, and
    ``none`` for fields that accept None."""
    choices = config.CHOICES.get(name)

    def parse(value: str) -> Any:
        if optional and value.strip().lower() == "none":
            return None
        if choices is not None:
            if value not in choices:
                raise argparse.ArgumentTypeError(
                    f"expected one of {', '.join(choices)}{', none' if optional else ''}; got {value!r}"
                )
            return value
        if base is int:
            return _integer(value, minimum=0)
        if base is float:
            return _number(value)
        if base is dict:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"a\": 1}}', got {value!r}")
            return parsed
        return value

    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`~flowscore.config.TrainConfig` (``--batch-size`` for ``batch_size``):
    its type and allowed values from the dataclass, its help from ``config.FIELD_HELP`` and its default from
    the dataclass. A flag left out does not override ``--config`` (argparse.SUPPRESS)."""
    types = config.field_types()
    for f in dataclasses.fields(config.TrainConfig):
        base, optional = types[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{config.FIELD_HELP.get(f.name, f.name)} {_default_text(f.name)}"
        if base is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=help_text,
            )  # fmt: skip
            continue
        choices = config.CHOICES.get(f.name)
        metavar = (
            "{" + ",".join((*choices, "none") if optional else choices) + "}"
            if choices
            else {int: "N", float: "X", dict: "JSON", str: "TEXT"}.get(base, "VALUE")
        )
        parser.add_argument(
            flag, dest=f.name, type=_field_parser(f.name, base, optional), default=argparse.SUPPRESS,
            metavar=metavar, help=help_text,
        )  # fmt: skip


PATH_OPTION_FLAGS = ("sigma_min", "sigma_max")
"""Path options with a flag of their own (``--sigma-min 0.1`` for ``--path-options '{"sigma_min": 0.1}'``):
the linear path's minimum noise (Lipman et al.'s sigma_min) and the ve path's noise range."""


def add_path_option_flags(parser: argparse.ArgumentParser) -> None:
    """``--sigma-min X`` and ``--sigma-max X``: one key of ``path_options`` each (merged into
    ``--path-options``; the path checks that it takes the option)."""
    for name in PATH_OPTION_FLAGS:
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=_number, default=argparse.SUPPRESS, metavar="X",
            help=f"the path option {name} (linear: sigma_min in [0, 1); ve: sigma_min < sigma_max), short "
            f"for --path-options '{{\"{name}\": X}}'",
        )  # fmt: skip


def _toml_values(file: str) -> dict[str, Any]:
    """The TrainConfig fields in a ``--config`` TOML file, not yet validated."""
    try:
        return config.TrainConfig.read_toml(file)
    except ValueError as err:
        raise CLIError(f"--config: {_one_line(err)}", "pass a TOML file of TrainConfig fields") from None


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given explicitly on the command line."""
    names = [f.name for f in dataclasses.fields(config.TrainConfig)]
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _with_flags(values: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``values`` (defaults, ``--config``, a stored run's) updated by the explicit flags; ``--sigma-min`` and
    ``--sigma-max`` are merged into the ``path_options`` so far."""
    values = {**values, **_flag_values(args)}
    options = {name: getattr(args, name) for name in PATH_OPTION_FLAGS if hasattr(args, name)}
    if options:
        values["path_options"] = {**(values.get("path_options") or {}), **options}
    return values


def train_config(args: argparse.Namespace) -> config.TrainConfig:
    """The new run's ``TrainConfig``: defaults < ``--config`` TOML < explicit flags."""
    values = _with_flags(_toml_values(args.config) if args.config else {}, args)
    if not values.get("data"):
        raise CLIError("no data set given", "pass --data NAME (e.g. moons) or --data FILE.npy")
    return config.TrainConfig.from_dict(values)


def resume_config(args: argparse.Namespace) -> config.TrainConfig:
    """The stored config of the run in ``--out`` with the explicit flags (and ``--config``) applied.

    The trainer refuses changes other than ``config.RESUMABLE_CHANGES`` (e.g. ``--steps``, a new total).
    """
    if not os.path.isfile(os.path.join(args.out, runs.RUN_FILE)):
        raise CLIError(
            f"--resume given but {args.out!r} is not a flowscore run (no {runs.RUN_FILE})",
            "pass the --out folder of an earlier `flowscore train`, or drop --resume",
        )
    try:
        stored = runs.stored_config(args.out).to_dict()
    except ValueError as err:
        raise CLIError(
            f"run dir {args.out!r} is not a readable flowscore run ({_one_line(err)})",
            "start a new run with another --out",
        ) from None
    stored.update(_toml_values(args.config) if args.config else {})
    return config.TrainConfig.from_dict(_with_flags(stored, args))


def _check_train_out(run_dir: str, resume: bool) -> None:
    try:
        _io.check_output_dir(run_dir, "--out")
    except ValueError as err:
        raise CLIError(_one_line(err), "choose another --out") from None
    if resume and not os.path.isdir(run_dir):
        raise CLIError(
            f"--resume given but run dir {run_dir!r} does not exist", "drop --resume to start a new run"
        )
    if not resume and os.path.exists(run_dir) and not runs.holds_nothing(run_dir):
        raise CLIError(
            f"--out {run_dir!r} already exists", "pass --resume to continue that run, or choose a new --out"
        )


def _print_warning(message, category, *_args, **_kwargs) -> None:
    """A warning as one line on stderr (``warning: ...``), without the source location."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from .training import Trainer

    run_dir = args.out
    _check_train_out(run_dir, args.resume)
    cfg = resume_config(args) if args.resume else train_config(args)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            result = Trainer(cfg, run_dir, progress=not args.no_progress).train(resume=args.resume)
    except KeyboardInterrupt:
        step = runs.checkpoint_step(run_dir)
        if step is None:
            raise Interrupted("interrupted before the first checkpoint; nothing was kept") from None
        raise Interrupted(
            f"interrupted; the checkpoint of step {step} is kept; continue with "
            f"`flowscore train --out {run_dir} --resume`"
        ) from None
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun the first process reports
    from .floor import excess_text

    floor = excess_text(
        result["loss_ema"], result.get("loss_floor"), result.get("loss_floor_standard_error"),
        result.get("loss_floor_absent"),
    )  # fmt: skip
    print(f"trained {run_dir}: step {result['step']}, loss (EMA) {result['loss_ema']:.4g}; {floor}")
    print(normalisation_text(result.get("normalisation")))
    return 0


def normalisation_text(normalisation: dict[str, Any] | None) -> str:
    """One line saying how the run's data (and source) were scaled (``_Prepared.normalisation``)."""
    if not normalisation:
        return "normalisation: as stored before runs recorded it"
    std, sigma = normalisation.get("data_std"), normalisation.get("sigma_data")
    if std is None:
        return (
            f"normalisation: none, trained in data units (preconditioning sigma_data = {sigma:.4g}, measured)"
        )
    if normalisation.get("shared_with_source"):
        return (
            f"normalisation: data and source share one map, a shift and one scale, to a pooled std of "
            f"{std:g} "
            "(vectors; images: the pooled pixel range to [-1, 1])"
        )
    return f"normalisation: vector features scaled to std {std:g} (images: pixel range to [-1, 1])"


# -- sample, eval, plot, demo ------------------------------------------------------------------------------
def _sampler_steps(args: argparse.Namespace) -> int | None:
    """``--sampler-steps``, or the deprecated ``sample --steps`` (one line on stderr says so)."""
    if args.steps is None:
        return args.sampler_steps
    print(
        "flowscore sample: --steps is deprecated, use --sampler-steps (steps of the sampler; train --steps "
        "counts training steps)",
        file=sys.stderr,
    )
    if args.sampler_steps is not None and args.sampler_steps != args.steps:
        raise CLIError(
            f"--steps {args.steps} and --sampler-steps {args.sampler_steps} differ",
            "pass --sampler-steps only",
        )
    return args.steps


def cmd_sample(args: argparse.Namespace) -> int:
    steps = _sampler_steps(args)
    _check_output_file(args.out, ".npy", "--out")
    if args.plot:
        _check_output_file(args.plot, ".png", "--plot")
    run = load_run_or_fail(args.run)
    if args.plot:
        try:
            workflows.plot_kind(run.data_shape)
        except ValueError as err:
            raise CLIError(f"--plot: {_one_line(err)}", "drop --plot") from None
    try:
        workflows.check_class(run, args.label, args.guidance)
    except ValueError as err:
        raise CLIError(f"--class/--guidance: {_one_line(err)}", "see `flowscore sample --help`") from None
    x_init = _read_x_init(args.x_init, args.n) if args.x_init else None
    args.n = args.n or (1000 if x_init is None else x_init.shape[0])
    try:
        if x_init is not None:
            workflows.start_points(run, args.n, x_init)
        if (
            run.source is not None
            and args.sampler in SDE_SAMPLERS
            and args.sampler not in ANY_SOURCE_SAMPLERS
        ):
            raise ValueError(
                f"this run was trained from a data source ({run.source['name']}); SDE sampling needs the "
                "score "
                "of a Gaussian source"
            )
    except ValueError as err:
        raise CLIError(
            f"--x-init/--sampler: {_one_line(err)}", "use an ODE --sampler; see docs/theory.md 17"
        ) from None
    labels_file = None
    if run.labelled and args.label is None:
        labels_file = args.out[: -len(".npy")] + ".labels.npy"
    workflows.check_sample_memory(run, args.n, sampler=args.sampler, steps=steps)
    _check_free_space(args.out, args.n * (4 * math.prod(run.data_shape) + 8) + 8192, "--out")
    sampler = args.sampler or default_sampler(run.model)
    if getattr(run.model, "two_time", False):  # a flow-map run: jumps (flowscore.flowmaps)
        sampler = f"{steps or flowmaps.DEFAULT_JUMPS} flow-map jump(s)"
    x, labels = workflows.sample_run(
        run, args.n, sampler=args.sampler, steps=steps, grid=args.grid, seed=args.seed,
        threads=args.threads, progress=not args.no_progress, label=args.label, guidance=args.guidance,
        return_labels=True, x_init=x_init,
    )  # fmt: skip
    if not np.isfinite(x).all():
        raise CLIError(
            f"the {sampler} sampler produced NaN or Inf",
            "use more --sampler-steps, or another --sampler (e.g. heun or rk4)",
        )
    outputs = [args.out] + ([labels_file] if labels_file else []) + ([args.plot] if args.plot else [])
    with _io.atomic_paths(*outputs) as files:  # all of them, or none (a full disk fails the last one)
        _io.save_npy(files[0], x)
        if labels_file is not None:
            _io.save_npy(files[1], labels)
        if args.plot:
            workflows.plot_sample_file(
                run, x, files[-1], sampler=sampler, label=args.label, guidance=args.guidance
            )
    which = ""
    if run.labelled:
        which = f", class {args.label}" if args.label is not None else ", classes drawn from the training mix"
        which += f", guidance {args.guidance:g}" if args.guidance else ""
    print(
        f"wrote {args.out}: {x.shape[0]} samples of shape {tuple(x.shape[1:])} ({sampler}{which}, data space)"
    )
    if labels_file is not None:
        print(f"wrote {labels_file}: the class of each sample")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _read_x_init(file: str, n: int | None) -> np.ndarray:
    """The start points of ``--x-init`` (a ``.npy``/``.npz`` array, read as ``--data`` reads one)."""
    try:
        points = datasets.load(file).numpy()
    except ValueError as err:
        raise CLIError(
            f"--x-init: {_one_line(err)}", "pass a .npy file of start points (N, *data_shape)"
        ) from None
    if n is not None and n != points.shape[0]:
        raise CLIError(
            f"--n {n} but --x-init holds {points.shape[0]} points", "drop --n (it is their number)"
        )
    return points


def cmd_eval(args: argparse.Namespace) -> int:
    if args.json:
        _check_output_file(args.json, ".json", "--json")
    run = load_run_or_fail(args.run)
    result = workflows.evaluate_run(
        run, n=args.n, seed=args.seed, likelihood=not args.no_likelihood, threads=args.threads,
        fid=not args.no_fid, sde=args.sde, progress=not args.no_progress,
    )  # fmt: skip
    print(workflows.format_eval(result))
    if args.json:
        _io.save_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    out_dir = args.out or os.path.join(args.run, "plots")
    try:
        _io.check_output_dir(out_dir, "--out")
    except ValueError as err:
        raise CLIError(_one_line(err), "pass a writable folder for the PNGs") from None
    run = load_run_or_fail(args.run)
    files = workflows.plot_run(
        run, out_dir, n=args.n, seed=args.seed, threads=args.threads, progress=not args.no_progress
    )
    for file in files:
        print(f"wrote {file}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    if demo.prepare_demo_dir(args.out):
        print(f"note: replacing the earlier demo in {args.out}/ once the new one is complete")
    result = demo.run_demo(
        args.out, data=args.data, steps=args.steps, seed=args.seed, n=args.n, progress=not args.no_progress,
        threads=args.threads,
    )  # fmt: skip
    for file in result.files:
        print(f"wrote {file}")
    print()
    print(workflows.format_eval(result.metrics))
    print(f"run: {result.run_dir}   samples: {args.out}/samples_ode.npy, {args.out}/samples_sde.npy")
    return 0


# -- registration ------------------------------------------------------------------------------------------
def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=_threads, default=None,
        help="torch CPU threads (default: chosen from the work, one for small models)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``flowscore`` argument parser with all subcommands."""
    parser = _Parser(
        prog="flowscore",
        description="Flow matching and diffusion objectives on Gaussian paths (t = 0 noise, t = 1 data).",
    )
    parser.add_argument("--version", action="version", version=f"flowscore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "paths", help="table (and plot) of alpha_t, beta_t, their derivatives and SNR per path"
    )
    p.add_argument("--plot", metavar="FILE.png", help="also write a PNG of alpha_t, beta_t and log-SNR")
    p.set_defaults(func=cmd_paths)

    _add_verify(sub)

    p = sub.add_parser(
        "train",
        help="train a model (defaults train a good 2D model)",
        description="Train a model into a run folder. Every TrainConfig field is a flag; a flag overrides "
        "--config, which overrides the defaults.",
    )
    add_config_flags(p)
    add_path_option_flags(p)
    p.add_argument("--config", metavar="FILE.toml", help="TrainConfig fields; explicit flags override it")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out; with a new --steps total the cosine learning rate does not jump: a "
        "run stopped before its total continues its cosine from the rate it had down to 0 at the new total, "
        "a finished run starts a new cycle (warm-up to --lr, then a cosine to 0); a line says which",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples of a trained run (saved in data space)")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument(
        "--n", type=_positive, default=None, help="number of samples (default: 1000, or the rows of --x-init)"
    )
    p.add_argument(
        "--x-init", metavar="FILE.npy", default=None,
        help="your own start points (N, *data_shape): source points in data units for a run with a data "
        "source, "
        "N(0, I) draws otherwise (default: prior draws, or the run's held-out source points)",
    )  # fmt: skip
    p.add_argument(
        "--sampler", choices=SAMPLERS, default=None,
        help="ODE solver, or sde / dpm++2m-sde; an SB-CFM run (--objective sbcfm) takes euler (its default), "
        f"midpoint, heun, rk4, dopri5 or its SDE sb-sde (default: {DEFAULT_ODE_SAMPLER})",
    )  # fmt: skip
    p.add_argument(
        "--sampler-steps", type=_positive, default=None, metavar="N",
        help=f"steps of the sampler (default: {DEFAULT_ODE_STEPS} for {DEFAULT_ODE_SAMPLER}, "
        f"{DEFAULT_SDE_STEPS} for sde; the others: flowscore.samplers.DEFAULT_STEPS)",
    )  # fmt: skip
    p.add_argument(
        "--steps", type=_positive, default=None, metavar="N", help="deprecated spelling of --sampler-steps"
    )
    p.add_argument(
        "--grid", choices=GRIDS, default=None,
        help=f"time grid (default: {DEFAULT_GRID[DEFAULT_ODE_SAMPLER]} for {DEFAULT_ODE_SAMPLER}; the "
        "others: flowscore.samplers.DEFAULT_GRID)",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True, metavar="FILE.npy",
        help="the samples; a labelled run sampled without --class also writes their classes to "
        "FILE.labels.npy",
    )  # fmt: skip
    p.add_argument(
        "--class", dest="label", type=_class_label, default=None, metavar="K",
        help="labelled runs: sample class K (0..K-1), or -1 for the unconditional model (default: a class "
        "per sample, drawn from the training class frequencies)",
    )  # fmt: skip
    p.add_argument(
        "--guidance", type=_number, default=0.0, metavar="W",
        help="classifier-free guidance weight w: (1 + w) f(x, t, y) - w f(x, t, -1); 0 is plain conditional "
        "sampling (default: 0.0)",
    )  # fmt: skip
    p.add_argument(
        "--plot", metavar="FILE.png", help="also plot the samples (2D: vs held-out data; images: grid)"
    )
    p.add_argument("--seed", type=_integer_min0, default=0, help="seed of the draws (default: 0)")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "eval", help="W2 and MMD to held-out data next to their floors, held-out NLL; images: FID, nn_ratio"
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument(
        "--n", type=_positive, default=2000,
        help="points per set, for the samples, W2, MMD and the likelihood; capped at half the held-out data "
        "(images: also the samples and training images of FID, precision, recall, nn_ratio) (default: 2000)",
    )  # fmt: skip
    p.add_argument("--json", metavar="FILE.json", help="also write the numbers as JSON")
    p.add_argument("--no-likelihood", action="store_true", help="skip the held-out likelihood (bits/dim)")
    p.add_argument(
        "--no-fid", action="store_true",
        help="image runs: skip FID, precision and recall (Inception-v3 features; nn_ratio is still given)",
    )  # fmt: skip
    p.add_argument(
        "--sde", action=argparse.BooleanOptionalAction, default=None,
        help="also draw and measure SDE samples (default: yes for vectors, no for images, where the SDE "
        "sampler's many steps would dominate eval's time)",
    )  # fmt: skip
    p.add_argument("--seed", type=_integer_min0, default=0, help="seed of the draws (default: 0)")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "plot", help="PNGs of a run: loss and floor, samples, trajectories, field / image grid"
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--out", metavar="DIR", help="folder for the PNGs (default: RUN_DIR/plots)")
    p.add_argument("--n", type=_positive, default=2000, help="2D samples per sampler to plot (default: 2000)")
    p.add_argument("--seed", type=_integer_min0, default=0, help="seed of the draws (default: 0)")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="train on a 2D toy, sample by ODE and SDE, plot, print W2 vs its floor")
    p.add_argument(
        "--out", default="demo-out", metavar="DIR",
        help="demo folder; an earlier demo there is replaced once the new one is complete "
        "(default: demo-out)",
    )  # fmt: skip
    p.add_argument("--data", default="moons", choices=TOYS, help="2D toy data set (default: moons)")
    p.add_argument("--steps", type=_positive, help="training steps (default: the trainer's default)")
    p.add_argument("--n", type=_positive, default=2000, help="samples per sampler for W2 (default: 2000)")
    p.add_argument("--seed", type=_integer_min0, default=0, help="seed of training and draws (default: 0)")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def _threads(value: str) -> int:
    number = _integer(value, 1)
    if number > config.MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {config.MAX_THREADS} threads, got {value!r}")
    return number


def _integer_min0(value: str) -> int:
    return _integer(value, 0)


def _class_label(value: str) -> int:
    return _integer(value, -1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()

    def call() -> int:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)

    return run_parsed(call)


def run_parsed(call: Callable[[], int]) -> int:
    """``call()`` (a command on parsed arguments) with the CLI's error handling: its return value, or the
    exit status of the one-line message on stderr (module docstring: 2 bad input, 1 a failure while
    working, 130 Ctrl-C)."""
    from .training import TrainingFailed

    try:
        return int(call() or 0)
    except CLIError as err:
        return _fail(str(err))
    except TrainingFailed as err:
        return _fail(str(err), EXIT_FAILED)
    except (MemoryError, torch.OutOfMemoryError) as err:
        cause = _one_line(err) or type(err).__name__
        return _fail(f"out of memory ({cause}); try a smaller --n or --batch-size", EXIT_FAILED)
    except RecursionError:
        return _fail("an input is nested too deeply to be read; check the --config file and the run's files")
    except ValueError as err:
        message = _one_line(err)
        fix = "" if "; " in message else "; check the arguments (see `flowscore --help`)"
        return _fail(message + fix)
    except OSError as err:
        cause = os.strerror(err.errno).lower() if err.errno else _one_line(err)
        where = f" ({err.filename})" if err.filename else ""
        return _fail(f"{cause}{where}; nothing was written there", EXIT_FAILED)
    except KeyboardInterrupt as err:
        note = _one_line(err) if isinstance(err, Interrupted) else "interrupted"
        print(f"flowscore: {note}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"flowscore: error: {_one_line(message)}", file=sys.stderr)
    return code
