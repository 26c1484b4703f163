"""Merging and boosting on a device mesh (`jax.sharding.Mesh`), one or many hosts.

Two ways of splitting the work, chosen by what a computation depends on:

* **Matrix groups along G.** Subspace Boosting and the SVD-based merges
  (TSV-M, Iso-C, Iso-CTS) treat every matrix on its own. The grouped matrix
  view (`subboost.tree`) stacks same-shaped matrices into ``(G, *lead, m, n)``;
  ``G`` is padded to a multiple of the device count (with copies of the last
  matrix, so padding never creates a degenerate input), split over every
  device of the mesh with `jax.shard_map`, and sliced back::

      (G, ...) --pad--> (D * ceil(G / D), ...) --shard_map over D devices--> --[:G]-->

  so ``D`` devices run ``ceil(G / D)`` SVDs each, in parallel, instead of one
  device running ``G``.
* **Parameters.** Elementwise merges (weight averaging, Task Arithmetic, TIES,
  DARE, Consensus) and the non-matrix leaves of matrix methods are run by
  `jax.jit` on inputs sharded over a parameter axis (the largest non-expert
  axis divisible by the device count; replicated when none is). XLA's SPMD
  partitioner inserts the cross-device reductions TIES's global top-k
  threshold needs (integer counts, so exact).

Results equal single-device ones (tests/test_sharding.py runs every registered
method and boosting on 8 simulated CPU devices); outputs are replicated over
the mesh, so every host can read (and process 0 save) the merged tree.

Entry points: ``sb.merge(tvs, method, mesh=mesh, ...)`` and
``sb.subspace_boost(tau, beta, mesh=mesh)``, which call `merge_on_mesh` and
`boost_on_mesh`; `make_mesh` builds a one-axis mesh over all devices.

Recipe: a multi-host TPU pod slice (e.g. v4-32: 4 hosts x 4 chips)
-------------------------------------------------------------------
Run the *same* script on every host (``gcloud compute tpus tpu-vm ssh NAME
--worker=all --command "python merge_pod.py"``)::

    import jax
    jax.distributed.initialize()      # on Cloud TPU all arguments are auto-detected;
                                      # elsewhere: coordinator_address="host0:1234",
                                      # num_processes=N, process_id=i
    import subboost as sb
    from subboost import sharding

    mesh = sharding.make_mesh()       # one axis over jax.devices(): every chip of every host
    base = sb.load_params("/data/base")                  # every host loads the same values
    tvs = sb.load_experts(base, [f"/data/expert_{t}" for t in range(20)])
    tau = sb.merge(tvs, "ties", k=0.2, mesh=mesh)        # sharded over all chips of all hosts
    tau = sb.subspace_boost(tau, 0.01, mesh=mesh)        # SVDs split over all chips
    params = sb.apply_task_vector(base, tau, alpha=0.3)  # tau is replicated: a local op
    if jax.process_index() == 0:
        sb.save_params(params, "/data/merged")

Rules that keep a multi-host run correct: every process calls the same
functions with the same arguments in the same order (SPMD); host inputs must
hold the same values on every process (they are placed with
`jax.make_array_from_callback`, each host materialising only its own shards);
write outputs from one process. To bound host memory instead, stream the
experts on each host with `subboost.streaming.merge_from_checkpoints`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subboost.tree import AttentionMode, MatrixLayout, PyTree, matrix_plan


def matrix_methods() -> tuple[str, ...]:
    """Registered merge methods with a matrix kernel (`subboost.merging.registry.MergeMethod`):
    they act on every matrix independently (and elementwise on non-matrix leaves), so
    their matrix groups are split along G. Such a kernel accepts ``is_matrix`` and ``attention``."""
    from subboost.merging.registry import METHODS

    return tuple(name for name, record in METHODS.items() if record.matrix_kernel is not None)


def make_mesh(devices: Any = None, *, axis_name: str = "devices") -> Mesh:
    """A one-axis mesh over ``devices`` (default: `jax.devices()`, every host's)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def mesh_axes(mesh: Mesh) -> tuple[str, ...]:
    """All axis names of ``mesh``: arrays are split over every device at once."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    return tuple(mesh.axis_names)


def parameter_spec(shape: tuple[int, ...], mesh: Mesh, *, lead_ndim: int = 0) -> PartitionSpec:
    """Splits the largest axis after ``lead_ndim`` that the device count divides.

    Replicated (``PartitionSpec()``) when no axis divides evenly: elementwise
    merges must not be padded (padding would change TIES's counts).
    """
    devices = mesh.size
    best = None
    for axis in range(lead_ndim, len(shape)):
        if shape[axis] % devices == 0 and (best is None or shape[axis] > shape[best]):
            best = axis
    if best is None or devices == 1:
        return PartitionSpec()
    spec: list[Any] = [None] * len(shape)
    spec[best] = mesh_axes(mesh)
    return PartitionSpec(*spec)


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """Puts one array on ``sharding``; on several hosts each builds only its own shards."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(place(jax.random.key_data(x), sharding), impl=impl)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_parameters(tree: PyTree, mesh: Mesh, *, lead_ndim: int = 0) -> PyTree:
    """Every leaf sharded over its largest evenly divisible parameter axis."""

    def leaf(x):
        spec = parameter_spec(tuple(np.shape(x)), mesh, lead_ndim=lead_ndim)
        return place(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(leaf, tree)


def pad_groups(x: jax.Array, multiple: int) -> jax.Array:
    """Pads axis 0 to a multiple of ``multiple`` with copies of the last entry."""
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0)


def map_groups_on_mesh(fn: Callable[[jax.Array], Any], x: jax.Array, mesh: Mesh) -> Any:
    """``fn`` on a group ``(G, ...)`` split along G over every device of ``mesh``.

    ``fn`` must treat the entries of axis 0 independently: each device calls
    it on a block of ``ceil(G / D)`` of them. It may return a pytree of arrays
    with that leading axis; each is sliced back to ``G``. Use inside `jax.jit`.
    """
    num_groups = x.shape[0]
    spec = PartitionSpec(mesh_axes(mesh))
    padded = jax.lax.with_sharding_constraint(pad_groups(x, mesh.size), NamedSharding(mesh, spec))
    out = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)(padded)
    return jax.tree_util.tree_map(lambda y: y[:num_groups], out)


# ----------------------------------------------------------------------------
# Subspace Boosting
# ----------------------------------------------------------------------------
def _boost_group_fn(beta: float, mode: str, solver: str, shape: tuple[int, int], tol: float | None,
                    batch_size: int | None, rank_rtol: float | None = None) -> Callable[[jax.Array], Any]:
    """The per-device work of one group: `subboost.boosting.boost_group`, chunked by ``batch_size``."""
    from subboost.boosting import _map_chunks, boost_group, choose_solver

    chosen = choose_solver(solver, shape, beta, mode)
    fn = functools.partial(boost_group, beta=beta, mode=mode, solver=chosen, tol=tol, rank_rtol=rank_rtol)
    return lambda block: _map_chunks(fn, block, batch_size)


@functools.lru_cache(maxsize=None)
def _boost_tree_fn(mesh: Mesh, beta: float, mode: str, attention: str, is_matrix: Callable | None,
                   batch_size: int | None, solver: str, tol: float | None, with_info: bool,
                   attn_beta: float | None = None, rank_rtol: float | None = None) -> Callable:
    from subboost.boosting import attention_matrices, split_by_beta

    def run(tau):
        plan = matrix_plan(tau, is_matrix=is_matrix, attention=attention)
        masks = attention_matrices(plan)
        boosted, infos = {}, []
        for group, x in plan.gather(tau).items():
            def on_mesh(b, xs, group=group):
                return map_groups_on_mesh(_boost_group_fn(b, mode, solver, group[:2], tol, batch_size, rank_rtol),
                                          xs, mesh)

            boosted[group], info = split_by_beta(on_mesh, x, masks[group], beta,
                                                 beta if attn_beta is None else attn_beta)
            infos.append(info)
        out = plan.rebuild(tau, plan.scatter(boosted))
        return (out, infos) if with_info else out

    return jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec()))


@functools.lru_cache(maxsize=None)
def _boost_array_fn(mesh: Mesh, beta: float, mode: str, batch_size: int | None, solver: str,
                    tol: float | None, with_info: bool, rank_rtol: float | None = None) -> Callable:
    def run(x):
        stack = x.reshape((-1,) + x.shape[-2:])
        y, info = map_groups_on_mesh(_boost_group_fn(beta, mode, solver, x.shape[-2:], tol, batch_size, rank_rtol),
                                     stack, mesh)
        y = y.reshape(x.shape)
        return (y, [info]) if with_info else y

    return jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec()))


def boost_on_mesh(
    tau: PyTree | jax.Array,
    *,
    beta: float,
    mesh: Mesh,
    mode: str = "cumsum",
    attention: AttentionMode = "per_qkv",
    is_matrix: Callable | None = None,
    batch_size: int | None = None,
    solver: str = "svd",
    tol: float | None = None,
    return_info: bool = False,
    validate: bool = True,
    attn_beta: float | None = None,
    rank_rtol: float | None = None,
) -> Any:
    """Subspace Boosting with every matrix group split along G over ``mesh``.

    Arguments and result are `subboost.boosting.subspace_boost`'s (which
    checks the hyper-parameters and calls this for ``mesh=``); a bare array's
    leading axes are flattened into one group. The result is replicated over
    the mesh.
    """
    from subboost.boosting import _report, choose_solver, tree_report
    from subboost.task_vectors import SubboostError, check_finite, check_floating

    mesh_axes(mesh)
    beta = float(beta)
    if isinstance(tau, (jax.Array, np.ndarray)):
        if tau.ndim < 2:
            raise SubboostError(f"subspace_boost: a bare array needs >= 2 dimensions, got shape {tau.shape}.")
        if validate:
            check_finite(tau, what="subspace_boost input")
        x = place(tau, NamedSharding(mesh, PartitionSpec()))
        out = _boost_array_fn(mesh, beta, mode, batch_size, solver, tol, return_info, rank_rtol)(x)
        if not return_info:
            return out
        (m, n), count = x.shape[-2:], math.prod(x.shape[:-2])
        names = [[f"[{i}]" for i in range(count)]] if x.ndim > 2 else [["matrix"]]
        keys = [(m, n, jnp.dtype(x.dtype).name)]
        return out[0], _report(keys, names, [choose_solver(solver, (m, n), beta, mode)], out[1], rank_rtol)
    if validate:
        check_floating(tau, what="subspace_boost input")
        check_finite(tau, what="subspace_boost input")
    placed = place_parameters(tau, mesh)
    out = _boost_tree_fn(mesh, beta, mode, attention, is_matrix, batch_size, solver, tol, return_info,
                         attn_beta, rank_rtol)(placed)
    if not return_info:
        return out
    plan = matrix_plan(tau, is_matrix=is_matrix, attention=attention)
    return out[0], tree_report(plan, solver, beta, attn_beta, mode, out[1], rank_rtol)


# ----------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------
def _stacked_matrix_layout(path: str, leaf: Any) -> MatrixLayout:
    """Predicate of the synthetic tree below: every leaf is ``(G, in, out)`` kernels."""
    return MatrixLayout("dense", layer_axes=1)


def _merge_matrix_block(fn: Callable[..., PyTree], block: jax.Array, kwargs: dict[str, Any]) -> jax.Array:
    """Runs a per-matrix merge on ``(G_local, T, m, n)`` matrices -> ``(G_local, m, n)``.

    The block is handed to the method as one scan-stacked Flax kernel
    ``(T, G_local, n, m)`` (in, out orientation, which the method turns back
    into (out, in)), so the method's own matrix code does the work.
    """
    kernel = jnp.swapaxes(jnp.swapaxes(block, 0, 1), -1, -2)
    merged = fn({"matrices": {"kernel": kernel}}, **kwargs)
    return jnp.swapaxes(merged["matrices"]["kernel"], -1, -2)


@functools.lru_cache(maxsize=None)
def _matrix_merge_fn(
    method: str, static_items: tuple[tuple[str, Hashable], ...], mesh: Mesh
) -> Callable[[PyTree], PyTree]:
    from subboost.merging.registry import METHODS

    fn = METHODS[method].matrix_kernel
    kwargs = dict(static_items)
    attention = kwargs.get("attention", "per_qkv")
    is_matrix = kwargs.get("is_matrix")
    block_kwargs = {**kwargs, "attention": "per_qkv", "is_matrix": _stacked_matrix_layout}

    def run(tvs):
        plan = matrix_plan(tvs, lead_ndim=1, is_matrix=is_matrix, attention=attention)
        groups = plan.gather(tvs)  # (G, T, m, n)
        merged = {
            g: map_groups_on_mesh(lambda b: _merge_matrix_block(fn, b, block_kwargs), x, mesh)
            for g, x in groups.items()
        }
        new_leaves = plan.scatter(merged)
        # Non-matrix leaves: the method itself, on the tree without its matrices.
        leaves = jax.tree_util.tree_leaves(tvs)
        rest_ids = [i for i in range(len(leaves)) if i not in new_leaves]
        if rest_ids:
            rest = plan.rebuild(tvs, {i: None for i in new_leaves})
            rest_out = jax.tree_util.tree_leaves(fn(rest, **kwargs))
            if len(rest_out) != len(rest_ids):
                raise ValueError(f"{method}: unexpected output structure on non-matrix parameters.")
            new_leaves.update(zip(rest_ids, rest_out))
        merged_leaves = [new_leaves[i] for i in range(len(leaves))]
        return jax.tree_util.tree_unflatten(plan.treedef, merged_leaves)

    return jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _splits_matrices(method: str, kwargs: dict[str, Any]) -> bool:
    from subboost.merging.registry import DYNAMIC_ARGUMENTS, METHODS

    if method not in matrix_methods():
        return False
    if any(k in DYNAMIC_ARGUMENTS for k in kwargs):
        return False
    accepted = inspect.signature(METHODS[method].matrix_kernel).parameters
    return "is_matrix" in accepted and "attention" in accepted


def merge_on_mesh(tvs: PyTree, method: str, *, mesh: Mesh, **kwargs: Any) -> PyTree:
    """Runs registered merge ``method`` over ``mesh`` (input already validated by `merge`).

    Per-matrix methods (`matrix_methods`) split their matrix groups along G;
    every other method runs as one SPMD program on parameter-sharded inputs.
    The merged task vector is replicated over the mesh.
    """
    from subboost.merging.registry import DYNAMIC_ARGUMENTS, jitted

    mesh_axes(mesh)
    placed = place_parameters(tvs, mesh, lead_ndim=1)
    replicated = NamedSharding(mesh, PartitionSpec())
    if _splits_matrices(method, kwargs):
        static_items = tuple(sorted(kwargs.items()))
        return _matrix_merge_fn(method, static_items, mesh)(placed)
    dynamic = {k: place(v, replicated) if k in DYNAMIC_ARGUMENTS else v for k, v in kwargs.items()}
    static_names = tuple(sorted(k for k in kwargs if k not in DYNAMIC_ARGUMENTS))
    merged = jitted(method, static_names)(placed, **dynamic)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, replicated), merged)


__all__ = [
    "boost_on_mesh",
    "make_mesh",
    "map_groups_on_mesh",
    "matrix_methods",
    "merge_on_mesh",
    "mesh_axes",
    "pad_groups",
    "parameter_spec",
    "place",
    "place_parameters",
]
