"""Open questions 2 and 3: the 50-task set, label noise, and tiny runs of
`experiments.many_experts` and `experiments.noisy_experts` (test-only configs: a few
dozen training steps, so each run trains in seconds; the assertions are on the numbers)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from subboost.bench.suites.vision import centroid_heads, finetune, generators, model, pretrain, splits
from subboost.bench.cache import source_key
from subboost.bench.suites.vision.keys import training_key
from subboost.bench.suites.vision.config import get_config
from subboost.bench.suites.vision.generators import MAX_CLASSES, TASKS, generate
from subboost.bench.label_noise import corrupt_labels
from subboost.bench.suites.vision.task_variants import MANY_TASKS, RULES, VARIANTS, partition, task_set

# A few dozen steps of everything: enough for the experts to learn something, seconds to train.
SMALL = dict(train_per_task=64, val_per_task=20, test_per_task=40, pretrain_per_task=64, pretrain_steps=30,
             pretrain_batch=64, finetune_steps=40, finetune_batch=16, steps_per_call=40, alphas=(0.1, 0.4, 1.6),
             betas=(0.0,), eval_batch=128)


def test_many_task_set_extends_the_standard_one_with_thirty_distinct_regroupings():
    assert len(MANY_TASKS) == 50 and MANY_TASKS[:20] == TASKS and task_set("standard") == TASKS
    assert len({t.name for t in MANY_TASKS}) == 50
    by_name = {t.name: t for t in TASKS}
    seen = set()
    for variant in VARIANTS:
        parent_name, rule = variant.name.split("__")
        parent = by_name[parent_name]
        groups = partition(rule, parent.num_classes)
        assert 2 <= variant.num_classes == len(groups) < parent.num_classes <= MAX_CLASSES
        assert sorted(c for g in groups for c in g) == list(range(parent.num_classes))  # a partition
        assert (parent_name, groups) not in seen
        seen.add((parent_name, groups))
    assert partition("parity", 8) == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert partition("halves", 8) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert partition("shifted", 8) == ((0, 7), (1, 2), (3, 4), (5, 6))
    assert partition("mirror", 5) == ((0, 4), (1, 3), (2,))
    assert set(RULES) == {"parity", "halves", "shifted", "mod3", "mirror"}
    with pytest.raises(ValueError, match="task_set"):
        task_set("huge")


def test_variant_images_come_from_the_parents_classes_of_their_group():
    variant = next(t for t in VARIANTS if t.name == "count__parity")  # classes {1,3,5} dots vs {2,4} dots
    images, labels = generate(variant, "test", 40, seed=0, noisy=False)
    parent_images, _ = generate(TASKS[4], "test", 40, seed=0, noisy=False)
    assert not np.allclose(images, parent_images)  # its own data stream
    # Count the dots by their bright pixels' connected blobs: parity of the count is the label.
    bright = images.max(-1) > 0.5  # dots: value >= 0.65 on a background of value <= 0.3
    from scipy import ndimage

    counts = np.array([ndimage.label(b)[1] for b in bright])
    np.testing.assert_array_equal((counts + 1) % 2, labels)  # 1, 3, 5 dots -> class 0


def test_standard_training_keys_are_those_from_before_the_new_options():
    modules = (generators, splits, model, pretrain, finetune, centroid_heads)
    for size in ("tiny", "default"):
        config = get_config(size)
        fields = {k: v for k, v in config.to_dict().items()
                  if k.startswith(("model", "num_tasks", "train_", "pretrain_", "finetune_", "head_",
                                   "steps_per_call", "base")) and k != "finetune_label_noise"}
        if config.base is not None:
            from subboost.bench.suites.vision.base import SHIPPED_BASES

            fields["base_sha256"] = SHIPPED_BASES[config.base]
        if config.domain_style:  # the default size's own looks enter the key as their amplitude
            fields["domain_style"] = config.domain_style
        assert training_key(config, 0) == source_key({"seed": 0, "config": fields}, modules)
        assert training_key(dataclasses.replace(config, finetune_label_noise=0.2), 0) != training_key(config, 0)
        assert training_key(dataclasses.replace(config, task_set="many"), 0) != training_key(config, 0)
    with pytest.raises(ValueError, match="finetune_label_noise"):
        get_config("tiny", finetune_label_noise=1.0)
    assert get_config("tiny", task_set="many", num_tasks=50).num_tasks == 50
    with pytest.raises(ValueError, match="num_tasks"):
        get_config("tiny", num_tasks=21)


def test_label_noise_flips_the_given_fraction_to_other_classes_deterministically():
    labels = np.tile(np.arange(4000) % 5, (2, 1)).astype(np.int32)
    classes = np.array([5, 5])
    noisy = corrupt_labels(labels, classes, rate=0.4, seed=3)
    flipped = noisy != labels
    assert abs(flipped.mean() - 0.4) < 0.03 and noisy.dtype == labels.dtype
    assert noisy.min() >= 0 and noisy.max() <= 4
    # Wrong labels are uniform over the other classes: each (true -> wrong) pair ~ 0.4 / 4 of a class's examples.
    pair = np.mean(noisy[labels == 0] == 1)
    assert abs(pair - 0.1) < 0.03
    np.testing.assert_array_equal(noisy, corrupt_labels(labels, classes, rate=0.4, seed=3))
    assert not np.array_equal(noisy, corrupt_labels(labels, classes, rate=0.4, seed=4))
    assert not np.array_equal(noisy[0], noisy[1])  # each task its own stream
    np.testing.assert_array_equal(corrupt_labels(labels, classes, rate=0.0, seed=3), labels)


def test_many_experts_tiny_run(tmp_path):
    from experiments import many_experts

    config = many_experts.make_config("tiny", num_tasks=21, task_counts=(2, 21), methods=("task_arithmetic", "iso_c"),
                                      **{**SMALL, "finetune_steps": 20, "steps_per_call": 20})
    results = many_experts.run(config, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tasks"][-1] == "shapes__parity"
    assert (tmp_path / "out" / "many_experts.png").stat().st_size > 10_000
    assert "| Iso-C + boost |" in (tmp_path / "out" / "results.md").read_text()
    for setting in results["settings"]:
        for method in ("task_arithmetic", "iso_c"):
            for variant in ("plain", "boosted"):
                entry = setting["methods"][method][variant]
                assert 1.0 <= entry["stable_rank"] <= 32.0  # tiny model: width 32
                assert 0.0 < entry["normalized"] < 2.0
        # Iso-C's flat spectrum has full stable rank; task arithmetic's merge does not.
        assert setting["methods"]["iso_c"]["plain"]["stable_rank"] > setting["methods"]["task_arithmetic"]["plain"]["stable_rank"]
    d = results["disagreement"]
    assert -1.0 < d["mean_cosine"] < 0.5 and d["same_family_pairs"] == 1  # shapes and shapes__parity
    assert np.isfinite(results["trend_last_step"]["task_arithmetic"]["plain"])


def test_noisy_experts_tiny_run(tmp_path):
    from experiments import noisy_experts

    configs = [noisy_experts.make_config("tiny", rate, num_tasks=2, task_counts=(2,), methods=("task_arithmetic",),
                                         **SMALL) for rate in (0.0, 0.8)]
    results = noisy_experts.run(configs, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    clean, noisy = results["runs"]
    assert clean["rate"] == 0.0 and noisy["rate"] == 0.8
    assert noisy["expert_mean"] < clean["expert_mean"] - 0.05  # wrong labels cost clean accuracy
    entry = noisy["settings"][0]["methods"]["task_arithmetic"]
    assert entry["gain"] == pytest.approx(entry["boosted"]["absolute"] - entry["plain"]["absolute"])
    assert entry["boosted"]["mean_cutoff_index"] >= 0.0
    alignment = entry["noise_alignment"]
    assert all(-1.0 <= v <= 1.0 for k, v in alignment.items() if k != "noise_over_clean_norm")
    assert alignment["plain_vs_noise"] > 0.05  # the noisy experts' merge does contain their noise
    assert clean["settings"][0]["methods"]["task_arithmetic"]["noise_alignment"]["plain_vs_clean"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "noisy_experts.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="configs\\[0\\]"):
        noisy_experts.run(configs[1:], out_dir=tmp_path / "other", cache_dir=tmp_path / "cache", progress=False)

