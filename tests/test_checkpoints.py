"""Orbax save / restore, atomic writes, and loading experts as stacked task vectors."""

from __future__ import annotations

import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import subboost as sb
from subboost import checkpoints
from subboost.errors import SubboostError
from tests.conftest import vit_like_params


def _tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": rng.standard_normal((3, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)},
        "half": rng.standard_normal((2, 5)).astype(np.float16),
        "bf16": rng.standard_normal(6).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal(2),
    }


def test_round_trip_is_bit_identical(tmp_path):
    tree = _tree()
    path = sb.save_params(tree, tmp_path / "ckpt", metadata={"kind": "test", "n": 1})
    assert path == (tmp_path / "ckpt").absolute()
    restored = sb.load_params(tmp_path / "ckpt")
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(restored))
    host = sb.load_params(tmp_path / "ckpt", as_numpy=True)
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(host))
    assert jax.tree_util.tree_structure(host) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(host)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    info = sb.checkpoint_info(tmp_path / "ckpt")
    assert {k: info[k] for k in ("kind", "n", "content")} == {"kind": "test", "n": 1, "content": "params"}
    assert sorted(info["checksums"]) == sorted(p for p, _ in sb.tree.leaves_with_paths(tree))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_jax_arrays_save_too(tmp_path):
    tree = jax.tree_util.tree_map(jnp.asarray, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    sb.save_params(tree, tmp_path / "ckpt")
    chex.assert_trees_all_equal(sb.load_params(tmp_path / "ckpt", as_numpy=True), jax.device_get(tree))
    info = sb.checkpoint_info(tmp_path / "ckpt")  # every save records content and checksums
    assert info["content"] == "params" and list(info["checksums"]) == ["w"] and "kind" not in info


def test_existing_destination(tmp_path):
    sb.save_params({"a": np.ones(2, np.float32)}, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        sb.save_params({"a": np.zeros(2, np.float32)}, tmp_path / "ckpt")
    np.testing.assert_array_equal(sb.load_params(tmp_path / "ckpt", as_numpy=True)["a"], np.ones(2))
    sb.save_params({"b": np.zeros(3, np.float32)}, tmp_path / "ckpt", overwrite=True)
    assert list(sb.load_params(tmp_path / "ckpt")) == ["b"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a checkpoint or other output written by subboost"):
        sb.save_params({"a": np.ones(2, np.float32)}, folder, overwrite=True)
    assert (folder / "keep.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        sb.save_params({"a": np.ones(2, np.float32)}, tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "file", "folder"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        sb.save_params({"a": np.ones(2, np.float32)}, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []
    with pytest.raises(SubboostError, match=r"parameter 'a/b' is not an array \(str\)"):
        sb.save_params({"a": {"b": "text"}}, tmp_path / "ckpt")
    with pytest.raises(SubboostError, match="empty"):
        sb.save_params({}, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    sb.save_params({"a": np.ones(2, np.float32)}, tmp_path / "ckpt")
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        sb.save_params({"a": np.zeros(2, np.float32)}, tmp_path / "ckpt", overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(sb.load_params(tmp_path / "ckpt", as_numpy=True)["a"], np.ones(2))
    assert os.listdir(tmp_path) == ["ckpt"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sb.load_params(tmp_path / "nothing")
    sb.save_params({"a": np.ones(2, np.float32)}, tmp_path / "ckpt")
    for path in (tmp_path / "ckpt").rglob("*"):  # damage the data files, keep the markers
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"garbage")
    with pytest.raises(SubboostError, match=r"ckpt: cannot restore the orbax checkpoint"):
        sb.load_params(tmp_path / "ckpt")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / checkpoints.METADATA_FILE).write_text("{broken")
    with pytest.raises(SubboostError, match="unreadable checkpoint metadata"):
        sb.checkpoint_info(tmp_path / "meta")


def _save_experts(tmp_path, base, experts):
    sb.save_params(base, tmp_path / "base", metadata={"kind": "clip_vision", "architecture": {"width": 8}})
    paths = []
    for t, expert in enumerate(experts):
        paths.append(sb.save_params(expert, tmp_path / f"e{t}", metadata={"kind": "clip_vision", "architecture": {"width": 8}}))
    return paths


def test_load_experts_stacks_task_vectors(tmp_path, experts):
    base, finetuned = experts
    paths = _save_experts(tmp_path, base, finetuned)
    tvs = sb.load_experts(tmp_path / "base", paths)
    chex.assert_trees_all_close(tvs, sb.task_vectors(base, finetuned), atol=1e-6)
    assert tvs["transformer"]["resblocks_0"]["attn"]["query"]["kernel"].shape == (4, 8, 2, 4)
    # base already in memory
    chex.assert_trees_all_close(sb.load_experts(base, paths[:2]), sb.task_vectors(base, finetuned[:2]), atol=1e-6)


def test_load_experts_lists_every_mismatch(tmp_path, experts):
    base, finetuned = experts
    bad = jax.tree_util.tree_map(lambda x: x, finetuned[0])
    del bad["ln_post"], bad["class_embedding"]
    bad["extra"] = jnp.ones(3)
    bad["proj"] = jnp.ones((8, 5))
    bad["ln_pre"]["scale"] = bad["ln_pre"]["scale"].astype(jnp.float16)
    paths = _save_experts(tmp_path, base, [finetuned[1], bad])
    with pytest.raises(SubboostError) as err:
        sb.load_experts(tmp_path / "base", paths)
    message = str(err.value)
    assert "expert 1 (" in message
    assert "missing parameters ['class_embedding', 'ln_post/bias', 'ln_post/scale']" in message
    assert "unexpected parameters ['extra']" in message
    assert "parameter 'proj' has shape (8, 5) but base" in message and "has (8, 4)" in message
    assert "parameter 'ln_pre/scale' has dtype float16 but base" in message


def test_load_experts_checks_recorded_architecture(tmp_path, rng):
    base = vit_like_params(rng)
    sb.save_params(base, tmp_path / "base", metadata={"kind": "clip_vision", "architecture": {"width": 8}})
    sb.save_params(base, tmp_path / "e0", metadata={"kind": "clip_vision", "architecture": {"width": 9}})
    with pytest.raises(SubboostError, match=r"expert 0 .* has architecture .*'width': 9.* but base .* has .*'width': 8"):
        sb.load_experts(tmp_path / "base", [tmp_path / "e0"])
    tvs = sb.load_experts(tmp_path / "base", [tmp_path / "e0"], check_architecture=False)
    assert float(jnp.abs(tvs["proj"]).max()) == 0.0
    with pytest.raises(SubboostError, match="the list is empty"):
        sb.load_experts(tmp_path / "base", [])


def test_load_experts_refuses_non_finite(tmp_path, experts):
    base, finetuned = experts
    bad = jax.tree_util.tree_map(lambda x: x, finetuned[0])
    bad["proj"] = bad["proj"].at[0, 0].set(jnp.nan)
    with pytest.raises(SubboostError, match="save_params: parameter 'proj' contains NaN"):  # never written by us
        _save_experts(tmp_path, base, [bad])
    import orbax.checkpoint as ocp  # ... but another program may have written it

    sb.save_params(base, tmp_path / "base", overwrite=True)
    ocp.PyTreeCheckpointer().save((tmp_path / "nan_expert").absolute(), jax.device_get(bad))
    with pytest.raises(SubboostError, match=r"expert 0 \(.*nan_expert\): parameter 'proj' contains NaN"):
        sb.load_experts(tmp_path / "base", [tmp_path / "nan_expert"])


def test_metadata_is_json(tmp_path):
    sb.save_params({"a": np.ones(1, np.float32)}, tmp_path / "c", metadata={"path": tmp_path})
    text = (tmp_path / "c" / checkpoints.METADATA_FILE).read_text()
    assert json.loads(text)["path"] == str(tmp_path)
