"""Rank-collapse analysis: how the merged task vector's spectrum shrinks as experts are added.

For ``n = 1 .. T`` the first ``n`` experts (in a given order) are merged with
any `subboost.merge` method; per matrix layer of the merged ``tau_n`` we record
its singular values ``s`` and (REFERENCE.md, "Spectral diagnostics")::

    stable rank  = sum_i s_i^2 / s_0^2
    energy rank  = min{ k : sum_{i<k} s_i^2 >= e * sum_i s_i^2 }   (e = 0.95)

and the same after Subspace Boosting. The boosted spectrum is computed from
the unboosted one, ``s'_i = max(s_i, s_k)`` (`subboost.boosting.boost_singular_values`,
the very function `subboost.subspace_boost` applies; ``U diag(s') V^T`` has
exactly the singular values ``s'``), so no second SVD is needed.

The paper's evidence for rank collapse: stable ranks fall as ``n`` grows, and
spectra concentrate in fewer directions; boosting keeps them up.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from subboost.boosting import BoostMode, boost_singular_values, check_boost_arguments
from subboost.grids import DEFAULT_BETA
from subboost.merging import METHODS, merge
from subboost.spectra import energy_rank_from_singular_values, spectra, stable_rank_from_singular_values
from subboost.errors import SubboostError
from subboost.task_vectors import check_finite, check_floating, num_experts
from subboost.tree import AttentionMode, PyTree

__all__ = ["RankCollapse", "layer_type", "rank_collapse"]

_LAYER_INDEX = re.compile(r"(?<=[_/])\d+(?=/|$)")


def layer_type(path: str) -> str:
    """Module path with layer indices replaced by ``*``: ``"t/resblocks_3/mlp/c_fc"`` -> ``"t/resblocks_*/mlp/c_fc"``.

    Only indices standing alone after ``_`` or ``/`` are replaced, so ``fc1``
    and ``fc2`` stay distinct types.
    """
    return _LAYER_INDEX.sub("*", path)


@dataclasses.dataclass(frozen=True)
class RankCollapse:
    """Spectral diagnostics of merged task vectors of growing expert counts (host numpy arrays).

    Attributes:
      num_experts: the expert counts ``n`` analysed, ascending.
      order: the expert indices in merge order (the first ``n`` form ``tau_n``).
      method: the merge method; ``merge_kwargs`` its hyper-parameters.
      beta, mode: Subspace Boosting settings (``beta`` None: no boosting; ``mode`` as in
        `subboost.subspace_boost`).
      fraction: the energy fraction of the energy rank.
      spectra: ``{module path: (len(num_experts), *members, r)}`` singular values, descending.
      stable_rank, energy_rank: ``{module path: (len(num_experts), *members)}``.
      spectra_boosted, stable_rank_boosted, energy_rank_boosted: the same after
        boosting (``None`` when ``beta`` is None).
    """

    num_experts: tuple[int, ...]
    order: tuple[int, ...]
    method: str
    merge_kwargs: dict[str, Any]
    beta: float | None
    mode: str
    fraction: float
    spectra: dict[str, np.ndarray]
    stable_rank: dict[str, np.ndarray]
    energy_rank: dict[str, np.ndarray]
    spectra_boosted: dict[str, np.ndarray] | None
    stable_rank_boosted: dict[str, np.ndarray] | None
    energy_rank_boosted: dict[str, np.ndarray] | None

    def by_layer_type(self, metric: str) -> dict[str, np.ndarray]:
        """``{layer type: (len(num_experts), L)}``: a metric's values over the L matrices of each type."""
        values = getattr(self, metric)
        if values is None:
            raise SubboostError(f"RankCollapse.{metric} is not available (no boosting: beta is None).")
        groups: dict[str, list[np.ndarray]] = {}
        for path, v in values.items():
            groups.setdefault(layer_type(path), []).append(v.reshape(v.shape[0], -1))
        return {t: np.concatenate(vs, axis=1) for t, vs in groups.items()}


def _check_order(order: Sequence[int] | None, num: int) -> tuple[int, ...]:
    if order is None:
        return tuple(range(num))
    order = tuple(int(i) for i in order)
    if sorted(order) != list(range(num)):
        raise SubboostError(f"rank_collapse: order must be a permutation of range({num}), got {list(order)}.")
    return order


def _check_counts(counts: Sequence[int] | None, num: int) -> tuple[int, ...]:
    if counts is None:
        return tuple(range(1, num + 1))
    counts = tuple(sorted({int(c) for c in counts}))
    if not counts or counts[0] < 1 or counts[-1] > num:
        raise SubboostError(f"rank_collapse: counts must lie in [1, {num}] (number of experts), got {list(counts)}.")
    return counts


def rank_collapse(
    tvs: PyTree,
    method: str = "task_arithmetic",
    *,
    counts: Sequence[int] | None = None,
    order: Sequence[int] | None = None,
    beta: float | None = DEFAULT_BETA,
    mode: BoostMode = "cumsum",
    fraction: float = 0.95,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    progress: bool = True,
    **merge_kwargs: Any,
) -> RankCollapse:
    """Stable and energy ranks of the merged task vector as the number of merged experts grows.

    Args:
      tvs: stacked task vectors (leading expert axis T).
      method: any `subboost.merge` method; ``merge_kwargs`` are its
        hyper-parameters (e.g. ``k=0.2`` for TIES, ``key=...`` for DARE).
      counts: expert counts to analyse (default ``1..T``). Methods needing
        several experts (Consensus with ``k=2``) need ``counts`` starting at 2.
      order: merge order, a permutation of ``range(T)``; ``tau_n`` merges
        ``order[:n]`` (default: the given order).
      beta: Subspace Boosting cutoff for the boosted curves; ``None`` skips them.
      mode: ``"cumsum"`` or ``"index"`` (see `subboost.subspace_boost`).
      fraction: energy fraction of the energy rank, in (0, 1].
      attention, is_matrix: how matrices are read (see `subboost.tree`), by the
        spectra and by the merge when the method reads matrices (TSV-M, Iso).
      progress: show a tqdm bar over the counts.

    Returns:
      A `RankCollapse`.
    """
    num = num_experts(tvs)
    order = _check_order(order, num)
    counts = _check_counts(counts, num)
    if beta is not None:
        check_boost_arguments(beta, mode)
    if not 0.0 < fraction <= 1.0:
        raise SubboostError(f"rank_collapse: fraction must be in (0, 1], got {fraction!r}.")
    check_floating(tvs, what="task vectors")
    check_finite(tvs, what="task vectors")

    # The merge reads matrices the way the spectra do (methods that read matrices at all).
    accepted = inspect.signature(METHODS[method].fn).parameters if method in METHODS else {}
    reading = {k: v for k, v in (("attention", attention), ("is_matrix", is_matrix))
               if k in accepted}
    per_count: list[dict[str, np.ndarray]] = []
    for n in tqdm(counts, desc=f"rank collapse ({method})", disable=not progress, leave=False):
        subset = jax.tree_util.tree_map(lambda x: x[np.asarray(order[:n])], tvs)
        try:
            tau = merge(subset, method, validate=False, **reading, **merge_kwargs)
        except SubboostError as err:
            raise SubboostError(f"rank_collapse: merging the first {n} experts with {method!r} failed: {err}") from err
        per_count.append(jax.device_get(spectra(tau, attention=attention, is_matrix=is_matrix)))

    names = list(per_count[0])
    s = {name: np.stack([c[name] for c in per_count]) for name in names}

    def metrics(values: dict[str, np.ndarray]):
        stable = {k: np.asarray(stable_rank_from_singular_values(v)) for k, v in values.items()}
        energy = {k: np.asarray(energy_rank_from_singular_values(v, fraction=fraction)) for k, v in values.items()}
        return stable, energy

    stable, energy = metrics(s)
    s_boost = stable_boost = energy_boost = None
    if beta is not None:
        s_boost = {k: np.asarray(boost_singular_values(v, beta=float(beta), mode=mode)) for k, v in s.items()}
        stable_boost, energy_boost = metrics(s_boost)
    return RankCollapse(
        num_experts=counts,
        order=order,
        method=method,
        merge_kwargs=dict(merge_kwargs),
        beta=None if beta is None else float(beta),
        mode=mode,
        fraction=float(fraction),
        spectra=s,
        stable_rank=stable,
        energy_rank=energy,
        spectra_boosted=s_boost,
        stable_rank_boosted=stable_boost,
        energy_rank_boosted=energy_boost,
    )
