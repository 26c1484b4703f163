"""Every analysis of a set of experts, written as figures with the numbers drawn beside them.

`analyze` merges the experts, then writes (each PNG with a JSON of its numbers):

- ``gsv_distributions.png``: generalized singular values per expert and for the merged reference (HO-GSVD);
- ``alignment.png``: the HO-GSVD alignment matrix of the experts and the merged reference;
- ``rank_collapse.png``: stable and energy rank against the number of merged experts, per layer type;
- ``spectra.png``: merged spectra as experts are added (and ``spectra_boosted.png`` with a beta);

and ``summary.json`` (settings, expert names, the greedy expert ranking). `write_analysis` does the same
into a folder under subboost's output rule (`subboost.outputs`); ``subboost analyze`` is its command.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from subboost.errors import SubboostError
from subboost.grids import DEFAULT_BETA
from subboost.outputs import ANALYSIS_FILES, ANALYSIS_FORMAT
from subboost.tree import PyTree

__all__ = ["OUTPUT_FILES", "analyze", "check_analysis_output", "write_analysis"]

OUTPUT_FILES: tuple[str, ...] = ANALYSIS_FILES


def analyze(
    tvs: PyTree,
    names: Sequence[str],
    out: str | os.PathLike,
    *,
    method: str = "task_arithmetic",
    merge_kwargs: Mapping | None = None,
    beta: float | None = DEFAULT_BETA,
    hogsvd_method: str = "robust",
    pi: float | None = None,
    attention: str = "per_qkv",
    fraction: float = 0.95,
    progress: bool = True,
) -> dict[str, str]:
    """Computes every analysis and writes the figures into the directory ``out``; returns ``{figure: path}``.

    Args:
      tvs: stacked task vectors (leading expert axis, at least 2 experts).
      names: one name per expert.
      out: an existing directory; files of the same names are replaced.
      method, merge_kwargs: the merge whose result is the reference row and the rank-collapse curves.
      beta: Subspace Boosting cutoff of the boosted curves; ``None``: no boosted curves.
      hogsvd_method, pi: the HO-GSVD variant and the robust variant's regulariser (default ``1/T``).
      attention: how attention kernels form matrices (`subboost.tree.ATTENTION_MODES`).
      fraction: the energy fraction ``e`` of the energy rank.
      progress: show progress bars.
    """
    import subboost as sb
    from subboost import plots
    from subboost.alignment import generalized_singular_values, mean_alignment, select_experts
    from subboost.analysis import rank_collapse
    from subboost.validation import check_real

    out = Path(out)
    check_real("fraction", fraction, what="analyze", low=0.0, high=1.0, low_open=True)  # before any file
    if beta is not None:
        check_real("beta", beta, what="analyze", low=0.0, high=1.0)
    merge_kwargs = dict(merge_kwargs or {})
    names = list(names)
    merged = sb.merge(tvs, method, **merge_kwargs)
    reference = f"merged ({method})"
    sigmas = generalized_singular_values(tvs, merged, method=hogsvd_method, pi=pi, attention=attention)
    num = len(names)
    rows = names + [reference]
    written = {}
    pooled = plots.pool_generalized_singular_values(sigmas, rows, num_experts=num)
    plots.plot_gsv_distributions(pooled, out / "gsv_distributions.png")
    written["gsv_distributions"] = str(out / "gsv_distributions.png")
    alignment = np.asarray(mean_alignment(sigmas))
    plots.plot_alignment(alignment, rows, out / "alignment.png")
    written["alignment"] = str(out / "alignment.png")
    curves = rank_collapse(tvs, method, beta=beta, fraction=fraction, attention=attention, progress=progress,
                           **merge_kwargs)
    plots.plot_rank_collapse(curves, out / "rank_collapse.png")
    written["rank_collapse"] = str(out / "rank_collapse.png")
    plots.plot_spectra_evolution(curves, out / "spectra.png")
    written["spectra"] = str(out / "spectra.png")
    if beta is not None:
        plots.plot_spectra_evolution(curves, out / "spectra_boosted.png", boosted=True)
        written["spectra_boosted"] = str(out / "spectra_boosted.png")
    ranking = [select_experts(None, k=k, alignment=alignment[:num, :num]) for k in range(2, num + 1)]
    summary = {
        "format": ANALYSIS_FORMAT,
        "experts": names,
        "merge_method": method,
        "merge_kwargs": {k: v for k, v in merge_kwargs.items() if k != "key"},
        "beta": beta,
        "hogsvd_method": hogsvd_method,
        "pi": pi if pi is not None else 1.0 / num,
        "attention": attention,
        "energy_fraction": fraction,
        "selected_experts": {str(len(sel)): [names[i] for i in sel] for sel in ranking},
        "figures": {name: Path(path).name for name, path in written.items()},
    }
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1, allow_nan=False, default=str)
    return written


def _earlier_analysis(out: Path) -> bool:
    """Whether ``out/summary.json`` is the summary of an analysis subboost wrote (its ``format`` field)."""
    from subboost.files import read_json

    try:
        summary = read_json(out / "summary.json", what="summary")
    except SubboostError:
        return False
    return isinstance(summary, dict) and summary.get("format") == ANALYSIS_FORMAT


def replace_files(staging: Path, out: Path) -> None:
    """Moves every file of ``staging`` into ``out``, all or nothing.

    The files they replace are first moved aside into ``staging/.replaced``; if any move
    fails, everything moved so far is moved back, so ``out`` holds exactly its old files.
    """
    aside = staging / ".replaced"
    aside.mkdir()
    names = sorted(n for n in os.listdir(staging) if n != aside.name)
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for name in names:
            if (out / name).exists() or (out / name).is_symlink():
                os.replace(out / name, aside / name)
                moved_aside.append(name)
        for name in names:
            os.replace(staging / name, out / name)
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            with contextlib.suppress(OSError):
                os.replace(out / name, staging / name)
        for name in moved_aside:
            with contextlib.suppress(OSError):
                os.replace(aside / name, out / name)
        raise


def check_analysis_output(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                          name: str = "out") -> Path:
    """Where `write_analysis` may write: a new directory, or an existing one.

    In an existing directory the files of an earlier analysis (`OUTPUT_FILES`)
    are replaced only with ``overwrite``, and only where that analysis's
    ``summary.json`` shows subboost wrote them; other files are left alone.

    Args:
      name: how messages call ``out`` (the command line passes ``"--out"``; its
        messages then name ``--overwrite`` rather than ``overwrite=True``).

    Raises:
      OutputOverlapError: ``out`` is, contains or lies inside an input.
      FileExistsError: ``out`` is a file or link, or holds analysis files that
        may not be replaced.
    """
    from subboost.files import describe
    from subboost.outputs import absolute_path, check_not_an_input

    out = Path(out)
    overwrite_hint = "--overwrite" if name.startswith("--") else "overwrite=True"
    absolute_path(out, name=name)  # "~nosuchuser" or a symbolic-link loop: one line
    shown = describe(out)
    check_not_an_input(out, inputs, name=name,
                       replaced=[out / file for file in OUTPUT_FILES] if out.is_dir() else ())
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{name} {shown!r} exists and is not a directory.")
    if out.is_dir():
        clashing = [file for file in OUTPUT_FILES if (out / file).exists() or (out / file).is_symlink()]
        if clashing and not overwrite:
            raise FileExistsError(
                f"{name} {shown!r} already holds {', '.join(clashing)}; pass {overwrite_hint} to replace them."
            )
        if clashing and not _earlier_analysis(out):
            raise FileExistsError(
                f"{name} {shown!r} holds {', '.join(clashing)} but no summary.json of an earlier analysis; "
                f"refusing to replace files subboost did not write, even with {overwrite_hint}."
            )
        odd = [file for file in clashing if (out / file).is_symlink() or not (out / file).is_file()]
        if odd:
            raise FileExistsError(
                f"{name} {shown!r}: {', '.join(odd)} is not a regular file (a directory, link or device); "
                f"refusing to replace it even with {overwrite_hint}. Remove it yourself or choose another {name}."
            )
    return out


def write_analysis(tvs: PyTree, names: Sequence[str], out: str | os.PathLike, *, overwrite: bool = False,
                   inputs: Iterable[str | os.PathLike] = (), name: str = "out", **options: Any) -> dict[str, Path]:
    """`analyze` into ``out``, built in a hidden staging folder: a failure part-way leaves ``out`` as it was.

    ``out`` is checked by `check_analysis_output` before anything is computed and
    again just before the files move into place.

    Args:
      tvs, names: as in `analyze`.
      out: a new directory, or an existing one that receives (or, with ``overwrite``, replaces) the files.
      overwrite, inputs, name: see `check_analysis_output`.
      **options: `analyze`'s keyword arguments.

    Returns:
      ``{figure: path of its PNG in out}``.
    """
    from subboost.outputs import write_atomically

    inputs = list(inputs)
    out = check_analysis_output(out, overwrite=overwrite, inputs=inputs, name=name)
    written: dict[str, str] = {}

    def build(staging: Path) -> None:
        staging.mkdir()
        written.update(analyze(tvs, names, staging, **options))

    if out.is_dir():  # an existing folder: add (or, with overwrite, replace) our files only
        staging_dir = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            build(staging_dir)
            check_analysis_output(out, overwrite=overwrite, inputs=inputs, name=name)
            replace_files(staging_dir, out)
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)
    else:
        write_atomically(out, build, inputs=inputs)
    return {figure: out / Path(path).name for figure, path in written.items()}
