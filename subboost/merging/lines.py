"""LiNeS: linear layer scaling of a task vector by depth (Wang et al., ICLR 2025, arXiv 2410.17146).

Shallow layers hold general features that merging should disturb least, deep
layers the task-specific ones. LiNeS scales every parameter of transformer
block ``l`` (0-based, ``L`` blocks) by::

    lambda_l = alpha + beta * l / (L - 1)           (lambda_l = alpha when L = 1)

so the first block gets ``alpha`` and the last ``alpha + beta``. Parameters
outside any block (patch/class/positional embeddings, ``ln_pre``, ``ln_post``,
the final projection) get ``non_block_scale``, by default ``alpha`` -- the
reference implementation's choice (every parameter whose name matches no
block keeps the minimum scale).

The block index is read from each parameter's ``"a/b/c"`` path by a regular
expression with one capturing group, by default ``resblocks_(\\d+)`` (scenic
CLIP names, ``transformer/resblocks_3/mlp/c_fc/kernel`` -> block 3); the first
match in the path wins. ``L`` defaults to the largest index found plus one.

LiNeS is a transformation of a task vector, applied after any merge (and
before or after Subspace Boosting: for positive scales the two commute, since
``boost(c tau) = c boost(tau)`` per matrix), then ``apply_task_vector`` with
its own ``alpha`` sweep. It also works on stacked task vectors (every leaf
keeps its leading axes). Scan-stacked layers (a leading layer axis instead of
numbered modules) are not read: their paths carry no block index.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from subboost.linalg import compute_dtype
from subboost.errors import SubboostError
from subboost.tree import PyTree, leaves_with_paths, path_str

DEFAULT_BLOCK_PATTERN = r"resblocks_(\d+)"


def _compile(pattern: str | re.Pattern) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as error:
        raise SubboostError(f"lines: pattern {pattern!r} is not a valid regular expression ({error}).") from None
    if compiled.groups != 1:
        raise SubboostError(
            f"lines: pattern {compiled.pattern!r} must have exactly one capturing group (the block "
            f"index), it has {compiled.groups}."
        )
    return compiled


def block_indices(tree: PyTree, *, pattern: str | re.Pattern = DEFAULT_BLOCK_PATTERN) -> dict[str, int | None]:
    """``{parameter path: block index or None}`` as read by ``pattern``'s capturing group.

    Raises:
      SubboostError: the pattern does not have one capturing group, or a
        captured text is not a non-negative integer.
    """
    compiled = _compile(pattern)
    out: dict[str, int | None] = {}
    for path, _ in leaves_with_paths(tree):
        match = compiled.search(path)
        if match is None:
            out[path] = None
            continue
        text = match.group(1)
        if text is None or not text.isdigit():
            raise SubboostError(
                f"lines: pattern {compiled.pattern!r} captured {text!r} from parameter {path!r}; "
                "the capturing group must match a block number."
            )
        out[path] = int(text)
    return out


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SubboostError(f"lines: {name} must be a finite number, got {value!r}.")
    return float(value)


def lines_scales(
    tree: PyTree,
    *,
    alpha: float,
    beta: float,
    pattern: str | re.Pattern = DEFAULT_BLOCK_PATTERN,
    num_blocks: int | None = None,
    non_block_scale: float | None = None,
) -> dict[str, float]:
    """``{parameter path: LiNeS scale}`` (see the module docstring for the rule).

    Args:
      tree: a task vector (or any tree with the parameter paths).
      alpha: scale of block 0 (the minimum when ``beta >= 0``).
      beta: scale difference between the last and the first block.
      pattern: regex with one capturing group giving the block index.
      num_blocks: ``L``; defaults to the largest index found plus one. Must
        exceed every index found.
      non_block_scale: scale of parameters in no block; ``None`` = ``alpha``.

    Raises:
      SubboostError: no parameter path matches ``pattern``; an index is
        ``>= num_blocks``; a bad pattern or number.
    """
    alpha = _check_number("alpha", alpha)
    beta = _check_number("beta", beta)
    other = alpha if non_block_scale is None else _check_number("non_block_scale", non_block_scale)
    indices = block_indices(tree, pattern=pattern)
    found = {path: l for path, l in indices.items() if l is not None}
    if not found:
        examples = list(indices)[:4]
        raise SubboostError(
            f"lines: no parameter path matches the block pattern {_compile(pattern).pattern!r} "
            f"(paths look like {examples}); pass pattern= with one capturing group for the block index."
        )
    if num_blocks is None:
        num_blocks = max(found.values()) + 1
    elif isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise SubboostError(f"lines: num_blocks must be a positive integer, got {num_blocks!r}.")
    else:
        path, index = max(found.items(), key=lambda item: item[1])
        if index >= num_blocks:
            raise SubboostError(
                f"lines: parameter {path!r} is in block {index}, but num_blocks={num_blocks} "
                f"allows indices 0..{num_blocks - 1}."
            )
    denominator = max(num_blocks - 1, 1)
    return {path: other if l is None else alpha + beta * l / denominator for path, l in indices.items()}


def lines(
    tau: PyTree,
    *,
    alpha: float,
    beta: float,
    pattern: str | re.Pattern = DEFAULT_BLOCK_PATTERN,
    num_blocks: int | None = None,
    non_block_scale: float | None = None,
) -> PyTree:
    """LiNeS: scales block ``l`` of a task vector by ``alpha + beta * l / (L - 1)``.

    Args:
      tau: a (merged) task vector, or stacked task vectors.
      alpha: scale of the first block (and, by default, of non-block parameters).
      beta: last block's scale minus the first's.
      pattern: regex over ``"a/b/c"`` paths with one capturing group, the block
        index; default ``resblocks_(\\d+)``.
      num_blocks: ``L``; default: largest index found plus one.
      non_block_scale: scale for parameters in no block; ``None`` = ``alpha``.

    Returns:
      The scaled task vector, same structure, shapes and dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> tau = {"resblocks_0": jnp.ones(2), "resblocks_2": jnp.ones(2), "ln_post": jnp.ones(2)}
      >>> {k: float(v[0]) for k, v in lines(tau, alpha=0.5, beta=1.0).items()}
      {'ln_post': 0.5, 'resblocks_0': 0.5, 'resblocks_2': 1.5}
    """
    scales = lines_scales(
        tau, alpha=alpha, beta=beta, pattern=pattern, num_blocks=num_blocks, non_block_scale=non_block_scale
    )

    def scale(path, x):
        x = jnp.asarray(x)
        factor = scales[path_str(path)]
        return (x.astype(compute_dtype(x.dtype)) * factor).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(scale, tau)
