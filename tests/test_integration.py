"""Merging flax.nnx states and scan-stacked trees, as training code holds them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import subboost as sb
from experiments import integrate_training_code as example
from tests import numpy_reference as ref


@pytest.mark.slow
def test_nnx_state_paths_read_like_linen():
    _, state = nnx.split(example.Block(8, rngs=nnx.Rngs(0)), nnx.Param)
    ranks = sb.stable_rank(state)
    assert set(ranks) == {"attn/query", "attn/key", "attn/value", "attn/out", "mlp"}


@pytest.mark.slow
def test_nnx_merge_equals_merge_of_plain_dicts():
    graphdef, state = nnx.split(example.Block(8, rngs=nnx.Rngs(0)), nnx.Param)
    experts = [example.finetune_like(state, s) for s in range(3)]
    tau_state = sb.subspace_boost(sb.merge(sb.task_vectors(state, experts), "ties"), beta=0.02)
    pure = nnx.to_pure_dict
    tau_dict = sb.subspace_boost(sb.merge(sb.task_vectors(pure(state), [pure(e) for e in experts]), "ties"), beta=0.02)
    for (path, a), (_, b) in zip(sb.tree.leaves_with_paths(tau_state), sb.tree.leaves_with_paths(tau_dict)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=path)
    model = nnx.merge(graphdef, sb.apply_task_vector(state, tau_state, alpha=0.5))
    np.testing.assert_allclose(model.mlp.kernel[...], state["mlp"]["kernel"][...] + 0.5 * tau_dict["mlp"]["kernel"], rtol=1e-6)


@pytest.mark.slow
def test_scan_stacked_layers_boost_like_separate_layers():
    merged = example.merge_scan_stacked(num_layers=3, num_experts=2)
    assert merged["encoder"]["mlp"]["kernel"].shape == (3, 16, 64)
    tau = {"mlp": {"kernel": jax.random.normal(jax.random.key(0), (3, 16, 64))}}
    boosted = sb.subspace_boost(tau, beta=0.05, is_matrix=sb.matrix_predicate(layer_axes=1))["mlp"]["kernel"]
    for layer in range(3):
        want = ref.boost_matrix(np.asarray(tau["mlp"]["kernel"][layer]).T, 0.05).T
        np.testing.assert_allclose(boosted[layer], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "method, kwargs",
    [("ties", {"k": 0.2}), ("tsv", {}), ("iso_cts", {}), ("dare", {"key": jax.random.key(0)})],
)
@pytest.mark.slow
def test_merge_and_boost_inside_a_callers_jit(method, kwargs):
    """Training code calls subboost from its own jit: same result as eager (validation skipped while tracing)."""
    rng = np.random.default_rng(0)
    tvs = {
        "block": {"kernel": jnp.asarray(rng.standard_normal((3, 8, 12)), jnp.float32)},
        "bias": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
    }
    eager = sb.subspace_boost(sb.merge(tvs, method, **kwargs), beta=0.05)
    jitted = jax.jit(lambda t: sb.subspace_boost(sb.merge(t, method, **kwargs), beta=0.05))(tvs)
    chex.assert_trees_all_close(jitted, eager, atol=1e-6)
    boosted_spectrum = sb.spectra(jitted["block"]["kernel"])
    assert float(boosted_spectrum[-1]) > 0.0  # boosting lifted the smallest singular value
