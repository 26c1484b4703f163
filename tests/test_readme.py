"""The README and docs stay true: commands exist, links resolve, the README's Python runs as written."""

from __future__ import annotations

import importlib.util
import os
import re
import unicodedata
from pathlib import Path

import pytest

from subboost import cli

ROOT = Path(__file__).resolve().parent.parent
README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
DOC_PATHS = [README_PATH, *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("CONTRIBUTING.md"))]
ALL_DOCS = "\n".join(p.read_text() for p in DOC_PATHS)
README_MAX_LINES = 300


def _quickstart_commands() -> list[str]:
    block = README.split("## Install and run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_test_command_is_what_ci_runs():
    main_job, tests = _quickstart_commands()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci_lines == [tests]
    assert main_job.endswith("subboost demo") and main_job.startswith("python3 -m venv .venv")


def test_readme_is_a_first_screen_not_a_report():
    lines = README.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move write-ups to docs/"
    assert not re.search(r"\bissue \d+", ALL_DOCS, re.I), "user docs name an issue number"


def test_every_experiment_module_the_docs_name_exists():
    modules = set(re.findall(r"python -m (experiments\.\w+)", ALL_DOCS))
    assert modules, "the docs name no experiment scripts"
    missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    assert not missing, f"docs name missing modules: {missing}"


def test_every_subcommand_the_docs_name_exists():
    parser = cli.build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public accessor
    code = "\n".join(re.findall(r"```bash\n(.*?)```", ALL_DOCS, re.S))
    named = set(re.findall(r"`subboost ([a-z]\w*)", ALL_DOCS)) | set(re.findall(r"^\s*subboost ([a-z]\w*)", code, re.M))
    assert named, "the docs name no subcommands"
    assert named <= subcommands, f"docs name unknown subcommands: {sorted(named - subcommands)}"


def test_readme_notebook_links_point_at_stored_notebooks():
    linked = set(re.findall(r"colabs/(\w+\.ipynb)\)", README))
    assert linked == {p.name for p in (ROOT / "colabs").glob("*.ipynb")}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {github_anchor(m) for m in re.findall(r"^#{1,6}\s+(.*)$", text, re.M)}


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOC_PATHS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors_of(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_readme_python_blocks_run_on_the_tiny_models(tiny_bench_cache, tmp_path, monkeypatch):
    """Every fenced Python block of the README runs as written, in a folder where `models` is the tiny demo's cache."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "the README has no Python example"
    (tmp_path / "models").symlink_to(tiny_bench_cache, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["params"] is not None
    ranks = namespace["ranks"]
    assert ranks and all(isinstance(r, float) and r >= 1.0 for r in ranks.values())
    assert os.path.isdir(namespace["run"] + "base")
