"""The vision suite: generated image tasks, a small CLIP-style ViT, trained experts, every merge.

``run_benchmark(get_config("tiny" | "default"), seed=..., out_dir=...)`` (`subboost.bench.pipeline`)
runs the whole story; ``subboost demo`` is its command line.
`load_or_train(get_config("tiny"), cache_dir=...)` gives the data and trained models alone (the
notebooks start from it). Importing this package registers the suite as ``"vision"``.
"""

from subboost.bench.suites import Suite, register_suite
from subboost.bench.suites.vision.config import BenchConfig, get_config
from subboost.bench.suites.vision.generators import TASK_NAMES, TASKS, Task, generate, get_tasks
from subboost.bench.suites.vision.pipeline import BenchModels, load_or_train, prepare
from subboost.bench.suites.vision.report import markdown_tables

SUITE = register_suite(Suite(
    name="vision",
    description="generated images, a ViT pretrained here (default)",
    sizes=("tiny", "default", "wide"),
    get_config=get_config,
    prepare=prepare,
    markdown_tables=markdown_tables,
    title="Offline mini-benchmark",
    default_out="results/vision",
))

__all__ = ["BenchConfig", "BenchModels", "SUITE", "TASKS", "TASK_NAMES", "Task", "generate", "get_config", "get_tasks",
           "load_or_train"]
