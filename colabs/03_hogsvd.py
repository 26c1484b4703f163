# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # HO-GSVD: comparing experts in one shared basis
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/subboost/blob/main/colabs/03_hogsvd.ipynb)
#
# The higher-order generalized SVD writes N matrices with **one shared right
# factor** `V`:
#
# `A_i = U_i diag(sigma_i) V^T`,  `i = 1..N`
#
# so `sigma_{i,k}` says how much of matrix `i` lives along direction `V[:, k]`,
# comparably across the N matrices. Applied per layer to the task vectors of N
# experts, it shows which directions all experts share and which belong to one
# expert -- the Subspace Boosting paper (arXiv 2506.16506) uses it to compare
# experts (**alignment matrices**) and to choose which experts to merge.
#
# This notebook: (1) the decomposition on a toy example with a known answer,
# (2) generalized singular values of the tiny benchmark's ten experts and their
# merge, (3) the alignment heatmap, (4) expert selection vs random choice. CPU,
# offline, about a minute.

# %%
# Install subboost if it is not importable (on Colab). A local checkout installed with
# `pip install -e ".[test]"` -- and CI -- already has it, so this never reaches the network there.
# On Colab, if pip upgraded jax, restart the session once (Runtime > Restart session).
try:
    import subboost  # noqa: F401
except ImportError:
    import subprocess
    import sys

    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                           "subboost[viz,bench] @ git+https://github.com/OWNER/subboost"])

# %%
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from IPython.display import Image, display

import subboost as sb
from subboost.bench.suites.vision import get_config, load_or_train
from subboost.bench.suites.vision import evaluate as bench_eval
from subboost.alignment import mean_alignment
from subboost.hogsvd import common_eigenvalue, isolated_eigenvalue
from subboost.plots import plot_alignment, plot_gsv_distributions, pool_generalized_singular_values

# Figures (PNG + the numbers drawn, as JSON) go outside the source tree: to
# $SUBBOOST_COLAB_OUTPUTS/03_hogsvd, by default under the system's temporary directory.
OUT = Path(os.environ.get("SUBBOOST_COLAB_OUTPUTS", Path(tempfile.gettempdir()) / "subboost_colabs")).expanduser() / "03_hogsvd"
OUT.mkdir(parents=True, exist_ok=True)
print(f"figures go to {OUT}")

# %% [markdown]
# ## 1. A toy example with a known answer
#
# Three 6 x 4 matrices built from one shared (random, non-orthogonal) basis: the
# first basis direction appears equally in all three matrices, the second only in
# `A_0`, the third only in `A_2`, the fourth in `A_0` and `A_1`. The robust
# HO-GSVD (Kempf et al. 2021; the default) returns per direction an eigenvalue
# (field `eigenvalues`, ascending) -- at its minimum `1 / (1/N + pi)` for a direction common to
# all matrices, at its maximum for one isolated in a single matrix -- and a column
# `sigma[:, k]` of unit norm over the matrices: the share of direction `k` held by
# each matrix.

# %%
rng = np.random.default_rng(0)
V_true = rng.standard_normal((4, 4))
weights = np.array([[1.0, 1.0, 0.0, 1.0],   # A_0: directions 0, 1, 3
                    [1.0, 0.0, 0.0, 1.0],   # A_1: directions 0, 3
                    [1.0, 0.0, 1.0, 0.0]])  # A_2: directions 0, 2
mats = []
for w in weights:
    U, _ = np.linalg.qr(rng.standard_normal((6, 4)))  # orthonormal columns
    mats.append(jnp.asarray(U @ np.diag(w) @ np.linalg.inv(V_true), jnp.float32))

toy = sb.hogsvd(mats)
np.set_printoptions(precision=3, suppress=True)
print("eigenvalues:", np.asarray(toy.eigenvalues), f"(common: {common_eigenvalue(3, 1 / 3):.3f}, isolated: {isolated_eigenvalue(3, 1 / 3):.3f})")
print("common directions:", np.asarray(toy.common))
print("sigma (rows: matrices, columns: directions, sorted by eigenvalue):")
print(np.asarray(toy.sigma))
reconstruction = max(float(jnp.abs(toy.U[i] @ jnp.diag(toy.sigma[i]) @ toy.V.T - mats[i]).max()) for i in range(3))
print(f"max |U_i diag(sigma_i) V^T - A_i| = {reconstruction:.1e}")

# The known answer (columns in ascending eigenvalue): common, shared by A_0 and A_1, isolated in A_0, isolated in A_2.
expected_sigma = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1]]) * np.array([3 ** -0.5, 2 ** -0.5, 1, 1])
assert np.allclose(np.asarray(toy.sigma), expected_sigma, atol=1e-4), np.asarray(toy.sigma)
assert np.allclose(np.asarray(toy.eigenvalues)[[0, 2, 3]], [common_eigenvalue(3, 1 / 3)] + 2 * [isolated_eigenvalue(3, 1 / 3)], rtol=1e-4)
assert reconstruction < 1e-5

# %% [markdown]
# The common direction comes first, with equal shares `1/sqrt(3) = 0.577`; next the
# direction split between `A_0` and `A_1` (`1/sqrt(2)` each); last the two isolated
# directions, each with all its weight in one matrix.
#
# ## 2. The tiny benchmark's experts
#
# Cached under `SUBBOOST_BENCH_CACHE` (default `~/.cache/subboost/bench`): trained
# on first use (about 30-60 s on a CPU), loaded afterwards. See
# `01_quickstart.ipynb` for what they are.

# %%
CACHE_DIR = Path(os.environ.get("SUBBOOST_BENCH_CACHE", "~/.cache/subboost/bench")).expanduser()
models = load_or_train(get_config("tiny"), seed=0, cache_dir=CACHE_DIR)  # trains on first use
config, data, base, heads, experts = models.config, models.data, models.base, models.heads, models.experts
task_names = models.task_names
num_tasks = len(task_names)
tvs = models.task_vectors()  # sb.task_vectors(base, [expert_0, ..., expert_9])
merged = sb.merge(tvs, "task_arithmetic")

# %% [markdown]
# `sb.hogsvd_layers(tvs)` decomposes every matrix layer across the ten experts
# (one batched, jit-compiled call per group of same-shaped layers; matrices in
# PyTorch orientation `(out, in)`, so `V` lives in the layer's input space).

# %%
layers = sb.hogsvd_layers(tvs, compute_u=False)
print(f"{'matrix':38s} {'n':>4s} {'common':>7s}  eigenvalue min .. max")
for path, result in layers.items():
    lam = np.asarray(result.eigenvalues)
    print(f"{path:38s} {lam.size:4d} {int(np.asarray(result.common).sum()):7d}  {lam.min():.3f} .. {lam.max():.3f}")
print(f"(for 10 matrices: common eigenvalue = {common_eigenvalue(10, 0.1):.3f}, isolated eigenvalue = {isolated_eigenvalue(10, 0.1):.3f})")

# %% [markdown]
# ## Generalized singular values of the experts and of their merge
#
# `sb.generalized_singular_values(tvs, merged)` returns per layer the experts'
# `sigma` and, as an extra last row, the merged task vector *projected* onto the
# experts' basis. Pooled over all layers, their distributions show how evenly
# each expert (and the merge) spreads over the shared directions.

# %%
sigmas = sb.generalized_singular_values(tvs, merged)
names = task_names + ["merged (TA)"]
pooled = pool_generalized_singular_values(sigmas, names, num_experts=num_tasks)
stats = plot_gsv_distributions(pooled, OUT / "gsv_distributions.png")
display(Image(filename=str(OUT / "gsv_distributions.png")))
print({name: round(s["median"], 3) for name, s in stats["stats"].items()})

# %% [markdown]
# ## 3. Alignment matrix
#
# Per layer, each expert's profile `p_i = sigma_i / ||sigma_i||`; alignment
# `M_ij = p_i . p_j` in [0, 1] (1: the same directions in the same proportions,
# 0: disjoint directions), averaged over layers. With the merge as an extra
# row/column, the last row shows which experts the merge resembles. (The paper
# does not publish its exact formula; this one is subboost's, see REFERENCE.md.)

# %%
# The same as `sb.alignment_matrix(tvs, merged)`, computed from the sigmas above instead of decomposing again.
alignment = np.asarray(mean_alignment(sigmas))
plot_alignment(alignment, names, OUT / "alignment.png")
display(Image(filename=str(OUT / "alignment.png")))
print("merge's alignment with each expert:",
      {name: round(float(v), 3) for name, v in zip(task_names, alignment[-1, :num_tasks])})

# %% [markdown]
# ## 4. Expert selection
#
# `sb.select_experts(tvs, k=k)` chooses `k` experts greedily to minimise their total
# mutual alignment (the most diverse set); `strategy="random"` is the baseline. The
# experts' block of the matrix above is the same with or without the merged row,
# so we reuse it. For each subset we merge its experts (Task Arithmetic, with and
# without boosting), choose `alpha` on validation and report the normalized test
# accuracy on the subset's own tasks. Five random subsets are far too few for a
# conclusion: this shows the workflow, not a result.

# %%
K = 4
experts_alignment = alignment[:num_tasks, :num_tasks]
subsets = {"hogsvd": sb.select_experts(tvs, k=K, alignment=experts_alignment)}
for seed in range(5):
    subsets[f"random (seed {seed})"] = sb.select_experts(tvs, k=K, strategy="random", seed=seed)

EVAL = dict(model=config.model, batch=config.eval_batch)  # static settings of the compiled evaluations
heads_j = jax.tree_util.tree_map(jnp.asarray, heads)
val_x, val_y = jnp.asarray(data.val.images), jnp.asarray(data.val.labels)
test_x, test_y = jnp.asarray(data.test.images), jnp.asarray(data.test.labels)
expert_acc = np.asarray(bench_eval.expert_accuracies(experts, test_x, test_y, heads_j, **EVAL))
alphas = np.asarray(config.alphas)


def normalized_test_accuracy(tau, chosen) -> float:
    """Alpha chosen on the validation splits of ``chosen``; all tasks are evaluated (one compiled shape)."""
    val = bench_eval.alpha_sweep(base, tau, alphas, val_x, val_y, heads_j, **EVAL)[:, chosen]
    best = alphas[int(np.argmax(val.mean(axis=1)))]
    test = bench_eval.alpha_sweep(base, tau, [best], test_x, test_y, heads_j, **EVAL)[0, chosen]
    return float(np.mean(test / expert_acc[chosen]))


print(f"{'subset':18s} {'experts':50s} {'alignment':>9s} {'TA':>6s} {'TA+boost':>9s}")
for label, chosen in subsets.items():
    tau = sb.merge(jax.tree_util.tree_map(lambda x: x[np.asarray(chosen)], tvs), "task_arithmetic")
    plain = normalized_test_accuracy(tau, chosen)
    boosted = normalized_test_accuracy(sb.subspace_boost(tau, beta=0.01), chosen)
    members = ", ".join(task_names[i] for i in chosen)
    print(f"{label:18s} {members:50s} {sb.total_alignment(experts_alignment, chosen):9.3f} {plain:6.1%} {boosted:9.1%}")

# %% [markdown]
# The same analysis for any set of checkpoints, from the command line:
# `subboost analyze EXPERT_DIRS --base BASE_DIR --out analysis/` writes these
# figures (and the greedy expert ranking) for converted experts; see
# `04_bring_your_own_checkpoints.ipynb` for converting them.
