"""Alignment matrices and expert selection in the HO-GSVD basis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost.alignment import alignment_from_sigma, mean_alignment
from tests.test_hogsvd import numpy_robust
from tests.trees import dense_tree

N_COLS = 6  # columns (inputs) of every planted matrix


def disjoint_experts(rng, num=3, rank=2, rows=5, orthogonal=False):
    """Expert t lives on its own random ``rank``-dim row space; together they span R^6 (all directions isolated)."""
    basis = rng.standard_normal((num * rank, N_COLS))
    if orthogonal:
        basis = np.linalg.qr(basis.T)[0].T
    return [rng.standard_normal((rows, rank)) @ basis[t * rank : (t + 1) * rank] for t in range(num)]


def test_identical_experts_align_to_one():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, N_COLS)), rng.standard_normal((8, N_COLS))
    tvs = dense_tree({"l1": [a, a, a], "l2": [b, b, b]})
    np.testing.assert_allclose(np.asarray(sb.alignment_matrix(tvs)), np.ones((3, 3)), atol=1e-5)


@pytest.mark.slow
def test_disjoint_planted_subspaces_align_near_zero_and_merged_reference_is_predicted():
    rng = np.random.default_rng(1)
    tvs = dense_tree({"l1": disjoint_experts(rng), "l2": disjoint_experts(rng)})
    experts_only = np.asarray(sb.alignment_matrix(tvs))
    np.testing.assert_allclose(experts_only, np.eye(3), atol=2e-3)  # float32, cond(stack) ~ 1e2
    # merged = TA sum: its projected profile is 1 on every direction, so M(merged, t) = sqrt(|S_t| / n) = sqrt(2/6)
    merged = sb.merge(tvs, "task_arithmetic")
    with_ref = np.asarray(sb.alignment_matrix(tvs, merged))
    assert with_ref.shape == (4, 4)
    np.testing.assert_allclose(with_ref[:3, :3], experts_only, atol=1e-6)  # the experts' block is unchanged
    np.testing.assert_allclose(with_ref[3, :3], np.sqrt(2 / 6), atol=2e-3)
    np.testing.assert_allclose(with_ref, with_ref.T, atol=1e-6)
    assert with_ref[3, 3] == pytest.approx(1.0, abs=1e-6)


def test_alignment_matches_numpy_definition():
    rng = np.random.default_rng(2)
    layers = {"l1": [rng.standard_normal((7, N_COLS)) for _ in range(3)],
              "l2": [rng.standard_normal((4, N_COLS)) for _ in range(3)]}
    expected = []
    for mats in layers.values():
        _, sigma, _ = numpy_robust(mats, 1 / 3)
        p = sigma / np.linalg.norm(sigma, axis=1, keepdims=True)
        expected.append(p @ p.T)
    tvs = dense_tree(layers)
    np.testing.assert_allclose(np.asarray(sb.alignment_matrix(tvs)), np.mean(expected, axis=0), atol=1e-4)
    sigmas = sb.generalized_singular_values(tvs)
    assert set(sigmas) == {"l1", "l2"} and sigmas["l1"].shape == (3, N_COLS)
    np.testing.assert_allclose(np.asarray(mean_alignment(sigmas)), np.mean(expected, axis=0), atol=1e-4)
    # a zero expert profile aligns with nothing (0), never NaN
    zero_row = alignment_from_sigma(jnp.asarray([[1.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(np.asarray(zero_row), [[1.0, 0.0], [0.0, 0.0]])


def clustered_experts(rng, noise=0.01):
    """Experts 0, 2, 4 on disjoint (orthogonal) subspaces; 1 and 3 rescaled noisy copies of 0 and 2.

    (Exactly equal copy ratios would make the two pairs' eigenvalues coincide; noise then mixes them.)
    """
    a, b, c = disjoint_experts(rng, orthogonal=True)
    return [a, 1.25 * a + noise * rng.standard_normal(a.shape), b, 0.6 * b + noise * rng.standard_normal(b.shape), c]


@pytest.mark.slow
def test_selection_picks_the_planted_diverse_set_over_near_duplicates():
    rng = np.random.default_rng(3)
    tvs = dense_tree({"l1": clustered_experts(rng), "l2": clustered_experts(rng)})
    alignment = np.asarray(sb.alignment_matrix(tvs))
    assert alignment[0, 1] > 0.95 and alignment[2, 3] > 0.95
    assert alignment[[0, 0, 2], [2, 4, 4]].max() < 0.2
    chosen = sb.select_experts(tvs, k=3)
    clusters = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c"}
    assert sorted(clusters[i] for i in chosen) == ["a", "b", "c"], chosen
    assert sb.select_experts(None, k=3, alignment=alignment) == chosen
    # the greedy set beats every random draw that takes a near-duplicate pair
    greedy_cost = sb.total_alignment(alignment, chosen)
    for seed in range(5):
        drawn = sb.select_experts(tvs, k=3, strategy="random", seed=seed)
        assert len(set(drawn)) == 3 and drawn == sorted(drawn) and all(0 <= i < 5 for i in drawn)
        assert drawn == sb.select_experts(tvs, k=3, strategy="random", seed=seed)  # reproducible
        if len({clusters[i] for i in drawn}) < 3:
            assert sb.total_alignment(alignment, drawn) > greedy_cost + 0.8
    assert len({tuple(sb.select_experts(tvs, k=3, strategy="random", seed=s)) for s in range(8)}) > 1
    assert sb.select_experts(None, k=5, alignment=alignment) == [0, 1, 2, 3, 4]
    assert sb.select_experts(None, k=1, alignment=alignment)[0] == 4  # the expert without a twin


def test_bad_input():
    rng = np.random.default_rng(4)
    tvs = dense_tree({"l1": disjoint_experts(rng)})
    alignment = np.eye(3)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3\]"):
        sb.select_experts(None, k=4, alignment=alignment)
    with pytest.raises(ValueError, match="strategy must be one of"):
        sb.select_experts(None, k=2, strategy="best", alignment=alignment)
    with pytest.raises(ValueError, match="alignment is 2x2 but the task vectors hold 3 experts"):
        sb.select_experts(tvs, k=1, alignment=np.eye(2))
    with pytest.raises(ValueError, match="square"):
        sb.select_experts(None, k=1, alignment=np.ones((2, 3)))
    with pytest.raises(ValueError, match="pass the task vectors or a precomputed alignment"):
        sb.select_experts(None, k=1)
    with pytest.raises(ValueError, match="at least 2 experts, got 1"):
        sb.alignment_matrix(jax.tree_util.tree_map(lambda x: x[:1], tvs))
    with pytest.raises(ValueError, match="'l1/kernel' has shape"):
        sb.alignment_matrix(tvs, {"l1": {"kernel": jnp.zeros((5, 5))}})
    with pytest.raises(ValueError, match="merged: parameter 'l1/kernel' contains NaN"):
        sb.alignment_matrix(tvs, {"l1": {"kernel": jnp.full((N_COLS, 5), jnp.nan)}})
    with pytest.raises(ValueError, match="'l1/kernel' contains NaN"):
        sb.alignment_matrix({"l1": {"kernel": tvs["l1"]["kernel"].at[1, 0, 0].set(jnp.inf)}})
    with pytest.raises(ValueError, match="no matrix parameters"):
        sb.alignment_matrix({"b": jnp.ones((3, 4))})
