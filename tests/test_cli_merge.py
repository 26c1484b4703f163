"""`subboost merge` / `subboost boost` on checkpoints written by save_params."""

import jax
import numpy as np
import pytest

import subboost as sb
from subboost import cli


@pytest.fixture
def checkpoints(tmp_path, experts):
    base, finetuned = experts
    sb.save_params(base, tmp_path / "base")
    paths = []
    for i, expert in enumerate(finetuned[:3]):
        sb.save_params(expert, tmp_path / f"expert_{i}")
        paths.append(str(tmp_path / f"expert_{i}"))
    return tmp_path, base, finetuned[:3], paths


@pytest.mark.slow
def test_merge_command_equals_library_call(checkpoints, capsys):
    tmp_path, base, finetuned, paths = checkpoints
    out = tmp_path / "merged"
    code = cli.main(["merge", *paths, "--base", str(tmp_path / "base"), "--method", "ties",
                     "--param", "k=0.3", "--beta", "0.02", "--alpha", "0.4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| transformer/resblocks_1/mlp/c_fc |" in printed and "boosted" in printed
    tau = sb.subspace_boost(sb.merge(sb.task_vectors(base, finetuned), "ties", k=0.3), beta=0.02)
    want = sb.apply_task_vector(base, tau, alpha=0.4)
    got = sb.load_params(out)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    # boost of the unboosted merge equals the boosted merge (scale equivariance).
    plain = tmp_path / "plain"
    assert cli.main(["merge", *paths, "--base", str(tmp_path / "base"), "--method", "ties",
                     "--param", "k=0.3", "--alpha", "0.4", "--out", str(plain)]) == 0
    assert cli.main(["boost", str(plain), "--base", str(tmp_path / "base"), "--beta", "0.02",
                     "--out", str(tmp_path / "boosted")]) == 0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           sb.load_params(tmp_path / "boosted"), want)


def test_merge_command_errors_are_one_line(checkpoints, capsys):
    tmp_path, _, _, paths = checkpoints
    base = str(tmp_path / "base")
    assert cli.main(["merge", "--alpha", "0.5", *paths, "--base", base, "--method", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown merge method 'nope'" in err and len(err.strip().splitlines()) == 1
    # An existing destination is never overwritten without --overwrite.
    assert cli.main(["merge", "--alpha", "0.5", *paths, "--base", base, "--out", paths[0]]) == 2
    assert "is the input" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert cli.main(["merge", "--alpha", "0.5", *paths, "--base", base, "--out", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["merge", "--alpha", "0.5", *paths, "--base", base, "--param", "k", "--out", str(tmp_path / "o")]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
