"""LiNeS: per-block scales, paths and patterns, composition with merges and boosting, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from tests import numpy_reference as ref
from tests import numpy_reference_svd as ref_svd
from tests.conftest import vit_like_params


def _flat(tree) -> dict:
    return ref.flat(jax.tree_util.tree_map(np.asarray, tree))


def test_known_scales_on_a_three_block_vit(rng):
    tau = vit_like_params(rng, layers=3)
    scales = sb.lines_scales(tau, alpha=0.2, beta=0.6)
    assert scales["transformer/resblocks_0/mlp/c_fc/kernel"] == pytest.approx(0.2)
    assert scales["transformer/resblocks_1/attn/query/kernel"] == pytest.approx(0.5)
    assert scales["transformer/resblocks_2/ln_2/bias"] == pytest.approx(0.8)
    for outside in ("conv1/kernel", "class_embedding", "positional_embedding", "ln_pre/scale", "ln_post/bias", "proj"):
        assert scales[outside] == pytest.approx(0.2), outside
    scaled = _flat(sb.lines(tau, alpha=0.2, beta=0.6))
    flat = _flat(tau)
    for path, value in scaled.items():
        np.testing.assert_allclose(value, scales[path] * flat[path], rtol=1e-6, err_msg=path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": 0.5, "beta": 1.0},
        {"alpha": 1.0, "beta": -0.5},
        {"alpha": 0.3, "beta": 0.4, "non_block_scale": 0.0},
        {"alpha": 0.3, "beta": 0.4, "num_blocks": 12},
    ],
)
def test_matches_numpy_reference(rng, kwargs):
    tau = vit_like_params(rng, layers=4)
    got = _flat(sb.lines(tau, **kwargs))
    want = ref_svd.lines_tree(_flat(tau), **kwargs)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-6, err_msg=path)


def test_num_blocks_sets_the_denominator(rng):
    tau = vit_like_params(rng, layers=2)
    inferred = sb.lines_scales(tau, alpha=0.0, beta=1.0)
    explicit = sb.lines_scales(tau, alpha=0.0, beta=1.0, num_blocks=5)
    assert inferred["transformer/resblocks_1/mlp/c_fc/kernel"] == pytest.approx(1.0)   # 1 / (2 - 1)
    assert explicit["transformer/resblocks_1/mlp/c_fc/kernel"] == pytest.approx(0.25)  # 1 / (5 - 1)


def test_single_block_gets_alpha():
    tau = {"resblocks_0": {"kernel": jnp.ones((2, 2))}, "head": jnp.ones(2)}
    assert sb.lines_scales(tau, alpha=0.7, beta=5.0) == {"resblocks_0/kernel": 0.7, "head": 0.7}


def test_custom_pattern_big_vision_names():
    tau = {
        "Transformer": {f"encoderblock_{i}": {"MlpBlock_0": {"Dense_0": {"kernel": jnp.ones((3, 4))}}} for i in range(3)},
        "embedding": {"kernel": jnp.ones((2, 2, 3, 3))},
    }
    scaled = sb.lines(tau, alpha=1.0, beta=2.0, pattern=r"encoderblock_(\d+)", non_block_scale=0.5)
    blocks = scaled["Transformer"]
    for i, want in enumerate([1.0, 2.0, 3.0]):
        np.testing.assert_allclose(blocks[f"encoderblock_{i}"]["MlpBlock_0"]["Dense_0"]["kernel"], want)
    np.testing.assert_allclose(scaled["embedding"]["kernel"], 0.5)


@pytest.mark.slow
def test_stacked_task_vectors_and_dtype_kept(rng):
    tau = vit_like_params(rng, layers=2, dtype=jnp.bfloat16)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), tau)
    out = sb.lines(stacked, alpha=0.5, beta=0.5)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(out))
    block_1 = out["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_allclose(np.asarray(block_1, np.float32),
                               np.asarray(stacked["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"], np.float32),
                               rtol=1e-2)
    block_0 = out["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_allclose(np.asarray(block_0, np.float32),
                               0.5 * np.asarray(stacked["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"], np.float32),
                               rtol=1e-2)


@pytest.mark.parametrize("method, kwargs", [("task_arithmetic", {}), ("ties", {"k": 0.3}), ("tsv", {}), ("iso_c", {})])
@pytest.mark.slow
def test_after_any_merge_commutes_with_boosting_and_sweeps_alpha(experts, method, kwargs):
    base, finetuned = experts
    tau = sb.merge(sb.task_vectors(base, finetuned), method, **kwargs)
    scaled = sb.lines(tau, alpha=0.4, beta=0.8)
    # Boosting is positively homogeneous per matrix, LiNeS a positive scale per block.
    boost_then_scale = sb.lines(sb.subspace_boost(tau, beta=0.01), alpha=0.4, beta=0.8)
    scale_then_boost = sb.subspace_boost(scaled, beta=0.01)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), boost_then_scale, scale_then_boost
    )
    want = ref_svd.lines_tree(_flat(tau), alpha=0.4, beta=0.8)
    base_flat = _flat(base)
    for alpha in (0.5, 1.0, 2.0):
        params = _flat(sb.apply_task_vector(base, scaled, alpha=alpha))
        for path in want:
            np.testing.assert_allclose(params[path], base_flat[path] + alpha * want[path], rtol=1e-5, atol=1e-6)


# --- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pattern": r"layers_(\d+)"}, r"no parameter path matches the block pattern 'layers_.*paths look like \['class_embedding'"),
        ({"pattern": r"resblocks_\d+"}, "exactly one capturing group"),
        ({"pattern": r"(resblocks)_(\d+)"}, "exactly one capturing group"),
        ({"pattern": r"(resblocks_\d+"}, "not a valid regular expression"),
        ({"pattern": r"(resblocks)_\d+"}, r"captured 'resblocks' from parameter 'transformer/resblocks_0/"),
        ({"num_blocks": 1}, r"parameter 'transformer/resblocks_1/.*' is in block 1, but num_blocks=1"),
        ({"num_blocks": 0}, "num_blocks must be a positive integer"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"beta": "1"}, "beta must be a finite number"),
    ],
)
def test_bad_input(rng, kwargs, message):
    tau = vit_like_params(rng, layers=2)
    arguments = {"alpha": 0.5, "beta": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        sb.lines(tau, **arguments)
