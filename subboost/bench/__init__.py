"""The offline mini-benchmark: generated tasks, a small CLIP-style ViT, trained experts, every merge.

`run_benchmark(get_config("tiny" | "default"), seed=..., out_dir=...)` runs the
whole story (see `subboost.bench.pipeline`); ``subboost demo`` is its command line.
"""

from subboost.bench.config import BenchConfig, get_config
from subboost.bench.pipeline import run_benchmark
from subboost.bench.tasks import TASK_NAMES, TASKS, Task, generate, get_tasks

__all__ = ["BenchConfig", "TASKS", "TASK_NAMES", "Task", "generate", "get_config", "get_tasks", "run_benchmark"]
