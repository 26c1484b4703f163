"""The command line's help: plain text (no docstring markup) and every default shown."""

from __future__ import annotations

import argparse

import pytest

from subboost.cli import build_parser
from subboost.commands.common import plain_text


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **actions[0].choices}


@pytest.mark.parametrize("text, plain", [
    ("``subboost merge`` and ``subboost boost``: merge", "subboost merge and subboost boost: merge"),
    ("see `subboost.data` for\nExamples::\n\n  subboost eval x",
     "see subboost.data for\nExamples:\n\n  subboost eval x"),
    ("a ``multi\nline`` literal; a real :: stays", "a multi\nline literal; a real :: stays"),
])
def test_plain_text_removes_markup_and_keeps_layout(text, plain):
    assert plain_text(text) == plain


def test_every_help_is_plain_text_and_shows_every_default():
    commands = subcommands()
    assert {"merge", "boost", "convert", "demo", "analyze", "eval"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        assert "``" not in text and "::\n" not in text, name
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
                continue
            assert action.help, f"subboost {name} {action.option_strings[-1]} has a default but no help"
            shown = parser._get_formatter()._expand_help(action)
            assert "default" in shown, f"subboost {name} {action.option_strings[-1]}: {shown!r}"
    merge_help = commands["merge"].format_help()
    assert "(default task_arithmetic)" in " ".join(merge_help.split())
    assert "required for it, no default" in " ".join(merge_help.split())
