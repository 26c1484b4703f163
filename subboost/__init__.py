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
# --- end of re-exports ---

__version__ = "0.1.0"
