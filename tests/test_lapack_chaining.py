"""At most one LAPACK call in flight: every multi-group computation chains its decompositions.

jaxlib 0.10's batched CPU LAPACK kernels block XLA intra-op pool threads while
their batch chunks run; two of them side by side on a 2-thread pool can wait
on each other forever (see `subboost.linalg.after`). These tests read the
jaxpr of each public entry point on a tree with several matrix groups and check
that the LAPACK-backed operations form one chain: each depends (through data)
on the one before it, so XLA cannot run two at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import linalg, sharding
from subboost.tree import map_matrices

LAPACK_PRIMITIVES = {"svd", "eigh", "qr", "geqrf", "geqp3", "householder_product", "lu", "cholesky"}


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _contains_lapack(jaxpr) -> bool:
    return any(
        eqn.primitive.name in LAPACK_PRIMITIVES or any(_contains_lapack(j) for j in _sub_jaxprs(eqn))
        for eqn in jaxpr.eqns
    )


def lapack_dependencies(fn, *args) -> list[set[int]]:
    """For each LAPACK node (in program order), the earlier LAPACK nodes it depends on.

    ``pjit`` calls are inlined; any other equation holding LAPACK calls in a
    sub-program (``scan`` from `jax.lax.map`, ``cond``) counts as one node.
    """
    closed = jax.make_jaxpr(fn)(*args)
    nodes: list[set[int]] = []

    def walk(jaxpr, deps_of_invars: list[frozenset]) -> list[frozenset]:
        env = {}
        for var, deps in zip(jaxpr.invars, deps_of_invars):
            env[var] = deps
        for var in jaxpr.constvars:
            env[var] = frozenset()

        def read(atom):
            return env.get(atom, frozenset()) if isinstance(atom, jax.extend.core.Var) else frozenset()

        for eqn in jaxpr.eqns:
            inputs = [read(a) for a in eqn.invars]
            if eqn.primitive.name in ("pjit", "jit", "closed_call"):
                inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
                inner = inner.jaxpr if isinstance(inner, jax.extend.core.ClosedJaxpr) else inner
                outputs = walk(inner, inputs)
            else:
                union = frozenset().union(*inputs)
                is_node = eqn.primitive.name in LAPACK_PRIMITIVES or any(_contains_lapack(j) for j in _sub_jaxprs(eqn))
                if is_node:
                    nodes.append(set(union))
                    union = union | {len(nodes) - 1}
                outputs = [union] * len(eqn.outvars)
            for var, deps in zip(eqn.outvars, outputs):
                env[var] = deps
        return [read(v) for v in jaxpr.outvars]

    walk(closed.jaxpr, [frozenset()] * len(closed.jaxpr.invars))
    return nodes


def assert_chained(fn, *args, min_nodes: int = 2):
    nodes = lapack_dependencies(fn, *args)
    assert len(nodes) >= min_nodes, f"expected several LAPACK calls, found {len(nodes)}"
    for index, deps in enumerate(nodes[1:], start=1):
        assert index - 1 in deps, f"LAPACK call {index} does not wait for call {index - 1} ({len(nodes)} calls)"


def three_group_tree(num_tasks: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    lead = () if num_tasks is None else (num_tasks,)

    def leaf(*shape):
        return jnp.asarray(rng.standard_normal(lead + shape, dtype=np.float32))

    return {
        "block_0": {"mlp": {"kernel": leaf(12, 20)}, "out": {"kernel": leaf(20, 12)}, "sq": {"kernel": leaf(16, 16)}},
        "block_1": {"mlp": {"kernel": leaf(12, 20)}, "out": {"kernel": leaf(20, 12)}, "sq": {"kernel": leaf(16, 16)},
                    "bias": leaf(12)},
    }


def test_after_keeps_values_and_ignores_non_finite_predecessors():
    x = jnp.asarray([1.0, -2.0, 0.0, 3.5], jnp.float32)
    for previous in (None, {}, jnp.ones(3), jnp.asarray([-4.0]), jnp.asarray([jnp.nan]), jnp.asarray([-jnp.inf])):
        out = jax.jit(linalg.after)(x, previous)
        np.testing.assert_array_equal(out, x)
        assert out.dtype == x.dtype
    assert jax.jit(linalg.after)(jnp.ones(2, jnp.bfloat16), jnp.ones(1, jnp.float32)).dtype == jnp.bfloat16


def test_spectra_chain_their_groups():
    assert_chained(lambda t: sb.spectra(t), three_group_tree(), min_nodes=3)


@pytest.mark.parametrize("solver", ["svd", "polar"])
@pytest.mark.slow
def test_boosting_chains_its_groups(solver):
    assert_chained(lambda t: sb.subspace_boost(t, beta=0.01, solver=solver), three_group_tree(), min_nodes=3)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("batch_size", [None, 1])
def test_svd_merges_chain_their_groups(method, batch_size):
    kwargs = {"common_space_fraction": 0.5} if method == "iso_cts" else {}
    tvs = three_group_tree(num_tasks=3)
    assert_chained(lambda t: sb.merge(t, method, batch_size=batch_size, **kwargs), tvs, min_nodes=3)


@pytest.mark.parametrize("method", ["robust", "classic"])
def test_hogsvd_layers_chain_groups_and_steps(method):
    tvs = three_group_tree(num_tasks=3)
    if method == "classic":  # classic needs full column rank: tall matrices only
        tvs = {"a": {"kernel": tvs["block_0"]["mlp"]["kernel"]}, "b": {"kernel": tvs["block_0"]["sq"]["kernel"]}}
    assert_chained(lambda t: sb.hogsvd_layers(t, method=method, validate=False), tvs, min_nodes=4)


def test_alignment_chains_its_groups():
    tvs = three_group_tree(num_tasks=3)
    merged = jax.tree_util.tree_map(lambda x: x.sum(0), tvs)
    assert_chained(lambda t, m: sb.generalized_singular_values(t, m, validate=False), tvs, merged, min_nodes=3)


def test_alpha_from_hogsvd_chains_its_groups():
    tvs = three_group_tree(num_tasks=3)
    merged = jax.tree_util.tree_map(lambda x: x.sum(0), tvs)
    for batch_size in (None, 1):
        assert_chained(lambda t, m, b=batch_size: sb.alpha_from_hogsvd(t, m, batch_size=b), tvs, merged, min_nodes=3)


def test_boosting_chains_the_parts_of_a_group_mixing_attention_and_other_matrices():
    """attn_beta != beta splits the (8, 8) group (q/k/v vs out/dense) in two calls: chained too."""
    rng = np.random.default_rng(0)
    tree = {"attn": {n: {"kernel": jnp.asarray(rng.standard_normal((8, 2, 4)), jnp.float32)} for n in ("query", "key")},
            "out": {"kernel": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)}}
    assert_chained(lambda t: sb.subspace_boost(t, beta=0.01, attn_beta=0.1), tree, min_nodes=2)


# --- the mesh strategy: every group's shard_map waits for the one before -----------------
def one_device_mesh():
    return sharding.make_mesh(jax.devices()[:1])


def test_the_primitive_chains_its_groups_on_a_mesh():
    mesh = one_device_mesh()
    tree = three_group_tree()
    assert_chained(lambda t: map_matrices(lambda x: linalg.polar(x), t, mesh=mesh), tree, min_nodes=3)
    assert_chained(lambda t: map_matrices(lambda x: linalg.polar(x), t, mesh=mesh, batch_size=1), tree,
                   min_nodes=3)


@pytest.mark.parametrize("solver", ["svd", "polar"])
def test_boosting_on_a_mesh_chains_its_groups(solver):
    mesh, tree = one_device_mesh(), three_group_tree()  # closed over: placed on the mesh, then traced
    assert_chained(lambda: sb.subspace_boost(tree, beta=0.01, solver=solver, mesh=mesh, validate=False), min_nodes=3)
    assert_chained(lambda: sb.subspace_boost(tree, beta=0.01, batch_size=1, mesh=mesh, validate=False), min_nodes=3)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_svd_merges_on_a_mesh_chain_their_groups(method):
    kwargs = {"common_space_fraction": 0.5} if method == "iso_cts" else {}
    mesh, tvs = one_device_mesh(), three_group_tree(num_tasks=3)
    assert_chained(lambda: sb.merge(tvs, method, mesh=mesh, validate=False, **kwargs), min_nodes=3)
