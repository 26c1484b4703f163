"""Thirty more vision tasks: class *regroupings* of the twenty tasks of `subboost.bench.suites.vision.generators`.

The open question "what happens beyond 20 experts?" needs more tasks than the
benchmark's twenty. `MANY_TASKS` keeps those twenty first, in their order (so a
prefix of 8, 14 or 20 tasks is exactly the standard suite), then adds 30
variants. Variant ``<parent>__<rule>`` draws its images from the parent's
generator and labels them by a partition of the parent's classes:

=========  ==========================  ===================================================
rule       new class of parent class   example (parent with 8 classes)
=========  ==========================  ===================================================
parity     ``c mod 2``                 {0,2,4,6} vs {1,3,5,7}
halves     ``floor(2 c / C)``          {0..3} vs {4..7}
shifted    ``((c + 1) mod C) // 2``    {7,0} {1,2} {3,4} {5,6}
mod3       ``c mod 3``                 {0,3,6} {1,4,7} {2,5}
mirror     ``min(c, C - 1 - c)``       {0,7} {1,6} {2,5} {3,4}
=========  ==========================  ===================================================

Why these experts disagree (and a label *permutation* would not): the heads
are frozen class prototypes (`subboost.bench.suites.vision.centroid_heads`), so permuting a
task's labels permutes its head's columns too and leaves the encoder's loss,
hence its task vector, unchanged. A regrouping instead changes which image
differences the encoder must keep and which it may drop: ``parity`` asks the
encoder to map classes 0 and 2 together and 0 and 1 apart, ``halves`` the
opposite, and the parent asks for all of them apart. The pretraining captions
pair neighbours ``(0,1), (2,3), ...`` (`generators.coarse_labels`), which
``halves`` and ``mirror`` partly agree with and ``parity`` and ``shifted``
directly contradict. So variants of one family pull the same
weights in different directions; `subboost.bench.regime.task_vector_geometry`
measures it (the mean pairwise cosine of the task vectors, reported by
``experiments/many_experts.py``).

Each variant has its own name, hence its own data streams
(`generators.split_seed` hashes the task name): a variant never reuses its
parent's images. The variants are listed in a fixed order: rule index
``(j + j // 20) mod 5`` for the ``j``-th parent visit, skipping a partition that
equals the parent's own classes or one already listed for that parent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from subboost.bench.suites.vision.generators import TASKS, Task

Rule = Callable[[int, int], int]
RULES: dict[str, Rule] = {
    "parity": lambda c, n: c % 2,
    "halves": lambda c, n: (2 * c) // n,
    "shifted": lambda c, n: ((c + 1) % n) // 2,
    "mod3": lambda c, n: c % 3,
    "mirror": lambda c, n: min(c, n - 1 - c),
}
NUM_VARIANTS = 30


def partition(rule: str, num_classes: int) -> tuple[tuple[int, ...], ...]:
    """The parent classes of each new class under ``rule``, new classes numbered by their smallest member."""
    new = [RULES[rule](c, num_classes) for c in range(num_classes)]
    groups: dict[int, list[int]] = {}
    for c, g in enumerate(new):
        groups.setdefault(g, []).append(c)
    return tuple(sorted(tuple(members) for members in groups.values()))


def regrouped(parent: Task, rule: str, groups: Sequence[Sequence[int]]) -> Task:
    """A task whose class ``k`` shows images of a parent class drawn uniformly from ``groups[k]``."""
    members = [np.asarray(g, np.int64) for g in groups]

    def render(rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
        parent_labels = np.empty_like(labels)
        for k, g in enumerate(members):
            where = labels == k
            parent_labels[where] = g[rng.integers(0, g.size, int(where.sum()))]
        return parent.render(rng, parent_labels, split)

    names = tuple("+".join(parent.class_names[c] for c in g) for g in groups)
    return Task(f"{parent.name}__{rule}", names, parent.noise, render,
                f"{parent.description}, classes regrouped by {rule}")


def _variants(parents: Sequence[Task], count: int) -> tuple[Task, ...]:
    rules = list(RULES)
    out: list[Task] = []
    used: dict[str, set] = {p.name: {tuple((c,) for c in range(p.num_classes))} for p in parents}
    j = 0
    while len(out) < count:
        parent = parents[j % len(parents)]
        for attempt in range(len(rules)):  # the scheduled rule, else the next unused one
            rule = rules[(j + j // len(parents) + attempt) % len(rules)]
            groups = partition(rule, parent.num_classes)
            if len(groups) >= 2 and groups not in used[parent.name]:
                used[parent.name].add(groups)
                out.append(regrouped(parent, rule, groups))
                break
        j += 1
    return tuple(out)


VARIANTS: tuple[Task, ...] = _variants(TASKS, NUM_VARIANTS)
MANY_TASKS: tuple[Task, ...] = TASKS + VARIANTS
TASK_SETS: dict[str, tuple[Task, ...]] = {"standard": TASKS, "many": MANY_TASKS}


def task_set(name: str) -> tuple[Task, ...]:
    """The tasks of a named set: ``"standard"`` (the benchmark's 20) or ``"many"`` (those 20, then 30 variants)."""
    if name not in TASK_SETS:
        raise ValueError(f"BenchConfig.task_set must be one of {', '.join(TASK_SETS)}, got {name!r}.")
    return TASK_SETS[name]
