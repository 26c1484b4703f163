"""subboost.evaluation: metrics, batched evaluation, the alpha/beta search, TALL lambdas, `subboost eval`."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import evaluation as sbeval
from subboost.errors import SubboostError
from subboost.evaluation import evaluator as evaluator_module
from subboost.data.preprocessing import normalize_images_np
from subboost.models import CLIPVisionTransformer, get_config, param_shapes

CONFIG = get_config("tiny")
N = 13  # examples per test split: not a multiple of the batch sizes used


def random_params(config, seed=0):
    """Random encoder parameters from numpy (no compiled initialiser: fast on a busy CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: np.ones(s.shape, np.float32) if "scale" in str(path[-1])
        else (0.2 * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(config))


@pytest.fixture(scope="module")
def model():
    """Tiny random CLIP ViT, three heads, and a reference forward pass in numpy-land."""
    params = random_params(CONFIG)
    rng = np.random.default_rng(0)
    heads = {name: {"kernel": rng.standard_normal((CONFIG.embed_dim, c)).astype(np.float32),
                    "bias": rng.standard_normal(c).astype(np.float32)}
             for name, c in (("MNIST", 10), ("PCAM", 2), ("DTD", 47))}

    encode = jax.jit(lambda p, x: CLIPVisionTransformer(CONFIG).apply({"params": p}, x))

    def predict(p, task, images):  # independent of Evaluator: one unbatched call, numpy head
        feats = np.asarray(encode(p, jnp.asarray(normalize_images_np(images))))
        feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
        return np.argmax(feats @ heads[task]["kernel"] + heads[task]["bias"], axis=-1)

    return params, heads, predict


def _images(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, CONFIG.image_size, CONFIG.image_size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------
def test_summarize_hand_computed():
    s = sbeval.summarize({"A": 0.5, "B": 0.9, "C": 0.3}, {"A": 0.8, "B": 0.9, "C": 0.6, "D": 1.0})
    assert s["average_absolute"] == pytest.approx((0.5 + 0.9 + 0.3) / 3)
    assert s["normalized"] == pytest.approx({"A": 0.625, "B": 1.0, "C": 0.5})
    assert s["average_normalized"] == pytest.approx((0.625 + 1.0 + 0.5) / 3)
    assert "normalized" not in sbeval.summarize({"A": 0.5})


def test_normalized_accuracy_bad_input():
    with pytest.raises(SubboostError, match=r"expert accuracy of task\(s\) \['B'\]; got experts for \['A'\]"):
        sbeval.normalized_accuracies({"A": 0.5, "B": 0.5}, {"A": 1.0})
    with pytest.raises(SubboostError, match=r"expert accuracy of task\(s\) \['A'\] is 0"):
        sbeval.normalized_accuracies({"A": 0.5}, {"A": 0.0})


def test_alpha_grids():
    assert sbeval.alpha_grid("ties") == pytest.approx(np.arange(1, 11) / 10)
    assert sbeval.alpha_grid("consensus") == sbeval.alpha_grid("task_arithmetic") == sbeval.LINEAR_ALPHAS
    for method in ("tsv", "iso_c", "iso_cts"):
        assert sbeval.alpha_grid(method) == pytest.approx(np.arange(1, 31) / 10)
    assert sbeval.alpha_grid("weight_averaging") == (1.0,)
    assert sbeval.BETAS == (0.0, 0.01, 0.02)


# ----------------------------------------------------------------------------
# Evaluator
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [4, 16])
@pytest.mark.slow
def test_accuracy_against_an_independent_forward_pass(model, batch_size):
    params, heads, predict = model
    images = _images(N)
    predicted = predict(params, "MNIST", images)
    # Labels: the prediction for 7 examples, something else for 6: accuracy must be exactly 7/13.
    labels = np.where(np.arange(N) < 7, predicted, (predicted + 1) % 10).astype(np.int32)
    ev = sbeval.Evaluator.for_clip(CONFIG, heads, batch_size=batch_size)
    assert ev.accuracy(params, "MNIST", (images, labels)) == pytest.approx(7 / 13)
    stream = [(images[:5], labels[:5]), (images[5:], labels[5:])]  # host batches of other sizes
    assert ev.accuracy(params, "MNIST", stream) == pytest.approx(7 / 13)
    split = ev.prepare("MNIST", images, labels)
    assert split.num_examples == N and len(split.images) == -(-N // batch_size)
    assert ev.accuracy(params, "MNIST", split) == pytest.approx(7 / 13)


def test_one_compiled_encoder_for_all_tasks_and_parameters(model, monkeypatch):
    params, heads, predict = model
    clip = CLIPVisionTransformer(CONFIG)
    # Traced once: every task, every parameter set and every evaluator of this encoder share one program.
    encode = chex.assert_max_traces(lambda p, x: clip.apply({"params": p}, x), n=1)
    # One head program per class count (3 here), reused by every later call.
    monkeypatch.setattr(evaluator_module, "ClassificationHead",
                        chex.assert_max_traces(evaluator_module.ClassificationHead, n=3))
    ev = sbeval.Evaluator(encode, heads, batch_size=4)
    splits = {}
    for i, task in enumerate(("MNIST", "PCAM", "DTD")):
        images = _images(N, seed=i)
        labels = predict(params, task, images).astype(np.int32)
        splits[task] = ev.prepare(task, images, labels)
    assert ev.accuracies(params, splits) == {"MNIST": 1.0, "PCAM": 1.0, "DTD": 1.0}
    # New parameters (the next sweep point), a new evaluator of the same model: nothing is traced again.
    shifted = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    sbeval.Evaluator(encode, heads, batch_size=4).accuracies(shifted, splits)


def test_head_class_count_must_match_dataset(model):
    _, heads, _ = model
    with pytest.raises(SubboostError, match=r"head of task 'PCAM' has 2 classes \(kernel shape \(16, 2\)\), "
                                         r"but the dataset has 7 classes"):
        sbeval.Evaluator.for_clip(CONFIG, heads, num_classes={"PCAM": 7})
    ev = sbeval.Evaluator.for_clip(CONFIG, heads, num_classes={"PCAM": 2, "MNIST": 10})
    with pytest.raises(SubboostError, match=r"labels span 0..5, but the head has 2 classes"):
        ev.prepare("PCAM", _images(2), np.array([0, 5]))
    with pytest.raises(SubboostError, match=r"no head for task 'Cars'; heads exist for \['DTD', 'MNIST', 'PCAM'\]"):
        ev.accuracy(None, "Cars", (_images(1), np.zeros(1, np.int32)))
    with pytest.raises(SubboostError, match="must be ClassificationHead parameters"):
        sbeval.Evaluator.for_clip(CONFIG, {"MNIST": {"w": np.zeros((16, 10))}})
    with pytest.raises(SubboostError, match=r"kernel \(16, 10\) and bias \(9,\)"):
        sbeval.Evaluator.for_clip(CONFIG, {"MNIST": {"kernel": np.zeros((16, 10)), "bias": np.zeros(9)}})
    with pytest.raises(SubboostError, match="2 images but 3 labels"):
        ev.prepare("MNIST", _images(2), np.zeros(3, np.int32))


# ----------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------
def _tree(rng, scale=1.0):
    return {"block": {"kernel": jnp.asarray(scale * rng.standard_normal((6, 5)), jnp.float32),
                      "bias": jnp.asarray(scale * rng.standard_normal(5), jnp.float32)}}


def test_search_picks_the_best_validation_point_and_boosts_once(monkeypatch):
    rng = np.random.default_rng(0)
    base, tau = _tree(rng), _tree(rng, 0.3)
    target = sb.apply_task_vector(base, sb.subspace_boost(tau, beta=0.0), alpha=0.7)

    def evaluate(params):  # a smooth score peaked at the boosted model with alpha = 0.7
        d = float(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                            jax.tree_util.tree_leaves(target))))
        return {"A": 1 / (1 + d), "B": 1 / (1 + 2 * d)}

    seen = []
    recording = lambda params: seen.append(params) or evaluate(params)  # noqa: E731
    calls = []
    real_boost, real_sweep = sb.boosting.subspace_boost, sb.boosting.subspace_boost_sweep
    monkeypatch.setattr(sb.boosting, "subspace_boost_sweep",
                        lambda *a, **k: calls.append(k["betas"]) or real_sweep(*a, **k))
    alphas, betas = sbeval.LINEAR_ALPHAS, (None, 0.0, 0.01, 0.02)
    result = sbeval.select_alpha_beta(base, tau, recording, alphas=alphas, betas=betas, progress=False)
    assert calls == [(0.0, 0.01, 0.02)]  # every beta boosted from one SVD per matrix, none per alpha
    # Reusing one boost across alphas is exact: theta_0 + alpha boost(tau) = theta_0 + boost(alpha tau).
    for index, (alpha, beta) in ((12, (0.3, 0.0)), (39, (1.0, 0.02))):
        chex.assert_trees_all_close(seen[index], sb.apply_task_vector(base, real_boost(
            jax.tree_util.tree_map(lambda x: alpha * x, tau), beta=beta)), rtol=1e-5, atol=1e-6)
    # Explicit computation of every grid point.
    scores = {}
    for beta in betas:
        boosted = tau if beta is None else real_boost(tau, beta=beta)
        for alpha in alphas:
            accs = evaluate(sb.apply_task_vector(base, boosted, alpha=alpha))
            scores[alpha, beta] = (accs["A"] + accs["B"]) / 2
    best = max(scores, key=scores.get)
    # 6x5 matrices: every beta in the grid cuts at s_0, so the betas tie and the first one wins.
    assert (result.alpha, result.beta) == best == (0.7, 0.0)
    assert result.score == pytest.approx(scores[best])
    assert len(result.points) == 40 and not result.alpha_on_edge
    for p in result.points:
        assert p.score == pytest.approx(scores[p.alpha, p.beta], rel=1e-6)
    record = result.to_json()
    assert record["alpha"] == 0.7 and record["alpha_on_grid_edge"] is False and len(record["points"]) == 40
    json.dumps(record)


def test_search_ties_edges_and_bad_grids():
    base = {"w": jnp.zeros((2, 2))}
    tau = {"w": jnp.eye(2)}
    flat = sbeval.select_alpha_beta(base, tau, lambda p: {"A": 0.5}, alphas=(0.1, 0.2, 0.3), progress=False)
    assert flat.alpha == 0.1 and flat.alpha_on_edge  # ties go to the first point, which is on the edge
    rising = sbeval.select_alpha_beta(base, tau, lambda p: {"A": float(p["w"][0, 0])}, alphas=(0.1, 0.2, 0.3), progress=False)
    assert rising.alpha == 0.3 and rising.alpha_on_edge
    single = sbeval.select_alpha_beta(base, tau, lambda p: {"A": 0.5}, alphas=(1.0,), progress=False)
    assert not single.alpha_on_edge
    with pytest.raises(SubboostError, match="alpha grid is empty"):
        sbeval.select_alpha_beta(base, tau, lambda p: {"A": 0.5}, alphas=(), progress=False)
    with pytest.raises(SubboostError, match="alphas must be positive"):
        sbeval.select_alpha_beta(base, tau, lambda p: {"A": 0.5}, alphas=(0.0, 0.1), progress=False)
    with pytest.raises(SubboostError, match="repeats values"):
        sbeval.select_alpha_beta(base, tau, lambda p: {"A": 0.5}, alphas=(0.1, 0.1), progress=False)
    with pytest.raises(SubboostError, match="score at alpha=0.1, beta=None is nan"):
        sbeval.select_alpha_beta(base, tau, lambda p: {"A": float("nan")}, alphas=(0.1,), progress=False)


def test_tune_tall_lambdas_against_explicit_masks():
    rng = np.random.default_rng(3)
    base = {"w": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)}
    tvs = {"w": jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)}
    targets = [5, 12, 20]  # task t prefers a mask keeping about targets[t] entries

    def evaluate_task(params, t):
        return -abs(int(jnp.sum(params["w"] != base["w"])) - targets[t])

    alpha, grid = 0.4, (0.2, 0.4, 0.6, 0.8)
    lambdas = sbeval.tune_tall_lambdas(base, tvs, evaluate_task, alpha=alpha, lambdas=grid, progress=False)
    x = np.asarray(tvs["w"])
    total = x.sum(0)
    expected = []
    for t in range(3):
        scores = []
        for lam in grid:
            mask = np.abs(x[t]) > lam * np.abs(total - x[t])
            scores.append(-abs(int(np.sum(alpha * mask * total != 0)) - targets[t]))
        expected.append(grid[int(np.argmax(scores))])
    assert lambdas == tuple(expected)
    assert len(set(lambdas)) > 1  # the targets really pull the tasks apart


# ----------------------------------------------------------------------------
# Checkpoints by task name, encoder config, and the `subboost eval` command
# ----------------------------------------------------------------------------
def test_encoder_config_and_find_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"heads/Cars'.*Cars.safetensors.*task Cars"):
        sbeval.find_checkpoint(tmp_path, "heads/{task}", "Cars")
    assert sbeval.encoder_config("tiny") == CONFIG
    with pytest.raises(SubboostError, match="records no architecture"):
        sbeval.encoder_config(None, tmp_path)
    # A converted checkpoint's recorded architecture wins (an open_clip LAION tower uses exact GELU).
    import dataclasses

    recorded = dataclasses.replace(CONFIG, act="gelu")
    (tmp_path / "subboost.json").write_text(json.dumps({"kind": "clip_vision", "architecture": recorded.to_dict()}))
    assert sbeval.encoder_config(None, tmp_path) == recorded
    assert sbeval.encoder_config("tiny", tmp_path) == recorded
    with pytest.raises(SubboostError, match="not ViT-B/32"):
        sbeval.encoder_config("ViT-B/32", tmp_path)


@pytest.mark.slow
def test_eval_command(model, tmp_path, capsys, monkeypatch):
    from subboost.cli import main
    from subboost.streaming import save_safetensors

    params, heads, predict = model
    save_safetensors(params, tmp_path / "enc.safetensors")
    (tmp_path / "heads").mkdir()
    for task in ("MNIST", "PCAM"):
        save_safetensors(heads[task], tmp_path / "heads" / f"{task}.safetensors")
    images = {t: _images(N, seed=i) for i, t in enumerate(("MNIST", "PCAM"))}
    labels = {"MNIST": predict(params, "MNIST", images["MNIST"]),  # all right
              "PCAM": 1 - predict(params, "PCAM", images["PCAM"])}  # all wrong

    def fake_batches(task, split, *, batch_size, **kwargs):
        assert split == "validation" and kwargs["image_size"] == CONFIG.image_size
        return iter([(images[task], labels[task].astype(np.int32))])

    monkeypatch.setattr("subboost.data.numpy_batches", fake_batches)
    (tmp_path / "experts.json").write_text(json.dumps({"MNIST": 0.5, "PCAM": 0.8}))
    argv = ["eval", str(tmp_path / "enc.safetensors"), "--backbone", "tiny", "--heads", str(tmp_path / "heads"),
            "--tasks", "mnist,pcam", "--split", "validation", "--experts", str(tmp_path / "experts.json"),
            "--out", str(tmp_path / "out.json")]
    assert main(argv) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["per_task"] == {"MNIST": 1.0, "PCAM": 0.0} and out["average_absolute"] == 0.5
    assert out["normalized"] == {"MNIST": 2.0, "PCAM": 0.0} and out["average_normalized"] == 1.0
    assert "| MNIST | 100.00 | 200.00 |" in capsys.readouterr().out
    assert main(argv) == 2  # refuses to overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(argv[:6] + ["--tasks", "Imagenet"]) == 2
    assert "unknown task 'Imagenet'; valid tasks: SUN397" in capsys.readouterr().err
    assert main(argv[:4] + ["--heads", str(tmp_path), "--tasks", "MNIST"]) == 2
    assert "MNIST.safetensors" in capsys.readouterr().err
