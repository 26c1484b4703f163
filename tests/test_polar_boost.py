"""Polar solver of Subspace Boosting: agreement with the SVD path, fallbacks, report, dtypes, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from experiments.bench_boost import synthetic_merged_matrix
from subboost import boosting, linalg, polar_boost
from tests import numpy_reference as ref
from tests.conftest import vit_like_params
from tests.trees import dense_tree
from tests.tracing import count_traces

# (rows, cols) in PyTorch orientation: square, and wide (transposed, then QR-reduced as tall).
SHAPES = [(64, 64), (40, 112)]
TOL = 1e-3  # the acceptance bound: relative Frobenius error against the exact SVD path


def _merged_tree(num_tasks: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return dense_tree(dtype=None, layers={f"m{i}_{j}": synthetic_merged_matrix(rng, m, n, num_tasks, task_rank=2)
                  for i, (m, n) in enumerate(SHAPES) for j in range(2)})


def _random_tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return dense_tree(dtype=None, layers={f"m{i}_{j}": rng.standard_normal((m, n)).astype(np.float32)
                  for i, (m, n) in enumerate(SHAPES) for j in range(2)})


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _assert_agrees_with_svd_path(tau, beta, mode="cumsum"):
    out, report = sb.subspace_boost(tau, beta=beta, mode=mode, solver="polar", return_info=True)
    exact = sb.subspace_boost(tau, beta=beta, mode=mode)
    assert {g.solver for g in report.groups} == {"polar"}
    assert report.fallbacks == {}, report.summary()  # the polar path itself, not its fallback
    for name in tau:
        got = out[name]["kernel"]
        assert _relative_error(got, exact[name]["kernel"]) <= TOL
        want64 = ref.boost_matrix(np.asarray(tau[name]["kernel"]).T, beta, mode).T  # float64 numpy
        assert _relative_error(got, want64) <= TOL
    return report


def test_qdwh_schedule_ends_in_halley_steps_and_checks_its_bound():
    steps = polar_boost.qdwh_schedule(1e-9, float(jnp.finfo(jnp.float32).eps))
    assert [c > 100 for _, _, c in steps] == [True, True, False, False]  # 2 QR, then 2 Cholesky steps
    np.testing.assert_allclose(steps[-1], (3.0, 1.0, 3.0), rtol=0.05)
    with pytest.raises(ValueError, match="lower_bound must be in"):
        polar_boost.qdwh_schedule(0.0, 1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(30, 30), (20, 50)])
def test_polar_factor_matches_numpy(rng, shape):
    x = rng.standard_normal((2,) + shape) @ np.diag(np.geomspace(1, 1e-4, shape[1]))  # kappa ~ 1e4
    p, residual = polar_boost.polar_factor(jnp.asarray(x, jnp.float32))
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(np.asarray(p), u @ vh, atol=1e-5)
    assert np.all(np.asarray(residual) < 1e-5)


def test_polar_factor_of_a_structurally_singular_matrix_has_a_large_residual():
    _, residual = polar_boost.polar_factor(jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0])))
    np.testing.assert_allclose(float(residual), np.sqrt(1 / 4), rtol=1e-5)  # sqrt(nullity / n)


# beta = 0.02 runs the same code as 0.01 (and compiles anew), so the grid stops at 0.01.
@pytest.mark.parametrize("num_tasks, beta", [(8, 0.0), (8, 0.01), (14, 0.01), (20, 0.01)])
@pytest.mark.slow
def test_agrees_with_svd_path_on_merged_task_vectors(num_tasks, beta):
    report = _assert_agrees_with_svd_path(_merged_tree(num_tasks, seed=num_tasks), beta)
    assert all(np.all(g.polar_residual < 1e-5) for g in report.groups)


@pytest.mark.slow
def test_agrees_with_svd_path_on_random_matrices():
    report = _assert_agrees_with_svd_path(_random_tree(seed=1), 0.01)
    # Flat top spectrum: the top triplets converge slowly, still no fallback.
    assert max(int(g.iterations.max()) for g in report.groups) > 5


@pytest.mark.slow
def test_agrees_with_svd_path_in_index_mode():
    rng = np.random.default_rng(3)
    x = jnp.asarray(np.stack([synthetic_merged_matrix(rng, 64, 64, 8, task_rank=2) for _ in range(2)]))
    out, report = sb.subspace_boost(x, beta=0.05, mode="index", solver="polar", return_info=True)
    assert report.fallbacks == {} and report.groups[0].k.tolist() == [3, 3]  # floor(0.05 * 64)
    assert _relative_error(out, sb.subspace_boost(x, beta=0.05, mode="index")) <= TOL


@pytest.mark.slow
def test_rank_deficient_input_agrees_where_the_boost_is_unique(rng):
    """Documented behaviour: null-space directions are arbitrary; spectrum, row-space action and Grams are not."""
    low = rng.standard_normal((2, 80, 3)) @ rng.standard_normal((2, 3, 80))  # rank 3
    x = jnp.asarray(low, jnp.float32)
    # Shapes and beta of the cap test below: one compilation for both.
    got, report = sb.subspace_boost(x, beta=0.7, solver="polar", return_info=True)
    want = sb.subspace_boost(x, beta=0.7)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.linalg.norm(want, axis=(-2, -1)).max())
    _, s, vh = np.linalg.svd(low)
    k = report.groups[0].k
    assert np.all(k <= 2)
    for i in range(2):
        boosted = np.maximum(s[i], s[i, k[i]])  # 77 null directions raised to s_k
        np.testing.assert_allclose(np.linalg.svd(got[i], compute_uv=False), boosted, rtol=1e-3)
    row_space = np.swapaxes(vh[:, :3], -1, -2)  # (2, 80, 3)
    np.testing.assert_allclose(got @ row_space, want @ row_space, atol=1e-4 * scale)
    for gram in (lambda b: np.swapaxes(b, -1, -2) @ b, lambda b: b @ np.swapaxes(b, -1, -2)):
        np.testing.assert_allclose(gram(got), gram(want), atol=1e-4 * scale**2)


@pytest.mark.slow
def test_structural_zero_falls_back_to_svd_and_is_reported():
    x = jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0]))
    out, report = sb.subspace_boost(x, beta=0.5, solver="polar", return_info=True)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(out), compute_uv=False), [4, 4, 4, 4], atol=1e-5)
    np.testing.assert_allclose(out, sb.subspace_boost(x, beta=0.5), atol=1e-6)
    group = report.groups[0]
    assert group.solver == "polar" and group.fallback.tolist() == [True]
    assert report.fallbacks == {"matrix": polar_boost.REASONS[polar_boost.POLAR_FAILED]}
    assert "fell back to SVD: matrix" in report.summary()


@pytest.mark.slow
def test_cutoff_past_the_triplet_cap_falls_back_per_matrix(rng):
    # Random 80x80: cumsum reaches 0.7 near k = 40, past the cap of 32; the zero matrix does not.
    x = np.stack([rng.standard_normal((80, 80)), np.zeros((80, 80))]).astype(np.float32)
    out, report = sb.subspace_boost(jnp.asarray(x), beta=0.7, solver="polar", return_info=True)
    np.testing.assert_allclose(out, sb.subspace_boost(jnp.asarray(x), beta=0.7), atol=1e-4)  # float32 rounding
    np.testing.assert_array_equal(out[1], 0.0)
    assert polar_boost.max_cutoff_index(80) == 32
    assert report.groups[0].fallback.tolist() == [True, False]
    assert report.fallbacks == {"[0]": polar_boost.REASONS[polar_boost.K_BEYOND_CAP]}
    assert int(report.groups[0].k[0]) == ref_cutoff(x[0], 0.7) > 32  # k of the fallback is the exact one


def ref_cutoff(matrix, beta):
    s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return int(np.nonzero(np.cumsum(s) / s.sum() >= beta)[0][0])


def test_solver_choice_by_backend_shape_and_static_k():
    choose = boosting.choose_solver
    assert choose("svd", (768, 768), beta=0.01, mode="cumsum", backend="gpu") == "svd"
    assert choose("polar", (8, 8), beta=0.01, mode="cumsum", backend="cpu") == "polar"
    assert choose("polar", (768, 768), beta=0.5, mode="index", backend="gpu") == "svd"  # k = 384 past the cap
    assert choose("auto", (768, 768), beta=0.01, mode="cumsum", backend="cpu") == "svd"  # measured: LAPACK wins on CPU
    assert choose("auto", (768, 3072), beta=0.01, mode="cumsum", backend="gpu") == "polar"
    assert choose("auto", (64, 768), beta=0.01, mode="cumsum", backend="gpu") == "svd"  # small side: batched SVD is cheap
    assert choose("auto", (768, 768), beta=0.02, mode="index", backend="tpu") == "polar"  # k = 15 fits


@pytest.mark.slow
def test_auto_on_cpu_is_the_svd_path_and_says_so(rng):
    tau = vit_like_params(rng)
    out, report = sb.subspace_boost(tau, beta=0.02, solver="auto", return_info=True)
    assert set(report.solvers.values()) == {"svd"} and report.fallbacks == {}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), out, sb.subspace_boost(tau, beta=0.02))
    assert np.all(np.isnan(report.groups[0].polar_residual))


@pytest.mark.slow
def test_dtype_in_equals_dtype_out(rng):
    dtypes = (jnp.bfloat16, jnp.float16, jnp.float32)
    tau = {jnp.dtype(d).name: {"kernel": jnp.asarray(rng.standard_normal((9, 12)), d)} for d in dtypes}
    out, report = sb.subspace_boost(tau, beta=0.02, solver="polar", return_info=True)
    exact = sb.subspace_boost(tau, beta=0.02)
    assert sorted(g.dtype for g in report.groups) == sorted(tau)
    for name in tau:
        got, want = out[name]["kernel"], exact[name]["kernel"]
        assert got.dtype == tau[name]["kernel"].dtype
        # Low precision: the two paths may differ by rounding the output (8 ulps). float32: QDWH's own
        # error, measured up to ~10 ulps of the largest entry depending on the CPU's BLAS kernels.
        ulps = 8 if got.dtype != jnp.float32 else 32
        bound = ulps * float(jnp.finfo(got.dtype).eps) * float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=bound)


@pytest.mark.slow
def test_float64_when_enabled(rng):
    with jax.enable_x64(True):
        x = rng.standard_normal((2, 30, 20))
        out = sb.subspace_boost(jnp.asarray(x), beta=0.02, solver="polar")
        assert out.dtype == jnp.float64
        want = np.stack([ref.boost_matrix(m, 0.02) for m in x])
        np.testing.assert_allclose(np.asarray(out), want, atol=1e-9)


@pytest.mark.slow
def test_second_call_does_not_recompile_and_scales(rng):
    tau = vit_like_params(rng)
    tripled = jax.tree_util.tree_map(lambda x: 3 * x, tau)
    first, _ = sb.subspace_boost(tau, beta=0.01, solver="polar", attention="per_head", return_info=True)
    with count_traces() as traces:
        second, _ = sb.subspace_boost(tripled, beta=0.01, solver="polar", attention="per_head", return_info=True)
    assert not traces
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(3 * a, b, rtol=1e-4, atol=1e-4), first, second)


@pytest.mark.slow
def test_report_names_every_matrix(rng):
    tau = vit_like_params(rng)  # same shapes and options as above: no new compilation
    _, report = sb.subspace_boost(tau, beta=0.01, solver="polar", attention="per_head", return_info=True)
    names = {n for g in report.groups for n in g.names}
    assert "transformer/resblocks_1/attn/query[1]" in names  # per_head: one matrix per head
    assert "transformer/resblocks_0/mlp/c_fc" in names
    assert sum(g.count for g in report.groups) == 2 * (4 * 2 + 2)
    assert "polar" in report.summary()


@pytest.mark.slow
def test_batch_size_gives_the_same_result_and_report(rng):
    x = jnp.asarray(rng.standard_normal((5, 24, 18)), jnp.float32)  # chunks of 2: the last one padded
    whole, report = sb.subspace_boost(x, beta=0.02, solver="polar", return_info=True)
    chunked, chunked_report = sb.subspace_boost(x, beta=0.02, solver="polar", batch_size=2, return_info=True)
    np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-5)
    assert chunked_report.groups[0].names == report.groups[0].names == tuple(f"[{i}]" for i in range(5))
    assert chunked_report.groups[0].k.tolist() == report.groups[0].k.tolist()


@pytest.mark.parametrize("kwargs, message", [
    ({"solver": "qdwh"}, "solver must be one of"),
    ({"solver": "polar", "tol": 0.0}, r"tol must be None or in \(0, 1\)"),
    ({"solver": "polar", "tol": "1e-4"}, r"tol must be None or in \(0, 1\)"),
])
def test_bad_solver_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sb.subspace_boost(jnp.ones((3, 3)), beta=0.1, **kwargs)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_svd_via_qr_matches_numpy(rng, shape):
    x = rng.standard_normal((2,) + shape)
    u, s, vh = linalg.svd(jnp.asarray(x, jnp.float32), method="qr")
    np.testing.assert_allclose(np.asarray(s), np.linalg.svd(x, compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(linalg.reconstruct(u, s, vh)), x, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jnp.swapaxes(u, -1, -2) @ u), np.broadcast_to(np.eye(12), (2, 12, 12)),
                               atol=1e-5)
    with pytest.raises(ValueError, match="method must be"):
        linalg.svd(jnp.asarray(x), method="jacobi")
