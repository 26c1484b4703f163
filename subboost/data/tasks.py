"""The 20 image-classification tasks of the merging benchmarks, and their suites.

Each `Task` says where its examples come from (a tensorflow-datasets builder or
a local directory), how many classes it has, and which slice of which split is
its train / validation / test split. Split specs use the tfds slicing language
(``"train[:90%]"``), also for local tasks.

Split conventions (one deterministic choice per task, recorded in every result):

* a dataset with its own validation split uses it (SUN397, DTD, Flowers102,
  PCAM, RenderedSST2);
* a dataset with train and test splits only gets a validation split carved from
  train: the last 10% of train (``train[90%:]``) is validation, the first 90%
  train. tfds shuffles examples once when it prepares a dataset, so a slice is a
  fixed random subset; local datasets are permuted with a fixed seed first;
* Food101's tfds ``validation`` split is the official test set, so it is the
  test split here and validation is carved from train;
* RESISC45 and EuroSAT have a single tfds split: 60% / 20% / 20% of it are
  train / validation / test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from subboost.errors import SubboostError

SPLITS: tuple[str, ...] = ("train", "validation", "test")

_CARVED = {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"}
_OWN_VALIDATION = {"train": "train", "validation": "validation", "test": "test"}
_SINGLE_SPLIT = {"train": "train[:60%]", "validation": "train[60%:80%]", "test": "train[80%:]"}


@dataclasses.dataclass(frozen=True)
class Task:
    """One classification task.

    Attributes:
      name: canonical name (the one used for checkpoint and head file names).
      num_classes: number of classes; every head for the task must have as many.
      splits: ``{"train" | "validation" | "test": split spec}``.
      tfds_name: tensorflow-datasets builder (with config), or ``None`` for a
        task loaded from a local directory.
      local_dir: for local tasks, the directory under ``data_dir`` holding
        ``<split>/<class>/<image>`` files.
      class_dirs: for local tasks, accepted class directory names in label
        order (directories may also be named by the integer label).
      transpose: swap image height and width after decoding (EMNIST is stored
        transposed).
      aliases: other accepted spellings (lower case).
    """

    name: str
    num_classes: int
    splits: Mapping[str, str]
    tfds_name: str | None = None
    local_dir: str | None = None
    class_dirs: tuple[str, ...] = ()
    transpose: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        return self.tfds_name is None


def _tfds(name, num_classes, tfds_name, splits, *aliases, transpose=False) -> Task:
    return Task(name, num_classes, dict(splits), tfds_name=tfds_name, transpose=transpose, aliases=aliases)


def _local(name, num_classes, local_dir, splits, class_dirs=(), *aliases) -> Task:
    return Task(name, num_classes, dict(splits), local_dir=local_dir, class_dirs=tuple(class_dirs), aliases=aliases)


_FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        _tfds("SUN397", 397, "sun397/tfds", _OWN_VALIDATION, "sun397"),
        _tfds("Cars", 196, "cars196", _CARVED, "cars196", "stanfordcars", "stanford_cars"),
        _tfds("RESISC45", 45, "resisc45", _SINGLE_SPLIT, "resisc"),
        _tfds("EuroSAT", 10, "eurosat/rgb", _SINGLE_SPLIT, "eurosat"),
        _tfds("SVHN", 10, "svhn_cropped", _CARVED, "svhn_cropped"),
        _local("GTSRB", 43, "gtsrb", _CARVED),
        _tfds("MNIST", 10, "mnist", _CARVED),
        _tfds("DTD", 47, "dtd", _OWN_VALIDATION),
        _tfds("CIFAR100", 100, "cifar100", _CARVED),
        _tfds("STL10", 10, "stl10", _CARVED),
        _tfds("Flowers102", 102, "oxford_flowers102", _OWN_VALIDATION, "oxford_flowers102", "flowers"),
        _tfds("OxfordIIITPet", 37, "oxford_iiit_pet", _CARVED, "oxford_iiit_pet", "pets", "pet"),
        _tfds("PCAM", 2, "patch_camelyon", _OWN_VALIDATION, "patch_camelyon", "patchcamelyon"),
        _local("FER2013", 7, "fer2013", _CARVED, _FER2013_CLASSES, "fer"),
        _tfds("EMNIST", 10, "emnist/digits", _CARVED, "emnist_digits", transpose=True),
        _tfds("CIFAR10", 10, "cifar10", _CARVED),
        _tfds("Food101", 101, "food101",
              {"train": "train[:90%]", "validation": "train[90%:]", "test": "validation"}, "food"),
        _tfds("FashionMNIST", 10, "fashion_mnist", _CARVED, "fashion_mnist"),
        _local("RenderedSST2", 2, "rendered_sst2",
               {"train": "train", "validation": "valid", "test": "test"}, ("negative", "positive"),
               "rendered_sst2", "renderedsst"),
        _tfds("KMNIST", 10, "kmnist", _CARVED),
    )
}

_EIGHT = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
_FOURTEEN = _EIGHT + ("CIFAR100", "STL10", "Flowers102", "OxfordIIITPet", "PCAM", "FER2013")
_TWENTY = _FOURTEEN + ("EMNIST", "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "KMNIST")

SUITES: dict[int, tuple[str, ...]] = {8: _EIGHT, 14: _FOURTEEN, 20: _TWENTY}

LOCAL_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.is_local)
TFDS_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if not task.is_local)


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


_LOOKUP: dict[str, str] = {}
for _task in TASKS.values():
    for _spelling in (_task.name, *_task.aliases):
        _LOOKUP[_key(_spelling)] = _task.name
# Task-vector codebases name validation-tuned checkpoints "<Task>Val".
for _name in TASKS:
    _LOOKUP.setdefault(_key(_name) + "val", _name)


def get_task(name: str | Task) -> Task:
    """The `Task` called ``name`` (case, ``-``/``_`` and a trailing ``Val`` ignored).

    Raises:
      SubboostError: for an unknown name, listing the valid ones.
    """
    if isinstance(name, Task):
        return name
    canonical = _LOOKUP.get(_key(str(name)))
    if canonical is None:
        raise SubboostError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}.")
    return TASKS[canonical]


def suite_tasks(suite: int | str | Sequence[str]) -> tuple[Task, ...]:
    """The tasks of a suite: ``8``, ``14``, ``20`` (or ``"8"``), or a list of task names."""
    if isinstance(suite, str) and suite.strip().isdigit():
        suite = int(suite)
    if isinstance(suite, int):
        if suite not in SUITES:
            raise SubboostError(f"unknown suite {suite}; suites have {sorted(SUITES)} tasks.")
        return tuple(TASKS[name] for name in SUITES[suite])
    if isinstance(suite, str):
        suite = [part for part in suite.split(",") if part.strip()]
    tasks = tuple(get_task(name.strip() if isinstance(name, str) else name) for name in suite)
    if not tasks:
        raise SubboostError("a suite needs at least one task.")
    duplicates = sorted({t.name for t in tasks if sum(u.name == t.name for u in tasks) > 1})
    if duplicates:
        raise SubboostError(f"suite lists task(s) {duplicates} more than once.")
    return tasks


def split_spec(task: str | Task, split: str) -> str:
    """The split spec (tfds slicing syntax) of ``split`` in {train, validation, test}."""
    task = get_task(task)
    if split not in SPLITS:
        raise SubboostError(f"unknown split {split!r} for task {task.name}; valid splits: {', '.join(SPLITS)}.")
    return task.splits[split]
