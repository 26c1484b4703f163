"""The benchmark harness: one pipeline for every suite (`subboost.bench.suites`).

`run_benchmark(config, seed=..., out_dir=...)` runs the suite that ``config`` belongs to
(``subboost.bench.suites.vision.get_config(...)``, ``subboost.bench.suites.text.get_config(...)``,
or any registered suite's) end to end: merges, alpha / beta selection, the boosting sweep, the
report, figures and output folder (`subboost.bench.pipeline`). ``subboost demo --suite NAME`` is
its command line; `subboost.bench.report.seed_summary` aggregates runs over seeds.
"""

from subboost.bench.pipeline import TrainedSuite, run_benchmark
from subboost.bench.suites import Suite, available_suites, get_suite, register_suite

__all__ = ["Suite", "TrainedSuite", "available_suites", "get_suite", "register_suite", "run_benchmark"]
