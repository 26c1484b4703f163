"""Batched accuracy of encoders with the frozen task heads.

Three jit-compiled evaluations on stacked ``(T, n, 16, 16, 3)`` splits:

* `accuracies`: one encoder on every task -> ``(T,)``;
* `accuracies_at`: ``theta_0 + alpha * tau`` (alpha a traced scalar, so a whole
  alpha sweep reuses one compiled program and dispatches asynchronously) -> ``(T,)``;
* `expert_accuracies`: stacked experts, expert ``t`` on task ``t``, vmapped
  over experts -> ``(T,)``.

and one on a single task's ``(n, 16, 16, 3)`` split, `task_accuracy_at`, which
`sweep_alphas_by_task` calls once per task: its program depends on ``n`` only, so
the benchmark's merges at every task count share the validation program and
the test program (a stacked ``(T, n, ...)`` program compiles anew for every T).

Images go through the encoder in fixed-size batches (`jax.lax.map`), so memory
stays bounded. The model config and batch size are static arguments, so the
compiled programs are shared by every run in a process.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subboost.bench.accuracy import map_in_batches, params_at, sweep_alphas
from subboost.bench.suites.vision.centroid_heads import task_logits
from subboost.bench.suites.vision.model import make_encoder
from subboost.models.clip_vit import CLIPVisionConfig

_STATIC = ("model", "batch")


def features(params: dict, images: jax.Array, *, model: CLIPVisionConfig, batch: int) -> jax.Array:
    """``(N, H, W, C)`` -> ``(N, E)``, ``batch`` images per forward pass."""
    encode = make_encoder(model)
    return map_in_batches(lambda x: encode(params, x), images, batch=batch)


def _accuracies(params, images, labels, heads, *, model, batch):
    num_tasks, n = labels.shape
    feats = features(params, images.reshape((num_tasks * n,) + images.shape[2:]), model=model, batch=batch)
    logits = task_logits(feats.reshape(num_tasks, n, -1), heads)
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels, axis=1)


def _one_task_accuracy(params, images, labels, head, *, model, batch):
    """Accuracy of ``params`` on one task's ``(n, H, W, C)`` images with its head: a scalar."""
    head = jax.tree_util.tree_map(lambda x: x[None], head)
    return _accuracies(params, images[None], labels[None], head, model=model, batch=batch)[0]


accuracies = jax.jit(_accuracies, static_argnames=_STATIC)
accuracies.__doc__ = "Accuracy of one encoder on each task: ``(T,)``."


@functools.partial(jax.jit, static_argnames=_STATIC)
def accuracies_at(base, tau, alpha, images, labels, heads, *, model, batch):
    """Accuracy of ``theta_0 + alpha * tau`` on each task: ``(T,)``."""
    return _accuracies(params_at(base, tau, alpha), images, labels, heads, model=model, batch=batch)


@functools.partial(jax.jit, static_argnames=_STATIC)
def expert_accuracies(experts, images, labels, heads, *, model, batch):
    """Expert ``t`` (leading axis of ``experts``) on task ``t`` only: ``(T,)``."""
    return jax.vmap(functools.partial(_one_task_accuracy, model=model, batch=batch))(experts, images, labels, heads)


@functools.partial(jax.jit, static_argnames=_STATIC)
def task_accuracy_at(base, tau, alpha, images, labels, head, *, model, batch):
    """Accuracy of ``theta_0 + alpha * tau`` on one task (``(n, H, W, C)`` images, its head): a scalar."""
    return _one_task_accuracy(params_at(base, tau, alpha), images, labels, head, model=model, batch=batch)


def sweep_alphas_by_task(base, tau, alphas: Sequence[float], tasks: Sequence[tuple], *, model, batch) -> np.ndarray:
    """``(A, T)``: `task_accuracy_at` for every alpha and every task ``(images, labels, head)`` of ``tasks``.

    Everything is dispatched before the one host sync, and no program depends on ``T``.
    """
    rows = [[task_accuracy_at(base, tau, jnp.float32(a), *task, model=model, batch=batch) for task in tasks]
            for a in alphas]
    return np.asarray(jax.device_get(rows), dtype=np.float32).reshape(len(alphas), len(tasks))


def alpha_sweep(base, tau, alphas: Sequence[float], images, labels, heads, *, model, batch) -> np.ndarray:
    """``(A, T)`` accuracies of ``theta_0 + alpha * tau`` for every alpha (one host sync)."""
    return sweep_alphas(accuracies_at, base, tau, alphas, images, labels, heads, model=model, batch=batch)
