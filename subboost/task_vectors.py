"""Task vectors: ``tau_t = theta_t - theta_0``, stacked on a leading expert axis.

Also the input validation every entry point shares: structure, shape and dtype
agreement with a reference tree, and finiteness, each failure naming the
offending parameter path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost.errors import SubboostError
from subboost.compilation import size_aware_jit
from subboost.tree import PyTree, leaves_with_paths, path_str
from subboost.validation import check_real


def _describe(leaf: Any) -> str:
    return f"shape {tuple(np.shape(leaf))} dtype {jnp.dtype(getattr(leaf, 'dtype', np.float32)).name}"


def check_same_structure(
    reference: PyTree,
    other: PyTree,
    *,
    what: str = "tree",
    reference_name: str = "pretrained",
    lead_shape: tuple[int, ...] = (),
    check_dtype: bool = True,
) -> None:
    """Raises `SubboostError` unless ``other`` matches ``reference`` leaf for leaf.

    Args:
      reference: the tree to match (e.g. the pretrained parameters).
      other: the tree checked.
      what: how ``other`` is named in the error message.
      reference_name: how ``reference`` is named in the error message.
      lead_shape: extra leading axes ``other``'s leaves carry (e.g. ``(T,)``).
      check_dtype: whether dtypes must match too.
    """
    ref_flat = leaves_with_paths(reference)
    other_flat = leaves_with_paths(other)
    ref_paths = [p for p, _ in ref_flat]
    other_paths = [p for p, _ in other_flat]
    if ref_paths != other_paths:
        missing = sorted(set(ref_paths) - set(other_paths))
        extra = sorted(set(other_paths) - set(ref_paths))
        if missing or extra:
            raise SubboostError(
                f"{what} does not have the structure of {reference_name}: "
                f"missing parameters {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected parameters {extra[:10]}{' ...' if len(extra) > 10 else ''}."
            )
        first = next(i for i, (a, b) in enumerate(zip(ref_paths, other_paths)) if a != b)
        raise SubboostError(
            f"{what} orders its parameters differently from {reference_name}: "
            f"at position {first}, {other_paths[first]!r} where {ref_paths[first]!r} was expected."
        )
    for (path, ref_leaf), (_, leaf) in zip(ref_flat, other_flat):
        expected_shape = tuple(lead_shape) + tuple(np.shape(ref_leaf))
        if tuple(np.shape(leaf)) != expected_shape:
            raise SubboostError(
                f"{what}: parameter {path!r} has shape {tuple(np.shape(leaf))}, "
                f"but {reference_name} has shape {tuple(np.shape(ref_leaf))}"
                + (f" (expected {expected_shape} with the leading axes)" if lead_shape else "")
                + "."
            )
        if check_dtype and jnp.dtype(leaf.dtype) != jnp.dtype(ref_leaf.dtype):
            raise SubboostError(
                f"{what}: parameter {path!r} has dtype {jnp.dtype(leaf.dtype).name}, "
                f"but {reference_name} has dtype {jnp.dtype(ref_leaf.dtype).name}."
            )


@size_aware_jit
def _leaf_finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


# Trees up to this size that already sit in host memory (numpy arrays, JAX arrays on the CPU backend) are
# checked with numpy: compiling `_leaf_finite_flags` for each new set of shapes costs far more than the check.
HOST_CHECK_MAX_BYTES = 1 << 26


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def in_host_memory(x) -> bool:
    """A numpy array or scalar, or a JAX array on the CPU backend: numpy can read it without a transfer."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return True
    devices = getattr(x, "devices", None)
    return devices is not None and all(d.platform == "cpu" for d in devices())


def check_finite(tree: PyTree, *, what: str = "input") -> None:
    """Raises `SubboostError` naming the first parameter holding NaN or inf.

    One fused reduction and a single device-to-host transfer of one flag per leaf;
    small trees already in host memory (`HOST_CHECK_MAX_BYTES`) are checked by
    numpy instead, without compiling anything. Skipped while tracing (inside a
    caller's `jax.jit`), where values are unknown: the functions that call it
    stay usable in jit-compiled code.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    if any(isinstance(x, jax.core.Tracer) for _, x in flat):
        return
    float_items = [(p, x) for p, x in flat if jnp.issubdtype(_dtype(x), jnp.inexact)]
    if not float_items:
        return
    values = [x for _, x in float_items]
    if all(map(in_host_memory, values)) and sum(np.size(x) * _dtype(x).itemsize for x in values) <= HOST_CHECK_MAX_BYTES:
        flags = np.array([bool(np.isfinite(np.asarray(x)).all()) for x in values])
    else:
        flags = np.asarray(_leaf_finite_flags([jnp.asarray(x) for x in values]))
    if not flags.all():
        path = path_str(float_items[int(np.argmin(flags))][0])
        raise SubboostError(f"{what}: parameter {path!r} contains NaN or infinite values.")


def check_floating(tree: PyTree, *, what: str = "input") -> None:
    """Raises unless every leaf is a floating-point array."""
    for path, leaf in leaves_with_paths(tree):
        dtype = _dtype(leaf)  # without a copy to the device (`jnp.asarray` of a numpy array compiles one)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise SubboostError(
                f"{what}: parameter {path!r} has non-float dtype {dtype}; "
                "only floating-point parameters can be merged."
            )


def num_experts(tvs: PyTree) -> int:
    """``T``, the length of the leading expert axis of stacked task vectors."""
    leaves = jax.tree_util.tree_leaves(tvs)
    if not leaves:
        raise SubboostError("task vectors are empty: the tree has no parameters.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        bad = next(p for p, x in leaves_with_paths(tvs) if not np.ndim(x) or np.shape(x)[0] != np.shape(leaves[0])[0])
        raise SubboostError(
            "stacked task vectors need one leading expert axis of equal length on every leaf; "
            f"parameter {bad!r} breaks it (leading sizes seen: {sorted(s for s in sizes if s is not None)})."
        )
    return int(next(iter(sizes)))


@size_aware_jit
def _stack_differences(pretrained: PyTree, finetuned: Sequence[PyTree]) -> PyTree:
    return jax.tree_util.tree_map(
        lambda base, *experts: jnp.stack([e - base for e in experts]), pretrained, *finetuned
    )


def task_vectors(pretrained: PyTree, finetuned: Sequence[PyTree], *, validate: bool = True) -> PyTree:
    """Stacked task vectors ``tau[t] = theta_t - theta_0``.

    Args:
      pretrained: the common base ``theta_0``.
      finetuned: the experts ``theta_1 .. theta_T``, each with the structure,
        shapes and dtypes of ``pretrained``.
      validate: check structure and finiteness first (one host sync).

    Returns:
      A tree like ``pretrained`` whose leaves have a new leading axis of size T.

    Example:
      >>> import jax.numpy as jnp, subboost as sb
      >>> tvs = sb.task_vectors({"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}, {"w": -jnp.ones(2)}])
      >>> tvs["w"].shape
      (2, 2)
    """
    finetuned = list(finetuned)
    if not finetuned:
        raise SubboostError("task_vectors needs at least one fine-tuned expert; the list is empty.")
    if validate:
        check_floating(pretrained, what="pretrained")
        for t, expert in enumerate(finetuned):
            check_same_structure(pretrained, expert, what=f"expert {t}")
        check_finite(pretrained, what="pretrained")
        for t, expert in enumerate(finetuned):
            check_finite(expert, what=f"expert {t}")
    tvs = _stack_differences(pretrained, finetuned)
    if validate:  # finite inputs can still differ by more than the dtype holds (float16)
        check_finite(tvs, what="task vectors (theta_t - theta_0 overflows its dtype)")
    return tvs


def apply_task_vector(pretrained: PyTree, tau: PyTree, *, alpha: float = 1.0) -> PyTree:
    """``theta = theta_0 + alpha * tau``, in the dtype of ``theta_0``.

    Args:
      pretrained: ``theta_0``.
      tau: a merged task vector with the structure and shapes of ``pretrained``.
      alpha: the scaling coefficient (``alpha = 0`` returns ``pretrained``); a
        finite real number.

    Raises:
      SubboostError: ``alpha`` is not a finite number, the structures differ, or
        a result leaf is NaN / inf (a non-finite task vector, or overflow in the
        dtype of ``theta_0``), naming the parameter. The finiteness check is
        skipped under a caller's `jax.jit`, where values are unknown.
    """
    if not isinstance(alpha, jax.core.Tracer):
        alpha = check_real("alpha", alpha, what="apply_task_vector")
    check_same_structure(pretrained, tau, what="task vector", check_dtype=False)
    result = jax.tree_util.tree_map(
        lambda p, t: (p + jnp.asarray(alpha, p.dtype) * t.astype(p.dtype)).astype(p.dtype),
        pretrained,
        tau,
    )
    check_finite(result, what="apply_task_vector: base + alpha * tau (a non-finite task vector, or overflow?)")
    return result
