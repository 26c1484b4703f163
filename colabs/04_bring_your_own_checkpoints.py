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
# # Bring your own checkpoints: convert open_clip / Hugging Face experts and run a suite
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/subboost/blob/main/colabs/04_bring_your_own_checkpoints.ipynb)
#
# subboost works on Flax parameter pytrees. This notebook
#
# 1. converts PyTorch checkpoints -- open_clip / OpenAI CLIP state dicts, whole
#    pickled `ImageEncoder` modules of the task-vector codebases, Hugging Face
#    `CLIPVisionModel(WithProjection)` / `CLIPModel` directories, classification
#    heads -- into orbax checkpoints, and checks that the Flax model computes the
#    same features as PyTorch;
# 2. loads the experts as task vectors and runs a small suite: merge, boost,
#    choose `alpha` (and `beta`) on validation, report test accuracy, absolute and
#    normalized to the experts.
#
# **Offline by default.** With `USE_REAL_CHECKPOINTS = False` (below) the notebook
# builds tiny *random* open_clip and Hugging Face models itself, "fine-tunes" them
# by adding noise, and evaluates on `tfds.testing.mock_data` (random images)
# labelled by each task's own expert, so "accuracy" there means agreement with the
# experts (experts score 100% by construction) and says nothing about real tasks.
# It runs anywhere in about a minute. Set the flag to `True` and fill in the paths to convert and evaluate real
# checkpoints: that needs the checkpoint files, the prepared tensorflow-datasets
# (nothing is downloaded), and preferably a GPU.

# %%
# Install subboost if it is not importable (on Colab). A local checkout installed with
# `pip install -e ".[test]"` -- and CI -- already has it, so this never reaches the network there.
# On Colab, if pip upgraded jax, restart the session once (Runtime > Restart session).
# Colab already provides torch, transformers and tensorflow-datasets; open_clip is installed here.
try:
    import subboost  # noqa: F401
except ImportError:
    import subprocess
    import sys

    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "open-clip-torch",
                           "subboost[viz,convert] @ git+https://github.com/OWNER/subboost"])

# %%
# True: convert and evaluate real checkpoints (needs the files below, prepared tfds datasets, ideally a GPU).
USE_REAL_CHECKPOINTS = False

# Used only when USE_REAL_CHECKPOINTS is True -- adapt to where your files are. Expected layout:
#   REAL_SOURCES/zeroshot.pt                 pretrained image encoder (state dict or pickled ImageEncoder)
#   REAL_SOURCES/finetuned/<Task>.pt         one expert per task (or a Hugging Face model directory)
#   REAL_SOURCES/heads/head_<Task>.pt        one classification head per task
REAL_SOURCES = "/content/drive/MyDrive/task_vectors/ViT-B-32"
REAL_BACKBONE = "ViT-B/32"                    # architecture the converted weights are checked against
REAL_DATA_DIR = "~/tensorflow_datasets"       # prepared tfds datasets (+ GTSRB/FER2013/RenderedSST2 folders)
REAL_TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")  # the 8-task suite

# %%
import contextlib
import os
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import subboost as sb
from subboost import data as sbdata
from subboost.data.preprocessing import normalize_images
from subboost.evaluation import LINEAR_ALPHAS, Evaluator, select_alpha_beta, summarize
from subboost.models import ClassificationHead, CLIPVisionTransformer, get_config

WORK = Path(tempfile.mkdtemp(prefix="subboost_byo_"))  # converted checkpoints go here (a fresh directory)
CKPT = WORK / "checkpoints"
print("working directory:", WORK)

# %% [markdown]
# ## 1. Source checkpoints
#
# Offline, we make the files a real run would bring: a tiny open_clip CLIP model
# (`image_size=32, patch_size=8, width=32, 2 layers, 2 heads`, projection to 16 --
# the architecture `subboost.models.get_config("tiny")` names) as the pretrained
# model, three "experts" that differ from it by small random perturbations of the
# image tower, and one random head per task, saved exactly as the task-vector
# codebases save them (`torch.save(state_dict)`, `head_<Task>.pt` with `weight`
# `(classes, embed)` and `bias`).

# %%
if USE_REAL_CHECKPOINTS:
    SOURCES = Path(REAL_SOURCES).expanduser()
    TASK_NAMES = REAL_TASKS
    model_config = get_config(REAL_BACKBONE)
else:
    import open_clip
    import torch

    SOURCES = WORK / "sources"
    TASK_NAMES = ("EuroSAT", "SVHN", "MNIST")  # tfds tasks: mock_data can stand in for them
    model_config = get_config("tiny")
    (SOURCES / "finetuned").mkdir(parents=True)
    (SOURCES / "heads").mkdir(parents=True)

    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16)  # 2 heads
    text = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    pretrained_torch = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    torch.save(pretrained_torch.state_dict(), SOURCES / "zeroshot.pt")  # a full CLIP: the text tower is skipped

    experts_torch = {}
    for t, task in enumerate(TASK_NAMES):
        expert = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
        expert.load_state_dict(pretrained_torch.state_dict())
        generator = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for p in expert.visual.parameters():
                p.add_(0.1 * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=generator))
        torch.save(expert.state_dict(), SOURCES / "finetuned" / f"{task}.pt")
        experts_torch[task] = expert

        classes = sbdata.get_task(task).num_classes
        weight = torch.nn.functional.normalize(torch.randn(classes, 16, generator=generator), dim=-1) * 100
        torch.save({"weight": weight, "bias": torch.zeros(classes)}, SOURCES / "heads" / f"head_{task}.pt")

print(sorted(str(p.relative_to(SOURCES)) for p in SOURCES.rglob("*.pt")))

# %% [markdown]
# ## 2. Convert
#
# `sb.convert(src, dst, config=...)` detects the format (`format="auto"`), checks
# every tensor against the architecture, and writes an orbax checkpoint with a
# `subboost.json` (architecture, source format, sha256 of the source) -- atomically,
# refusing to overwrite an existing `dst` unless `overwrite=True`. Pickled modules
# are read with a restricted unpickler that never imports or runs their code. The
# command line does the same: `subboost convert zeroshot.pt checkpoints/zeroshot
# --config ViT-B/32`.

# %%
def source(path: Path) -> Path:
    """``x.pt`` or a Hugging Face directory ``x/``."""
    return path if path.exists() else path.with_suffix("")


start = time.perf_counter()
sb.convert(source(SOURCES / "zeroshot.pt"), CKPT / "zeroshot", config=model_config)
for task in TASK_NAMES:
    sb.convert(source(SOURCES / "finetuned" / f"{task}.pt"), CKPT / "finetuned" / task, config=model_config)
    sb.convert(SOURCES / "heads" / f"head_{task}.pt", CKPT / "heads" / task)
print(f"converted {1 + 2 * len(TASK_NAMES)} checkpoints in {time.perf_counter() - start:.1f} s")
info = sb.checkpoint_info(CKPT / "zeroshot")
print({k: info[k] for k in ("kind", "architecture")}, "| source:", info["source"]["format"], info["source"]["contents"])

# %% [markdown]
# **Parity check.** The converted Flax model must compute the features of the
# PyTorch model (NCHW in PyTorch, NHWC in Flax; both take normalised images).

# %%
if not USE_REAL_CHECKPOINTS:
    flax_model = CLIPVisionTransformer(model_config)
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    for name, module, ckpt in [("zeroshot", pretrained_torch, CKPT / "zeroshot")] + [
        (task, experts_torch[task], CKPT / "finetuned" / task) for task in TASK_NAMES
    ]:
        with torch.no_grad():
            expected = module.encode_image(torch.from_numpy(images)).numpy()
        ours = np.asarray(flax_model.apply({"params": sb.load_params(ckpt)}, jnp.asarray(images.transpose(0, 2, 3, 1))))
        print(f"{name:10s} max |flax - torch| = {np.abs(ours - expected).max():.1e}  (features up to {np.abs(expected).max():.2f})")

# %% [markdown]
# ### Hugging Face checkpoints
#
# A directory written by `save_pretrained` (`config.json` + `model.safetensors`)
# converts the same way. Offline we build a tiny random `CLIPVisionModelWithProjection`
# of the same architecture; for a real one, pass the directory of e.g.
# `openai/clip-vit-base-patch32` that you downloaded beforehand.

# %%
if not USE_REAL_CHECKPOINTS:
    import transformers

    hf_config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8,
                                              projection_dim=16, hidden_act="quick_gelu")
    torch.manual_seed(1)
    hf_model = transformers.CLIPVisionModelWithProjection(hf_config).eval()
    hf_model.save_pretrained(WORK / "hf_model", safe_serialization=True)

    converted = sb.convert(WORK / "hf_model", WORK / "hf_checkpoint", config=model_config)
    with torch.no_grad():
        expected = hf_model(pixel_values=torch.from_numpy(images)).image_embeds.numpy()
    ours = np.asarray(flax_model.apply({"params": sb.load_params(WORK / "hf_checkpoint")},
                                       jnp.asarray(images.transpose(0, 2, 3, 1))))
    print("Hugging Face:", converted.metadata["source"]["format"], "| max |flax - torch| =",
          f"{np.abs(ours - expected).max():.1e}")

# %% [markdown]
# ## 3. Task vectors
#
# `sb.load_experts(base, experts)` restores the checkpoints, checks that every
# expert has the base's architecture, parameters, shapes and dtypes (listing every
# mismatch), and returns the stacked task vectors `theta_t - theta_0`.

# %%
base = sb.load_params(CKPT / "zeroshot")
tvs = sb.load_experts(CKPT / "zeroshot", [CKPT / "finetuned" / task for task in TASK_NAMES])
heads = {task: sb.load_params(CKPT / "heads" / task) for task in TASK_NAMES}
print("experts:", len(TASK_NAMES), "| proj task vectors:", tvs["proj"].shape,
      "| stable rank of the TA merge (mean):",
      round(float(np.mean([float(np.mean(v)) for v in sb.stable_rank(sb.merge(tvs, "task_arithmetic")).values()])), 2))

# %% [markdown]
# ## 4. Run a suite
#
# Data comes from `subboost.data`: tensorflow-datasets builders (and ImageFolder
# directories for GTSRB, FER2013, RenderedSST2), CLIP preprocessing (resize,
# center crop), the paper's validation/test splits; nothing is ever downloaded.
# Offline, `tfds.testing.mock_data` replaces the datasets by random images, and we
# relabel them with each task's expert (random labels would leave every model at
# chance).
#
# `Evaluator.for_clip(config, heads)` evaluates Flax CLIP parameters with one head
# per task (batched, jit-compiled). `select_alpha_beta` picks `(beta, alpha)` on
# validation -- boosting once per `beta`, since boosting commutes with scaling --
# and the choice is scored on test.

# %%
if USE_REAL_CHECKPOINTS:
    data_context = contextlib.nullcontext()
    DATA_DIR, MAX_VAL, MAX_TEST, ALPHAS = os.path.expanduser(REAL_DATA_DIR), 2000, None, LINEAR_ALPHAS
else:
    import tensorflow_datasets as tfds

    data_context = tfds.testing.mock_data(num_examples=32)
    DATA_DIR, MAX_VAL, MAX_TEST, ALPHAS = None, 32, 32, (0.25, 0.5, 1.0, 2.0)

start = time.perf_counter()
with data_context:
    splits = {
        split: {task: sbdata.split_arrays(task, split, data_dir=DATA_DIR, image_size=model_config.image_size,
                                          max_examples=MAX_VAL if split == "validation" else MAX_TEST)
                for task in TASK_NAMES}
        for split in ("validation", "test")
    }
print(f"loaded {len(TASK_NAMES)} tasks x 2 splits in {time.perf_counter() - start:.1f} s;",
      {task: images.shape for task, (images, _) in splits["test"].items()})

experts = {task: sb.load_params(CKPT / "finetuned" / task) for task in TASK_NAMES}
if not USE_REAL_CHECKPOINTS:  # mock labels are random: use the experts' predictions instead
    encoder = CLIPVisionTransformer(model_config)
    for split in splits.values():
        for task, (images, _) in split.items():
            head = heads[task]
            features = encoder.apply({"params": experts[task]}, normalize_images(images))
            logits = ClassificationHead(head["kernel"].shape[1]).apply({"params": head}, features)
            split[task] = (images, np.asarray(jnp.argmax(logits, axis=-1), np.int32))

evaluator = Evaluator.for_clip(model_config, heads, batch_size=256 if USE_REAL_CHECKPOINTS else 32,
                               num_classes={task: sbdata.get_task(task).num_classes for task in TASK_NAMES})
validation = {task: evaluator.prepare(task, *arrays) for task, arrays in splits["validation"].items()}
test = {task: evaluator.prepare(task, *arrays) for task, arrays in splits["test"].items()}

zeroshot_test = evaluator.accuracies(base, test)
expert_test = {task: evaluator.accuracy(experts[task], task, test[task]) for task in TASK_NAMES}
print("zero-shot:", zeroshot_test, "| experts:", expert_test)

# %%
rows = {"zero-shot": summarize(zeroshot_test, expert_test)}
for method, kwargs in [("task_arithmetic", {}), ("ties", {"k": 0.2})]:
    tau = sb.merge(tvs, method, **kwargs)
    for betas, label in [((None,), method), ((0.0, 0.01, 0.02), method + " + boost")]:
        sweep = select_alpha_beta(base, tau, lambda params: evaluator.accuracies(params, validation),
                       alphas=ALPHAS, betas=betas, progress=False, description=label)
        chosen = tau if sweep.beta is None else sb.subspace_boost(tau, beta=sweep.beta)
        accuracies = evaluator.accuracies(sb.apply_task_vector(base, chosen, alpha=sweep.alpha), test)
        rows[f"{label} (alpha={sweep.alpha:g}" + (f", beta={sweep.beta:g})" if sweep.beta is not None else ")")] = \
            summarize(accuracies, expert_test)
rows["experts"] = summarize(expert_test, expert_test)

print(f"{'':44s} {'abs':>6s} {'norm':>6s}  " + "  ".join(f"{t:>8s}" for t in TASK_NAMES))
for label, s in rows.items():
    print(f"{label:44s} {s['average_absolute']:6.1%} {s['average_normalized']:6.1%}  "
          + "  ".join(f"{s['per_task'][t]:8.1%}" for t in TASK_NAMES))
if not USE_REAL_CHECKPOINTS:
    print("\n(offline: random models, random images labelled by the experts -- agreement, not accuracy)")

# %% [markdown]
# ## The paper's tables
#
# For the full 8 / 14 / 20-task tables (every method, boosting on and off, the
# paper's alpha grids, resumable, one JSON per cell) use the suite runner from a
# checkout of the repository, on a GPU/TPU host, with the checkpoints converted as
# above into `CKPT_DIR/{zeroshot, finetuned/<Task>, heads/<Task>}`:
#
# ```
# python -m experiments.run_suite --config experiments/configs/vit_b32.py:suites=8+14+20 \
#     --checkpoints CKPT_DIR --data_dir ~/tensorflow_datasets --out results/
# ```
#
# The cell below runs it when `USE_REAL_CHECKPOINTS` is `True` and the notebook
# runs inside that checkout. A single checkpoint (e.g. a merge written by `subboost
# merge`) is scored with `subboost eval CKPT --heads CKPT_DIR/heads --tasks 8
# --data_dir ~/tensorflow_datasets`.

# %%
if USE_REAL_CHECKPOINTS:
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "experiments.run_suite",
                    "--config", "experiments/configs/vit_b32.py:suites=8",
                    "--checkpoints", str(CKPT), "--data_dir", DATA_DIR, "--out", "results"], check=True)
else:
    print("USE_REAL_CHECKPOINTS is False: skipping the full suite run (it needs real checkpoints and datasets).")
