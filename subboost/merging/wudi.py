"""WUDI: the merged matrix that least disturbs each task's own inputs (Cheng et al., ICML 2025, arXiv 2503.08099).

"Whoever started the interference should end it": a task vector's rows span
(approximately) the inputs its task sends through the layer, so per weight
matrix in PyTorch orientation ``(out, in) = (m, n)`` the merge minimises, by
gradient descent from the sum ``tau = sum_t tau_t``::

    L(tau) = sum_t ||(tau - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2

with Adam (learning rate ``1e-5``, betas ``(0.9, 0.999)``, eps ``1e-8``, no
weight decay) for ``steps`` steps. The gradient is computed in closed form,
``2 (tau A - B)`` with ``A = sum_t tau_t^T tau_t / ||tau_t||^2`` and
``B = sum_t tau_t tau_t^T tau_t / ||tau_t||^2`` formed once (``A`` as
``X^T X`` of the stacked, normalised task vectors when ``n > T m``), so a
step costs one matrix product. Non-matrix leaves are averaged over tasks.

Conventions of FusionBench 0.2.33 (``fusion_bench/method/wudi/wudi.py``,
``wudi_merging``), matched here: the same loss, optimiser and initial point;
every 2-D tensor is a matrix there (pass
``is_matrix=subboost.reference.every_2d_matrix_hf`` and
``attention="per_qkv"`` on a tower converted from Hugging Face to match);
its config runs ``iter_num: 400`` (the default ``steps`` here; the function's
own default there is 300). Differences: the reference's autograd evaluates
the loss's gradient term by term, here the closed form (the same value, other
rounding: after 400 sign-like Adam steps entries whose gradient is near zero
may differ by a few learning rates); a zero task vector, which makes the
reference divide by zero (NaN), contributes nothing here. Adam moves every
entry by about the learning rate per step whatever the scale, so WUDI is
not scale-equivariant: the result is applied with ``alpha = 1`` in the
reference.

Each matrix is merged from its own T task matrices (streamable, mesh-split
by groups); zero task vectors appended to the task axis change nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from subboost import linalg
from subboost.merging.tsv import merge_task_matrices
from subboost.tree import AttentionMode, PyTree
from subboost.validation import check_int, check_real

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def wudi_matrices(x: jax.Array, *, steps: int = 400, learning_rate: float = 1e-5) -> jax.Array:
    """WUDI of stacked per-task matrices ``(..., T, m, n)`` -> ``(..., m, n)``, dtype kept."""
    xc = x.astype(linalg.compute_dtype(x.dtype))
    num_tasks, m, n = xc.shape[-3:]
    sq_norms = jnp.sum(xc * xc, axis=(-2, -1))
    inverse = jnp.where(sq_norms > 0, 1.0 / jnp.where(sq_norms > 0, sq_norms, 1.0), 0.0)
    weighted = xc * inverse[..., None, None]  # tau_t / ||tau_t||^2
    gram_weighted = jnp.swapaxes(weighted, -1, -2) @ xc  # (..., T, n, n): tau_t^T tau_t / ||tau_t||^2
    b_term = jnp.sum(xc @ gram_weighted, axis=-3)  # (..., m, n)
    if n <= num_tasks * m:
        a_term = jnp.sum(gram_weighted, axis=-3)  # (..., n, n)
        grad_left = lambda merged: merged @ a_term  # noqa: E731
    else:  # A = X^T X with X the stacked tau_t / ||tau_t||: cheaper as two products
        scaled = (xc * jnp.sqrt(inverse)[..., None, None]).reshape(xc.shape[:-3] + (num_tasks * m, n))
        grad_left = lambda merged: (merged @ jnp.swapaxes(scaled, -1, -2)) @ scaled  # noqa: E731
    beta1, beta2 = ADAM_BETAS

    def step(t, state):
        merged, first, second = state
        grad = 2.0 * (grad_left(merged) - b_term)
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        count = (t + 1).astype(merged.dtype)
        correction1 = 1 - beta1 ** count
        correction2 = 1 - beta2 ** count
        denom = jnp.sqrt(second) / jnp.sqrt(correction2) + ADAM_EPS
        return merged - (learning_rate / correction1) * first / denom, first, second

    merged = jnp.sum(xc, axis=-3)
    zeros = jnp.zeros_like(merged)
    merged, _, _ = jax.lax.fori_loop(0, steps, step, (merged, zeros, zeros))
    return merged.astype(x.dtype)


def check_wudi(steps: int, learning_rate: float, what: str = "wudi") -> None:
    check_int("steps", steps, what=what, low=0)
    check_real("learning_rate", learning_rate, what=what, low=0.0, low_open=True)


def wudi(
    tvs: PyTree,
    *,
    steps: int = 400,
    learning_rate: float = 1e-5,
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
) -> PyTree:
    """WUDI merge: per matrix, Adam on the interference loss from the sum of the task vectors.

    Args:
      tvs: stacked task vectors ``(T, ...)`` per leaf.
      steps: Adam steps (the reference config's ``iter_num``, 400); 0 gives
        Task Arithmetic on the matrices.
      learning_rate: Adam's learning rate (the reference's fixed ``1e-5``).
      attention: ``per_qkv`` (default), ``full`` or ``per_head``.
      is_matrix: predicate overriding `subboost.tree.default_is_matrix`.
      batch_size: merge at most this many same-shaped matrices at once; ``None`` = whole groups.

    Returns:
      The merged task vector (structure, shapes and dtypes of one expert),
      applied with ``alpha = 1`` in the reference.

    Raises:
      SubboostError: a negative ``steps`` or a non-positive ``learning_rate``.

    Example:
      >>> import jax.numpy as jnp
      >>> tvs = {"dense": {"kernel": jnp.stack([jnp.eye(2), -jnp.eye(2)])}}
      >>> wudi(tvs, steps=0)["dense"]["kernel"]  # zero steps: the sum
      Array([[0., 0.],
             [0., 0.]], dtype=float32)
    """
    check_wudi(steps, learning_rate)
    kernel = lambda x: wudi_matrices(x, steps=steps, learning_rate=learning_rate)  # noqa: E731
    return merge_task_matrices(kernel, tvs, what="wudi", attention=attention, is_matrix=is_matrix,
                               batch_size=batch_size)
