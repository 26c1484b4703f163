"""Reference conventions (`subboost.reference`), attn_beta and rank_rtol.

Each convention is checked against an independent torch implementation written
from the issue text (float64), on random-init open_clip towers converted by
subboost, and against FusionBench's own Iso-C and TSV-M on a random-init Hugging
Face ``CLIPVisionModel``. Agreement is the worst, over parameters, of
``max|subboost - reference| / max|reference|`` on the merged task vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import reference
from subboost.convert import hf as hf_convert
from subboost.convert import open_clip as oc_convert
from subboost.tree import leaves_with_paths
from tests import numpy_reference as ref

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

RTOL = 1e-4
NUM_TASKS = 3
TINY_VISION = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}
TINY_TEXT = {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}


# ----------------------------------------------------------------------------
# Independent torch implementations (float64), on state dicts
# ----------------------------------------------------------------------------
def _polar(x):
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_torch(tvs: list[dict], is_matrix) -> dict:
    out, num = {}, len(tvs)
    for key in tvs[0]:
        xs = [tv[key] for tv in tvs]
        if not is_matrix(key, xs[0]):
            out[key] = sum(xs) / num
            continue
        r = min(xs[0].shape) // num
        us, ss, vs = zip(*(torch.linalg.svd(x, full_matrices=False) for x in xs))
        u = torch.cat([u[:, :r] for u in us], 1)
        s = torch.cat([s[:r] for s in ss])
        vh = torch.cat([vh[:r] for vh in vs], 0)
        out[key] = _polar(u) @ torch.diag(s) @ _polar(vh)
    return out


def iso_c_torch(tvs: list[dict], is_matrix) -> dict:
    out = {}
    for key in tvs[0]:
        total = sum(tv[key] for tv in tvs)
        if not is_matrix(key, total):
            out[key] = total / len(tvs)
            continue
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        out[key] = u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh
    return out


def iso_cts_torch(tvs: list[dict], is_matrix, fraction: float = 0.8) -> dict:
    out, num = {}, len(tvs)
    for key in tvs[0]:
        total = sum(tv[key] for tv in tvs)
        if not is_matrix(key, total):
            out[key] = total / num
            continue
        size = min(total.shape)
        common = int(size * fraction)
        common = size - round((size - common) / num) * num
        per_task = (size - common) // num
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        uc, sc, vc = u[:, :common], s[:common], vh[:common]
        parts_u, parts_s, parts_v = [uc], [sc], [vc]
        for tv in tvs:
            ut, st, vt = torch.linalg.svd(tv[key] - uc @ (uc.T @ tv[key]), full_matrices=False)
            parts_u.append(ut[:, :per_task]); parts_s.append(st[:per_task]); parts_v.append(vt[:per_task])
        su = torch.cat(parts_s)
        out[key] = _polar(torch.cat(parts_u, 1)) @ torch.diag(torch.full_like(su, float(su.mean()))) \
            @ _polar(torch.cat(parts_v, 0))
    return out


def boost_matrix_torch(x, beta: float, rank_rtol: float | None = None):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if rank_rtol is not None:
        s = torch.where(s > rank_rtol * s[0], s, torch.zeros_like(s))
    if float(s.sum()) == 0:
        return torch.zeros_like(x)
    k = int(torch.nonzero(torch.cumsum(s, 0) / s.sum() >= beta)[0])
    boosted = torch.clamp(s, min=float(s[k]))
    if rank_rtol is not None:
        boosted = torch.where(s > 0, boosted, torch.zeros_like(s))
    return u @ torch.diag(boosted) @ vh


def boost_open_clip_torch(tau: dict, beta: float, attn_beta: float) -> dict:
    """Subspace Boosting with the reference port's choices on open_clip keys."""
    out = dict(tau)
    for key, x in tau.items():
        if key.endswith("attn.in_proj_weight"):  # split into q, k, v; attention cutoff
            out[key] = torch.cat([boost_matrix_torch(w, attn_beta) for w in torch.split(x, x.shape[1], 0)], 0)
        elif key.endswith(("attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")) or key == "proj":
            out[key] = boost_matrix_torch(x, beta)
    return out


def every_2d(key, x) -> bool:
    return x.ndim == 2


# ----------------------------------------------------------------------------
# Models and conversion
# ----------------------------------------------------------------------------
def _perturbed(module, seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module


def _float_state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.fixture(scope="module")
def open_clip_towers():
    """(base, [experts]) state dicts of a random-init open_clip vision tower."""
    torch.manual_seed(0)
    visual = open_clip.model.CLIP(16, TINY_VISION, TINY_TEXT, quick_gelu=True).visual
    base = _float_state(_perturbed(visual, 0, 0.1))
    experts = []
    for t in range(NUM_TASKS):
        gen = torch.Generator().manual_seed(100 + t)
        experts.append({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
    return base, experts


def convert_open_clip(state: dict) -> dict:
    params, _, _ = oc_convert.convert_state_dict({k: v.numpy() for k, v in state.items()}, source="test",
                                               overrides={"heads": 2})
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def task_vectors_of(base: dict, experts: list[dict]) -> list[dict]:
    return [{k: (e[k] - base[k]).double() for k in base} for e in experts]


def worst_relative_error(got, want, skip=()) -> tuple[float, str]:
    """``max over leaves of max|got - want| / max|want|`` and the worst leaf."""
    want = dict(leaves_with_paths(want))
    worst, where = 0.0, ""
    for path, x in leaves_with_paths(got):
        if path in skip:
            continue
        w = np.asarray(want[path], np.float64)
        err = float(np.abs(np.asarray(x, np.float64) - w).max() / max(np.abs(w).max(), 1e-30))
        if err > worst:
            worst, where = err, path
    return worst, where


def sb_task_vectors(base: dict, experts: list[dict], convert) -> tuple:
    base_params = convert(base)
    return sb.task_vectors(base_params, [convert(e) for e in experts])


# ----------------------------------------------------------------------------
# open_clip: TSV-M, Iso-C, Iso-CTS, boosting under reference_settings
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("method, torch_fn", [("tsv", tsv_torch), ("iso_c", iso_c_torch), ("iso_cts", iso_cts_torch)])
@pytest.mark.slow
def test_svd_merges_match_every_2d_tensor_reference(open_clip_towers, method, torch_fn):
    base, experts = open_clip_towers
    tvs = task_vectors_of(base, experts)
    want = convert_open_clip({k: v.float() for k, v in torch_fn(tvs, every_2d).items()})
    stacked = sb_task_vectors(base, experts, convert_open_clip)
    got = sb.merge(stacked, method, **sb.reference_settings(method))
    error, where = worst_relative_error(got, want)
    print(f"{method} reference conventions vs torch (every 2-D tensor, in_proj whole): {error:.2e} at {where}")
    assert error < RTOL, where
    if method == "iso_c":  # the conventions matter: subboost's defaults average proj and the positional embedding
        default_error, _ = worst_relative_error(sb.merge(stacked, method), want)
        assert default_error > 1e-2


@pytest.mark.slow
def test_full_attention_is_in_proj_weight(open_clip_towers):
    """attention="full" stacks q/k/v exactly as open_clip's in_proj_weight (one (3D, D) matrix)."""
    base, experts = open_clip_towers
    tvs = task_vectors_of(base, experts)
    key = "transformer.resblocks.0.attn.in_proj_weight"
    in_proj = {key: tvs[0][key]}
    s_want = torch.linalg.svdvals(in_proj[key]).numpy()
    tau = jax.tree_util.tree_map(lambda x: x[0], sb_task_vectors(base, experts, convert_open_clip))
    spectra = sb.spectra(tau, attention="full", is_matrix=reference.every_2d_matrix)
    got = np.asarray(spectra["transformer/resblocks_0/attn/qkv"])
    np.testing.assert_allclose(got, s_want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_boost_matches_reference_port(open_clip_towers):
    base, experts = open_clip_towers
    tvs = task_vectors_of(base, experts)
    tau_torch = {k: sum(tv[k] for tv in tvs) for k in tvs[0]}
    settings = sb.reference_settings("subspace_boost")
    assert (settings["beta"], settings["attn_beta"]) == (0.01, 0.10)
    want = convert_open_clip({k: v.float() for k, v in boost_open_clip_torch(tau_torch, 0.01, 0.10).items()})
    tau = sb.merge(sb_task_vectors(base, experts, convert_open_clip), "task_arithmetic")
    got = sb.subspace_boost(tau, **settings)
    error, where = worst_relative_error(got, want)
    print(f"boost reference conventions vs torch port (attn_beta 0.10 on q/k/v, proj boosted): {error:.2e} at {where}")
    assert error < RTOL, where
    # attn_beta and the projection both change the result.
    no_attn = sb.subspace_boost(tau, **{**settings, "attn_beta": None})
    assert worst_relative_error(no_attn, want)[0] > 1e-2
    no_proj = sb.subspace_boost(tau, **{**settings, "is_matrix": None})
    assert worst_relative_error(no_proj, want)[0] > 1e-2


def test_consensus_ties_masks_from_ties_with_disjoint_sum(rng):
    tvs = {"w": jnp.asarray(rng.standard_normal((4, 6, 5)), jnp.float32)}
    kw = sb.reference_settings("consensus_ties")
    got = np.asarray(sb.merge(tvs, "consensus", lambdas=0.4, **kw)["w"])
    x = np.asarray(tvs["w"], np.float64)
    t = np.asarray(sb.ties(tvs, k=0.2, merge="sum")["w"], np.float64)
    mask = (np.abs(x) > 0.4 * np.abs(t[None] - x)).sum(0) >= 2
    np.testing.assert_allclose(got, np.where(mask, t, 0), rtol=1e-6, atol=1e-6)
    # the paper's definition (masks against the sum) differs
    other = (np.abs(x) > 0.4 * np.abs(x.sum(0)[None] - x)).sum(0) >= 2
    assert (mask != other).any()


def test_reference_ties_k_matches_open_clip_counts():
    with torch.device("meta"):  # shapes only, nothing allocated
        visual = open_clip.model.CLIP(512, {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                                      {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                                       "layers": 1})
    vision = sum(p.numel() for p in visual.visual.parameters())
    assert reference.vision_parameter_count("ViT-B/32") == vision
    leftover = sum(p.numel() for n, p in visual.named_parameters()
                   if n in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                            "text_projection", "logit_scale"))
    assert reference.reference_ties_k("ViT-B/32") == pytest.approx(0.2 * (vision + leftover) / vision)
    assert reference.reference_ties_k("ViT-B/32") == pytest.approx(0.258, abs=1e-3)
    assert reference.reference_ties_k("ViT-L/14") == pytest.approx(0.225, abs=1e-3)


# ----------------------------------------------------------------------------
# FusionBench parity on a Hugging Face CLIPVisionModel
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_towers():
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    base = _float_state(_perturbed(transformers.CLIPVisionModel(config), 0, 0.1))
    experts = []
    for t in range(NUM_TASKS):
        gen = torch.Generator().manual_seed(200 + t)
        experts.append({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
    return config.to_dict(), base, experts


@pytest.mark.slow
def test_fusion_bench_iso_c_and_tsv_m_parity(hf_towers):
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c as fb_iso_c
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    hf_config, base, experts = hf_towers

    def convert(state):
        params, _, _ = hf_convert.convert_state_dict({k: v.numpy() for k, v in state.items()}, source="test",
                                                     hf_config=hf_config)
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)

    tvs_torch = [{k: e[k] - base[k] for k in base} for e in experts]
    stacked = sb_task_vectors(base, experts, convert)
    # CLIPVisionModel has no projection: the converter's identity proj has a zero task vector.
    for method, fusion_bench in (("iso_c", lambda tvs: fb_iso_c(tvs, accelerator="cpu")),
                                 ("tsv", lambda tvs: compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"))):
        merged = fusion_bench([{k: v.clone() for k, v in tv.items()} for tv in tvs_torch])
        want = convert({k: base[k] + merged[k] for k in base})
        want = jax.tree_util.tree_map(lambda w, b: w - b, want, convert(base))
        got = sb.merge(stacked, method, **sb.reference_settings(method, family="hf_clip"))
        error, where = worst_relative_error(got, want, skip=("proj",))
        print(f"FusionBench {method} vs subboost hf_clip reference settings: {error:.2e} at {where}")
        assert error < RTOL, where
        assert float(jnp.abs(got["proj"]).max()) == 0.0


# ----------------------------------------------------------------------------
# attn_beta and rank_rtol
# ----------------------------------------------------------------------------
def attention_tree(rng) -> dict:
    """One block whose q/k/v, out and MLP kernels share a (16, 16) group."""
    kernel3 = lambda: jnp.asarray(rng.standard_normal((16, 2, 8)), jnp.float32)  # noqa: E731
    return {"attn": {"query": {"kernel": kernel3()}, "key": {"kernel": kernel3()}, "value": {"kernel": kernel3()},
                     "out": {"kernel": jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)}},
            "mlp": {"kernel": jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)}}


def test_attn_beta_applies_to_qkv_only(rng, solver="svd"):  # the split is solver-independent (mesh: test_sharding)
    tau = attention_tree(rng)
    got = sb.subspace_boost(tau, beta=0.01, attn_beta=0.3, solver=solver)
    for name in ("query", "key", "value"):
        m = np.asarray(tau["attn"][name]["kernel"]).reshape(16, 16).T
        want = ref.boost_matrix(m, 0.3).T.reshape(16, 2, 8)
        np.testing.assert_allclose(np.asarray(got["attn"][name]["kernel"]), want, rtol=1e-4, atol=1e-4)
    out = np.asarray(tau["attn"]["out"]["kernel"]).reshape(16, 16).T
    np.testing.assert_allclose(np.asarray(got["attn"]["out"]["kernel"]).reshape(16, 16).T,
                               ref.boost_matrix(out, 0.01), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got["mlp"]["kernel"]).T, ref.boost_matrix(np.asarray(tau["mlp"]["kernel"]).T,
                                                                                  0.01), rtol=1e-4, atol=1e-4)
    same = sb.subspace_boost(tau, beta=0.01, attn_beta=0.01, solver=solver)
    chex_equal = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                        same, sb.subspace_boost(tau, beta=0.01, solver=solver))
    assert all(jax.tree_util.tree_leaves(chex_equal))


def rank_deficient_tree(rng) -> dict:
    low_rank = lambda m, n, r: rng.standard_normal((m, r)) @ rng.standard_normal((r, n))  # noqa: E731
    sparse = np.zeros((20, 24))
    sparse[rng.integers(0, 20, 6), rng.integers(0, 24, 6)] = rng.standard_normal(6)  # a TIES-trimmed layer
    tree = {"a": {"kernel": low_rank(20, 24, 5)}, "b": {"kernel": low_rank(20, 24, 12)},
            "c": {"kernel": sparse}, "d": {"kernel": rng.standard_normal((20, 24))}}
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


@pytest.mark.parametrize("solver", ["svd", "polar"])
@pytest.mark.slow
def test_rank_rtol_keeps_the_null_space_at_zero(rng, solver):
    tau = rank_deficient_tree(rng)
    got, report = sb.subspace_boost(tau, beta=0.01, rank_rtol=1e-5, solver=solver, return_info=True)
    worst = 0.0
    for name in tau:
        m = torch.from_numpy(np.asarray(tau[name]["kernel"], np.float64).T)
        want = boost_matrix_torch(m, 0.01, rank_rtol=1e-5).numpy().T
        err = np.abs(np.asarray(got[name]["kernel"]) - want).max() / np.abs(want).max()
        worst = max(worst, err)
    print(f"rank_rtol=1e-5, solver={solver} vs torch: {worst:.2e}")
    assert worst < RTOL
    assert report.rank_deficient == ("a", "b", "c") and report.ambiguous == () and report.rank_warning() is None
    if solver == "svd":  # without rank_rtol the same matrices are flagged, with a one-line warning
        _, default = sb.subspace_boost(tau, beta=0.01, solver=solver, return_info=True)
        assert default.ambiguous == ("a", "b", "c")
        assert "3 rank-deficient matrices (a, b, c)" in default.rank_warning()


@pytest.mark.slow
def test_rank_rtol_svd_and_polar_agree(rng):
    tau = rank_deficient_tree(rng)
    svd = sb.subspace_boost(tau, beta=0.01, rank_rtol=1e-5, solver="svd")
    polar, report = sb.subspace_boost(tau, beta=0.01, rank_rtol=1e-5, solver="polar", return_info=True)
    error, where = worst_relative_error(polar, svd)
    print(f"rank_rtol=1e-5: polar vs svd {error:.2e} at {where}")
    assert error < RTOL, where
    assert set(report.fallbacks) == {"a", "b", "c"}  # the rank-deficient ones go through the SVD path


def test_bad_attn_beta_and_rank_rtol_are_named(rng):
    tau = rank_deficient_tree(rng)
    with pytest.raises(sb.SubboostError, match="attn_beta"):
        sb.subspace_boost(tau, beta=0.01, attn_beta=1.5)
    with pytest.raises(sb.SubboostError, match="rank_rtol"):
        sb.subspace_boost(tau, beta=0.01, rank_rtol=0.0)


@pytest.mark.slow
def test_cli_warns_about_rank_deficient_matrices(rng, tmp_path, capsys):
    from subboost import cli

    tree = rank_deficient_tree(rng)
    sb.save_params(jax.tree_util.tree_map(jnp.zeros_like, tree), tmp_path / "base")
    sb.save_params(tree, tmp_path / "merged")
    common = ["--base", str(tmp_path / "base"), "--beta", "0.01"]
    assert cli.main(["boost", str(tmp_path / "merged"), *common, "--out", str(tmp_path / "plain")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "rank-deficient" in line]
    assert len(warnings) == 1 and "3 rank-deficient matrices (a, b, c)" in warnings[0] and "--rank-rtol" in warnings[0]
    assert cli.main(["boost", str(tmp_path / "merged"), *common, "--rank-rtol", "1e-5", "--attn-beta", "0.1",
                     "--out", str(tmp_path / "defined")]) == 0
    assert "rank-deficient" not in capsys.readouterr().err
    boosted = sb.load_params(tmp_path / "defined")
    want = sb.subspace_boost(tree, beta=0.01, rank_rtol=1e-5)
    assert worst_relative_error(boosted, want)[0] < RTOL


@pytest.mark.slow
def test_streaming_attn_beta_and_rank_rtol_equal_in_memory(rng, tmp_path):
    from subboost import streaming

    block = attention_tree(rng)
    experts = [jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), block)
               for _ in range(2)]
    streaming.save_safetensors(block, tmp_path / "base.safetensors")
    paths = [streaming.save_safetensors(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    boost = {"beta": 0.01, "attn_beta": 0.3, "rank_rtol": 1e-5}
    out = streaming.merge_from_checkpoints(tmp_path / "base.safetensors", paths, boost=boost, out=tmp_path / "out",
                                           progress=False)
    want = sb.subspace_boost(sb.merge(sb.task_vectors(block, experts), "task_arithmetic"), **boost)
    error, where = worst_relative_error(streaming.read_params(out), want)
    assert error < RTOL, where
    with pytest.raises(sb.SubboostError, match="attn_beta"):
        streaming.merge_from_checkpoints(tmp_path / "base.safetensors", paths, boost={"beta": 0.01, "attn_beta": 2},
                                         out=tmp_path / "bad", progress=False)
