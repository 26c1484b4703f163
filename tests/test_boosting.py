"""Subspace Boosting: known spectra, numpy cross-check, properties, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import subboost as sb
from tests import numpy_reference as ref
from tests.conftest import vit_like_params
from tests.tracing import count_traces


def _svals(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


@pytest.mark.parametrize(
    "beta, mode, expected",
    [
        (0.5, "cumsum", [4, 4, 4, 4]),   # cumsum/7 = [.57, .86, 1, 1]: k = 0
        (0.6, "cumsum", [4, 2, 2, 2]),   # k = 1
        (0.9, "cumsum", [4, 2, 1, 1]),   # k = 2
        (0.0, "cumsum", [4, 4, 4, 4]),   # beta = 0 flattens to s_0
        (0.5, "index", [4, 2, 1, 1]),    # k = floor(0.5 * 4) = 2
        (0.25, "index", [4, 2, 2, 2]),
    ],
)
def test_known_spectra(beta, mode, expected):
    matrix = jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0]))
    np.testing.assert_allclose(_svals(sb.subspace_boost(matrix, beta=beta, mode=mode)), expected, atol=1e-5)


@pytest.mark.parametrize("attention", ["per_qkv", "full", "per_head"])
@pytest.mark.parametrize("mode, beta", [("cumsum", 0.01), ("cumsum", 0.3), ("index", 0.5)])
def test_tree_matches_per_matrix_numpy_loop(rng, attention, mode, beta):
    tau = vit_like_params(rng)
    boosted = sb.subspace_boost(tau, beta=beta, mode=mode, attention=attention)
    plan = sb.matrix_plan(tau, attention=attention)
    got_groups = plan.gather(boosted)
    for group, stack in plan.gather(tau).items():
        for i, matrix in enumerate(np.asarray(stack)):
            want = ref.boost_matrix(matrix, beta, mode)
            np.testing.assert_allclose(np.asarray(got_groups[group][i]), want, rtol=1e-4, atol=1e-4)
    # Non-matrix leaves pass through untouched.
    np.testing.assert_array_equal(boosted["proj"], tau["proj"])
    np.testing.assert_array_equal(boosted["transformer"]["resblocks_0"]["attn"]["query"]["bias"],
                                  tau["transformer"]["resblocks_0"]["attn"]["query"]["bias"])


def test_boost_keeps_singular_vectors_and_raises_only_small_values(rng):
    x = rng.standard_normal((12, 7)) @ np.diag(np.geomspace(10, 0.01, 7))
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    out = np.asarray(sb.subspace_boost(jnp.asarray(x, jnp.float32), beta=0.5), np.float64)
    projected = u.T @ out @ vh.T
    np.testing.assert_allclose(projected, np.diag(np.diag(projected)), atol=1e-4)
    k = int(np.nonzero(np.cumsum(s) / s.sum() >= 0.5)[0][0])
    np.testing.assert_allclose(np.diag(projected)[: k + 1], s[: k + 1], rtol=1e-5)
    np.testing.assert_allclose(np.diag(projected)[k:], s[k], rtol=1e-5)


@settings(deadline=None, max_examples=15)
@given(
    scale=st.floats(0.01, 100.0),
    beta=st.sampled_from([0.0, 0.01, 0.02, 0.2, 0.7]),
    seed=st.integers(0, 1000),
)
def test_boost_is_positively_scale_equivariant(scale, beta, seed):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((6, 9)), jnp.float32)
    lhs = sb.subspace_boost(scale * x, beta=beta)
    rhs = scale * sb.subspace_boost(x, beta=beta)
    np.testing.assert_allclose(lhs, rhs, rtol=2e-4, atol=2e-4 * scale)


def test_beta_zero_gives_flat_spectrum_at_s0(rng):
    x = jnp.asarray(rng.standard_normal((10, 6)), jnp.float32)
    s = _svals(sb.subspace_boost(x, beta=0.0))
    np.testing.assert_allclose(s, np.full(6, _svals(x)[0]), rtol=1e-5)


def test_zero_matrix_stays_zero_without_nan():
    tau = {"blk": {"kernel": jnp.zeros((5, 3))}, "b": jnp.zeros(3)}
    for mode in ("cumsum", "index"):
        out = sb.subspace_boost(tau, beta=0.01, mode=mode)
        np.testing.assert_array_equal(out["blk"]["kernel"], 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtype_in_equals_dtype_out(rng, dtype):
    tau = jax.tree_util.tree_map(lambda x: x.astype(dtype), vit_like_params(rng))
    out = sb.subspace_boost(tau, beta=0.02)
    jax.tree_util.tree_map(lambda a, b: (a.dtype == b.dtype) or pytest.fail(f"{a.dtype} != {b.dtype}"), out, tau)


def test_float64_when_enabled(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((7, 5)), jnp.float64)
        out = sb.subspace_boost({"m": {"kernel": x}}, beta=0.3)["m"]["kernel"]
        assert out.dtype == jnp.float64
        want = ref.boost_matrix(np.asarray(x).T, 0.3).T
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-10)


def test_second_call_does_not_recompile(rng):
    tau = vit_like_params(rng)
    tripled = jax.tree_util.tree_map(lambda x: 3 * x, tau)
    sb.subspace_boost(tau, beta=0.01)
    with count_traces() as traces:
        sb.subspace_boost(tripled, beta=0.01)
    assert not traces


@pytest.mark.slow
def test_batch_size_bounds_work_without_changing_results(rng):
    tau = vit_like_params(rng, layers=3)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        sb.subspace_boost(tau, beta=0.02, batch_size=2),
        sb.subspace_boost(tau, beta=0.02),
    )


@pytest.mark.parametrize("batch_size", [0, -3, 1.5, True, "2"])
def test_batch_size_must_be_a_positive_integer(batch_size):
    with pytest.raises(sb.SubboostError, match=r"subspace_boost: batch_size must be an integer in \[1, inf\]"):
        sb.subspace_boost(jnp.ones((2, 3, 3)), beta=0.01, batch_size=batch_size)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_beta_outside_unit_interval(beta):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        sb.subspace_boost(jnp.ones((3, 3)), beta=beta)


def test_unknown_mode_and_non_finite_input():
    with pytest.raises(ValueError, match="mode must be one of"):
        sb.subspace_boost(jnp.ones((3, 3)), beta=0.1, mode="sum")
    with pytest.raises(ValueError, match="'layer/kernel' contains NaN"):
        sb.subspace_boost({"layer": {"kernel": jnp.full((3, 3), jnp.nan)}}, beta=0.1)
