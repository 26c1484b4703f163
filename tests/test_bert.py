"""The flax BERT encoder, its converter and `sb.load_model`: parity with transformers' torch BertModel."""

from __future__ import annotations

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost.convert import ConversionError, convert, convert_checkpoint
from subboost.models.bert import BertConfig, BertEncoder, init_params, mean_pool

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_HF = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=24, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12)


def _batch(seed=0, vocab=99, lengths=(7, 3, 5)):
    rng = np.random.default_rng(seed)
    length = max(lengths)
    ids = np.zeros((len(lengths), length), np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1, vocab, n)
        mask[row, :n] = 1
    return ids, mask


def _torch_outputs(model, ids, mask):
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return hidden, pooled


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A random-init 2-layer BertModel saved by transformers (config.json + model.safetensors)."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY_HF)).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    model.save_pretrained(path)
    return path, model


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_weights(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


# ----------------------------------------------------------------------------
# Random weights: layout, parity, predicate
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_parity_with_torch(tiny_hf_dir):
    path, model = tiny_hf_dir
    converted = convert_checkpoint(path)
    assert converted.kind == "bert" and converted.metadata["source"]["format"] == "bert"
    assert converted.config == BertConfig(vocab_size=99, width=32, layers=2, heads=4, mlp_dim=37, max_positions=24)
    ids, mask = _batch()
    hidden = np.asarray(BertEncoder(converted.config).apply({"params": converted.params}, jnp.asarray(ids),
                                                             jnp.asarray(mask)))
    ref_hidden, ref_pooled = _torch_outputs(model, ids, mask)
    assert hidden.shape == (3, 7, 32)
    np.testing.assert_allclose(hidden, ref_hidden, atol=1e-5)
    pooled = np.asarray(mean_pool(jnp.asarray(hidden), jnp.asarray(mask)))
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-5)


@pytest.mark.slow
def test_padding_does_not_change_real_tokens():
    cfg = BertConfig(vocab_size=50, width=16, layers=2, heads=2, mlp_dim=24, max_positions=16)
    params = init_params(cfg, jax.random.key(1))
    ids, mask = _batch(vocab=50, lengths=(4, 4))
    module = BertEncoder(cfg)
    short = module.apply({"params": params}, jnp.asarray(ids[:, :4]), jnp.asarray(mask[:, :4]))
    padded_ids = np.concatenate([ids[:, :4], np.full((2, 3), 7)], axis=1)  # junk ids behind a 0 mask
    padded = module.apply({"params": params}, jnp.asarray(padded_ids),
                          jnp.asarray(np.concatenate([mask[:, :4], np.zeros((2, 3), np.int64)], axis=1)))
    np.testing.assert_allclose(np.asarray(padded[:, :4]), np.asarray(short), atol=1e-5)
    np.testing.assert_allclose(np.asarray(mean_pool(padded, jnp.asarray(np.pad(mask[:, :4], ((0, 0), (0, 3)))))),
                               np.asarray(mean_pool(short, jnp.asarray(mask[:, :4]))), atol=1e-5)


@pytest.mark.slow
def test_matrix_predicate_and_attention_modes_read_bert():
    cfg = BertConfig(vocab_size=50, width=16, layers=2, heads=4, mlp_dim=24, max_positions=16)
    params = init_params(cfg)
    layouts = {path: sb.default_is_matrix(path, leaf) for path, leaf in sb.tree.leaves_with_paths(params)}
    matrices = {p: l.kind for p, l in layouts.items() if l is not None}
    assert matrices["encoder/layer_0/attention/query/kernel"] == "attn_in"
    assert matrices["encoder/layer_1/attention/out/kernel"] == "attn_out"
    assert matrices["encoder/layer_0/mlp/intermediate/kernel"] == "dense"
    assert len(matrices) == 2 * 6  # q, k, v, out, intermediate, output per block
    assert not any(p.startswith("embeddings/") for p in matrices)  # tables are merged entry-wise
    shapes = {mode: {k: tuple(v.shape) for k, v in sb.spectra(params, attention=mode).items()}
              for mode in ("per_qkv", "full", "per_head")}
    assert shapes["per_qkv"]["encoder/layer_0/attention/query"] == (16,)
    assert shapes["full"]["encoder/layer_0/attention/qkv"][-1] == 16  # (48, 16) fused: rank <= 16
    assert shapes["per_head"]["encoder/layer_0/attention/query"] == (4, 4)  # 4 heads of (4, 16)
    merged = sb.merge(jax.tree_util.tree_map(lambda x: jnp.stack([x, -0.5 * x]), params), method="tsv")
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)


# ----------------------------------------------------------------------------
# Converter: detection and bad inputs
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_convert_cli_and_load_model(tiny_hf_dir, tmp_path):
    from subboost.cli import main

    path, model = tiny_hf_dir
    assert main(["convert", str(path), str(tmp_path / "ckpt")]) == 0
    assert sb.checkpoint_info(tmp_path / "ckpt")["kind"] == "bert"
    module, params = sb.load_model(tmp_path / "ckpt")
    assert isinstance(module, BertEncoder)
    ids, mask = _batch()
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))),
                               _torch_outputs(model, ids, mask)[0], atol=1e-5)


def test_zip_source_and_bert_prefix(tiny_hf_dir, tmp_path):
    path, model = tiny_hf_dir
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in path.iterdir():
            z.write(f, f"nested/{f.name}")
    converted = convert_checkpoint(archive)
    assert converted.metadata["source"]["files"][0]["path"] == str(archive.absolute())
    direct = convert_checkpoint(path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted.params, direct.params)
    prefixed = _copy_dir(path, tmp_path / "prefixed")  # BertForSequenceClassification-style keys
    _rewrite_weights(prefixed, lambda t: t.update({"bert." + k: t.pop(k) for k in list(t)}))
    jax.tree_util.tree_map(np.testing.assert_array_equal, convert_checkpoint(prefixed).params, direct.params)


def test_other_model_type_is_refused(tiny_hf_dir, tmp_path):
    path, _ = tiny_hf_dir
    other = _copy_dir(path, tmp_path / "roberta")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(ConversionError, match=r"roberta.*config\.json.*model_type is 'roberta', not 'bert'"):
        convert_checkpoint(other, format="bert")
    archive = tmp_path / "roberta.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in other.iterdir():
            z.write(f, f.name)
    with pytest.raises(ConversionError, match=r"roberta\.zip: config\.json: model_type is 'roberta'"):
        convert_checkpoint(archive)


def test_missing_and_misshapen_tensors_are_listed(tiny_hf_dir, tmp_path):
    path, _ = tiny_hf_dir
    broken = _copy_dir(path, tmp_path / "broken")

    def edit(t):
        del t["encoder.layer.1.attention.self.value.bias"]
        t["encoder.layer.0.output.dense.weight"] = np.zeros((32, 36), np.float32)

    _rewrite_weights(broken, edit)
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(broken)
    message = str(err.value)
    assert str(broken) in message
    assert "missing keys ['encoder.layer.1.attention.self.value.bias']" in message
    assert "'encoder.layer.0.output.dense.weight' has shape (32, 36), expected (32, 37)" in message
    wrong = _copy_dir(path, tmp_path / "wrong_config")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ConversionError, match=r"wrong_config: config\.json says width=64 but the weights have 32"):
        convert_checkpoint(wrong)


def test_truncated_zip_names_the_archive(tiny_hf_dir, tmp_path):
    path, _ = tiny_hf_dir
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in path.iterdir():
            z.write(f, f.name)
    data = archive.read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"cut\.zip: not a readable zip archive"):
        convert_checkpoint(cut)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match=r"cut\.zip"):
        convert(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on error


@pytest.mark.slow
def test_load_model_errors(tmp_path):
    sb.save_params({"w": {"kernel": np.ones((2, 2), np.float32)}}, tmp_path / "bare")
    with pytest.raises(sb.SubboostError, match="no subboost.json"):
        sb.load_model(tmp_path / "bare")
    with pytest.raises(FileNotFoundError):
        sb.load_model(tmp_path / "absent")
    cfg = sb.models.get_config("tiny")
    sb.save_params(sb.models.init_params(cfg), tmp_path / "vit",
                   metadata={"kind": "clip_vision", "architecture": cfg.to_dict()})
    module, params = sb.load_model(tmp_path / "vit")
    assert module.apply({"params": params}, jnp.zeros((1, 32, 32, 3))).shape == (1, cfg.embed_dim)


# ----------------------------------------------------------------------------
# The real packaged weights (all-MiniLM-L6-v2; installed with the `text` extra)
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_packaged_minilm_matches_torch(tmp_path):
    from subboost.bench.suites.text.tokenize import SentenceTokenizer
    from subboost.bench.suites.text.weights import packaged_model_zip

    archive = packaged_model_zip()
    convert(archive, tmp_path / "minilm")
    module, params = sb.load_model(tmp_path / "minilm")
    assert module.config == sb.models.bert.MINILM_L6
    folder = tmp_path / "hf"
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()
    sentences = ["the cat sat on the mat", "hello", "merging experts fine-tuned from one pretrained model",
                 "a b c"]
    encoded = SentenceTokenizer.from_zip(archive).encode(sentences, max_length=32)
    ids, mask = encoded.input_ids, encoded.attention_mask
    assert mask.sum(1).tolist() == [8, 3, 13, 5] and ids.shape == (4, 13)
    hidden = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    ref_hidden, ref_pooled = _torch_outputs(model, ids.astype(np.int64), mask.astype(np.int64))
    assert hidden.shape == (4, 13, 384)
    assert np.abs(hidden - ref_hidden).max() < 1e-4
    pooled = np.asarray(mean_pool(jnp.asarray(hidden), jnp.asarray(mask)))
    assert np.abs(pooled - ref_pooled).max() < 1e-4
    assert np.abs(ref_pooled).max() > 0.1  # a real signal, not two zero vectors
