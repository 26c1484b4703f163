"""subboost: model merging with Subspace Boosting and HO-GSVD in JAX.

Public API re-exports only; every name lives in a small module of its own.
The top level holds the core: task vectors, merging, boosting, spectra,
HO-GSVD, alignment, rank-collapse analysis, checkpoints and models.
Applications are reached through their subpackages:

- ``subboost.evaluation``: the paper suites' evaluator and alpha/beta search
  (``Evaluator``, ``select_alpha_beta``, ``normalized_accuracies``, ...);
- ``subboost.selection``: the one alpha/beta selection rule;
- ``subboost.data``: task registry and tf.data pipelines;
- ``subboost.bench``: the offline benchmark harness and its suites (vision, text);
- ``subboost.cli``, ``subboost.commands``: the command line.
"""

from subboost import linalg, merging, tree
from subboost.boosting import BoostReport, GroupReport, boost_singular_values, subspace_boost, subspace_boost_sweep
from subboost.merging import available_methods, merge
from subboost.merging.averaging import task_arithmetic, weight_averaging
from subboost.merging.consensus import consensus
from subboost.merging.dare import dare
from subboost.merging.ties import ties
from subboost.spectra import energy_rank, spectra, stable_rank
from subboost.errors import SubboostError
from subboost.task_vectors import apply_task_vector, task_vectors
from subboost.tree import MatrixLayout, default_is_matrix, matrix_plan, matrix_predicate
from subboost.merging.iso import iso_c, iso_cts
from subboost.merging.lines import lines, lines_scales
from subboost.merging.tsv import tsv
from subboost.hogsvd import HOGSVD, hogsvd, hogsvd_layers
from subboost.alpha_rules import alpha_from_hogsvd, alpha_from_norm
from subboost.alignment import alignment_matrix, generalized_singular_values, select_experts, total_alignment
from subboost.analysis import RankCollapse, rank_collapse
from subboost import models
from subboost.models.loading import load_model
from subboost.checkpoints import checkpoint_identity, checkpoint_info, load_experts, load_params, save_params
from subboost import convert  # callable: sb.convert(src, dst, ...)
from subboost.convert import convert_checkpoint
from subboost import sharding, streaming
from subboost.streaming import merge_from_checkpoints
from subboost import polar_boost
from subboost import lora
from subboost.reference import reference_settings, reference_ties_k
from subboost import post_merge as post
from subboost.post_merge import chain
from subboost.merging.cart import cart
from subboost.merging.magmax import magmax
from subboost.merging.model_stock import model_stock
from subboost.merging.star import star
from subboost.merging.wudi import wudi
# --- end of re-exports ---

__version__ = "0.1.0"

__all__ = [
    # task vectors
    "SubboostError",
    "apply_task_vector",
    "task_vectors",
    # merging
    "available_methods",
    "consensus",
    "dare",
    "iso_c",
    "iso_cts",
    "lines",
    "lines_scales",
    "merge",
    "task_arithmetic",
    "ties",
    "tsv",
    "weight_averaging",
    "cart",
    "magmax",
    "model_stock",
    "star",
    "wudi",
    "reference_settings",
    "reference_ties_k",
    # boosting
    "BoostReport",
    "GroupReport",
    "boost_singular_values",
    "subspace_boost",
    "subspace_boost_sweep",
    # post-merge operators (sb.post.svc, sb.post.boost, ...), composed with chain
    "chain",
    "post",
    # matrix view of parameter trees
    "MatrixLayout",
    "default_is_matrix",
    "matrix_plan",
    "matrix_predicate",
    # spectra, HO-GSVD, alignment, rank collapse
    "energy_rank",
    "spectra",
    "stable_rank",
    "HOGSVD",
    "alpha_from_hogsvd",
    "alpha_from_norm",
    "hogsvd",
    "hogsvd_layers",
    "alignment_matrix",
    "generalized_singular_values",
    "select_experts",
    "total_alignment",
    "RankCollapse",
    "rank_collapse",
    # checkpoints and models
    "checkpoint_identity",
    "checkpoint_info",
    "convert",
    "convert_checkpoint",
    "load_experts",
    "load_model",
    "load_params",
    "merge_from_checkpoints",
    "save_params",
    # submodules
    "linalg",
    "lora",
    "merging",
    "models",
    "polar_boost",
    "post_merge",
    "sharding",
    "streaming",
    "tree",
]
