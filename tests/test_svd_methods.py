"""TSV-M, Iso-C, Iso-CTS: known answers, numpy cross-checks, orientation, composition, errors."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import merging
from subboost.merging.iso import iso_cts_matrices, iso_cts_sizes
from subboost.merging.tsv import tsv_factors
from subboost.tree import nest
from tests import numpy_reference as ref
from tests import numpy_reference_svd as ref_svd
from tests.conftest import vit_like_params
from tests.tracing import count_traces

SVD_METHODS = [("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("iso_cts", {"common_space_fraction": 0.5})]
# Tiny ViT: attention 12x12, c_fc (out, in) = (24, 12), c_proj (12, 24); with T = 3
# every method keeps >= 1 direction per task under every attention mode.
SHAPE = {"width": 12, "heads": 2, "mlp": 24, "layers": 1}
NUM_TASKS = 3


def _stack(split: list[dict], dtype) -> dict:
    return nest({k: jnp.asarray(np.stack([t[k] for t in split]), dtype) for k in split[0]})


def _split(tvs) -> list[dict]:
    flat = ref.flat(jax.tree_util.tree_map(np.asarray, tvs))
    return [{k: v[t] for k, v in flat.items()} for t in range(next(iter(flat.values())).shape[0])]


def _ref_kwargs(kwargs: dict) -> dict:
    return {"fraction": kwargs["common_space_fraction"]} if "common_space_fraction" in kwargs else {}


def _orthonormal(rng, m, k):
    q, _ = np.linalg.qr(rng.standard_normal((m, k)))
    return q


def _generic_matrices(rng, m, n, num_tasks, method, kwargs):
    """Independent random tasks with geometric spectra (s_i = 0.5^i)."""
    s = min(m, n)
    spectrum = np.diag(0.5 ** np.arange(s))
    return [_orthonormal(rng, m, s) @ spectrum @ _orthonormal(rng, n, s).T for _ in range(num_tasks)]


def _common_plus_specific_matrices(rng, m, n, num_tasks, method, kwargs):
    """Iso-CTS's model: a strong shared part on c directions, p task-specific
    directions per task in mutually orthogonal blocks, weak generic noise."""
    fraction = kwargs.get("common_space_fraction", 0.8)
    c, p = iso_cts_sizes(m, n, num_tasks, fraction)
    s = min(m, n)
    left, right = _orthonormal(rng, m, m), _orthonormal(rng, n, n)
    common = left[:, :c] @ np.diag(2 + 2 * 0.8 ** np.arange(c)) @ right[:, :c].T
    mats = []
    for t in range(num_tasks):
        block = slice(c + t * p, c + (t + 1) * p)
        specific = left[:, block] @ np.diag(1.5 * 0.6 ** np.arange(p)) @ right[:, block].T
        noise = _orthonormal(rng, m, s) @ np.diag(0.1 * 0.5 ** np.arange(s)) @ _orthonormal(rng, n, s).T
        mats.append(common + specific + noise)
    return mats


def _random_task_vectors(seed: int, method: str, kwargs: dict, dtype=np.float32) -> list[dict]:
    """Per-task flat trees shaped like the tiny ViT, rounded to ``dtype``."""
    rng = np.random.default_rng(seed)
    template = ref.flat(vit_like_params(rng, **SHAPE))
    make = _common_plus_specific_matrices if method == "iso_cts" else _generic_matrices
    split: list[dict] = [{} for _ in range(NUM_TASKS)]
    for path, x in template.items():
        if ref.is_default_matrix(path, x.shape):
            m, n = ref.torch_matrix(path, x).shape
            for t, mat in enumerate(make(rng, m, n, NUM_TASKS, method, kwargs)):
                split[t][path] = ref.from_torch_matrix(path, mat, x.shape)
        else:
            for t in range(NUM_TASKS):
                split[t][path] = rng.standard_normal(x.shape)
    return [{k: v.astype(dtype).astype(np.float64) for k, v in t.items()} for t in split]


def _assert_close_relative(got: dict, want: dict, rtol: float) -> None:
    """|got - want| <= rtol * max|want|, leaf by leaf."""
    assert got.keys() == want.keys()
    for key in want:
        scale = max(np.abs(want[key]).max(), 1e-30)
        err = np.abs(np.asarray(got[key], np.float64) - want[key]).max() / scale
        assert err <= rtol, f"{key}: relative error {err:.2e} > {rtol:.0e}"


def _svals(x) -> np.ndarray:
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


# --- known answers -----------------------------------------------------------------
def test_iso_c_spectrum_is_flat_at_the_mean_of_the_sums(rng):
    kernels = jnp.asarray(rng.standard_normal((4, 3, 9, 7)), jnp.float32)  # (T, layers, in, out)
    tvs = {"scan": {"kernel": kernels}}
    layered = sb.matrix_predicate(layer_axes=1)
    merged = np.asarray(sb.merge(tvs, "iso_c", is_matrix=layered)["scan"]["kernel"], np.float64)
    for layer in range(3):
        total = np.asarray(kernels[:, layer], np.float64).sum(0).T  # PyTorch (out, in)
        u, s, vt = np.linalg.svd(total, full_matrices=False)
        np.testing.assert_allclose(_svals(merged[layer]), np.full(7, s.mean()), rtol=1e-5)
        # Singular vectors of the sum are kept: merged^T = mean(s) U V^T.
        np.testing.assert_allclose(merged[layer].T, s.mean() * u @ vt, rtol=1e-5, atol=1e-5 * s.mean())


def test_tsv_bases_are_orthonormal(rng):
    x = jnp.asarray(rng.standard_normal((2, 4, 13, 9)), jnp.float32)  # (G, T, m, n): r = 2
    u_perp, s_hat, vt_perp = tsv_factors(x)
    assert u_perp.shape == (2, 13, 8) and s_hat.shape == (2, 8) and vt_perp.shape == (2, 8, 9)
    eye = np.eye(8)
    np.testing.assert_allclose(np.swapaxes(u_perp, -1, -2) @ u_perp, np.broadcast_to(eye, (2, 8, 8)), atol=2e-6)
    np.testing.assert_allclose(vt_perp @ np.swapaxes(vt_perp, -1, -2), np.broadcast_to(eye, (2, 8, 8)), atol=2e-6)
    # S_hat is each task's top-2 singular values, task after task.
    want = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)[..., :2].reshape(2, 8)
    np.testing.assert_allclose(s_hat, want, rtol=1e-5)


def test_tsv_of_one_task_is_the_input(rng):
    params = vit_like_params(rng, **SHAPE)
    tvs = jax.tree_util.tree_map(lambda x: x[None], params)
    merged = sb.merge(tvs, "tsv")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5), merged, params)


def test_tsv_of_tasks_with_orthogonal_top_subspaces_is_the_sum_of_their_truncations(rng):
    # T = 3 tasks on 12x9 matrices keep r = 3 triplets each. Their top-3 left and
    # right singular vectors lie in mutually orthogonal blocks, so U_hat and V_hat
    # are already orthonormal and TSV-M is the sum of the rank-3 truncations.
    m, n, num_tasks, r = 12, 9, 3, 3
    left, right = _orthonormal(rng, m, m), _orthonormal(rng, n, n)
    mats, truncations = [], []
    for t in range(num_tasks):
        top_u, top_v = left[:, t * r:(t + 1) * r], right[:, t * r:(t + 1) * r]
        rest_u = _orthonormal(rng, m, m)[:, : n - r]
        rest_u -= top_u @ (top_u.T @ rest_u)
        rest_u, _ = np.linalg.qr(rest_u)
        rest_v, _ = np.linalg.qr(np.linalg.qr(np.hstack([top_v, rng.standard_normal((n, n - r))]))[0][:, r:])
        top = top_u @ np.diag([9.0, 7.0, 5.0]) @ top_v.T
        mats.append(top + rest_u @ np.diag(np.geomspace(1.0, 0.1, n - r)) @ rest_v.T)
        truncations.append(top)
    kernels = jnp.asarray(np.stack([mat.T for mat in mats]), jnp.float32)  # Flax (in, out)
    merged = sb.merge({"dense": {"kernel": kernels}}, "tsv")["dense"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged).T, sum(truncations), atol=1e-5)


def test_iso_cts_with_the_whole_common_space_is_iso_c():
    tvs = _stack(_random_task_vectors(1, "iso_c", {}), jnp.float32)
    full = sb.merge(tvs, "iso_cts", common_space_fraction=1.0)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), full, sb.merge(tvs, "iso_c")
    )


@pytest.mark.parametrize(
    "m, n, num_tasks, fraction, expected",
    [
        (768, 768, 8, 0.8, (616, 19)),    # int(614.4) = 614; round(154 / 8) = 19
        (3072, 768, 20, 0.8, (608, 8)),   # round(154 / 20) = 8
        (64, 768, 20, 0.8, (44, 1)),      # per-head view of ViT-B/16
        (12, 12, 3, 1.0, (12, 0)),        # f = 1: Iso-C
        (8, 8, 4, 0.8, (8, 0)),           # round(0.5) = 0 (half to even, as the reference)
        (10, 10, 6, 0.1, (-2, 2)),        # round(1.5) = 2: too small, rejected by iso_cts
    ],
)
def test_iso_cts_space_sizes(m, n, num_tasks, fraction, expected):
    assert iso_cts_sizes(m, n, num_tasks, fraction) == expected


# --- random inputs against the numpy reference -------------------------------------
@pytest.mark.parametrize("method, kwargs", SVD_METHODS)
@pytest.mark.slow
def test_float64_equals_numpy_reference(method, kwargs):
    """Generic random task vectors: the algorithm is the reference's, to float64 round-off.

    Covers non-matrix leaves too (biases, norms, embeddings, conv1, ``proj``): the mean.
    """
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        split = [ref.flat(vit_like_params(rng, dtype=np.float64, **SHAPE)) for _ in range(NUM_TASKS)]
        tvs = _stack(split, jnp.float64)
        merged = sb.merge(tvs, method, **kwargs)
        assert jax.tree_util.tree_leaves(merged)[0].dtype == jnp.float64
        want = ref_svd.merge_tree(split, method, **_ref_kwargs(kwargs))
        _assert_close_relative(ref.flat(jax.tree_util.tree_map(np.asarray, merged)), want, rtol=1e-10)


@pytest.mark.parametrize("method, kwargs", SVD_METHODS)
def test_float32_matches_numpy_reference_to_1e5(method, kwargs):
    """float32 against a float64 numpy reference.

    The CPU backend's float32 SVD is accurate to ~10 eps; a merged result's
    error is that times the problem's conditioning (1 / the spectral gap at each
    truncation, 1 / the smallest singular value of the concatenated bases).
    Inputs are therefore drawn with separated spectra: independent tasks with
    geometric spectra (TSV-M, Iso-C) and, for Iso-CTS, its own model of a strong
    common part plus task-specific directions. Generic inputs are covered, in
    float64, by `test_float64_equals_numpy_reference`.
    """
    split = _random_task_vectors(0, method, kwargs)
    merged = sb.merge(_stack(split, jnp.float32), method, **kwargs)
    want = ref_svd.merge_tree(split, method, **_ref_kwargs(kwargs))
    _assert_close_relative(ref.flat(jax.tree_util.tree_map(np.asarray, merged)), want, rtol=1e-5)


@pytest.mark.parametrize("attention", ["full", "per_head"])
@pytest.mark.parametrize("method, kwargs", [SVD_METHODS[0], SVD_METHODS[2]])
@pytest.mark.slow
def test_attention_modes_match_numpy_per_matrix(method, kwargs, attention):
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        tvs = _stack([ref.flat(vit_like_params(rng, dtype=np.float64, **SHAPE)) for _ in range(NUM_TASKS)], jnp.float64)
        merged = sb.merge(tvs, method, attention=attention, **kwargs)
        plan = sb.matrix_plan(tvs, lead_ndim=1, attention=attention)
        got_groups = sb.matrix_plan(merged, attention=attention).gather(merged)
        for group, stack in plan.gather(tvs).items():
            for i, per_task in enumerate(np.asarray(stack)):
                want = ref_svd.MATRIX_MERGES[method](list(per_task), **_ref_kwargs(kwargs))
                np.testing.assert_allclose(np.asarray(got_groups[group][i]), want, rtol=1e-9, atol=1e-11)


# --- orientation --------------------------------------------------------------------
@pytest.mark.slow
def test_iso_cts_acts_on_the_pytorch_transpose_of_flax_kernels():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        weights = rng.standard_normal((2, 10, 6))  # PyTorch (out, in) per task
        kernels = np.swapaxes(weights, -1, -2)      # Flax (in, out)
        merged_kernel = sb.merge({"dense": {"kernel": jnp.asarray(kernels)}}, "iso_cts", common_space_fraction=0.5)
        merged_kernel = np.asarray(merged_kernel["dense"]["kernel"])
        merged_weight = np.asarray(iso_cts_matrices(jnp.asarray(weights), common_space_fraction=0.5))
        np.testing.assert_allclose(merged_kernel, merged_weight.T, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(merged_weight, ref_svd.iso_cts_matrix(list(weights), 0.5), rtol=1e-10, atol=1e-12)
        # The method really is orientation-dependent: on the kernel itself it differs.
        wrong = ref_svd.iso_cts_matrix(list(kernels), 0.5)
        assert np.abs(wrong - merged_kernel).max() > 1e-2


# --- composition with boosting and the alpha sweep ---------------------------------------
@pytest.mark.parametrize("method, kwargs", SVD_METHODS[:3])
@pytest.mark.slow
def test_composes_with_subspace_boost_and_alpha_sweep(method, kwargs):
    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        base = vit_like_params(rng, dtype=np.float64, **SHAPE)
        finetuned = [
            jax.tree_util.tree_map(lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape)), base)
            for _ in range(NUM_TASKS)
        ]
        tvs = sb.task_vectors(base, finetuned)
        tau = sb.merge(tvs, method, **kwargs)
        boosted = sb.subspace_boost(tau, beta=0.3)
        merged_np = ref_svd.merge_tree(_split(tvs), method, **_ref_kwargs(kwargs))
        want = {}
        for path, x in merged_np.items():
            if ref.is_default_matrix(path, x.shape):
                mat = ref.boost_matrix(ref.torch_matrix(path, x), 0.3)
                want[path] = ref.from_torch_matrix(path, mat, x.shape)
            else:
                want[path] = x
        _assert_close_relative(ref.flat(jax.tree_util.tree_map(np.asarray, boosted)), want, rtol=1e-9)
        base_flat = ref.flat(base)
        for alpha in (0.1, 1.0, 2.5):
            params = ref.flat(jax.tree_util.tree_map(np.asarray, sb.apply_task_vector(base, boosted, alpha=alpha)))
            _assert_close_relative(params, {k: base_flat[k] + alpha * want[k] for k in want}, rtol=1e-9)


def test_boosting_leaves_the_flat_iso_c_spectrum_unchanged():
    tvs = _stack(_random_task_vectors(2, "iso_c", {}), jnp.float32)
    tau = sb.merge(tvs, "iso_c")
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), sb.subspace_boost(tau, beta=0.01), tau
    )


# --- engine: batching, jit, dtypes --------------------------------------------------------
@pytest.mark.parametrize("method, kwargs", [SVD_METHODS[0], SVD_METHODS[2]])
@pytest.mark.slow
def test_batch_size_does_not_change_the_result(method, kwargs):
    tvs = _stack(_random_task_vectors(3, method, kwargs), jnp.float32)
    whole = sb.merge(tvs, method, **kwargs)
    chunked = sb.merge(tvs, method, batch_size=3, **kwargs)  # 4 attention matrices: one chunk + a remainder
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), chunked, whole)


@pytest.mark.parametrize("attention", ["full", "per_head"])
@pytest.mark.slow
def test_batch_size_reads_scan_stacked_layers_and_heads(rng, attention):
    """The memory-lean path loads matrix j of a group straight from its leaf:
    here scan-stacked (T, layers, ...) kernels and, per head, layer j // heads."""
    num_tasks, layers, width, heads = 3, 3, 12, 2

    def normal(*shape):
        return jnp.asarray(rng.standard_normal((num_tasks, layers) + shape), jnp.float32)

    attn = {n: {"kernel": normal(width, heads, width // heads)} for n in ("query", "key", "value")}
    tvs = {"encoder": {"attn": {**attn, "out": {"kernel": normal(heads, width // heads, width)}},
                       "mlp": {"kernel": normal(width, 2 * width)}, "ln": {"scale": normal(width)}}}
    kwargs = {"is_matrix": sb.matrix_predicate(layer_axes=1), "attention": attention}
    whole = sb.merge(tvs, "tsv", **kwargs)
    chunked = sb.merge(tvs, "tsv", batch_size=2, **kwargs)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), chunked, whole)


def _count_svds(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "svd"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    count += _count_svds(inner)
    return count


@pytest.mark.slow
@pytest.mark.parametrize("method, svds_per_group", [("tsv", 3), ("iso_c", 1), ("iso_cts", 4)])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_one_batched_svd_per_group_whatever_the_depth(method, svds_per_group, batch_size):
    """The traced program's SVD count depends on the groups, not on the layers."""

    def count(layers):
        params = vit_like_params(np.random.default_rng(0), **{**SHAPE, "layers": layers})
        tvs = jax.tree_util.tree_map(lambda x: jnp.stack([x, -x, 2 * x]), params)
        kwargs = {"common_space_fraction": 0.5} if method == "iso_cts" else {}
        fn = merging.METHODS[method].fn
        return _count_svds(jax.make_jaxpr(lambda t: fn(t, batch_size=batch_size, **kwargs))(tvs).jaxpr)

    groups = 3  # (12, 12) attention, (24, 12) c_fc, (12, 24) c_proj
    assert count(1) == count(4) == groups * svds_per_group


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_second_call_does_not_recompile(method):
    tvs = _stack(_random_task_vectors(4, method, {}), jnp.float32)
    tripled = jax.tree_util.tree_map(lambda x: 3 * x, tvs)
    sb.merge(tvs, method)
    with count_traces() as traces:
        sb.merge(tripled, method)
    assert not traces


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.slow
def test_dtype_in_equals_dtype_out_and_zero_stays_zero(method):
    params = vit_like_params(np.random.default_rng(0), dtype=jnp.bfloat16, **SHAPE)
    tvs = jax.tree_util.tree_map(lambda x: jnp.stack([x, x, -x]), params)
    merged = sb.merge(tvs, method)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(merged))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, tvs)
    for leaf in jax.tree_util.tree_leaves(sb.merge(zeros, method)):
        np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)


# --- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, -0.2, 1.5, "0.8", True])
def test_common_space_fraction_outside_0_1(fraction):
    tvs = {"dense": {"kernel": jnp.ones((2, 8, 8))}}
    with pytest.raises(ValueError, match=r"common_space_fraction must be in \(0, 1\]"):
        sb.merge(tvs, "iso_cts", common_space_fraction=fraction)
    with pytest.raises(ValueError, match=r"common_space_fraction must be in \(0, 1\]"):
        sb.iso_cts(tvs, common_space_fraction=fraction)


@pytest.mark.parametrize(
    "method, kwargs, kernel_shape, message",
    [
        ("tsv", {}, (4, 6), r"tsv: parameter 'enc/dense/kernel' \(shape \(4, 6\), read as 6x4.*min\(m, n\) = 4.*T = 5"),
        ("iso_cts", {}, (4, 6), r"iso_cts: parameter 'enc/dense/kernel' \(shape \(4, 6\).*too few rows/columns"),
        ("iso_cts", {"common_space_fraction": 0.95}, (40, 30), r"iso_cts: parameter 'enc/dense/kernel'.*= 0 task-specific"),
        ("iso_cts", {"common_space_fraction": 0.1}, (8, 8), r"iso_cts: parameter 'enc/dense/kernel'.*exceeds s"),
    ],
)
def test_too_few_rows_or_columns_for_the_tasks(method, kwargs, kernel_shape, message):
    tvs = {"enc": {"dense": {"kernel": jnp.ones((5,) + kernel_shape)}}, "bias": jnp.ones((5, 3))}
    with pytest.raises(ValueError, match=message):
        sb.merge(tvs, method, **kwargs)


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        ("tsv", {"batch_size": 0}, r"batch_size must be an integer in \[1, inf\]"),
        ("iso_c", {"batch_size": 1.5}, r"batch_size must be an integer in \[1, inf\]"),
        ("tsv", {"k": 0.2}, "unknown hyper-parameter"),
        ("iso_c", {"common_space_fraction": 0.5}, "unknown hyper-parameter"),
        ("iso_cts", {"attention": "heads"}, "attention must be one of"),
    ],
)
def test_bad_hyper_parameters(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sb.merge({"dense": {"kernel": jnp.ones((2, 8, 8))}}, method, **kwargs)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_non_finite_task_vector_names_path(method):
    tvs = {"enc": {"kernel": jnp.ones((2, 8, 8)).at[1, 2, 3].set(jnp.nan)}}
    with pytest.raises(ValueError, match="'enc/kernel' contains NaN or infinite"):
        sb.merge(tvs, method)
