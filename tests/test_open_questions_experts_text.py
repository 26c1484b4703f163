"""Open questions 2 and 3 on the text suite: the 50-task text set, label noise for the text experts, and
tiny runs of `experiments.many_experts` and `experiments.noisy_experts` with ``--suite text`` (the first
block of all-MiniLM-L6-v2, a few training steps; the assertions are on the numbers)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from subboost.bench.cache import source_key  # noqa: E402
from subboost.bench.suites.text import finetune, generators, model, prototype_heads, splits, tokenize  # noqa: E402
from subboost.bench.suites.text.config import get_config  # noqa: E402
from subboost.bench.suites.text.generators import TASKS, generate  # noqa: E402
from subboost.bench.suites.text.splits import Split, TextSuite  # noqa: E402
from subboost.bench.suites.text.task_variants import (  # noqa: E402
    MANY_TASKS, VARIANTS, build_task_suite, find_phrase, task_set)

# A few steps of everything: seconds to train, enough for the experts to move.
SMALL = dict(train_per_task=64, val_per_task=16, test_per_task=32, head_shots=4, finetune_steps=20,
             steps_per_call=20, alphas=(0.5, 1.0, 2.0), betas=(0.0,))


@pytest.fixture(scope="module")
def tokenizer():
    from subboost.bench.suites.text.tokenize import SentenceTokenizer
    from subboost.bench.suites.text.weights import packaged_model_zip

    return SentenceTokenizer.from_zip(packaged_model_zip())


def test_standard_text_training_keys_are_those_from_before_the_new_options():
    modules = (generators, splits, model, finetune, prototype_heads, tokenize)
    for size in ("tiny", "default"):
        config = get_config(size)
        fields = {k: v for k, v in config.to_dict().items()
                  if k.startswith(("layers", "num_tasks", "train_", "finetune_", "head_", "max_length", "logit_",
                                   "steps_per_call")) and k != "finetune_label_noise"}
        assert config.training_key(0, "w") == source_key({"seed": 0, "weights": "w", "config": fields}, modules)
        assert config.training_key(0, "w") != dataclasses.replace(config, finetune_label_noise=0.2).training_key(0, "w")
        assert config.training_key(0, "w") != dataclasses.replace(config, task_set="many").training_key(0, "w")
    with pytest.raises(ValueError, match="finetune_label_noise"):
        get_config("tiny", finetune_label_noise=1.0)
    with pytest.raises(ValueError, match="task_set"):
        get_config("tiny", task_set="huge")
    with pytest.raises(ValueError, match="num_tasks"):
        get_config("tiny", num_tasks=13)
    assert get_config("tiny", task_set="many", num_tasks=50).num_tasks == 50


def test_many_text_tasks_are_fifty_distinct_readable_tasks():
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    assert len(MANY_TASKS) == 50 and MANY_TASKS[:12] == TASKS and task_set("standard") == TASKS
    assert len({t.name for t in MANY_TASKS}) == 50 and all(2 <= t.num_classes <= 4 for t in MANY_TASKS)
    assert len({t.classes for t in VARIANTS}) > 30  # different partitions, not one task repeated
    assert [t.stream for t in VARIANTS] == list(range(12, 50))  # each variant its own random streams
    assert all(t.stream is None for t in TASKS)  # the standard tasks' streams: their index in TASK_NAMES
    data = {t.name: [generate(t, n, seed=0, split=s) for n, s in ((400, "train"), (200, "test"))] for t in VARIANTS}
    for task in VARIANTS:
        (train, y_train), (test, y_test) = data[task.name]
        assert np.bincount(y_train).tolist() == [400 // task.num_classes + (c < 400 % task.num_classes)
                                                 for c in range(task.num_classes)]
        assert max(len(s.split()) for s in train) <= 12
        # The label is readable from the words: a bag-of-words linear classifier gets (nearly) every test sentence.
        words = CountVectorizer(ngram_range=(1, 2), token_pattern=r"\S+").fit(train)
        clf = LogisticRegression(C=100.0, max_iter=2000).fit(words.transform(train), y_train)
        assert clf.score(words.transform(test), y_test) >= 0.97, task.name
    with pytest.raises(ValueError, match="exactly one"):
        find_phrase("anna met ben".split(), generators.NAMES)


def test_number_and_nuisance_variants_follow_their_words():
    by_name = {t.name: t for t in VARIANTS}
    sentences, labels = generate(by_name["parity__number_mod3"], 60, seed=1, split="val")
    for s, y in zip(sentences, labels):
        n = next(generators.NUMBERS.index(w) + 1 for w in s.split() if w in generators.NUMBERS)
        assert y == (n - 1) % 3, s  # class 0: 1, 4, 7, ..
    sentences, labels = generate(by_name["topic__name_half"], 60, seed=1, split="val")
    for s, y in zip(sentences, labels):
        assert (generators.NAMES.index(s.split()[0]) >= 10) == bool(y), s
    sentences, labels = generate(by_name["daytime__morning_afternoon"], 60, seed=1, split="val")
    for s, y in zip(sentences, labels):
        late = any(p in s for p in generators.DAYTIMES[2] + generators.DAYTIMES[3])
        assert late == bool(y), s


def test_many_text_suite_keeps_the_standard_tasks_data(tokenizer):
    kwargs = dict(train=128, val=16, test=32, head_shots=4, max_length=16, seed=0)  # the tiny size's
    standard = build_task_suite("standard", 12, tokenizer, **kwargs)
    many = build_task_suite("many", 50, tokenizer, **kwargs)
    assert [t.name for t in many.tasks[:12]] == [t.name for t in standard.tasks]
    for split in ("train", "val", "test", "heads"):
        a, b = getattr(standard, split), getattr(many, split)
        assert b.sentences[:12] == a.sentences
        np.testing.assert_array_equal(b.labels[:12], a.labels)
        length = min(a.input_ids.shape[-1], b.input_ids.shape[-1])
        np.testing.assert_array_equal(b.input_ids[:12, :, :length], a.input_ids[..., :length])
    assert many.length == standard.length  # the variants' templates are the standard ones: no longer sentences
    assert len(set(many.train.sentences[12:])) == 38 and many.train.sentences[12] != many.train.sentences[0]


def test_text_label_noise_corrupts_the_training_labels_only():
    from subboost.bench.label_noise import corrupt_labels, with_label_noise

    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(600) % 3, (2, 1)).astype(np.int32)
    split = Split(rng.integers(0, 9, (2, 600, 5)), np.ones((2, 600, 5), np.int32), labels, ((),) * 2)
    suite = TextSuite(TASKS[:2], split, split, split, split, np.array([3, 3]), 5, 0)
    noisy = with_label_noise(suite, rate=0.4, seed=7)
    np.testing.assert_array_equal(noisy.train.labels, corrupt_labels(labels, np.array([3, 3]), rate=0.4, seed=7))
    assert abs(np.mean(noisy.train.labels != labels) - 0.4) < 0.05
    assert noisy.val is split and noisy.test is split and noisy.heads is split and noisy.train.input_ids is split.input_ids
    assert with_label_noise(suite, rate=0.0, seed=7) is suite


def test_noisy_experts_text_tiny_run(tmp_path):
    from experiments import noisy_experts

    configs = [noisy_experts.make_config("tiny", rate, suite="text", num_tasks=2, task_counts=(2,),
                                         methods=("task_arithmetic",), **SMALL) for rate in (0.0, 0.4)]
    results = noisy_experts.run(configs, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                                log=lambda _: None)
    assert results["suite"] == "text"
    clean, noisy = results["runs"]
    assert noisy["expert_mean"] < clean["expert_mean"] - 0.05  # wrong labels cost clean accuracy
    entry = noisy["settings"][0]["methods"]["task_arithmetic"]
    assert entry["gain"] == pytest.approx(entry["boosted"]["absolute"] - entry["plain"]["absolute"])
    alignment = entry["noise_alignment"]
    assert all(-1.0 <= v <= 1.0 for k, v in alignment.items() if k != "noise_over_clean_norm")
    assert alignment["plain_vs_noise"] > 0.05 and alignment["noise_over_clean_norm"] > 0.1
    assert clean["settings"][0]["methods"]["task_arithmetic"]["noise_alignment"]["plain_vs_clean"] == pytest.approx(1.0)
    assert "text suite" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "noisy_experts.png").stat().st_size > 10_000


def test_many_experts_text_tiny_run(tmp_path):
    from experiments import many_experts

    config = many_experts.make_config("tiny", suite="text", num_tasks=14, task_counts=(2, 14),
                                      methods=("task_arithmetic", "iso_c"), **SMALL)
    results = many_experts.run(config, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                               log=lambda _: None)
    assert results["suite"] == "text" and results["tasks"][12:] == [t.name for t in VARIANTS[:2]]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tasks"] == results["tasks"]
    width = 384
    for setting in results["settings"]:
        for method in ("task_arithmetic", "iso_c"):
            for variant in ("plain", "boosted"):
                entry = setting["methods"][method][variant]
                assert 1.0 <= entry["stable_rank"] <= width and 0.0 < entry["normalized"] < 2.0
        assert setting["methods"]["iso_c"]["plain"]["stable_rank"] > setting["methods"]["task_arithmetic"]["plain"]["stable_rank"]
    d = results["disagreement"]
    assert -1.0 < d["mean_cosine"] < 0.9 and d["same_family_pairs"] == 2  # topic / colour and their regroupings
    assert np.isfinite(results["trend_last_step"]["task_arithmetic"]["plain"])
    assert "| Iso-C + boost |" in (tmp_path / "out" / "results.md").read_text()
