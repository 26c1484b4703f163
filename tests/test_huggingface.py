"""Hugging Face model directories: reading by tensor name, family rules, merging, writing back loadable.

Every model is a tiny random-init one that transformers builds from a config and writes with
``save_pretrained`` (one file, and sharded with ``max_shard_size``), so no download is needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from subboost.checkpoint_io.huggingface import (
    HuggingFaceReader,
    huggingface_is_matrix,
    is_huggingface_dir,
    parse_size,
    plan_shards,
    read_huggingface,
)
from subboost.checkpoint_io.readers import open_checkpoint
from subboost.errors import SubboostError
from subboost.tree import matrix_plan

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ("bert", "roberta", "mpnet", "vit", "clip", "gpt2", "llama", "mistral", "qwen2")
HIDDEN, LAYERS, HEADS, KV_HEADS = 16, 2, 4, 2


def tiny_config(family: str):
    """A two-layer, width-16 configuration of ``family`` (grouped-query attention for the decoders)."""
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=32)
    decoder = dict(vocab_size=50, num_key_value_heads=KV_HEADS, max_position_embeddings=32, **common)
    configs = {
        "bert": lambda: transformers.BertConfig(vocab_size=50, max_position_embeddings=32, **common),
        "roberta": lambda: transformers.RobertaConfig(vocab_size=50, max_position_embeddings=34, **common),
        "mpnet": lambda: transformers.MPNetConfig(vocab_size=50, max_position_embeddings=34, **common),
        "vit": lambda: transformers.ViTConfig(image_size=8, patch_size=4, **common),
        "clip": lambda: transformers.CLIPConfig(
            text_config=dict(vocab_size=50, max_position_embeddings=16, **common),
            vision_config=dict(image_size=8, patch_size=4, **common), projection_dim=8),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS,
                                                n_head=HEADS),
        "llama": lambda: transformers.LlamaConfig(**decoder),
        "mistral": lambda: transformers.MistralConfig(**decoder),
        "qwen2": lambda: transformers.Qwen2Config(**decoder),
    }
    return configs[family]()


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(tiny_config(family)).eval()


def state(model) -> dict[str, np.ndarray]:
    """A model's saved tensors as numpy arrays."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family)`` -> (directory, sharded directory, model), each family written once."""
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(family: str):
        if family not in cache:
            model = tiny_model(family)
            model.save_pretrained(root / family)
            model.save_pretrained(root / f"{family}-sharded", max_shard_size="10KB")
            cache[family] = (root / family, root / f"{family}-sharded", model)
        return cache[family]

    return get


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_reads_every_family_by_tensor_name_single_and_sharded(saved, family):
    from safetensors.numpy import load_file

    single, sharded, _ = saved(family)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    expected = load_file(single / "model.safetensors")  # the names transformers saves (its legacy ones for ViT)
    for directory in (single, sharded):
        reader = open_checkpoint(directory)
        assert isinstance(reader, HuggingFaceReader)
        got = reader.read(list(reader.specs) + list(reader.passthrough))
        assert set(got) == set(expected)
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
        assert list(reader.specs) == sorted(reader.specs)  # tree-flatten order of the flat dict
        assert all(np.dtype(s.dtype).kind == "f" for s in reader.specs.values())


def test_pytorch_bin_with_tied_weights_is_read_safely_and_tied_once(saved, tmp_path):
    _, _, model = saved("gpt2")
    folder = tmp_path / "bin"
    folder.mkdir()
    model.config.save_pretrained(folder)
    tensors = dict(model.state_dict())
    tensors["lm_head.weight"] = tensors["wte.weight"]  # one storage, two names (tied)
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 4, 4))  # an old buffer: passed through
    torch.save(tensors, folder / "pytorch_model.bin")
    reader = open_checkpoint(folder)
    assert reader.weights_format == "bin"
    assert reader.tied == {"lm_head.weight": "wte.weight"}
    assert "lm_head.weight" not in reader.specs and "h.0.attn.bias" in reader.passthrough
    got = reader.read(list(reader.specs))
    for name, value in state(model).items():
        assert np.array_equal(got[name], value), name


def test_sentence_transformers_folder_reads_its_transformer_module(saved, tmp_path):
    single, _, model = saved("bert")
    root = tmp_path / "st"
    shutil.copytree(single, root / "0_Transformer")
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    assert is_huggingface_dir(root)
    got = read_huggingface(root)
    assert np.array_equal(got["embeddings.word_embeddings.weight"], state(model)["embeddings.word_embeddings.weight"])


# ----------------------------------------------------------------------------
# Family rules: matrices and q/k/v
# ----------------------------------------------------------------------------
def _plan(reader, attention):
    return matrix_plan(dict(reader.specs), is_matrix=reader.is_matrix, attention=attention)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_modes_keep_their_meaning_in_every_family(saved, family):
    reader = open_checkpoint(saved(family)[0])
    towers = 2 if family == "clip" else 1
    blocks = towers * LAYERS
    per_qkv, full, per_head = (_plan(reader, a) for a in ("per_qkv", "full", "per_head"))
    attention = lambda plan: [m for m in plan.members if m.layout.is_attention_input]  # noqa: E731
    if family == "gpt2":  # one fused c_attn leaf per block: three matrices, one, or three per head
        assert [m.count for m in attention(per_qkv)] == [3] * blocks
        assert [m.count for m in attention(full)] == [1] * blocks
        assert [m.count for m in attention(per_head)] == [3 * HEADS] * blocks
        return
    assert len(attention(per_qkv)) == 3 * blocks
    fused = attention(full)
    assert len(fused) == blocks and all(m.name.endswith(".qkv") and len(m.leaf_ids) == 3 for m in fused)
    kv = KV_HEADS if family in ("llama", "mistral", "qwen2") else HEADS
    head_dim = HIDDEN // HEADS
    assert {m.group[:2] for m in fused} == {((HEADS + 2 * kv) * head_dim, HIDDEN)}
    assert sorted(m.count for m in attention(per_head)) == sorted([HEADS, kv, kv] * blocks)
    out = [m for m in per_head.members if m.layout.kind == "out_cols"]
    assert len(out) == blocks and {m.group[:2] for m in out} == {(HIDDEN, head_dim)}
    names = {m.name for m in per_qkv.members}
    assert not any("embed" in n for n in names), names  # embeddings are no matrices


def test_matrix_views_equal_the_torch_weights(saved):
    """GPT-2's Conv1D c_attn and c_proj, Llama's grouped-query k_proj and o_proj, sliced by hand."""
    gpt2 = state(saved("gpt2")[2])
    reader = open_checkpoint(saved("gpt2")[0])
    views = {a: _plan(reader, a).split(_plan(reader, a).gather(dict(zip(reader.specs, reader.read(list(reader.specs)).values()))))
             for a in ("per_qkv", "full", "per_head")}
    c_attn, c_proj = gpt2["h.1.attn.c_attn.weight"], gpt2["h.1.attn.c_proj.weight"]  # stored (in, out)
    head_dim = HIDDEN // HEADS
    np.testing.assert_array_equal(views["per_qkv"]["h.1.attn.c_attn"][1], c_attn[:, HIDDEN:2 * HIDDEN].T)
    np.testing.assert_array_equal(views["full"]["h.1.attn.c_attn"], c_attn.T)
    np.testing.assert_array_equal(views["per_head"]["h.1.attn.c_attn"][HEADS + 2],
                                  c_attn[:, HIDDEN + 2 * head_dim:HIDDEN + 3 * head_dim].T)
    np.testing.assert_array_equal(views["per_head"]["h.1.attn.c_proj"][3], c_proj.T[:, 3 * head_dim:])
    np.testing.assert_array_equal(views["per_qkv"]["h.1.mlp.c_fc"], gpt2["h.1.mlp.c_fc.weight"].T)

    llama = state(saved("llama")[2])
    reader = open_checkpoint(saved("llama")[0])
    tree = reader.read(list(reader.specs))
    full = _plan(reader, "full").split(_plan(reader, "full").gather(tree))
    per_head = _plan(reader, "per_head").split(_plan(reader, "per_head").gather(tree))
    block = "layers.0.self_attn"
    np.testing.assert_array_equal(full[f"{block}.qkv"], np.concatenate(
        [llama[f"{block}.{p}_proj.weight"] for p in "qkv"]))
    np.testing.assert_array_equal(per_head[f"{block}.k_proj"][1], llama[f"{block}.k_proj.weight"][head_dim:])
    np.testing.assert_array_equal(per_head[f"{block}.o_proj"][2],
                                  llama[f"{block}.o_proj.weight"][:, 2 * head_dim:3 * head_dim])


def test_gather_scatter_round_trips_every_mode(saved):
    for family in ("gpt2", "llama", "bert"):
        reader = open_checkpoint(saved(family)[0])
        tree = reader.read(list(reader.specs))
        for attention in ("per_qkv", "full", "per_head"):
            plan = _plan(reader, attention)
            back = plan.scatter(plan.gather(tree))
            leaves = list(tree.values())
            assert all(np.array_equal(back[i], leaves[i]) for i in back), (family, attention)


def test_per_head_without_head_counts_is_refused_by_name():
    predicate = huggingface_is_matrix({"model_type": "llama"})  # no num_attention_heads
    tree = {"layers.0.self_attn.q_proj.weight": np.zeros((8, 8), np.float32)}
    matrix_plan(tree, is_matrix=predicate, attention="per_qkv")
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.weight.*per_head"):
        matrix_plan(tree, is_matrix=predicate, attention="per_head")


# ----------------------------------------------------------------------------
# Damaged directories: one line naming the file
# ----------------------------------------------------------------------------
def _sharded_copy(saved, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(saved("bert")[1], copy)
    return copy


def test_missing_shard_is_named(saved, tmp_path):
    copy = _sharded_copy(saved, tmp_path)
    shard = sorted(copy.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(SubboostError, match=rf"model\.safetensors\.index\.json: shard '{shard.name}'.*does not exist") as err:
        open_checkpoint(copy)
    assert "\n" not in str(err.value)


def test_tensor_in_two_shards_is_named(saved, tmp_path):
    copy = _sharded_copy(saved, tmp_path)
    first, second = sorted(copy.glob("model-*.safetensors"))[:2]
    from safetensors.numpy import load_file, save_file

    extra = load_file(first)
    name = next(iter(extra))
    save_file({**load_file(second), name: extra[name]}, second, metadata={"format": "pt"})
    with pytest.raises(SubboostError, match=rf"index\.json: tensor '{name}' is stored in two shards") as err:
        open_checkpoint(copy)
    assert "\n" not in str(err.value)


def test_offsets_past_the_end_are_named(saved, tmp_path):
    copy = _sharded_copy(saved, tmp_path)
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-64])  # truncated
    with pytest.raises(SubboostError, match=rf"{shard.name}: .*ends? at byte") as err:
        open_checkpoint(copy)
    assert "\n" not in str(err.value)


def test_sizes_and_shard_plans():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("50KB") == 50_000 and parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(SubboostError, match="shard size"):
        parse_size("lots")
    specs = {"a": ((10,), np.float32), "b": ((10,), np.float32), "c": ((100,), np.float32), "d": ((1,), np.float32)}
    assert plan_shards(specs, 80) == [["a", "b"], ["c"], ["d"]]


# ----------------------------------------------------------------------------
# Merging and writing back
# ----------------------------------------------------------------------------
def _experts(family: str, root: Path, num: int = 2, *, dtype=None) -> tuple[Path, list[Path]]:
    """A base and ``num`` experts (base + 0.01 * noise), written sharded, as transformers saves them."""
    base_model = tiny_model(family)
    if dtype is not None:
        base_model = base_model.to(dtype)
    base_model.save_pretrained(root / "base")
    paths = []
    for t in range(num):
        model = transformers.AutoModel.from_pretrained(root / "base")
        generator = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator).to(p.dtype))
        model.save_pretrained(root / f"expert{t}", max_shard_size="10KB")
        paths.append(root / f"expert{t}")
    return root / "base", paths


def _load(path: Path):
    """The model transformers loads from ``path``, failing on any missing or unexpected tensor."""
    model, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def _torch_states(base: Path, experts: list[Path]):
    b = {k: v for k, v in _load(base).state_dict().items() if v.is_floating_point()}
    return b, [{k: v for k, v in _load(e).state_dict().items() if k in b} for e in experts]


def torch_ties(taus: list[dict], *, k: float) -> dict:
    """TIES in torch from REFERENCE.md: global per-task top-k trim, elected sign, disjoint mean."""
    names = list(taus[0])
    flat = torch.stack([torch.cat([tau[n].reshape(-1) for n in names]) for tau in taus]).double()
    kk = flat.shape[1] - int(flat.shape[1] * k)
    threshold = flat.abs().kthvalue(kk, dim=1).values[:, None]
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    out, offset = {}, 0
    for n in names:
        size = taus[0][n].numel()
        out[n] = merged[offset:offset + size].reshape(taus[0][n].shape).to(taus[0][n].dtype)
        offset += size
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_task_arithmetic_merges_every_family_and_loads_in_transformers(tmp_path, family):
    from subboost.streaming import merge_from_checkpoints

    base, experts = _experts(family, tmp_path)
    out = merge_from_checkpoints(base, experts, method="task_arithmetic", alpha=0.3, out=tmp_path / "out",
                                 shard_size="20KB", progress=False)
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").read_text() == (
        base / "config.json").read_text()
    assert json.loads((out / "merge_info.json").read_text())["format"] == "subboost.huggingface/1"
    merged = _load(out).state_dict()
    b, es = _torch_states(base, experts)
    for name, value in b.items():
        expected = value + 0.3 * sum(e[name] - value for e in es)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)


def test_ties_and_dare_equal_a_torch_computation(tmp_path):
    import jax

    from subboost.streaming import merge_from_checkpoints
    from subboost.streaming.chunks import keep_mask  # DARE's draw, jitted (compiled once by the merge)

    base, experts = _experts("llama", tmp_path, num=3)
    b, es = _torch_states(base, experts)
    taus = [{n: e[n] - b[n] for n in b} for e in es]
    out = merge_from_checkpoints(base, experts, method="ties", k=0.3, alpha=0.5, out=tmp_path / "ties",
                                 progress=False)
    merged = _load(out).state_dict()
    ties = torch_ties(taus, k=0.3)
    for name in b:
        torch.testing.assert_close(merged[name], b[name] + 0.5 * ties[name], rtol=0, atol=1e-6, msg=name)

    key, p = jax.random.key(7), 0.4
    out = merge_from_checkpoints(base, experts, method="dare", key=key, p=p, alpha=0.5, out=tmp_path / "dare",
                                 progress=False)
    merged = _load(out).state_dict()
    # DARE's masks are jax draws (leaf i of the tree-flattened names gets split(key)[i]); the rest is torch.
    reader = open_checkpoint(base)
    stored_names = list(reader.specs)
    keys = jax.random.split(key, len(stored_names))
    for i, loaded in enumerate(stored_names):  # Llama saves the names it loads with
        masks = [torch.from_numpy(np.array(keep_mask(keys[i], p=p, shape=(len(experts),) + b[loaded].shape)))]
        dropped = sum(torch.where(masks[0][t], taus[t][loaded] / (1 - p), torch.zeros_like(b[loaded]))
                      for t in range(len(experts)))
        torch.testing.assert_close(merged[loaded], b[loaded] + 0.5 * dropped, rtol=0, atol=1e-6, msg=loaded)


def test_one_expert_at_alpha_one_round_trips_bit_for_bit(tmp_path):
    from safetensors.numpy import load_file

    from subboost.streaming import merge_from_checkpoints

    base, (expert,) = _experts("gpt2", tmp_path, num=1)
    out = merge_from_checkpoints(base, [expert], method="task_arithmetic", alpha=1.0, out=tmp_path / "out",
                                 shard_size="1GB", progress=False)
    written, original = load_file(out / "model.safetensors"), {}
    for shard in expert.glob("model-*.safetensors"):
        original.update(load_file(shard))
    assert written.keys() == original.keys()
    for name, value in original.items():
        assert written[name].dtype == value.dtype and written[name].tobytes() == value.tobytes(), name


def test_tsv_with_boosting_in_bfloat16_keeps_names_and_dtypes(tmp_path):
    from safetensors import safe_open

    from subboost.streaming import merge_from_checkpoints

    base, experts = _experts("qwen2", tmp_path, dtype=torch.bfloat16)
    out = merge_from_checkpoints(base, experts, method="tsv", boost={"beta": 0.02, "attention": "per_head"},
                                 alpha=1.0, out=tmp_path / "out", progress=False)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    model = _load(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert model.state_dict().keys() == _load(base).state_dict().keys()


def test_sentence_transformers_folder_is_kept_whole(tmp_path):
    """A sentence-transformers folder, built by hand as the library writes it (weights at the root)."""
    from subboost.streaming import merge_from_checkpoints

    base, experts = _experts("mpnet", tmp_path, num=1)
    folders = []
    for source in (base, *experts):
        folder = tmp_path / f"st-{source.name}"
        shutil.copytree(source, folder)
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": HIDDEN,
                                                                      "pooling_mode_mean_tokens": True}))
        (folder / "2_Normalize").mkdir()
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
        (folder / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}))
        folders.append(folder)
    out = merge_from_checkpoints(folders[0], folders[1:], alpha=1.0, out=tmp_path / "out", progress=False)
    kept = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "config.json",
            "1_Pooling/config.json"]
    for name in kept:
        assert (out / name).read_bytes() == (folders[0] / name).read_bytes(), name
    assert (out / "2_Normalize").is_dir()
    _load(out)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    SentenceTransformer(str(out), device="cpu")


def test_expert_mismatches_are_named_and_version_buffers_tolerated(tmp_path):
    from safetensors.numpy import load_file, save_file

    from subboost.streaming import merge_from_checkpoints

    base, experts = _experts("bert", tmp_path, num=1)
    single = tmp_path / "single"
    _load(experts[0]).save_pretrained(single)
    tensors = load_file(single / "model.safetensors")
    tensors["embeddings.position_ids"] = np.arange(32, dtype=np.int64)[None]  # older transformers saved it
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    merge_from_checkpoints(base, [single], alpha=1.0, out=tmp_path / "ok", progress=False)

    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SubboostError, match=r"expert 0 .*missing parameters \['encoder\.layer\.1\.output\.dense\.weight'\]"):
        merge_from_checkpoints(base, [single], alpha=1.0, out=tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_cli_merges_hugging_face_directories_and_follows_the_out_rules(tmp_path, capsys):
    from subboost.cli import main

    base, experts = _experts("gpt2", tmp_path)
    out = tmp_path / "merged"
    argv = ["merge", "--base", str(base), *map(str, experts), "--method", "ties", "--param", "k=0.5",
            "--beta", "0.02", "--alpha", "0.5", "--shard-size", "15KB", "--out", str(out)]
    assert main(argv) == 0
    assert "Hugging Face directory" in capsys.readouterr().out
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert all(f.stat().st_size <= 15_000 + 4096 for f in out.glob("model-*.safetensors"))  # + its header
    _load(out)
    assert main(argv) != 0
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0  # its own earlier output (merge_info.json) may be replaced
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    assert main(argv[:-1] + [str(users), "--overwrite"]) != 0
    assert "refusing to replace" in capsys.readouterr().err
    assert (users / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------
# subboost export: Flax CLIP ViT and BERT back to Hugging Face
# ----------------------------------------------------------------------------
def _noisy(params, seed: int):
    """Parameters moved off their initialisation (non-zero biases, non-unit norms)."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: (np.asarray(x) + 0.1 * rng.normal(size=x.shape)).astype(x.dtype), params)


def test_export_bert_and_clip_vision_equal_the_flax_forward(tmp_path):
    import jax
    import jax.numpy as jnp

    from subboost.checkpoints import save_params
    from subboost.cli import main
    from subboost.models.bert import BertConfig, BertEncoder
    from subboost.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer

    bert = BertConfig(vocab_size=50, width=16, layers=2, heads=4, mlp_dim=32, max_positions=32)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 7)))
    mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2])
    params = _noisy(jax.jit(BertEncoder(bert).init)(jax.random.key(0), ids)["params"], 1)
    save_params(params, tmp_path / "bert", metadata={"kind": "bert", "architecture": bert.to_dict()})
    assert main(["export", str(tmp_path / "bert"), "--out", str(tmp_path / "bert-hf")]) == 0
    model, info = transformers.BertModel.from_pretrained(tmp_path / "bert-hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)))
    expected = np.asarray(jax.jit(BertEncoder(bert).apply)({"params": params}, ids, mask))
    valid = np.asarray(mask, bool)  # padded positions are undefined in both
    np.testing.assert_allclose(hidden.last_hidden_state.numpy()[valid], expected[valid], rtol=0, atol=1e-5)

    clip = CLIPVisionConfig(image_size=8, patch_size=4, width=16, layers=2, heads=4, embed_dim=8)
    images = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    params = _noisy(jax.jit(CLIPVisionTransformer(clip).init)(jax.random.key(0), images)["params"], 3)
    save_params(params, tmp_path / "clip", metadata={"kind": "clip_vision", "architecture": clip.to_dict()})
    assert main(["export", str(tmp_path / "clip"), "--out", str(tmp_path / "clip-hf")]) == 0
    model, info = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip-hf",
                                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        embeds = model(pixel_values=torch.tensor(np.asarray(images).transpose(0, 3, 1, 2))).image_embeds.numpy()
    expected = np.asarray(jax.jit(CLIPVisionTransformer(clip).apply)({"params": params}, images))
    np.testing.assert_allclose(embeds, expected, rtol=0, atol=1e-5)
    assert main(["export", str(tmp_path / "clip"), "--out", str(tmp_path / "clip-hf")]) != 0  # exists: refused
    assert main(["export", str(tmp_path / "clip"), "--out", str(tmp_path / "clip-hf"), "--overwrite"]) == 0
