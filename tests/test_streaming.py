"""Streaming merges from disk equal in-memory merges; failures leave nothing complete-looking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import streaming
from subboost.errors import SubboostError
from subboost.tree import leaves_with_paths, nest

NUM_EXPERTS = 3
SMALL_CHUNK = 6_000  # bytes over base + experts: several chunks for the trees below


def small_params(rng: np.random.Generator, dtype=np.float32) -> dict:
    """A one-block CLIP-like tree: attention (3-D kernels), MLP, norms, excluded proj."""

    def normal(*shape):
        return np.asarray(rng.standard_normal(shape), dtype)

    return {
        "transformer": {
            "resblocks_0": {
                "attn": {
                    "query": {"kernel": normal(8, 2, 4), "bias": normal(2, 4)},
                    "key": {"kernel": normal(8, 2, 4), "bias": normal(2, 4)},
                    "value": {"kernel": normal(8, 2, 4), "bias": normal(2, 4)},
                    "out": {"kernel": normal(2, 4, 8), "bias": normal(8)},
                },
                "ln_1": {"scale": normal(8)},
                "mlp": {"c_fc": {"kernel": normal(8, 16), "bias": normal(16)}, "c_proj": {"kernel": normal(16, 8)}},
            }
        },
        "proj": normal(8, 4),
    }


def tiny_params(rng: np.random.Generator) -> dict:
    """Three leaves: enough for DARE, whose random masks are slow to compile."""
    return {"dense": {"kernel": rng.standard_normal((8, 16), np.float32), "bias": rng.standard_normal(16, np.float32)},
            "proj": rng.standard_normal((8, 4), np.float32)}


def make_experts(tmp_path: Path, base: dict, rng: np.random.Generator, num: int = NUM_EXPERTS):
    experts = [jax.tree_util.tree_map(lambda p: (p + 0.1 * rng.standard_normal(p.shape)).astype(p.dtype), base)
               for _ in range(num)]
    base_path = streaming.save_safetensors(base, tmp_path / "base.safetensors")
    paths = [streaming.save_safetensors(e, tmp_path / f"expert_{t}.safetensors") for t, e in enumerate(experts)]
    return base_path, paths, experts


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    base = small_params(rng)
    base_path, paths, experts = make_experts(tmp_path, base, rng)
    return base, base_path, paths, experts


def in_memory(base, experts, method, kwargs, boost=None, alpha=None):
    tau = sb.merge(sb.task_vectors(base, experts), method, **kwargs)
    if boost is not None:
        tau = sb.subspace_boost(tau, beta=boost)
    return tau if alpha is None else sb.apply_task_vector(base, tau, alpha=alpha)


def assert_trees_equal(expected, actual, *, exact: bool = True):
    expected, actual = dict(leaves_with_paths(expected)), dict(leaves_with_paths(actual))
    assert list(expected) == list(actual)
    for path, x in expected.items():
        x = np.asarray(x)
        assert actual[path].dtype == x.dtype and actual[path].shape == x.shape, path
        if exact:
            np.testing.assert_array_equal(actual[path], x, err_msg=path)
        else:  # batched SVDs of a different batch composition: float rounding only
            np.testing.assert_allclose(actual[path], x, rtol=1e-5, atol=1e-6, err_msg=path)


def nothing_written(directory: Path, out_name: str) -> bool:
    return not any(p.name == out_name or p.name.startswith(f".{out_name}.") for p in directory.iterdir())


# --- streaming == in memory ----------------------------------------------------
ELEMENTWISE_CASES = [
    ("weight_averaging", {}),
    ("task_arithmetic", {}),
    ("ties", {"k": 0.3}),
    ("ties", {"k": 0.5, "merge": "sum", "scope": "per_leaf"}),
    ("consensus", {"lambdas": 0.5}),
    ("consensus", {"base": "ties", "k": 0.4, "lambdas": [0.3, 0.4, 0.5], "min_tasks": 1}),
    ("magmax", {}),
    ("model_stock", {}),
]
SVD_CASES = [("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("wudi", {"steps": 5}), ("star", {}), ("cart", {})]


@pytest.mark.parametrize("method, kwargs", ELEMENTWISE_CASES, ids=lambda v: str(v))
@pytest.mark.slow
def test_streaming_equals_in_memory_elementwise(setup, tmp_path, method, kwargs):
    base, base_path, paths, experts = setup
    out = streaming.merge_from_checkpoints(base_path, paths, method=method, out=tmp_path / "out",
                                           chunk_bytes=SMALL_CHUNK, progress=False, **kwargs)
    assert_trees_equal(in_memory(base, experts, method, kwargs), streaming.read_params(out))


@pytest.mark.parametrize("method, kwargs", [c for c in SVD_CASES if c[0] in sb.available_methods()],
                         ids=lambda v: str(v))
@pytest.mark.slow
def test_streaming_equals_in_memory_svd_methods(setup, tmp_path, method, kwargs):
    base, base_path, paths, experts = setup
    out = streaming.merge_from_checkpoints(base_path, paths, method=method, out=tmp_path / "out",
                                           chunk_bytes=SMALL_CHUNK, progress=False, **kwargs)
    assert_trees_equal(in_memory(base, experts, method, kwargs), streaming.read_params(out), exact=False)


@pytest.mark.parametrize("base_method", ["task_arithmetic", "ties"])
@pytest.mark.slow
def test_streaming_dare_equals_in_memory(tmp_path, base_method):
    rng = np.random.default_rng(1)
    base = tiny_params(rng)
    base_path, paths, experts = make_experts(tmp_path, base, rng)
    kwargs = {"key": jax.random.key(7), "p": 0.5, "base": base_method}
    if base_method == "ties":
        kwargs["k"] = 0.4
    out = streaming.merge_from_checkpoints(base_path, paths, method="dare", out=tmp_path / "out",
                                           chunk_bytes=1_000, progress=False, **kwargs)
    assert_trees_equal(in_memory(base, experts, "dare", kwargs), streaming.read_params(out))


@pytest.mark.slow
def test_streaming_boost_and_alpha_equal_in_memory(setup, tmp_path):
    base, base_path, paths, experts = setup
    boost = {"beta": 0.05, "attention": "full"}
    out = streaming.merge_from_checkpoints(base_path, paths, method="ties", k=0.3, boost=boost, alpha=0.4,
                                           out=tmp_path / "out", chunk_bytes=SMALL_CHUNK, progress=False)
    tau = sb.subspace_boost(sb.merge(sb.task_vectors(base, experts), "ties", k=0.3), beta=0.05, attention="full")
    expected = sb.apply_task_vector(base, tau, alpha=0.4)
    assert_trees_equal(expected, streaming.read_params(out), exact=False)
    unboosted = in_memory(base, experts, "ties", {"k": 0.3}, alpha=0.4)
    kernel = "transformer/resblocks_0/mlp/c_fc/kernel"
    assert not np.allclose(dict(leaves_with_paths(unboosted))[kernel], dict(leaves_with_paths(expected))[kernel])
    info = json.loads((out / streaming.INFO_FILE).read_text())
    assert info["content"] == "params" and info["read_passes"] == 4 and info["boost"]["beta"] == 0.05


def test_ties_threshold_is_global_across_chunks(tmp_path):
    # k = 0.4 of N = 6 entries: the threshold is the 4th smallest magnitude (10),
    # which lies in another chunk than the small leaf; a per-chunk rule would keep 0.2, 0.3.
    base = {"big": np.zeros(3, np.float32), "small": np.zeros(3, np.float32)}
    expert = {"big": np.array([10.0, 20.0, 30.0], np.float32), "small": np.array([0.1, 0.2, 0.3], np.float32)}
    base_path = streaming.save_safetensors(base, tmp_path / "base.safetensors")
    expert_path = streaming.save_safetensors(expert, tmp_path / "e.safetensors")
    out = streaming.merge_from_checkpoints(base_path, [expert_path], method="ties", k=0.4, out=tmp_path / "out",
                                           chunk_bytes=24, progress=False)
    assert len(streaming.plan_chunks(streaming.open_checkpoint(base_path).specs, 2, 24)) == 2
    got = streaming.read_params(out)
    np.testing.assert_array_equal(got["small"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(got["big"], [10.0, 20.0, 30.0])


def test_ties_zero_sum_takes_majority_sign_from_other_chunks(tmp_path):
    # Entry "a"[0] sums to zero over tasks (+1, -1): it takes the sign of the
    # total over all parameters, decided by leaf "b" in another chunk (negative).
    base = {"a": np.zeros(1, np.float32), "b": np.zeros(4, np.float32)}
    e0 = {"a": np.array([1.0], np.float32), "b": -np.full(4, 2.0, np.float32)}
    e1 = {"a": np.array([-1.0], np.float32), "b": -np.full(4, 2.0, np.float32)}
    base_path = streaming.save_safetensors(base, tmp_path / "base.safetensors")
    paths = [streaming.save_safetensors(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate((e0, e1))]
    out = streaming.merge_from_checkpoints(base_path, paths, method="ties", k=1.0, out=tmp_path / "out",
                                           chunk_bytes=16, progress=False)
    got = streaming.read_params(out)
    np.testing.assert_array_equal(got["a"], [-1.0])  # the negative task's entry
    assert_trees_equal(in_memory(base, [e0, e1], "ties", {"k": 1.0}), got)


@pytest.mark.parametrize("k", [0.01, 0.25, 0.9])
def test_radix_select_equals_bisection(tmp_path, k):
    from subboost.merging.ties import kth_smallest_magnitude, trim_rank

    rng = np.random.default_rng(2)
    # Repeated magnitudes, zeros and a wide dynamic range.
    leaves = [np.round(rng.standard_normal((2, 50)), 1).astype(np.float32),
              (rng.standard_normal((2, 7, 3)) * 1e-3).astype(np.float32), np.zeros((2, 5), np.float32)]
    tree = {f"leaf_{i}": x for i, x in enumerate(leaves)}
    base = jax.tree_util.tree_map(lambda x: np.zeros(x.shape[1:], x.dtype), tree)
    paths = [streaming.save_safetensors(jax.tree_util.tree_map(lambda x: x[t], tree), tmp_path / f"e{t}.safetensors")
             for t in range(2)]
    from subboost.streaming.chunks import ChunkStream
    from subboost.streaming.statistics import radix_select

    inputs = ChunkStream(base=streaming.TreeReader(base), experts=[streaming.open_checkpoint(p) for p in paths],
                         chunks=[["leaf_0"], ["leaf_1", "leaf_2"]], progress=False)
    kk = trim_rank(sum(x[0].size for x in leaves), k)
    got = radix_select(inputs, kk=kk, scheme=streaming.StreamingScheme(), float_dtype=jnp.float32, passes=["a", "b"])
    expected = kth_smallest_magnitude([jnp.asarray(x) for x in leaves], kk)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


# --- formats -------------------------------------------------------------------
@pytest.mark.slow
def test_orbax_experts_in_memory_base_and_chained_output(setup, tmp_path):
    base, base_path, paths, experts = setup
    orbax_paths = [sb.save_params(expert, tmp_path / f"orbax_{t}") for t, expert in enumerate(experts)]
    out = streaming.merge_from_checkpoints(base, orbax_paths, method="ties", k=0.3, out=tmp_path / "out",
                                           chunk_bytes=SMALL_CHUNK, progress=False)
    expected = in_memory(base, experts, "ties", {"k": 0.3})
    assert_trees_equal(expected, streaming.read_params(out))
    # A task vector (no alpha) is not an expert: its subboost identity says so.
    with pytest.raises(SubboostError, match=r"expert 0 \(.*out\) holds a task vector, not model parameters"):
        streaming.merge_from_checkpoints(base_path, [out, paths[0]], out=tmp_path / "again", progress=False)
    # A finished output directory holding parameters is itself a readable checkpoint.
    merged = streaming.merge_from_checkpoints(base, orbax_paths, method="ties", k=0.3, alpha=1.0,
                                              out=tmp_path / "merged", chunk_bytes=SMALL_CHUNK, progress=False)
    again = streaming.merge_from_checkpoints(base_path, [merged, paths[0]], method="task_arithmetic",
                                             out=tmp_path / "again", progress=False)
    chained = [streaming.read_params(merged), experts[0]]
    assert_trees_equal(in_memory(base, chained, "task_arithmetic", {}), streaming.read_params(again))


def test_recorded_architectures_must_agree(setup, tmp_path):
    base, base_path, paths, experts = setup
    meta = {"kind": "clip_vision", "architecture": {"width": 8}}
    base_dir = sb.save_params(base, tmp_path / "base_ckpt", metadata=meta)
    same = sb.save_params(experts[0], tmp_path / "same", metadata=meta)
    other = sb.save_params(experts[1], tmp_path / "other", metadata={**meta, "architecture": {"width": 9}})
    with pytest.raises(SubboostError, match=r"expert 1 \(.*other\) has architecture"):
        streaming.merge_from_checkpoints(base_dir, [same, other], out=tmp_path / "out", progress=False)
    assert nothing_written(tmp_path, "out")


def test_safetensors_files_interoperate(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(3)
    tree = {"a": {"kernel": rng.standard_normal((3, 4)).astype(np.float32)}, "b": np.arange(5, dtype=np.float16)}
    ours = streaming.save_safetensors(tree, tmp_path / "ours.safetensors")
    loaded = safetensors_numpy.load_file(str(ours))
    np.testing.assert_array_equal(loaded["a/kernel"], tree["a"]["kernel"])
    safetensors_numpy.save_file({"a/kernel": tree["a"]["kernel"], "b": tree["b"]}, str(tmp_path / "theirs.safetensors"))
    back = streaming.read_params(tmp_path / "theirs.safetensors")
    np.testing.assert_array_equal(back["a"]["kernel"], tree["a"]["kernel"])
    np.testing.assert_array_equal(back["b"], tree["b"])


def test_chunks_keep_attention_blocks_together():
    rng = np.random.default_rng(0)
    specs = streaming.TreeReader(small_params(rng)).specs
    chunks = streaming.plan_chunks(specs, 4, 1)  # budget below any unit: one unit per chunk
    qkv = [c for c in chunks if any("/query/" in n for n in c)]
    assert len(qkv) == 1 and sum("/attn/" in n and "/out/" not in n for n in qkv[0]) == 6
    assert sorted(n for c in chunks for n in c) == sorted(specs)
    assert len(streaming.plan_chunks(specs, 4, 10**9)) == 1


# --- interruption, re-runs, overwrite ----------------------------------------------
def test_interrupted_run_leaves_nothing_and_rerun_works(setup, tmp_path, monkeypatch):
    base, base_path, paths, experts = setup
    original = streaming.SafetensorsWriter.write
    calls = {"n": 0}

    def interrupt(self, name, array):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, name, array)

    monkeypatch.setattr(streaming.SafetensorsWriter, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        streaming.merge_from_checkpoints(base_path, paths, method="task_arithmetic", out=tmp_path / "out",
                                         chunk_bytes=SMALL_CHUNK, progress=False)
    assert nothing_written(tmp_path, "out")
    monkeypatch.setattr(streaming.SafetensorsWriter, "write", original)
    out = streaming.merge_from_checkpoints(base_path, paths, method="task_arithmetic", out=tmp_path / "out",
                                           chunk_bytes=SMALL_CHUNK, progress=False)
    assert (out / streaming.COMPLETE_MARKER).exists()
    assert_trees_equal(in_memory(base, experts, "task_arithmetic", {}), streaming.read_params(out))


@pytest.mark.slow
def test_killed_run_is_never_complete_and_is_cleaned_by_rerun(setup, tmp_path):
    base, base_path, paths, experts = setup
    script = textwrap.dedent(f"""
        import os, signal
        from subboost import streaming
        original = streaming.SafetensorsWriter.write
        calls = []
        def write(self, name, array):
            calls.append(name)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, name, array)
        streaming.SafetensorsWriter.write = write
        streaming.merge_from_checkpoints({str(base_path)!r}, {[str(p) for p in paths]!r}, method="ties", k=1.0,
                                         out={str(tmp_path / "out")!r}, chunk_bytes={SMALL_CHUNK}, progress=False)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[1], timeout=300)
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists()
    partials = list(tmp_path.glob(".out.partial-*"))
    assert len(partials) == 1 and not (partials[0] / streaming.COMPLETE_MARKER).exists()
    with pytest.raises(SubboostError, match="COMPLETE"):
        streaming.open_checkpoint(partials[0] / "out")  # the output being built inside it
    out = streaming.merge_from_checkpoints(base_path, paths, method="ties", k=1.0, out=tmp_path / "out",
                                           chunk_bytes=SMALL_CHUNK, progress=False)
    assert not list(tmp_path.glob(".out.partial-*"))
    assert_trees_equal(in_memory(base, experts, "ties", {"k": 1.0}), streaming.read_params(out))


def test_existing_output_needs_overwrite(setup, tmp_path):
    base, base_path, paths, experts = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        streaming.merge_from_checkpoints(base_path, paths, out=out, progress=False)
    with pytest.raises(FileExistsError, match="not a checkpoint or other output"):  # never replaces a user's folder
        streaming.merge_from_checkpoints(base_path, paths, out=out, overwrite=True, progress=False)
    assert (out / "precious.txt").read_text() == "user data"
    first = streaming.merge_from_checkpoints(base_path, paths, out=tmp_path / "merged", progress=False)
    streaming.merge_from_checkpoints(base_path, paths, method="weight_averaging", out=first, overwrite=True,
                                     progress=False)
    assert json.loads((first / streaming.INFO_FILE).read_text())["method"] == "weight_averaging"
    assert_trees_equal(in_memory(base, experts, "weight_averaging", {}), streaming.read_params(first))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- bad input: clear errors before anything is written -------------------------------
def _drop_leaf(tree: dict, path: str) -> dict:
    flat = dict(leaves_with_paths(tree))
    del flat[path]
    return nest(flat)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda e: _drop_leaf(e, "transformer/resblocks_0/mlp/c_proj/kernel"),
         r"expert_1\.safetensors.*missing parameters \['transformer/resblocks_0/mlp/c_proj/kernel'\]"),
        (lambda e: {**e, "extra": np.zeros(2, np.float32)}, r"expert_1\.safetensors.*unexpected parameters \['extra'\]"),
        (lambda e: {**e, "proj": np.zeros((8, 5), np.float32)},
         r"expert_1\.safetensors.*parameter 'proj' has shape \(8, 5\).*\(8, 4\)"),
        (lambda e: jax.tree_util.tree_map(lambda x: x.astype(np.float16), e),
         r"expert_1\.safetensors.*dtype float16"),
    ],
    ids=["missing_layer", "extra_layer", "other_shape", "other_dtype"],
)
def test_mismatched_expert_fails_before_writing(setup, tmp_path, corrupt, match):
    base, base_path, paths, experts = setup
    streaming.save_safetensors(corrupt(experts[1]), paths[1])
    with pytest.raises(SubboostError, match=match):
        streaming.merge_from_checkpoints(base_path, paths, method="ties", out=tmp_path / "out", progress=False)
    assert nothing_written(tmp_path, "out")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty_dir", "missing"])
def test_unreadable_expert_fails_before_writing(setup, tmp_path, damage):
    base, base_path, paths, experts = setup
    target = paths[2]
    if damage == "garbage":
        target.write_bytes(b"\x00\x01not a checkpoint" * 10)
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "empty_dir":
        target.unlink()
        target.mkdir()
    else:
        target.unlink()
    error = FileNotFoundError if damage == "missing" else SubboostError
    with pytest.raises(error, match="expert_2"):
        streaming.merge_from_checkpoints(base_path, paths, out=tmp_path / "out", progress=False)
    assert nothing_written(tmp_path, "out")


def test_non_finite_values_abort_without_output(setup, tmp_path):
    base, base_path, paths, experts = setup
    broken = jax.tree_util.tree_map(np.copy, experts[0])
    broken["transformer"]["resblocks_0"]["mlp"]["c_fc"]["bias"][3] = np.nan
    streaming.save_safetensors(broken, paths[0])
    with pytest.raises(SubboostError, match=r"expert_0\.safetensors.*'transformer/resblocks_0/mlp/c_fc/bias'.*NaN"):
        streaming.merge_from_checkpoints(base_path, paths, method="ties", out=tmp_path / "out",
                                         chunk_bytes=SMALL_CHUNK, progress=False)
    assert nothing_written(tmp_path, "out")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "no_such_method"}, "unknown merge method"),
        ({"method": "ties", "k": 0.0}, "k must be in"),
        ({"method": "ties", "scope": "layer"}, "scope"),
        ({"method": "consensus", "min_tasks": 9}, "consensus: min_tasks must be"),
        ({"method": "dare", "p": 0.5}, "PRNG key"),
        ({"method": "task_arithmetic", "boost": {"beta": 2.0}}, "beta"),
        ({"method": "task_arithmetic", "boost": {"betta": 0.1}}, "unknown option"),
        ({"method": "task_arithmetic", "alpha": float("nan")}, "alpha"),
    ],
)
def test_bad_hyper_parameters_fail_before_reading(setup, tmp_path, kwargs, match):
    base, base_path, paths, experts = setup
    with pytest.raises(SubboostError, match=match):
        streaming.merge_from_checkpoints(base_path, paths, out=tmp_path / "out", progress=False, **kwargs)
    assert nothing_written(tmp_path, "out")


def test_output_may_not_be_an_input(setup, tmp_path):
    base, base_path, paths, experts = setup
    with pytest.raises(SubboostError, match="is the input"):
        streaming.merge_from_checkpoints(base_path, paths, out=paths[0], overwrite=True, progress=False)
    assert paths[0].is_file()
