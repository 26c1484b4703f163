"""Quick compilation (`subboost.compilation.size_aware_jit`): small CPU inputs skip LLVM optimisation, same bits.

No timings are asserted: `experiments/bench_compile.py` measures them.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import compilation
from subboost.errors import SubboostError
from subboost.merging import registry
from tests.trees import vit_like_params

# `subboost.spectra` and `subboost.task_vectors` are also the names of functions in the package namespace.
boosting, spectra, task_vectors = (importlib.import_module(f"subboost.{name}")
                                   for name in ("boosting", "spectra", "task_vectors"))

CASES = [
    ("weight_averaging", {}),
    ("task_arithmetic", {}),
    ("ties", {"k": 0.2}),
    ("dare", {"key": jax.random.key(3), "p": 0.5}),
    ("consensus", {"min_tasks": 2, "lambdas": 0.4}),
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {}),
]


def stacked_tvs(num_tasks: int = 3, seed: int = 0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    experts = [vit_like_params(rng, width=8, heads=2, layers=1, mlp=16, dtype=dtype, scale=0.1) for _ in range(num_tasks)]
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *experts)


def assert_trees_equal(a, b) -> None:
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("method,kwargs", CASES, ids=[c[0] for c in CASES])
def test_quick_program_gives_the_optimised_bits(method, kwargs):
    tvs = stacked_tvs()
    program = registry.jitted(method, tuple(sorted(k for k in kwargs if k not in registry.DYNAMIC_ARGUMENTS)))
    assert program.program(tvs, **kwargs) is program.quick  # a few kB on the CPU
    assert_trees_equal(program.quick(tvs, **kwargs), program.optimized(tvs, **kwargs))
    # and `sb.merge` (validation, padding, flattening) still agrees with the optimised program
    assert_trees_equal(sb.merge(tvs, method=method, **kwargs), program.optimized(tvs, **kwargs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quick_boosting_spectra_and_task_vectors_give_the_optimised_bits(dtype):
    with jax.enable_x64(dtype == np.float64):
        tau = jax.tree_util.tree_map(lambda x: x[0] + 0.5 * x[1], stacked_tvs(dtype=dtype))
        static = dict(mode="cumsum", attention="per_qkv", is_matrix=None, batch_size=None, solver="svd", tol=None,
                      with_info=False, attn_beta=None, rank_rtol=None, mesh=None)
        for beta in (0.0, 0.02):
            assert_trees_equal(boosting._boost_tree.quick(tau, beta=beta, **static),
                               boosting._boost_tree.optimized(tau, beta=beta, **static))
        spectra_static = dict(lead_ndim=0, is_matrix=None, attention="per_qkv")
        assert_trees_equal(spectra._tree_spectra.quick(tau, **spectra_static),
                           spectra._tree_spectra.optimized(tau, **spectra_static))
        rng = np.random.default_rng(1)
        base = vit_like_params(rng, layers=1, dtype=dtype)
        experts = [vit_like_params(rng, layers=1, dtype=dtype) for _ in range(2)]
        assert_trees_equal(task_vectors._stack_differences.quick(base, experts),
                           task_vectors._stack_differences.optimized(base, experts))


def test_program_choice_follows_size_backend_and_tracing(monkeypatch):
    program = compilation.size_aware_jit(lambda x, *, scale: scale * x, static_argnames=("scale",))
    small, large = np.ones((4, 4), np.float32), np.ones((64, 64), np.float32)
    monkeypatch.setenv(compilation.QUICK_COMPILE_ENV_VAR, str(small.nbytes))
    assert program.program(small, scale=2.0) is program.quick
    assert program.program(large, scale=2.0) is program.optimized  # over the limit
    np.testing.assert_array_equal(program(large, scale=2.0), 2 * large)

    chosen = []

    @jax.jit
    def outer(x):  # inside the caller's trace: its program decides, so no quick variant
        chosen.append(program.program(x, scale=3.0))
        return program(x, scale=3.0)

    np.testing.assert_array_equal(outer(small), 3 * small)
    assert chosen == [program.optimized]

    monkeypatch.setenv(compilation.QUICK_COMPILE_ENV_VAR, "0")  # off
    assert program.program(small, scale=2.0) is program.optimized
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv(compilation.QUICK_COMPILE_ENV_VAR, str(10**9))
    assert program.program(small, scale=2.0) is program.optimized  # only the CPU backend


def test_input_bytes_counts_arrays_and_skips_keys_and_static_values():
    x = np.zeros((3, 5), np.float32)
    assert compilation.input_bytes((x, {"y": jnp.zeros(7, jnp.float32)}),
                                     {"key": jax.random.key(0), "name": "ties", "k": 0.2}) == 60 + 28


@pytest.mark.parametrize("value", ["lots", "-1", "1.5"])
def test_bad_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(compilation.QUICK_COMPILE_ENV_VAR, value)
    with pytest.raises(SubboostError, match=compilation.QUICK_COMPILE_ENV_VAR):
        compilation.quick_compile_max_bytes()


def test_limit_default_and_override():
    assert compilation.quick_compile_max_bytes({}) == compilation.DEFAULT_MAX_BYTES == 4 << 20
    assert compilation.quick_compile_max_bytes({compilation.QUICK_COMPILE_ENV_VAR: " 1024 "}) == 1024
    assert compilation.quick_compile_max_bytes({compilation.QUICK_COMPILE_ENV_VAR: ""}) == compilation.DEFAULT_MAX_BYTES


def test_own_compiler_options_are_refused():
    with pytest.raises(SubboostError, match="compiler_options"):
        compilation.size_aware_jit(lambda x: x, compiler_options={"xla_backend_optimization_level": 1})
