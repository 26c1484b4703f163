"""Compile once (issue 17): smaller merge programs give the same bits; a warm persistent cache compiles nothing.

No timings are asserted here: speed is measured by `experiments/bench_compile.py`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import compilation
from subboost.merging import METHODS, flat, padding
from tests.tracing import count_traces
from tests.trees import vit_like_params

dare_module = importlib.import_module("subboost.merging.dare")

SHAPES = {"a": {"w": (6, 5), "b": (5,)}, "c": [(3, 4, 2), (6, 5), ()], "d": (7,)}


def random_tvs(num_tasks: int, seed: int, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)

    def leaf(shape):
        x = rng.normal(size=(num_tasks,) + shape)
        x[rng.random(x.shape) < 0.2] = 0.0  # exact zeros: sign-election ties, TALL ties
        x[..., ::3] = np.round(x[..., ::3], 1)  # repeated magnitudes: threshold ties
        return jnp.asarray(x.astype(dtype))

    return jax.tree_util.tree_map(leaf, SHAPES, is_leaf=lambda s: isinstance(s, tuple))


CASES = [
    ("weight_averaging", {}),
    ("task_arithmetic", {}),
    ("ties", {"k": 0.2}),
    ("ties", {"k": 0.5, "merge": "sum"}),
    ("consensus", {"min_tasks": 2, "lambdas": 0.4}),
    ("dare", {"key": jax.random.key(1), "p": 0.5}),
    ("dare", {"key": jax.random.key(2), "p": 0.3, "base": "ties", "k": 0.4}),
    ("consensus", {"min_tasks": 1, "lambdas": 0.3, "base": "ties", "k": 0.3, "mask_from": "merged", "merge": "sum"}),
]


def flat_program(method, kwargs):
    """The method's flat program (for the methods that never run flat: `flat.flat_merge` of it, which must agree)."""
    record = METHODS[method]
    if record.flat_fn is not None:
        return jax.jit(lambda t: record.flat_fn(t, **kwargs))
    return jax.jit(lambda t: flat.flat_merge(record.fn, t, **kwargs))


def assert_trees_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64))


@pytest.mark.parametrize("num_tasks", [1, 5])
@pytest.mark.parametrize("method,kwargs", CASES)
def test_flat_merge_is_the_per_leaf_merge_bit_for_bit(method, kwargs, num_tasks):
    if method == "consensus" and kwargs["min_tasks"] > num_tasks:
        pytest.skip("consensus min_tasks > T")
    tvs = random_tvs(num_tasks, seed=num_tasks)
    runs_ties = method == "ties" or kwargs.get("base") == "ties"
    assert flat.can_flatten(METHODS[method], tvs, kwargs) == runs_ties  # flat where it pays
    per_leaf = jax.jit(lambda t: METHODS[method].fn(t, **kwargs))(tvs)  # the program merge() compiled before
    flattened = flat_program(method, kwargs)(tvs)
    assert_trees_equal(flattened, per_leaf)
    assert_trees_equal(sb.merge(tvs, method, **kwargs), per_leaf)


@pytest.mark.slow
def test_flat_merge_in_bfloat16_is_the_per_leaf_merge():
    tvs = random_tvs(4, seed=7, dtype=jnp.bfloat16)
    for method, kwargs in CASES[2:]:
        per_leaf = jax.jit(lambda t: METHODS[method].fn(t, **kwargs))(tvs)
        assert_trees_equal(flat_program(method, kwargs)(tvs), per_leaf)


def test_per_leaf_scope_mixed_dtypes_large_trees_and_light_methods_keep_the_per_leaf_program(monkeypatch):
    tvs = random_tvs(3, seed=1)
    assert not flat.can_flatten(METHODS["ties"], tvs, {"scope": "per_leaf"})
    assert not flat.can_flatten(METHODS["consensus"], tvs, {"base": "ties", "scope": "per_leaf"})
    assert not flat.can_flatten(METHODS["dare"], tvs, {"base": "ties", "scope": "per_leaf"})
    assert not flat.can_flatten(METHODS["tsv"], tvs, {})
    for light in ("weight_averaging", "task_arithmetic", "consensus", "dare"):  # no TIES inside
        assert not flat.can_flatten(METHODS[light], tvs, {"key": None} if light == "dare" else {})
    mixed = {**tvs, "d": tvs["d"].astype(jnp.bfloat16)}
    assert not flat.can_flatten(METHODS["ties"], mixed, {})
    assert flat.can_flatten(METHODS["ties"], tvs, {})
    monkeypatch.setattr(flat, "FLATTEN_MAX_BYTES", 16)
    assert not flat.can_flatten(METHODS["ties"], tvs, {})


def old_drop_and_rescale(tvs, *, key, p):
    """DARE's drop as it was written before issue 17: one Bernoulli draw per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(tvs)
    keys = jax.random.split(key, len(leaves))
    out = [jnp.where(jax.random.bernoulli(k, 1.0 - p, x.shape), x / jnp.asarray(1.0 - p, x.dtype),
                     jnp.zeros_like(x)).astype(x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.slow
@pytest.mark.parametrize("num_tasks", [1, 4])
def test_dare_masks_drawn_at_once_are_the_per_leaf_masks(num_tasks):
    tvs = random_tvs(num_tasks, seed=3)
    for key, p in ((jax.random.key(0), 0.9), (jax.random.PRNGKey(5), 0.3)):  # typed and raw uint32 keys
        want = old_drop_and_rescale(tvs, key=key, p=p)
        assert_trees_equal(jax.jit(lambda t, k: dare_module.drop_and_rescale(t, key=k, p=p))(tvs, key), want)
        assert_trees_equal(sb.merge(tvs, "dare", key=key, p=p),
                           jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), want))


@pytest.mark.slow
def test_dare_masks_grouped_by_shape_are_the_per_leaf_masks(monkeypatch):
    monkeypatch.setattr(dare_module, "ONE_DRAW_MAX_ENTRIES", 0)  # the path for large trees
    tvs = random_tvs(3, seed=4)
    key = jax.random.key(9)
    want = old_drop_and_rescale(tvs, key=key, p=0.6)
    assert_trees_equal(jax.jit(lambda t, k: dare_module.drop_and_rescale(t, key=k, p=0.6))(tvs, key), want)


# ----------------------------------------------------------------------------
# Padding the task axis to buckets
# ----------------------------------------------------------------------------
PADDED = [
    ("task_arithmetic", {}),
    ("ties", {"k": 0.2}),
    ("ties", {"k": 0.5, "merge": "sum", "scope": "per_leaf"}),
    ("dare", {"p": 0.5, "key": jax.random.key(3)}),
    ("dare", {"p": 0.3, "key": jax.random.key(4), "base": "ties", "k": 0.4}),
    ("consensus", {"min_tasks": 1, "lambdas": 0.3}),
    ("consensus", {"min_tasks": 2, "lambdas": 0.5, "base": "ties", "k": 0.3, "mask_from": "merged"}),
    ("magmax", {}),
]


@pytest.mark.parametrize("num_tasks", [1, 3, 17])
@pytest.mark.parametrize("method,kwargs", PADDED)
def test_merges_padded_with_zero_task_vectors_are_the_unpadded_merges_bit_for_bit(method, kwargs, num_tasks):
    if kwargs.get("min_tasks", 1) > num_tasks:
        pytest.skip("consensus min_tasks > T")
    tvs = random_tvs(num_tasks, seed=20 + num_tasks)
    assert padding.can_pad(METHODS[method], tvs, kwargs)
    padded = padding.pad_task_axis(tvs, padding.padded_task_count(num_tasks))
    assert {x.shape[0] for x in jax.tree_util.tree_leaves(padded)} == {16 if num_tasks <= 16 else 32}
    unpadded = jax.jit(lambda t: METHODS[method].fn(t, **kwargs))(tvs)
    assert_trees_equal(sb.merge(tvs, method, **kwargs), unpadded)


def test_task_counts_in_one_bucket_share_one_program():
    sb.merge(random_tvs(3, seed=30), "ties", k=0.3)
    inputs = [random_tvs(num_tasks, seed=30 + num_tasks) for num_tasks in (2, 5, 9, 16)]
    with count_traces() as traces:
        for tvs in inputs:
            sb.merge(tvs, "ties", k=0.3)
    assert traces == []


def test_methods_where_zeros_are_not_exact_padding_are_never_padded(monkeypatch):
    tvs = random_tvs(3, seed=5)
    for method in ("weight_averaging", "tsv", "iso_c", "iso_cts", "model_stock", "wudi", "star", "cart"):
        assert not padding.can_pad(METHODS[method], tvs, {})
    assert not padding.can_pad(METHODS["consensus"], tvs, {"lambdas": [0.3, 0.4, 0.5]})  # one lambda per task
    assert not padding.can_pad(METHODS["ties"], random_tvs(16, seed=5), {})  # already a bucket
    legacy = {"p": 0.5, "key": jax.random.PRNGKey(0)}
    assert padding.can_pad(METHODS["dare"], tvs, legacy)
    with jax.threefry_partitionable(False):  # the rows' masks would depend on T
        assert not padding.can_pad(METHODS["dare"], tvs, legacy)
    monkeypatch.setattr(padding, "PAD_MAX_BYTES", 16)
    assert not padding.can_pad(METHODS["ties"], tvs, {})


# ----------------------------------------------------------------------------
# Boosting with beta as a traced argument
# ----------------------------------------------------------------------------
SWEEP = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@pytest.mark.parametrize("kwargs", [{"batch_size": None}, {"rank_rtol": 1e-3, "batch_size": 2}])
def test_boosting_with_a_traced_beta_is_the_static_program_bit_for_bit(kwargs):
    from subboost import boosting

    tau = jax.tree_util.tree_map(jnp.asarray, vit_like_params(np.random.default_rng(11)))
    assert boosting.beta_can_be_traced(tau, mode="cumsum", solver="svd", attn_beta=None)
    for beta in (0.0, 0.05, 0.5):  # a flat spectrum, a middle cutoff, a late one (each a static compile)
        static = boosting._boost_tree(tau, beta=beta, mode="cumsum", attention="per_qkv", is_matrix=None,
                                      solver="svd", **kwargs)
        assert_trees_equal(sb.subspace_boost(tau, beta=beta, **kwargs), static)


def test_a_beta_sweep_compiles_one_boosting_program():
    tau = jax.tree_util.tree_map(jnp.asarray, vit_like_params(np.random.default_rng(12)))
    sb.subspace_boost(tau, beta=0.3)  # compiles the program (and validation's)
    with count_traces() as traces:
        for beta in SWEEP:
            sb.subspace_boost(tau, beta=beta)
    assert traces == []


def test_beta_stays_static_where_it_sizes_or_picks_code():
    from subboost import boosting

    tau = {"w": jnp.ones((4, 3), jnp.float32)}
    assert not boosting.beta_can_be_traced(tau, mode="index", solver="svd", attn_beta=None)
    assert not boosting.beta_can_be_traced(tau, mode="cumsum", solver="polar", attn_beta=None)
    assert not boosting.beta_can_be_traced(tau, mode="cumsum", solver="svd", attn_beta=0.1)
    assert not boosting.beta_can_be_traced({"w": tau["w"].astype(jnp.bfloat16)}, mode="cumsum", solver="svd",
                                           attn_beta=None)


@pytest.mark.parametrize("host_limit", [None, 0])  # numpy on the host; the compiled reduction
def test_finiteness_check_names_the_same_leaf_either_way_and_small_host_trees_compile_nothing(host_limit, monkeypatch):
    task_vectors = importlib.import_module("subboost.task_vectors")

    if host_limit is not None:
        monkeypatch.setattr(task_vectors, "HOST_CHECK_MAX_BYTES", host_limit)
    tvs = random_tvs(3, seed=13)
    with count_traces() as traces:
        task_vectors.check_finite(tvs)
    assert (traces == []) == (host_limit is None)
    for bad in (np.nan, np.inf, -np.inf):
        broken = {**tvs, "c": [tvs["c"][0], tvs["c"][1].at[2, 1, 0].set(bad), tvs["c"][2]]}
        with pytest.raises(sb.SubboostError, match="'c/1' contains NaN or infinite"):
            task_vectors.check_finite(broken, what="task vectors")


# ----------------------------------------------------------------------------
# The persistent compilation cache
# ----------------------------------------------------------------------------
def test_cache_directory_from_flag_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.resolve_cache_dir(environ={}) == tmp_path / "xdg" / "subboost" / "jax"
    assert compilation.resolve_cache_dir(environ={"SUBBOOST_COMPILE_CACHE": "1"}) == tmp_path / "xdg" / "subboost" / "jax"
    for off in ("0", "off", "False", "no"):
        assert compilation.resolve_cache_dir(environ={"SUBBOOST_COMPILE_CACHE": off}) is None
    assert compilation.resolve_cache_dir(environ={"SUBBOOST_COMPILE_CACHE": str(tmp_path / "c")}) == tmp_path / "c"
    assert compilation.resolve_cache_dir(enabled=False, environ={"SUBBOOST_COMPILE_CACHE": str(tmp_path)}) is None


@pytest.mark.slow
def test_importing_subboost_leaves_jax_config_alone():
    code = "import jax, subboost, subboost.cli; print(jax.config.jax_compilation_cache_dir)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


# A tiny merge in a fresh process through the command line's cache set-up; prints the
# persistent cache's counters (compile requests that may use the cache, hits among them).
CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax import monitoring
    from subboost.compilation import setup_cli_compile_cache
    import subboost as sb

    events = {}
    monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
    directory = setup_cli_compile_cache(enabled=sys.argv[1] == "on")
    rng = np.random.default_rng(0)
    tvs = {"w": jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
    out = [sb.merge(tvs, "ties", k=0.3), sb.merge(tvs, "task_arithmetic"), sb.merge(tvs, "dare", key=jax.random.key(0))]
    jax.block_until_ready(out)
    print(json.dumps({"dir": str(directory), "requests": events.get("/jax/compilation_cache/compile_requests_use_cache", 0),
                      "hits": events.get("/jax/compilation_cache/cache_hits", 0),
                      "ties": np.asarray(out[0]["w"]).tolist()}))
""")


def run_child(tmp_path, env_cache: str, flag: str = "on") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(SUBBOOST_COMPILE_CACHE=env_cache, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", CHILD, flag], env=env, capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_with_a_warm_cache_compiles_nothing_new(tmp_path):
    cache = tmp_path / "jax-cache"
    cold = run_child(tmp_path, str(cache))
    assert cold["dir"] == str(cache) and cold["requests"] > 0 and cold["hits"] == 0
    assert any(cache.iterdir())  # small, fast programs are written too
    warm = run_child(tmp_path, str(cache))
    assert warm["requests"] == cold["requests"] and warm["hits"] == warm["requests"]  # every program from disk
    assert warm["ties"] == cold["ties"]
    off = run_child(tmp_path, "0")  # SUBBOOST_COMPILE_CACHE=0
    assert off["dir"] == "None" and off["hits"] == 0
    flag_off = run_child(tmp_path, str(cache), flag="off")  # --no-compile-cache wins over the variable
    assert flag_off["dir"] == "None" and flag_off["hits"] == 0


def test_cli_turns_the_cache_on_unless_told_not_to(tmp_path, monkeypatch):
    from subboost import cli

    calls = []
    monkeypatch.setattr(compilation, "setup_cli_compile_cache", lambda *, enabled: calls.append(enabled))
    bad_seed = ["demo", "--size", "tiny", "--seed", "-1", "--out", str(tmp_path / "out")]  # fails before any work
    assert cli.main(bad_seed) == 2
    assert cli.main(["--no-compile-cache", *bad_seed]) == 2
    assert calls == [True, False]
