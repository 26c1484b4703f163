"""Rank-collapse analysis, plots (PNG + JSON) and the ``subboost analyze`` command."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import plots
from subboost.analysis import layer_type
from subboost.cli import main
from subboost.checkpoint_io.task_vectors_npz import load_task_vectors_npz, save_task_vectors_npz
from subboost.errors import SubboostError
from tests import numpy_reference as ref
from tests.trees import dense_tree, vit_like_params

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def collapsing_experts(num=4, n=6, c=2.0):
    """tau_t = c e_0 e_0^T + e_t e_t^T: the TA sum of n experts has singular values (c n, 1 x n, 0, ...)."""
    eye = np.eye(n)
    return [c * np.outer(eye[0], eye[0]) + np.outer(eye[t], eye[t]) for t in range(1, num + 1)]


@pytest.fixture(scope="module")
def random_tvs():
    rng = np.random.default_rng(0)
    return dense_tree(bias=True, layers={
        f"block_{i}/{kind}": [rng.standard_normal(shape) for _ in range(3)]
        for i in range(2) for kind, shape in (("fc1", (6, 4)), ("fc2", (4, 6)))
    })


@pytest.fixture(scope="module")
def random_curves(random_tvs):
    return sb.rank_collapse(random_tvs, "task_arithmetic", beta=0.01, progress=False)


def test_layer_type():
    assert layer_type("transformer/resblocks_11/mlp/c_fc") == "transformer/resblocks_*/mlp/c_fc"
    assert layer_type("layers/3/fc1") == "layers/*/fc1"
    assert layer_type("encoder/fc2") == "encoder/fc2"


@pytest.mark.slow
def test_rank_collapse_known_answer():
    experts = collapsing_experts()
    tvs = dense_tree(bias=True, layers={"block_0/fc": experts, "block_1/fc": experts})
    curves = sb.rank_collapse(tvs, "task_arithmetic", beta=0.01, progress=False)
    assert curves.num_experts == (1, 2, 3, 4)
    counts = np.arange(1, 5)
    for name in ("block_0/fc", "block_1/fc"):
        # stable rank 1 + n / (c n)^2 falls towards 1 as experts are added: rank collapse
        np.testing.assert_allclose(curves.stable_rank[name], 1 + 1 / (4 * counts), rtol=1e-5)
        assert curves.energy_rank[name].tolist() == [2, 3, 3, 2]
        np.testing.assert_allclose(curves.spectra[name][1], [4, 1, 1, 0, 0, 0], atol=1e-5)
        # beta = 0.01 cuts at index 0: every singular value is raised to s_0 -> full rank 6
        np.testing.assert_allclose(curves.stable_rank_boosted[name], 6.0, rtol=1e-5)
        assert curves.energy_rank_boosted[name].tolist() == [6, 6, 6, 6]
    by_type = curves.by_layer_type("stable_rank")
    assert list(by_type) == ["block_*/fc"] and by_type["block_*/fc"].shape == (4, 2)


@pytest.mark.slow
def test_rank_collapse_matches_numpy_and_subspace_boost(random_tvs, random_curves):
    flat = ref.flat(jax.tree_util.tree_map(np.asarray, random_tvs))
    order = (2, 0, 1)
    reordered = sb.rank_collapse(random_tvs, "task_arithmetic", order=order, counts=[2, 3], beta=0.02,
                                 fraction=0.8, progress=False)
    assert reordered.num_experts == (2, 3) and reordered.order == order
    for path, stacked in flat.items():
        if not path.endswith("kernel"):
            continue
        name = path.rsplit("/", 1)[0]
        for j, n in enumerate(random_curves.num_experts):
            merged = ref.torch_matrix(path, stacked[:n].sum(axis=0))
            assert random_curves.stable_rank[name][j] == pytest.approx(ref.stable_rank(merged), rel=1e-4)
            assert random_curves.energy_rank[name][j] == ref.energy_rank(merged, 0.95)
            boosted = ref.boost_matrix(merged, 0.01)
            assert random_curves.stable_rank_boosted[name][j] == pytest.approx(ref.stable_rank(boosted), rel=1e-4)
        for j, n in enumerate(reordered.num_experts):
            merged = ref.torch_matrix(path, stacked[list(order[:n])].sum(axis=0))
            assert reordered.stable_rank[name][j] == pytest.approx(ref.stable_rank(merged), rel=1e-4)
            assert reordered.energy_rank[name][j] == ref.energy_rank(merged, 0.8)
    # the boosted curve equals the end-to-end path sb.merge -> sb.subspace_boost -> sb.stable_rank
    boosted = sb.subspace_boost(sb.merge(random_tvs, "task_arithmetic"), beta=0.01)
    for name, value in sb.stable_rank(boosted).items():
        assert random_curves.stable_rank_boosted[name][-1] == pytest.approx(float(value), rel=1e-4)


@pytest.mark.slow
def test_rank_collapse_other_methods_and_errors(random_tvs):
    curves = sb.rank_collapse(random_tvs, "ties", counts=[3], beta=None, progress=False, k=0.5)
    direct = sb.stable_rank(sb.merge(random_tvs, "ties", k=0.5))
    for name, value in direct.items():
        assert curves.stable_rank[name][0] == pytest.approx(float(value), rel=1e-5)
    assert curves.stable_rank_boosted is None
    with pytest.raises(ValueError, match="merging the first 1 experts with 'consensus' failed"):
        sb.rank_collapse(random_tvs, "consensus", progress=False)
    with pytest.raises(ValueError, match="order must be a permutation of range\\(3\\)"):
        sb.rank_collapse(random_tvs, order=[0, 0, 1], progress=False)
    with pytest.raises(ValueError, match="counts must lie in \\[1, 3\\]"):
        sb.rank_collapse(random_tvs, counts=[0, 2], progress=False)
    with pytest.raises(ValueError, match="fraction must be in"):
        sb.rank_collapse(random_tvs, fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="beta must be in"):
        sb.rank_collapse(random_tvs, beta=2.0, progress=False)
    bad = jax.tree_util.tree_map(lambda x: x, random_tvs)
    bad["block_0"]["fc1"]["kernel"] = bad["block_0"]["fc1"]["kernel"].at[0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="'block_0/fc1/kernel' contains NaN"):
        sb.rank_collapse(bad, progress=False)


@pytest.mark.slow
def test_rank_collapse_reads_attention_the_same_way_in_merge_and_spectra():
    rng = np.random.default_rng(1)
    tvs = jax.tree_util.tree_map(lambda x: jnp.stack([x, 0.5 * x[::-1], -x + 0.2]), vit_like_params(rng, layers=1))
    curves = sb.rank_collapse(tvs, "tsv", counts=[2], beta=0.01, mode="index", attention="full", progress=False)
    subset = jax.tree_util.tree_map(lambda x: x[:2], tvs)
    want = sb.spectra(sb.merge(subset, "tsv", attention="full"), attention="full")
    other = sb.spectra(sb.merge(subset, "tsv", attention="per_qkv"), attention="full")
    name = "transformer/resblocks_0/attn/qkv"
    assert not np.allclose(np.asarray(other[name]), np.asarray(want[name]), atol=1e-4)  # the test can fail
    for path, values in want.items():
        np.testing.assert_allclose(curves.spectra[path][0], np.asarray(values), rtol=1e-5, atol=1e-6)
    assert curves.mode == "index"
    np.testing.assert_allclose(curves.spectra_boosted[name][0],
                               np.asarray(sb.boost_singular_values(jnp.asarray(want[name]), beta=0.01, mode="index")), rtol=1e-6)


def read_json(png_path) -> dict:
    with open(plots.json_path(png_path)) as f:
        return json.load(f)


def assert_png(path):
    data = open(path, "rb").read()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


@pytest.mark.slow
def test_plots_write_png_and_json_matching_the_arrays(tmp_path, random_tvs, random_curves):
    names = ["a", "b", "c", "merged"]
    merged = sb.merge(random_tvs, "task_arithmetic")
    sigmas = sb.generalized_singular_values(random_tvs, merged)
    pooled = plots.pool_generalized_singular_values(sigmas, names, num_experts=3)
    data = plots.plot_gsv_distributions(pooled, tmp_path / "gsv.png", bins=10)
    assert_png(tmp_path / "gsv.png")
    assert read_json(tmp_path / "gsv.png") == data
    every = {name: np.concatenate([np.asarray(s)[i].ravel() for s in sigmas.values()]) for i, name in enumerate(names)}
    for name in names:  # full-rank layers: no absent directions, so every value is pooled
        np.testing.assert_allclose(np.sort(pooled[name]), np.sort(every[name]), rtol=1e-6)
        assert data["stats"][name]["median"] == pytest.approx(float(np.median(every[name])), rel=1e-5)
        assert data["stats"][name]["count"] == every[name].size
        density = np.histogram(every[name], bins=np.asarray(data["bin_edges"]), density=True)[0]
        np.testing.assert_allclose(data["density"][name], density, rtol=1e-5)

    alignment = np.asarray(sb.alignment_matrix(random_tvs, merged))
    data = plots.plot_alignment(alignment, names, tmp_path / "alignment.png")
    assert_png(tmp_path / "alignment.png")
    assert read_json(tmp_path / "alignment.png")["names"] == names
    np.testing.assert_allclose(read_json(tmp_path / "alignment.png")["matrix"], alignment, rtol=1e-6)

    data = plots.plot_rank_collapse(random_curves, tmp_path / "ranks.png")
    assert_png(tmp_path / "ranks.png")
    saved = read_json(tmp_path / "ranks.png")
    assert saved["num_experts"] == [1, 2, 3] and saved["beta"] == 0.01
    for path in random_curves.stable_rank:
        np.testing.assert_allclose(saved["layers"][path]["stable_rank"], random_curves.stable_rank[path], rtol=1e-6)
        np.testing.assert_allclose(saved["layers"][path]["energy_rank_boosted"],
                                   random_curves.energy_rank_boosted[path])
    fc = np.stack([random_curves.stable_rank["block_0/fc1"], random_curves.stable_rank["block_1/fc1"]], axis=1)
    np.testing.assert_allclose(saved["layer_types"]["block_*/fc1"]["stable_rank"]["mean"], fc.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(saved["layer_types"]["block_*/fc1"]["stable_rank"]["max"], fc.max(axis=1), rtol=1e-6)

    data = plots.plot_spectra_evolution(random_curves, tmp_path / "spectra.png")
    assert_png(tmp_path / "spectra.png")
    s = np.stack([random_curves.spectra["block_0/fc2"], random_curves.spectra["block_1/fc2"]], axis=1)
    np.testing.assert_allclose(read_json(tmp_path / "spectra.png")["layer_types"]["block_*/fc2"],
                               (s / s[..., :1]).mean(axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit 2 names"):
        plots.plot_alignment(alignment, ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="must end in .png"):
        plots.plot_alignment(alignment, names, tmp_path / "bad.jpg")


@pytest.mark.slow
def test_analyze_command_from_npz_and_from_checkpoints(tmp_path, random_tvs, capsys):
    npz = tmp_path / "tvs.npz"
    save_task_vectors_npz(npz, random_tvs, names=["cars", "dtd", "svhn"])
    loaded, names = load_task_vectors_npz(npz)
    assert names == ["cars", "dtd", "svhn"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, jax.tree_util.tree_map(np.asarray, random_tvs))

    out = tmp_path / "analysis"
    assert main(["analyze", str(npz), "--out", str(out)]) == 0
    for stem in ("gsv_distributions", "alignment", "rank_collapse", "spectra", "spectra_boosted"):
        assert_png(out / f"{stem}.png")
        assert (out / f"{stem}.json").stat().st_size > 0
    saved = json.loads((out / "alignment.json").read_text())
    assert saved["names"] == ["cars", "dtd", "svhn", "merged (task_arithmetic)"]
    expected = sb.alignment_matrix(random_tvs, sb.merge(random_tvs, "task_arithmetic"))
    np.testing.assert_allclose(saved["matrix"], np.asarray(expected), atol=1e-6)
    curves = sb.rank_collapse(random_tvs, beta=0.01, progress=False)
    ranks = json.loads((out / "rank_collapse.json").read_text())
    np.testing.assert_allclose(ranks["layers"]["block_1/fc2"]["stable_rank"], curves.stable_rank["block_1/fc2"],
                               rtol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experts"] == ["cars", "dtd", "svhn"] and summary["pi"] == pytest.approx(1 / 3)
    assert summary["selected_experts"]["2"] == [["cars", "dtd", "svhn"][i] for i in sb.select_experts(random_tvs, k=2)]

    # existing results are never replaced without --overwrite (checked before loading anything)
    capsys.readouterr()
    assert main(["analyze", str(npz), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err

    # checkpoints against a base, replacing the earlier results
    from subboost.checkpoints import save_params

    base = jax.tree_util.tree_map(lambda x: jnp.ones_like(x[0]), random_tvs)
    paths = []
    for t in range(3):
        paths.append(str(tmp_path / f"expert_{t}"))
        save_params(jax.tree_util.tree_map(lambda b, x: b + x[t], base, random_tvs), paths[-1])
    save_params(base, tmp_path / "base")
    code = main(["analyze", *paths, "--base", str(tmp_path / "base"), "--out", str(out), "--overwrite",
                 "--no-boost", "--names", "x,y,z"])
    assert code == 0
    saved = json.loads((out / "alignment.json").read_text())
    assert saved["names"] == ["x", "y", "z", "merged (task_arithmetic)"]
    np.testing.assert_allclose(saved["matrix"], np.asarray(expected), atol=1e-5)
    assert json.loads((out / "rank_collapse.json").read_text())["beta"] is None


def test_analyze_command_bad_input(tmp_path, random_tvs, capsys):
    npz = tmp_path / "tvs.npz"
    save_task_vectors_npz(npz, random_tvs)
    one = tmp_path / "one.npz"
    save_task_vectors_npz(one, jax.tree_util.tree_map(lambda x: x[:1], random_tvs))
    cases = [
        (["analyze", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o1")], "does not exist"),
        (["analyze", str(npz), "--base", "b", "--out", str(tmp_path / "o2")], "--base is not used with an .npz"),
        (["analyze", "ckpt_a", "ckpt_b", "--out", str(tmp_path / "o3")], "--base BASE is required"),
        (["analyze", str(one), "--out", str(tmp_path / "o4")], "at least 2 experts, got 1"),
        (["analyze", str(npz), "--names", "a,b", "--out", str(tmp_path / "o5")], "--names gives 2 names for 3 experts"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
        assert not (tmp_path / argv[-1]).exists()  # nothing is created for invalid input


def test_analysis_output_rule_speaks_the_callers_language(tmp_path):
    from subboost.expert_analysis import check_analysis_output
    from subboost.outputs import ANALYSIS_FORMAT

    out = tmp_path / "analysis"
    assert check_analysis_output(out) == out  # new: fine
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert check_analysis_output(out) == out  # files of other names are left alone
    (out / "alignment.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match=r"out '.*' already holds alignment.png; pass overwrite=True"):
        check_analysis_output(out)
    with pytest.raises(FileExistsError, match=r"--out '.*' already holds alignment.png; pass --overwrite"):
        check_analysis_output(out, name="--out")
    with pytest.raises(FileExistsError, match="no summary.json of an earlier analysis; refusing"):
        check_analysis_output(out, overwrite=True)
    (out / "summary.json").write_text('{"figures": {}, "experts": ["a", "b"]}')  # no format field: not ours
    with pytest.raises(FileExistsError, match="no summary.json of an earlier analysis; refusing"):
        check_analysis_output(out, overwrite=True)
    (out / "summary.json").write_text(json.dumps({"format": ANALYSIS_FORMAT, "figures": {}, "experts": ["a", "b"]}))
    assert check_analysis_output(out, overwrite=True) == out
    with pytest.raises(SubboostError, match="lies inside the input"):
        check_analysis_output(out, inputs=[tmp_path])
