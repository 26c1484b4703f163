"""The text suite's ``"real"`` task set: labelled sentences from `subboost.text_data`, not generated.

`REAL_TASKS` names the tasks in `subboost.text_data.tasks.TASK_NAMES` order (their classes are
the prepared files' own: a class with too few texts is dropped when the data are prepared).
`build_real_suite` loads the prepared task files (preparing them first, which needs the package
index, when the directory holds none), draws each task's seeded class-balanced splits
(`subboost.text_data.tasks.split_task`) and tokenises them like the generated suite.
"""

from __future__ import annotations

import os

import numpy as np

from subboost.errors import SubboostError
from subboost.bench.suites.text.generators import TextTask
from subboost.bench.suites.text.splits import TextSuite, tokenise_suite
from subboost.bench.suites.text.tokenize import SentenceTokenizer
from subboost.text_data.tasks import MANIFEST, TASK_SPECS, default_data_dir, load_tasks, prepare_tasks, split_task


def _not_generated(rng: np.random.Generator, label: int) -> str:
    raise SubboostError("the real text tasks are read from prepared files (build_real_suite), not generated.")


REAL_TASKS: tuple[TextTask, ...] = tuple(TextTask(s.name, s.classes, _not_generated, s.description) for s in TASK_SPECS)


def build_real_suite(num_tasks: int, tokenizer: SentenceTokenizer, *, train: int, val: int, test: int,
                     head_shots: int, max_length: int, seed: int,
                     data_dir: str | os.PathLike | None = None) -> TextSuite:
    """The first ``num_tasks`` real tasks as a `TextSuite` (deterministic in ``seed``).

    ``data_dir``: prepared task files (default `subboost.text_data.tasks.default_data_dir`);
    prepared there first if it holds no manifest.
    """
    data_dir = data_dir if data_dir is not None else default_data_dir()
    if not (os.path.isdir(data_dir) and os.path.isfile(os.path.join(data_dir, MANIFEST))):
        prepare_tasks(data_dir)
    loaded = load_tasks(data_dir, [t.name for t in REAL_TASKS[:num_tasks]])
    max_classes = max(t.num_classes for t in loaded)
    raw: dict[str, list[tuple[list[str], np.ndarray]]] = {"train": [], "val": [], "test": [], "heads": []}
    for task in loaded:
        splits = split_task(task, seed=seed, train=train, val=val, test=test, head_shots=head_shots)
        raw["train"].append(splits.train)
        raw["val"].append(splits.val)
        raw["test"].append(splits.test)
        sentences, _ = splits.heads
        sentences = sentences + sentences[:head_shots] * (max_classes - task.num_classes)  # padding rows, unused
        raw["heads"].append((sentences, np.repeat(np.arange(max_classes), head_shots).astype(np.int32)))
    tasks = tuple(TextTask(t.name, t.classes, _not_generated, t.description) for t in loaded)
    return tokenise_suite(tasks, raw, tokenizer, max_length=max_length)
