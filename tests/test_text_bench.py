"""The text suite: generated tasks, tokenisation, multi-beta boosting, the tiny run end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import subboost as sb

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from subboost.bench.suites.text import TASKS, generate, get_config  # noqa: E402
from subboost.bench.suites.text.tokenize import SentenceTokenizer  # noqa: E402
from subboost.bench.suites.text.weights import packaged_model_zip  # noqa: E402

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def tokenizer():
    return SentenceTokenizer.from_zip(packaged_model_zip())


# ----------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------
def test_tokenizer_batches_and_pads(tokenizer):
    enc = tokenizer.encode(["the cat", "hello there my friend", "a"], max_length=32)
    assert enc.input_ids.dtype == np.int32 and enc.input_ids.shape == (3, 6)  # longest: 4 words + CLS + SEP
    assert enc.attention_mask.sum(1).tolist() == [4, 6, 3]
    assert enc.truncated == 0
    for row, n in enumerate([4, 6, 3]):
        assert enc.input_ids[row, 0] == CLS and enc.input_ids[row, n - 1] == SEP
        assert (enc.input_ids[row, n:] == tokenizer.pad_id).all() and (enc.attention_mask[row, n:] == 0).all()
    same = tokenizer.encode(["hello there my friend"], max_length=32)
    np.testing.assert_array_equal(same.input_ids[0], enc.input_ids[1])  # batching does not change a row
    fixed = tokenizer.encode(["the cat"], max_length=32, pad_to=10)
    assert fixed.input_ids.shape == (1, 10) and fixed.attention_mask.sum() == 4


def test_tokenizer_truncates_and_keeps_sep(tokenizer):
    enc = tokenizer.encode(["one two three four five six seven", "short"], max_length=5)
    assert enc.input_ids.shape == (2, 5) and enc.truncated == 1
    assert enc.input_ids[0, 0] == CLS and enc.input_ids[0, 4] == SEP
    full = tokenizer.encode(["one two three four five six seven"], max_length=64)
    np.testing.assert_array_equal(enc.input_ids[0, :4], full.input_ids[0, :4])


def test_tokenizer_bad_input(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="not one string"):
        tokenizer.encode("a sentence", max_length=8)
    with pytest.raises(ValueError, match="empty"):
        tokenizer.encode([], max_length=8)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenizer.encode(["a"], max_length=1)
    with pytest.raises(ValueError, match="pad_to=2 is shorter"):
        tokenizer.encode(["the cat sat"], max_length=16, pad_to=2)
    with pytest.raises(TypeError, match=r"sentences \[1\] are not strings"):
        tokenizer.encode(["a", 3], max_length=8)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizers JSON"):
        SentenceTokenizer.from_file(bad)


# ----------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------
def test_tasks_are_deterministic_balanced_and_short(tokenizer):
    assert len(TASKS) >= 12 and len({t.name for t in TASKS}) == len(TASKS)
    for task in TASKS:
        sentences, labels = generate(task, 60, seed=3, split="train")
        again, labels_again = generate(task, 60, seed=3, split="train")
        assert sentences == again and (labels == labels_again).all()
        assert np.bincount(labels, minlength=task.num_classes).tolist() == [60 // task.num_classes] * task.num_classes
        other, _ = generate(task, 60, seed=3, split="test")
        assert sentences != other
        assert max(len(s.split()) for s in sentences) <= 12
        assert tokenizer.encode(sentences, max_length=64).input_ids.shape[1] <= 16


def test_task_labels_follow_their_words():
    by_name = {t.name: t for t in TASKS}
    numbers = {w: i + 1 for i, w in enumerate(("one two three four five six seven eight nine ten eleven twelve "
                                                 "thirteen fourteen fifteen sixteen seventeen eighteen nineteen "
                                                 "twenty").split())}
    sentences, labels = generate(by_name["parity"], 40, seed=0, split="val")
    for s, y in zip(sentences, labels):
        n = next(numbers[w] for w in s.split() if w in numbers)
        assert y == n % 2, s  # 0 = even, 1 = odd
    sentences, labels = generate(by_name["negation"], 40, seed=0, split="val")
    for s, y in zip(sentences, labels):
        assert (" not " in s or " never " in s) == bool(y), s
    sentences, labels = generate(by_name["question"], 40, seed=0, split="val")
    for s, y in zip(sentences, labels):
        assert s.startswith("is ") == bool(y), s


# ----------------------------------------------------------------------------
# The harness's boost candidates on a BERT task vector
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_boost_candidates_equal_subspace_boost_on_bert():
    from subboost.bench.pipeline import boost_candidates, boosted_stable_rank, mean_stable_rank
    from subboost.models.bert import BertConfig, init_params

    cfg = BertConfig(vocab_size=20, width=16, layers=2, heads=4, mlp_dim=24, max_positions=8)
    tau = init_params(cfg, jax.random.key(3))["encoder"]
    betas = (0.0, 0.01, 0.2, 0.5)
    candidates, equivalent, cutoffs = boost_candidates(tau, betas, sb.spectra(tau))
    assert equivalent[0.0] == [0.0, 0.01]  # k = 0 for both on a 16-wide random matrix
    assert set(candidates) == {0.0, 0.2, 0.5} and cutoffs[0.5].mean() > cutoffs[0.2].mean() > 0
    for beta, boosted in candidates.items():
        reference = sb.subspace_boost(tau, beta=beta)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), boosted, reference)
        assert boosted_stable_rank(sb.spectra(tau), beta) == pytest.approx(mean_stable_rank(sb.spectra(reference)),
                                                                           rel=1e-4)


# ----------------------------------------------------------------------------
# The tiny suite end to end
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_text_suite_end_to_end(tmp_path):
    from subboost.bench import run_benchmark

    config = get_config("tiny")
    results = run_benchmark(config, seed=0, out_dir=tmp_path / "out", progress=False, log=lambda _: None)
    for name in ("results.json", "results.md", "accuracy_vs_tasks.png", "stable_rank_vs_tasks.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"] == results["settings"]
    pretrained = np.array(results["pretrained_test_accuracy"])
    experts = np.array(results["expert_test_accuracy"])
    assert pretrained.shape == experts.shape == (config.num_tasks,)
    assert experts.mean() >= pretrained.mean() + 0.15  # fine-tuning helps clearly
    assert (experts >= pretrained - 1 / config.test_per_task).all()  # no task worse by more than one sentence
    regime = results["regime"]
    assert 0 < regime["relative_norm_mean"] < 0.2 and -1 <= regime["cosine_mean"] <= regime["cosine_max"] <= 1
    assert list(regime["sum"]) == [str(k) for k in config.task_counts]
    assert [s["num_tasks"] for s in results["settings"]] == list(config.task_counts)
    for setting in results["settings"]:
        ok = {m: e for m, e in setting["methods"].items() if e["status"] == "ok"}
        assert set(ok) == {"task_arithmetic", "ties", "tsv", "iso_c"}
        for method, entry in ok.items():
            for variant in ("plain", "boosted"):
                acc = np.array(entry[variant]["test_accuracy"])
                assert acc.shape == (setting["num_tasks"],) and ((0 <= acc) & (acc <= 1)).all()
                assert entry[variant]["normalized"] == pytest.approx(np.mean(acc / experts[: setting["num_tasks"]]))
            assert entry["boosted"]["beta"] in config.betas
            # Boosting raises small singular values: the stable rank cannot drop.
            assert entry["boosted"]["stable_rank"] >= entry["plain"]["stable_rank"] - 1e-3
        ta = ok["task_arithmetic"]["plain"]
        assert ta["absolute"] > setting["pretrained"]["absolute"]  # merging beats no fine-tuning
    report = (tmp_path / "out" / "results.md").read_text()
    assert "Task Arithmetic + boost" in report and "boosting cutoff k at beta 0.02" in report
    # Second run (one method, to stay quick): the cached heads and experts are reused, same numbers.
    again = run_benchmark(get_config("tiny", methods=("task_arithmetic",)), seed=0, out_dir=tmp_path / "out",
                          progress=False, log=lambda _: None)
    assert again["cache_hit"] and not results["cache_hit"]
    assert again["settings"][0]["methods"]["task_arithmetic"] == results["settings"][0]["methods"]["task_arithmetic"]


def test_demo_cli_dispatches_text_suite(tmp_path, capsys):
    from subboost.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--suite", "text", "--size", "tiny", "--out", str(tmp_path)]) == 2
    assert "did not create" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="unknown text-suite size"):
        get_config("huge")


def test_text_demo_never_replaces_a_users_result_files(tmp_path):
    from subboost.bench import run_benchmark

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "results.md").write_text("my notes")
    with pytest.raises(FileExistsError, match="results.md"):
        run_benchmark(get_config("tiny"), out_dir=foreign, overwrite=True, progress=False)
    assert (foreign / "results.md").read_text() == "my notes"
    assert sorted(p.name for p in foreign.iterdir()) == ["results.md"]
