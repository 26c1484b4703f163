"""The Flax CLIP image tower and classification heads, against an independent numpy forward pass."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subboost.models import (
    CLIPVisionConfig,
    CLIPVisionTransformer,
    ClassificationHead,
    get_config,
    head_from_linear,
    heads_from_class_embeddings,
    init_params,
    param_shapes,
)


# ----------------------------------------------------------------------------
# numpy reference (written from the CLIP definition, not from the Flax module)
# ----------------------------------------------------------------------------
def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _act(x, name):
    if name == "quick_gelu":
        return x / (1 + np.exp(-1.702 * x))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def numpy_forward(params, cfg: CLIPVisionConfig, images: np.ndarray) -> np.ndarray:
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    b, s, ps = images.shape[0], cfg.image_size, cfg.patch_size
    g = s // ps
    patches = images.reshape(b, g, ps, g, ps, cfg.in_channels).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    w_patch = p["conv1"]["kernel"].reshape(-1, cfg.width)  # HWIO flattened as (p, p, C)
    x = patches @ w_patch
    x = np.concatenate([np.broadcast_to(p["class_embedding"], (b, 1, cfg.width)), x], 1) + p["positional_embedding"]
    x = _ln(x, p["ln_pre"])
    for i in range(cfg.layers):
        blk = p["transformer"][f"resblocks_{i}"]
        y = _ln(x, blk["ln_1"])
        q, k, v = (np.einsum("btw,whd->bthd", y, blk["attn"][n]["kernel"]) + blk["attn"][n]["bias"]
                   for n in ("query", "key", "value"))
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", att, v)
        x = x + np.einsum("bqhd,hdw->bqw", o, blk["attn"]["out"]["kernel"]) + blk["attn"]["out"]["bias"]
        y = _ln(x, blk["ln_2"])
        y = _act(y @ blk["mlp"]["c_fc"]["kernel"] + blk["mlp"]["c_fc"]["bias"], cfg.act)
        x = x + y @ blk["mlp"]["c_proj"]["kernel"] + blk["mlp"]["c_proj"]["bias"]
    return _ln(x[:, 0], p["ln_post"]) @ p["proj"]


def _random_params(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    # move LayerNorm / biases away from their trivial init so that every parameter matters
    return jax.tree_util.tree_map(lambda a: a + jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), params)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("mlp_dim", [None, 24])
@pytest.mark.slow
def test_forward_matches_numpy_reference(act, mlp_dim):
    cfg = dataclasses.replace(get_config("tiny"), act=act, mlp_dim=mlp_dim)
    params = _random_params(cfg)
    images = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
    features = CLIPVisionTransformer(cfg).apply({"params": params}, jnp.asarray(images))
    assert features.shape == (3, cfg.embed_dim) and features.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(features), numpy_forward(params, cfg, images), atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_activations_differ():
    cfg = get_config("tiny")
    params = _random_params(cfg)
    images = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)
    quick = CLIPVisionTransformer(cfg).apply({"params": params}, images)
    exact = CLIPVisionTransformer(dataclasses.replace(cfg, act="gelu")).apply({"params": params}, images)
    assert float(jnp.abs(quick - exact).max()) > 1e-3


def test_parameter_tree_names_and_shapes():
    cfg = get_config("tiny")
    shapes = jax.tree_util.tree_map(lambda a: a.shape, param_shapes(cfg))
    head_dim = cfg.width // cfg.heads
    block = {
        "ln_1": {"scale": (32,), "bias": (32,)},
        "attn": {
            **{n: {"kernel": (32, cfg.heads, head_dim), "bias": (cfg.heads, head_dim)} for n in ("query", "key", "value")},
            "out": {"kernel": (cfg.heads, head_dim, 32), "bias": (32,)},
        },
        "ln_2": {"scale": (32,), "bias": (32,)},
        "mlp": {"c_fc": {"kernel": (32, 128), "bias": (128,)}, "c_proj": {"kernel": (128, 32), "bias": (32,)}},
    }
    assert shapes == {
        "conv1": {"kernel": (8, 8, 3, 32)},
        "class_embedding": (32,),
        "positional_embedding": (17, 32),
        "ln_pre": {"scale": (32,), "bias": (32,)},
        "transformer": {"resblocks_0": block, "resblocks_1": block},
        "ln_post": {"scale": (32,), "bias": (32,)},
        "proj": (32, 16),
    }


@pytest.mark.parametrize(
    "name, alias, width, layers, heads, patch, embed",
    [("ViT-B/32", "ViT-B-32", 768, 12, 12, 32, 512), ("ViT-B/16", "ViT-B-16", 768, 12, 12, 16, 512),
     ("ViT-L/14", "ViT-L-14", 1024, 24, 16, 14, 768)],
)
def test_named_configs(name, alias, width, layers, heads, patch, embed):
    cfg = get_config(name)
    assert get_config(alias) == cfg
    assert (cfg.width, cfg.layers, cfg.heads, cfg.patch_size, cfg.embed_dim, cfg.image_size) == (
        width, layers, heads, patch, embed, 224)
    assert cfg.act == "quick_gelu" and cfg.hidden_dim == 4 * width
    assert param_shapes(cfg)["positional_embedding"].shape == ((224 // patch) ** 2 + 1, width)
    assert CLIPVisionConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "fields, message",
    [(dict(image_size=30), "not divisible by patch_size"), (dict(heads=3), "not divisible by heads"),
     (dict(act="relu"), "act must be one of"), (dict(width=0), "width must be a positive integer")],
)
def test_bad_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_config("tiny"), **fields)


@pytest.mark.slow
def test_unknown_config_and_bad_images():
    with pytest.raises(ValueError, match="unknown CLIP vision config 'ViT-H/99'"):
        get_config("ViT-H/99")
    cfg = get_config("tiny")
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\).*got \(2, 3, 32, 32\)"):
        CLIPVisionTransformer(cfg).apply({"params": init_params(cfg)}, jnp.zeros((2, 3, 32, 32)))


# ----------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------
def test_classification_head_normalises_then_projects():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((4, 16)).astype(np.float32)
    weight, bias = rng.standard_normal((5, 16)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    params = head_from_linear(weight, bias)
    logits = ClassificationHead(5).apply({"params": params}, jnp.asarray(features))
    expected = features / np.linalg.norm(features, axis=-1, keepdims=True) @ weight.T + bias
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
    scaled = ClassificationHead(5).apply({"params": params}, jnp.asarray(7.5 * features))
    np.testing.assert_allclose(np.asarray(scaled), expected, rtol=1e-5, atol=1e-5)
    zero = ClassificationHead(5).apply({"params": params}, jnp.zeros((1, 16)))
    np.testing.assert_allclose(np.asarray(zero)[0], bias, atol=1e-6)  # finite, not NaN
    init = ClassificationHead(5).init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
    assert jax.tree_util.tree_map(jnp.shape, init) == {"kernel": (16, 5), "bias": (5,)}


@pytest.mark.slow
def test_heads_from_class_embeddings_known_answer():
    # orthogonal class embeddings of norms 2, 3, 4 -> unit rows, scaled by logit_scale
    emb = np.zeros((3, 4), np.float32)
    emb[0, 0], emb[1, 1], emb[2, 2] = 2.0, 3.0, 4.0
    params = heads_from_class_embeddings(emb, logit_scale=100.0)
    chex.assert_trees_all_close(params, {"kernel": 100.0 * np.eye(4, 3, dtype=np.float32), "bias": np.zeros(3, np.float32)})
    # templates: mean of unit vectors [1,0] and [0,1] is renormalised to [1,1]/sqrt 2
    templates = np.array([[[5.0, 0.0], [0.0, 0.5]]], np.float32)
    kernel = heads_from_class_embeddings(templates, logit_scale=1.0)["kernel"]
    np.testing.assert_allclose(np.asarray(kernel)[:, 0], [2**-0.5, 2**-0.5], rtol=1e-6)


def test_heads_bad_input():
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        heads_from_class_embeddings(np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        heads_from_class_embeddings(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \(5,\)"):
        head_from_linear(np.ones((5, 3)), np.ones(4))
