"""Post-merge operators, composable like ``optax.chain``: ``tau -> tau`` transformations of a merged task vector.

Several methods are operators applied *after* a merge: Subspace Boosting,
Iso's spectrum flattening, SVC's calibration, STAR's truncation, LiNeS and
LARV's layer scales. Each is built here as a `PostMerge`, a callable::

    op = sb.post.chain(sb.post.svc(min_projection=0.1), sb.post.boost(beta=0.02))
    tau = op(sb.merge(tvs, "task_arithmetic"), task_vectors=tvs)

``op(tau, task_vectors=None, pretrained=None)`` returns the transformed
merged task vector; operators that need the stacked task vectors (SVC) or
the pretrained parameters (LARV) say so and refuse to run without them.
`chain` applies its operators left to right. The same compositions are
written as strings in the CLI and the benchmark configs,
``"svc:min_projection=0.1 + boost:beta=0.02"`` or as a list of such items
(`parse`).

The operators (each one's math in its docstring):

* `boost`: Subspace Boosting (`subboost.subspace_boost`);
* `iso`: every matrix's spectrum flattened, ``mean(s) U V^T`` (Iso-C's step);
* `svc`: Singular Value Calibration (`svc_matrices`);
* `star`: STAR's truncate-and-rescale (`subboost.merging.star`);
* `lines`: LiNeS depth scaling (`subboost.lines`);
* `larv`: LARV's tiered layer scales (`larv_scales`).

Mesh and streaming: the operators run on an in-memory merged task vector.
`boost` takes ``mesh`` itself; the others have no mesh or streaming path
(they act on one merged vector, usually small next to the experts).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost import linalg
from subboost.boosting import subspace_boost
from subboost.errors import SubboostError
from subboost.merging.iso import iso_c_matrices
from subboost.merging.lines import block_indices, lines as lines_scaling
from subboost.merging.star import check_nuclear_fraction, star_truncate_matrices
from subboost.merging.tsv import check_batch_size
from subboost.tree import AttentionMode, PyTree, leaves_with_paths, map_matrices, matrix_plan
from subboost.validation import check_real

Apply = Callable[[PyTree, PyTree | None, PyTree | None], PyTree]


@dataclasses.dataclass(frozen=True)
class PostMerge:
    """A post-merge operator: ``op(tau, task_vectors=..., pretrained=...) -> tau``.

    Attributes:
      name: what it is, with its settings (``"svc(min_projection=0.1)"``);
        a chain joins its parts with ``" -> "``.
      apply: ``apply(tau, task_vectors, pretrained) -> tau``.
      needs_task_vectors: refuses to run without the stacked task vectors.
      needs_pretrained: refuses to run without the pretrained parameters.
    """

    name: str
    apply: Apply
    needs_task_vectors: bool = False
    needs_pretrained: bool = False

    def __call__(self, tau: PyTree, *, task_vectors: PyTree | None = None, pretrained: PyTree | None = None) -> PyTree:
        if self.needs_task_vectors and task_vectors is None:
            raise SubboostError(f"{self.name}: needs the stacked task vectors; call it as op(tau, task_vectors=tvs).")
        if self.needs_pretrained and pretrained is None:
            raise SubboostError(f"{self.name}: needs the pretrained parameters; call it as op(tau, pretrained=params).")
        return self.apply(tau, task_vectors, pretrained)


def _named(op: str, settings: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in settings.items() if not callable(v))
    return f"{op}({shown})"


def chain(*ops: PostMerge) -> PostMerge:
    """The operators applied left to right, as one `PostMerge` (``chain()`` is the identity).

    Example:
      >>> import jax.numpy as jnp
      >>> op = chain(iso(), lines(alpha=2.0, beta=0.0, pattern=r"block(\\d+)"))
      >>> op({"block0": {"kernel": jnp.diag(jnp.array([3.0, 1.0]))}})["block0"]["kernel"]
      Array([[4., 0.],
             [0., 4.]], dtype=float32)
    """
    for i, op in enumerate(ops):
        if not isinstance(op, PostMerge):
            raise SubboostError(f"chain: operator {i} is {op!r}, not a post-merge operator (sb.post.*).")

    def apply(tau, task_vectors, pretrained):
        for op in ops:
            tau = op(tau, task_vectors=task_vectors, pretrained=pretrained)
        return tau

    return PostMerge(" -> ".join(op.name for op in ops) or "identity", apply,
                     needs_task_vectors=any(op.needs_task_vectors for op in ops),
                     needs_pretrained=any(op.needs_pretrained for op in ops))


# ----------------------------------------------------------------------------
# The operators
# ----------------------------------------------------------------------------
def boost(**settings: Any) -> PostMerge:
    """Subspace Boosting with `subboost.subspace_boost`'s keywords (``beta``, ``attn_beta``, ``mesh``, ...)."""
    settings.pop("return_info", None)

    def apply(tau, task_vectors, pretrained):
        return subspace_boost(tau, **settings)

    return PostMerge(_named("boost", settings), apply)


def iso(
    *, attention: AttentionMode = "per_qkv", is_matrix: Callable | None = None, batch_size: int | None = None
) -> PostMerge:
    """Iso flattening: every matrix ``U diag(s) V^T`` becomes ``mean(s) U V^T``; other leaves unchanged.

    On Task Arithmetic's sum this is Iso-C; after any other merge it equalises
    that merge's spectrum the same way.
    """
    check_batch_size(batch_size, "iso")

    def apply(tau, task_vectors, pretrained):
        return map_matrices(lambda x: iso_c_matrices(x[:, None]), tau, attention=attention, is_matrix=is_matrix,
                            batch_size=batch_size)

    return PostMerge(_named("iso", {"attention": attention, "batch_size": batch_size}), apply)


def star(
    *,
    nuclear_fraction: float = 0.4,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
) -> PostMerge:
    """STAR truncation of the merged matrices: the fewest top directions holding ``nuclear_fraction`` of the
    nuclear norm, rescaled to the whole nuclear norm (`subboost.merging.star`); other leaves unchanged."""
    check_nuclear_fraction(nuclear_fraction, "post.star")
    check_batch_size(batch_size, "post.star")

    def apply(tau, task_vectors, pretrained):
        kernel = functools.partial(star_truncate_matrices, nuclear_fraction=nuclear_fraction)
        return map_matrices(kernel, tau, attention=attention, is_matrix=is_matrix, batch_size=batch_size)

    return PostMerge(_named("star", {"nuclear_fraction": nuclear_fraction, "attention": attention}), apply)


def lines(**settings: Any) -> PostMerge:
    """LiNeS depth scaling with `subboost.lines`'s keywords (``alpha``, ``beta``, ``pattern``, ...)."""

    def apply(tau, task_vectors, pretrained):
        return lines_scaling(tau, **settings)

    return PostMerge(_named("lines", settings), apply)


# -- SVC ----------------------------------------------------------------------
SVC_DENOMINATOR_FLOOR = 1e-12


def svc_matrices(
    merged: jax.Array, tasks: jax.Array, *, min_projection: float = 0.1, merge_coefficient: float = 1.0
) -> jax.Array:
    """Singular Value Calibration of merged matrices ``(..., m, n)`` given task matrices ``(..., T, m, n)``.

    With ``c tau = U diag(s) V^T`` (``c`` the merge coefficient the result is
    applied with) and, per direction ``r`` and task ``t``, the responses
    ``a_r = u_r^T c tau = s_r v_r^T`` and ``a_r^t = u_r^T tau_t``::

        p_rt    = <a_r, a_r^t> / max(||a_r^t||^2, 1e-12)     projection coefficient
        gamma_r = T / sum_t max(p_rt, min_projection)
        result  = U diag(gamma * s) V^T / c

    Directions that every task pushes the same way (``p_rt > 1``, shared
    knowledge counted T times) shrink; ``min_projection`` (the paper's
    ``alpha``) keeps tasks that oppose or ignore a direction from inflating it.
    """
    dtype = linalg.compute_dtype(merged.dtype)
    scaled = merged.astype(dtype) * merge_coefficient
    tasks = tasks.astype(dtype)
    u, s, vh = linalg.svd(scaled)
    responses = jnp.swapaxes(u, -1, -2)[..., None, :, :] @ tasks  # (..., T, r, n): a_r^t as rows
    numerator = s[..., None, :] * jnp.sum(responses * vh[..., None, :, :], axis=-1)  # (..., T, r)
    denominator = jnp.maximum(jnp.sum(responses * responses, axis=-1), SVC_DENOMINATOR_FLOOR)
    projection = jnp.nan_to_num(numerator / denominator, nan=min_projection, neginf=min_projection)
    gamma = tasks.shape[-3] / jnp.sum(jnp.maximum(projection, min_projection), axis=-2)
    return (linalg.reconstruct(u, gamma * s, vh) / merge_coefficient).astype(merged.dtype)


def _stack_with(tau: PyTree, others: PyTree, *, what: str, lead: bool) -> PyTree:
    """``[tau, *others]`` along a new leading axis (``lead``: ``others`` already carries one), shapes checked."""
    tau_leaves, others_leaves = dict(leaves_with_paths(tau)), dict(leaves_with_paths(others))
    if tau_leaves.keys() != others_leaves.keys():
        missing = sorted(tau_leaves.keys() ^ others_leaves.keys())[:4]
        raise SubboostError(f"{what}: the merged task vector and the {'task vectors' if lead else 'pretrained parameters'}"
                            f" have different parameters (e.g. {missing}).")
    for path, x in tau_leaves.items():
        shape = np.shape(others_leaves[path])[1:] if lead else np.shape(others_leaves[path])
        if tuple(shape) != tuple(np.shape(x)):
            raise SubboostError(f"{what}: parameter {path!r} has shape {np.shape(x)} in the merged task vector but "
                                f"{np.shape(others_leaves[path])} in the {'task vectors' if lead else 'pretrained'}.")

    def stack(t, o):
        t = jnp.asarray(t)
        o = jnp.asarray(o, t.dtype)
        return jnp.concatenate([t[None], o if lead else o[None]], axis=0)

    return jax.tree_util.tree_map(stack, tau, others)


def svc(
    *,
    min_projection: float = 0.1,
    merge_coefficient: float = 1.0,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
) -> PostMerge:
    """Singular Value Calibration (Singular Value Calibration / "When shared knowledge hurts", arXiv 2602.05536).

    Every matrix of the merged task vector is calibrated by `svc_matrices`
    against the task vectors; other leaves are unchanged.

    Args:
      min_projection: the paper's ``alpha``, the floor on each task's
        projection coefficient (FusionBench's configs: 0.1).
      merge_coefficient: the ``alpha`` the result will be applied with.
        SVC compares ``c tau`` with the task vectors, so it is not
        scale-free: FusionBench calibrates ``theta_merged - theta_0``, which
        for Task Arithmetic is ``0.3 sum_t tau_t`` (pass 0.3 there and apply
        with alpha 0.3). The result is divided by ``c`` again.
      attention, is_matrix, batch_size: the matrix view (FusionBench: every
        2-D tensor, ``subboost.reference.every_2d_matrix_hf`` with ``per_qkv``).

    Conventions of FusionBench 0.2.33 (``singular_value_calibration/utils.py``,
    ``subspace_consistency_spectral_calibration_accelerated``, its default),
    matched here: the merged responses ``a_r`` come from the merged matrix's
    own left singular vectors; the squared norms are floored at ``1e-12`` and
    NaN or ``-inf`` coefficients replaced by ``min_projection``. Difference:
    the reference computes in float64, here in the compute dtype (float32 for
    float32 inputs); ``a_r = s_r v_r^T`` is used in closed form.
    """
    check_real("min_projection", min_projection, what="svc")
    check_real("merge_coefficient", merge_coefficient, what="svc", low=0.0, low_open=True)
    check_batch_size(batch_size, "svc")

    def apply(tau, task_vectors, pretrained):
        combined = _stack_with(tau, task_vectors, what="svc", lead=True)

        def kernel(x):  # (B, 1 + T, m, n)
            return svc_matrices(x[:, 0], x[:, 1:], min_projection=min_projection,
                                merge_coefficient=merge_coefficient)

        return map_matrices(kernel, combined, non_matrix=lambda x: x[0], lead_ndim=1, attention=attention,
                            is_matrix=is_matrix, batch_size=batch_size)

    return PostMerge(_named("svc", {"min_projection": min_projection, "merge_coefficient": merge_coefficient,
                                    "attention": attention}), apply, needs_task_vectors=True)


# -- LARV ---------------------------------------------------------------------
# Block numbers of subboost's CLIP (``resblocks_3``) and BERT (``layer_3``) parameter paths.
LARV_BLOCK_PATTERN = r"(?:resblocks|layer)_(\d+)"

def effective_rank(s: jax.Array) -> jax.Array:
    """``exp(-sum_j p_j log p_j)`` with ``p_j = s_j^2 / sum s^2`` (1 for a zero matrix)."""
    energy = s * s
    total = jnp.sum(energy, axis=-1, keepdims=True)
    p = jnp.where(total > 0, energy / jnp.where(total > 0, total, 1.0), 0.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return jnp.exp(entropy)


def commutator_conflict(base: jax.Array, delta: jax.Array) -> jax.Array:
    """``(||A D^T - D A^T|| + ||A^T D - D^T A||) / (2 ||A|| ||D||)`` per matrix (0 when either is zero)."""
    left = base @ jnp.swapaxes(delta, -1, -2)
    right = jnp.swapaxes(base, -1, -2) @ delta
    left_norm = jnp.linalg.norm(left - jnp.swapaxes(left, -1, -2), axis=(-2, -1))
    right_norm = jnp.linalg.norm(right - jnp.swapaxes(right, -1, -2), axis=(-2, -1))
    scale = jnp.linalg.norm(base, axis=(-2, -1)) * jnp.linalg.norm(delta, axis=(-2, -1))
    return jnp.where(scale > 0, 0.5 * (left_norm + right_norm) / jnp.where(scale > 0, scale, 1.0), 0.0)


def larv_matrix_proxies(x: jax.Array) -> jax.Array:
    """``(B, 2, m, n)`` stacks of (update, pretrained) -> ``(B, 2)``: effective-rank contrast and conflict."""
    x = x.astype(linalg.compute_dtype(x.dtype))
    delta, base = x[:, 0], x[:, 1]
    contrast = effective_rank(linalg.singular_values(base)) / (effective_rank(linalg.singular_values(delta)) + 1e-8)
    return jnp.stack([contrast, commutator_conflict(base, delta)], axis=-1)


def larv_scales(
    tau: PyTree,
    pretrained: PyTree,
    *,
    tier_scales: Sequence[float] = (0.5, 1.0, 1.5),
    contrast_power: float = 1.0,
    depth_power: float = 0.5,
    pattern: str = LARV_BLOCK_PATTERN,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
) -> dict[int, float]:
    """``{block index: LARV scale}`` for a merged task vector and its pretrained parameters.

    Per block ``l`` of ``L`` (blocks read from parameter paths by ``pattern``,
    as LiNeS), averaging over the block's matrices (update ``D = tau``,
    pretrained ``A``)::

        e_l = r_eff(A) / (r_eff(D) + 1e-8)          effective-rank contrast
        c_l = commutator_conflict(A, D)              (standardised over blocks: z_l)
        q_l = e_l^contrast_power ((l + 1) / L)^depth_power / (1 + softplus(z_l))

    and the tiered rule: blocks with ``q_l`` at most the lower tercile of the
    scores get ``tier_scales[0]``, at most the upper tercile ``tier_scales[1]``,
    the rest ``tier_scales[-1]`` (two values: below or above the median).
    """
    if len(tier_scales) not in (2, 3):
        raise SubboostError(f"larv: tier_scales must hold 2 or 3 scales, got {tier_scales!r}.")
    for i, value in enumerate(tier_scales):
        check_real(f"tier_scales[{i}]", value, what="larv")
    combined = _stack_with(tau, pretrained, what="larv", lead=False)
    plan = matrix_plan(combined, lead_ndim=1, is_matrix=is_matrix, attention=attention)
    proxies = plan.split(plan.map_groups(larv_matrix_proxies, combined))
    blocks = block_indices(tau, pattern=pattern)
    per_block: dict[int, list[np.ndarray]] = {}
    for member in plan.members:
        block = blocks[plan.paths[member.leaf_ids[0]]]
        if block is not None:
            per_block.setdefault(block, []).append(np.asarray(proxies[member.name], np.float64).reshape(-1, 2))
    if not per_block:
        raise SubboostError(f"larv: no matrix parameter path matches the block pattern {pattern!r}; pass pattern= "
                            "with one capturing group for the block index.")
    order = sorted(per_block)
    values = np.array([np.concatenate(per_block[b]).mean(axis=0) for b in order])
    contrast, conflict = values[:, 0], values[:, 1]
    spread = conflict.std()
    z = (conflict - conflict.mean()) / (spread if spread > 1e-8 else 1.0)
    depth = (np.asarray(order, np.float64) + 1) / (max(order) + 1)
    score = contrast ** contrast_power * depth ** depth_power / (1.0 + np.logaddexp(0.0, z))
    cuts = np.quantile(score, [1 / 3, 2 / 3] if len(tier_scales) == 3 else [0.5])
    tiers = np.searchsorted(cuts, score, side="left")  # score <= cut -> that tier
    return {b: float(tier_scales[t]) for b, t in zip(order, tiers)}


def larv(
    *,
    tier_scales: Sequence[float] = (0.5, 1.0, 1.5),
    contrast_power: float = 1.0,
    depth_power: float = 0.5,
    pattern: str = LARV_BLOCK_PATTERN,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
) -> PostMerge:
    """LARV layer scaling (arXiv 2602.09413): each block of the merged task vector times its tier's scale.

    The scales come from `larv_scales` (data-free proxies of the update and
    the pretrained weights); parameters outside any block keep scale 1. Needs
    the pretrained parameters: ``op(tau, pretrained=params)``. See
    docs/methods.md for which parts follow the paper and which are this
    library's choices (the tier values among them).
    """
    tier_scales = tuple(tier_scales)
    settings = {"tier_scales": tier_scales, "contrast_power": contrast_power, "depth_power": depth_power,
                "pattern": pattern, "attention": attention}

    def apply(tau, task_vectors, pretrained):
        scales = larv_scales(tau, pretrained, tier_scales=tier_scales, contrast_power=contrast_power,
                             depth_power=depth_power, pattern=pattern, attention=attention, is_matrix=is_matrix)
        blocks = block_indices(tau, pattern=pattern)

        def scale(path, x):
            factor = scales.get(blocks[path], 1.0) if blocks[path] is not None else 1.0
            x = jnp.asarray(x)
            return (x.astype(linalg.compute_dtype(x.dtype)) * factor).astype(x.dtype)

        flat = dict(leaves_with_paths(tau))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tau),
                                            [scale(p, x) for p, x in flat.items()])

    return PostMerge(_named("larv", settings), apply, needs_pretrained=True)


# ----------------------------------------------------------------------------
# Strings: the CLI and the benchmark configs
# ----------------------------------------------------------------------------
OPERATORS: dict[str, Callable[..., PostMerge]] = {
    "boost": boost, "iso": iso, "svc": svc, "star": star, "lines": lines, "larv": larv,
}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_one(text: str) -> PostMerge:
    """``"svc:min_projection=0.1,merge_coefficient=0.3"`` -> ``svc(min_projection=0.1, merge_coefficient=0.3)``.

    Values are Python literals (``tier_scales=(0.5,1,1.5)``) or bare strings.
    """
    name, _, rest = text.strip().partition(":")
    if name not in OPERATORS:
        raise SubboostError(f"unknown post-merge operator {name!r} in {text!r}; known: {', '.join(OPERATORS)}.")
    settings = {}
    # split on commas that start a new NAME=, so tuple values may hold commas
    for item in re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", rest) if rest.strip() else []:
        key, eq, value = item.partition("=")
        if not eq:
            raise SubboostError(f"post-merge operator {name}: expected NAME=VALUE, got {item!r} in {text!r}.")
        settings[key.strip()] = _literal(value.strip())
    try:
        return OPERATORS[name](**settings)
    except TypeError as error:
        raise SubboostError(f"post-merge operator {name}: {error}") from None


def parse(spec: str | Sequence[str] | PostMerge | None) -> PostMerge:
    """A chain from ``"op:k=v,... + op:k=v"`` text, a list of such items, or an operator (``None``: identity)."""
    if spec is None:
        return chain()
    if isinstance(spec, PostMerge):
        return spec
    items = spec.split("+") if isinstance(spec, str) else list(spec)
    return chain(*(parse_one(item) for item in items if item.strip()))


def split_composition(text: str) -> tuple[str, PostMerge]:
    """``"tsv + svc:min_projection=0.1"`` -> ``("tsv", svc(min_projection=0.1))``: a merge method, then operators.

    A bare method name gives the identity chain. Benchmark configs list
    compositions this way next to plain method names.
    """
    method, _, rest = text.partition("+")
    return method.strip(), parse(rest) if rest.strip() else chain()


__all__ = [
    "OPERATORS",
    "PostMerge",
    "boost",
    "chain",
    "commutator_conflict",
    "effective_rank",
    "iso",
    "larv",
    "larv_scales",
    "lines",
    "parse",
    "parse_one",
    "split_composition",
    "star",
    "svc",
    "svc_matrices",
]
