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

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from subboost.tree import PyTree

__all__ = ["OUTPUT_FILES", "analyze", "check_analysis_output", "write_analysis"]

OUTPUT_FILES: tuple[str, ...] = (
    "gsv_distributions.png", "gsv_distributions.json", "alignment.png", "alignment.json",
    "rank_collapse.png", "rank_collapse.json", "spectra.png", "spectra.json",
    "spectra_boosted.png", "spectra_boosted.json", "summary.json",
)


def analyze(
    tvs: PyTree,
    names: Sequence[str],
    out: str | os.PathLike,
    *,
    method: str = "task_arithmetic",
    merge_kwargs: Mapping | None = None,
    beta: float | None = 0.01,
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
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(summary, dict) and "figures" in summary and "experts" in summary


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
    from subboost.outputs import check_not_an_input

    out = Path(out)
    overwrite_hint = "--overwrite" if name.startswith("--") else "overwrite=True"
    check_not_an_input(out, inputs, name=name)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{name} {str(out)!r} exists and is not a directory.")
    if out.is_dir():
        clashing = [file for file in OUTPUT_FILES if (out / file).exists() or (out / file).is_symlink()]
        if clashing and not overwrite:
            raise FileExistsError(
                f"{name} {str(out)!r} already holds {', '.join(clashing)}; pass {overwrite_hint} to replace them."
            )
        if clashing and not _earlier_analysis(out):
            raise FileExistsError(
                f"{name} {str(out)!r} holds {', '.join(clashing)} but no summary.json of an earlier analysis; "
                f"refusing to replace files subboost did not write, even with {overwrite_hint}."
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
            for file in sorted(os.listdir(staging_dir)):
                os.replace(staging_dir / file, out / file)
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)
    else:
        write_atomically(out, build, inputs=inputs)
    return {figure: out / Path(path).name for figure, path in written.items()}
