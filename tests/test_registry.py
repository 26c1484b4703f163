"""The merge-method registry: one record per method, read by merge, sharding and streaming."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost.merging import registry
from subboost.merging.consensus import consensus
from subboost.merging.dare import dare
from subboost.merging.ties import ties
from subboost.errors import SubboostError
from subboost.tree import leaves_with_paths, nest
from subboost.validation import check_real


@pytest.fixture
def tvs():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)}


@pytest.mark.parametrize(
    "method, kwargs, unknown",
    [
        ("dare", {"key": jax.random.key(0), "kk": 0.2}, "kk"),  # used to escape as a raw TypeError
        ("dare", {"key": jax.random.key(0), "k": 0.2}, "k"),  # TIES's k needs base="ties"
        ("consensus", {"merge": "sum"}, "merge"),
        ("consensus", {"ties_k": 0.3, "base": "ties"}, "ties_k"),  # the old name is refused, not ignored
        ("ties", {"p": 0.5}, "p"),
    ],
)
def test_unknown_arguments_are_refused_naming_them(tvs, method, kwargs, unknown):
    with pytest.raises(SubboostError, match=rf"{method}: unknown hyper-parameter\(s\) \['{unknown}'\]; valid ones"):
        sb.merge(tvs, method, **kwargs)


def test_valid_ones_follow_the_base():
    dare_ties = registry.method_record("dare").arguments({"base": "ties"})
    assert set(dare_ties) == {"key", "p", "base", "k", "merge", "scope"}
    assert set(registry.method_record("dare").arguments({})) == {"key", "p", "base"}
    assert "min_tasks" in registry.method_record("consensus").arguments({})
    assert "k" not in registry.method_record("consensus").arguments({})


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: ties(t, merge="median"), r"ties: merge must be one of \('mean', 'sum'\), got 'median'"),
        (lambda t: ties(t, scope="leaf"), r"ties: scope must be one of"),
        (lambda t: dare(t, key=jax.random.key(0), base="tsv"), r"dare: base must be one of"),
        (lambda t: consensus(t, base="tsv"), r"consensus: base must be one of"),
        (lambda t: consensus(t, mask_from="base"), r"consensus: mask_from must be one of"),
        (lambda t: sb.merge(t, "consensus", base="ties", k=1.5), r"consensus: k must be in \(0, 1\]"),
        (lambda t: sb.merge(t, "dare", key=jax.random.key(0), base="ties", merge="max"), r"dare: merge must be"),
        (lambda t: sb.merge(t, "nope"), r"unknown merge method 'nope'; known methods: weight_averaging"),
    ],
)
def test_bad_choices_are_subboost_errors_that_are_still_value_errors(tvs, call, match):
    with pytest.raises(SubboostError, match=match) as err:
        call(tvs)
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working


@pytest.mark.parametrize("fn", [ties, consensus])
def test_hyper_parameters_are_keyword_only(tvs, fn):
    with pytest.raises(TypeError):
        fn(tvs, 0.2)


def test_consensus_ties_uses_k_for_the_ties_fraction(tvs):
    got = sb.merge(tvs, "consensus", base="ties", k=0.3, min_tasks=1, lambdas=0.4)
    merged = ties(tvs, k=0.3)
    masks = [np.abs(np.asarray(tvs[n])) > 0.4 * np.abs(np.asarray(tvs[n]).sum(0)[None] - np.asarray(tvs[n]))
             for n in ("b", "w")]
    for name, mask in zip(("b", "w"), masks):
        want = np.where(mask.sum(0) >= 1, np.asarray(merged[name]), 0)
        np.testing.assert_array_equal(np.asarray(got[name]), want)
    assert not np.array_equal(np.asarray(got["w"]), np.asarray(sb.merge(tvs, "consensus", base="ties", k=0.9,
                                                                           min_tasks=1, lambdas=0.4)["w"]))


def test_every_record_is_consistent():
    for name, record in registry.METHODS.items():
        assert record.name == name
        assert set(record.arguments({})) <= set(registry.signature_arguments(record.fn)) | {"k", "merge", "scope"}
        assert record.streaming is not None  # every built-in method streams
    assert tuple(n for n, r in registry.METHODS.items() if r.matrix_kernel is not None) == ("tsv", "iso_c", "iso_cts", "wudi",
                                                                                     "star", "cart")
    assert registry.method_record("ties").streaming({"k": 0.3}) == registry.StreamingScheme(ties=(0.3, "mean", "global"))
    assert registry.method_record("dare").streaming({"key": 0, "p": 0.5}).drop_p == 0.5
    assert registry.method_record("consensus").streaming({}).local == "consensus"
    with pytest.raises(SubboostError, match="mask_from='merged' with base='ties' cannot be streamed"):
        registry.method_record("consensus").streaming({"base": "ties", "mask_from": "merged"})


def test_a_registered_method_is_merged_validated_and_streamable(tvs, tmp_path):
    def halve(tvs, *, scale: float = 0.5):
        return jax.tree_util.tree_map(lambda x: scale * jnp.sum(x, axis=0), tvs)

    def check(kwargs, num_tasks):
        check_real("scale", kwargs.get("scale", 0.5), what="halve", low=0.0)

    record = registry.MergeMethod("halve", halve, lambda kwargs: ("scale",), check=check)
    registry.register(record)
    try:
        np.testing.assert_allclose(sb.merge(tvs, "halve", scale=2.0)["w"], 2 * np.asarray(tvs["w"]).sum(0), rtol=1e-6)
        with pytest.raises(SubboostError, match="halve: scale must be"):
            sb.merge(tvs, "halve", scale=-1.0)
        with pytest.raises(SubboostError, match="no streaming scheme for method 'halve'"):
            sb.merge_from_checkpoints({"w": np.zeros((4, 5), np.float32)}, [tmp_path / "e.safetensors"],
                                      method="halve", out=tmp_path / "out", progress=False)
        sb.streaming.register_local_method("halve")
        assert registry.METHODS["halve"].streaming({"scale": 2.0}).local == "halve"
        assert dataclasses.replace(registry.METHODS["halve"], streaming=None).fn is halve
    finally:
        del registry.METHODS["halve"]
        registry.jitted.cache_clear()


def test_nest_inverts_leaves_with_paths():
    tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros(1)}}, "e": np.full(3, 2.0)}
    flat = dict(leaves_with_paths(tree))
    assert set(flat) == {"a/b", "a/c/d", "e"}
    back = nest(flat)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for path, x in leaves_with_paths(back):
        np.testing.assert_array_equal(x, flat[path])
