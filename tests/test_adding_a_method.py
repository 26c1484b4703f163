"""Adding a merge method: one function plus its registry record, and every entry point runs it.

The toy method (an elementwise median over the experts, scaled) is registered through the public path
`subboost.merging.register(MergeMethod(...))` only; `subboost.merge`, the mesh path, the streaming merge
and the demo's benchmark report then run it without any other change (CONTRIBUTING.md shows the same steps).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import sharding
from subboost.errors import SubboostError
from subboost.merging import METHODS, MergeMethod, register
from subboost.merging.keys import takes_key, with_seed_key
from subboost.merging.registry import jitted, local_scheme, signature_arguments
from subboost.validation import check_real

NAME = "toy_median"


def toy_median(tvs, *, scale: float = 1.0):
    """``scale * median_t tau_t``, elementwise over the expert axis."""
    return jax.tree_util.tree_map(lambda x: scale * jnp.median(x, axis=0), tvs)


def check_toy_median(kwargs, num_tasks):
    check_real("scale", kwargs.get("scale", 1.0), what=NAME, low=0.0, low_open=True)


RECORD = MergeMethod(
    name=NAME,
    fn=toy_median,
    arguments=lambda kwargs: signature_arguments(toy_median),
    check=check_toy_median,
    streaming=local_scheme(NAME),  # elementwise: each chunk of parameters merges on its own, exactly
)


@pytest.fixture
def registered():
    register(RECORD)
    yield RECORD
    del METHODS[NAME]
    jitted.cache_clear()  # the compiled programs of the removed record


@pytest.fixture
def tvs():
    rng = np.random.default_rng(0)
    return {"block": {"kernel": jnp.asarray(rng.standard_normal((3, 6, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)}}


def expected(tvs, scale):
    return jax.tree_util.tree_map(lambda x: scale * np.median(np.asarray(x), axis=0), tvs)


def assert_close(got, want):
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6), got, want)


def test_a_registered_method_runs_through_merge_and_its_checks(registered, tvs):
    assert NAME in sb.available_methods()
    got = sb.merge(tvs, NAME, scale=0.5)
    assert_close(got, expected(tvs, 0.5))
    with pytest.raises(SubboostError, match=rf"{NAME}: scale must be in \(0, inf\)"):
        sb.merge(tvs, NAME, scale=-1.0)
    with pytest.raises(SubboostError, match=rf"{NAME}: unknown hyper-parameter\(s\) \['k'\]"):
        sb.merge(tvs, NAME, k=0.2)


def test_a_registered_method_runs_on_a_mesh(registered, tvs):
    mesh = sharding.make_mesh(jax.devices()[:1])
    got = sb.merge(tvs, NAME, mesh=mesh, scale=2.0)
    assert_close(got, expected(tvs, 2.0))
    assert got["block"]["kernel"].sharding.is_fully_replicated


def test_a_registered_method_streams_from_checkpoints(registered, tvs, tmp_path):
    from subboost.checkpoints import save_params

    base = jax.tree_util.tree_map(lambda x: jnp.full(x.shape[1:], 0.25, x.dtype), tvs)
    experts = []
    for t in range(3):
        experts.append(tmp_path / f"expert_{t}")
        save_params(jax.tree_util.tree_map(lambda b, x, t=t: b + x[t], base, tvs), experts[-1])
    out = tmp_path / "merged"
    sb.merge_from_checkpoints(base, experts, method=NAME, scale=2.0, alpha=0.5, out=out, progress=False)
    merged = sb.load_params(out, as_numpy=True)
    want = jax.tree_util.tree_map(lambda b, e: np.asarray(b) + 0.5 * e, base, expected(tvs, 2.0))
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), merged, want)
    without_scheme = dataclasses.replace(RECORD, streaming=None)
    register(without_scheme)
    with pytest.raises(SubboostError, match=f"no streaming scheme for method '{NAME}'"):
        sb.merge_from_checkpoints(base, experts, method=NAME, out=tmp_path / "again", progress=False)


def test_a_randomised_method_gets_its_key_from_the_seed_without_being_named():
    def noisy_mean(tvs, *, key, noise: float = 0.1):
        leaves, treedef = jax.tree_util.tree_flatten(tvs)
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten([jnp.mean(x, 0) + noise * jax.random.normal(k, x.shape[1:], x.dtype)
                                  for k, x in zip(keys, leaves)])

    register(MergeMethod("noisy_mean", noisy_mean, lambda kwargs: signature_arguments(noisy_mean)))
    try:
        kwargs = with_seed_key("noisy_mean", {"noise": 0.5}, seed=3)
        assert set(kwargs) == {"key", "noise"}
        np.testing.assert_array_equal(jax.random.key_data(kwargs["key"]), jax.random.key_data(jax.random.key(3)))
        given = jax.random.key(7)
        assert with_seed_key("noisy_mean", {"key": given}, seed=3)["key"] is given  # an explicit key wins
        assert with_seed_key("ties", {"k": 0.2}, seed=3) == {"k": 0.2}
        assert takes_key("dare") and not takes_key("task_arithmetic")
        tvs = {"w": jnp.zeros((2, 3), jnp.float32)}
        first, again = (sb.merge(tvs, "noisy_mean", **with_seed_key("noisy_mean", {}, seed=s))["w"] for s in (1, 1))
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, sb.merge(tvs, "noisy_mean", **with_seed_key("noisy_mean", {}, seed=2))["w"])
    finally:
        del METHODS["noisy_mean"]
        jitted.cache_clear()


@pytest.mark.slow
def test_a_registered_method_runs_through_the_demo_and_its_report(registered, tiny_bench_cache, tmp_path):
    from subboost.bench.pipeline import run_benchmark
    from subboost.bench.suites.vision import get_config

    # The tiny demo with the toy method only, at its smallest task count, from the shared cached models.
    config = dataclasses.replace(get_config("tiny"), methods=(NAME,), task_counts=(4,), sweep_methods=(NAME,))
    results = run_benchmark(config, seed=0, out_dir=tmp_path / "demo", cache_dir=tiny_bench_cache, progress=False,
                            log=lambda _: None)
    entry = results["settings"][0]["methods"][NAME]
    assert entry["status"] == "ok"
    assert 0.0 < entry["plain"]["absolute"] <= 1.0 and 0.0 < entry["boosted"]["absolute"] <= 1.0
    assert set(results["boost_sweep"]["methods"]) == {NAME}
    report = (tmp_path / "demo" / "results.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(f"| {NAME}")]
    assert f"| {NAME} + boost |" in report and len(rows) >= 3  # accuracy table (plain, boosted), choices, ...
