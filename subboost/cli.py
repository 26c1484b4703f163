"""The ``subboost`` command line: one entry point, one subcommand per feature.

Each feature module exposes ``register(subparsers)`` that adds its subcommand
and sets ``func`` on the parser; `main` turns a user error (`SubboostError`,
`ValueError`, any `OSError`, ...) into a one-line message and exit code 2, and
Ctrl-C into one line and exit code 130 (writers leave nothing behind).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that contribute a subcommand via `register(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = (
    "subboost.commands.merge",
    "subboost.commands.convert",
    "subboost.commands.demo",
    "subboost.commands.analyze",
    "subboost.commands.eval",
    "subboost.commands.data",
)

# OSError covers FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, ...
USER_ERRORS = (ValueError, OSError, KeyError, TypeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subboost",
        description="Merge fine-tuned experts with Subspace Boosting (arXiv 2506.16506).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use the persistent XLA compilation cache (default: on, in "
                             "$XDG_CACHE_HOME/subboost/jax; SUBBOOST_COMPILE_CACHE=0 or =DIR also sets it)")
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
        with blas_threads.limited():  # one BLAS thread under XLA's LAPACK calls (subboost.blas_threads)
            return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.traceback:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        message = " ".join(str(message).split("\n"))  # one line, always
        print(f"subboost {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.traceback:
            raise
        print(f"subboost {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
