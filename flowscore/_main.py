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
    """Runs ``flowscore ARGV`` (default ``sys.argv[1:]``) and returns the exit status.

    While the command line (and torch with it) is imported, Ctrl-C and SIGTERM are only recorded: an
    exception raised inside torch's extension modules while they initialise aborts the process (a C++
    ``terminate``), so the interrupt takes effect, with the same one line, once the import is done."""
    _received.clear()
    for stream in (sys.stdout, sys.stderr):  # a file name in another encoding is printed, not a crash
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    pending: list[int] = []

    def defer(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    try:
        previous = signal.signal(signal.SIGTERM, defer)
        previous_int = signal.getsignal(signal.SIGINT)
        if previous_int is not signal.SIG_IGN:  # a process started with Ctrl-C ignored keeps ignoring it
            signal.signal(signal.SIGINT, defer)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = previous_int = None
    try:
        try:
            from .cli import main as cli_main
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, _terminate)
                if previous_int is not signal.SIG_IGN:
                    signal.signal(signal.SIGINT, previous_int)
        if pending:  # interrupted while loading
            _received.extend(s for s in pending if s == signal.SIGTERM)
            print("flowscore: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        else:
            try:
                code = cli_main(argv)
            except KeyboardInterrupt:  # before the command's own handling began
                print("flowscore: interrupted", file=sys.stderr)
                code = EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_TERMINATED if code == EXIT_INTERRUPTED and _received else code
