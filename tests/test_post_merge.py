"""Post-merge operators (`subboost.post_merge`): definitions on small matrices, chaining, parsing, the CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import post_merge

T = 3


def blocks_tree(rng, num_tasks: int = T, blocks: int = 3) -> dict:
    """Stacked task vectors of a small transformer: per block an MLP kernel (8 -> 6) and a bias."""
    return {"transformer": {f"resblocks_{i}": {"mlp": {
        "kernel": jnp.asarray(rng.standard_normal((num_tasks, 8, 6)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal((num_tasks, 6)), jnp.float32)}} for i in range(blocks)}}


def kernel_of(tree, block: int = 0) -> np.ndarray:
    """The (out, in) matrix of block ``block``'s kernel (float64); stacked trees keep their task axis."""
    return np.swapaxes(np.asarray(tree["transformer"][f"resblocks_{block}"]["mlp"]["kernel"], np.float64), -1, -2)


# ----------------------------------------------------------------------------
# SVC
# ----------------------------------------------------------------------------
def svc_numpy(merged: np.ndarray, tasks: np.ndarray, floor: float, coefficient: float = 1.0) -> np.ndarray:
    """FusionBench's algorithm (loop form) in float64."""
    u, s, vh = np.linalg.svd(coefficient * merged, full_matrices=False)
    gamma = []
    for r in range(len(s)):
        merged_response = u[:, r] @ (coefficient * merged)
        coefficients = [merged_response @ (u[:, r] @ t) / max((u[:, r] @ t) @ (u[:, r] @ t), 1e-12) for t in tasks]
        gamma.append(len(tasks) / sum(max(floor, c) for c in coefficients))
    return u @ np.diag(np.asarray(gamma) * s) @ vh / coefficient


def test_svc_known_answers():
    # identical experts: every direction is counted T times (p = T), gamma = 1/T: one expert back
    expert = np.array([[3.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    tvs = jnp.asarray(np.stack([expert] * T), jnp.float32)
    got = post_merge.svc_matrices(tvs.sum(0), tvs, min_projection=0.1)
    np.testing.assert_allclose(np.asarray(got), expert, rtol=1e-5, atol=1e-6)
    # disjoint experts: each direction is one task's (p = 1) and no other's (p = 0 -> the floor)
    tasks = np.zeros((T, 3, 3))
    for t in range(T):
        tasks[t, t, t] = t + 1.0
    got = post_merge.svc_matrices(jnp.asarray(tasks.sum(0), jnp.float32), jnp.asarray(tasks, jnp.float32),
                                  min_projection=0.25)
    np.testing.assert_allclose(np.asarray(got), tasks.sum(0) * T / (1 + (T - 1) * 0.25), rtol=1e-5)


@pytest.mark.parametrize("coefficient", [1.0, 0.3])
def test_svc_operator_matches_numpy_on_matrices_only(rng, coefficient):
    tvs = blocks_tree(rng)
    tau = sb.merge(tvs, "task_arithmetic")
    got = sb.post.svc(min_projection=0.1, merge_coefficient=coefficient)(tau, task_vectors=tvs)
    want = svc_numpy(kernel_of(tau), kernel_of(tvs), 0.1, coefficient)
    np.testing.assert_allclose(kernel_of(got), want, rtol=1e-4, atol=1e-5)
    bias = got["transformer"]["resblocks_0"]["mlp"]["bias"]  # non-matrix leaves are left as merged
    np.testing.assert_array_equal(np.asarray(bias), np.asarray(tau["transformer"]["resblocks_0"]["mlp"]["bias"]))
    assert not np.allclose(kernel_of(got), kernel_of(tau), rtol=1e-2)


def test_svc_refuses_without_or_with_mismatched_task_vectors(rng):
    tvs = blocks_tree(rng)
    tau = sb.merge(tvs, "task_arithmetic")
    with pytest.raises(sb.SubboostError, match="needs the stacked task vectors"):
        sb.post.svc()(tau)
    other = blocks_tree(rng, blocks=2)
    with pytest.raises(sb.SubboostError, match="different parameters"):
        sb.post.svc()(tau, task_vectors=other)
    with pytest.raises(sb.SubboostError, match="merge_coefficient"):
        sb.post.svc(merge_coefficient=0.0)


# ----------------------------------------------------------------------------
# iso, star, boost, lines: the operators equal their functions
# ----------------------------------------------------------------------------
def test_iso_on_task_arithmetic_is_iso_c_and_star_truncates(rng):
    tvs = blocks_tree(rng)
    tau = sb.merge(tvs, "task_arithmetic")
    iso = sb.post.iso()(tau)
    np.testing.assert_allclose(kernel_of(iso), kernel_of(sb.merge(tvs, "iso_c")), rtol=1e-5, atol=1e-6)
    s = np.linalg.svd(kernel_of(iso), compute_uv=False)
    np.testing.assert_allclose(s, s.mean(), rtol=1e-5)
    star = sb.post.star(nuclear_fraction=0.5)(tau)
    s_in, s_out = (np.linalg.svd(kernel_of(x), compute_uv=False) for x in (tau, star))
    rank = int(np.searchsorted(np.cumsum(s_in), 0.5 * s_in.sum())) + 1
    np.testing.assert_allclose(s_out[:rank], s_in[:rank] * s_in.sum() / s_in[:rank].sum(), rtol=1e-5)
    np.testing.assert_allclose(s_out[rank:], 0.0, atol=1e-5)


def test_chain_applies_left_to_right_and_matches_the_functions(rng):
    tvs = blocks_tree(rng)
    tau = sb.merge(tvs, "task_arithmetic")
    op = sb.chain(sb.post.svc(min_projection=0.1), sb.post.boost(beta=0.05), sb.post.lines(alpha=0.5, beta=1.0))
    want = sb.lines(sb.subspace_boost(sb.post.svc(min_projection=0.1)(tau, task_vectors=tvs), beta=0.05),
                    alpha=0.5, beta=1.0)
    got = op(tau, task_vectors=tvs)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    other_order = sb.chain(sb.post.boost(beta=0.05), sb.post.svc(min_projection=0.1))(tau, task_vectors=tvs)
    assert not np.allclose(kernel_of(other_order), kernel_of(sb.subspace_boost(
        sb.post.svc(min_projection=0.1)(tau, task_vectors=tvs), beta=0.05)), rtol=1e-3)
    assert op.needs_task_vectors and not op.needs_pretrained
    assert op.name == "svc(min_projection=0.1, merge_coefficient=1.0, attention='per_qkv') -> boost(beta=0.05) -> " \
                      "lines(alpha=0.5, beta=1.0)"
    with pytest.raises(sb.SubboostError, match="not a post-merge operator"):
        sb.chain(sb.post.iso(), sb.subspace_boost)


def test_parse_builds_the_same_chain(rng):
    tvs = blocks_tree(rng)
    tau = sb.merge(tvs, "task_arithmetic")
    text = "svc:min_projection=0.1,merge_coefficient=0.3 + boost:beta=0.05"
    for spec in (text, ["svc:min_projection=0.1, merge_coefficient=0.3", "boost:beta=0.05"]):
        op = sb.post.parse(spec)
        want = sb.chain(sb.post.svc(min_projection=0.1, merge_coefficient=0.3), sb.post.boost(beta=0.05))
        assert op.name == want.name
        np.testing.assert_array_equal(kernel_of(op(tau, task_vectors=tvs)), kernel_of(want(tau, task_vectors=tvs)))
    assert sb.post.parse("larv:tier_scales=(0.5, 1.0, 2.0)").name.startswith("larv(tier_scales=(0.5, 1.0, 2.0),")
    for bad, match in (("svd:alpha=1", "unknown post-merge operator 'svd'"), ("svc:0.1", "NAME=VALUE"),
                       ("svc:floor=0.1", "unexpected keyword"), ("star:nuclear_fraction=2", "nuclear_fraction")):
        with pytest.raises(sb.SubboostError, match=match):
            sb.post.parse(bad)


def test_compositions_for_the_benchmarks():
    from types import SimpleNamespace

    from subboost.bench.settings import DEFAULT_COMPOSITIONS
    from subboost.bench.pipeline import methods_to_run

    name, op = sb.post.split_composition("tsv + svc:min_projection=0.2 + boost:beta=0.01")
    assert name == "tsv" and op.name.startswith("svc(min_projection=0.2,") and op.name.endswith("boost(beta=0.01)")
    assert sb.post.split_composition("ties")[1].name == "identity"
    assert methods_to_run(SimpleNamespace(methods=None)) == sb.available_methods() + DEFAULT_COMPOSITIONS
    assert methods_to_run(SimpleNamespace(methods=("iso_c + larv",))) == ("iso_c + larv",)
    with pytest.raises(ValueError, match="unknown merge method"):
        methods_to_run(SimpleNamespace(methods=("isoc + larv",)))
    for composition in DEFAULT_COMPOSITIONS:  # each parses
        sb.post.split_composition(composition)


# ----------------------------------------------------------------------------
# LARV
# ----------------------------------------------------------------------------
def test_effective_rank_and_commutator_conflict_known_values():
    s = jnp.array([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(post_merge.effective_rank(s)), [4.0, 1.0, 1.0], rtol=1e-6)
    a = jnp.diag(jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(float(post_merge.commutator_conflict(a, jnp.diag(jnp.array([3.0, -1.0])))), 0.0)
    # A = I, D = [[0, 1], [0, 0]]: A D^T - D A^T = D^T - D, norm sqrt(2), twice; ||A|| ||D|| = sqrt(2)
    d = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(float(post_merge.commutator_conflict(jnp.eye(2), d)), 1.0, rtol=1e-6)


def larv_numpy(tau, pretrained, tiers=(0.5, 1.0, 1.5)) -> dict:
    """The tiered LARV rule on single-kernel blocks, float64."""
    def r_eff(x):
        p = np.linalg.svd(x, compute_uv=False) ** 2
        p = p / p.sum()
        return np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))

    contrast, conflict = [], []
    for block in range(3):
        d, a = kernel_of(tau, block), kernel_of(pretrained, block)
        contrast.append(r_eff(a) / (r_eff(d) + 1e-8))
        conflict.append((np.linalg.norm(a @ d.T - d @ a.T) + np.linalg.norm(a.T @ d - d.T @ a))
                        / (2 * np.linalg.norm(a) * np.linalg.norm(d)))
    z = (np.array(conflict) - np.mean(conflict)) / np.std(conflict)
    score = np.array(contrast) * np.sqrt(np.arange(1, 4) / 3) / (1 + np.log1p(np.exp(z)))
    low, high = np.quantile(score, [1 / 3, 2 / 3])
    return {b: tiers[0] if q <= low else tiers[1] if q <= high else tiers[2] for b, q in enumerate(score)}


def test_larv_scales_blocks_by_their_tier(rng):
    tvs = blocks_tree(rng)
    tau = sb.merge(tvs, "task_arithmetic")
    pretrained = jax.tree_util.tree_map(lambda x: 3.0 * x[0] + 0.5, blocks_tree(np.random.default_rng(7)))
    scales = post_merge.larv_scales(tau, pretrained)
    assert scales == larv_numpy(tau, pretrained) and sorted(scales.values()) == [0.5, 1.0, 1.5]
    got = sb.post.larv()(tau, pretrained=pretrained)
    for block, scale in scales.items():
        np.testing.assert_allclose(kernel_of(got, block), scale * kernel_of(tau, block), rtol=1e-6)
        bias = f"resblocks_{block}"
        np.testing.assert_allclose(np.asarray(got["transformer"][bias]["mlp"]["bias"]),
                                   scale * np.asarray(tau["transformer"][bias]["mlp"]["bias"]), rtol=1e-6)
    with pytest.raises(sb.SubboostError, match="needs the pretrained parameters"):
        sb.post.larv()(tau, task_vectors=tvs)
    with pytest.raises(sb.SubboostError, match="block pattern"):
        post_merge.larv_scales(tau, pretrained, pattern=r"layer_(\d+)")


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def test_cli_merge_post_equals_the_api(rng, tmp_path, capsys):
    from subboost import cli

    tvs = blocks_tree(rng)
    base = jax.tree_util.tree_map(lambda x: jnp.zeros_like(x[0]), tvs)
    sb.save_params(base, tmp_path / "base")
    experts = []
    for t in range(T):
        expert = jax.tree_util.tree_map(lambda x: x[t], tvs)
        sb.save_params(expert, tmp_path / f"e{t}")
        experts.append(str(tmp_path / f"e{t}"))
    args = ["merge", "--base", str(tmp_path / "base"), *experts, "--alpha", "0.3",
            "--post", "svc:min_projection=0.1,merge_coefficient=0.3", "--post", "boost:beta=0.05"]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 0
    op = sb.chain(sb.post.svc(min_projection=0.1, merge_coefficient=0.3), sb.post.boost(beta=0.05))
    want = sb.apply_task_vector(base, op(sb.merge(tvs, "task_arithmetic"), task_vectors=tvs), alpha=0.3)
    np.testing.assert_allclose(kernel_of(sb.load_params(tmp_path / "out")), kernel_of(want), rtol=1e-5, atol=1e-6)
    assert cli.main([*args[:-1], "bost:beta=0.05", "--out", str(tmp_path / "bad")]) != 0
    assert "unknown post-merge operator 'bost'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
