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
# # subboost quickstart: merge experts, boost, sweep alpha, read spectra
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/subboost/blob/main/colabs/01_quickstart.ipynb)
#
# This notebook runs on a CPU, offline: about a minute the first time (it trains the
# tiny models), well under a minute afterwards. It uses the library's
# **mini-benchmark** (`subboost.bench`, size `tiny`): ten generated 16x16 image
# tasks, a small CLIP-style ViT pretrained on all of them, and one fine-tuned
# expert per task. We
#
# 1. turn the experts into task vectors `tau_t = theta_t - theta_0`,
# 2. merge them (Task Arithmetic, TIES) and apply **Subspace Boosting**
#    (arXiv 2506.16506),
# 3. choose the scaling `alpha` on validation data and report test accuracy,
# 4. read the spectra of the merged task vector (stable rank before / after boosting).
#
# The same calls work on real CLIP checkpoints: see
# `04_bring_your_own_checkpoints.ipynb`.

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
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import subboost as sb
from subboost.bench.suites.vision import get_config, load_or_train
from subboost.bench.suites.vision import evaluate as bench_eval

print("subboost", sb.__version__, "| jax", jax.__version__, "| backend:", jax.default_backend())

# %% [markdown]
# ## The tiny benchmark models
#
# `get_config("tiny")` describes everything: the ViT (2 blocks, width 32), the
# tasks, the training schedule. Trained models are cached as orbax checkpoints
# under `SUBBOOST_BENCH_CACHE` (default `~/.cache/subboost/bench`), keyed by a
# hash of the training settings: the first notebook you run trains them (about
# 30-60 s on a CPU), the others load them in a second. `subboost demo --size tiny
# --cache-dir DIR` writes the same cache.

# %%
CACHE_DIR = Path(os.environ.get("SUBBOOST_BENCH_CACHE", "~/.cache/subboost/bench")).expanduser()
models = load_or_train(get_config("tiny"), seed=0, cache_dir=CACHE_DIR)  # trains on first use
config, data, base, heads, experts = models.config, models.data, models.base, models.heads, models.experts
task_names = models.task_names
num_tasks = len(task_names)
print(num_tasks, "tasks:", ", ".join(task_names))

# %% [markdown]
# `base` is a parameter pytree (nested dicts, scenic-CLIP names); `experts` holds
# the ten fine-tuned encoders stacked on a leading axis. `sb.task_vectors` takes
# the pretrained parameters and a list of fine-tuned ones and stacks
# `theta_t - theta_0` on a new leading expert axis.

# %%
expert_list = [jax.tree_util.tree_map(lambda x, t=t: x[t], experts) for t in range(num_tasks)]
tvs = sb.task_vectors(base, expert_list)
print(jax.tree_util.tree_map(jnp.shape, tvs["transformer"]["resblocks_0"]["mlp"]))

# %% [markdown]
# ## Reference accuracies: pretrained model and experts
#
# Each task has a frozen classification head on top of the shared encoder;
# `subboost.bench.suites.vision.evaluate` computes the accuracies of all ten tasks in one
# jit-compiled call. Normalized accuracy = merged accuracy / the task's expert accuracy.

# %%
EVAL = dict(model=config.model, batch=config.eval_batch)  # static settings of the compiled evaluations
heads_j = jax.tree_util.tree_map(jnp.asarray, heads)
val_x, val_y = jnp.asarray(data.val.images), jnp.asarray(data.val.labels)
test_x, test_y = jnp.asarray(data.test.images), jnp.asarray(data.test.labels)

pretrained_acc = np.asarray(bench_eval.accuracies(base, test_x, test_y, heads_j, **EVAL))
expert_acc = np.asarray(bench_eval.expert_accuracies(experts, test_x, test_y, heads_j, **EVAL))
for name, zs, ex in zip(task_names, pretrained_acc, expert_acc):
    print(f"{name:24s} pretrained {zs:6.1%}   expert {ex:6.1%}")
print(f"{'mean':24s} pretrained {pretrained_acc.mean():6.1%}   expert {expert_acc.mean():6.1%}")

# %% [markdown]
# ## Merge, boost, sweep alpha
#
# `sb.merge(tvs, method, **hyper_parameters)` returns one merged task vector with
# the structure of `base`. `sb.subspace_boost(tau, beta=beta)` takes the SVD of each of
# its matrices, finds the first index `k` at which the cumulative sum of singular
# values reaches a fraction `beta` of their total, and raises every smaller
# singular value to `s_k`. With the paper's `beta = 0.01` on these small 32-wide
# matrices `k` is 0: the spectrum becomes flat. `sb.apply_task_vector(base, tau,
# alpha=...)` gives `theta_0 + alpha * tau`.
#
# Boosting commutes with scaling by `alpha`, so we boost once and sweep `alpha`
# over a log grid with `bench_eval.alpha_sweep` (one compiled program for every
# alpha). The choice is made on validation data; test accuracy is reported at
# the chosen alpha.

# %%
alphas = np.asarray(config.alphas)  # 0.01 * 2^k, k = 0..9
merged = {
    "task_arithmetic": sb.merge(tvs, "task_arithmetic"),
    "ties": sb.merge(tvs, "ties", k=0.2),
}
candidates = {}
for method, tau in merged.items():
    candidates[method] = tau
    candidates[method + " + boost"] = sb.subspace_boost(tau, beta=0.01)

val_curves, results = {}, {}
for label, tau in candidates.items():
    val = bench_eval.alpha_sweep(base, tau, alphas, val_x, val_y, heads_j, **EVAL)  # (A, T)
    val_curves[label] = (val / expert_acc).mean(axis=1)
    best = int(np.argmax(val.mean(axis=1)))
    test = bench_eval.alpha_sweep(base, tau, [alphas[best]], test_x, test_y, heads_j, **EVAL)[0]
    results[label] = {"alpha": float(alphas[best]), "absolute": float(test.mean()),
                      "normalized": float((test / expert_acc).mean()),
                      "on_edge": best in (0, len(alphas) - 1)}

print(f"{'method':24s} {'alpha':>6s} {'test abs':>9s} {'test norm':>10s}")
print(f"{'pretrained':24s} {'-':>6s} {pretrained_acc.mean():9.1%} {(pretrained_acc / expert_acc).mean():10.1%}")
for label, r in results.items():
    edge = "  (alpha on the grid's edge)" if r["on_edge"] else ""
    print(f"{label:24s} {r['alpha']:6.2f} {r['absolute']:9.1%} {r['normalized']:10.1%}{edge}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for label, curve in val_curves.items():
    ax.plot(alphas, curve, marker="o", markersize=3, linestyle="--" if "boost" not in label else "-", label=label)
ax.set_xscale("log")
ax.set_xlabel("alpha")
ax.set_ylabel("normalized validation accuracy")
ax.set_title(f"Merging {num_tasks} experts (tiny benchmark)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# The final model is an ordinary parameter pytree:

# %%
best = max(results, key=lambda k: results[k]["normalized"])
params = sb.apply_task_vector(base, candidates[best], alpha=results[best]["alpha"])
print("best on test:", best, "| same structure as base:",
      jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(base))

# %% [markdown]
# ## Reading spectra
#
# `sb.spectra(tau)` returns the singular values of every matrix of a task
# vector, keyed by module path (Flax kernels are read in PyTorch orientation
# `(out, in)`; attention query/key/value/out are separate matrices). From them:
#
# * stable rank `sum_i s_i^2 / s_0^2` (`sb.stable_rank`),
# * energy rank: directions holding 95% of `sum_i s_i^2` (`sb.energy_rank`).
#
# A merged task vector whose stable rank is far below its size is dominated by
# a few directions: **rank collapse**. Boosting restores the neglected ones.

# %%
tau = merged["task_arithmetic"]
boosted = candidates["task_arithmetic + boost"]
spectrum, spectrum_boosted = sb.spectra(tau), sb.spectra(boosted)
rank, rank_boosted = sb.stable_rank(tau), sb.stable_rank(boosted)
energy, energy_boosted = sb.energy_rank(tau), sb.energy_rank(boosted)
assert all(float(rank_boosted[p]) >= float(rank[p]) - 1e-3 for p in rank)  # boosting never lowers the stable rank
print(f"{'matrix':38s} {'size':>5s} {'stable rank':>12s} {'boosted':>8s} {'energy rank':>12s} {'boosted':>8s}")
for path in spectrum:
    print(f"{path:38s} {spectrum[path].shape[-1]:5d} {float(rank[path]):12.2f} {float(rank_boosted[path]):8.2f}"
          f" {int(energy[path]):12d} {int(energy_boosted[path]):8d}")

# %%
layer = "transformer/resblocks_1/mlp/c_fc"
fig, ax = plt.subplots(figsize=(6, 3.5))
for label, s in (("task arithmetic", spectrum[layer]), ("+ boost (beta=0.01)", spectrum_boosted[layer])):
    s = np.asarray(s)
    ax.semilogy(np.arange(1, s.size + 1), s / s[0], marker=".", label=label)
ax.set_xlabel("index i")
ax.set_ylabel("s_i / s_0")
ax.set_title(f"Spectrum of the merged task vector: {layer}")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# Next: `02_rank_collapse.ipynb` follows these spectra as more experts are merged;
# `03_hogsvd.ipynb` compares the experts in a shared HO-GSVD basis.
