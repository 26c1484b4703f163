"""Every CLI subcommand walked through the same families of bad input, as a hostile user would.

Families: missing input, corrupt input, wrong kind, wrong architecture, dangerous ``--out``
(is / contains / lies inside an input, an ordinary file with ``--overwrite``), non-finite
numbers, and interrupts. Each case must give exit status 2 (130 for Ctrl-C), exactly one
line on stderr naming the problem, and leave every file under the test's folder as it was.
The CLI runs in-process; every case fails before any model is computed, so this stays fast.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import cli
from tests.conftest import vit_like_params

ARCH = {"kind": "clip_vision", "architecture": {"act": "quick_gelu", "width": 8}}
OTHER_ARCH = {"kind": "clip_vision", "architecture": {"act": "gelu", "width": 8}}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Checkpoints of every kind, built once: good ones, damaged ones, impostors."""
    root = tmp_path_factory.mktemp("adversarial")
    rng = np.random.default_rng(1)
    base = vit_like_params(rng, layers=1, mlp=8)
    expert = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), base)
    sb.save_params(base, root / "base", metadata=ARCH)
    sb.save_params(expert, root / "e0", metadata=ARCH)
    sb.save_params(expert, root / "e1", metadata=ARCH)
    sb.save_params(expert, root / "other_arch", metadata=OTHER_ARCH)
    sb.save_params(jax.tree_util.tree_map(lambda a, b: a - b, expert, base), root / "tv", content="task_vector",
                   metadata=ARCH)
    sb.save_params({"kernel": np.ones((8, 3), np.float32), "bias": np.zeros(3, np.float32)}, root / "head",
                   metadata={"kind": "classification_head", "architecture": {"num_classes": 3, "embed_dim": 8}})
    shutil.copytree(root / "e0", root / "corrupt")
    info = json.loads((root / "corrupt" / "subboost.json").read_text())
    info["checksums"]["proj"] = "crc32:00000000"
    (root / "corrupt" / "subboost.json").write_text(json.dumps(info))
    (root / "garbage.pt").write_bytes(b"\x80\x02 this is not a torch file")
    (root / "garbage.npz").write_bytes(b"PK\x03\x04 nor a zip")
    (root / "notes.txt").write_text("the user's notes\n")
    (root / "eval.json").write_text("{\"mine\": 1}\n")
    (root / "heads").mkdir()
    (root / "reports").mkdir()
    (root / "reports" / "results.md").write_text("the user's own report\n")
    (root / "mine").mkdir()
    (root / "mine" / "data.csv").write_text("1,2\n")
    return root


def fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _merge(r, *extra):
    return ["merge", "--alpha", "0.5", r / "e0", r / "e1", "--base", r / "base", *extra]


def _boost(r, *extra):
    return ["boost", r / "e0", "--base", r / "base", *extra]


def _analyze(r, *extra):
    return ["analyze", r / "e0", r / "e1", "--base", r / "base", *extra]


def _eval(r, *extra):
    return ["eval", r / "e0", "--heads", r / "heads", "--tasks", "MNIST", "--backbone", "tiny", *extra]


# (family, argv from the library root, fragment the single error line must contain)
CASES = [
    # merge
    ("missing", lambda r: ["merge", "--alpha", "0.5", r / "nope", r / "e1", "--base", r / "base", "--out", r / "o"], "nope"),
    ("missing", lambda r: ["merge", "--alpha", "0.5", r / "e0", "--base", r / "nope", "--out", r / "o"], "nope"),
    ("corrupt", lambda r: ["merge", "--alpha", "0.5", r / "corrupt", r / "e1", "--base", r / "base", "--out", r / "o"], "fails its checksum"),
    ("corrupt", lambda r: ["merge", "--alpha", "0.5", r / "e0", "--base", r / "garbage.pt", "--out", r / "o"], "garbage.pt"),
    ("wrong kind", lambda r: ["merge", "--alpha", "0.5", r / "tv", r / "e1", "--base", r / "base", "--out", r / "o"], "holds a task vector"),
    ("wrong kind", lambda r: ["merge", "--alpha", "0.5", r / "e0", "--base", r / "head", "--out", r / "o"], "holds a classification head"),
    ("wrong arch", lambda r: ["merge", "--alpha", "0.5", r / "other_arch", "--base", r / "base", "--out", r / "o"], "architecture"),
    ("dangerous out", lambda r: _merge(r, "--out", r / "base", "--overwrite"), "is the input"),
    ("dangerous out", lambda r: _merge(r, "--out", r / "e1" / "sub", "--overwrite"), "lies inside the input"),
    ("dangerous out", lambda r: _merge(r, "--out", r, "--overwrite"), "contains the input"),
    ("dangerous out", lambda r: _merge(r, "--out", r / "notes.txt", "--overwrite"), "is a file"),
    ("dangerous out", lambda r: _merge(r, "--out", r / "mine", "--overwrite"), "not a checkpoint or other output"),
    ("dangerous out", lambda r: _merge(r, "--out", r / "head"), "already exists"),
    ("non-finite", lambda r: _merge(r, "--alpha", "nan", "--out", r / "o"), "--alpha must be a finite number"),
    ("non-finite", lambda r: _merge(r, "--beta", "inf", "--out", r / "o"), "--beta must be in [0, 1]"),
    ("non-finite", lambda r: _merge(r, "--method", "consensus", "--param", "lambdas=nan", "--out", r / "o"),
     "lambdas must be in (0, inf)"),
    ("non-finite", lambda r: _merge(r, "--method", "ties", "--param", "k=True", "--out", r / "o"), "(a bool, not a real number)"),
    # boost
    ("missing", lambda r: ["boost", r / "nope", "--base", r / "base", "--out", r / "o"], "nope"),
    ("corrupt", lambda r: ["boost", r / "corrupt", "--base", r / "base", "--out", r / "o"], "fails its checksum"),
    ("wrong kind", lambda r: ["boost", r / "tv", "--base", r / "base", "--out", r / "o"], "holds a task vector"),
    ("wrong arch", lambda r: ["boost", r / "other_arch", "--base", r / "base", "--out", r / "o"], "architecture"),
    ("dangerous out", lambda r: _boost(r, "--out", r / "e0", "--overwrite"), "is the input"),
    ("dangerous out", lambda r: _boost(r, "--out", r / "notes.txt", "--overwrite"), "is a file"),
    ("non-finite", lambda r: _boost(r, "--beta", "nan", "--out", r / "o"), "--beta must be in [0, 1]"),
    ("non-finite", lambda r: _boost(r, "--beta", "-0.5", "--out", r / "o"), "--beta must be in [0, 1]"),
    # convert
    ("missing", lambda r: ["convert", r / "nope.pt", r / "o"], "nope.pt"),
    ("corrupt", lambda r: ["convert", r / "garbage.pt", r / "o"], "garbage.pt"),
    ("wrong kind", lambda r: ["convert", r / "e0", r / "o"], "not a Hugging Face model directory"),
    ("dangerous out", lambda r: ["convert", r / "garbage.pt", r, "--overwrite"], "contains the input"),
    ("dangerous out", lambda r: ["convert", r / "garbage.pt", r / "garbage.pt", "--overwrite"], "is the input"),
    ("dangerous out", lambda r: ["convert", r / "garbage.pt", r / "notes.txt", "--overwrite"], "is a file"),
    ("dangerous out", lambda r: ["convert", r / "garbage.pt", r / "mine", "--overwrite"], "not a checkpoint"),
    # analyze
    ("missing", lambda r: ["analyze", r / "nope", r / "e1", "--base", r / "base", "--out", r / "o"], "nope"),
    ("corrupt", lambda r: ["analyze", r / "garbage.npz", "--out", r / "o"], "garbage.npz"),
    ("corrupt", lambda r: ["analyze", r / "corrupt", r / "e1", "--base", r / "base", "--out", r / "o"], "checksum"),
    ("wrong kind", lambda r: ["analyze", r / "tv", r / "e1", "--base", r / "base", "--out", r / "o"], "task vector"),
    ("wrong arch", lambda r: ["analyze", r / "other_arch", r / "e1", "--base", r / "base", "--out", r / "o"],
     "architecture"),
    ("dangerous out", lambda r: _analyze(r, "--out", r / "e0"), "is the input"),
    ("dangerous out", lambda r: _analyze(r, "--out", r / "base" / "figures"), "lies inside the input"),
    ("dangerous out", lambda r: _analyze(r, "--out", r / "notes.txt"), "not a directory"),
    ("non-finite", lambda r: _analyze(r, "--out", r / "o", "--fraction", "nan"), "--fraction must be in (0, 1]"),
    ("non-finite", lambda r: _analyze(r, "--out", r / "o", "--beta", "inf"), "--beta must be in [0, 1]"),
    # eval
    ("missing", lambda r: ["eval", r / "nope", "--heads", r / "heads", "--tasks", "MNIST", "--backbone", "tiny"], "nope"),
    ("wrong kind", lambda r: ["eval", r / "tv", "--heads", r / "heads", "--tasks", "MNIST", "--backbone", "tiny"],
     "holds a task vector"),
    ("dangerous out", lambda r: _eval(r, "--out", r / "e0"), "is the input"),
    ("dangerous out", lambda r: _eval(r, "--out", r / "eval.json", "--overwrite"), "not a result file"),
    ("dangerous out", lambda r: _eval(r, "--out", r / "heads" / "r.json"), "lies inside the input"),
    ("non-finite", lambda r: _eval(r, "--batch_size", "0"), "--batch_size must be a positive integer"),
    # demo
    ("non-finite", lambda r: ["demo", "--seed", "-1", "--out", r / "o"], "--seed"),
    ("dangerous out", lambda r: ["demo", "--size", "tiny", "--out", r / "notes.txt", "--overwrite"], "not a directory"),
    ("dangerous out", lambda r: ["demo", "--size", "tiny", "--out", r / "reports", "--overwrite"],
     "refusing to replace them even with --overwrite"),
]


@pytest.mark.parametrize("family, argv, fragment", CASES,
                         ids=[f"{i}-{family.replace(' ', '_')}" for i, (family, _, _) in enumerate(CASES)])
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(library, capsys, family, argv, fragment):
    before = fingerprint(library)
    args = [str(a) for a in argv(library)]
    code = cli.main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (args, err)
    assert len(lines) == 1 and lines[0].startswith(f"subboost {args[0]}: error: "), err
    assert fragment in lines[0], (fragment, lines[0])
    assert fingerprint(library) == before, "a failed command changed files"


@pytest.mark.parametrize("command", ["merge", "boost", "convert", "analyze"])
@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_nothing(library, tmp_path, capsys, monkeypatch, command):
    """An interrupt while computing or writing: one line, exit 130, no output, no hidden partial folder."""
    import orbax.checkpoint as ocp

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    torch = pytest.importorskip("torch") if command == "convert" else None
    if command == "convert":
        torch.save({"weight": torch.randn(3, 8), "bias": torch.randn(3)}, tmp_path / "head_MNIST.pt")
        argv = ["convert", tmp_path / "head_MNIST.pt", out]
        monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", interrupt)  # while writing
    elif command == "analyze":
        import subboost.alignment

        argv = _analyze(library, "--out", out)
        monkeypatch.setattr(subboost.alignment, "generalized_singular_values", interrupt)  # inside the staging folder
    else:
        argv = _merge(library, "--out", out) if command == "merge" else _boost(library, "--out", out)
        monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", interrupt)
    before = fingerprint(library)
    assert cli.main([str(a) for a in argv]) == 130
    assert capsys.readouterr().err.strip() == f"subboost {command}: interrupted."
    assert [p.name for p in tmp_path.iterdir() if p.name != "head_MNIST.pt"] == []
    assert fingerprint(library) == before
