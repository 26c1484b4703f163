"""The README's commands stay runnable: the test command is CI's, and every command it names exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from subboost import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _quickstart_commands() -> list[str]:
    block = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_test_command_is_what_ci_runs():
    main_job, tests = _quickstart_commands()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci_lines == [tests]
    assert main_job.endswith("subboost demo") and main_job.startswith("python3 -m venv .venv")


def test_every_experiment_module_the_readme_names_exists():
    modules = set(re.findall(r"python -m (experiments\.\w+)", README))
    assert modules, "the README names no experiment scripts"
    missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    assert not missing, f"README names missing modules: {missing}"


def test_every_subcommand_the_readme_names_exists():
    parser = cli.build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public accessor
    code = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S))
    named = set(re.findall(r"`subboost (\w+)", README)) | set(re.findall(r"^\s*subboost (\w+)", code, re.M))
    assert named, "the README names no subcommands"
    assert named <= subcommands, f"README names unknown subcommands: {sorted(named - subcommands)}"


def test_readme_notebook_links_point_at_stored_notebooks():
    linked = set(re.findall(r"colabs/(\w+\.ipynb)\)", README))
    assert linked == {p.name for p in (ROOT / "colabs").glob("*.ipynb")}
