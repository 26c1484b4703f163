"""The matrix view: selection, PyTorch orientation, grouping, exact round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subboost import tree as sbtree
from tests.conftest import vit_like_params
from tests.numpy_reference import flat, is_default_matrix, torch_matrix


@pytest.mark.parametrize("attention", ["per_qkv", "full", "per_head"])
@pytest.mark.parametrize("lead_ndim", [0, 1])
def test_gather_scatter_round_trip_is_exact(rng, attention, lead_ndim):
    params = vit_like_params(rng)
    if lead_ndim:
        params = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x, -x]), params)
    plan = sbtree.matrix_plan(params, lead_ndim=lead_ndim, attention=attention)
    rebuilt = plan.rebuild(params, plan.scatter(plan.gather(params)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, rebuilt, params)


def test_default_predicate_selects_the_reference_matrices(rng):
    params = vit_like_params(rng)
    plan = sbtree.matrix_plan(params)
    selected = {plan.paths[i] for m in plan.members for i in m.leaf_ids}
    expected = {p for p, x in flat(params).items() if is_default_matrix(p, x.shape)}
    assert selected == expected
    assert "proj" not in selected and "conv1/kernel" not in selected
    assert len(selected) == 2 * 6  # q, k, v, out, c_fc, c_proj per block


def test_gathered_matrices_are_pytorch_oriented(rng):
    params = vit_like_params(rng)
    plan = sbtree.matrix_plan(params)
    groups = plan.gather(params)
    reference = flat(params)
    for member in plan.members:
        path = plan.paths[member.leaf_ids[0]]
        got = np.asarray(groups[member.group][member.offset])
        np.testing.assert_array_equal(got, torch_matrix(path, reference[path]).astype(np.float32))


def test_full_attention_stacks_qkv_like_in_proj_weight(rng):
    params = vit_like_params(rng)
    plan = sbtree.matrix_plan(params, attention="full")
    groups = plan.gather(params)
    member = next(m for m in plan.members if m.name == "transformer/resblocks_1/attn/qkv")
    attn = params["transformer"]["resblocks_1"]["attn"]
    in_proj = np.concatenate([np.asarray(attn[n]["kernel"]).reshape(8, -1).T for n in ("query", "key", "value")])
    np.testing.assert_array_equal(np.asarray(groups[member.group][member.offset]), in_proj)
    assert in_proj.shape == (24, 8)


def test_per_head_view_gives_one_matrix_per_head(rng):
    params = vit_like_params(rng)
    plan = sbtree.matrix_plan(params, attention="per_head")
    member = next(m for m in plan.members if m.name == "transformer/resblocks_0/attn/out")
    assert member.count == 2
    block = plan.gather(params)[member.group][member.offset:member.offset + 2]
    kernel = np.asarray(params["transformer"]["resblocks_0"]["attn"]["out"]["kernel"])  # (H, hd, E)
    np.testing.assert_array_equal(np.asarray(block[1]), kernel[1].T)


def test_same_shaped_matrices_share_one_group(rng):
    params = vit_like_params(rng, layers=3)
    plan = sbtree.matrix_plan(params)
    sizes = dict(zip(plan.groups, plan.group_sizes))
    # q, k, v, out are (8, 8); c_fc is (16, 8); c_proj is (8, 16).
    assert sizes == {(8, 8, "float32"): 12, (16, 8, "float32"): 3, (8, 16, "float32"): 3}


def test_scan_stacked_layers_are_batch_axes(rng):
    params = vit_like_params(rng, layers=3)
    blocks = [params["transformer"][f"resblocks_{i}"] for i in range(3)]
    scanned = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)
    plan = sbtree.matrix_plan({"blocks": scanned}, is_matrix=sbtree.matrix_predicate(layer_axes=1))
    mlp = next(m for m in plan.members if m.name == "blocks/mlp/c_fc")
    assert mlp.count == 3
    got = plan.gather({"blocks": scanned})[mlp.group][mlp.offset + 2]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(blocks[2]["mlp"]["c_fc"]["kernel"]).T)


def test_user_predicate_and_bad_layout_errors():
    params = {"a": {"kernel": jnp.ones((3, 4))}, "b": jnp.ones((2, 5))}
    plan = sbtree.matrix_plan(params, is_matrix=lambda path, leaf: path == "b")
    assert [m.name for m in plan.members] == [""]
    with pytest.raises(ValueError, match="'b'"):
        sbtree.matrix_plan(params, is_matrix=lambda p, x: sbtree.MatrixLayout("attn_in") if p == "b" else None)
    with pytest.raises(ValueError, match="attention must be one of"):
        sbtree.matrix_plan(params, attention="heads")


@pytest.mark.slow
def test_map_groups_gives_the_same_result_whole_chunked_and_on_a_mesh(rng):
    """Every strategy of the primitive hands ``fn`` the same matrices: gather's, in group order
    (per-head matrices of stacked task vectors: the loader's most involved reading)."""
    params = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x, -x]), vit_like_params(rng, layers=2))
    plan = sbtree.matrix_plan(params, lead_ndim=1, attention="per_head")
    gathered = plan.gather(params)

    def fn(x):  # a pytree out, one entry per matrix
        return {"double": 2 * x, "norm": jnp.sum(x * x, axis=(-2, -1))}

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("devices",))
    for kwargs in ({}, {"batch_size": 1}, {"batch_size": 3}, {"mesh": mesh}, {"mesh": mesh, "batch_size": 2}):
        out = jax.jit(lambda p: plan.map_groups(fn, p, **kwargs))(params)
        assert set(out) == set(plan.groups)  # (jit returns dicts with sorted keys)
        for g, x in gathered.items():
            np.testing.assert_array_equal(out[g]["double"], 2 * x)
            np.testing.assert_allclose(out[g]["norm"], jnp.sum(x * x, axis=(-2, -1)), rtol=1e-6)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_map_groups_parts_run_their_own_kernel_and_keep_group_order(rng, batch_size):
    params = vit_like_params(rng, layers=3)
    plan = sbtree.matrix_plan(params)
    gathered = plan.gather(params)
    evens = {g: np.arange(0, size, 2) for g, size in zip(plan.groups, plan.group_sizes)}

    def parts(group):  # even matrices times 2, odd ones times 3
        odds = np.setdiff1d(np.arange(len(gathered[group])), evens[group])
        return [(evens[group], lambda x: 2 * x)] + ([(odds, lambda x: 3 * x)] if odds.size else [])

    out = plan.map_groups(None, params, batch_size=batch_size, parts=parts)
    for g, x in gathered.items():
        factor = np.where(np.arange(len(x)) % 2 == 0, 2.0, 3.0).astype(np.float32)[:, None, None]
        np.testing.assert_array_equal(out[g], factor * np.asarray(x))


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_map_groups_refuses_a_batch_size_that_is_not_a_positive_integer(batch_size):
    tree = {"dense": {"kernel": jnp.ones((3, 3))}}
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        sbtree.map_matrices(lambda x: x, tree, batch_size=batch_size)
