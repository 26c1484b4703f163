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
# # Rank collapse: spectra of the merged task vector as experts are added
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/subboost/blob/main/colabs/02_rank_collapse.ipynb)
#
# The Subspace Boosting paper (arXiv 2506.16506) observes that when more and more
# experts are merged with Task-Arithmetic-style methods, the merged task vector's
# energy concentrates in a few singular directions shared by all experts: its
# **stable rank** (`sum_i s_i^2 / s_0^2`) falls and task-specific directions are
# drowned out. Subspace Boosting raises the neglected singular values and keeps
# the rank up.
#
# Here we merge the first `n` of the ten experts (`n = 1, 2, 4, 10`) of the offline tiny benchmark
# (`subboost.bench`, CPU, about a minute) and follow, per layer,
#
# * stable rank and energy rank (directions holding 95% of `sum s_i^2`),
# * the normalised spectrum `s_i / s_0`,
# * the accuracy of the merged model,
#
# with and without boosting (`beta = 0.01`).

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
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import subboost as sb
from subboost.bench.suites.vision import get_config, load_or_train
from subboost.bench.suites.vision import evaluate as bench_eval
from subboost.plots import plot_rank_collapse, plot_spectra_evolution

# Figures (PNG + the numbers drawn, as JSON) go outside the source tree: to
# $SUBBOOST_COLAB_OUTPUTS/02_rank_collapse, by default under the system's temporary directory.
OUT = Path(os.environ.get("SUBBOOST_COLAB_OUTPUTS", Path(tempfile.gettempdir()) / "subboost_colabs")).expanduser() / "02_rank_collapse"
OUT.mkdir(parents=True, exist_ok=True)
print(f"figures go to {OUT}")

# %% [markdown]
# ## The tiny benchmark models
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

# %% [markdown]
# ## Stable rank vs number of merged experts
#
# `sb.rank_collapse(tvs, method, counts=..., beta=...)` merges the first `n` experts
# for every `n` in `counts` (default `1..T`, in the given `order`), takes one batched
# SVD per group of same-shaped matrices, and reports per layer the spectra, stable
# ranks and energy ranks, plain and boosted. The boosted spectrum is computed from
# the plain one with the same function `sb.subspace_boost` applies, so no second
# SVD runs.

# %%
COUNTS = (1, 2, 4, 10)  # every count compiles its own merge: a few points keep the notebook quick
collapse = {
    "task_arithmetic": sb.rank_collapse(tvs, "task_arithmetic", counts=COUNTS, beta=0.01),
    "ties": sb.rank_collapse(tvs, "ties", counts=COUNTS, beta=0.01, k=0.2),
}


def mean_over_layers(values: dict) -> np.ndarray:
    """``{path: (len(counts), ...)}`` -> ``(len(counts),)`` mean over every matrix."""
    return np.concatenate([v.reshape(v.shape[0], -1) for v in values.values()], axis=1).mean(axis=1)


counts = collapse["task_arithmetic"].num_experts
print(f"{'n':>3s}  " + "  ".join(f"{m + (' +boost' if b else ''):>20s}" for m in collapse for b in (False, True)))
for i, n in enumerate(counts):
    row = []
    for result in collapse.values():
        row += [mean_over_layers(result.stable_rank)[i], mean_over_layers(result.stable_rank_boosted)[i]]
    print(f"{n:3d}  " + "  ".join(f"{v:20.2f}" for v in row))
print("(mean stable rank over the 12 matrices of the 2 blocks; each matrix is 32 x 32 or 32 x 128)")
for result in collapse.values():  # boosting never lowers a stable rank
    assert all(np.all(result.stable_rank_boosted[p] >= result.stable_rank[p] - 1e-3) for p in result.stable_rank)

# %% [markdown]
# Per layer type (one line per type, band = min..max over the blocks), plain on
# the left and boosted on the right. `plot_rank_collapse` writes the PNG and a
# JSON file with exactly the numbers drawn.

# %%
plot_rank_collapse(collapse["task_arithmetic"], OUT / "rank_collapse_task_arithmetic.png")
display(Image(filename=str(OUT / "rank_collapse_task_arithmetic.png")))

# %%
plot_rank_collapse(collapse["ties"], OUT / "rank_collapse_ties.png")
display(Image(filename=str(OUT / "rank_collapse_ties.png")))

# %% [markdown]
# ## Spectra as experts are added
#
# Normalised singular values `s_i / s_0` of the Task Arithmetic merge, averaged
# over the layers of each type; colour = number of merged experts. Without
# boosting, compare how much of the tail is left as experts are added (the paper
# reports it shrinking for ViT experts); with `beta = 0.01` on these small
# matrices the cutoff index is 0, so the boosted spectrum is flat.

# %%
plot_spectra_evolution(collapse["task_arithmetic"], OUT / "spectra_task_arithmetic.png")
display(Image(filename=str(OUT / "spectra_task_arithmetic.png")))
plot_spectra_evolution(collapse["task_arithmetic"], OUT / "spectra_task_arithmetic_boosted.png", boosted=True)
display(Image(filename=str(OUT / "spectra_task_arithmetic_boosted.png")))

# %% [markdown]
# ## Does it matter for accuracy?
#
# For each `n` we merge the first `n` experts (Task Arithmetic), choose `alpha` on
# validation, and report the normalized test accuracy (merged / expert) averaged
# over those `n` tasks. To compile the evaluation once, every merged model is
# evaluated on all ten tasks and the first `n` are kept. The tiny benchmark is
# small and noisy: read the trend, not the decimals.

# %%
EVAL = dict(model=config.model, batch=config.eval_batch)  # static settings of the compiled evaluations
heads_j = jax.tree_util.tree_map(jnp.asarray, heads)
val_x, val_y = jnp.asarray(data.val.images), jnp.asarray(data.val.labels)
test_x, test_y = jnp.asarray(data.test.images), jnp.asarray(data.test.labels)
expert_acc = np.asarray(bench_eval.expert_accuracies(experts, test_x, test_y, heads_j, **EVAL))
pretrained_acc = np.asarray(bench_eval.accuracies(base, test_x, test_y, heads_j, **EVAL))
alphas = np.asarray(config.alphas)


def normalized_test_accuracy(tau, n: int) -> float:
    val = bench_eval.alpha_sweep(base, tau, alphas, val_x, val_y, heads_j, **EVAL)[:, :n]
    best = alphas[int(np.argmax(val.mean(axis=1)))]
    test = bench_eval.alpha_sweep(base, tau, [best], test_x, test_y, heads_j, **EVAL)[0, :n]
    return float(np.mean(test / expert_acc[:n]))


accuracy_counts = COUNTS[1:]
accuracy = {"task_arithmetic": [], "task_arithmetic + boost": []}
for n in accuracy_counts:
    tau_n = sb.merge(jax.tree_util.tree_map(lambda x: x[:n], tvs), "task_arithmetic")
    accuracy["task_arithmetic"].append(normalized_test_accuracy(tau_n, n))
    accuracy["task_arithmetic + boost"].append(normalized_test_accuracy(sb.subspace_boost(tau_n, beta=0.01), n))

fig, (ax_rank, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
for method, result in collapse.items():
    ax_rank.plot(counts, mean_over_layers(result.stable_rank), marker="o", linestyle="--", label=method)
    ax_rank.plot(counts, mean_over_layers(result.stable_rank_boosted), marker="o", label=method + " + boost")
ax_rank.set_xlabel("number of merged experts")
ax_rank.set_ylabel("mean stable rank")
ax_rank.set_yscale("log")
ax_rank.legend(fontsize="small")
for label, values in accuracy.items():
    ax_acc.plot(accuracy_counts, values, marker="o", linestyle="-" if "boost" in label else "--", label=label)
ax_acc.plot(accuracy_counts, [np.mean(pretrained_acc[:n] / expert_acc[:n]) for n in accuracy_counts],
            color="grey", linestyle=":", label="pretrained")
ax_acc.set_xlabel("number of merged experts")
ax_acc.set_ylabel("normalized test accuracy")
ax_acc.legend(fontsize="small")
for ax in (ax_rank, ax_acc):
    ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(OUT / "rank_and_accuracy_vs_experts.png", dpi=120)
plt.show()

# %% [markdown]
# Everything above works on any stacked task vectors: for real CLIP experts,
# convert them (`04_bring_your_own_checkpoints.ipynb`), load them with
# `sb.load_experts(base_dir, expert_dirs)` and call `sb.rank_collapse`; or run
# `subboost analyze EXPERT_DIRS --base BASE_DIR --out analysis/` for the same
# figures from the command line.
