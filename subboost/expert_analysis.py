"""Every analysis of a set of experts, written as figures with the numbers drawn beside them.

`analyze` merges the experts, then writes (each PNG with a JSON of its numbers):

- ``gsv_distributions.png``: generalized singular values per expert and for the merged reference (HO-GSVD);
- ``alignment.png``: the HO-GSVD alignment matrix of the experts and the merged reference;
- ``rank_collapse.png``: stable and energy rank against the number of merged experts, per layer type;
- ``spectra.png``: merged spectra as experts are added (and ``spectra_boosted.png`` with a beta);

and ``summary.json`` (settings, expert names, the greedy expert ranking). ``subboost analyze`` is its command.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from subboost.grids import DEFAULT_BETA
from subboost.outputs import ANALYSIS_FILES, ANALYSIS_FORMAT
from subboost.tree import PyTree

__all__ = ["OUTPUT_FILES", "analyze"]

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
