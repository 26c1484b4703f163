"""Converters: random-initialised open_clip / transformers models saved in every supported
format, converted, and compared forward pass for forward pass with PyTorch (float32, max abs
diff <= 1e-4); then every kind of bad input, and the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

import subboost as sb  # noqa: E402
from subboost.cli import main as cli_main  # noqa: E402
from subboost.convert import ConversionError, UnsafePickleError, convert, convert_checkpoint  # noqa: E402
from subboost.models import ClassificationHead, CLIPVisionTransformer  # noqa: E402

TOL = 1e-4
TINY_VISION = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}  # 2 heads
TINY_TEXT = {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random-init plus noise on every parameter (LayerNorms, biases, class token included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


def tiny_clip(seed: int, *, quick_gelu: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb(open_clip.model.CLIP(16, TINY_VISION, TINY_TEXT, quick_gelu=quick_gelu), seed)


def flax_features(converted, images: np.ndarray) -> np.ndarray:
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    return np.asarray(CLIPVisionTransformer(converted.config).apply({"params": converted.params}, nhwc))


def torch_features(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def assert_close(flax_out: np.ndarray, torch_out: np.ndarray) -> None:
    assert flax_out.shape == torch_out.shape
    diff = float(np.abs(flax_out - torch_out).max())
    assert diff <= TOL, f"max abs diff {diff}"
    assert float(np.abs(torch_out).max()) > 1e-2  # the comparison is not between two near-zero outputs


@contextlib.contextmanager
def fake_module(name: str, **objects):
    """Makes ``objects`` importable as ``name.<attr>`` (so torch.save can pickle them), then removes it."""
    parts = name.split(".")
    created = []
    for i in range(1, len(parts) + 1):
        mod_name = ".".join(parts[:i])
        if mod_name not in sys.modules:
            sys.modules[mod_name] = types.ModuleType(mod_name)
            created.append(mod_name)
    module = sys.modules[name]
    for attr, obj in objects.items():
        obj.__module__, obj.__qualname__ = name, attr
        setattr(module, attr, obj)
    try:
        yield module
    finally:
        for mod_name in created:
            del sys.modules[mod_name]


def _rgb(image):  # how older open_clip versions referenced `_convert_to_rgb` in the preprocess pipeline
    return image


class ImageEncoder(torch.nn.Module):
    """The task-vector codebases' encoder: an open_clip model plus its preprocessing."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train_preprocess = self.val_preprocess = open_clip.image_transform(32, is_train=False)
        self.convert_fn = _rgb
        self.cache_dir = "/nonexistent"

    def forward(self, images):
        return self.model.encode_image(images)


class TorchHead(torch.nn.Linear):
    def __init__(self, weight, bias, normalize=True):
        super().__init__(weight.shape[1], weight.shape[0])
        self.normalize = normalize
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)

    def forward(self, features):
        if self.normalize:
            features = features / features.norm(dim=-1, keepdim=True)
        return super().forward(features)


def save_pickled(obj, path: Path, *, module: str, **classes) -> None:
    """torch.save(obj) with ``classes`` living in ``module``, which is gone afterwards."""
    with fake_module(module, **classes):
        torch.save(obj, path)
    assert module not in sys.modules


# ----------------------------------------------------------------------------
# fixtures (module scope: models are built and saved once)
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    model = tiny_clip(0)
    gelu_model = tiny_clip(1, quick_gelu=False)
    state = model.state_dict()
    torch.save(state, root / "full.pt")
    torch.save(model.visual.state_dict(), root / "visual.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, root / "wrapped.pt")
    save_pickled(ImageEncoder(model), root / "encoder.pt", module="src.modeling", ImageEncoder=ImageEncoder)
    save_pickled(ImageEncoder(gelu_model), root / "encoder_gelu.pt", module="src.modeling", ImageEncoder=ImageEncoder)
    gen = torch.Generator().manual_seed(5)
    head = TorchHead(torch.randn(7, 16, generator=gen), torch.randn(7, generator=gen))
    torch.save({"weight": head.weight.detach(), "bias": head.bias.detach()}, root / "head_MNIST.pt")
    save_pickled(head, root / "head_SVHN.pt", module="src.modeling", ClassificationHead=TorchHead)
    return types.SimpleNamespace(root=root, model=model, gelu_model=gelu_model, head=head)


# ----------------------------------------------------------------------------
# parity: open_clip state dicts, pickled modules, heads
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, layout", [("full.pt", "full CLIP model (text tower not converted)"), ("visual.pt", "visual tower"),
                     ("wrapped.pt", "full CLIP model (text tower not converted)")],
)
@pytest.mark.slow
def test_open_clip_state_dict_matches_torch(files, images, name, layout):
    converted = convert_checkpoint(files.root / name, heads=2)
    assert converted.metadata["source"]["format"] == "open_clip"
    assert converted.metadata["source"]["layout"] == layout
    assert converted.config == sb.models.get_config("tiny")
    assert_close(flax_features(converted, images), torch_features(files.model.encode_image, images))


@pytest.mark.slow
def test_pickled_image_encoder_loads_without_its_source(files, images):
    path = files.root / "encoder.pt"
    with pytest.raises(ModuleNotFoundError, match="src"):  # plain torch.load needs the codebase
        torch.load(path, weights_only=False)
    converted = convert_checkpoint(path)  # heads and act read off the pickled modules
    assert converted.metadata["source"]["format"] == "pickled_module"
    assert converted.metadata["source"]["contents"] == "pickled module src.modeling.ImageEncoder"
    assert (converted.config.heads, converted.config.act, converted.metadata["notes"]) == (2, "quick_gelu", [])
    assert_close(flax_features(converted, images), torch_features(files.model.encode_image, images))


@pytest.mark.slow
def test_gelu_models(files, images):
    reference = torch_features(files.gelu_model.encode_image, images)
    pickled = convert_checkpoint(files.root / "encoder_gelu.pt")
    assert pickled.config.act == "gelu"
    assert_close(flax_features(pickled, images), reference)
    path = files.root / "gelu_state.pt"
    torch.save(files.gelu_model.state_dict(), path)
    assert_close(flax_features(convert_checkpoint(path, heads=2, act="gelu"), images), reference)
    # the wrong activation is visible: the check above is sensitive to it
    wrong = flax_features(convert_checkpoint(path, heads=2, act="quick_gelu"), images)
    assert float(np.abs(wrong - reference).max()) > 1e-3


@pytest.mark.parametrize("name, task, normalize", [("head_MNIST.pt", "MNIST", True), ("head_SVHN.pt", "SVHN", True)])
@pytest.mark.slow
def test_heads_match_torch(files, images, name, task, normalize):
    encoder = convert_checkpoint(files.root / "encoder.pt")
    head = convert_checkpoint(files.root / name)
    assert head.kind == "classification_head"
    assert head.metadata["task"] == task
    assert head.metadata["architecture"] == {"num_classes": 7, "embed_dim": 16, "normalize": normalize}
    logits = ClassificationHead(7).apply({"params": head.params}, jnp.asarray(flax_features(encoder, images)))
    with torch.no_grad():
        expected = files.head(files.model.encode_image(torch.from_numpy(images))).numpy()
    assert_close(np.asarray(logits), expected)


@pytest.mark.slow
def test_vit_b32_architecture_matches_torch(tmp_path):
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).visual.eval()
    torch.save(visual.state_dict(), tmp_path / "b32.pt")
    converted = convert_checkpoint(tmp_path / "b32.pt", config="ViT-B/32")
    assert converted.metadata["config_name"] == "ViT-B/32"
    image = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert_close(flax_features(converted, image), torch_features(visual, image))


# ----------------------------------------------------------------------------
# parity: Hugging Face directories
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("with_projection", [True, False])
@pytest.mark.slow
def test_hugging_face_matches_torch(tmp_path, images, act, with_projection):
    cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    config = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16, hidden_act=act,
    )
    torch.manual_seed(0)
    model = perturb(cls(config), 0)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    converted = convert_checkpoint(tmp_path / "hf")
    cfg = converted.config
    assert (cfg.heads, cfg.act, cfg.hidden_dim, cfg.embed_dim) == (4, act, 48, 16 if with_projection else 32)
    assert converted.metadata["source"]["format"] == "hf"
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images))
    expected = (out.image_embeds if with_projection else out.pooler_output).numpy()
    assert_close(flax_features(converted, images), expected)


# ----------------------------------------------------------------------------
# round trip through orbax, metadata, load_experts
# ----------------------------------------------------------------------------
def test_convert_save_restore_round_trip(files, tmp_path):
    src = files.root / "encoder.pt"
    converted = convert(src, tmp_path / "ckpt")
    restored = sb.load_params(tmp_path / "ckpt")
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(converted.params)
    for a, b in zip(jax.tree_util.tree_leaves(converted.params), jax.tree_util.tree_leaves(restored)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical
    info = sb.checkpoint_info(tmp_path / "ckpt")
    assert info["kind"] == "clip_vision" and info["architecture"]["heads"] == 2
    assert info["source"]["files"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging directory left behind


def test_load_experts_returns_task_vectors(files, tmp_path):
    convert(files.root / "full.pt", tmp_path / "base", heads=2)
    experts = []
    for seed in (7, 8):
        expert = perturb(tiny_clip(0), seed)  # same init, different "fine-tuning"
        torch.save(expert.state_dict(), tmp_path / f"e{seed}.pt")
        convert(tmp_path / f"e{seed}.pt", tmp_path / f"expert{seed}", heads=2)
        experts.append(convert_checkpoint(tmp_path / f"e{seed}.pt", heads=2).params)
    base = convert_checkpoint(files.root / "full.pt", heads=2).params
    tvs = sb.load_experts(tmp_path / "base", [tmp_path / "expert7", tmp_path / "expert8"])
    expected = jax.tree_util.tree_map(lambda b, *e: np.stack([x - b for x in e]), base, *experts)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6), tvs, expected)
    assert tvs["proj"].shape == (2, 32, 16)


def test_load_experts_rejects_other_architectures(files, tmp_path):
    convert(files.root / "full.pt", tmp_path / "base", heads=2)
    convert(files.root / "head_MNIST.pt", tmp_path / "head")
    with pytest.raises(ValueError, match=r"expert 0 \(.*head\) holds a classification head, not model parameters"):
        sb.load_experts(tmp_path / "base", [tmp_path / "head"])
    sb.save_params(sb.load_params(tmp_path / "head"), tmp_path / "plain")  # no identity: shapes still checked
    with pytest.raises(ValueError, match=r"missing parameters \[.*'class_embedding'.*unexpected parameters \['bias', 'kernel'\]"):
        sb.load_experts(tmp_path / "base", [tmp_path / "plain"], check_architecture=False)


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------
def test_missing_and_unknown_keys_are_listed(files, tmp_path):
    state = dict(files.model.state_dict())
    del state["visual.ln_post.bias"], state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    state["visual.extra.weight"] = torch.ones(3)
    state["adapter.scale"] = torch.ones(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(tmp_path / "bad.pt", heads=2)
    message = str(err.value)
    assert "missing keys ['visual.transformer.resblocks.1.attn.in_proj_weight', 'visual.ln_post.bias']" in message
    assert "unexpected keys ['visual.extra.weight', 'adapter.scale']" in message


def test_wrong_shapes_name_key_and_shapes(files, tmp_path):
    state = dict(files.model.visual.state_dict())
    state["ln_pre.weight"] = torch.ones(31)
    state["transformer.resblocks.0.mlp.c_proj.weight"] = torch.ones(32, 100)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match="wrong shapes") as err:
        convert_checkpoint(tmp_path / "bad.pt", heads=2)
    assert "'ln_pre.weight' has shape (31,), expected (32,)" in str(err.value)
    assert "'transformer.resblocks.0.mlp.c_proj.weight' has shape (32, 100), expected (32, 128)" in str(err.value)


def test_architecture_arguments_are_checked(files):
    with pytest.raises(ConversionError, match="width is 32 in the checkpoint, 768 in the config"):
        convert_checkpoint(files.root / "visual.pt", config="ViT-B/32")
    with pytest.raises(ConversionError, match=r"number of attention heads.*pass heads=N"):
        convert_checkpoint(files.root / "visual.pt")
    with pytest.raises(ConversionError, match="width 32 is not divisible by heads 5"):
        convert_checkpoint(files.root / "visual.pt", heads=5)
    with pytest.raises(ConversionError, match=r"layers=3 was requested but the weights have layers=2"):
        convert_checkpoint(files.root / "visual.pt", heads=2, layers=3)


def test_non_finite_weights_are_refused(files, tmp_path):
    state = dict(files.model.visual.state_dict())
    state["ln_post.weight"] = state["ln_post.weight"].clone()
    state["ln_post.weight"][3] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ConversionError, match="parameter 'ln_post/scale' contains NaN"):
        convert(tmp_path / "nan.pt", tmp_path / "out", heads=2)
    assert not (tmp_path / "out").exists()


class _CallsOsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def _helper(x):
    return x


class _CallsHelper:
    def __reduce__(self):
        return _helper, (1,)


def test_pickle_calling_os_system_is_refused(files, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({**files.model.visual.state_dict(), "payload": _CallsOsSystem(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match=rf"global {os.system.__module__}\.system; refusing"):
        convert_checkpoint(tmp_path / "evil.pt", heads=2)
    # the same through a legacy (non-zip) pickle naming os.system literally
    (tmp_path / "legacy.pt").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"global os\.system; refusing"):
        convert_checkpoint(tmp_path / "legacy.pt")
    assert not marker.exists()


def test_pickle_calling_other_globals_is_refused(files, tmp_path):
    torch.save({"payload": _CallsEval()}, tmp_path / "eval.pt")
    with pytest.raises(UnsafePickleError, match=r"global (__builtin__|builtins)\.eval; refusing"):
        convert_checkpoint(tmp_path / "eval.pt")
    with fake_module("thirdparty.utils", helper=_helper, CallsHelper=_CallsHelper):
        torch.save({"w": torch.ones(2), "payload": _CallsHelper()}, tmp_path / "call.pt")
    with pytest.raises(UnsafePickleError, match=r"the pickle calls thirdparty\.utils\.helper"):
        convert_checkpoint(tmp_path / "call.pt")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archives_are_refused(files, tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(ValueError, match="TorchScript archive"):
        convert_checkpoint(tmp_path / "scripted.pt")


def test_existing_destination_needs_overwrite(files, tmp_path):
    dst = tmp_path / "ckpt"
    convert(files.root / "visual.pt", dst, heads=2)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        convert(files.root / "head_MNIST.pt", dst)
    assert sb.checkpoint_info(dst)["kind"] == "clip_vision"  # untouched
    convert(files.root / "head_MNIST.pt", dst, overwrite=True)
    assert sb.checkpoint_info(dst)["kind"] == "classification_head"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint .*; refusing to replace it even with overwrite"):
        convert(files.root / "head_MNIST.pt", precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "mine"


def test_corrupted_files_leave_nothing_behind(files, tmp_path):
    data = (files.root / "visual.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated.pt: not a readable PyTorch checkpoint"):
        convert(tmp_path / "truncated.pt", tmp_path / "out", heads=2)
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage.pt: not a readable PyTorch checkpoint"):
        convert(tmp_path / "garbage.pt", tmp_path / "out", heads=2)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"hidden_size": 32}')
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        convert(hf, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["garbage.pt", "hf", "truncated.pt"]


def test_format_mismatch_and_unknown_layout(files, tmp_path):
    with pytest.raises(ConversionError, match="not a state_dict; use --format pickled_module"):
        convert_checkpoint(files.root / "encoder.pt", format="open_clip")
    with pytest.raises(ConversionError, match="not a pickled module; use --format open_clip"):
        convert_checkpoint(files.root / "visual.pt", format="pickled_module", heads=2)
    with pytest.raises(ConversionError, match="--format head requested, but the file holds a open_clip checkpoint"):
        convert_checkpoint(files.root / "visual.pt", format="head")
    torch.save({"encoder.layer.weight": torch.ones(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match=r"unrecognised state_dict.*\['encoder.layer.weight'\]"):
        convert_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def test_cli_convert(files, tmp_path, capsys):
    assert cli_main(["convert", str(files.root / "encoder.pt"), str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("converted ") and "[pickled_module]" in out and "CLIP vision tower (tiny" in out
    assert "\n" not in out
    assert cli_main(["convert", str(files.root / "visual.pt"), str(tmp_path / "v"), "--heads", "2", "--act", "gelu"]) == 0
    assert sb.checkpoint_info(tmp_path / "v")["architecture"]["act"] == "gelu"
    capsys.readouterr()
    assert cli_main(["convert", str(files.root / "encoder.pt"), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("subboost convert: error: DST") and "pass --overwrite" in err
    assert cli_main(["convert", str(files.root / "encoder.pt"), str(tmp_path / "ckpt"), "--overwrite"]) == 0
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert cli_main(["convert", str(tmp_path / "bad.pt"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable PyTorch checkpoint" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_full_hugging_face_clip_model(tmp_path, images):
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 50, "max_position_embeddings": 8, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = perturb(transformers.CLIPModel(config), 1)
    model.save_pretrained(tmp_path / "clip", safe_serialization=True)
    converted = convert_checkpoint(tmp_path / "clip")
    assert converted.metadata["source"]["layout"] == "full CLIPModel (text tower not converted)"
    assert converted.config == sb.models.get_config("tiny")
    with torch.no_grad():
        out = model.vision_model(pixel_values=torch.from_numpy(images))
        expected = model.visual_projection(out.pooler_output).numpy()
    assert_close(flax_features(converted, images), expected)


@pytest.mark.slow
def test_half_precision_sources_keep_or_cast_dtype(files, tmp_path, images):
    half = {k: v.half() for k, v in files.model.state_dict().items()}
    torch.save(half, tmp_path / "fp16.pt")  # OpenAI's original checkpoints are float16
    kept = convert_checkpoint(tmp_path / "fp16.pt", heads=2)
    assert {x.dtype for x in jax.tree_util.tree_leaves(kept.params)} == {np.dtype(np.float16)}
    cast = convert_checkpoint(tmp_path / "fp16.pt", heads=2, dtype="float32")
    assert {x.dtype for x in jax.tree_util.tree_leaves(cast.params)} == {np.dtype(np.float32)}
    reference = flax_features(convert_checkpoint(files.root / "full.pt", heads=2), images)
    assert float(np.abs(flax_features(cast, images) - reference).max()) < 2e-2  # float16 rounding only
    bf16 = convert_checkpoint(files.root / "full.pt", heads=2, dtype="bfloat16")
    assert bf16.params["proj"].dtype.name == "bfloat16"
    with pytest.raises(ConversionError, match="unknown dtype 'float99'"):
        convert_checkpoint(files.root / "full.pt", heads=2, dtype="float99")
