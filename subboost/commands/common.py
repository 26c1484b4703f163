"""What every subcommand's parser shares: its creation, and the merge-method flags."""

from __future__ import annotations

import argparse


def add_command(subparsers: argparse._SubParsersAction, name: str, *, help: str, doc: str | None) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows its one-line ``help`` and its module docstring ``doc`` as written."""
    return subparsers.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_merge_method_arguments(parser: argparse.ArgumentParser, *, methods: tuple[str, ...]) -> None:
    """``--method``, repeatable ``--param NAME=VALUE`` and ``--seed`` (DARE's PRNG)."""
    parser.add_argument("--method", default="task_arithmetic", help=f"merge method: one of {', '.join(methods)}")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="merge hyper-parameter, e.g. --param k=0.2 (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for DARE")
