"""The 8/14/20-task vision benchmarks as tensorflow-datasets pipelines.

``tasks``: the task registry (`TASKS`, `SUITES`, `get_task`, `suite_tasks`);
``preprocessing``: CLIP resize / center crop / normalisation;
``input_pipeline``: tf.data splits as numpy batches or in-memory arrays.
TensorFlow is imported only when a pipeline is built (the ``data`` extra).
"""

from subboost.data.input_pipeline import (
    default_data_dir,
    local_files,
    numpy_batches,
    split_arrays,
    split_dataset,
)
from subboost.data.preprocessing import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_IMAGE_SIZE,
    normalize_images,
    resize_and_center_crop,
)
from subboost.data.tasks import (
    LOCAL_TASKS,
    SPLITS,
    SUITES,
    TASKS,
    TFDS_TASKS,
    Task,
    get_task,
    split_spec,
    suite_tasks,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_IMAGE_SIZE",
    "LOCAL_TASKS",
    "SPLITS",
    "SUITES",
    "TASKS",
    "TFDS_TASKS",
    "Task",
    "default_data_dir",
    "get_task",
    "local_files",
    "normalize_images",
    "numpy_batches",
    "resize_and_center_crop",
    "split_arrays",
    "split_dataset",
    "split_spec",
    "suite_tasks",
]
