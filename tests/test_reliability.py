"""One test per defect of two adversarial reviews: no input destroyed, no non-finite or silently wrong output,
one clear line per bad input.

Each test is named after the behaviour it guards; the CLI runs in-process (`cli.main`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import _thread
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import cli, streaming
from subboost.errors import SubboostError
from tests.conftest import vit_like_params

QUICK_GELU = {"kind": "clip_vision", "architecture": {"act": "quick_gelu", "width": 8}}
GELU = {"kind": "clip_vision", "architecture": {"act": "gelu", "width": 8}}


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(root).rglob("*"))}


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("subboost "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base + 2 experts (QuickGELU), one GELU expert, a streamed task vector, all tiny."""
    root = tmp_path_factory.mktemp("ckpts")
    rng = np.random.default_rng(0)
    base = vit_like_params(rng, layers=1, mlp=8)
    experts = [jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), base)
               for _ in range(2)]
    sb.save_params(base, root / "base", metadata=QUICK_GELU)
    for i, expert in enumerate(experts):
        sb.save_params(expert, root / f"e{i}", metadata=QUICK_GELU)
    sb.save_params(experts[0], root / "gelu", metadata=GELU)
    sb.merge_from_checkpoints(root / "base", [root / "e0", root / "e1"], out=root / "tv", progress=False)
    return root, base, experts


@pytest.fixture
def work(ckpts, tmp_path):
    """A private copy of the checkpoints (tests may damage it) and its fingerprint."""
    import shutil

    root = tmp_path / "w"
    shutil.copytree(ckpts[0], root)
    return root


# --- 1. --overwrite never destroys an input ---------------------------------------
def test_overwrite_never_replaces_an_input(work, capsys):
    before = fingerprint(work)
    merge = ["merge", "--alpha", "0.5", work / "e0", work / "e1", "--base", work / "base", "--overwrite"]
    assert_one_line_error(*run_cli(capsys, *merge, "--out", work / "base"), "is the input", "base")
    assert_one_line_error(*run_cli(capsys, *merge, "--out", work / "e1"), "is the input")
    assert_one_line_error(*run_cli(capsys, *merge, "--out", work / "base" / "inner"), "lies inside the input")
    assert_one_line_error(*run_cli(capsys, *merge, "--out", work), "contains the input")
    boost = ["boost", work / "e0", "--base", work / "base", "--overwrite"]
    assert_one_line_error(*run_cli(capsys, *boost, "--out", work / "e0"), "is the input")
    os.symlink(work / "e0", work.parent / "alias")  # the same directory under another name
    assert_one_line_error(*run_cli(capsys, *boost, "--out", work.parent / "alias"), "is the input")
    with pytest.raises(SubboostError, match="is the input"):
        sb.save_params({"w": np.ones(2, np.float32)}, work / "base", overwrite=True, inputs=[work / "base"])
    assert fingerprint(work) == before


# --- 2. --overwrite never replaces an ordinary file or a user's folder -------------------
def test_overwrite_never_replaces_an_ordinary_file(work, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.save({"weight": torch.randn(3, 8), "bias": torch.randn(3)}, tmp_path / "head_MNIST.pt")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert_one_line_error(*run_cli(capsys, "convert", tmp_path / "head_MNIST.pt", notes, "--overwrite"),
                          "is a file", "refusing to replace it even with --overwrite")
    assert notes.read_text() == "my notes\n"
    with pytest.raises(FileExistsError, match="is a file"):
        sb.save_params({"w": np.ones(2, np.float32)}, notes, overwrite=True)
    with pytest.raises(FileExistsError, match="is a file"):
        sb.merge_from_checkpoints(work / "base", [work / "e0"], out=notes, overwrite=True, progress=False)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.csv").write_text("1,2\n")
    assert_one_line_error(*run_cli(capsys, "merge", "--alpha", "0.5", work / "e0", "--base", work / "base",
                                   "--out", folder,
                                   "--overwrite"), "not a checkpoint or other output written by subboost")
    assert notes.read_text() == "my notes\n" and (folder / "data.csv").read_text() == "1,2\n"
    # what subboost wrote (marker subboost.json) is replaced with --overwrite
    sb.save_params({"w": np.ones(2, np.float32)}, tmp_path / "ours")
    sb.save_params({"w": np.zeros(2, np.float32)}, tmp_path / "ours", overwrite=True)
    np.testing.assert_array_equal(sb.load_params(tmp_path / "ours", as_numpy=True)["w"], np.zeros(2))


# --- 3. non-finite alpha or task vector ---------------------------------------------
def test_non_finite_alpha_or_task_vector_is_refused(work, capsys):
    before = fingerprint(work)
    for alpha in ("nan", "inf", "-inf"):
        assert_one_line_error(*run_cli(capsys, "merge", work / "e0", work / "e1", "--base", work / "base",
                                       f"--alpha={alpha}", "--out", work / "x"), "--alpha must be a finite number")
    assert fingerprint(work) == before
    base = {"w": jnp.ones((2, 2))}
    with pytest.raises(SubboostError, match="alpha must be a finite number, got nan"):
        sb.apply_task_vector(base, base, alpha=float("nan"))
    with pytest.raises(SubboostError, match=r"alpha must be in .* got True \(a bool, not a real number\)"):
        sb.apply_task_vector(base, base, alpha=True)
    with pytest.raises(SubboostError, match="parameter 'w' contains NaN"):
        sb.apply_task_vector(base, {"w": jnp.full((2, 2), jnp.nan)})


# --- 4. architecture checked by the CLI ---------------------------------------------
def test_merge_refuses_an_expert_of_another_architecture(work, capsys):
    code, err = run_cli(capsys, "merge", "--alpha", "0.5", work / "gelu", work / "e1", "--base", work / "base",
                        "--out", work / "x")
    assert_one_line_error(code, err, f"expert 0 ({work / 'gelu'})", "'gelu'", "'quick_gelu'")
    assert not (work / "x").exists()
    with pytest.raises(SubboostError, match="architecture"):
        sb.merge_from_checkpoints(work / "base", [work / "gelu"], out=work / "y", progress=False)


# --- 5. a task vector is not parameters -----------------------------------------------
def test_a_task_vector_is_not_accepted_as_parameters(work, capsys):
    assert sb.checkpoints.checkpoint_identity(work / "tv") == {"content": "task_vector",
                                                              "architecture": ("clip_vision", QUICK_GELU["architecture"])}
    assert_one_line_error(*run_cli(capsys, "boost", work / "tv", "--base", work / "base", "--out", work / "x"),
                          "holds a task vector, not model parameters")
    assert_one_line_error(*run_cli(capsys, "merge", "--alpha", "0.5", work / "tv", work / "e1", "--base", work / "base",
                                   "--out", work / "x"), f"expert 0 ({work / 'tv'}) holds a task vector")
    with pytest.raises(SubboostError, match="holds a task vector"):
        sb.merge_from_checkpoints(work / "base", [work / "tv"], out=work / "y", progress=False)
    with pytest.raises(SubboostError, match="holds a task vector"):
        sb.load_experts(work / "base", [work / "tv"])
    sb.save_params({"w": np.ones(2, np.float32)}, work / "saved_tv", content="task_vector")
    with pytest.raises(SubboostError, match="holds a task vector, not model parameters"):
        sb.load_params(work / "saved_tv", content="params")
    assert not (work / "x").exists() and not (work / "y").exists()
    # with alpha, the streamed output holds parameters and is accepted
    sb.merge_from_checkpoints(work / "base", [work / "e0"], out=work / "merged", alpha=0.5, progress=False)
    assert sb.checkpoints.checkpoint_identity(work / "merged")["content"] == "params"


# --- 6. corrupt data is refused, naming the file ---------------------------------------
def test_corrupt_checkpoint_data_is_refused_naming_the_file(work, capsys):
    # a flipped value whose file still decodes: only the checksum can tell
    info = json.loads((work / "e0" / "subboost.json").read_text())
    info["checksums"]["proj"] = "crc32:00000000"
    (work / "e0" / "subboost.json").write_text(json.dumps(info))
    with pytest.raises(SubboostError, match=r"e0: parameter 'proj' fails its checksum .* corrupt"):
        sb.load_params(work / "e0")
    assert_one_line_error(*run_cli(capsys, "merge", "--alpha", "0.5", work / "e0", work / "e1", "--base", work / "base",
                                   "--out", work / "x"), str(work / "e0"), "fails its checksum")
    with pytest.raises(SubboostError, match="fails its checksum"):  # streaming reads verify too
        sb.merge_from_checkpoints(work / "base", [work / "e0"], out=work / "y", progress=False)
    # 64 flipped bytes inside the array data (orbax keeps big arrays in ocdbt.process_0/d without a CRC)
    big = {"mlp": {"kernel": np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)}}
    sb.save_params(big, work / "big")
    data = max((work / "big").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(64):
        raw[len(raw) // 2 + i] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(SubboostError, match=r"big: parameter 'mlp/kernel' fails its checksum"):
        sb.load_params(work / "big")
    # a streamed output's params.safetensors is checked against merge_info.json
    tensors = work / "tv" / streaming.PARAMS_FILE
    raw = bytearray(tensors.read_bytes())
    raw[-2] ^= 0x01  # the last float changes a little and stays finite: only the checksum can tell
    tensors.write_bytes(bytes(raw))
    with pytest.raises(SubboostError, match=r"tv.*fails its checksum"):
        sb.load_params(work / "tv")
    assert not (work / "x").exists() and not (work / "y").exists()


def test_legacy_checkpoints_without_identity_or_checksums_still_load(ckpts, tmp_path, capsys):
    """Rule: no subboost.json (older saves, bench caches, other code) = parameters, unknown architecture."""
    import orbax.checkpoint as ocp

    root, base, experts = ckpts
    for name, tree in (("base", base), ("e0", experts[0]), ("e1", experts[1])):
        ocp.PyTreeCheckpointer().save((tmp_path / name).absolute(), jax.device_get(tree))
    assert sb.checkpoint_info(tmp_path / "e0") is None
    assert sb.checkpoints.checkpoint_identity(tmp_path / "e0") == {"content": "params", "architecture": None}
    tvs = sb.load_experts(tmp_path / "base", [tmp_path / "e0", tmp_path / "e1"])
    np.testing.assert_allclose(tvs["proj"][1], experts[1]["proj"] - base["proj"], atol=1e-6)
    # a legacy expert merges with a base that records an architecture (unknown is never compared)
    sb.load_experts(root / "base", [tmp_path / "e0"])
    # --overwrite does not replace a directory without a marker (it may not be ours)
    with pytest.raises(FileExistsError, match="not a checkpoint or other output written by subboost"):
        sb.save_params(base, tmp_path / "e0", overwrite=True)


# --- 7. consensus lambdas in (0, inf) -------------------------------------------------------
def test_consensus_lambdas_must_be_positive_and_finite(ckpts, tmp_path):
    root, base, experts = ckpts
    tvs = sb.task_vectors(base, experts)
    for bad in (float("nan"), -1, 0, float("inf"), True, "0.4", (0.4, float("nan"))):
        with pytest.raises(SubboostError, match="consensus: lambdas"):
            sb.merge(tvs, "consensus", lambdas=bad, min_tasks=1)
        with pytest.raises(SubboostError, match="consensus: lambdas"):
            sb.merge_from_checkpoints(root / "base", [root / "e0", root / "e1"], method="consensus", lambdas=bad,
                                      min_tasks=1, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    merged = sb.merge(tvs, "consensus", lambdas=(0.3, 0.5), min_tasks=1)  # valid per-task lambdas still work
    assert np.isfinite(np.asarray(merged["proj"])).all() and np.abs(np.asarray(merged["proj"])).sum() > 0


# --- 8. spectral ranks of non-finite or huge matrices ------------------------------------------
def test_spectral_ranks_refuse_non_finite_and_survive_huge_entries():
    for bad in (jnp.array([[jnp.nan, 1.0], [1.0, 1.0]]), jnp.array([[jnp.inf, 1.0], [1.0, 1.0]])):
        with pytest.raises(SubboostError, match="NaN or infinite"):
            sb.stable_rank(bad)
        with pytest.raises(SubboostError, match="NaN or infinite"):
            sb.energy_rank(bad)
    with pytest.raises(SubboostError, match="parameter 'a/kernel' contains NaN"):
        sb.stable_rank({"a": {"kernel": jnp.full((3, 3), jnp.nan)}})
    huge = jnp.diag(jnp.array([2e25, 1e25, 1e25], jnp.float32))  # s^2 overflows float32
    assert float(sb.stable_rank(huge)) == pytest.approx(1.5)
    assert int(sb.energy_rank(huge, fraction=0.95)) == 3
    assert float(sb.stable_rank(jnp.zeros((3, 3)))) == 0.0


# --- 9. overflow is an error, never inf on disk -----------------------------------------------
def test_overflow_is_an_error_not_inf(tmp_path):
    half = {"mlp": {"kernel": jnp.full((4, 4), 60000, jnp.float16)}}
    minus = {"mlp": {"kernel": jnp.full((4, 4), -60000, jnp.float16)}}
    sb.save_params(half, tmp_path / "plus")
    sb.save_params(minus, tmp_path / "minus")
    with pytest.raises(SubboostError, match="parameter 'mlp/kernel' is NaN or infinite .*float16"):
        sb.merge_from_checkpoints(tmp_path / "plus", [tmp_path / "minus"], out=tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minus", "plus"]  # no output, no partial folder
    with pytest.raises(SubboostError, match="overflows its dtype"):  # each difference is 120000 > float16 max
        sb.task_vectors(minus, [half, half])
    with pytest.raises(SubboostError, match="task_arithmetic: the merged task vector .*NaN or infinite"):
        sb.merge(sb.task_vectors(jax.tree_util.tree_map(jnp.zeros_like, half), [half, half]), "task_arithmetic")
    with pytest.raises(SubboostError, match="apply_task_vector.*parameter 'mlp/kernel'"):
        sb.apply_task_vector(half, half, alpha=1.0)
    with pytest.raises(SubboostError, match="save_params: parameter 'w' contains NaN or infinite"):
        sb.save_params({"w": np.array([np.inf], np.float32)}, tmp_path / "inf")
    assert not (tmp_path / "inf").exists()


# --- 10. bools are not numbers ------------------------------------------------------------
@pytest.mark.slow
def test_booleans_are_not_numbers(ckpts):
    root, base, experts = ckpts
    tvs = sb.task_vectors(base, experts)
    cases = [
        (lambda: sb.subspace_boost(base, beta=True), "beta must be in .*not a real number"),
        (lambda: sb.merge(tvs, "ties", k=True), "ties: k must be in .*not a real number"),
        (lambda: sb.merge(tvs, "consensus", min_tasks=True), "consensus: min_tasks must be an integer"),
        (lambda: sb.merge(tvs, "consensus", min_tasks=1.0), "consensus: min_tasks must be an integer"),
        (lambda: sb.merge(tvs, "dare", p=False, key=jax.random.key(0)), "dare: p must be in .*not a real number"),
        (lambda: sb.merge(tvs, "iso_cts", common_space_fraction=True), "common_space_fraction must be in .*not a real number"),
        (lambda: sb.apply_task_vector(base, base, alpha=False), "alpha must be in .*not a real number"),
    ]
    for call, message in cases:
        with pytest.raises(SubboostError, match=message):
            call()
    np.testing.assert_allclose(np.asarray(sb.merge(tvs, "ties", k=np.float32(1.0))["proj"]),  # numpy scalars: fine
                               np.asarray(sb.merge(tvs, "ties", k=1.0)["proj"]))


# --- 11. the README's head conversion works from the CLI ----------------------------------------
def test_convert_cli_converts_a_head(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    weight, bias = torch.randn(3, 8), torch.randn(3)
    torch.save({"weight": weight, "bias": bias}, tmp_path / "head_MNIST.pt")
    assert cli.main(["convert", str(tmp_path / "head_MNIST.pt"), str(tmp_path / "h")]) == 0
    assert "classification head (3 classes, embed 8)" in capsys.readouterr().out
    np.testing.assert_allclose(sb.load_params(tmp_path / "h", as_numpy=True)["kernel"], weight.numpy().T)
    assert sb.checkpoints.checkpoint_identity(tmp_path / "h")["content"] == "head"
    assert_one_line_error(*run_cli(capsys, "convert", tmp_path / "head_MNIST.pt", tmp_path / "h2", "--heads", "2"),
                          "a classification head takes no architecture arguments")


# --- 12. analyze validates everything before writing anything -------------------------------------
def test_analyze_validates_everything_before_writing(work, tmp_path, capsys):
    args = ["analyze", work / "e0", work / "e1", "--base", work / "base"]
    for extra, message in ((["--fraction", "2"], "--fraction must be in (0, 1]"),
                           (["--beta", "nan"], "--beta must be in [0, 1]"),
                           (["--pi", "-1"], "--pi must be in (0, inf)"),
                           (["--method", "ties", "--param", "k=True"], "k must be in (0, 1], got True (a bool, not a real number)")):
        assert_one_line_error(*run_cli(capsys, *args, "--out", tmp_path / "new" / "an", *extra), message)
        assert not (tmp_path / "new").exists()  # not even an empty folder
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "alignment.png").write_bytes(b"my own figure")
    assert_one_line_error(*run_cli(capsys, *args, "--out", existing, "--fraction", "2", "--overwrite"), "--fraction")
    assert_one_line_error(*run_cli(capsys, *args, "--out", existing, "--overwrite"), "no summary.json")
    assert sorted(os.listdir(existing)) == ["alignment.png"]
    assert (existing / "alignment.png").read_bytes() == b"my own figure"


# --- 13. one line, never a traceback ------------------------------------------------------------
def test_bad_inputs_give_one_line_not_a_traceback(work, tmp_path, capsys):
    merge = ["merge", "--alpha", "0.5", work / "e0", work / "e1", "--out", tmp_path / "x"]
    assert_one_line_error(*run_cli(capsys, *merge, "--base", "/dev/zero"), "/dev/zero: not a checkpoint")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert_one_line_error(*run_cli(capsys, "analyze", tmp_path / "bad.npz", "--out", tmp_path / "an"),
                          "bad.npz: not a readable .npz")
    torch = pytest.importorskip("torch")
    module = torch.nn.Module()
    module._modules["me"] = module
    torch.save(module, tmp_path / "self.pt")
    assert_one_line_error(*run_cli(capsys, "convert", tmp_path / "self.pt", tmp_path / "c"),
                          "self.pt", "contains itself")
    assert not (tmp_path / "x").exists() and not (tmp_path / "an").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_truncated_orbax_data_prints_one_line_and_no_event_loop_noise(work, tmp_path):
    for data in (work / "e0").rglob("*"):
        if data.is_file() and data.parent.name == "d":
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    done = subprocess.run(
        [sys.executable, "-m", "subboost.cli", "boost", str(work / "e0"), "--base", str(work / "base"),
         "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "cannot restore the orbax checkpoint" in lines[0] and str(work / "e0") in lines[0]
    assert "tensorstore_spec" not in lines[0] and "Event loop is closed" not in done.stderr
    assert not (tmp_path / "x").exists()


def test_orbax_noise_filters_drop_only_the_failed_restores_own_reports(tmp_path, monkeypatch, caplog):
    """The late reports of a failed restore's sibling reads are dropped by hooks, whenever they arrive."""
    import logging
    import types

    from subboost.checkpoint_io import orbax_io

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(str(unraisable.exc_value)))
    damaged, healthy = tmp_path / "damaged", tmp_path / "healthy"
    with pytest.raises(ValueError, match="first read failed"):
        with orbax_io.quiet_event_loop_noise(damaged):
            raise ValueError("first read failed")
    with orbax_io.quiet_event_loop_noise(healthy):
        pass  # a restore that succeeds marks nothing

    def unraisable(err):
        return types.SimpleNamespace(exc_type=type(err), exc_value=err, exc_traceback=None, err_msg=None, object=None)

    for err in (RuntimeError("Event loop is closed"), RuntimeError("Event loop is closing"), ValueError("x")):
        sys.unraisablehook(unraisable(err))
    assert seen == ["Event loop is closing", "x"]

    asyncio_logger = logging.getLogger("asyncio")
    for path in (damaged, healthy):
        try:
            raise ValueError(f'OUT_OF_RANGE: Error reading local file "{path}/d/abc"')
        except ValueError:
            asyncio_logger.error("Task exception was never retrieved\nfuture: <Task>", exc_info=True)
    asyncio_logger.error("unhandled exception during asyncio.run() shutdown")  # no exception: kept
    kept = [(r.getMessage().splitlines()[0], str(r.exc_info[1]) if r.exc_info else None)
            for r in caplog.records if r.name == "asyncio"]
    assert kept == [("Task exception was never retrieved", f'OUT_OF_RANGE: Error reading local file "{healthy}/d/abc"'),
                    ("unhandled exception during asyncio.run() shutdown", None)]


# --- 14. Ctrl-C leaves no hidden partial folders -------------------------------------------------
def test_interrupted_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    # deterministic: a writer thread still writing when the interrupt arrives
    original = ocp.PyTreeCheckpointer.save

    def slow_writer_save(self, directory, *args, **kwargs):
        def write_late():
            time.sleep(0.3)
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "late_file").write_text("x")

        threading.Thread(target=write_late).start()
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", slow_writer_save)
    with pytest.raises(KeyboardInterrupt):
        sb.save_params({"w": np.ones(3, np.float32)}, tmp_path / "sub" / "ckpt")
    time.sleep(0.5)
    assert os.listdir(tmp_path) == []  # no partial folder, not even the parent created for it
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", original)
    # real orbax writes, interrupted from a timer at different moments
    tree = {f"l{i}": {"kernel": np.ones((128, 128), np.float32)} for i in range(60)}
    for trial in range(4):
        timer = threading.Timer(0.02 + 0.08 * trial, _thread.interrupt_main)
        timer.start()
        try:
            sb.save_params(tree, tmp_path / f"c{trial}")
            timer.join()
            time.sleep(0.3)  # an interrupt after the save finished lands here
        except KeyboardInterrupt:
            pass
        timer.cancel()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == [], leftovers


# --- 15. messages name the file --------------------------------------------------------------------
def test_error_messages_name_the_file(work, tmp_path, capsys):
    short = tmp_path / "short"
    sb.save_params({k: v for k, v in sb.load_params(work / "e1", as_numpy=True).items() if k != "proj"}, short)
    assert_one_line_error(*run_cli(capsys, "merge", "--alpha", "0.5", work / "e0", short, "--base", work / "base",
                                   "--out", tmp_path / "x"),
                          f"expert 1 ({short})", "missing parameters ['proj']")
    from subboost.convert.common import ConversionError, count_blocks

    with pytest.raises(ConversionError, match=r"^ckpt.pt: blocks t\.\{i\} are not numbered 0\.\.2: missing \[1\]"):
        count_blocks(["t.0.w", "t.2.w"], "t.", source="ckpt.pt")
    header = json.dumps({"w": {"dtype": "F32", "shape": [-4, -4], "data_offsets": [0, 64]}}).encode()
    (tmp_path / "neg.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    with pytest.raises(SubboostError, match=r"neg.safetensors: parameter 'w' has a negative dimension"):
        sb.load_params(tmp_path / "neg.safetensors")
    os.mkfifo(tmp_path / "fifo")
    assert_one_line_error(*run_cli(capsys, "convert", tmp_path / "fifo", tmp_path / "c"),
                          "fifo: not a regular file")
    torch = pytest.importorskip("torch")
    from subboost.convert.pickled_module import architecture_hints
    from subboost.convert.torch_pickle import load_torch_file

    attention = torch.nn.MultiheadAttention(8, 2)
    attention.num_heads = "abc"
    torch.save(torch.nn.Sequential(attention), tmp_path / "heads.pt")
    with pytest.raises(ConversionError, match=r"heads.pt: a pickled MultiheadAttention has num_heads='abc'"):
        architecture_hints(load_torch_file(tmp_path / "heads.pt"), source=str(tmp_path / "heads.pt"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()


# --- 16. no matrix leaf: warned or refused, never a silent no-op -----------------------------------
def test_a_tree_without_matrices_is_reported(tmp_path):
    stacked = {"layers": {"mlp": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8)),
                                                         jnp.float32)}}}
    with pytest.warns(UserWarning, match=r"no parameter is a matrix .*layer_axes=1"):
        assert sb.stable_rank(stacked) == {}
    with pytest.raises(SubboostError, match="subspace_boost: no parameter is a matrix"):
        sb.subspace_boost(stacked, beta=0.5)
    tvs = jax.tree_util.tree_map(lambda x: jnp.stack([x, -0.5 * x]), stacked)
    for method in ("iso_c", "tsv"):
        with pytest.raises(SubboostError, match=f"{method}: no parameter is a matrix"):
            sb.merge(tvs, method)
    scan = sb.matrix_predicate(layer_axes=1)  # the documented remedy works
    assert sb.stable_rank(stacked, is_matrix=scan)["layers/mlp"].shape == (3,)
    boosted = sb.subspace_boost(stacked, beta=0.5, is_matrix=scan)
    assert not np.allclose(boosted["layers"]["mlp"]["kernel"], stacked["layers"]["mlp"]["kernel"])
    sb.save_params(stacked, tmp_path / "b")
    sb.save_params(jax.tree_util.tree_map(lambda x: 2 * x, stacked), tmp_path / "e")
    with pytest.raises(SubboostError, match="subspace_boost: no parameter is a matrix"):
        sb.merge_from_checkpoints(tmp_path / "b", [tmp_path / "e"], boost=0.5, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# ===================================================================================================
# Round 2: an adversarial pass of every subcommand (data loss, silent wrong output, hangs, noise)
# ===================================================================================================
def _can_bind_mount(tmp_path: Path) -> bool:
    source, target = tmp_path / ".probe_src", tmp_path / ".probe_dst"
    source.mkdir()
    target.mkdir()
    try:
        done = subprocess.run(["mount", "--bind", source, target], capture_output=True).returncode == 0
    except OSError:
        done = False
    if done:
        subprocess.run(["umount", target], check=True)
    source.rmdir()
    target.rmdir()
    return done


@pytest.fixture
def bind_mount(tmp_path):
    """``bind_mount(source, target)``: a bind mount, undone after the test; skips where mounting is not allowed."""
    if os.geteuid() != 0 or not _can_bind_mount(tmp_path):
        pytest.skip("bind mounts need root and a system that allows `mount --bind` (this one does not)")
    mounted: list[Path] = []

    def mount(source: Path, target: Path) -> Path:
        subprocess.run(["mount", "--bind", source, target], check=True)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", target], check=False)


def merge_argv(work: Path, *extra) -> list:
    return ["merge", work / "e0", work / "e1", "--base", work / "base", "--alpha", "0.5", *extra]


# --- R1. deleting never crosses a file-system boundary --------------------------------------------
def test_overwrite_refuses_an_old_output_holding_a_mount_point(work, tmp_path, capsys, bind_mount):
    before = fingerprint(work / "e1")
    old = tmp_path / "old"
    sb.save_params({"w": np.ones(2, np.float32)}, old)
    (old / "mnt").mkdir()  # the reproduction: an extra folder with an input mounted on it
    bind_mount(work / "e1", old / "mnt")
    assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", old, "--overwrite")), "holds a mount point")
    subprocess.run(["umount", old / "mnt"], check=True)
    (old / "mnt").rmdir()
    bind_mount(work / "e1", old / "d")  # on an entry a checkpoint does hold: the mount check alone refuses it
    assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", old, "--overwrite")), "holds a mount point")
    with pytest.raises(SubboostError, match="holds a mount point"):
        sb.outputs.remove_tree(old)
    assert fingerprint(work / "e1") == before
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


# --- R2. an alias of an input (bind mount, hard link) is still the input -------------------------
def test_a_bind_mount_alias_of_an_input_is_the_input(work, tmp_path, capsys, bind_mount):
    before = fingerprint(work)
    alias = tmp_path / "alias"
    alias.mkdir()
    bind_mount(work, alias)
    for out, relation in ((alias / "e1", "is the input"), (alias / "base" / "inner", "lies inside the input")):
        assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", out, "--overwrite")), relation,
                              "another path")
    assert fingerprint(work) == before


def test_an_output_holding_a_hard_link_of_an_input_is_refused(tmp_path):
    source = tmp_path / "tensors.safetensors"
    sb.checkpoint_io.safetensors_format.save_safetensors({"w": np.ones((2, 2), np.float32)}, source)
    old = tmp_path / "old"
    sb.save_params({"w": np.ones(2, np.float32)}, old)
    os.link(source, old / "d" / "linked")  # same inode under the old output
    with pytest.raises(sb.outputs.OutputOverlapError, match="contains the input .*another path"):
        sb.outputs.check_not_an_input(old, [source], replaced=[old])
    assert source.read_bytes()  # untouched


# --- R3. --overwrite replaces only what subboost marked as its own -------------------------------
def test_overwrite_replaces_only_folders_subboost_marked_and_filled(work, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "summary.json").write_text('{"figures": {}, "experts": []}')
    (thesis / "thesis.tex").write_text("\\chapter{One}")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "subboost.json").write_text("{}")  # the bare file name is not a marker
    extra = tmp_path / "extra"
    sb.save_params({"w": np.ones(2, np.float32)}, extra)
    (extra / "notes.txt").write_text("mine")  # a real checkpoint with a user's file added
    for folder in (thesis, fake, extra):
        before = fingerprint(folder)
        assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", folder, "--overwrite")),
                              "refusing to replace it even with --overwrite")
        assert fingerprint(folder) == before
    assert not sb.outputs.written_by_subboost(thesis) and not sb.outputs.written_by_subboost(fake)
    # what subboost wrote is replaced: a checkpoint, a streaming merge output, an analysis, an empty folder
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "summary.json").write_text(json.dumps({"format": sb.outputs.ANALYSIS_FORMAT}))
    (analysis / "alignment.png").write_bytes(b"png")
    (tmp_path / "empty").mkdir()
    for ours in (work / "tv", analysis, tmp_path / "empty"):
        assert sb.outputs.written_by_subboost(ours), ours
    sb.save_params({"w": np.zeros(2, np.float32)}, analysis, overwrite=True)
    assert "subboost.json" in os.listdir(analysis) and not (analysis / "alignment.png").exists()  # replaced whole


# --- R4. two leaves never share a stored name --------------------------------------------------------
def test_leaves_that_would_share_a_stored_name_are_refused_at_save(tmp_path, capsys):
    zeros, ones = np.zeros(2, np.float32), np.ones(2, np.float32)
    with pytest.raises(SubboostError, match=r"parameters 'x' -> 'y' and 'x\.y' would be stored under the same name"):
        sb.save_params({"x.y": zeros, "x": {"y": ones}}, tmp_path / "dot")
    with pytest.raises(SubboostError, match=r"parameters 'a' -> 'b' and 'a/b' would be stored under the same name"):
        sb.save_params({"a/b": zeros, "a": {"b": ones}}, tmp_path / "slash")
    assert os.listdir(tmp_path) == []
    saved = sb.save_params({"a": {"b.c": zeros}, "z": {"b": {"c": ones}}}, tmp_path / "fine")  # distinct names
    assert set(json.loads((saved / "subboost.json").read_text())["checksums"]) == {"a/b.c", "z/b/c"}
    # safetensors inputs whose names collide: the CLI merge refuses them, writing nothing
    for name, tree in (("e0", {"x.y": zeros, "x/y": ones}), ("e1", {"x.y": ones, "x/y": zeros}),
                       ("base", {"x.y": zeros, "x/y": zeros})):
        path = tmp_path / f"{name}.safetensors"
        specs = {k: (v.shape, v.dtype) for k, v in tree.items()}
        writer = sb.checkpoint_io.safetensors_format.SafetensorsWriter(path, specs)
        for k, v in tree.items():
            writer.write(k, v)
        writer.close()
    code, err = run_cli(capsys, "merge", tmp_path / "e0.safetensors", tmp_path / "e1.safetensors", "--base",
                        tmp_path / "base.safetensors", "--alpha", "0.5", "--out", tmp_path / "m")
    assert_one_line_error(code, err, "would be stored under the same name")
    assert not (tmp_path / "m").exists()
    header_path = tmp_path / "folder.safetensors"
    writer = sb.checkpoint_io.safetensors_format.SafetensorsWriter(header_path, {"a": ((2,), np.float32),
                                                                                 "a/b": ((2,), np.float32)})
    writer.write("a", ones), writer.write("a/b", ones), writer.close()
    with pytest.raises(SubboostError, match="'a' is also the folder of other parameters"):
        sb.load_params(header_path)


# --- R5. a checkpoint is what its own folder holds ---------------------------------------------------
def test_a_checkpoint_is_what_its_own_folder_holds(work, tmp_path, capsys):
    import shutil

    (tmp_path / "wrapped").mkdir()
    shutil.copytree(work / "gelu", tmp_path / "wrapped" / "inner")
    assert_one_line_error(*run_cli(capsys, "merge", tmp_path / "wrapped", "--base", work / "base", "--alpha", "0.3",
                                   "--out", tmp_path / "m"), "unknown checkpoint format", "pass that path")
    (tmp_path / "tv_wrapped").mkdir()
    shutil.copytree(work / "tv", tmp_path / "tv_wrapped" / "inner")
    with pytest.raises(SubboostError, match="unknown checkpoint format"):
        sb.load_experts(work / "base", [tmp_path / "tv_wrapped"])
    # a merge_info.json claiming "params" beside an orbax task vector: refused, not believed
    sb.save_params({"w": np.ones((2, 2), np.float32)}, tmp_path / "otv", content="task_vector")
    (tmp_path / "otv" / "merge_info.json").write_text(json.dumps({"content": "params"}))
    with pytest.raises(SubboostError, match="holds both an orbax checkpoint and a merge output"):
        sb.checkpoints.checkpoint_identity(tmp_path / "otv")
    with pytest.raises(SubboostError, match="holds both"):
        sb.load_params(tmp_path / "otv")
    with pytest.raises(SubboostError, match="holds both"):
        sb.checkpoint_io.readers.open_checkpoint(tmp_path / "otv")
    assert not (tmp_path / "m").exists()


# --- R6. a failed analyze --overwrite leaves the old files as they were ------------------------------
def test_failed_analyze_overwrite_changes_nothing(work, tmp_path, capsys, monkeypatch):
    from subboost.expert_analysis import replace_files

    out = tmp_path / "an"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"format": sb.outputs.ANALYSIS_FORMAT}))
    (out / "spectra_boosted.png").write_bytes(b"old")
    (out / "alignment.png").mkdir()  # one output name is a directory
    before = fingerprint(out)
    assert_one_line_error(*run_cli(capsys, "analyze", work / "e0", work / "e1", "--base", work / "base", "--out", out,
                                   "--overwrite"), "alignment.png is not a regular file")
    assert fingerprint(out) == before
    # the move itself is all or nothing: a failure part-way moves everything back
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in ("a.json", "b.json", "c.json"):
        (staging / name).write_text("new")
    target = tmp_path / "target"
    target.mkdir()
    (target / "a.json").write_text("old a")
    (target / "c.json").write_text("old c")
    before = fingerprint(target)
    real_replace = os.replace

    def fail_on_c(src, dst):
        if Path(src).name == "c.json" and Path(src).parent == staging:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_c)
    with pytest.raises(OSError, match="No space"):
        replace_files(staging, target)
    monkeypatch.undo()
    assert fingerprint(target) == before
    assert sorted(os.listdir(staging)) == [".replaced", "a.json", "b.json", "c.json"]


# --- R7. options without effect are refused, never recorded as used -----------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--attn-beta", "0.1"], "--attn-beta only apply to boosting"),
    (["--mode", "index"], "--mode only apply to boosting"),
    (["--rank-rtol", "1e-6"], "--rank-rtol only apply to boosting"),
])
def test_boost_options_without_beta_are_refused(work, tmp_path, capsys, extra, message):
    assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", tmp_path / "m", *extra)), message)
    assert not (tmp_path / "m").exists()


# --- R8. special files are refused, never read (a FIFO would hang) -------------------------------------
def test_fifos_are_refused_not_read(work, tmp_path, capsys):
    fake = tmp_path / "fifo_meta"
    sb.save_params({"w": np.ones(2, np.float32)}, fake)
    (fake / "subboost.json").unlink()
    os.mkfifo(fake / "subboost.json")
    start = time.monotonic()
    with pytest.raises(SubboostError, match="not a checkpoint metadata .*FIFO"):
        sb.load_params(fake)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    os.mkfifo(hf / "model.safetensors")
    assert_one_line_error(*run_cli(capsys, "convert", hf, tmp_path / "c"), "model.safetensors", "not a regular file")
    os.mkfifo(tmp_path / "config_fifo")
    (tmp_path / "hf2").mkdir()
    os.symlink(tmp_path / "config_fifo", tmp_path / "hf2" / "config.json")
    sb.checkpoint_io.safetensors_format.save_safetensors({"w": np.ones(2, np.float32)},
                                                        tmp_path / "hf2" / "model.safetensors")
    assert_one_line_error(*run_cli(capsys, "convert", tmp_path / "hf2", tmp_path / "c"), "config.json")
    assert time.monotonic() - start < 20 and not (tmp_path / "c").exists()


# --- R9. hostile paths, headers and numbers: one line each ---------------------------------------------
def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def test_hostile_paths_headers_and_numbers_give_one_line(work, tmp_path, capsys):
    before = fingerprint(work)
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    loop = tmp_path / "loop_a"
    assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", loop)), "loop_a")
    assert_one_line_error(*run_cli(capsys, "merge", work / "e0", "--base", loop, "--alpha", "1", "--out",
                                   tmp_path / "m"), "loop_a")
    assert_one_line_error(*run_cli(capsys, "convert", loop, tmp_path / "c"), "loop_a")
    assert_one_line_error(*run_cli(capsys, "analyze", work / "e0", work / "e1", "--base", work / "base", "--out",
                                   loop), "loop_a")
    assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", "~nosuchuser_i35/x")), "~nosuchuser_i35")
    w = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases = {
        "inf_shape": ({"w": {**w, "shape": [1e999]}}, "not a list of integers"),
        "str_shape": ({"w": {**w, "shape": ["2"]}}, "not a list of integers"),
        "huge_shape": ({"w": {**w, "shape": [2**62, 2**62]}}, "does not fit shape"),
        "gap": ({"w": w, "v": {**w, "data_offsets": [12, 20]}}, "leaves a gap"),
        "overlap": ({"w": w, "v": {**w, "data_offsets": [4, 12]}}, "overlaps the previous tensor"),
        "metadata": ({"__metadata__": {"content": ["params"]}, "w": w}, "__metadata__ is not a map of strings"),
    }
    for name, (header, message) in cases.items():
        path = _safetensors(tmp_path / f"{name}.safetensors", header, bytes(24))
        with pytest.raises(SubboostError, match=message):
            sb.load_params(path)
    deep = tmp_path / "deep.safetensors"
    raw = ('{"__metadata__": ' + '{"a": ' * 3000 + '"x"' + "}" * 3000 + "}").encode()
    deep.write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert_one_line_error(*run_cli(capsys, "merge", deep, "--base", work / "base", "--alpha", "1", "--out",
                                   tmp_path / "m"), "nested too deeply")
    deep_meta = tmp_path / "deep_meta"
    sb.save_params({"w": np.ones(2, np.float32)}, deep_meta)
    (deep_meta / "subboost.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(SubboostError, match="nested too deeply"):
        sb.load_params(deep_meta)
    for extra, message in ((["--method", "dare", "--seed", "1", "--param", "key=3"], "--param key=..."),
                           (["--method", "dare", "--seed", "99999999999999999999999"], "--seed must be an integer in"),
                           (["--method", "ties", "--param", "k=" + "+".join(["1"] * 20000)], "more than the 1000"),
                           (["--method", "ties", "--param", "k=" + "[" * 500 + "]" * 500], "k must be")):
        assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", tmp_path / "m", *extra)), message)
    bad_name = os.fsdecode(bytes(tmp_path / "m") + b"\xff")
    assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", bad_name)), "not valid UTF-8")
    assert fingerprint(work) == before
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


# --- R10. messages name the file and stay short ----------------------------------------------------------
def test_messages_name_the_file_and_stay_short(work, tmp_path, capsys):
    listed = tmp_path / "listed"
    sb.save_params({"w": np.ones((2, 2), np.float32)}, listed)
    info = json.loads((listed / "subboost.json").read_text())
    (listed / "subboost.json").write_text(json.dumps({**info, "content": ["params"]}))
    assert_one_line_error(*run_cli(capsys, "merge", listed, "--base", work / "base", "--alpha", "1", "--out",
                                   tmp_path / "m"), "records an unknown content", "listed")
    assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", "/dev/null/x")), "/dev/null")
    code, err = run_cli(capsys, *merge_argv(work, "--out", work / "base"))
    assert_one_line_error(code, err, "is the input")
    sb.save_params({"w": np.ones(2, np.float32)}, tmp_path / "taken")
    assert_one_line_error(*run_cli(capsys, *merge_argv(work, "--out", tmp_path / "taken")), "pass --overwrite")
    assert "overwrite=True" not in err
    many = {f"p{i:03d}": np.ones(2, np.float32) for i in range(40)}
    sb.save_params(many, tmp_path / "many")
    code, err = run_cli(capsys, "merge", tmp_path / "many", "--base", work / "base", "--alpha", "1", "--out",
                        tmp_path / "m")
    assert_one_line_error(code, err, "and 35 more")
    assert len(err) < 1200
    from subboost.cli import one_line

    assert one_line("x" * 5000).endswith("... (4000 more characters)")
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(50000)}
    header["t49999"]["data_offsets"] = [0, 4]  # one bad entry at the end of a large header
    path = _safetensors(tmp_path / "huge.safetensors", header, bytes(4 * 50000))
    code, err = run_cli(capsys, "merge", path, "--base", work / "base", "--alpha", "1", "--out", tmp_path / "m")
    assert_one_line_error(code, err, "huge.safetensors", "'t49999' (bytes 0..4) overlaps")
    assert len(err) < 1200


# --- R11. one line, no library noise before it -------------------------------------------------------------
def test_library_logging_is_quiet_during_a_command_and_restored(work, tmp_path, capsys):
    import logging

    from subboost.cli import QUIETED_LOGGERS, quiet_library_logging

    levels = {name: logging.getLogger(name).level for name in QUIETED_LOGGERS}
    with quiet_library_logging():
        logging.getLogger("absl").error("orbax noise")
        assert all(logging.getLogger(name).level > logging.CRITICAL for name in QUIETED_LOGGERS)
    assert {name: logging.getLogger(name).level for name in QUIETED_LOGGERS} == levels
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_cli(capsys, *merge_argv(work, "--alpha", "1e300", "--out", tmp_path / "m"))
    assert_one_line_error(code, err, "NaN or infinite")
    assert err.count("\n") == 1, err
    assert [str(w.message) for w in caught] == []  # not even a numpy overflow warning before it
    assert not (tmp_path / "m").exists()


def test_a_full_disk_gives_one_short_line_and_leaves_nothing(work, tmp_path, capsys, bind_mount):
    """``bind_mount`` only for its skip: mounting a small tmpfs needs the same rights."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", small], check=True)
    try:
        code, err = run_cli(capsys, *merge_argv(work, "--out", small / "m"))
        assert_one_line_error(code, err, str(small / "m"))
        assert "no space left on" in err.lower() and err.count("\n") == 1 and len(err) < 300, err
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", "-l", small], check=False)


def test_an_unusable_compile_cache_setting_is_one_line(monkeypatch, capsys, tmp_path):
    from subboost.compilation import CACHE_ENV_VAR as ENV_VAR, setup_cli_compile_cache

    monkeypatch.setenv(ENV_VAR, "~nosuchuser_i35/cache")
    assert setup_cli_compile_cache() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compilation cache off" in err and "nosuchuser_i35" in err, err
    # a directory that exists but cannot be written (root writes anywhere: the write probe is made to fail)
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert setup_cli_compile_cache() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"compilation cache off ({tmp_path}: Read-only file system)" in err, err


# --- R12. SIGTERM and SIGHUP clean up as Ctrl-C does ----------------------------------------------------
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_during_a_save_leaves_nothing(work, tmp_path, capsys, monkeypatch, signame):
    import signal

    import orbax.checkpoint as ocp

    original = ocp.PyTreeCheckpointer.save

    def save_then_signal(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)  # a whole checkpoint written into the staging folder
        os.kill(os.getpid(), getattr(signal, signame))
        time.sleep(5)  # the handler interrupts this

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", save_then_signal)
    handler = signal.getsignal(getattr(signal, signame))
    code, err = run_cli(capsys, *merge_argv(work, "--out", tmp_path / "sub" / "m"))
    assert code == 128 + getattr(signal, signame) and err.strip() == f"subboost merge: stopped by {signame}.", err
    assert os.listdir(tmp_path) == ["w"]  # no partial folder, no parent created for it
    assert signal.getsignal(getattr(signal, signame)) is handler


# --- issue 29: no silent hyper-parameter ------------------------------------------------------------------
def test_merge_has_no_silent_hyper_parameter(work, tmp_path, capsys):
    argv = ["merge", work / "e0", work / "e1", "--base", work / "base", "--out", tmp_path / "m"]
    assert_one_line_error(*run_cli(capsys, *argv), "--alpha is required")
    assert_one_line_error(*run_cli(capsys, *argv, "--alpha", "0.3", "--method", "dare"),
                          "--method dare is random: pass --seed N")
    assert_one_line_error(*run_cli(capsys, *argv, "--alpha", "0.3", "--seed", "3"),
                          "--seed has no effect: --method task_arithmetic is not random")
    assert_one_line_error(*run_cli(capsys, "analyze", work / "e0", work / "e1", "--base", work / "base", "--out",
                                   tmp_path / "an", "--method", "dare"), "pass --seed N")
    assert not (tmp_path / "m").exists() and not (tmp_path / "an").exists()
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["merge"].format_help()
    assert "required" in help_text and "default task_arithmetic" in help_text
