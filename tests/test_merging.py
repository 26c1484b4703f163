"""Base merge methods: known answers, numpy cross-checks, jit behaviour, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from tests.tracing import count_traces
from tests import numpy_reference as ref


def _flat_np(tree):
    return ref.flat(jax.tree_util.tree_map(np.asarray, tree))


def _split_tvs(tvs):
    num = jax.tree_util.tree_leaves(tvs)[0].shape[0]
    return [_flat_np(jax.tree_util.tree_map(lambda x: x[t], tvs)) for t in range(num)]


# --- known answers -----------------------------------------------------------
def test_linear_merges_known_answer():
    tvs = {"w": jnp.array([[1.0, 2.0], [3.0, -1.0]])}
    np.testing.assert_allclose(sb.merge(tvs, "task_arithmetic")["w"], [4.0, 1.0])
    np.testing.assert_allclose(sb.merge(tvs, "weight_averaging")["w"], [2.0, 0.5])


@pytest.mark.parametrize("merge_mode, expected", [("mean", [4, 1, 2, 2, 2]), ("sum", [4, 1, 2, 2, 4])])
def test_ties_known_answer(merge_mode, expected):
    # k = 0.6 of N = 5 keeps |x| >= 2nd smallest magnitude (= 1 in both tasks):
    # trimmed: [4, -1, 0, 2, 3] and [-3, 1, 2, 0, 1]; sum [1, 0, 2, 2, 4]; the
    # zero takes the majority sign +; agreeing entries are averaged or summed.
    tvs = {"w": jnp.array([[4.0, -1.0, 0.5, 2.0, 3.0], [-3.0, 1.0, 2.0, 0.1, 1.0]])}
    np.testing.assert_allclose(sb.merge(tvs, "ties", k=0.6, merge=merge_mode)["w"], expected)


def test_ties_trims_globally_by_default():
    # k = 0.4 of N = 6 entries: the global threshold is the 4th smallest magnitude
    # (10), so the leaf of small entries is trimmed away entirely; per leaf, the
    # small leaf keeps |x| >= its 2nd smallest (0.2).
    tvs = {"big": jnp.array([[10.0, 20.0, 30.0]]), "small": jnp.array([[0.1, 0.2, 0.3]])}
    global_ = sb.merge(tvs, "ties", k=0.4)
    per_leaf = sb.merge(tvs, "ties", k=0.4, scope="per_leaf")
    np.testing.assert_allclose(global_["small"], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(global_["big"], [10.0, 20.0, 30.0])
    np.testing.assert_allclose(per_leaf["small"], [0.0, 0.2, 0.3])


def test_ties_keeps_entries_tied_with_the_threshold():
    tvs = {"w": jnp.array([[1.0, 1.0, 1.0, 0.5]])}
    np.testing.assert_allclose(sb.merge(tvs, "ties", k=0.25)["w"], [1.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("min_tasks, expected", [(2, [2.0, 0.0]), (1, [2.0, -1.9])])
def test_consensus_known_answer(min_tasks, expected):
    # tau_MTL = [2, -1.9]; lambda = 0.5: task 0 keeps entry 0 only, task 1 both.
    tvs = {"w": jnp.array([[1.0, 0.1], [1.0, -2.0]])}
    np.testing.assert_allclose(sb.merge(tvs, "consensus", lambdas=0.5, min_tasks=min_tasks)["w"], expected, rtol=1e-6)


@pytest.mark.slow
def test_dare_drop_zero_is_task_arithmetic_and_rescales(experts):
    base, finetuned = experts
    tvs = sb.task_vectors(base, finetuned)
    key = jax.random.key(3)
    no_drop = sb.merge(tvs, "dare", key=key, p=0.0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), no_drop, sb.merge(tvs))
    x = {"w": jnp.ones((1, 20000))}
    dropped = np.asarray(sb.merge(x, "dare", key=key, p=0.75)["w"])
    assert set(np.unique(dropped)) == {0.0, 4.0}
    assert abs((dropped > 0).mean() - 0.25) < 0.02
    again = np.asarray(sb.merge(x, "dare", key=key, p=0.75)["w"])
    np.testing.assert_array_equal(dropped, again)


# --- random inputs against numpy ---------------------------------------------
@pytest.mark.parametrize(
    "method, kwargs, reference",
    [
        ("task_arithmetic", {}, lambda tvs: ref.ta(tvs)),
        ("weight_averaging", {}, lambda tvs: {k: v / len(tvs) for k, v in ref.ta(tvs).items()}),
        ("ties", {"k": 0.2}, lambda tvs: ref.ties(tvs, 0.2)),
        ("ties", {"k": 0.5, "merge": "sum"}, lambda tvs: ref.ties(tvs, 0.5, "sum")),
        ("consensus", {"lambdas": 0.3, "min_tasks": 2}, lambda tvs: ref.consensus(tvs, 0.3, 2)),
        ("consensus", {"lambdas": (0.2, 0.4, 0.5, 0.6), "min_tasks": 3}, lambda tvs: ref.consensus(tvs, (0.2, 0.4, 0.5, 0.6), 3)),
        (
            "consensus",
            {"base": "ties", "lambdas": 0.4, "k": 0.3},
            lambda tvs: ref.consensus(tvs, 0.4, 2, base_merged=ref.ties(tvs, 0.3)),
        ),
    ],
)
def test_methods_match_numpy_on_random_experts(experts, method, kwargs, reference):
    base, finetuned = experts
    tvs = sb.task_vectors(base, finetuned)
    got = _flat_np(sb.merge(tvs, method, **kwargs))
    want = reference(_split_tvs(tvs))
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


# --- jit, dtypes --------------------------------------------------------------
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "consensus"])
def test_second_call_does_not_recompile(experts, method):
    base, finetuned = experts
    tvs = sb.task_vectors(base, finetuned)
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, tvs)
    fewer = jax.tree_util.tree_map(lambda x: x[1:], tvs)
    more = jax.tree_util.tree_map(lambda x: jnp.concatenate([x] * 5), tvs)  # 20 experts
    sb.merge(tvs, method)
    with count_traces() as second:
        sb.merge(doubled, method)
    assert not second
    with count_traces() as fewer_tasks:  # 3 and 4 experts are padded to one bucket (subboost.merging.padding)
        sb.merge(fewer, method)
    assert not fewer_tasks
    with count_traces() as next_bucket:  # the counter sees a new program: 20 experts, the next bucket
        sb.merge(more, method)
    assert next_bucket


@pytest.mark.parametrize("method", ["weight_averaging", "task_arithmetic", "ties", "consensus"])
def test_dtype_in_equals_dtype_out(method):
    tvs = {"a": jnp.asarray(np.random.default_rng(1).normal(size=(3, 6, 4)), jnp.bfloat16)}
    assert sb.merge(tvs, method)["a"].dtype == jnp.bfloat16


def test_float64_when_enabled():
    with jax.enable_x64(True):
        tvs = {"a": jnp.asarray(np.random.default_rng(2).normal(size=(3, 50)), jnp.float64)}
        out = sb.merge(tvs, "ties", k=0.3)["a"]
        assert out.dtype == jnp.float64
        want = ref.ties([{"a": np.asarray(tvs["a"][t])} for t in range(3)], 0.3)["a"]
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-12)


# --- bad input ------------------------------------------------------------------
def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="unknown merge method 'tie'.*ties.*consensus"):
        sb.merge({"w": jnp.ones((2, 3))}, "tie")


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        ("ties", {"k": 0.0}, r"k must be in \(0, 1\]"),
        ("ties", {"k": 1.5}, r"k must be in \(0, 1\]"),
        ("ties", {"top": 3}, "unknown hyper-parameter"),
        ("dare", {}, "explicit PRNG key"),
        ("dare", {"key": jax.random.key(0), "p": 1.0}, r"p must be in \[0, 1\)"),
        ("consensus", {"min_tasks": 5}, r"min_tasks must be an integer in \[1, 3\]"),
        ("consensus", {"lambdas": (0.1, 0.2)}, "2 lambdas for 3 tasks"),
    ],
)
def test_bad_hyper_parameters(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sb.merge({"w": jnp.ones((3, 4))}, method, **kwargs)


def test_non_finite_task_vector_names_path():
    tvs = {"enc": {"w": jnp.ones((2, 3)).at[1, 2].set(jnp.inf)}, "b": jnp.ones((2,))}
    with pytest.raises(ValueError, match="'enc/w' contains NaN or infinite"):
        sb.merge(tvs, "ties")


def test_inconsistent_expert_axis():
    with pytest.raises(ValueError, match="leading expert axis"):
        sb.merge({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}, "task_arithmetic")
