"""`subboost.blas_threads.limited`: one thread in every BLAS library inside the block, the old limits after."""

from __future__ import annotations

import pytest

from subboost import blas_threads

pytest.importorskip("threadpoolctl")


def test_limited_sets_every_blas_library_and_restores():
    blas_threads.load_lapack()  # jax's CPU LAPACK (scipy's OpenBLAS) is loaded: it must be among those limited
    before = {lib["filepath"]: lib["num_threads"] for lib in blas_threads.blas_libraries()}
    assert before
    with blas_threads.limited():
        inside = {lib["filepath"]: lib["num_threads"] for lib in blas_threads.blas_libraries()}
        assert inside.keys() == before.keys() and set(inside.values()) == {1}
        with blas_threads.limited(2):  # nests: the inner block's limit, then the outer one's again
            assert {lib["num_threads"] for lib in blas_threads.blas_libraries()} <= {1, 2}
        assert {lib["num_threads"] for lib in blas_threads.blas_libraries()} == {1}
    assert {lib["filepath"]: lib["num_threads"] for lib in blas_threads.blas_libraries()} == before
    with pytest.raises(ValueError, match="at least 1"):
        with blas_threads.limited(0):
            pass


def test_the_command_line_runs_under_the_limit(monkeypatch, tmp_path):
    from subboost import cli

    seen = []

    def probe(args):
        seen.extend(lib["num_threads"] for lib in blas_threads.blas_libraries())
        return 0

    monkeypatch.setattr("subboost.commands.data.run_fetch", probe)  # what `data fetch` runs
    assert cli.main(["--no-compile-cache", "data", "fetch", "--dir", str(tmp_path / "unused")]) == 0
    assert seen and set(seen) == {1}
