"""HO-GSVD: reconstruction, planted structure, classic vs robust, numpy references, bad input."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost.hogsvd import common_eigenvalue, isolated_eigenvalue, project
from tests import numpy_reference as ref

# reconstruction tolerance relative to max(1, max |A|), per the issue: 1e-5 (float32) / 1e-10 (float64)
TOL = {"float32": 1e-5, "float64": 1e-10}


def precision(dtype: str):
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def reconstruct(result, i):
    u = result.U[i]
    return np.asarray(u) @ np.diag(np.asarray(result.sigma[i])) @ np.asarray(result.V).T


def low_rank(rng, m, n, r):
    return rng.standard_normal((m, r)) @ rng.standard_normal((r, n))


def random_inputs(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    if kind == "full_rank_ragged":  # tall, full column rank, different row counts
        return [rng.standard_normal((m, 5)) for m in (7, 9, 6)]
    if kind == "rank_deficient_each":  # every A_i rank 2 < n, the stack full rank
        return [low_rank(rng, 6, 5, 2) for _ in range(3)]
    if kind == "rank_deficient_stack":  # all share a 3-dim row space: the stack has rank 3 < n = 5
        rows = rng.standard_normal((3, 5))
        return [rng.standard_normal((4, 3)) @ rows for _ in range(3)]
    if kind == "wide":  # fewer stacked rows than columns (padded QR path)
        return [rng.standard_normal((2, 7)) for _ in range(3)]
    if kind == "with_zero_matrix":
        return [rng.standard_normal((6, 4)), np.zeros((6, 4)), rng.standard_normal((5, 4))]
    raise ValueError(kind)


KINDS = ["full_rank_ragged", "rank_deficient_each", "rank_deficient_stack", "wide", "with_zero_matrix"]
CASES = [(kind, "float32") for kind in KINDS] + [(kind, "float64") for kind in KINDS[:4]]


@pytest.mark.parametrize("kind,dtype", CASES)
def test_robust_reconstruction(kind, dtype):
    rng = np.random.default_rng(KINDS.index(kind))
    with precision(dtype):
        exact = random_inputs(kind, rng)
        mats = [jnp.asarray(a, dtype) for a in exact]
        result = sb.hogsvd(mats)
        assert result.sigma.dtype == jnp.dtype(dtype) and result.V.dtype == jnp.dtype(dtype)
        n = mats[0].shape[1]
        assert result.sigma.shape == (3, n) and result.V.shape == (n, n) and result.eigenvalues.shape == (n,)
        assert isinstance(result.U, list) and [u.shape for u in result.U] == [a.shape for a in mats]
        for i, a in enumerate(mats):
            a = np.asarray(a, np.float64)
            err = np.max(np.abs(reconstruct(result, i) - a))
            assert err <= TOL[dtype] * max(1.0, np.abs(a).max()), (i, err)
        # robust normalisation: every direction's sigma column is a unit vector over the matrices,
        # except directions absent from every matrix (sigma = 0, tau = 1/pi, the maximum).
        col = np.linalg.norm(np.asarray(result.sigma, np.float64), axis=0)
        stack_rank = np.linalg.matrix_rank(np.concatenate(exact))
        absent = col < 0.5
        assert absent.sum() == n - stack_rank
        np.testing.assert_allclose(col[~absent], 1.0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(result.eigenvalues)[absent], 3.0, rtol=1e-5)  # 1/pi, pi = 1/3
        assert np.all(np.isfinite(np.asarray(result.V))) and abs(np.linalg.det(np.asarray(result.V, np.float64))) > 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_classic_reconstruction_full_rank(dtype):
    rng = np.random.default_rng(7)
    with precision(dtype):
        mats = [jnp.asarray(a, dtype) for a in random_inputs("full_rank_ragged", rng)]
        result = sb.hogsvd(mats, method="classic")
        for i, a in enumerate(mats):
            err = np.max(np.abs(reconstruct(result, i) - np.asarray(a, np.float64)))
            assert err <= TOL[dtype] * max(1.0, float(jnp.abs(a).max())), (i, err)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(result.V), axis=0), 1.0, rtol=1e-5)
        assert np.all(np.asarray(result.eigenvalues) >= 1 - 1e-4)  # eigenvalues of S are >= 1


def planted(rng, *, num=4, n=6, rows=9, isolated=True, num_common=2, well_conditioned=False):
    """A_i = U_i diag(s_i) V^T with orthonormal U_i and one random invertible V.

    Columns 0, 1 (or just 0): equal s across matrices (common); column 2: only in matrix 1 (isolated).
    """
    if well_conditioned:  # cond(V) <= 2
        v = np.linalg.qr(rng.standard_normal((n, n)))[0] @ np.diag(rng.uniform(1.0, 2.0, n))
    else:
        v = rng.standard_normal((n, n))
    # generic columns: well-separated eigenvalues (no near-ties that float32 could not resolve)
    s = np.array([[0.6, 1.9, 1.0, 0.7, 1.6, 1.2], [1.8, 0.5, 1.1, 1.9, 0.9, 0.6],
                  [1.2, 1.0, 0.5, 0.6, 1.8, 1.5], [0.8, 1.4, 1.7, 1.3, 0.5, 1.9]])[:num, :n].copy()
    s[:, 0] = 1.3
    if num_common == 2:
        s[:, 1] = 0.4
    if isolated:
        s[:, 2] = 0.0
        s[1, 2] = 1.7
    mats = [np.linalg.qr(rng.standard_normal((rows, n)))[0] @ np.diag(s[i]) @ v.T for i in range(num)]
    return mats, s, v


def angle_cosines(a, b):
    """Cosines of the principal angles between the column spans of a and b."""
    qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_planted_common_and_isolated_directions(dtype):
    rng = np.random.default_rng(1)
    mats, s, v = planted(rng)
    num, pi = len(mats), 1 / len(mats)
    with precision(dtype):
        result = sb.hogsvd([jnp.asarray(a, dtype) for a in mats])
    tau = np.asarray(result.eigenvalues, np.float64)
    common = np.asarray(result.common)
    tol = 1e-5 if dtype == "float32" else 1e-12

    # every eigenvalue is predicted: in the planted basis Q_i^T Q_i = diag(c_i), c_ik = s_ik^2 / sum_j s_jk^2
    c = s**2 / np.sum(s**2, axis=0)
    predicted = np.mean(1.0 / (c + pi), axis=0)
    np.testing.assert_allclose(tau, np.sort(predicted), rtol=tol)

    # the shared subspace: tau at its minimum 1/(1/N + pi), spanning planted columns 0 and 1
    assert common.tolist() == [True, True, False, False, False, False]
    np.testing.assert_allclose(tau[:2], common_eigenvalue(num, pi), rtol=tol)
    assert common_eigenvalue(num, pi) == pytest.approx(1 / (1 / num + pi)) and tau.min() >= common_eigenvalue(num, pi) * (1 - tol)
    np.testing.assert_allclose(angle_cosines(np.asarray(result.V)[:, common], v[:, :2]), 1.0, atol=1e-4)

    # the isolated direction: predicted tau (N-1)/(N pi) + 1/(N (1+pi)), parallel to planted column 2,
    # present only in matrix 1 (sigma = 1 there, 0 elsewhere)
    iso = int(np.argmax(tau))
    assert tau[iso] == pytest.approx(isolated_eigenvalue(num, pi), rel=tol)
    assert isolated_eigenvalue(num, pi) == pytest.approx((num - 1) / (num * pi) + 1 / (num * (1 + pi)))
    assert angle_cosines(np.asarray(result.V)[:, [iso]], v[:, [2]])[0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(np.asarray(result.sigma)[:, iso], [0, 1, 0, 0], atol=1e-4)

    # every generalized singular value is the planted s, normalised per direction (matched by tau)
    for k in range(2, 6):
        planted_k = int(np.argmin(np.abs(predicted - tau[k])))
        np.testing.assert_allclose(
            np.asarray(result.sigma)[:, k], s[:, planted_k] / np.linalg.norm(s[:, planted_k]), atol=1e-4
        )


def test_planted_classic_eigenvalues():
    """Classic: S's eigenvalues are (mean_i 1/c_ik - 1)/(N - 1); exactly 1 on the common directions."""
    rng = np.random.default_rng(2)
    mats, s, _ = planted(rng, isolated=False)
    num = len(mats)
    with jax.enable_x64(True):
        result = sb.hogsvd([jnp.asarray(a) for a in mats], method="classic")
    c = s**2 / np.sum(s**2, axis=0)
    predicted = (np.mean(1.0 / c, axis=0) - 1.0) / (num - 1)
    np.testing.assert_allclose(np.asarray(result.eigenvalues), np.sort(predicted), rtol=1e-10)
    assert np.asarray(result.common).tolist() == [True, True, False, False, False, False]
    np.testing.assert_allclose(np.asarray(result.eigenvalues)[:2], 1.0, atol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_repeated_eigenvalues_resolve_directions_per_matrix(dtype):
    """Three matrices on disjoint 2-dim row spaces: every direction is isolated (tau repeated 6 times).

    eigh alone returns an arbitrary basis of that eigenspace; the tie-break keeps each direction inside one
    matrix: every sigma column is one-hot, and each matrix owns two directions spanning its row space.
    """
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((6, 6))
    mats = [rng.standard_normal((5, 2)) @ rows[2 * t : 2 * t + 2] for t in range(3)]
    with precision(dtype):
        result = sb.hogsvd([jnp.asarray(a, dtype) for a in mats])
    sigma = np.asarray(result.sigma, np.float64)
    atol = 1e-3 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(np.asarray(result.eigenvalues), isolated_eigenvalue(3, 1 / 3), rtol=1e-5)
    owner = np.argmax(sigma, axis=0)
    np.testing.assert_allclose(sigma, np.eye(3)[:, owner], atol=atol)
    assert sorted(owner.tolist()) == [0, 0, 1, 1, 2, 2]
    for t in range(3):
        np.testing.assert_allclose(angle_cosines(np.asarray(result.V)[:, owner == t], rows[2 * t : 2 * t + 2].T),
                                   1.0, atol=1e-4)


def canonical(result):
    """Scale-free view: unit-norm V columns and sigma_{i,k} * ||V[:, k]|| (A_i = sum_k sigma_ik u_ik v_k^T)."""
    v = np.asarray(result.V, np.float64)
    norms = np.linalg.norm(v, axis=0)
    return v / norms, np.asarray(result.sigma, np.float64) * norms


def assert_same_decomposition(a, b, atol):
    """Same directions (up to sign and order) with the same scale-free generalized singular values."""
    va, sa = canonical(a)
    vb, sb_ = canonical(b)
    match = np.argmax(np.abs(va.T @ vb), axis=1)
    assert sorted(match) == list(range(va.shape[1]))
    signs = np.sign(np.sum(va * vb[:, match], axis=0))
    np.testing.assert_allclose(va, vb[:, match] * signs, atol=atol)
    np.testing.assert_allclose(sa, sb_[:, match], atol=atol)
    assert np.asarray(a.common).sum() == np.asarray(b.common).sum()


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-3), ("float64", 1e-9)])
@pytest.mark.slow
def test_classic_and_robust_agree_on_well_conditioned_inputs(dtype, atol):
    """Exact agreement (any pi) when the Q_i^T Q_i commute: N = 2 (the GSVD), or a planted shared basis.

    Compared: V columns normalised to unit length, matched up to sign and order; sigma_{i,k} * ||V[:, k]||
    (invariant to the column scaling, which differs: classic V has unit columns, robust V = R^T Z);
    the number of common directions. (One common direction, so no eigenvalue is repeated.)
    """
    rng = np.random.default_rng(3)
    two = [rng.standard_normal((10, 5)) for _ in range(2)]
    shared, _, _ = planted(rng, isolated=False, num_common=1, well_conditioned=True)
    with precision(dtype):
        for mats in (two, shared):
            mats = [jnp.asarray(a, dtype) for a in mats]
            assert_same_decomposition(sb.hogsvd(mats, method="robust"), sb.hogsvd(mats, method="classic"), atol)


@pytest.mark.slow
def test_robust_tends_to_classic_as_pi_vanishes():
    """General N = 4: the robust T with pi -> 0 is the classic problem; the gap shrinks like O(pi)."""
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        mats = [jnp.asarray(rng.standard_normal((10, 5))) for _ in range(4)]
        classic = sb.hogsvd(mats, method="classic")
        assert_same_decomposition(sb.hogsvd(mats, method="robust", pi=1e-8), classic, 1e-5)
        with pytest.raises(AssertionError):  # at the default pi = 1/N they are different decompositions
            assert_same_decomposition(sb.hogsvd(mats, method="robust"), classic, 1e-3)


def numpy_robust(mats, pi):
    """Kempf et al. straight from REFERENCE.md (full-rank stack), in float64 numpy."""
    a = np.concatenate(mats)
    q, r = np.linalg.qr(a)
    offsets = np.cumsum([0] + [m.shape[0] for m in mats])
    qs = [q[offsets[i] : offsets[i + 1]] for i in range(len(mats))]
    n = a.shape[1]
    t = np.mean([np.linalg.inv(qi.T @ qi + pi * np.eye(n)) for qi in qs], axis=0)
    tau, z = np.linalg.eigh(t)
    sigma = np.stack([np.linalg.norm(qi @ z, axis=0) for qi in qs])
    return tau, sigma, r.T @ z


def numpy_classic(mats):
    """Ponnapalli et al. straight from REFERENCE.md (non-symmetric eig of S), in float64 numpy."""
    num = len(mats)
    d = [a.T @ a for a in mats]
    s = sum(d[i] @ np.linalg.inv(d[j]) for i in range(num) for j in range(num) if i != j) / (num * (num - 1))
    lam, v = np.linalg.eig(s)
    lam, v = lam.real, v.real
    order = np.argsort(lam)
    lam, v = lam[order], v[:, order] / np.linalg.norm(v[:, order], axis=0)
    b = [a @ np.linalg.inv(v).T for a in mats]
    return lam, np.stack([np.linalg.norm(x, axis=0) for x in b]), v


@pytest.mark.parametrize("method", ["robust", "classic"])
def test_matches_independent_numpy_implementation(method):
    rng = np.random.default_rng(5)
    mats = [rng.standard_normal((m, 5)) for m in (8, 6, 7)]
    result = sb.hogsvd([jnp.asarray(a, jnp.float32) for a in mats], method=method)
    tau, sigma, v = numpy_robust(mats, 1 / 3) if method == "robust" else numpy_classic(mats)
    np.testing.assert_allclose(np.asarray(result.eigenvalues), tau, rtol=1e-4)
    # columns are defined up to sign: compare |V| column-wise, and sigma directly (sign-free)
    np.testing.assert_allclose(np.abs(np.asarray(result.V)), np.abs(v), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(result.sigma), sigma, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_stacked_batched_jit_and_project():
    rng = np.random.default_rng(6)
    stacked = jnp.asarray(rng.standard_normal((2, 3, 6, 4)), jnp.float32)  # (batch, N, m, n)
    batched = sb.hogsvd(stacked)
    assert batched.U.shape == (2, 3, 6, 4) and batched.sigma.shape == (2, 3, 4) and batched.V.shape == (2, 4, 4)
    jitted = jax.jit(lambda x: sb.hogsvd(x))(stacked[1])
    single = sb.hogsvd(stacked[1])
    listed = sb.hogsvd(list(stacked[1]))
    for other in (jitted, listed):
        np.testing.assert_allclose(np.asarray(other.sigma), np.asarray(single.sigma), atol=1e-5)
        np.testing.assert_allclose(np.asarray(other.eigenvalues), np.asarray(single.eigenvalues), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(batched.sigma[1]), np.asarray(single.sigma), atol=1e-5)
    np.testing.assert_allclose(np.asarray(batched.U[1]), np.asarray(single.U), atol=1e-5)
    # project(A_i) recovers sigma_i; a combination is projected linearly column by column
    np.testing.assert_allclose(np.asarray(project(single, stacked[1, 2])), np.asarray(single.sigma[2]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(project(single, stacked[1])), np.asarray(single.sigma), atol=1e-5)
    bf16 = sb.hogsvd(stacked[1].astype(jnp.bfloat16))
    assert bf16.sigma.dtype == jnp.float32


def tiny_tvs(rng, num=3):
    width, heads = 4, 2
    layers = {}
    for i in range(2):
        layers[f"block_{i}"] = {
            "attn": {"query": {"kernel": rng.standard_normal((num, width, heads, width // heads))}},
            "mlp": {"kernel": rng.standard_normal((num, width, 6)), "bias": rng.standard_normal((num, 6))},
        }
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), layers)


@pytest.mark.slow
def test_hogsvd_layers_matches_per_matrix_calls():
    rng = np.random.default_rng(8)
    tvs = tiny_tvs(rng)
    results = sb.hogsvd_layers(tvs)
    expected = {p.rsplit("/", 1)[0]: x for p, x in ref.flat(jax.tree_util.tree_map(np.asarray, tvs)).items()
                if p.endswith("kernel")}
    assert set(results) == set(expected)
    chunked = sb.hogsvd_layers(tvs, batch_size=1, compute_u=False)
    for name, stacked in expected.items():
        mats = [ref.torch_matrix(name + "/kernel", x) for x in stacked]
        direct = sb.hogsvd([jnp.asarray(a, jnp.float32) for a in mats])
        got = results[name]
        assert got.U.shape == (3,) + mats[0].shape
        np.testing.assert_allclose(np.asarray(got.sigma), np.asarray(direct.sigma), atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.eigenvalues), np.asarray(direct.eigenvalues), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(chunked[name].sigma), np.asarray(got.sigma), atol=1e-5)
        assert chunked[name].U is None
        for i, a in enumerate(mats):
            np.testing.assert_allclose(reconstruct(got, i), a, atol=1e-5 * max(1, np.abs(a).max()))


@pytest.mark.parametrize(
    "mats,match",
    [
        ([np.ones((3, 4)), np.ones((3, 5))],
         r"same number of columns n; matrix 0 has shape \(3, 4\), matrix 1 has shape \(3, 5\)"),
        ([np.ones((3, 4))], "at least 2 matrices, got 1"),
        (np.ones((1, 3, 4)), "at least 2 matrices, got 1"),
        (np.ones((3, 4)), r"stacked input needs shape \(N, m, n\)"),
        ([np.ones((3, 4)), np.array([[1.0, np.nan, 0, 0]] * 3)], "matrix 1 contains NaN or infinite"),
        ([np.ones((3, 4)), np.full((3, 4), np.inf)], "matrix 1 contains NaN or infinite"),
        ([np.ones((3, 4)), np.ones(4)], "matrix 1 has shape \\(4,\\)"),
        ([np.ones((3, 4)), np.ones((0, 4))], "must not be empty"),
        ("ab", "mats must be a list"),
    ],
)
def test_bad_input_raises_clear_errors(mats, match):
    with pytest.raises(ValueError, match=match):
        sb.hogsvd(mats)


@pytest.mark.slow
def test_bad_options_and_classic_requirements():
    rng = np.random.default_rng(9)
    good = [jnp.asarray(rng.standard_normal((5, 3)), jnp.float32) for _ in range(3)]
    with pytest.raises(ValueError, match="method must be one of"):
        sb.hogsvd(good, method="gsvd")
    with pytest.raises(ValueError, match="pi must be a finite number > 0"):
        sb.hogsvd(good, pi=0.0)
    with pytest.raises(ValueError, match="pi is a parameter of the robust method only"):
        sb.hogsvd(good, method="classic", pi=0.5)
    with pytest.raises(ValueError, match="matrix 1 has shape \\(2, 3\\), fewer rows than columns"):
        sb.hogsvd([good[0], good[1][:2]], method="classic")
    rank_one = jnp.asarray(np.outer(rng.standard_normal(5), rng.standard_normal(3)), jnp.float32)
    with pytest.raises(ValueError, match="D_1 = A_1\\^T A_1 of matrix 1 is singular"):
        sb.hogsvd([good[0], rank_one, good[2]], method="classic")
    sb.hogsvd([good[0], rank_one, good[2]])  # the robust method handles it


@pytest.mark.slow
def test_hogsvd_layers_bad_input_names_the_parameter():
    rng = np.random.default_rng(10)
    tvs = tiny_tvs(rng)
    bad = jax.tree_util.tree_map(lambda x: x, tvs)
    bad["block_1"]["mlp"]["kernel"] = bad["block_1"]["mlp"]["kernel"].at[0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="'block_1/mlp/kernel' contains NaN"):
        sb.hogsvd_layers(bad)
    with pytest.raises(ValueError, match="at least 2 experts, got 1"):
        sb.hogsvd_layers(jax.tree_util.tree_map(lambda x: x[:1], tvs))
    wide = {"w": {"kernel": jnp.asarray(rng.standard_normal((3, 6, 4)), jnp.float32)}}  # (out, in) = (4, 6)
    with pytest.raises(ValueError, match="parameter 'w' gives \\(4, 6\\) matrices with fewer rows than columns"):
        sb.hogsvd_layers(wide, method="classic")
    singular = jax.tree_util.tree_map(lambda x: x, tvs)
    rank_one = jnp.asarray(np.outer(rng.standard_normal(4), rng.standard_normal(6)), jnp.float32)
    singular["block_0"]["mlp"]["kernel"] = singular["block_0"]["mlp"]["kernel"].at[2].set(rank_one)
    with pytest.raises(ValueError, match="parameter 'block_0/mlp' has an expert matrix whose D_i"):
        sb.hogsvd_layers(singular, method="classic")
    robust = sb.hogsvd_layers(singular, batch_size=1, compute_u=False)  # the robust method handles it
    assert set(robust) == {"block_0/mlp", "block_1/mlp", "block_0/attn/query", "block_1/attn/query"}
