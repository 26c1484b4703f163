"""Merging PEFT LoRA adapters: every merge method, boosting, and three outputs.

``merge_adapters`` merges T adapters of one base model module by module:

* factored path (TA, weight averaging, TSV-M, Iso-C, Iso-CTS, boosting): in the
  joint column / row spaces of the stacked factors (`subboost.lora.factored`),
  where every SVD is of a ``(T r) x (T r)`` core and no ``m x n`` update is formed;
* dense path (every method of `subboost.merge`, TIES / DARE / Consensus
  included): each module's update ``scale * B_t A_t`` is formed and merged as a
  task vector, then boosted by `subboost.subspace_boost`.

The result (`LoraMerge`) holds one `MergedUpdate` per module. It becomes

* a merged full model: `apply_merge` adds ``alpha`` times the updates to a base
  tree keyed by tensor names (``encoder.layer.0.attention.self.query.weight``),
  the module names mapped onto them by `map_modules`;
* a new PEFT adapter of a chosen rank: `save_adapter` writes the truncated SVD of
  each merged update and reports its relative error per module.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.boosting import check_rank_arguments, subspace_boost
from subboost.checkpoint_io.peft_adapters import LoraAdapter, LoraModule, read_adapter, write_adapter
from subboost.errors import SubboostError
from subboost.lora.factored import FACTORED_METHODS, check_boost, merge_group
from subboost.merging import merge, method_record
from subboost.outputs import LORA_FORMAT, staged_output
from subboost.tree import MatrixLayout

# What `save_adapter` records next to the adapter (also the marker that lets --overwrite replace it).
REPORT_FILE = "lora_merge.json"
# Hyper-parameters the factored path accepts, per method.
FACTORED_ARGUMENTS: dict[str, tuple[str, ...]] = {"iso_cts": ("common_space_fraction",)}


@dataclasses.dataclass(frozen=True)
class MergedUpdate:
    """A module's merged update in ``(out, in)`` orientation: ``left @ core @ right^T``, or ``matrix``.

    The factored path gives ``left (m, k_B)`` and ``right (n, k_A)`` with
    orthonormal columns and a small ``core``; the dense path the ``matrix`` itself.
    """

    left: np.ndarray | None = None
    core: np.ndarray | None = None
    right: np.ndarray | None = None
    matrix: np.ndarray | None = None

    def dense(self) -> np.ndarray:
        """The ``(out, in)`` update as one array (float32)."""
        if self.matrix is not None:
            return np.asarray(self.matrix, np.float32)
        return np.asarray(self.left @ self.core @ self.right.T, np.float32)

    def low_rank(self, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
        """``(A (rank, in), B (out, rank), relative error)``: the truncated SVD ``B A`` of the update.

        The relative error is ``||update - B A||_F / ||update||_F`` (0 for a zero
        update); factors are zero-padded when the update's rank is below ``rank``.
        """
        if self.matrix is not None:
            u, s, vh = np.linalg.svd(np.asarray(self.matrix, np.float64), full_matrices=False)
            left, right_t = u, vh
        else:
            u, s, vh = np.linalg.svd(np.asarray(self.core, np.float64), full_matrices=False)
            left, right_t = self.left @ u, vh @ self.right.T
        kept = min(rank, s.size)
        b = np.zeros((left.shape[0], rank))
        a = np.zeros((rank, right_t.shape[1]))
        b[:, :kept] = left[:, :kept] * s[:kept]
        a[:kept] = right_t[:kept]
        total = float(np.sqrt(np.sum(s**2)))
        error = float(np.sqrt(np.sum(s[kept:] ** 2)) / total) if total > 0 else 0.0
        return a.astype(np.float32), b.astype(np.float32), error


@dataclasses.dataclass(frozen=True)
class LoraMerge:
    """Merged adapters: one `MergedUpdate` per module.

    Attributes:
      modules: ``{module name: MergedUpdate}``.
      template: the first adapter (module kinds, orientation, config for outputs).
      method: the merge method; ``beta`` the boosting cutoff (``None``: not boosted).
      factored: whether the factored path computed it.
      sources: the adapters merged (paths or ``<memory>``).
    """

    modules: dict[str, MergedUpdate]
    template: LoraAdapter
    method: str
    beta: float | None
    factored: bool
    sources: tuple[str, ...]

    def update(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """Module ``name``'s update in the base weight's orientation (transposed for embeddings / Conv1D)."""
        delta = self.modules[name].dense()
        return (delta.T if self.template.modules[name].transposed else delta).astype(dtype)


def _as_adapter(adapter: LoraAdapter | str | os.PathLike) -> LoraAdapter:
    return adapter if isinstance(adapter, LoraAdapter) else read_adapter(adapter)


def check_compatible(adapters: Sequence[LoraAdapter]) -> None:
    """All adapters adapt the same modules with the same shapes and kinds; else one line naming both."""
    first = adapters[0]
    for adapter in adapters[1:]:
        extra = [n for n in adapter.modules if n not in first.modules]
        missing = [n for n in first.modules if n not in adapter.modules]
        if extra or missing:
            name, where = (extra[0], f"which {first.source} does not") if extra else (missing[0], f"which {first.source} does")
            raise SubboostError(f"{adapter.source}: target modules differ: module {name!r} "
                                f"{'is adapted' if extra else 'is not adapted'}, {where} "
                                f"({len(extra)} extra, {len(missing)} missing).")
        for name, module in adapter.modules.items():
            ref = first.modules[name]
            if module.weight_shape != ref.weight_shape or module.kind != ref.kind or module.transposed != ref.transposed:
                raise SubboostError(
                    f"{adapter.source}: module {name!r} updates a {module.kind} weight of shape {module.weight_shape}"
                    f"{' (transposed)' if module.transposed else ''}, but {first.source} a {ref.kind} weight of shape "
                    f"{ref.weight_shape}{' (transposed)' if ref.transposed else ''}: adapters of different bases?")


def _weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count or not all(np.isfinite(weights)):
        raise SubboostError(f"merge_adapters: weights must be {count} finite numbers (one per adapter), got {weights}.")
    return weights


def _is_update(path: str, leaf: Any) -> MatrixLayout | None:
    """Every 2-D leaf of the update tree is an ``(out, in)`` matrix."""
    return MatrixLayout("matrix") if len(np.shape(leaf)) == 2 else None


def merge_adapters(
    adapters: Sequence[LoraAdapter | str | os.PathLike],
    method: str = "task_arithmetic",
    *,
    weights: Sequence[float] | None = None,
    factored: bool | None = None,
    beta: float | None = None,
    mode: str = "cumsum",
    rank_rtol: float | None = None,
    **hyper_parameters: Any,
) -> LoraMerge:
    """Merges LoRA adapters of one base model, module by module.

    Task t's update of a module is ``tau_t = w_t * scale_t * B_t A_t``; the
    method merges them as task vectors (``sum_t tau_t`` for TA), then boosting
    (``beta``) raises the small singular values of each merged update.

    Args:
      adapters: adapter directories or `LoraAdapter`s (at least two).
      method: any of `subboost.available_methods()`.
      weights: ``w_t`` per adapter (default 1), multiplying its update.
      factored: merge in the joint factor spaces (`subboost.lora.factored`);
        ``None`` (default): whenever ``method`` has a factored form
        (``task_arithmetic``, ``weight_averaging``, ``tsv``, ``iso_c``, ``iso_cts``).
      beta: Subspace Boosting cutoff of every merged update; ``None``: no boosting.
      mode: boosting's cutoff rule (``cumsum`` or ``index``).
      rank_rtol: singular values ``<= rank_rtol * s_0`` count as zero (boosting;
        and the undetermined triplets of the factored SVD merges). ``None``:
        ``max(m, n) * eps`` on the factored path, the authors' behaviour on the dense one.
      **hyper_parameters: the method's (e.g. ``k`` of TIES, ``key`` and ``p`` of DARE).

    Returns:
      A `LoraMerge`.

    Raises:
      SubboostError: unreadable adapters, adapters of different bases or target
        modules (one line naming the adapter and module), bad hyper-parameters.
    """
    check_boost(beta, mode)
    check_rank_arguments(None, rank_rtol)
    method_record(method)
    adapters = [_as_adapter(a) for a in adapters]
    if len(adapters) < 2:
        raise SubboostError(f"merge_adapters: needs at least two adapters, got {len(adapters)}.")
    check_compatible(adapters)
    weights = _weights(weights, len(adapters))
    if factored is None:
        factored = method in FACTORED_METHODS
    if factored and method not in FACTORED_METHODS:
        raise SubboostError(f"merge_adapters: {method} has no factored form (those with one: "
                            f"{', '.join(FACTORED_METHODS)}); pass factored=False for the dense path.")
    run = _merge_factored if factored else _merge_dense
    modules = run(adapters, weights, method, beta=beta, mode=mode, rank_rtol=rank_rtol, hyper=hyper_parameters)
    return LoraMerge(modules, adapters[0], method, None if beta is None else float(beta), bool(factored),
                     tuple(a.source for a in adapters))


def _merge_factored(adapters: Sequence[LoraAdapter], weights: Sequence[float], method: str, *, beta, mode, rank_rtol,
                    hyper: Mapping[str, Any]) -> dict[str, MergedUpdate]:
    allowed = FACTORED_ARGUMENTS.get(method, ())
    unknown = [k for k in hyper if k not in allowed]
    if unknown:
        raise SubboostError(f"merge_adapters: {method} on the factored path takes no hyper-parameter(s) {unknown}; "
                            f"valid ones: {list(allowed)}.")
    if method == "iso_cts":
        from subboost.merging.iso import check_common_space_fraction

        check_common_space_fraction(hyper.get("common_space_fraction", 0.8))
    names = list(adapters[0].modules)
    groups: dict[tuple, list[str]] = {}
    for name in names:
        modules = [a.modules[name] for a in adapters]
        groups.setdefault((modules[0].shape, tuple(m.rank for m in modules)), []).append(name)
    out: dict[str, MergedUpdate] = {}
    previous = None
    for (shape, ranks), members in groups.items():
        b = np.stack([np.concatenate([w * a.modules[n].scale * a.modules[n].lora_b.astype(np.float32)
                                      for a, w in zip(adapters, weights)], axis=1) for n in members])
        a = np.stack([np.concatenate([a.modules[n].lora_a.astype(np.float32) for a in adapters], axis=0)
                      for n in members])
        q_b, core, q_a = merge_group(jnp.asarray(b), jnp.asarray(a), previous, ranks=ranks, shape=shape,
                                     method=method, method_kwargs=tuple(sorted(hyper.items())), beta=beta,
                                     mode=mode, rank_rtol=rank_rtol)
        previous = core
        q_b, core, q_a = jax.device_get((q_b, core, q_a))
        for i, name in enumerate(members):
            out[name] = MergedUpdate(left=q_b[i], core=core[i], right=q_a[i])
    return {name: out[name] for name in names}


def _merge_dense(adapters: Sequence[LoraAdapter], weights: Sequence[float], method: str, *, beta, mode, rank_rtol,
                 hyper: Mapping[str, Any]) -> dict[str, MergedUpdate]:
    names = list(adapters[0].modules)
    tvs = {name: jnp.stack([w * jnp.asarray(_update(a.modules[name])) for a, w in zip(adapters, weights)])
           for name in names}
    kwargs = dict(hyper)
    if method_record(method).matrix_kernel is not None:
        kwargs.setdefault("is_matrix", _is_update)
    merged = merge(tvs, method, **kwargs)
    if beta is not None:
        merged = subspace_boost(merged, beta=beta, mode=mode, rank_rtol=rank_rtol, is_matrix=_is_update)
    merged = jax.device_get(merged)
    return {name: MergedUpdate(matrix=np.asarray(merged[name])) for name in names}


def _update(module: LoraModule) -> np.ndarray:
    """``scale * B A`` in ``(out, in)`` orientation, float32."""
    return module.scale * (module.lora_b.astype(np.float32) @ module.lora_a.astype(np.float32))


def merge_factors(
    adapters: Sequence[LoraAdapter | str | os.PathLike],
    method: str = "task_arithmetic",
    *,
    weights: Sequence[float] | None = None,
    **hyper_parameters: Any,
) -> LoraMerge:
    """Merges the ``A`` factors and the ``B`` factors separately: peft's ``linear`` / ``ties`` / ``dare_*``.

    With ``c_t = w_t scale_t``, task t contributes ``sign(c_t) sqrt(|c_t|) A_t`` and
    ``sqrt(|c_t|) B_t``; an elementwise ``method`` merges the A's into ``A`` and
    the B's into ``B``, and the update is ``B A``. Not the merge of the updates
    (``B A != sum_t c_t B_t A_t``: cross terms appear): it is what peft's
    ``add_weighted_adapter`` does for those combination types, kept for
    comparison. Needs equal ranks per module across adapters.

    Args:
      adapters: adapter directories or `LoraAdapter`s (at least two).
      method: an elementwise method (``task_arithmetic``, ``weight_averaging``,
        ``ties``, ``dare``, ``consensus``); TIES's ``scope="per_leaf"`` trims each
        factor alone, as peft does.
      weights: ``w_t`` per adapter (default 1).
      **hyper_parameters: the method's.
    """
    adapters = [_as_adapter(a) for a in adapters]
    if len(adapters) < 2:
        raise SubboostError(f"merge_factors: needs at least two adapters, got {len(adapters)}.")
    check_compatible(adapters)
    weights = _weights(weights, len(adapters))
    if method_record(method).matrix_kernel is not None:
        raise SubboostError(f"merge_factors: {method} acts on matrices' spectra; merging the factors separately "
                            "needs an elementwise method (task_arithmetic, ties, dare, ...).")
    tree = {}
    for name, module in adapters[0].modules.items():
        ranks = {a.modules[name].rank for a in adapters}
        if len(ranks) > 1:
            raise SubboostError(f"merge_factors: module {name!r} has ranks {sorted(ranks)} across the adapters; "
                                "merging the factors separately needs equal ranks.")
        coefficients = [w * a.modules[name].scale for a, w in zip(adapters, weights)]
        tree[name] = {
            "lora_A": jnp.stack([np.sign(c) * np.sqrt(abs(c)) * a.modules[name].lora_a.astype(np.float32)
                                 for a, c in zip(adapters, coefficients)]),
            "lora_B": jnp.stack([np.sqrt(abs(c)) * a.modules[name].lora_b.astype(np.float32)
                                 for a, c in zip(adapters, coefficients)]),
        }
    merged = jax.device_get(merge(tree, method, **hyper_parameters))
    modules = {}
    for name, factors in merged.items():
        q_b, r_b = np.linalg.qr(np.asarray(factors["lora_B"], np.float64))
        q_a, r_a = np.linalg.qr(np.asarray(factors["lora_A"], np.float64).T)
        modules[name] = MergedUpdate(left=q_b, core=r_b @ r_a.T, right=q_a)
    return LoraMerge(modules, adapters[0], f"{method} (factors)", None, False, tuple(a.source for a in adapters))


# ----------------------------------------------------------------------------
# Base models keyed by tensor names
# ----------------------------------------------------------------------------
def map_modules(modules: Mapping[str, LoraModule], base_shapes: Mapping[str, tuple[int, ...]], *,
                source: str = "adapter", base_name: str = "base") -> dict[str, str]:
    """``{module name: base tensor name}``: each module's ``.weight`` among the base's tensors.

    A module ``a.b.c`` maps to the tensor ``a.b.c.weight``, or to the one tensor
    ending in ``.{suffix}.weight`` for the longest suffix of ``a.b.c`` (at least
    two components) that names exactly one tensor: adapters trained on a task
    model (``bert.encoder...``) apply to its backbone (``encoder...``) and back.

    Raises:
      SubboostError: a module with no tensor, several, or a tensor of another
        shape (an adapter of another base), naming the adapter and the module.
    """
    names = list(base_shapes)
    mapping: dict[str, str] = {}
    for module_name, module in modules.items():
        parts = module_name.split(".")
        found = None
        for start in range(0, max(len(parts) - 1, 1)):
            suffix = ".".join(parts[start:]) + ".weight"
            matches = [n for n in names if n == suffix or n.endswith("." + suffix)]
            if len(matches) == 1:
                found = matches[0]
                break
            if len(matches) > 1:
                raise SubboostError(f"{source}: module {module_name!r} matches several tensors of the {base_name} "
                                    f"({', '.join(matches[:3])}{', ...' if len(matches) > 3 else ''}).")
        if found is None:
            raise SubboostError(f"{source}: module {module_name!r} has no weight {module_name + '.weight'!r} in the "
                                f"{base_name}: an adapter of another base?")
        shape = tuple(base_shapes[found])
        if shape != module.weight_shape:
            raise SubboostError(f"{source}: module {module_name!r} updates a weight of shape {module.weight_shape}, "
                                f"but the {base_name}'s {found!r} has shape {shape}: an adapter of another base?")
        mapping[module_name] = found
    return mapping


def apply_merge(base: Mapping[str, Any], merged: LoraMerge, *, alpha: float = 1.0,
                base_name: str = "base") -> dict[str, np.ndarray]:
    """A new tensor-name tree: ``base`` with ``alpha`` times each merged update added (base dtypes kept).

    ``base`` is not modified; tensors without an update are the base's own arrays.
    """
    mapping = map_modules(merged.template.modules, {k: np.shape(v) for k, v in base.items()},
                          source=merged.template.source, base_name=base_name)
    out = dict(base)
    for module_name, tensor_name in mapping.items():
        weight = np.asarray(base[tensor_name])
        delta = merged.update(module_name)
        out[tensor_name] = (weight.astype(np.float32) + float(alpha) * delta).astype(weight.dtype)
    return out


# ----------------------------------------------------------------------------
# A new adapter
# ----------------------------------------------------------------------------
def adapter_factors(merged: LoraMerge, *, rank: int, alpha: float = 1.0
                    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, float]]:
    """``({module: (A, B)}, {module: relative error})``: rank-``rank`` factors of ``alpha`` times each update."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SubboostError(f"save_adapter: rank must be a positive integer, got {rank!r}.")
    factors, errors = {}, {}
    for name, update in merged.modules.items():
        a, b, error = update.low_rank(rank)
        factors[name] = (a, float(alpha) * b)
        errors[name] = error
    return factors, errors


def save_adapter(merged: LoraMerge, out: str | os.PathLike, *, rank: int, alpha: float = 1.0,
                 overwrite: bool = False, dtype: Any = np.float32) -> dict[str, float]:
    """Writes ``alpha`` times the merged updates as a PEFT adapter of rank ``rank``.

    Each module gets the truncated SVD of its update (``lora_alpha = r``, so
    scale 1); ``peft.PeftModel.from_pretrained(base, out)`` loads it. Next to it,
    ``lora_merge.json`` records the method, the sources and the relative error
    ``||update - B A||_F / ||update||_F`` of every module. Written atomically;
    an existing ``out`` is replaced only with ``overwrite`` and only if subboost
    wrote it.

    Returns:
      ``{module name: relative error}``.
    """
    factors, errors = adapter_factors(merged, rank=rank, alpha=alpha)
    inputs = [s for s in merged.sources if s != "<memory>"]
    with staged_output(out, overwrite=overwrite, inputs=inputs, name="adapter output") as built:
        write_adapter(built, factors, template=merged.template, rank=rank, dtype=dtype)
        report = {"format": LORA_FORMAT, "method": merged.method, "beta": merged.beta, "factored": merged.factored, "alpha": float(alpha),
                  "rank": rank, "sources": list(merged.sources), "relative_error": errors}
        (Path(built) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return errors


__all__ = [
    "LoraMerge",
    "MergedUpdate",
    "REPORT_FILE",
    "adapter_factors",
    "apply_merge",
    "check_compatible",
    "map_modules",
    "merge_adapters",
    "merge_factors",
    "save_adapter",
]
