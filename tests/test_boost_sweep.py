"""`subspace_boost_sweep`: every beta from one SVD per matrix equals a loop of `subspace_boost` calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost.boosting import cutoff_index, equivalent_betas, subspace_boost_sweep
from subboost.errors import SubboostError
from tests.trees import vit_like_params

BETAS = (0.0, 0.3, 1.0)


def assert_trees_equal(actual, expected, atol=0.0):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=0, atol=atol)


@pytest.mark.parametrize("options", [
    {},
    {"attention": "full"},
    {"attention": "per_head", "mode": "index"},
    {"attn_beta": 0.1},
    {"rank_rtol": 1e-5, "batch_size": 3},
])
def test_sweep_equals_loop_of_single_beta_calls(options):
    tau = vit_like_params(np.random.default_rng(0), layers=1)
    swept = subspace_boost_sweep(tau, betas=BETAS, **options)
    assert len(swept) == len(BETAS)
    for beta, boosted in zip(BETAS, swept):
        assert_trees_equal(boosted, sb.subspace_boost(tau, beta=beta, **options), atol=1e-5)


def test_sweep_with_the_polar_solver_equals_single_beta_calls():
    stack = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6)), jnp.float32)
    for beta, boosted in zip((0.0, 0.3), subspace_boost_sweep(stack, betas=(0.0, 0.3), solver="polar")):
        assert_trees_equal(boosted, sb.subspace_boost(stack, beta=beta, solver="polar"), atol=1e-4)


def test_sweep_of_a_bare_array_has_the_known_spectra():
    matrix = jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0]))
    # cumsum / 7 = [.57, .86, 1, 1]: beta .5 -> k = 0, .6 -> k = 1, .9 and 1 -> k = 2
    expected = {0.5: [4, 4, 4, 4], 0.6: [4, 2, 2, 2], 0.9: [4, 2, 1, 1], 1.0: [4, 2, 1, 1]}
    outs = subspace_boost_sweep(matrix, betas=tuple(expected))
    for out, values in zip(outs, expected.values()):
        np.testing.assert_allclose(np.linalg.svd(np.asarray(out), compute_uv=False), values, atol=1e-5)


def test_non_matrix_leaves_pass_through_and_dtype_is_kept():
    tau = vit_like_params(np.random.default_rng(1), layers=1, dtype=np.float16)
    for boosted in subspace_boost_sweep(tau, betas=(0.0, 0.5)):
        np.testing.assert_array_equal(boosted["ln_post"]["scale"], tau["ln_post"]["scale"])
        np.testing.assert_array_equal(boosted["class_embedding"], tau["class_embedding"])
        assert all(b.dtype == jnp.float16 for b in jax.tree_util.tree_leaves(boosted))


@pytest.mark.parametrize("betas, match", [((), "non-empty"), (0.01, "non-empty"), ((0.0, 1.5), "beta"),
                                          ((0.0, float("nan")), "beta")])
def test_bad_betas_raise(betas, match):
    with pytest.raises(SubboostError, match=match):
        subspace_boost_sweep(jnp.eye(3), betas=betas)


def test_sweep_runs_the_same_checks_as_a_single_beta():
    with pytest.raises(SubboostError, match="solver"):
        subspace_boost_sweep(jnp.eye(3), betas=(0.0,), solver="qr")
    with pytest.raises(SubboostError, match="finite|NaN|non-finite"):
        subspace_boost_sweep(jnp.full((3, 3), jnp.nan), betas=(0.0,))
    with pytest.raises(SubboostError, match="batch_size"):
        subspace_boost_sweep(jnp.eye(3), betas=(0.0,), batch_size=0)


def test_equivalent_betas_groups_equal_cutoffs_in_grid_order():
    s = jnp.asarray([[4.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    cutoffs = {b: np.asarray(cutoff_index(s, beta=b)) for b in (0.0, 0.01, 0.3, 0.6, 0.62)}
    # matrix 1: k = 0, 0, 0, 1, 1; matrix 2 (flat): k = 0, 0, 1, 2, 2
    assert equivalent_betas(cutoffs) == {0.0: [0.0, 0.01], 0.3: [0.3], 0.6: [0.6, 0.62]}
