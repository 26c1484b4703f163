"""experiments.run_suite end to end: tiny random ViT, tiny heads, tfds mock data + a local task."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("ml_collections")

import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402

import subboost as sb  # noqa: E402
from experiments import run_suite  # noqa: E402
from subboost import data as sbdata  # noqa: E402
from subboost.data.preprocessing import normalize_images_np  # noqa: E402
from subboost.models import CLIPVisionTransformer, get_config, param_shapes  # noqa: E402
from subboost.streaming import save_safetensors  # noqa: E402

CONFIG_FILE = str(Path(__file__).resolve().parent.parent / "experiments" / "configs" / "tiny.py")
# Two suites of two tasks (merges compile once per number of experts), one of them local, few classes.
SUITES = "PCAM/GTSRB+EuroSAT/GTSRB"
# These tests recompute the clean definitions; the reference conventions have their own test.
CLEAN = ",conventions=subboost,alpha_metric=absolute"
TASKS = ("PCAM", "GTSRB", "EuroSAT")
MODEL = get_config("tiny")
MOCK_EXAMPLES = 12
pytestmark = pytest.mark.slow  # whole suites end to end (checkpoints, tfds mock data, merges, sweeps)
_encode = jax.jit(lambda p, x: CLIPVisionTransformer(MODEL).apply({"params": p}, x))


def features(params, images):
    return np.asarray(_encode(params, jnp.asarray(normalize_images_np(images))))


def head_accuracy(head, feats, labels):
    """Independent head: L2-normalise, logits = f @ kernel + bias, argmax."""
    feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    return float(np.mean(np.argmax(feats @ head["kernel"] + head["bias"], -1) == labels))


@pytest.fixture(scope="module")
def mock():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mock):
    """Checkpoints (base, one expert per task, centroid heads) and a local GTSRB directory."""
    root = tmp_path_factory.mktemp("suite")
    rng = np.random.default_rng(0)
    data_dir = root / "data"
    for split in ("train", "test"):
        for label in (0, 7, 42):
            for i in range(4 if split == "train" else 3):
                path = data_dir / "gtsrb" / split / f"{label:05d}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(path)

    base = jax.tree_util.tree_map_with_path(
        lambda p, s: np.ones(s.shape, np.float32) if "scale" in str(p[-1])
        else (0.2 * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(MODEL))
    ckpt = root / "ckpt"
    (ckpt / "finetuned").mkdir(parents=True)
    (ckpt / "heads").mkdir()
    save_safetensors(base, ckpt / "zeroshot.safetensors")
    experts, heads = {}, {}
    for task in TASKS:
        experts[task] = jax.tree_util.tree_map(lambda x: x + (0.1 * rng.standard_normal(x.shape)).astype(np.float32), base)
        save_safetensors(experts[task], ckpt / "finetuned" / f"{task}.safetensors")
        # Head = normalised class centroids of the expert's features on the task's examples, so
        # the expert is accurate and merged models in between are not.
        splits = [sbdata.split_arrays(task, s, data_dir=str(data_dir), image_size=MODEL.image_size)
                  for s in ("validation", "test")]
        images, labels = (np.concatenate(parts) for parts in zip(*splits))
        f = features(experts[task], images)
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        c = sbdata.get_task(task).num_classes
        kernel = np.zeros((MODEL.embed_dim, c), np.float32)
        for k in np.unique(labels):
            centroid = f[labels == k].mean(0)
            kernel[:, k] = 10 * centroid / np.linalg.norm(centroid)
        heads[task] = {"kernel": kernel, "bias": np.where(np.isin(np.arange(c), labels), 0, -100).astype(np.float32)}
        save_safetensors(heads[task], ckpt / "heads" / f"{task}.safetensors")
    return {"root": root, "ckpt": ckpt, "data_dir": data_dir, "base": base, "experts": experts, "heads": heads}


def config(**overrides):
    cfg = run_suite.load_config(CONFIG_FILE + f":suites={SUITES}{CLEAN}")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def first_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    argv = ["--config", CONFIG_FILE + f":suites={SUITES}{CLEAN}", "--checkpoints", str(setup["ckpt"]),
            "--data_dir", str(setup["data_dir"]), "--out", str(out), "--no_progress"]
    assert run_suite.main(argv) == 0
    return out / "random_tiny" / "tiny"


def _split(setup, task, split, limit):
    return sbdata.split_arrays(task, split, data_dir=str(setup["data_dir"]), image_size=MODEL.image_size,
                               max_examples=limit)


def test_files_and_provenance(first_run):
    cells = sorted(p.relative_to(first_run).as_posix() for p in first_run.rglob("*.json"))
    labels = ("task_arithmetic", "task_arithmetic+boost", "consensus")
    assert cells == sorted(["reference.json", "results.json"]
                           + [f"suite_{s}/{m}.json" for s in ("PCAM,GTSRB", "EuroSAT,GTSRB") for m in labels])
    cell = json.loads((first_run / "suite_PCAM,GTSRB" / "consensus.json").read_text())
    assert cell["family"] == "random_tiny" and cell["backbone"] == "tiny" and cell["method"] == "consensus"
    assert cell["tasks"] == ["PCAM", "GTSRB"] and cell["suite"] == "PCAM,GTSRB"
    merge = cell["hyper_parameters"]["merge"]
    assert merge["min_tasks"] == 2 and cell["hyper_parameters"]["beta"] is None
    assert set(merge["tall_lambdas"]) == {"PCAM", "GTSRB"} and set(merge["tall_lambdas"].values()) <= {0.2, 0.4}
    assert merge["lambdas"] == [merge["tall_lambdas"]["PCAM"], merge["tall_lambdas"]["GTSRB"]]
    assert merge["tall_alpha"] in (0.5, 1.0)
    assert cell["code_version"]["subboost"] == sb.__version__ and "git_sha" in cell["code_version"]
    assert cell["settings"]["data"]["splits"]["GTSRB"] == {"validation": "train[90%:]", "test": "test"}
    assert cell["settings"]["data"]["max_validation_examples"] == 8


def test_sweep_picks_the_alpha_of_best_validation_accuracy(setup, first_run):
    """Recomputes every sweep point independently (numpy heads, own forward pass) and the argmax."""
    base, experts = setup["base"], setup["experts"]
    tasks = ["EuroSAT", "GTSRB"]
    tau = jax.tree_util.tree_map(lambda b, *es: sum(e - b for e in es), base, *[experts[t] for t in tasks])
    val = {t: _split(setup, t, "validation", 8) for t in tasks}
    for label, boost in (("task_arithmetic", None), ("task_arithmetic+boost", (0.0, 0.01, 0.02))):
        cell = json.loads((first_run / "suite_EuroSAT,GTSRB" / f"{label}.json").read_text())
        scores = {}
        for beta in boost or (None,):
            tau_b = tau if beta is None else jax.device_get(sb.subspace_boost(tau, beta=beta))
            for alpha in (0.5, 1.0, 1.5):
                params = jax.tree_util.tree_map(lambda b, t: b + np.float32(alpha) * t, base, tau_b)
                accs = {t: head_accuracy(setup["heads"][t], features(params, *val[t][:1]), val[t][1]) for t in tasks}
                scores[alpha, beta] = np.mean(list(accs.values()))
                point = next(p for p in cell["sweep"]["points"] if p["alpha"] == alpha and p["beta"] == beta)
                assert point["accuracies"] == pytest.approx(accs)
        best = max(scores, key=scores.get)  # first maximum in (beta, alpha) order, like the search
        assert (cell["hyper_parameters"]["alpha"], cell["hyper_parameters"]["beta"]) == best
        assert cell["validation"]["selected_average"] == pytest.approx(scores[best])
        assert cell["alpha_on_grid_edge"] == (best[0] in (0.5, 1.5))
        # Test accuracy of the chosen model, and normalized accuracy against the experts.
        alpha, beta = best
        tau_b = tau if beta is None else jax.device_get(sb.subspace_boost(tau, beta=beta))
        params = jax.tree_util.tree_map(lambda b, t: b + np.float32(alpha) * t, base, tau_b)
        reference = json.loads((first_run / "reference.json").read_text())
        for t in tasks:
            images, labels = _split(setup, t, "test", 8)
            acc = head_accuracy(setup["heads"][t], features(params, images), labels)
            assert cell["test"]["per_task"][t] == pytest.approx(acc)
            expert_acc = head_accuracy(setup["heads"][t], features(experts[t], images), labels)
            assert reference["experts"][t]["test"] == pytest.approx(expert_acc) and expert_acc > 0
            assert cell["test"]["normalized"][t] == pytest.approx(acc / expert_acc)
        assert cell["test"]["average_normalized"] == pytest.approx(np.mean(list(cell["test"]["normalized"].values())))


def test_table(first_run):
    table = (first_run / "results.md").read_text()
    lines = table.splitlines()
    assert "| Method | PCAM,GTSRB abs | PCAM,GTSRB norm | EuroSAT,GTSRB abs | EuroSAT,GTSRB norm |" in lines
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and "---" not in line]
    assert rows == ["Method", "Zero-shot", "Task Arithmetic", "Task Arithmetic + Subspace Boosting", "Consensus TA",
                    "Fine-tuned experts"]
    cell = json.loads((first_run / "suite_PCAM,GTSRB" / "task_arithmetic.json").read_text())
    row = next(line for line in lines if line.startswith("| Task Arithmetic |"))
    values = [v.strip().rstrip("†") for v in row.strip("|").split("|")[1:]]
    assert values[0] == f"{100 * cell['test']['average_absolute']:.1f}"
    assert values[1] == f"{100 * cell['test']['average_normalized']:.1f}"
    experts = next(line for line in lines if line.startswith("| Fine-tuned experts |"))
    assert experts.count("100.0") == 2  # normalized accuracy of the experts themselves
    results = json.loads((first_run / "results.json").read_text())
    assert len(results["cells"]) == 6
    edge = any(c["alpha_on_grid_edge"] for c in results["cells"])
    assert ("† the chosen alpha lies on the edge" in table) == edge


def test_resume_skips_finished_cells_and_refuses_other_settings(setup, first_run, monkeypatch):
    out = first_run.parent.parent
    before = {p: p.read_text() for p in first_run.rglob("suite_*/*.json")}
    monkeypatch.setattr(run_suite.SuiteRun, "run_cell", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    monkeypatch.setattr(run_suite.SuiteRun, "expert", lambda *a, **k: pytest.fail("an expert was reloaded"))
    result = run_suite.run(config(), checkpoints=str(setup["ckpt"]), data_dir=str(setup["data_dir"]), out=str(out),
                           progress=False)
    assert {p: p.read_text() for p in first_run.rglob("suite_*/*.json")} == before
    assert result["table"] == (first_run / "results.md").read_text()
    # A config with fewer suites finds its cells (their settings name only their own tasks).
    subset = run_suite.run(config(suites=("PCAM,GTSRB",)), checkpoints=str(setup["ckpt"]),
                           data_dir=str(setup["data_dir"]), out=str(out), progress=False)
    assert "EuroSAT" not in subset["table"] and len(subset["cells"]) == 3
    changed = config()
    changed.methods[2]["alphas"] = (0.25, 0.5)
    with pytest.raises(FileExistsError, match=r"consensus.json was computed with other settings; pass --overwrite"):
        run_suite.run(changed, checkpoints=str(setup["ckpt"]), data_dir=str(setup["data_dir"]), out=str(out),
                      progress=False)


def test_reference_conventions(setup, tmp_path):
    """Default conventions: TALL lambdas at coefficient 1.0, alpha by normalized validation accuracy."""
    cfg = run_suite.load_config(CONFIG_FILE + ":suites=PCAM/GTSRB")
    assert (cfg.conventions, cfg.alpha_metric) == ("reference", "normalized")
    run_suite.run(cfg, checkpoints=str(setup["ckpt"]), data_dir=str(setup["data_dir"]), out=str(tmp_path),
                  progress=False)
    root = tmp_path / "random_tiny" / "tiny"
    experts = {t: v["validation"] for t, v in json.loads((root / "reference.json").read_text())["experts"].items()}
    consensus = json.loads((root / "suite_PCAM,GTSRB" / "consensus.json").read_text())
    assert consensus["conventions"] == "reference" and consensus["hyper_parameters"]["merge"]["tall_alpha"] == 1.0
    boosted = json.loads((root / "suite_PCAM,GTSRB" / "task_arithmetic+boost.json").read_text())
    assert boosted["alpha_metric"] == "normalized"
    for point in boosted["sweep"]["points"]:
        normalized = np.mean([point["accuracies"][t] / experts[t] for t in ("PCAM", "GTSRB")])
        assert point["score"] == pytest.approx(normalized)
    best = max(boosted["sweep"]["points"], key=lambda p: p["score"])
    assert boosted["validation"]["selected_average"] == pytest.approx(best["score"])
    if boosted["hyper_parameters"]["beta"] is not None:
        assert boosted["hyper_parameters"]["boost"]["attn_beta"] == 0.1
        assert boosted["hyper_parameters"]["boost"]["is_matrix"] == "boosted_matrix"


def test_interrupted_run_resumes_where_it_stopped(setup, tmp_path, monkeypatch):
    real = run_suite.SuiteRun.run_cell
    calls = []

    def crash_on_third(self, suite, entry, *args):
        calls.append((suite, entry["label"]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, suite, entry, *args)

    monkeypatch.setattr(run_suite.SuiteRun, "run_cell", crash_on_third)
    cfg = config(suites=("PCAM,GTSRB",))
    with pytest.raises(KeyboardInterrupt):
        run_suite.run(cfg, checkpoints=str(setup["ckpt"]), data_dir=str(setup["data_dir"]), out=str(tmp_path),
                      progress=False)
    done = sorted(p.name for p in tmp_path.rglob("suite_*/*.json"))
    assert done == ["task_arithmetic+boost.json", "task_arithmetic.json"]
    assert not list(tmp_path.rglob(".*.tmp"))  # nothing half-written
    calls.clear()
    run_suite.run(cfg, checkpoints=str(setup["ckpt"]), data_dir=str(setup["data_dir"]), out=str(tmp_path),
                  progress=False)
    assert calls == [("PCAM,GTSRB", "consensus")]


def test_bad_input(setup, tmp_path, capsys):
    ckpt, data_dir = str(setup["ckpt"]), str(setup["data_dir"])
    with pytest.raises(ValueError, match="unknown task 'Foo'; valid tasks: SUN397"):
        run_suite.run(config(suites=("PCAM,Foo",)), checkpoints=ckpt, data_dir=data_dir, out=str(tmp_path))
    # Missing local data: says where it looked and what to put there.
    with pytest.raises(FileNotFoundError, match=r"no directory '.*/empty/gtsrb/train'.*<split>/<class>/<image>"):
        run_suite.run(config(), checkpoints=ckpt, data_dir=str(tmp_path / "empty"), out=str(tmp_path))
    # A head whose class count disagrees with the dataset.
    bad = tmp_path / "ckpt"
    (bad / "heads").mkdir(parents=True)
    save_safetensors(setup["base"], bad / "zeroshot.safetensors")
    for task in TASKS:
        c = 3 if task == "PCAM" else sbdata.get_task(task).num_classes
        save_safetensors({"kernel": np.zeros((MODEL.embed_dim, c), np.float32), "bias": np.zeros(c, np.float32)},
                         bad / "heads" / f"{task}.safetensors")
    with pytest.raises(ValueError, match=r"head of task 'PCAM' has 3 classes .* but the dataset has 2 classes"):
        run_suite.run(config(), checkpoints=str(bad), data_dir=data_dir, out=str(tmp_path))
    # A missing expert checkpoint, through the command line: one line, exit code 2.
    argv = ["--config", CONFIG_FILE + ":suites=PCAM/GTSRB", "--checkpoints", str(tmp_path / "nowhere"),
            "--data_dir", data_dir, "--out", str(tmp_path / "o")]
    assert run_suite.main(argv) == 2
    assert "--checkpoints" in capsys.readouterr().err
    with pytest.raises(ValueError, match="config argument 'colour=red'"):
        run_suite.load_config(CONFIG_FILE + ":colour=red")
    with pytest.raises(ValueError, match="the config has no field 'nope'"):
        run_suite.load_config(CONFIG_FILE, ["nope=1"])
