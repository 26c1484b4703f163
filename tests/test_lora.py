"""LoRA adapters: reading PEFT files, factored == dense merges, outputs peft loads, parity with peft."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost.checkpoint_io.peft_adapters import pattern_key, read_adapter
from subboost.lora import apply_merge, map_modules, merge_adapters, save_adapter
from subboost.lora.factored import merge_group

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["query", "value", "dense"]  # (32, 32) attention and output, (64, 32) and (32, 64) MLP


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


def make_adapter(path, seed: int, *, r: int = 4, alpha: float = 8, targets=TARGETS, base=None, **config):
    """A peft LoRA adapter of the tiny BERT with random (non-zero) A and B, saved to ``path``."""
    model = peft.get_peft_model(base if base is not None else tiny_bert(),
                                peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    paths = []
    for t in range(3):
        make_adapter(root / f"a{t}", seed=t)
        paths.append(root / f"a{t}")
    return paths


def base_tensors(bert_dir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(bert_dir / "model.safetensors"))


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"value": 2, "layer.1.output.dense": 6}, "alpha_pattern": {"query": 3}},
])
def test_read_adapter_updates_equal_peft_delta_weights(tmp_path, config):
    model = make_adapter(tmp_path / "a", seed=1, **config)
    adapter = read_adapter(tmp_path / "a")
    expected = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            expected[name] = module.get_delta_weight("default").detach().numpy()
    assert sorted(adapter.modules) == sorted(expected)
    for name, module in adapter.modules.items():
        np.testing.assert_allclose(module.update(), expected[name], rtol=1e-5, atol=1e-7)
    if "rank_pattern" in config:
        assert adapter.modules["encoder.layer.0.attention.self.value"].rank == 2
        assert adapter.modules["encoder.layer.1.output.dense"].rank == 6
        assert adapter.modules["encoder.layer.0.attention.self.query"].scale == 3 / 4


def test_gpt2_conv1d_and_embedding_adapters_round_trip_through_peft(tmp_path):
    """fan_in_fan_out (Conv1D, (in, out) weights) and embedding adapters: updates are (B A)^T, as peft's."""
    torch.manual_seed(0)
    base = transformers.GPT2Model(transformers.GPT2Config(vocab_size=30, n_positions=8, n_embd=16, n_layer=1,
                                                          n_head=2)).eval()
    paths = [tmp_path / "g0", tmp_path / "g1"]
    for t, path in enumerate(paths):
        make_adapter(path, seed=t, base=base, targets=["c_attn", "wte"], fan_in_fan_out=True)
    adapter = read_adapter(paths[0])
    assert adapter.modules["h.0.attn.c_attn"].weight_shape == (16, 48)
    assert adapter.modules["wte"].kind == "embedding" and adapter.modules["wte"].weight_shape == (30, 16)
    merged = merge_adapters(paths, "tsv")
    save_adapter(merged, tmp_path / "out", rank=8)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "out")
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            np.testing.assert_allclose(module.get_delta_weight("default").detach().numpy(), merged.update(name),
                                       rtol=0, atol=1e-5)


def test_read_adapter_from_bin_equals_safetensors(tmp_path, adapters):
    from safetensors.torch import load_file

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text((adapters[0] / "adapter_config.json").read_text())
    torch.save(load_file(str(adapters[0] / "adapter_model.safetensors")), tmp_path / "bin" / "adapter_model.bin")
    a, b = read_adapter(adapters[0]), read_adapter(tmp_path / "bin")
    for name in a.modules:
        np.testing.assert_array_equal(a.modules[name].update(), b.modules[name].update())


def test_pattern_key_follows_peft():
    from peft.utils.other import get_pattern_key

    keys = ["value", r"layer\.1\..*dense", "query"]
    for name in ["encoder.layer.0.attention.self.value", "encoder.layer.1.output.dense", "x.query", "x.key"]:
        ours = pattern_key(keys, name)
        assert (name if ours is None else ours) == get_pattern_key(keys, name)


# ----------------------------------------------------------------------------
# Factored == dense
# ----------------------------------------------------------------------------
def _factors(rng, m, n, ranks):
    bs = [rng.normal(size=(m, r)).astype(np.float32) for r in ranks]
    as_ = [rng.normal(size=(r, n)).astype(np.float32) for r in ranks]
    return bs, as_


def _factored(bs, as_, method, *, beta=None, rank_rtol=None, **kwargs):
    ranks = tuple(b.shape[1] for b in bs)
    shape = (bs[0].shape[0], as_[0].shape[1])
    q_b, core, q_a = merge_group(jnp.asarray(np.concatenate(bs, 1)[None]), jnp.asarray(np.concatenate(as_, 0)[None]),
                                 ranks=ranks, shape=shape, method=method, method_kwargs=tuple(kwargs.items()),
                                 beta=beta, rank_rtol=rank_rtol)
    return np.asarray(q_b[0]), np.asarray(core[0]), np.asarray(q_a[0])


def _is_update(path, leaf):
    return sb.MatrixLayout("matrix") if np.ndim(leaf) == 2 else None


def _dense(bs, as_, method, *, beta=None, rank_rtol=None, **kwargs):
    tvs = {"w": jnp.stack([b @ a for b, a in zip(bs, as_)])}
    if method in ("tsv", "iso_c", "iso_cts"):
        kwargs["is_matrix"] = _is_update
    merged = sb.merge(tvs, method, **kwargs)
    if beta is not None:
        merged = sb.subspace_boost(merged, beta=beta, rank_rtol=rank_rtol, is_matrix=_is_update)
    return np.asarray(merged["w"])


@pytest.mark.parametrize("method,shape,ranks,kwargs", [
    ("task_arithmetic", (40, 24), (2, 3, 4), {}),
    ("weight_averaging", (24, 40), (4, 4), {}),
    ("tsv", (24, 32), (6, 6, 6, 6), {}),  # floor(24 / 4) = 6 = r_t: every kept triplet is determined
    ("tsv", (30, 40), (12, 12, 12), {}),  # floor(30 / 3) = 10 < r_t
    ("iso_c", (16, 16), (4, 4, 4, 4), {}),
    ("iso_cts", (16, 16), (4, 4, 4, 4), {"common_space_fraction": 0.5}),  # c = 8, p = 2 per task
])
def test_factored_equals_dense_where_dense_is_determined(rng, method, shape, ranks, kwargs):
    bs, as_ = _factors(rng, *shape, ranks)
    q_b, core, q_a = _factored(bs, as_, method, **kwargs)
    dense = _dense(bs, as_, method, **kwargs)
    np.testing.assert_allclose(q_b @ core @ q_a.T, dense, rtol=0, atol=2e-5 * np.abs(dense).max())
    assert core.shape == (min(shape[0], sum(ranks)), min(shape[1], sum(ranks)))


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_factored_boost_equals_dense_boost_with_rank_rtol(rng, beta):
    bs, as_ = _factors(rng, 48, 40, (2, 3, 4))
    q_b, core, q_a = _factored(bs, as_, "task_arithmetic", beta=beta, rank_rtol=1e-5)
    dense = _dense(bs, as_, "task_arithmetic", beta=beta, rank_rtol=1e-5)
    np.testing.assert_allclose(q_b @ core @ q_a.T, dense, rtol=0, atol=2e-5 * np.abs(dense).max())


def test_factored_iso_c_is_dense_iso_c_on_the_joint_spaces(rng):
    """Dense Iso-C spreads mean(s) over undetermined directions too; projected, the two agree."""
    bs, as_ = _factors(rng, 48, 40, (2, 3, 4))
    q_b, core, q_a = _factored(bs, as_, "iso_c")
    dense = _dense(bs, as_, "iso_c")
    projected = q_b @ q_b.T @ dense @ q_a @ q_a.T
    np.testing.assert_allclose(q_b @ core @ q_a.T, projected, rtol=0, atol=2e-5 * np.abs(projected).max())
    assert np.linalg.norm(dense - projected) > 0.5 * np.linalg.norm(dense)  # the undetermined part is most of it


def _polar(x):
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u @ vh


def _numpy_tsv_determined(updates, ranks):
    """TSV-M in float64, keeping per task only its determined triplets: min(floor(s / T), r_t)."""
    m, n = updates[0].shape
    per_task = min(m, n) // len(updates)
    us, ss, vhs = [], [], []
    for x, r in zip(updates, ranks):
        u, s, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        keep = min(per_task, r)
        us.append(u[:, :keep]), ss.append(s[:keep]), vhs.append(vh[:keep])
    return _polar(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ _polar(np.concatenate(vhs, 0))


def test_factored_tsv_drops_undetermined_triplets_like_a_numpy_reference(rng):
    bs, as_ = _factors(rng, 40, 30, (3, 3, 2))  # floor(30 / 3) = 10 > r_t: dense TSV-M keeps null triplets
    q_b, core, q_a = _factored(bs, as_, "tsv")
    reference = _numpy_tsv_determined([b @ a for b, a in zip(bs, as_)], (3, 3, 2))
    np.testing.assert_allclose(q_b @ core @ q_a.T, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_zero_adapter_gives_zero_merges_without_nan(rng):
    bs, as_ = _factors(rng, 24, 24, (4, 4))
    bs[1] = np.zeros_like(bs[1])  # a freshly initialised peft adapter: B = 0
    for method, beta in (("tsv", 0.0), ("iso_cts", None)):
        q_b, core, q_a = _factored(bs, as_, method, beta=beta)
        assert np.all(np.isfinite(core))
    q_b, core, q_a = _factored([np.zeros_like(b) for b in bs], as_, "iso_c", beta=0.01)
    np.testing.assert_array_equal(core, 0)


# ----------------------------------------------------------------------------
# The API on peft adapters: paths, outputs, errors
# ----------------------------------------------------------------------------
def test_merge_adapters_factored_equals_dense_and_applies_to_the_base(adapters, bert_dir):
    ta_f = merge_adapters(adapters, "task_arithmetic", weights=[1.0, 0.5, -1.0])
    ta_d = merge_adapters(adapters, "task_arithmetic", weights=[1.0, 0.5, -1.0], factored=False)
    assert ta_f.factored and not ta_d.factored
    for name in ta_f.modules:
        np.testing.assert_allclose(ta_f.update(name), ta_d.update(name), atol=1e-6)
    base = base_tensors(bert_dir)
    merged = apply_merge(base, ta_f, alpha=0.3)
    name = "encoder.layer.1.intermediate.dense"
    np.testing.assert_allclose(merged[name + ".weight"] - base[name + ".weight"], 0.3 * ta_f.update(name), atol=1e-6)
    assert merged["embeddings.word_embeddings.weight"] is base["embeddings.word_embeddings.weight"]
    ties = merge_adapters(adapters, "ties", k=0.5)  # no factored form: dense automatically
    assert not ties.factored


def test_saved_adapter_loads_in_peft_and_reports_errors(adapters, tmp_path):
    merged = merge_adapters(adapters, "task_arithmetic", beta=0.0, rank_rtol=1e-5)
    errors = save_adapter(merged, tmp_path / "out", rank=12, alpha=0.5)  # 3 x 4: exact
    assert max(errors.values()) < 1e-5
    errors_r2 = save_adapter(merged, tmp_path / "out2", rank=2)
    assert min(errors_r2.values()) > 0.05
    report = json.loads((tmp_path / "out2" / "lora_merge.json").read_text())
    assert report["relative_error"] == pytest.approx(errors_r2)
    model = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "out")
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            np.testing.assert_allclose(module.get_delta_weight("default").detach().numpy(),
                                       0.5 * merged.update(name), rtol=0, atol=1e-5)
    with pytest.raises(FileExistsError):
        save_adapter(merged, tmp_path / "out", rank=4)
    save_adapter(merged, tmp_path / "out", rank=4, overwrite=True)  # ours (lora_merge.json): replaced


def test_map_modules_across_a_task_model_prefix(adapters, bert_dir):
    adapter = read_adapter(adapters[0])
    shapes = {"bert." + k: v.shape for k, v in base_tensors(bert_dir).items()}
    mapping = map_modules(adapter.modules, shapes)
    assert mapping["encoder.layer.0.attention.self.query"] == "bert.encoder.layer.0.attention.self.query.weight"


def test_bad_input_names_the_adapter_and_module(adapters, bert_dir, tmp_path):
    make_adapter(tmp_path / "fewer", seed=5, targets=["query"])
    with pytest.raises(sb.SubboostError, match=r"fewer: target modules differ: module '.*dense' is not adapted"):
        merge_adapters([adapters[0], tmp_path / "fewer"])
    wide_config = transformers.BertConfig(vocab_size=40, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=16)
    make_adapter(tmp_path / "wide", seed=6, base=transformers.BertModel(wide_config))
    with pytest.raises(sb.SubboostError, match=r"wide: module 'encoder\.layer\.0\..*' updates a linear weight of shape \(48, 48\)"):
        merge_adapters([adapters[0], tmp_path / "wide"])
    config = json.loads((adapters[1] / "adapter_config.json").read_text())
    (tmp_path / "rank").mkdir()
    (tmp_path / "rank" / "adapter_model.safetensors").write_bytes((adapters[1] / "adapter_model.safetensors").read_bytes())
    (tmp_path / "rank" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(sb.SubboostError, match=r"rank: module '.*': its factors have rank 4 but the config gives r = 8"):
        read_adapter(tmp_path / "rank")
    shapes = {k: (32, 48) if "query" in k else v.shape for k, v in base_tensors(bert_dir).items()}
    with pytest.raises(sb.SubboostError, match=r"a0: module 'encoder\.layer\.0\.attention\.self\.query' updates "
                                               r"a weight of shape \(32, 32\), but the base's .* has shape \(32, 48\)"):
        map_modules(read_adapter(adapters[0]).modules, shapes, source=str(adapters[0]))
    with pytest.raises(sb.SubboostError, match=r"a0: module '.*' has no weight"):
        map_modules(read_adapter(adapters[0]).modules, {"other.weight": (3, 3)}, source=str(adapters[0]))


# ----------------------------------------------------------------------------
# Parity with peft's add_weighted_adapter
# ----------------------------------------------------------------------------
def _peft_deltas(model, adapter_name):
    return {name: module.get_delta_weight(adapter_name).detach().numpy()
            for name, module in model.base_model.model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}


def _ours(merged, rank=None):
    if rank is None:
        return {name: merged.update(name) for name in merged.modules}
    from subboost.lora import adapter_factors

    factors, _ = adapter_factors(merged, rank=rank)
    return {name: b @ a for name, (a, b) in factors.items()}


def test_parity_with_peft_add_weighted_adapter(adapters):
    from subboost.lora import merge_factors

    model = peft.PeftModel.from_pretrained(tiny_bert(), adapters[0], adapter_name="a0")
    for t, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{t}")
    names, weights = ["a0", "a1", "a2"], [1.0, 0.5, -0.7]
    ours = {
        "cat": _ours(merge_adapters(adapters, "task_arithmetic", weights=weights)),
        "svd": _ours(merge_adapters(adapters, "task_arithmetic", weights=weights), rank=4),
        "linear": _ours(merge_factors(adapters, "task_arithmetic", weights=weights)),
        # TIES keeps int(N k) + 1 entries per task (the threshold entry too, as the TIES authors' code), peft's
        # top-k exactly int(N density): k = 0.5 - 1/4096 keeps 512 of 1024 and 1024 of 2048, as density 0.5 does.
        "ties_svd": _ours(merge_adapters(adapters, "ties", k=0.5 - 1 / 4096, scope="per_leaf", merge="mean"), rank=4),
    }
    for combination, expected in ours.items():
        ties = combination == "ties_svd"
        model.base_model.add_weighted_adapter(names, [1.0] * 3 if ties else weights, combination,
                                              combination_type=combination, density=0.5 if ties else None)
        theirs = _peft_deltas(model, combination)
        assert sorted(theirs) == sorted(expected)
        for name in expected:
            scale = np.abs(theirs[name]).max()
            np.testing.assert_allclose(expected[name], theirs[name], rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{combination}: {name}")


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------
def test_cli_merges_adapters_into_a_model_and_an_adapter(adapters, bert_dir, tmp_path, capsys):
    from subboost import cli

    experts = [str(p) for p in adapters]
    assert cli.main(["merge", "--base", str(bert_dir), *experts, "--method", "iso_c", "--beta", "0.01",
                     "--rank-rtol", "1e-5", "--alpha", "0.7", "--out", str(tmp_path / "model")]) == 0
    merged = merge_adapters(adapters, "iso_c", beta=0.01, rank_rtol=1e-5)
    model = transformers.BertModel.from_pretrained(tmp_path / "model")
    base = base_tensors(bert_dir)
    name = "encoder.layer.0.attention.self.value"
    np.testing.assert_allclose(model.state_dict()[name + ".weight"].numpy() - base[name + ".weight"],
                               0.7 * merged.update(name), atol=1e-6)
    assert cli.main(["merge", "--base", str(bert_dir), *experts, "--method", "ties", "--param", "k=0.5",
                     "--adapter-rank", "6", "--alpha", "1", "--out", str(tmp_path / "adapter")]) == 0
    assert "relative error" in capsys.readouterr().out
    peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    assert cli.main(["merge", "--base", str(bert_dir), experts[0], str(bert_dir), "--alpha", "1",
                     "--out", str(tmp_path / "x")]) == 2
    assert "not a PEFT adapter directory, but other experts are" in capsys.readouterr().err


def test_flax_task_vector_of_bert_follows_the_converter_layout(adapters, bert_dir):
    from subboost.lora.flax_models import flax_task_vector

    merged = merge_adapters(adapters, "iso_c")
    tau = flax_task_vector(merged, bert_dir, alpha=0.5)
    layer = tau["encoder"]["layer_1"]
    np.testing.assert_allclose(layer["mlp"]["intermediate"]["kernel"],
                               0.5 * merged.update("encoder.layer.1.intermediate.dense").T, atol=1e-6)
    query = 0.5 * merged.update("encoder.layer.1.attention.self.query").T  # (in, out) -> (embed, heads, head_dim)
    np.testing.assert_allclose(layer["attention"]["query"]["kernel"], query.reshape(32, 2, 16), atol=1e-6)
    np.testing.assert_array_equal(layer["attention"]["key"]["kernel"], 0)  # not adapted
    np.testing.assert_array_equal(tau["embeddings"]["word_embeddings"]["embedding"], 0)


def test_flax_task_vector_of_clip_vision_splits_heads(tmp_path):
    from subboost.lora.flax_models import flax_task_vector

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4)
    base = transformers.CLIPVisionModel(config).eval()
    base.save_pretrained(tmp_path / "clip")
    for t in range(2):
        make_adapter(tmp_path / f"c{t}", seed=t, base=base, targets=["q_proj", "fc1"])
    merged = merge_adapters([tmp_path / "c0", tmp_path / "c1"], "task_arithmetic")
    tau = flax_task_vector(merged, tmp_path / "clip")
    block = jax_tree_leaves_with_paths(tau)
    names = {name.rsplit(".", 1)[-1]: name for name in merged.modules}  # peft's names lack "vision_model."
    q = merged.update(names["q_proj"]).T.reshape(32, 2, 16)
    fc1 = merged.update(names["fc1"]).T
    matches_q = [p for p, v in block.items() if v.shape == (32, 2, 16) and np.allclose(v, q, atol=1e-6)]
    matches_fc = [p for p, v in block.items() if v.shape == (32, 64) and np.allclose(v, fc1, atol=1e-6)]
    assert len(matches_q) == 1 and "query" in matches_q[0], block.keys()
    assert len(matches_fc) == 1 and "c_fc" in matches_fc[0]
    changed = [p for p, v in block.items() if np.any(v != 0)]
    assert sorted(changed) == sorted(matches_q + matches_fc)  # everything else (proj = I included) is zero


def jax_tree_leaves_with_paths(tree):
    from subboost.tree import leaves_with_paths

    return {p: np.asarray(v) for p, v in leaves_with_paths(tree)}
