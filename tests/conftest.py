"""Shared fixtures: small parameter trees shaped like a CLIP ViT (built by `tests.trees`)."""

from __future__ import annotations

try:  # torchvision must be loaded before TensorFlow in one process (the reverse order segfaults)
    import torchvision  # noqa: F401
except ImportError:
    pass

import atexit
import os
import shutil
import tempfile

# The CLI turns on JAX's persistent compilation cache in ~/.cache (issue 17); tests calling
# `subboost.cli.main` in-process must not write there (tests/test_compilation.py tests the cache).
os.environ.setdefault("SUBBOOST_COMPILE_CACHE", "0")

# One XLA compilation cache for the test session: notebook kernels, CLI and multi-device subprocesses, and
# re-created jit wrappers of an identical program load the compiled executable instead of compiling it
# again. It lives in a fresh temporary directory removed at exit, so nothing carries over between runs.
# Set before JAX is imported (the subprocesses read the environment); a user's own setting wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="subboost-tests-xla-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")))

from tests.trees import perturbed, vit_like_params  # noqa: E402,F401  (re-exported: `from tests.conftest import ...`)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def experts(rng):
    """(pretrained, [expert_1..expert_4]) with small task vectors."""
    base = vit_like_params(rng)
    return base, perturbed(base, rng, num=4)


@pytest.fixture(scope="session")
def tiny_bench_cache(tmp_path_factory, request):
    """One model cache holding the tiny mini-benchmark's trained models (seed 0), trained once per test run.

    Its users (`tests/test_bench.py`'s tiny run, the notebooks of `tests/test_colabs.py`) load them. Under
    pytest-xdist the workers share one directory and a file lock: the first worker trains, the others wait
    and load, so the ~100 s of training is not paid once per worker.
    """
    from filelock import FileLock

    from subboost.bench.suites.vision.config import get_config
    from subboost.bench.suites.vision.pipeline import load_or_train

    worker = getattr(request.config, "workerinput", None)
    root = tmp_path_factory.getbasetemp()
    cache = (root.parent if worker else root) / "tiny_bench_cache"
    with FileLock(f"{cache}.lock"):
        cache.mkdir(exist_ok=True)
        load_or_train(get_config("tiny"), seed=0, cache_dir=cache, progress=False, log=lambda _: None)
    return cache
