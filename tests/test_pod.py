"""Pod scale: 2 local processes (CPU, gloo, 2 devices each) equal one process, each reading ~1/P.

One pytest test starts the two processes once for every job (JAX's start-up is the cost);
the other tests check the parts that need no second process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from subboost import streaming
from subboost.checkpoint_io.shards import SHARD_INDEX_FILE, ShardedReader, shard_file_name, write_shard_index
from subboost.errors import SubboostError
from subboost.streaming.chunks import plan_chunks
from subboost.streaming.pod import ProcessFailure, ProcessGroup, assign_shares

ROOT = Path(__file__).parents[1]
NUM_PROCESSES = 2
NUM_EXPERTS = 3
CHUNK = 40_000  # bytes over base + experts: several chunks per process


def tree(rng: np.random.Generator) -> dict:
    """Two transformer blocks (q/k/v, out, MLP, norms) and an excluded projection: ~62 KB in float32."""

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def block():
        attn = {n: {"kernel": normal(16, 4, 4), "bias": normal(4, 4)} for n in ("query", "key", "value")}
        attn["out"] = {"kernel": normal(4, 4, 16), "bias": normal(16)}
        return {"attn": attn, "ln_1": {"scale": normal(16)},
                "mlp": {"c_fc": {"kernel": normal(16, 64), "bias": normal(64)}, "c_proj": {"kernel": normal(64, 16)}}}

    return {"transformer": {f"resblocks_{i}": block() for i in range(2)}, "proj": normal(16, 8)}


JOBS = [  # (name, method, kwargs, boost, alpha, exact); every method on 2 and 4 processes: experiments/bench_pod.py
    ("ta", "task_arithmetic", {}, None, 0.5, True),
    ("ties", "ties", {"k": 0.3}, None, None, True),
    ("tsv_boost", "tsv", {}, 0.02, None, False),
]


def largest_unit(specs) -> int:
    """Bytes of the largest piece never split between processes (a parameter, or a block's q/k/v)."""
    return max(sum(math.prod(specs[n].shape) * np.dtype(specs[n].dtype).itemsize for n in unit)
               for unit in plan_chunks(specs, 1, 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_processes(command: list[str], num_processes: int = NUM_PROCESSES) -> list[tuple[int, str, str]]:
    """``command`` as ``num_processes`` local processes of one pod (2 CPU devices each): (code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}",
           "JAX_NUM_PROCESSES": str(num_processes)}
    procs = [subprocess.Popen(command, env={**env, "JAX_PROCESS_ID": str(p)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in range(num_processes)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        results.append((proc.returncode, stdout, stderr))
    return results


def run_pod(jobs: list[dict]) -> list[list[dict]]:
    """Runs ``jobs`` (`experiments/pod_worker.py`) on local processes; each process's per-job reports."""
    results = start_processes([sys.executable, str(ROOT / "experiments" / "pod_worker.py"), json.dumps(jobs)])
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    return [[json.loads(line) for line in stdout.splitlines() if line.startswith("{")] for _, stdout, _ in results]


@pytest.fixture(scope="module")
def pod_runs(tmp_path_factory):
    """Every job on 2 processes."""
    work = tmp_path_factory.mktemp("pod")
    rng = np.random.default_rng(0)
    base = tree(rng)
    base_path = streaming.save_safetensors(base, work / "base.safetensors")
    experts = []
    for t in range(NUM_EXPERTS):
        expert = jax.tree_util.tree_map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), base)
        experts.append(str(streaming.save_safetensors(expert, work / f"expert_{t}.safetensors")))
    jobs = [{"base": str(base_path), "experts": experts, "out": str(work / name), "method": method, "kwargs": kwargs,
             "boost": boost, "alpha": alpha, "chunk_bytes": CHUNK} for name, method, kwargs, boost, alpha, _ in JOBS]
    return work, base_path, experts, run_pod(jobs)


def one_process(base_path, experts, out, method, kwargs, boost, alpha):
    kwargs = {k: jax.random.key(v) if k == "key" else v for k, v in kwargs.items()}
    return streaming.merge_from_checkpoints(base_path, experts, method=method, boost=boost, alpha=alpha, out=out,
                                            chunk_bytes=CHUNK, progress=False, **kwargs)


@pytest.mark.parametrize("name, method, kwargs, boost, alpha, exact", JOBS, ids=[j[0] for j in JOBS])
@pytest.mark.slow  # two JAX processes started, every merge compiled in each
def test_two_processes_equal_one(pod_runs, tmp_path, name, method, kwargs, boost, alpha, exact):
    work, base_path, experts, reports = pod_runs
    job = [j[0] for j in JOBS].index(name)
    assert [r[job]["error"] for r in reports] == [None] * NUM_PROCESSES
    one = streaming.open_checkpoint(one_process(base_path, experts, tmp_path / "one", method, kwargs, boost, alpha))
    reader = streaming.open_checkpoint(work / name)
    assert isinstance(reader, ShardedReader)
    actual, expected = reader.read(list(reader.specs)), one.read(list(one.specs))
    assert list(actual) == list(expected)
    for path, x in expected.items():
        assert actual[path].dtype == x.dtype and actual[path].shape == x.shape, path
        if exact:  # TA, TIES (global threshold and sign from summed counts), DARE: bit for bit
            np.testing.assert_array_equal(actual[path], x, err_msg=path)
        else:
            np.testing.assert_allclose(actual[path], x, rtol=0, atol=1e-6, err_msg=path)


@pytest.mark.slow  # two JAX processes started, every merge compiled in each
def test_each_process_reads_its_share(pod_runs):
    """Per read pass, bytes read <= (inputs / P) + one unit (q/k/v block) over base and experts."""
    work, base_path, experts, _ = pod_runs
    specs = streaming.open_checkpoint(base_path).specs
    nbytes = {n: math.prod(s.shape) * np.dtype(s.dtype).itemsize for n, s in specs.items()}
    total = sum(nbytes.values()) * (NUM_EXPERTS + 1)
    biggest_unit = largest_unit(specs) * (NUM_EXPERTS + 1)
    for name, *_ in JOBS:
        info = json.loads((work / name / streaming.INFO_FILE).read_text())
        assert info["processes"] == NUM_PROCESSES and len(info["bytes_read"]) == NUM_PROCESSES
        per_pass = [b / info["read_passes"] for b in info["bytes_read"]]
        assert sum(per_pass) == total, name  # every tensor read once per pass, by one process
        assert max(per_pass) <= total / NUM_PROCESSES + biggest_unit, (name, per_pass, total)
        assert sorted(p.name for p in (work / name).iterdir()) == sorted(
            [shard_file_name(p, NUM_PROCESSES) for p in range(NUM_PROCESSES)]
            + [SHARD_INDEX_FILE, streaming.INFO_FILE, streaming.COMPLETE_MARKER])


@pytest.mark.slow  # two JAX processes started
def test_a_process_that_cannot_read_its_share_stops_every_process(pod_runs):
    """``subboost --distributed merge``: expert 1 holds a NaN in a parameter only one process reads."""
    work, base_path, experts, _ = pod_runs
    base = streaming.read_params(base_path)
    base["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"][3, 5] = np.nan
    bad_path = str(streaming.save_safetensors(base, work / "bad_expert.safetensors"))
    results = start_processes([sys.executable, "-m", "subboost.cli", "--no-compile-cache", "--distributed", "merge",
                               "--base", str(base_path), experts[0], bad_path, "--alpha", "0.5",
                               "--out", str(work / "failed")])
    lines = []
    for code, _, stderr in results:
        assert code == 2, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("subboost merge: error:")]
        assert len(errors) == 1, stderr[-3000:]  # one line, naming the process, the file and the parameter
        lines.append(errors[0])
    assert lines[0] == lines[1]
    assert f"of {NUM_PROCESSES}: expert 1 ({bad_path}): parameter 'transformer/resblocks_1/mlp/c_fc/kernel'" in lines[0]
    assert "NaN" in lines[0]
    assert not any(p.name == "failed" or p.name.startswith(".failed.") for p in work.iterdir())  # output absent


def test_shares_cover_every_parameter_once_and_balance_bytes():
    rng = np.random.default_rng(1)
    specs = streaming.open_checkpoint(tree(rng)).specs
    sizes = {n: math.prod(s.shape) * 4 for n, s in specs.items()}
    for processes in (1, 2, 3, 4, 40):
        shares = assign_shares(specs, processes)
        assert len(shares) == processes
        assert sorted(n for share in shares for n in share) == sorted(specs)
        for share in shares:  # in chunk-plan order inside a share; q/k/v of a block together
            assert share == [n for unit in plan_chunks(specs, 1, 1) for n in unit if n in share]
            for block in ("resblocks_0", "resblocks_1"):
                owners = {i for i, s in enumerate(shares) for n in s if f"{block}/attn/" in n and n.endswith("kernel")
                          and "/out/" not in n}
                assert len(owners) == 1
        loads = [sum(sizes[n] for n in share) for share in shares]
        assert max(loads) <= sum(sizes.values()) / processes + largest_unit(specs)
    assert assign_shares(specs, 2) == assign_shares(dict(specs), 2)  # deterministic


def test_sharded_reader_checks_its_index(tmp_path):
    rng = np.random.default_rng(2)
    a, b = {"x": rng.standard_normal((2, 3)).astype(np.float32)}, {"y": rng.standard_normal(4).astype(np.float32)}
    streaming.save_safetensors(a, tmp_path / "s1.safetensors")
    streaming.save_safetensors(b, tmp_path / "s2.safetensors")
    index = write_shard_index(tmp_path / "index.json", {"y": "s2.safetensors", "x": "s1.safetensors"})
    reader = ShardedReader(index, open_shard=streaming.SafetensorsReader)
    assert list(reader.specs) == ["x", "y"]
    np.testing.assert_array_equal(reader.read(["y", "x"])["x"], a["x"])
    for weight_map, match in [({"y": "s1.safetensors"}, "'x' of shard 's1.safetensors' is not in the index"),
                              ({"x": "s1.safetensors", "y": "s3.safetensors"}, "shard 's3.safetensors' is missing"),
                              ({"x": "../s1.safetensors"}, "outside the directory"),
                              ({"x": "s1.safetensors", "y": "s1.safetensors"}, "indexed but absent")]:
        write_shard_index(index, weight_map)
        with pytest.raises(SubboostError, match=match.replace("(", r"\(")):
            ShardedReader(index, open_shard=streaming.SafetensorsReader)


def test_process_group_exchanges_bytes_exactly_and_reports_errors():
    """One process (this one): the exchange path of a pod, int64 counts beyond int32 kept exact."""
    group = ProcessGroup()
    assert (group.count, group.index) == (1, 0)
    assert group.all_gather(b"") == [b""] and group.all_gather(b"abc") == [b"abc"]
    counts = np.array([[2**40 + 1, -3], [7, 0]], np.int64)
    summed = group.sum(counts)
    assert summed.dtype == np.int64 and np.array_equal(summed, counts)
    assert group.run(lambda: 5) == 5
    with pytest.raises(ProcessFailure, match=r"^process 0 of 1: bad\.safetensors: broken here$"):
        group.run(lambda: (_ for _ in ()).throw(OSError("bad.safetensors:\nbroken   here")))
    with pytest.raises(ProcessFailure, match="process 0 of 1: late"):
        group.sum(counts, error=SubboostError("late"))
