"""Twelve sentence-classification tasks, generated from word lists and templates written here.

Each task reads one property of a short English sentence (at most 12 words, lower case,
no punctuation, so no task is solved by a single punctuation token). Every sentence also
carries *nuisance* content drawn at random (names, objects, places, times), so the
sentence embedding of the pretrained model is dominated by what the sentence is about,
not by the property asked: the pretrained model with prototype heads must fall clearly
short of a fine-tuned expert on most tasks (the topic-like tasks are the exception, as
they should be for a sentence-embedding model).

A task is a `TextTask`: ``render(rng, label) -> sentence``. Labels are balanced within a
split (``i % classes``, shuffled); splits use independent, seed-derived random streams.
Nothing is downloaded.

Tasks (classes):

* ``topic`` (4): sports, food, music or weather vocabulary;
* ``negation`` (2): affirmative or negated statement;
* ``tense`` (3): past, present or future;
* ``question`` (2): yes/no question (inverted word order) or statement;
* ``sentiment`` (2): positive or negative judgement;
* ``plurality`` (2): singular or plural subject;
* ``parity`` (2): a written-out number from one to twenty is even or odd;
* ``person`` (3): first, second or third person subject pronoun;
* ``colour`` (4): red, blue, green or yellow thing;
* ``place`` (2): indoors or outdoors;
* ``daytime`` (4): morning, afternoon, evening or night;
* ``comparison`` (2): "bigger" or "smaller" comparative.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

NAMES = ("anna", "ben", "carla", "david", "emma", "frank", "grace", "henry", "iris", "jack", "kate", "leo",
         "maria", "nick", "olga", "paul", "rosa", "sam", "tina", "victor")
THINGS = ("book", "lamp", "chair", "bottle", "letter", "box", "phone", "ticket", "coat", "basket", "camera",
          "umbrella", "key", "map", "cup", "bag")
THINGS_PLURAL = {t: ("boxes" if t == "box" else t + "s") for t in THINGS}
PLACES_IN = ("in the kitchen", "in the office", "in the library", "in the bedroom", "at the museum",
             "in the classroom", "in the hallway", "at the cinema")
PLACES_OUT = ("in the garden", "in the park", "on the beach", "in the forest", "on the mountain",
              "in the field", "by the river", "on the street")
PLACES = PLACES_IN + PLACES_OUT
TIMES = ("today", "on monday", "last week", "this weekend", "in april", "after lunch", "at noon", "before dinner")
NEUTRAL_TIMES = ("on monday", "on friday", "in april", "in june", "this weekend", "every day")
# Regular verbs: (base, third person singular, past).
VERBS = (("clean", "cleans", "cleaned"), ("paint", "paints", "painted"), ("carry", "carries", "carried"),
         ("open", "opens", "opened"), ("move", "moves", "moved"), ("check", "checks", "checked"),
         ("fix", "fixes", "fixed"), ("wash", "washes", "washed"), ("pack", "packs", "packed"),
         ("repair", "repairs", "repaired"))
TOPIC_WORDS = (
    ("football", "tennis match", "marathon", "goalkeeper", "basketball game", "swimming race", "cycling team",
     "hockey final", "referee", "stadium crowd"),
    ("pasta", "soup", "chocolate cake", "fresh bread", "salad", "pizza", "cheese", "rice dish", "breakfast",
     "apple pie"),
    ("guitar", "piano", "concert", "new song", "drummer", "violin", "album", "choir", "jazz band", "melody"),
    ("rain", "storm", "snow", "sunshine", "wind", "fog", "thunder", "heat wave", "cold front", "clouds"),
)
POSITIVE = ("wonderful", "excellent", "delightful", "brilliant", "lovely", "superb", "pleasant", "fantastic",
            "great", "charming")
NEGATIVE = ("terrible", "awful", "dreadful", "horrible", "disappointing", "boring", "poor", "unpleasant",
            "annoying", "dull")
JUDGED = ("film", "meal", "trip", "show", "book", "hotel", "lecture", "party", "game", "concert")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
COUNTED = ("apples", "chairs", "letters", "birds", "coins", "boats", "stones", "cards", "lamps", "shirts")
COLOURS = (("red", "crimson", "scarlet"), ("blue", "navy", "azure"), ("green", "emerald", "olive"),
           ("yellow", "golden", "lemon"))
ANIMALS = ("dog", "cat", "horse", "rabbit", "goat", "duck", "fox", "sheep", "mouse", "bear")
ANIMALS_PLURAL = {a: {"sheep": "sheep", "mouse": "mice", "fox": "foxes"}.get(a, a + "s") for a in ANIMALS}
ACTIONS = (("sleeps", "sleep"), ("runs", "run"), ("eats", "eat"), ("waits", "wait"), ("plays", "play"),
           ("hides", "hide"), ("rests", "rest"), ("jumps", "jump"))
ADJECTIVES = ("open", "heavy", "ready", "broken", "clean", "new", "empty", "cold", "quiet", "full")
DAYTIMES = (("in the morning", "at dawn", "at sunrise", "before breakfast"),
            ("in the afternoon", "after lunch", "at three in the afternoon", "in the early afternoon"),
            ("in the evening", "at sunset", "after dinner", "at dusk"),
            ("at night", "at midnight", "late at night", "in the middle of the night"))
BIGGER = ("bigger", "larger", "taller", "heavier", "wider")
SMALLER = ("smaller", "shorter", "lighter", "thinner", "narrower")


def pick(rng: np.random.Generator, words: Sequence):
    return words[int(rng.integers(len(words)))]


def _topic(rng, label):
    return f"{pick(rng, NAMES)} talked about the {pick(rng, TOPIC_WORDS[label])} {pick(rng, PLACES)} {pick(rng, TIMES)}"


def _negation(rng, label):
    subject, (base, _, past), thing = pick(rng, NAMES), pick(rng, VERBS), pick(rng, THINGS)
    form = int(rng.integers(3))
    if form == 0:
        verb = f"did not {base}" if label else past
    elif form == 1:
        verb = f"will not {base}" if label else f"will {base}"
    else:
        verb = f"never {past}" if label else f"often {past}"
    return f"{subject} {verb} the {thing} {pick(rng, PLACES)}"


def _tense(rng, label):
    subject, (base, third, past), thing = pick(rng, NAMES), pick(rng, VERBS), pick(rng, THINGS)
    verb = (past, third, f"will {base}")[label]
    return f"{subject} {verb} the {thing} {pick(rng, PLACES)} {pick(rng, NEUTRAL_TIMES)}"


def _question(rng, label):
    thing, adjective, place = pick(rng, THINGS), pick(rng, ADJECTIVES), pick(rng, PLACES)
    owner = pick(rng, NAMES)
    if label:
        return f"is the {thing} of {owner} {adjective} {place}"
    return f"the {thing} of {owner} is {adjective} {place}"


def _sentiment(rng, label):
    words = (POSITIVE, NEGATIVE)[label]
    return f"{pick(rng, NAMES)} said the {pick(rng, JUDGED)} {pick(rng, PLACES)} was {pick(rng, words)}"


def _plurality(rng, label):
    animal, (singular, plural) = pick(rng, ANIMALS), pick(rng, ACTIONS)
    subject, verb = (animal, singular) if label == 0 else (ANIMALS_PLURAL[animal], plural)
    return f"the {subject} of {pick(rng, NAMES)} {verb} {pick(rng, PLACES)} {pick(rng, TIMES)}"


def _parity(rng, label):
    number = 2 * int(rng.integers(10)) + (2 if label == 0 else 1)  # 2, 4, .., 20 or 1, 3, .., 19
    return f"{pick(rng, NAMES)} found {NUMBERS[number - 1]} {pick(rng, COUNTED)} {pick(rng, PLACES)}"


def _person(rng, label):
    (_, _, past), thing = pick(rng, VERBS), pick(rng, THINGS)
    subject = pick(rng, (("i", "we"), ("you",), ("he", "she", "they"))[label])
    return f"{subject} {past} the {thing} of {pick(rng, NAMES)} {pick(rng, PLACES)}"


def _colour(rng, label):
    return f"{pick(rng, NAMES)} left a {pick(rng, COLOURS[label])} {pick(rng, THINGS)} {pick(rng, PLACES)}"


def _place(rng, label):
    (_, _, past), thing = pick(rng, VERBS), pick(rng, THINGS)
    return f"{pick(rng, NAMES)} {past} the {thing} {pick(rng, (PLACES_IN, PLACES_OUT)[label])} {pick(rng, NEUTRAL_TIMES)}"


def _daytime(rng, label):
    (_, _, past), thing = pick(rng, VERBS), pick(rng, THINGS)
    return f"{pick(rng, NAMES)} {past} the {thing} {pick(rng, DAYTIMES[label])}"


def _comparison(rng, label):
    a, b = rng.choice(len(THINGS), size=2, replace=False)
    word = pick(rng, (BIGGER, SMALLER)[label])
    return f"the {THINGS[a]} of {pick(rng, NAMES)} is {word} than the {THINGS[b]} {pick(rng, PLACES)}"


@dataclasses.dataclass(frozen=True)
class TextTask:
    """One generated sentence-classification task.

    Attributes:
      name: short identifier.
      classes: class names (label ``c`` is ``classes[c]``).
      render: ``(rng, label) -> sentence``.
      description: what the label says about the sentence.
      stream: index of the task's random streams in `generate` (``None``: its position in
        `TASK_NAMES`; tasks outside the standard twelve set their own, e.g.
        `subboost.bench.suites.text.task_variants`).
    """

    name: str
    classes: tuple[str, ...]
    render: Callable[[np.random.Generator, int], str]
    description: str
    stream: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


TASKS: tuple[TextTask, ...] = (
    TextTask("topic", ("sports", "food", "music", "weather"), _topic, "what the sentence talks about"),
    TextTask("negation", ("affirmative", "negated"), _negation, "whether the statement is negated"),
    TextTask("tense", ("past", "present", "future"), _tense, "tense of the verb"),
    TextTask("question", ("statement", "question"), _question, "yes/no question (inverted order) or statement"),
    TextTask("sentiment", ("positive", "negative"), _sentiment, "polarity of the judgement"),
    TextTask("plurality", ("singular", "plural"), _plurality, "number of the subject"),
    TextTask("parity", ("even", "odd"), _parity, "parity of the written-out number (1-20)"),
    TextTask("person", ("first", "second", "third"), _person, "grammatical person of the subject"),
    TextTask("colour", ("red", "blue", "green", "yellow"), _colour, "colour of the thing (three words each)"),
    TextTask("place", ("indoors", "outdoors"), _place, "whether the place is indoors"),
    TextTask("daytime", ("morning", "afternoon", "evening", "night"), _daytime, "time of day"),
    TextTask("comparison", ("bigger", "smaller"), _comparison, "direction of the comparative"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
MAX_CLASSES = max(t.num_classes for t in TASKS)
SPLITS = ("train", "val", "test", "heads")


def generate(task: TextTask, n: int, *, seed: int, split: str) -> tuple[list[str], np.ndarray]:
    """``n`` sentences of ``task`` with balanced, shuffled labels (deterministic in seed and split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}.")
    if n <= 0:
        raise ValueError(f"generate: n must be positive, got {n}.")
    index = TASK_NAMES.index(task.name) if task.stream is None else task.stream
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), index, SPLITS.index(split), 0x7E47]))
    labels = rng.permutation(np.arange(n) % task.num_classes).astype(np.int32)
    return [task.render(rng, int(label)) for label in labels], labels


def get_tasks(names: Sequence[str] | None = None) -> tuple[TextTask, ...]:
    """Tasks by name (all of them by default), in the order given."""
    if names is None:
        return TASKS
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown text task(s) {unknown}; available: {', '.join(TASK_NAMES)}.")
    return tuple(TASKS[TASK_NAMES.index(n)] for n in names)
