"""Tests of the offline mini-benchmark (subboost.bench) and `subboost demo`.

The tiny pipeline runs once per module (trains, caches) and once more from the
cache; its results carry the quality bars the benchmark must meet by
construction: every expert clearly beats the pretrained model with heads on
its own task, the pretrained model is far from perfect, and the tables agree
with the JSON (normalized = absolute / expert accuracy, per task, averaged).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost.bench.suites.vision import config as bench_config
from subboost.bench.suites.vision import splits as bench_data
from subboost.bench.suites.vision import centroid_heads as bench_heads
from subboost.bench.suites.vision import generators as bench_tasks
from subboost.bench.suites.vision import evaluate as bench_eval
from subboost.bench.suites.vision.finetune import finetune_experts
from subboost.bench.suites.vision.keys import training_key
from subboost.bench.pipeline import RESULT_FILES, prepare_out_dir, run_benchmark
from subboost.bench.suites.vision.pretrain import chunk_sizes, pretrain
from subboost.bench.report import markdown_tables, percent
from subboost.bench.sweep import select
from subboost.cli import main as cli_main
from subboost.models.heads import heads_from_class_embeddings


# ----------------------------------------------------------------------------
# Task generators
# ----------------------------------------------------------------------------
def test_suite_has_twenty_distinct_tasks_in_one_input_space():
    assert len(bench_tasks.TASKS) >= 20
    assert len(set(bench_tasks.TASK_NAMES)) == len(bench_tasks.TASKS)
    assert all(2 <= t.num_classes <= bench_tasks.MAX_CLASSES for t in bench_tasks.TASKS)


@pytest.mark.parametrize("task", bench_tasks.TASKS, ids=bench_tasks.TASK_NAMES)
def test_generator_shapes_range_balance_and_determinism(task):
    n = 3 * task.num_classes
    images, labels = bench_tasks.generate(task, "val", n, seed=7)
    assert images.shape == (n, 16, 16, 3) and images.dtype == np.float32
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(labels, minlength=task.num_classes), np.full(task.num_classes, 3))
    again, again_labels = bench_tasks.generate(task, "val", n, seed=7)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    other, _ = bench_tasks.generate(task, "val", n, seed=8)
    test_split, _ = bench_tasks.generate(task, "test", n, seed=7)
    assert not np.array_equal(images, other) and not np.array_equal(images, test_split)
    clean, _ = bench_tasks.generate(task, "val", n, seed=7, noisy=False)
    noise = images - clean
    assert 0.3 * task.noise < noise.std() < 1.2 * task.noise


@pytest.mark.parametrize("task", bench_tasks.TASKS, ids=bench_tasks.TASK_NAMES)
def test_classes_differ_in_clean_images(task):
    """Class means of clean images differ: the label is visible in the pixels, not only in the name."""
    images, labels = bench_tasks.generate(task, "train", 40 * task.num_classes, seed=0, noisy=False)
    features = np.concatenate([images.reshape(len(images), -1), np.abs(np.diff(images, axis=1)).reshape(len(images), -1),
                               np.abs(np.diff(images, axis=2)).reshape(len(images), -1)], axis=1)
    means = np.stack([features[labels == c].mean(0) for c in range(task.num_classes)])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(task.num_classes, 1)]
    assert gaps.min() > 0.05


def test_sklearn_digit_pools_are_disjoint_and_cover_all_digits():
    pools = {s: set(bench_tasks.digit_pool(s).tolist()) for s in ("train", "val", "test")}
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"] and not pools["val"] & pools["test"]
    assert sum(len(p) for p in pools.values()) == 1797
    assert set(bench_tasks.digit_pool("pretrain").tolist()) == pools["train"]


def test_font_glyphs_are_distinct():
    bank = bench_tasks.glyphs("0123456789ABCDEFGHIJKLMNOPQRST").reshape(30, -1)
    distances = np.abs(bank[:, None] - bank[None]).sum(-1)
    assert distances[np.triu_indices(30, 1)].min() >= 2


def test_coarse_labels_pair_neighbouring_classes():
    task = bench_tasks.get_tasks(["sklearn_digits"])[0]
    np.testing.assert_array_equal(bench_tasks.coarse_labels(task, np.arange(10)), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    task = bench_tasks.get_tasks(["count"])[0]
    np.testing.assert_array_equal(bench_tasks.coarse_labels(task, np.arange(5)), [0, 0, 1, 1, 2])
    assert bench_tasks.num_coarse_labels(task) == 3
    mixture = bench_data.build_pretraining_mixture(bench_tasks.TASKS[:2], per_task=12, seed=0, progress=False)
    assert mixture.num_captions == 3 + 4  # shapes: 6 classes, stripes: 8
    np.testing.assert_array_equal(np.unique(mixture.captions), np.arange(7))


def test_domain_styles_are_fixed_per_task_orthogonal_and_keep_the_labels():
    amplitude = 0.12
    shapes, stripes = bench_tasks.get_tasks(["shapes", "stripes"])
    mixing, pattern = bench_tasks.domain_style("shapes", amplitude)
    np.testing.assert_allclose(mixing @ mixing.T, np.eye(3), atol=1e-12)
    assert pattern.shape == (16, 16, 3) and 0.3 * amplitude < np.abs(pattern).max() <= amplitude
    again = bench_tasks.domain_style("shapes", amplitude)
    np.testing.assert_array_equal(mixing, again[0])
    np.testing.assert_array_equal(pattern, again[1])
    assert not np.allclose(mixing, bench_tasks.domain_style("stripes", amplitude)[0])
    # A regrouped task (task_variants) keeps its parent's look.
    np.testing.assert_array_equal(pattern, bench_tasks.domain_style("shapes__pairs", amplitude)[1])
    # The style is the documented map of the clean images, applied before the noise; labels are unchanged.
    clean, labels = bench_tasks.generate(shapes, "val", 24, seed=3, noisy=False)
    styled, styled_labels = bench_tasks.generate(shapes, "val", 24, seed=3, noisy=False, style=amplitude)
    np.testing.assert_array_equal(labels, styled_labels)
    expected = np.clip(0.8 * (clean.astype(np.float64) - 0.5) @ mixing.T + 0.5 + pattern, 0.0, 1.0)
    np.testing.assert_allclose(styled, expected, atol=1e-6)
    noisy, _ = bench_tasks.generate(shapes, "val", 24, seed=3, style=amplitude)
    assert 0.3 * shapes.noise < (noisy - styled).std() < 1.2 * shapes.noise
    # Two tasks' looks differ in their mean colour: the domain is visible in every image.
    other, _ = bench_tasks.generate(stripes, "val", 24, seed=3, noisy=False, style=amplitude)
    plain_other, _ = bench_tasks.generate(stripes, "val", 24, seed=3, noisy=False)
    styled_gap = np.abs(styled.mean((0, 1, 2)) - other.mean((0, 1, 2))).max()
    assert styled_gap > 0.05 and not np.array_equal(other, plain_other)
    with pytest.raises(ValueError, match="style"):
        bench_tasks.generate(shapes, "val", 4, seed=0, style=1.5)


def test_get_tasks_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown task"):
        bench_tasks.get_tasks(["nope"])
    with pytest.raises(ValueError, match="number of tasks"):
        bench_tasks.get_tasks(0)
    with pytest.raises(ValueError, match="split"):
        bench_tasks.generate(bench_tasks.TASKS[0], "holdout", 4, seed=0)


def test_hsv_to_rgb_known_values():
    rgb = bench_tasks.hsv_to_rgb(np.array([0.0, 1 / 3, 2 / 3, 0.5]), np.ones(4), np.ones(4))
    np.testing.assert_allclose(rgb, [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], atol=1e-12)


def test_sample_bitmaps_identity_placement():
    bitmap = np.zeros((1, 4, 4))
    bitmap[0, 1, 2] = 1.0
    out = bench_tasks.sample_bitmaps(bitmap, centre=np.array([[8.0, 8.0]]), scale=np.ones((1, 2)))
    expected = np.zeros((16, 16))
    expected[7, 8] = 1.0  # bitmap centre (2, 2) lands on pixel boundary (8, 8)
    np.testing.assert_allclose(out[0], expected, atol=1e-12)


# ----------------------------------------------------------------------------
# Heads, sweep, evaluation
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_centroid_heads_match_heads_from_class_embeddings(rng):
    features = jnp.asarray(rng.standard_normal((2, 4, 3, 5)), jnp.float32)
    heads = bench_heads.centroid_heads(features, np.array([4, 3]), logit_scale=12.5)
    for t, classes in enumerate((4, 3)):
        expected = heads_from_class_embeddings(features[t, :classes], logit_scale=12.5)
        chex.assert_trees_all_close(heads["kernel"][t, :, :classes], expected["kernel"], rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(heads["bias"][t, :classes], expected["bias"])
    np.testing.assert_array_equal(heads["kernel"][1, :, 3], 0.0)
    assert float(heads["bias"][1, 3]) == bench_heads.PAD_BIAS
    logits = bench_heads.task_logits(jnp.asarray(rng.standard_normal((2, 6, 5)), jnp.float32), heads)
    assert logits.shape == (2, 6, 4)
    assert bool(jnp.all(jnp.argmax(logits[1], -1) < 3))


def _fake_evaluate(optimum: float, offset: float = 0.0):
    """Validation accuracy peaked at log(alpha) = log(optimum), for 2 tasks."""

    def evaluate(tau, alphas):
        score = offset + tau - 0.1 * np.abs(np.log2(np.asarray(alphas)) - np.log2(optimum))
        return np.stack([score, score], axis=1)

    return evaluate


def test_select_interior_refined_and_edges():
    alphas = bench_config.DEFAULT_ALPHAS
    interior = select(_fake_evaluate(0.16), {None: 0.0}, alphas=alphas)
    assert interior.alpha == pytest.approx(0.16) and not interior.alpha_on_edge and interior.evaluations == 12
    refined = select(_fake_evaluate(0.16 * 2**0.5), {None: 0.0}, alphas=alphas)
    assert refined.alpha == pytest.approx(0.16 * 2**0.5, rel=1e-6)
    low = select(_fake_evaluate(0.001), {None: 0.0}, alphas=alphas)
    high = select(_fake_evaluate(50.0), {None: 0.0}, alphas=alphas)
    assert low.alpha_on_edge and high.alpha_on_edge
    assert low.alpha == pytest.approx(0.01 * 2**-0.5, rel=1e-6)
    best = select(_fake_evaluate(0.32), {0.0: 0.0, 0.01: 0.5, 0.02: 0.5}, alphas=alphas)
    assert best.candidate == 0.01 and best.val_accuracy == pytest.approx(0.5)  # ties keep the first
    fixed = select(_fake_evaluate(0.32), {None: 0.0}, alphas=alphas, fixed_alpha=1.0)
    assert fixed.alpha == 1.0 and fixed.evaluations == 1 and not fixed.alpha_on_edge


def test_chunk_sizes():
    assert chunk_sizes(120, 50) == [50, 50, 20]
    assert chunk_sizes(100, 50) == [50, 50]
    with pytest.raises(ValueError):
        chunk_sizes(10, 0)


MICRO = bench_config.get_config(
    "tiny", num_tasks=3, task_counts=(2, 3), train_per_task=60, val_per_task=12, test_per_task=12,
    pretrain_per_task=40, pretrain_steps=6, pretrain_batch=16, pretrain_warmup=2, finetune_steps=6,
    finetune_batch=8, finetune_warmup=2, steps_per_call=4, eval_batch=16,
)


@pytest.fixture(scope="module")
def micro_models():
    tasks = bench_tasks.TASKS[: MICRO.num_tasks]
    data = bench_data.build_suite(tasks, train=MICRO.train_per_task, val=MICRO.val_per_task,
                                  test=MICRO.test_per_task, seed=0, progress=False)
    mixture = bench_data.build_pretraining_mixture(tasks, per_task=MICRO.pretrain_per_task, seed=0, progress=False)
    return data, mixture


@pytest.mark.slow
def test_training_is_deterministic_and_experts_are_independent(micro_models):
    data, mixture = micro_models
    first = pretrain(MICRO, mixture, seed=3, progress=False)
    second = pretrain(MICRO, mixture, seed=3, progress=False)
    chex.assert_trees_all_equal(first.encoder, second.encoder)
    assert first.losses == second.losses and len(first.losses) == 2
    from subboost.bench.suites.vision.model import make_encoder

    heads = bench_heads.build_heads(make_encoder(MICRO.model), first.encoder, data, shots=MICRO.head_shots,
                                    logit_scale=first.logit_scale, seed=3)
    experts, _ = finetune_experts(MICRO, first.encoder, data, heads, seed=3, progress=False)
    again, _ = finetune_experts(MICRO, first.encoder, data, heads, seed=3, progress=False)
    chex.assert_trees_all_equal(experts, again)
    # every expert moved away from the base, each differently
    deltas = [jax.tree_util.tree_map(lambda e, b, t=t: e[t] - b, experts, first.encoder) for t in range(3)]
    norms = [float(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(d))) for d in deltas]
    assert min(norms) > 0
    assert float(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(deltas[0]),
                                                              jax.tree_util.tree_leaves(deltas[1])))) > 0


@pytest.mark.slow
def test_evaluator_sweep_and_experts_agree_with_single_evaluations(micro_models, rng):
    data, _ = micro_models
    from subboost.bench.suites.vision.model import init_encoder

    static = {"model": MICRO.model, "batch": MICRO.eval_batch}
    base = init_encoder(MICRO.model, jax.random.key(0))
    tau = jax.tree_util.tree_map(lambda p: 0.3 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), base)
    heads = bench_heads.centroid_heads(jnp.asarray(rng.standard_normal((3, 10, 2, 16)), jnp.float32),
                                       data.num_classes, logit_scale=10.0)
    images, labels = jnp.asarray(data.val.images), jnp.asarray(data.val.labels)
    sweep = bench_eval.alpha_sweep(base, tau, [0.0, 0.5], images, labels, heads, **static)
    assert sweep.shape == (2, 3)
    np.testing.assert_allclose(sweep[0], bench_eval.accuracies(base, images, labels, heads, **static), atol=1e-6)
    moved = sb.apply_task_vector(base, tau, alpha=0.5)
    np.testing.assert_allclose(sweep[1], bench_eval.accuracies(moved, images, labels, heads, **static), atol=1e-6)
    # expert t on task t only
    stacked = jax.tree_util.tree_map(lambda b, m: jnp.stack([b, m, b]), base, moved)
    per_expert = np.asarray(bench_eval.expert_accuracies(stacked, images, labels, heads, **static))
    np.testing.assert_allclose(per_expert, [sweep[0][0], sweep[1][1], sweep[0][2]], atol=1e-6)
    # accuracy by hand for task 0 with an independent forward pass
    from subboost.bench.suites.vision.model import make_encoder

    features = make_encoder(MICRO.model)(base, images[0])
    logits = np.asarray(features / jnp.linalg.norm(features, axis=-1, keepdims=True) @ heads["kernel"][0] + heads["bias"][0])
    assert sweep[0][0] == pytest.approx(np.mean(logits.argmax(-1) == np.asarray(labels[0])), abs=1e-6)


def test_config_validation_and_training_key():
    with pytest.raises(ValueError, match="task_counts"):
        bench_config.get_config("tiny", task_counts=(4, 11))
    with pytest.raises(ValueError, match="unknown benchmark size"):
        bench_config.get_config("huge")
    tiny = bench_config.get_config("tiny")
    assert training_key(tiny, 0) == training_key(bench_config.get_config("tiny"), 0)
    assert training_key(tiny, 0) != training_key(tiny, 1)
    assert training_key(tiny, 0) == training_key(dataclasses.replace(tiny, alphas=(0.1, 1.0), eval_batch=64), 0)
    assert training_key(tiny, 0) != training_key(dataclasses.replace(tiny, finetune_lr=1e-4), 0)
    assert training_key(tiny, 0) != training_key(dataclasses.replace(tiny, domain_style=0.1), 0)
    with pytest.raises(ValueError, match="domain_style"):
        bench_config.get_config("tiny", domain_style=-0.1)
    assert training_key(tiny, 0) != training_key(dataclasses.replace(tiny, head_seed=None), 0)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="head_seed"):
            bench_config.get_config("tiny", head_seed=bad)
    # The shipped bases' sizes draw their heads with the base's seed; `wide` keeps its run-seed heads.
    assert [bench_config.get_config(s).head_seed for s in ("tiny", "default", "wide")] == [0, 0, None]


def test_heads_drawn_with_head_seed_are_the_same_for_every_run_seed():
    from subboost.bench.suites.vision.pipeline import head_draw

    tasks = bench_tasks.TASKS[: MICRO.num_tasks]
    suites = [bench_data.build_suite(tasks, train=MICRO.train_per_task, val=MICRO.val_per_task,
                                     test=MICRO.test_per_task, seed=s, progress=False) for s in (0, 1)]
    # head_seed 0: run seed 1 draws from seed 0's training split, the rest of its data stays its own
    seed, drawn = head_draw(MICRO, suites[1], seed=1)
    assert seed == 0
    np.testing.assert_array_equal(drawn.train.images, suites[0].train.images)
    np.testing.assert_array_equal(drawn.train.labels, suites[0].train.labels)
    assert drawn.test is suites[1].test and drawn.val is suites[1].val
    seed, drawn = head_draw(MICRO, suites[0], seed=0)
    assert seed == 0 and drawn is suites[0]
    # head_seed None: each run seed draws its own, and the draws differ
    own = dataclasses.replace(MICRO, head_seed=None)
    seed, drawn = head_draw(own, suites[1], seed=1)
    assert seed == 1 and drawn is suites[1]
    assert not np.array_equal(suites[0].train.images, suites[1].train.images)


@pytest.mark.slow
def test_base_file_round_trip_checksum_and_refusals(tmp_path):
    from subboost.bench.suites.vision import base as bench_base
    from subboost.bench.suites.vision.model import init_encoder

    encoder = init_encoder(MICRO.model, jax.random.key(1))
    path = tmp_path / "b.npz"
    digest = bench_base.save_base(path, encoder, 12.5)
    loaded, scale = bench_base.load_base(path, sha256=digest)
    chex.assert_trees_all_equal(loaded, jax.device_get(encoder))
    assert scale == 12.5
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        bench_base.save_base(path, encoder, 1.0)
    with pytest.raises(ValueError, match="SHA-256"):
        bench_base.load_base(path, sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="--pretrain-base"):
        bench_base.load_base(tmp_path / "missing.npz")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["default", "wide"])
def test_shipped_base_matches_its_checksum_and_its_model(size):
    from subboost.bench.suites.vision import base as bench_base
    from subboost.bench.suites.vision.model import init_encoder

    config = bench_config.get_config(size)
    assert config.base in bench_base.SHIPPED_BASES
    assert bench_base.base_path(config.base).stat().st_size <= 20 * 2**20
    encoder, scale = bench_base.load_shipped_base(config.base)
    expected = init_encoder(config.model, jax.random.key(0))
    chex.assert_trees_all_equal_shapes(encoder, jax.device_get(expected))
    assert 1.0 < scale <= 100.0
    assert training_key(config, 0) != training_key(dataclasses.replace(config, base=None), 0)


def test_prepare_out_dir_refuses_foreign_directories(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_out_dir(foreign)
    assert prepare_out_dir(foreign, overwrite=True) == foreign
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert prepare_out_dir(foreign) == foreign  # now marked as the demo's
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        prepare_out_dir(a_file)


def test_cli_demo_reports_user_errors(tmp_path, capsys):
    (tmp_path / "other.txt").write_text("x")
    assert cli_main(["demo", "--size", "tiny", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["demo", "--size", "tiny", "--seed", "-1", "--out", str(tmp_path / "new")]) == 2


# ----------------------------------------------------------------------------
# The tiny pipeline, end to end
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_bench_cache):
    out = tmp_path_factory.mktemp("demo")
    config = bench_config.get_config("tiny")
    cached = (tiny_bench_cache / training_key(config, 0) / "COMPLETE").is_file()  # the notebooks' tests may train first
    first = run_benchmark(config, seed=0, out_dir=out, cache_dir=tiny_bench_cache, progress=False, log=lambda _: None)
    second = run_benchmark(config, seed=0, out_dir=out, cache_dir=tiny_bench_cache, progress=False, log=lambda _: None)
    return config, out, first, second, cached


@pytest.mark.slow
def test_tiny_pipeline_writes_every_file(tiny_run):
    config, out, first, *_ = tiny_run
    for name in RESULT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "accuracy_vs_tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert [s["num_tasks"] for s in saved["settings"]] == list(config.task_counts)
    cache = Path(first["cache_dir"])
    assert cache.name == first["training_key"]
    assert (cache / "COMPLETE").is_file() and (cache / "base").is_dir()
    assert sorted(p.name for p in (cache / "experts").iterdir()) == sorted(bench_tasks.TASK_NAMES[: config.num_tasks])


@pytest.mark.slow
def test_tiny_quality_bars(tiny_run):
    """Every expert beats the pretrained model clearly on its own task; the pretrained model is far from perfect."""
    _, _, results, *_ = tiny_run
    pretrained = np.asarray(results["pretrained_test_accuracy"])
    experts = np.asarray(results["expert_test_accuracy"])
    chance = np.asarray([1 / t["num_classes"] for t in results["tasks"]])
    assert np.all(experts - pretrained >= 0.1), dict(zip(bench_tasks.TASK_NAMES, experts - pretrained))
    assert pretrained.mean() <= 0.75 * experts.mean()
    assert np.all(experts >= chance + 0.15)


@pytest.mark.slow
def test_tiny_tables_are_consistent_with_the_json(tiny_run):
    _, out, results, *_ = tiny_run
    experts = np.asarray(results["expert_test_accuracy"])
    pretrained = np.asarray(results["pretrained_test_accuracy"])
    table = (out / "results.md").read_text()
    methods = set(sb.available_methods())
    for setting in results["settings"]:
        k = setting["num_tasks"]
        assert setting["pretrained"]["normalized"] == pytest.approx(np.mean(pretrained[:k] / experts[:k]))
        assert setting["experts"]["absolute"] == pytest.approx(experts[:k].mean())
        assert set(setting["methods"]) == methods
        ran = 0
        for method, entry in setting["methods"].items():
            if entry["status"] != "ok":
                assert entry["reason"]
                continue
            ran += 1
            for variant in ("plain", "boosted"):
                v = entry[variant]
                test = np.asarray(v["test_accuracy"])
                assert test.shape == (k,)
                assert v["absolute"] == pytest.approx(test.mean())
                assert v["normalized"] == pytest.approx(np.mean(test / experts[:k]))
                assert f"{percent(v['absolute'])} ({percent(v['normalized'])})" in table
                assert v["stable_rank"] > 0
            assert entry["plain"]["beta"] is None and entry["boosted"]["beta"] in bench_config.DEFAULT_BETAS
            # boosting raises the stable rank of a merge that is not already flat
            if method in ("task_arithmetic", "ties"):
                assert entry["boosted"]["stable_rank"] > entry["plain"]["stable_rank"]
        assert ran >= 4
    row = re.search(r"^\| Task Arithmetic \|(.+)\|$", table, re.M)
    assert row and len(row.group(1).split("|")) == len(results["settings"])


@pytest.mark.slow
def test_tiny_experts_beat_the_pretrained_model_by_a_wide_margin(tiny_run):
    """Fact 1 of the calibration (issue 19): experts beat the pretrained model with heads clearly on average."""
    _, _, results, *_ = tiny_run
    gain = np.mean(results["expert_test_accuracy"]) - np.mean(results["pretrained_test_accuracy"])
    assert gain >= 0.15, gain


@pytest.mark.slow
def test_tiny_task_arithmetic_beats_pretrained_and_falls_with_more_experts(tiny_run):
    """Facts 2-3 in the same direction as CLIP: Task Arithmetic beats the pretrained model at the smallest
    task count, and its normalized accuracy falls as more experts are merged."""
    _, _, results, *_ = tiny_run
    first, last = results["settings"][0], results["settings"][-1]
    ta_first, ta_last = (s["methods"]["task_arithmetic"]["plain"] for s in (first, last))
    assert ta_first["normalized"] >= first["pretrained"]["normalized"] + 0.02, (ta_first, first["pretrained"])
    assert ta_last["normalized"] <= ta_first["normalized"] - 0.01, (ta_first["normalized"], ta_last["normalized"])


@pytest.mark.slow
def test_tiny_boost_sweep_and_regime_figures(tiny_run):
    config, out, results, *_ = tiny_run
    sweep = results["boost_sweep"]
    largest = results["settings"][-1]
    assert sweep["num_tasks"] == config.task_counts[-1] and sweep["betas"] == list(bench_config.SWEEP_BETAS)
    assert set(sweep["methods"]) == {"task_arithmetic", "ties"}
    for method, rows in sweep["methods"].items():
        assert [r["beta"] for r in rows] == sweep["betas"]
        cutoffs = [r["mean_cutoff_index"] for r in rows]
        assert cutoffs[0] == 0.0 and cutoffs == sorted(cutoffs) and cutoffs[-1] > cutoffs[0]
        ranks = [r["stable_rank"] for r in rows]
        assert ranks[0] > ranks[-1]  # beta = 0 flattens the spectrum, beta = 1 leaves it
        plain = largest["methods"][method]["plain"]
        assert ranks[-1] == pytest.approx(plain["stable_rank"], rel=1e-3)
        # beta = 1 is no boost: same choice of alpha, same accuracy as the plain merge (up to SVD round-off)
        assert rows[-1]["absolute"] == pytest.approx(plain["absolute"], abs=0.02)
        for r in rows:
            assert 0.0 <= r["absolute"] <= 1.0 and r["alpha"] > 0
    assert sweep["reference"]["iso_c"]["absolute"] == largest["methods"]["iso_c"]["plain"]["absolute"]
    regime = results["regime"]
    probe = np.asarray(regime["linear_probe_accuracy"])
    chance = np.asarray([1 / t["num_classes"] for t in results["tasks"]])
    assert probe.shape == (config.num_tasks,) and np.all(probe > chance)
    assert regime["probe_over_expert"] == pytest.approx(probe.mean() / np.mean(results["expert_test_accuracy"]))
    norms = np.asarray(regime["relative_norm"])
    assert norms.shape == (config.num_tasks,) and np.all((norms > 0) & (norms < 0.5))
    cos = np.asarray(regime["cosine_matrix"])
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-6)
    assert regime["mean_cosine"] == pytest.approx(cos[np.triu_indices(config.num_tasks, 1)].mean())
    table = (out / "results.md").read_text()
    assert "Boosting strength" in table and "linear probe" in table
    assert (out / "boost_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_same_seed_same_tables(tiny_run):
    _, _, first, second, cached = tiny_run
    assert first["cache_hit"] == cached and second["cache_hit"]
    assert markdown_tables(first) == markdown_tables(second)
