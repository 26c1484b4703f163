"""colabs/: each notebook matches its jupytext ``.py`` twin, is stored without outputs, and runs.

The execution tests run every notebook top to bottom with nbclient, in a fresh
temporary working directory, on a kernel started from this interpreter (a
kernelspec written to a temporary directory, so no kernel has to be installed
and no other environment's ``python3`` kernel can be picked up). The
notebooks share one model cache (``SUBBOOST_BENCH_CACHE``, the session's
``tiny_bench_cache``): the first user trains the tiny benchmark models, the others load them. They check their
own known answers with ``assert`` (HO-GSVD toy example, torch/Flax parity,
boosting never lowering a stable rank), so a wrong result fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

COLABS = Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = (
    "01_quickstart",
    "02_rank_collapse",
    "03_hogsvd",
    "04_bring_your_own_checkpoints",
)
# Generous per-cell limit: the first notebook trains the tiny models (~30 s on 2 idle cores).
CELL_TIMEOUT_S = 600
KERNEL_NAME = "subboost-colabs-test"


def _pair(name: str):
    return jupytext.read(COLABS / f"{name}.py"), nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


# ----------------------------------------------------------------------------
# Stored notebooks
# ----------------------------------------------------------------------------
def _git_ignored(paths: list[Path]) -> set[Path]:
    """The paths git ignores (none outside a git checkout or without git)."""
    try:
        proc = subprocess.run(["git", "check-ignore", "--stdin"], input="\n".join(map(str, paths)), cwd=COLABS,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {Path(line) for line in proc.stdout.splitlines()} if proc.returncode in (0, 1) else set()


def test_colabs_holds_exactly_the_four_pairs():
    # Files a contributor's local runs leave behind and git ignores (e.g. Jupyter's checkpoints) do not count.
    entries = [p for p in COLABS.iterdir() if not p.name.startswith(".")]
    ignored = _git_ignored(entries)
    assert sorted(p.name for p in entries if p not in ignored) == sorted(
        f"{name}.{ext}" for name in NOTEBOOKS for ext in ("py", "ipynb")
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_is_in_sync_with_its_py(name):
    py, ipynb = _pair(name)
    assert _cells(ipynb) == _cells(py), (
        f"colabs/{name}.ipynb differs from colabs/{name}.py; regenerate it with "
        f"`jupytext --update --to ipynb colabs/{name}.py`."
    )
    assert ipynb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    assert ipynb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_is_stored_without_outputs(name):
    raw = json.loads((COLABS / f"{name}.ipynb").read_text())
    for index, cell in enumerate(raw["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}.ipynb cell {index} has outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_code_cell_installs_only_when_subboost_is_missing(name):
    py, _ = _pair(name)
    first = next(cell.source for cell in py.cells if cell.cell_type == "code")
    code = [line for line in first.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert code[:3] == ["try:", "    import subboost  # noqa: F401", "except ImportError:"], code[:3]
    # pip runs only in the ImportError branch (indented under it), never unconditionally.
    assert all(line.startswith("    ") for line in code[3:]) and any("pip" in line for line in code[3:])


def test_checkpoint_notebook_guards_real_data_behind_a_flag():
    py, _ = _pair("04_bring_your_own_checkpoints")
    source = "\n".join(cell.source for cell in py.cells if cell.cell_type == "code")
    assert "USE_REAL_CHECKPOINTS = False" in source
    assert "if USE_REAL_CHECKPOINTS:" in source


# ----------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory) -> Path:
    """A kernelspec that starts ipykernel with this very interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "subboost tests",
        "language": "python",
    }))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch, kernel_spec_dir, tiny_bench_cache):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # The kernel inherits this environment: shared cache, every file it writes under tmp_path, quiet TensorFlow.
    monkeypatch.setenv("SUBBOOST_BENCH_CACHE", str(tiny_bench_cache))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("SUBBOOST_COLAB_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]))
    client = nbclient.NotebookClient(
        nb, km=km, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(work)}}
    )
    client.execute()

    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert not errors
    # Every code cell ran, in order.
    counts = [cell.execution_count for cell in nb.cells if cell.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))
    if name in ("02_rank_collapse", "03_hogsvd"):
        assert not (work / "outputs").exists()  # nothing written next to the notebook
        outputs = tmp_path / "outputs" / name
        pngs = sorted(p.name for p in outputs.glob("*.png"))
        assert pngs, f"{name} wrote no figures"
        for png in pngs:  # each plot_* figure comes with the numbers it draws
            if png != "rank_and_accuracy_vs_experts.png":
                assert (outputs / png.replace(".png", ".json")).is_file()
