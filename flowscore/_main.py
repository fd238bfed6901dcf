"""The ``flowscore`` program's entry: Ctrl-C and SIGTERM are handled from its first moment.

This module imports nothing heavy: it installs the signal handling, then imports the command line (and
torch with it) inside it, so that an interrupt while torch is still loading prints the same one line as
one later (``flowscore: interrupted ...``) and exits with 130 (Ctrl-C) or 143 (SIGTERM), never a
traceback. SIGTERM is raised as :class:`Terminated`, a ``KeyboardInterrupt``, so every clean-up that runs
on Ctrl-C (a training keeps its last checkpoint, partial outputs are removed) runs on SIGTERM too.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C."""


_received: list[int] = []


def _terminate(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``flowscore ARGV`` (default ``sys.argv[1:]``) and returns the exit status."""
    _received.clear()
    for stream in (sys.stdout, sys.stderr):  # a file name in another encoding is printed, not a crash
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = None
    try:
        try:
            from .cli import main as cli_main

            code = cli_main(argv)
        except KeyboardInterrupt:  # while the command line (and torch) was still loading
            print("flowscore: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_TERMINATED if code == EXIT_INTERRUPTED and _received else code
