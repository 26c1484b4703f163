"""Merging and boosting on a device mesh (`jax.sharding.Mesh`), one or many hosts.

Two ways of splitting the work, chosen by what a computation depends on:

* **Matrix groups along G.** Subspace Boosting and the SVD-based merges
  (TSV-M, Iso-C, Iso-CTS) treat every matrix on its own. The grouped matrix
  view (`subboost.tree`) stacks same-shaped matrices into ``(G, *lead, m, n)``;
  ``G`` is padded to a multiple of the device count (with copies of the last
  matrix, so padding never creates a degenerate input), split over every
  device of the mesh with `jax.shard_map`, and sliced back (the ``mesh``
  strategy of `subboost.tree.MatrixPlan.map_groups`, which also chains the
  groups one after another like on one device)::

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
``sb.subspace_boost(tau, beta=beta, mesh=mesh)``; `merge` calls `merge_on_mesh`,
`subspace_boost` maps its groups with ``mesh=`` itself; `make_mesh` builds a
one-axis mesh over all devices.

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
    tau = sb.subspace_boost(tau, mesh=mesh)             # SVDs split over all chips
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
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subboost.tree import MatrixLayout, PyTree, map_groups_on_mesh, matrix_plan, pad_groups


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
    fn: Callable[..., PyTree], static_items: tuple[tuple[str, Hashable], ...], mesh: Mesh
) -> Callable[[PyTree], PyTree]:
    kwargs = dict(static_items)
    attention = kwargs.get("attention", "per_qkv")
    is_matrix = kwargs.get("is_matrix")
    block_kwargs = {**kwargs, "attention": "per_qkv", "is_matrix": _stacked_matrix_layout}

    def run(tvs):
        plan = matrix_plan(tvs, lead_ndim=1, is_matrix=is_matrix, attention=attention)
        # (G, T, m, n) groups split along G over the mesh, one group after another.
        new_leaves = plan.scatter(plan.map_groups(lambda b: _merge_matrix_block(fn, b, block_kwargs), tvs, mesh=mesh))
        # Non-matrix leaves: the method itself, on the tree without its matrices.
        leaves = jax.tree_util.tree_leaves(tvs)
        rest_ids = [i for i in range(len(leaves)) if i not in new_leaves]
        if rest_ids:
            rest = plan.rebuild(tvs, {i: None for i in new_leaves})
            rest_out = jax.tree_util.tree_leaves(fn(rest, **kwargs))
            if len(rest_out) != len(rest_ids):
                raise ValueError(f"{getattr(fn, '__name__', fn)}: unexpected output structure on non-matrix parameters.")
            new_leaves.update(zip(rest_ids, rest_out))
        merged_leaves = [new_leaves[i] for i in range(len(leaves))]
        return jax.tree_util.tree_unflatten(plan.treedef, merged_leaves)

    return jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _splits_matrices(matrix_kernel: Callable[..., PyTree] | None, kwargs: dict[str, Any], dynamic: frozenset[str]) -> bool:
    if matrix_kernel is None:
        return False
    if any(k in dynamic for k in kwargs):
        return False
    accepted = inspect.signature(matrix_kernel).parameters
    return "is_matrix" in accepted and "attention" in accepted


def merge_on_mesh(
    tvs: PyTree,
    method: str,
    *,
    mesh: Mesh,
    jitted: Callable[..., PyTree],
    matrix_kernel: Callable[..., PyTree] | None,
    hyper_parameters: dict[str, Any],
    dynamic: frozenset[str] = frozenset(),
) -> PyTree:
    """Runs merge ``method`` over ``mesh`` (called by `subboost.merging.merge`, input already validated).

    Args:
      tvs: stacked task vectors.
      method: the method's registered name.
      mesh: the device mesh.
      jitted: the method ``fn(tvs, **hyper_parameters)`` under `jax.jit`, the
        static hyper-parameters static.
      matrix_kernel: the method's per-matrix kernel
        (`subboost.merging.registry.MergeMethod.matrix_kernel`), or None.
      hyper_parameters: its keyword arguments.
      dynamic: names of the array (traced) hyper-parameters, e.g. ``{"key"}``.

    Per-matrix methods (those with a ``matrix_kernel``) split their matrix groups along G
    (`subboost.tree.MatrixPlan.map_groups` with ``mesh``); every other method
    runs as one SPMD program on parameter-sharded inputs. The merged task
    vector is replicated over the mesh.
    """
    mesh_axes(mesh)
    placed = place_parameters(tvs, mesh, lead_ndim=1)
    replicated = NamedSharding(mesh, PartitionSpec())
    if _splits_matrices(matrix_kernel, hyper_parameters, dynamic):
        static_items = tuple(sorted(hyper_parameters.items()))
        return _matrix_merge_fn(matrix_kernel, static_items, mesh)(placed)
    arguments = {k: place(v, replicated) if k in dynamic else v for k, v in hyper_parameters.items()}
    merged = jitted(placed, **arguments)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, replicated), merged)


__all__ = [
    "make_mesh",
    "map_groups_on_mesh",
    "merge_on_mesh",
    "mesh_axes",
    "pad_groups",
    "parameter_spec",
    "place",
    "place_parameters",
]
