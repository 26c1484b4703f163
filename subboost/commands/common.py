"""What every subcommand's parser shares: its creation, its help format, and the merge-method flags."""

from __future__ import annotations

import argparse
import ast
import re
import sys
from typing import Any

from subboost.errors import SubboostError

# Longest --param value accepted (a literal, not a program: bounds parsing time and depth).
MAX_PARAM_CHARS = 1000
# --seed range: what a PRNG key is made from (a 64-bit signed integer).
SEED_RANGE = (0, 2**63 - 1)

_DOUBLE_BACKTICKS = re.compile(r"``(.+?)``", re.S)
_ROLE = re.compile(r"`([^`\n]+)`")


def plain_text(text: str) -> str:
    """Docstring markup (reStructuredText) as plain terminal text.

    Inline literals and references in double or single backticks lose their
    backticks; a literal-block marker (a line ending in a double colon) ends in
    one colon. Line breaks and indentation are kept, so examples stay as written.
    """
    text = _DOUBLE_BACKTICKS.sub(r"\1", text)
    text = _ROLE.sub(r"\1", text)
    return re.sub(r"(?<=\S)::$", ":", text, flags=re.M)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` in plain text: descriptions as written (markup removed), every default shown.

    An option whose help does not mention its default gets ``(default: VALUE)``
    appended; options without a value to show (``None``, a flag's ``False``)
    say in their help what happens when they are left out.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(plain_text(text), width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain_text(action.help or "")
        default = action.default
        shown = default is not None and default is not False and default != [] and default is not argparse.SUPPRESS
        if shown and action.option_strings and "default" not in text:
            value = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            text += f" (default: {value.replace('%', '%%')})"
        return text


def add_command(subparsers: argparse._SubParsersAction, name: str, *, help: str, doc: str | None) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows its one-line ``help`` and its module docstring ``doc`` (`HelpFormatter`)."""
    return subparsers.add_parser(name, help=help, description=doc, formatter_class=HelpFormatter)


def add_merge_method_arguments(parser: argparse.ArgumentParser, *, methods: tuple[str, ...]) -> None:
    """``--method``, repeatable ``--param NAME=VALUE`` and ``--seed`` (the PRNG of a random method)."""
    parser.add_argument("--method", default="task_arithmetic",
                        help=f"merge method (default task_arithmetic): one of {', '.join(methods)}")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="merge hyper-parameter, e.g. --param k=0.2 (repeatable; default: the method's)")
    parser.add_argument("--seed", type=int, default=None,
                        help="PRNG seed of a random method (dare, dare_ties): required for it, no default")


def parse_param(text: str) -> tuple[str, Any]:
    """``"k=0.2"`` -> ``("k", 0.2)``; values are Python literals or bare strings."""
    if "=" not in text:
        raise SubboostError(f"--param expects NAME=VALUE, got {text[:80]!r}.")
    name, raw = text.split("=", 1)
    if len(raw) > MAX_PARAM_CHARS:
        raise SubboostError(f"--param {name.strip()[:40]}: the value has {len(raw)} characters, more than the "
                            f"{MAX_PARAM_CHARS} a hyper-parameter needs.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:  # "nan", "inf": numbers, so that the method's check refuses them by name
            value = float(raw)
        except ValueError:
            value = raw
    return name.strip(), value


def merge_method_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The merge method's hyper-parameters from ``--param`` and ``--seed``, checked before anything is loaded.

    A random method (one taking a PRNG ``key``) needs an explicit ``--seed``; ``--param key=``
    is refused (the key comes from the seed); a ``--seed`` a deterministic method ignores is
    refused rather than recorded as used.
    """
    from subboost.merging.keys import takes_key

    kwargs = dict(parse_param(p) for p in args.param)
    if "key" in kwargs:
        raise SubboostError("--param key=...: the PRNG key of a random method comes from --seed N; pass that instead.")
    random = takes_key(args.method, kwargs)
    if args.seed is not None:
        low, high = SEED_RANGE
        if not low <= args.seed <= high:
            raise SubboostError(f"--seed must be an integer in [{low}, {high}], got {args.seed}.")
        if not random:
            raise SubboostError(f"--seed has no effect: --method {args.method} is not random (drop --seed).")
    if random:
        if args.seed is None:
            raise SubboostError(f"--method {args.method} is random: pass --seed N (no default, so every run is "
                                "reproducible by its command).")
        import jax

        kwargs["key"] = jax.random.key(args.seed)
    return kwargs


def warn(command: str, message: str) -> None:
    """One line on stderr: ``subboost COMMAND: warning: MESSAGE``."""
    print(f"subboost {command}: warning: {message}", file=sys.stderr)
