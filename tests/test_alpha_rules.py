"""`subboost.alpha_rules`: known answers, an independent numpy computation, bad input, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost.errors import SubboostError


def dense_tvs(kernels: list[np.ndarray], biases: list[np.ndarray] | None = None) -> dict:
    """Stacked task vectors of one Flax dense layer (kernel ``(in, out)``, i.e. the matrix ``kernel.T``)."""
    tree = {"dense": {"kernel": jnp.asarray(np.stack(kernels), jnp.float32)}}
    if biases is not None:
        tree["dense"]["bias"] = jnp.asarray(np.stack(biases), jnp.float32)
    return tree


def numpy_alpha_from_hogsvd(mats: list[np.ndarray], merged: np.ndarray, target: str = "max") -> float:
    """Robust HO-GSVD (Kempf et al.) of full-rank stacked ``(m_i, n)`` matrices, written out in float64."""
    n, num = mats[0].shape[1], len(mats)
    q, r = np.linalg.qr(np.concatenate(mats).astype(np.float64))
    blocks = np.split(q, np.cumsum([m.shape[0] for m in mats])[:-1])
    pi = 1.0 / num
    t = sum(np.linalg.inv(b.T @ b + pi * np.eye(n)) for b in blocks) / num
    _, z = np.linalg.eigh(t)
    sigma = np.stack([np.linalg.norm(b @ z, axis=0) for b in blocks])  # (N, n)
    v = r.T @ z
    g = np.linalg.norm(merged.astype(np.float64) @ np.linalg.inv(v).T, axis=0)
    target_k = sigma.max(axis=0) if target == "max" else sigma.mean(axis=0)
    return float(np.sqrt(np.sum(target_k**2) / np.sum(g**2)))


@pytest.mark.parametrize("num", [2, 5])
def test_identical_experts_give_one_over_t(num):
    rng = np.random.default_rng(num)
    kernel, bias = rng.normal(size=(6, 8)), rng.normal(size=8)
    tvs = dense_tvs([kernel] * num, [bias] * num)
    merged = sb.merge(tvs, method="task_arithmetic")
    np.testing.assert_allclose(float(sb.alpha_from_norm(tvs, merged)), 1 / num, rtol=1e-5)
    np.testing.assert_allclose(float(sb.alpha_from_hogsvd(tvs, merged)), 1 / num, rtol=1e-4)
    np.testing.assert_allclose(float(sb.alpha_from_hogsvd(tvs, merged, target="mean")), 1 / num, rtol=1e-4)


def test_orthogonal_experts_of_equal_norm():
    """Rows in mutually orthogonal subspaces: the sum carries each direction at full strength (HO-GSVD: 1);
    its norm is sqrt(T) times an expert's (norm rule: 1 / sqrt(T))."""
    rng = np.random.default_rng(0)
    num, n = 4, 16
    basis, _ = np.linalg.qr(rng.normal(size=(n, n)))
    mats = []
    for i in range(num):
        m = rng.normal(size=(5, 4)) @ basis[4 * i: 4 * i + 4]
        mats.append(m / np.linalg.norm(m))
    tvs = dense_tvs([m.T for m in mats])  # Flax kernel = matrix.T
    merged = sb.merge(tvs, method="task_arithmetic")
    np.testing.assert_allclose(float(sb.alpha_from_hogsvd(tvs, merged)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(float(sb.alpha_from_norm(tvs, merged)), 1 / np.sqrt(num), rtol=1e-5)
    # "mean" target: each direction is carried by one of T experts, so 1/T of the strongest.
    np.testing.assert_allclose(float(sb.alpha_from_hogsvd(tvs, merged, target="mean")), 1 / num, rtol=1e-4)


def test_scaling_the_merge_scales_alpha_inversely():
    rng = np.random.default_rng(1)
    tvs = dense_tvs([rng.normal(size=(6, 8)) for _ in range(3)], [rng.normal(size=8) for _ in range(3)])
    merged = sb.merge(tvs, method="ties")
    scaled = jax.tree_util.tree_map(lambda x: 4.0 * x, merged)
    for rule in (sb.alpha_from_norm, sb.alpha_from_hogsvd):
        np.testing.assert_allclose(float(rule(tvs, scaled)), float(rule(tvs, merged)) / 4, rtol=1e-4)


@pytest.mark.parametrize("target", ["max", "mean"])
def test_hogsvd_rule_matches_numpy(target):
    rng = np.random.default_rng(2)
    kernels = [rng.normal(size=(6, 8)) * s for s in (1.0, 0.5, 2.0)]
    merged_kernel = rng.normal(size=(6, 8))  # outside any combination of the experts: a general projection
    tvs = dense_tvs(kernels)
    got = float(sb.alpha_from_hogsvd(tvs, {"dense": {"kernel": jnp.asarray(merged_kernel, jnp.float32)}},
                                     target=target))
    want = numpy_alpha_from_hogsvd([k.T for k in kernels], merged_kernel.T, target=target)
    np.testing.assert_allclose(got, want, rtol=2e-3)


def test_norm_rule_matches_numpy():
    rng = np.random.default_rng(3)
    kernels, biases = [rng.normal(size=(6, 8)) * (t + 1) for t in range(3)], [rng.normal(size=8) for _ in range(3)]
    tvs = dense_tvs(kernels, biases)
    merged = sb.merge(tvs, method="tsv")
    norms = [np.sqrt(np.sum(k**2) + np.sum(b**2)) for k, b in zip(kernels, biases)]
    merged_norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64)**2) for x in jax.tree_util.tree_leaves(merged)))
    np.testing.assert_allclose(float(sb.alpha_from_norm(tvs, merged)), np.mean(norms) / merged_norm, rtol=1e-5)
    np.testing.assert_allclose(float(sb.alpha_from_norm(tvs, merged, reduce="max")), max(norms) / merged_norm,
                               rtol=1e-5)


def test_jit_gives_the_eager_value():
    rng = np.random.default_rng(4)
    tvs = dense_tvs([rng.normal(size=(6, 8)) for _ in range(3)], [rng.normal(size=8) for _ in range(3)])
    merged = sb.merge(tvs, method="task_arithmetic")
    for rule in (sb.alpha_from_norm, sb.alpha_from_hogsvd):
        np.testing.assert_allclose(float(jax.jit(rule)(tvs, merged)), float(rule(tvs, merged)), rtol=1e-5)


def test_bad_input_is_refused_by_name():
    rng = np.random.default_rng(5)
    tvs = dense_tvs([rng.normal(size=(6, 8)) for _ in range(3)])
    merged = sb.merge(tvs, method="task_arithmetic")
    zero = jax.tree_util.tree_map(jnp.zeros_like, merged)
    for rule in (sb.alpha_from_norm, sb.alpha_from_hogsvd):
        with pytest.raises(SubboostError, match="merged task vector"):
            rule(tvs, zero)
        with pytest.raises(SubboostError, match="experts"):
            rule(jax.tree_util.tree_map(jnp.zeros_like, tvs), merged)
        with pytest.raises(SubboostError, match="dense/kernel"):
            rule(tvs, {"dense": {"kernel": merged["dense"]["kernel"].at[0, 0].set(jnp.nan)}})
        with pytest.raises(SubboostError):
            rule(tvs, {"dense": {"kernel": merged["dense"]["kernel"][:, :4]}})
    with pytest.raises(SubboostError, match="alpha_from_norm: reduce must be one of .*'median'"):
        sb.alpha_from_norm(tvs, merged, reduce="median")
    with pytest.raises(SubboostError, match="alpha_from_hogsvd: target must be one of .*'energy'"):
        sb.alpha_from_hogsvd(tvs, merged, target="energy")
    with pytest.raises(SubboostError, match="T >= 2"):
        sb.alpha_from_hogsvd(jax.tree_util.tree_map(lambda x: x[:1], tvs), merged)
