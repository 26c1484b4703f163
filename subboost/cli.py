"""The ``subboost`` command line: one entry point, one subcommand per feature.

Each feature module exposes ``register(subparsers)`` that adds its subcommand
and sets ``func`` on the parser; `main` turns a user error (`SubboostError`,
`ValueError`, any `OSError`, ...) into a one-line message (at most
`MAX_MESSAGE_CHARS` characters) and exit code 2, and Ctrl-C, SIGTERM or SIGHUP
into one line and exit code 128 + the signal's number (writers leave nothing
behind). Library loggers (orbax, absl, JAX, tensorstore) are quieted while a
command runs, so the error line is not buried under their tracebacks; they are
restored afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence

# Modules that contribute a subcommand via `register(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = (
    "subboost.commands.merge",
    "subboost.commands.convert",
    "subboost.commands.export",
    "subboost.commands.demo",
    "subboost.commands.analyze",
    "subboost.commands.eval",
    "subboost.commands.data",
)

# OSError covers FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, ...
USER_ERRORS = (ValueError, OSError, KeyError, TypeError)
# An error line longer than this is cut, saying how much was left out.
MAX_MESSAGE_CHARS = 1000
# Loggers of the libraries we call: their reports of a failure we raise ourselves are noise.
QUIETED_LOGGERS = ("absl", "orbax", "jax", "tensorstore", "etils")
# Signals that end a run the way Ctrl-C does (cleanup, one line, exit 128 + number).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every writer cleans up the same way."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Stopped` in the main thread while the block runs; handlers restored after."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {}
    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def quiet_library_logging() -> Iterator[None]:
    """Library loggers (`QUIETED_LOGGERS`) report nothing while the block runs; their levels restored after.

    numpy's overflow warnings (a huge ``--alpha`` cast to float32) are dropped too: every
    result is checked for NaN and inf before it is written, and that check reports the
    overflow in one line naming the parameter.
    """
    import warnings

    loggers = [logging.getLogger(name) for name in QUIETED_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def one_line(message: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` as one line of at most ``limit`` characters (plus a count of what was cut)."""
    text = " ".join(str(message).split("\n"))
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... ({len(text) - limit} more characters)"


def build_parser() -> argparse.ArgumentParser:
    from subboost.commands.common import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="subboost",
        description="Merge fine-tuned experts with Subspace Boosting (arXiv 2506.16506).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use the persistent XLA compilation cache (default: on, in "
                             "$XDG_CACHE_HOME/subboost/jax; SUBBOOST_COMPILE_CACHE=0 or =DIR also sets it)")
    parser.add_argument("--distributed", action="store_true",
                        help="one of several processes of a pod (jax.distributed; coordinator, process count and "
                             "id from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or detected on "
                             "Cloud TPU): merge reads and writes only this process's share (docs/pods.md)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from subboost import blas_threads
    from subboost.compilation import setup_cli_compile_cache

    setup_cli_compile_cache(enabled=not args.no_compile_cache)  # before anything compiles
    try:
        if args.distributed:
            from subboost.streaming.pod import initialize

            initialize()
        # one BLAS thread under XLA's LAPACK calls (subboost.blas_threads)
        with stop_signals_interrupt(), quiet_library_logging(), blas_threads.limited():
            return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.traceback:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"subboost {args.command}: error: {one_line(message)}", file=sys.stderr)  # one line, always
        return 2
    except RecursionError:  # input nested beyond what any loader checks: still one line
        if args.traceback:
            raise
        print(f"subboost {args.command}: error: input nested too deeply to read.", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if args.traceback:
            raise
        if isinstance(err, Stopped):
            name = signal.Signals(err.signum).name
            print(f"subboost {args.command}: stopped by {name}.", file=sys.stderr)
            return 128 + err.signum
        print(f"subboost {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
