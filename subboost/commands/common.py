"""What every subcommand's parser shares: its creation, its help format, and the merge-method flags."""

from __future__ import annotations

import argparse
import re

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
    """``--method``, repeatable ``--param NAME=VALUE`` and ``--seed`` (DARE's PRNG)."""
    parser.add_argument("--method", default="task_arithmetic", help=f"merge method: one of {', '.join(methods)}")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="merge hyper-parameter, e.g. --param k=0.2 (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for DARE")
