"""task_vectors / apply_task_vector and the shared input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb


def test_task_vectors_stack_differences(experts):
    base, finetuned = experts
    tvs = sb.task_vectors(base, finetuned)
    got = np.asarray(tvs["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"])
    want = np.stack([np.asarray(f["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"]) for f in finetuned])
    want -= np.asarray(base["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got.shape[0] == 4


def test_apply_task_vector_alpha_zero_is_pretrained_and_keeps_dtype():
    base = {"w": jnp.arange(4, dtype=jnp.bfloat16)}
    tau = {"w": jnp.ones(4, jnp.float32)}
    np.testing.assert_array_equal(np.asarray(sb.apply_task_vector(base, tau, alpha=0.0)["w"]), np.asarray(base["w"]))
    out = sb.apply_task_vector(base, tau, alpha=0.5)["w"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), [0.5, 1.5, 2.5, 3.5])
    with pytest.raises(TypeError, match="positional"):  # alpha is keyword-only, like every hyper-parameter
        sb.apply_task_vector(base, tau, 0.5)


def test_shape_mismatch_names_path_and_both_shapes(experts):
    base, finetuned = experts
    bad = jax.tree_util.tree_map(lambda x: x, finetuned[1])
    bad["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"] = jnp.zeros((8, 17))
    with pytest.raises(ValueError, match=r"expert 1.*resblocks_0/mlp/c_fc/kernel.*\(8, 17\).*\(8, 16\)"):
        sb.task_vectors(base, [finetuned[0], bad])


def test_structure_and_dtype_mismatch(experts):
    base, finetuned = experts
    missing = dict(finetuned[0])
    del missing["ln_post"]
    with pytest.raises(ValueError, match="missing parameters.*ln_post"):
        sb.task_vectors(base, [missing])
    wrong_dtype = jax.tree_util.tree_map(lambda x: x, finetuned[0])
    wrong_dtype["proj"] = wrong_dtype["proj"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="'proj' has dtype bfloat16"):
        sb.task_vectors(base, [wrong_dtype])


def test_empty_expert_list_and_non_finite(experts):
    base, finetuned = experts
    with pytest.raises(ValueError, match="at least one"):
        sb.task_vectors(base, [])
    nan = jax.tree_util.tree_map(lambda x: x, finetuned[2])
    nan["ln_pre"]["scale"] = nan["ln_pre"]["scale"].at[3].set(jnp.nan)
    with pytest.raises(ValueError, match="expert 1: parameter 'ln_pre/scale' contains NaN"):
        sb.task_vectors(base, [finetuned[0], nan])
