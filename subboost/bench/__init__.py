"""The offline mini-benchmark: generated tasks, a small CLIP-style ViT, trained experts, every merge.

`run_benchmark(get_config("tiny" | "default"), seed=..., out_dir=...)` runs the
whole story (see `subboost.bench.pipeline`); ``subboost demo`` is its command line.
`load_or_train(get_config("tiny"), cache_dir=...)` gives the data and trained
models alone (the notebooks start from it).
"""

from subboost.bench.config import BenchConfig, get_config
from subboost.bench.pipeline import BenchModels, load_or_train, run_benchmark
from subboost.bench.generators import TASK_NAMES, TASKS, Task, generate, get_tasks

__all__ = ["BenchConfig", "BenchModels", "TASKS", "TASK_NAMES", "Task", "generate", "get_config", "get_tasks", "load_or_train", "run_benchmark"]
