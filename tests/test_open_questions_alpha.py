"""experiments.alpha_without_validation and experiments.equal_norm on the tiny vision benchmark (issue 15, 1 and 4).

Both reuse the session's tiny models (`tiny_bench_cache`, shared with tests/test_bench.py) and run a reduced
grid (one task count, two methods; two betas) so they stay cheap.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import alpha_without_validation, equal_norm
from tests.trees import perturbed, vit_like_params


def test_rescale_to_and_top_k_on_a_vit_like_tree():
    rng = np.random.default_rng(0)
    base = vit_like_params(rng)
    tau = jax.tree_util.tree_map(lambda e, b: jnp.asarray(e - b), perturbed(base, rng, num=1)[0], base)
    reference = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tau)
    matched = equal_norm.rescale_to(tau, reference)
    np.testing.assert_allclose(equal_norm.matrix_norms(matched), equal_norm.matrix_norms(reference), rtol=1e-5)
    for x, r, t in zip(*(jax.tree_util.tree_leaves(v) for v in (matched, reference, tau))):
        np.testing.assert_allclose(np.linalg.norm(x), np.linalg.norm(r), rtol=1e-5)
        np.testing.assert_allclose(np.abs(np.vdot(x, t)), np.linalg.norm(x) * np.linalg.norm(t), rtol=1e-4)  # parallel
    truncated = equal_norm.top_k(tau, 0.0)  # k = 0: rank one
    plan = equal_norm.matrix_plan(truncated)
    for x in plan.gather(truncated).values():
        s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
        assert np.all(s[..., 1:] <= 1e-5 * s[..., :1])
    full = equal_norm.top_k(tau, 1.0)  # k = r - 1: unchanged
    for x, t in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(tau)):
        np.testing.assert_allclose(x, t, atol=1e-5)


@pytest.fixture(scope="module")
def alpha_run(tiny_bench_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("alpha_without_validation")
    return out, alpha_without_validation.run(size="tiny", out=out, cache_dir=tiny_bench_cache, progress=False,
                                             task_counts=(4,), methods=("task_arithmetic", "iso_c"),
                                             log=lambda _: None)


def test_alpha_rules_on_the_tiny_benchmark(alpha_run):
    out, results = alpha_run
    assert {p.name for p in out.iterdir()} >= set(alpha_without_validation.RESULT_FILES)
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    grid = results["alpha_grid"]
    assert len(results["rows"]) == 4  # 2 methods x plain/boosted
    for row in results["rows"]:
        for rule in ("hogsvd", "norm"):
            alpha = row[rule]["alpha"]
            assert np.isfinite(alpha) and grid[0] <= alpha <= grid[-1], (row["method"], rule, alpha)
            assert row[rule]["gap"] == pytest.approx(row[rule]["normalized"] - row["tuned"]["normalized"])
        assert 0.0 < row["tuned"]["normalized"] <= 1.5
        assert grid[0] / 2 <= row["tuned"]["alpha"] <= grid[-1] * 2
    iso = {r["boosted"]: r for r in results["rows"] if r["method"] == "iso_c"}
    # Iso-C's spectrum is flat already: boosting leaves it (and so every rule's alpha) unchanged.
    assert iso[True]["hogsvd"]["alpha"] == pytest.approx(iso[False]["hogsvd"]["alpha"], rel=1e-3)
    assert iso[True]["norm"]["alpha"] == pytest.approx(iso[False]["norm"]["alpha"], rel=1e-4)
    ta = {r["boosted"]: r for r in results["rows"] if r["method"] == "task_arithmetic"}
    # Boosting raises the small singular values, so the norm rule asks for a smaller alpha.
    assert ta[True]["norm"]["alpha"] < ta[False]["norm"]["alpha"]
    assert "| 4 | task_arithmetic | no |" in (out / "results.md").read_text()


@pytest.fixture(scope="module")
def norm_run(tiny_bench_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("equal_norm")
    return out, equal_norm.run(size="tiny", out=out, cache_dir=tiny_bench_cache, progress=False, betas=(0.0, 1.0),
                               log=lambda _: None)


def test_equal_norm_variants_have_equal_norms(norm_run):
    out, results = norm_run
    assert {p.name for p in out.iterdir()} >= set(equal_norm.RESULT_FILES)
    rows = {r["beta"]: r for r in results["rows"]}
    for row in rows.values():
        target = row["boosted"]["norm"]
        for name in equal_norm.MATCHED:
            assert row[name]["norm"] == pytest.approx(target, rel=1e-4), name
            if name != "ta_global":
                assert row[name]["max_matrix_norm_deviation"] < 1e-4, name
        assert row["shape_effect"] == pytest.approx(row["boosted"]["normalized"] - row["ta_matched"]["normalized"])
    # beta = 0 raises every singular value to s_0: Iso-C's flat shape, so at equal per-matrix norms the two
    # are the same task vector (up to rounding).
    assert rows[0.0]["iso_c_matched"]["normalized"] == pytest.approx(rows[0.0]["boosted"]["normalized"], abs=0.01)
    assert rows[0.0]["mean_cutoff_index"] == 0.0
    # beta = 1 leaves the spectrum as it is: boosted TA is TA, and TA matched to it is TA at the same alpha.
    ta = results["baselines"]["ta_tuned"]
    assert rows[1.0]["boosted"]["normalized"] == pytest.approx(ta["normalized"], abs=0.01)
    assert rows[1.0]["ta_matched"]["normalized"] == pytest.approx(ta["normalized"], abs=0.01)
    assert rows[1.0]["boosted"]["norm"] == pytest.approx(ta["norm"], rel=1e-3)
