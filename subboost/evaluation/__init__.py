"""The paper suites' evaluation: CLIP image encoders with per-task heads on real datasets.

An application package beside `subboost.bench` (the offline benchmark); the
``subboost eval`` command and ``experiments/run_suite.py`` use it. Its modules:

- `subboost.evaluation.evaluator`: batched, jit-compiled accuracy with one frozen head per task (`Evaluator`);
- `subboost.evaluation.metrics`: absolute and normalized accuracy, the validation score;
- `subboost.evaluation.grids`: the paper's alpha, beta and TALL-lambda grids;
- `subboost.evaluation.search`: the validation search over alpha and beta (`select_alpha_beta`);
- `subboost.evaluation.tall`: per-task TALL-mask thresholds of Consensus merging (`tune_tall_lambdas`);
- `subboost.evaluation.checkpoint_lookup`: encoder and head checkpoints by task name, the encoder's architecture;
- `subboost.evaluation.provenance`: what code produced a result (`code_version`).
"""

from subboost.evaluation.checkpoint_lookup import encoder_config, find_checkpoint, load_checkpoint, load_heads
from subboost.evaluation.evaluator import DeviceSplit, Evaluator, head_num_classes
from subboost.evaluation.grids import BETAS, LINEAR_ALPHAS, SVD_ALPHAS, SVD_METHODS, TALL_LAMBDAS, alpha_grid
from subboost.evaluation.metrics import ALPHA_METRICS, normalized_accuracies, selection_score, summarize
from subboost.evaluation.provenance import code_version
from subboost.evaluation.search import SweepPoint, SweepResult, select_alpha_beta
from subboost.evaluation.tall import tune_tall_lambdas

__all__ = [
    "ALPHA_METRICS",
    "BETAS",
    "LINEAR_ALPHAS",
    "SVD_ALPHAS",
    "SVD_METHODS",
    "TALL_LAMBDAS",
    "DeviceSplit",
    "Evaluator",
    "SweepPoint",
    "SweepResult",
    "alpha_grid",
    "code_version",
    "encoder_config",
    "find_checkpoint",
    "head_num_classes",
    "load_checkpoint",
    "load_heads",
    "normalized_accuracies",
    "select_alpha_beta",
    "selection_score",
    "summarize",
    "tune_tall_lambdas",
]
