"""subboost: model merging with Subspace Boosting and HO-GSVD in JAX.

Public API re-exports only; every name lives in a small module of its own.
"""

from subboost import linalg, merging, tree
from subboost.boosting import boost_singular_values, subspace_boost
from subboost.merging import available_methods, merge
from subboost.merging.averaging import task_arithmetic, weight_averaging
from subboost.merging.consensus import consensus
from subboost.merging.dare import dare
from subboost.merging.ties import ties
from subboost.spectra import energy_rank, spectra, stable_rank
from subboost.task_vectors import SubboostError, apply_task_vector, task_vectors
from subboost.tree import MatrixLayout, default_is_matrix, matrix_plan, matrix_predicate
from subboost.merging.iso import iso_c, iso_cts
from subboost.merging.lines import lines, lines_scales
from subboost.merging.tsv import tsv
from subboost.hogsvd import HOGSVD, hogsvd, hogsvd_layers
from subboost.alignment import alignment_matrix, generalized_singular_values, select_experts, total_alignment
from subboost.analysis import RankCollapse, rank_collapse
from subboost import models
from subboost.models.loading import load_model
from subboost.checkpoints import checkpoint_identity, checkpoint_info, load_experts, load_params, save_params
from subboost import convert  # callable: sb.convert(src, dst, ...)
from subboost.convert import convert_checkpoint
from subboost import data  # task registry + tf.data pipelines (TensorFlow imported lazily)
from subboost.eval import Evaluator, normalized_accuracies, select_alpha_beta, tune_tall_lambdas
from subboost import sharding, streaming
from subboost.streaming import merge_from_checkpoints
from subboost import polar_boost
from subboost.boosting import BoostReport, GroupReport
from subboost.reference import reference_settings, reference_ties_k
# --- end of re-exports ---

__version__ = "0.1.0"
