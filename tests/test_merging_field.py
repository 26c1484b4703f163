"""MagMax, Model Stock, WUDI, STAR and CART: known answers on small matrices and float64 numpy/torch references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb

T, M, N = 3, 7, 5


def random_tvs(rng, num_tasks: int = T) -> dict:
    return {"dense": {"kernel": jnp.asarray(rng.standard_normal((num_tasks, N, M)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal((num_tasks, M)), jnp.float32)}}


def torch_matrices(tvs) -> np.ndarray:
    """The (T, out, in) matrices of the Dense kernel, float64."""
    return np.swapaxes(np.asarray(tvs["dense"]["kernel"], np.float64), -1, -2)


def merged_matrix(tau) -> np.ndarray:
    return np.asarray(tau["dense"]["kernel"], np.float64).T


def orthogonal(rng, n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


# ----------------------------------------------------------------------------
# MagMax and Model Stock (elementwise / per tensor)
# ----------------------------------------------------------------------------
def test_magmax_takes_the_largest_magnitude_later_task_on_ties(rng):
    x = jnp.array([[1.0, -3.0, 2.0, 0.0], [-2.0, 1.0, -2.0, 0.0], [0.5, 3.0, 1.0, -0.0]])
    np.testing.assert_array_equal(np.asarray(sb.merge({"w": x}, "magmax")["w"]), [-2.0, 3.0, -2.0, 0.0])
    tvs = random_tvs(rng)
    for name, leaf in (("kernel", tvs["dense"]["kernel"]), ("bias", tvs["dense"]["bias"])):
        want = np.asarray(leaf[0])
        for t in range(1, T):  # the reference's fold
            current = np.asarray(leaf[t])
            want = np.where(np.abs(current) >= np.abs(want), current, want)
        np.testing.assert_array_equal(np.asarray(sb.merge(tvs, "magmax")["dense"][name]), want)


def model_stock_numpy(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    flat = x.reshape(len(x), -1)
    norms = np.linalg.norm(flat, axis=1)
    angles = [np.arccos(np.clip(flat[i] @ flat[j] / (norms[i] * norms[j] + 1e-8), -1, 1))
              for i, j in itertools.combinations(range(len(x)), 2)]
    cos = np.cos(np.mean(angles))
    return len(x) * cos / ((len(x) - 1) * cos + 1 + 1e-8) * x.mean(axis=0)


def test_model_stock_matches_its_definition(rng):
    tvs = random_tvs(rng)
    tvs["dense"]["kernel"] = tvs["dense"]["kernel"] + 2.0  # correlated experts: t well inside (0, 1)
    got = sb.merge(tvs, "model_stock")
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(np.asarray(got["dense"][name]), model_stock_numpy(np.asarray(tvs["dense"][name])),
                                   rtol=1e-5, atol=1e-6)
    same = jnp.stack([tvs["dense"]["bias"][0]] * 4)  # identical experts: t = 1, one expert back
    np.testing.assert_allclose(np.asarray(sb.model_stock({"b": same})["b"]), np.asarray(same[0]), rtol=1e-6)
    with pytest.raises(sb.SubboostError, match="at least 2 experts"):
        sb.merge({"b": same[:1]}, "model_stock")


# ----------------------------------------------------------------------------
# WUDI
# ----------------------------------------------------------------------------
def wudi_torch(x: np.ndarray, steps: int, lr: float) -> np.ndarray:
    torch = pytest.importorskip("torch")
    tvs = torch.from_numpy(x)
    merged = torch.nn.Parameter(tvs.sum(0).clone())
    optimiser = torch.optim.Adam([merged], lr=lr)
    norms = tvs.reshape(len(tvs), -1).norm(dim=1) ** 2
    for _ in range(steps):
        loss = (((merged[None] - tvs) @ tvs.transpose(1, 2)) ** 2 / norms[:, None, None]).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return merged.detach().numpy()


@pytest.mark.parametrize("shape", [(N, M), (2, 9)], ids=["tall", "wide"])  # both closed forms of the gradient
def test_wudi_matches_torch_adam_and_lowers_the_loss(rng, shape):
    tvs = {"dense": {"kernel": jnp.asarray(rng.standard_normal((T,) + shape), jnp.float32) * 0.01}}
    x = torch_matrices(tvs)
    got = merged_matrix(sb.merge(tvs, "wudi", steps=30, learning_rate=1e-3))
    np.testing.assert_allclose(got, wudi_torch(x, 30, 1e-3), rtol=1e-4, atol=1e-6)

    def loss(m):
        return sum(np.sum(((m - t) @ t.T) ** 2) / np.sum(t * t) for t in x)

    assert loss(got) < 0.5 * loss(x.sum(0))
    np.testing.assert_allclose(merged_matrix(sb.merge(tvs, "wudi", steps=0)), x.sum(0), rtol=1e-6)


def test_wudi_checks_its_arguments(rng):
    with pytest.raises(sb.SubboostError, match="steps"):
        sb.merge(random_tvs(rng), "wudi", steps=-1)
    with pytest.raises(sb.SubboostError, match="learning_rate"):
        sb.merge(random_tvs(rng), "wudi", learning_rate=0.0)


# ----------------------------------------------------------------------------
# STAR
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("fraction, kept", [(0.5, [6.0, 0.0, 0.0]), (0.6, [3.6, 2.4, 0.0]), (1.0, [3.0, 2.0, 1.0])])
def test_star_known_spectra(rng, fraction, kept):
    """s = (3, 2, 1): the fewest top values reaching f * 6, rescaled to sum 6, in any singular basis."""
    u, v = orthogonal(rng, 3), orthogonal(rng, 3)
    x = u @ np.diag([3.0, 2.0, 1.0]) @ v.T
    tvs = {"dense": {"kernel": jnp.asarray(np.stack([x.T, x.T]), jnp.float32)}}
    got = merged_matrix(sb.merge(tvs, "star", nuclear_fraction=fraction))
    np.testing.assert_allclose(got, u @ np.diag(kept) @ v.T, atol=1e-5)


def test_star_merge_matches_numpy_and_keeps_nuclear_norms(rng):
    tvs = random_tvs(rng)
    x = torch_matrices(tvs)
    want = []
    for t in x:
        u, s, vh = np.linalg.svd(t, full_matrices=False)
        r = int(np.searchsorted(np.cumsum(s), 0.4 * s.sum())) + 1  # the authors' left search
        want.append(u[:, :r] @ np.diag(s[:r] * s.sum() / s[:r].sum()) @ vh[:r])
        assert np.linalg.svd(want[-1], compute_uv=False).sum() == pytest.approx(s.sum())
    got = sb.merge(tvs, "star")
    np.testing.assert_allclose(merged_matrix(got), np.mean(want, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["dense"]["bias"]), np.asarray(tvs["dense"]["bias"]).mean(0), rtol=1e-6)
    with pytest.raises(sb.SubboostError, match="nuclear_fraction"):
        sb.merge(tvs, "star", nuclear_fraction=0.0)


# ----------------------------------------------------------------------------
# CART
# ----------------------------------------------------------------------------
def test_cart_matches_its_definition(rng):
    tvs = random_tvs(rng)
    x = torch_matrices(tvs)
    mean = x.mean(0)
    for fraction, rank in ((0.2, 1), (0.5, 2), (1.0, 5)):  # k = max(1, round(f * 5))
        want = mean.copy()
        for t in x:
            u, s, vh = np.linalg.svd(t - mean, full_matrices=False)
            want += 0.7 * u[:, :rank] @ np.diag(s[:rank]) @ vh[:rank]
        got = sb.merge(tvs, "cart", rank_fraction=fraction, centred_scale=0.7)
        np.testing.assert_allclose(merged_matrix(got), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got["dense"]["bias"]), np.asarray(tvs["dense"]["bias"]).mean(0),
                                   rtol=1e-6)
    # full rank: the centred task vectors sum to zero, CART is weight averaging
    np.testing.assert_allclose(merged_matrix(sb.merge(tvs, "cart", rank_fraction=1.0)), mean, atol=1e-5)
    with pytest.raises(sb.SubboostError, match="rank_fraction"):
        sb.merge(tvs, "cart", rank_fraction=1.5)


@pytest.mark.parametrize("method", ["magmax", "model_stock", "wudi", "star", "cart"])
def test_new_methods_keep_dtype_and_structure(rng, method):
    tvs = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), random_tvs(rng))
    kwargs = {"steps": 3} if method == "wudi" else {}
    got = sb.merge(tvs, method, **kwargs)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda x: x[0], tvs))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(got))
