"""Bad input to a public function raises `SubboostError` (a `ValueError`) naming what is wrong, never a bare one."""

from __future__ import annotations

import ast
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import evaluation, linalg, polar_boost, sharding, tree
from subboost.data import tasks
from subboost.errors import SubboostError
from subboost.models import clip_vit
from subboost.selection import check_grid

PACKAGE = Path(sb.__file__).resolve().parent

# Application code another change is reorganising; its errors move to `SubboostError` with it.
NOT_YET_CHECKED = ("bench/", "text_bench/", "commands/merge.py", "commands/demo.py")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sb.energy_rank(jnp.eye(3), fraction=0.0), r"energy_rank: fraction must be in \(0, 1\]"),
        (lambda: sb.apply_task_vector({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, alpha=float("inf")),
         "apply_task_vector: alpha"),
        (lambda: linalg.svd(jnp.eye(3), method="lapack"), "svd: method must be 'auto', 'direct' or 'qr'"),
        (lambda: tree.matrix_plan({"w": jnp.ones((2, 2))}, attention="fused"), "attention must be one of"),
        (lambda: polar_boost.qdwh_schedule(1.5, 1e-6), r"lower_bound must be in \(0, 1\)"),
        (lambda: sharding.mesh_axes("devices"), "mesh must be a jax.sharding.Mesh, got str"),
        (lambda: clip_vit.get_config("ViT-Z/99"), "unknown CLIP vision config 'ViT-Z/99'"),
        (lambda: tasks.get_task("ImageNet-9"), "unknown task 'ImageNet-9'"),
        (lambda: tasks.suite_tasks(7), "unknown suite 7"),
        (lambda: check_grid("alpha", ()), "the alpha grid is empty"),
        (lambda: evaluation.normalized_accuracies({"A": 0.5}, {"A": 0.0}), r"task\(s\) \['A'\] is 0"),
        (lambda: evaluation.selection_score("median"), "metric must be one of"),
        (lambda: evaluation.head_num_classes({"kernel": np.ones((4, 3))}), "must be ClassificationHead parameters"),
        (lambda: evaluation.encoder_config(None), "records no architecture"),
    ],
)
def test_public_functions_raise_subboost_errors(call, match):
    with pytest.raises(SubboostError, match=match):
        call()


def bare_raises(path: Path) -> list[str]:
    """``file:line ValueError`` for every ``raise ValueError(...)`` / ``raise TypeError(...)`` in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in ("ValueError", "TypeError"):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {exc.id}")
    return found


def test_the_library_raises_no_bare_value_or_type_error():
    modules = [p for p in sorted(PACKAGE.rglob("*.py"))
               if not str(p.relative_to(PACKAGE)).startswith(NOT_YET_CHECKED)]
    assert len(modules) > 50
    assert [hit for p in modules for hit in bare_raises(p)] == []
