"""The text suite's task sets: ``"standard"`` (the 12 tasks of `generators.TASKS`) and ``"many"`` (50 tasks).

``"many"`` keeps the 12 standard tasks first, in their order (a prefix of 4, 8 or 12
tasks is exactly the standard suite, with the same sentences), then adds 38 variants
named ``<parent>__<rule>``, each drawing its sentences from a standard task's template:

* **regroupings** of a 3- or 4-class task's classes (`regrouped`): ``topic``, ``colour``
  and ``daytime`` in pairs of classes (e.g. ``daytime__day_night``: morning or afternoon
  vs evening or night) and one class against the rest; ``tense`` and ``person`` one
  class against the rest. The sentence shows a parent class drawn uniformly from the
  label's group, so the label is read off the same words as the parent's label.
* **swaps** (`swapped`): the parent's sentence (of a random parent class) with the one
  phrase it has from a word list replaced by a phrase from the label's group of that
  list: the written-out number of the ``parity`` sentences (mod 3, mod 4, 1-10 vs 11-20,
  quarters), and the *nuisance* content every sentence carries and the standard tasks
  must ignore: the name (halves, odd/even position, quarters of `generators.NAMES`), the
  thing (`generators.THINGS`), the place (`generators.PLACES` by alternate position, so
  each group is half indoor, half outdoor) and the time (`generators.TIMES`).

Why these experts disagree: a regrouping asks the encoder to merge classes its parent
separates (``topic__sports_food`` maps sports and food sentences together), and a swap
asks it to separate sentences by exactly the words every standard task must be invariant
to. The run measures it (`experiments.many_experts`: pairwise task-vector cosines).

Data streams: `generators.generate` seeds each standard task's stream with its index in
`generators.TASK_NAMES`; variant ``j`` carries ``TextTask.stream = 12 + j``, so every
variant has its own stream and the standard tasks' sentences are those of the standard suite.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from subboost.bench.settings import named_task_set
from subboost.bench.suites.text.generators import NAMES, NUMBERS, PLACES, TASKS, THINGS, TIMES, TextTask
from subboost.bench.suites.text.real_tasks import REAL_TASKS, build_real_suite
from subboost.bench.suites.text.splits import TextSuite, build_suite

_BY_NAME = {t.name: t for t in TASKS}


def regrouped(parent: str, rule: str, groups: Sequence[Sequence[int]]) -> TextTask:
    """``parent``'s sentences labelled by the group of their class: class ``k`` shows a parent class drawn
    uniformly from ``groups[k]`` (a partition of the parent's classes)."""
    task = _BY_NAME[parent]
    members = [tuple(g) for g in groups]
    if sorted(c for g in members for c in g) != list(range(task.num_classes)) or len(members) < 2:
        raise ValueError(f"regrouped({parent!r}, {rule!r}): groups {groups} do not partition its "
                         f"{task.num_classes} classes into two or more groups.")

    def render(rng: np.random.Generator, label: int) -> str:
        group = members[label]
        return task.render(rng, group[int(rng.integers(len(group)))])

    names = tuple("+".join(task.classes[c] for c in g) for g in members)
    return TextTask(f"{parent}__{rule}", names, render, f"{task.description}, classes grouped as {' / '.join(names)}")


def find_phrase(words: Sequence[str], vocabulary: Sequence[str]) -> tuple[int, int]:
    """``(start, length)`` of the one phrase of ``vocabulary`` in ``words``; ValueError unless exactly one."""
    found = [(i, len(p.split())) for p in vocabulary for i in range(len(words))
             if tuple(words[i:i + len(p.split())]) == tuple(p.split())]
    if len(found) != 1:
        raise ValueError(f"expected exactly one of {vocabulary} in {' '.join(words)!r}, found {len(found)}.")
    return found[0]


def swapped(parent: str, rule: str, vocabulary: Sequence[str], groups: Sequence[Sequence[int]]) -> TextTask:
    """``parent``'s sentences (of a random parent class) whose one ``vocabulary`` phrase is replaced by a phrase
    ``vocabulary[i]``, ``i`` drawn uniformly from ``groups[label]``."""
    task = _BY_NAME[parent]
    members = [tuple(g) for g in groups]
    if sorted(i for g in members for i in g) != list(range(len(vocabulary))) or len(members) < 2:
        raise ValueError(f"swapped({parent!r}, {rule!r}): groups {groups} do not partition the {len(vocabulary)} "
                         "phrases into two or more groups.")

    def render(rng: np.random.Generator, label: int) -> str:
        words = task.render(rng, int(rng.integers(task.num_classes))).split()
        start, length = find_phrase(words, vocabulary)
        group = members[label]
        words[start:start + length] = vocabulary[group[int(rng.integers(len(group)))]].split()
        return " ".join(words)

    class_names = tuple("/".join(vocabulary[i] for i in g[:2]) + ("/.." if len(g) > 2 else "") for g in members)
    return TextTask(f"{parent}__{rule}", class_names, render,
                    f"{task.description} sentences, labelled by their {rule.replace('_', ' ')}")


def _split(n: int, *, parts: int, interleaved: bool) -> tuple[tuple[int, ...], ...]:
    """``range(n)`` in ``parts`` groups: consecutive blocks, or by index mod ``parts``."""
    if interleaved:
        return tuple(tuple(range(p, n, parts)) for p in range(parts))
    return tuple(tuple(int(i) for i in block) for block in np.array_split(np.arange(n), parts))


def _one_vs_rest(parent: str) -> list[TextTask]:
    task = _BY_NAME[parent]
    return [regrouped(parent, f"{name}_vs_rest", [(c,), tuple(o for o in range(task.num_classes) if o != c)])
            for c, name in enumerate(task.classes)]


def _pairs_and_one_vs_rest(parent: str) -> list[TextTask]:
    """A 4-class task's three pairings ({0,1} vs {2,3}, {0,2} vs {1,3}, {0,3} vs {1,2}), then one vs rest."""
    classes = _BY_NAME[parent].classes
    pairs = [regrouped(parent, f"{classes[0]}_{classes[k]}", [(0, k), tuple(c for c in (1, 2, 3) if c != k)])
             for k in (1, 2, 3)]
    return pairs + _one_vs_rest(parent)


def _numbers() -> list[TextTask]:
    n = len(NUMBERS)  # the parity sentences' numbers: phrase i is the number i + 1
    return [swapped("parity", "number_mod3", NUMBERS, _split(n, parts=3, interleaved=True)),
            swapped("parity", "number_1_10_vs_11_20", NUMBERS, _split(n, parts=2, interleaved=False)),
            swapped("parity", "number_mod4", NUMBERS, _split(n, parts=4, interleaved=True)),
            swapped("parity", "number_quarters", NUMBERS, _split(n, parts=4, interleaved=False))]


def _nuisance() -> list[TextTask]:
    return [swapped("topic", "name_half", NAMES, _split(len(NAMES), parts=2, interleaved=False)),
            swapped("colour", "thing_mod4", THINGS, _split(len(THINGS), parts=4, interleaved=True)),
            swapped("negation", "place_alternate", PLACES, _split(len(PLACES), parts=2, interleaved=True)),
            swapped("plurality", "time_half", TIMES, _split(len(TIMES), parts=2, interleaved=False)),
            swapped("sentiment", "name_alternate", NAMES, _split(len(NAMES), parts=2, interleaved=True)),
            swapped("question", "name_quarters", NAMES, _split(len(NAMES), parts=4, interleaved=False)),
            swapped("tense", "thing_half", THINGS, _split(len(THINGS), parts=2, interleaved=False))]


def _round_robin(queues: Sequence[Sequence[TextTask]]) -> tuple[TextTask, ...]:
    """One task from each queue in turn (so every prefix mixes the kinds of variant)."""
    return tuple(t for batch in itertools.zip_longest(*queues) for t in batch if t is not None)


VARIANTS: tuple[TextTask, ...] = tuple(
    dataclasses.replace(task, stream=len(TASKS) + j) for j, task in enumerate(_round_robin([
        _pairs_and_one_vs_rest("topic"), _pairs_and_one_vs_rest("colour"), _pairs_and_one_vs_rest("daytime"),
        _one_vs_rest("tense") + _one_vs_rest("person"), _numbers(), _nuisance(),
    ])))
MANY_TASKS: tuple[TextTask, ...] = TASKS + VARIANTS
TASK_SETS: dict[str, tuple[TextTask, ...]] = {"standard": TASKS, "many": MANY_TASKS, "real": REAL_TASKS}


def task_set(name: str) -> tuple[TextTask, ...]:
    """The tasks of a named set: ``"standard"`` (the suite's 12), ``"many"`` (those 12, then 38 variants) or
    ``"real"`` (labelled sentences of `subboost.bench.suites.text.real_tasks`)."""
    return named_task_set(TASK_SETS, name, field="TextBenchConfig.task_set")


def build_task_suite(name: str, num_tasks: int, tokenizer, **kwargs: Any) -> TextSuite:
    """`splits.build_suite` of the first ``num_tasks`` tasks of the set ``name`` (``kwargs``: its keywords);
    `real_tasks.build_real_suite` for ``"real"``."""
    if name == "real":
        return build_real_suite(num_tasks, tokenizer, **kwargs)
    return build_suite(task_set(name)[:num_tasks], tokenizer, **kwargs)
