"""The conventions of the reference implementations, as keyword arguments.

``sb.reference_settings(method)`` returns the keyword arguments with which a
subboost method reproduces the official code of that method on a CLIP vision
tower converted by subboost (`subboost.convert`). subboost's own defaults are
the clean definitions of REFERENCE.md; the published tables were computed
with the choices below, and each one moves the numbers.

Which parameters are matrices (every SVD-based method):

* subboost default: kernels of Dense layers and the q/k/v/out attention
  kernels (q, k, v separately); the final projection ``proj`` and the
  positional embedding are averaged like biases.
* TSV-M, Iso-C, Iso-CTS reference (official TSV and Iso-C code, as ported to
  FusionBench: ``tanganke/fusion_bench``, ``fusion_bench/method/
  task_singular_vector/utils/TSVM_utils.py`` (``compute_and_sum_svd_mem_reduction``)
  and ``fusion_bench/method/isotropic_merging/iso_utils.py`` (``iso_c``,
  ``iso_cts``), both read for this module; the same rule, ``len(shape) == 2 and
  "text_projection" not in key``, is in the copies the Subspace Boosting
  authors' code carries): every tensor with ``len(shape) == 2`` of the state
  dict is a matrix, everything else is averaged. On an open_clip tower that is ``attn.in_proj_weight`` as one
  ``(3D, D)`` matrix (``attention="full"``), ``attn.out_proj.weight``, the MLP
  weights, ``proj`` (``(width, embed)``, read as stored) and
  ``positional_embedding`` (``(tokens, width)``, as stored): `every_2d_matrix`.
  On a Hugging Face tower (FusionBench's model pool) q/k/v are separate
  ``Linear`` layers (``attention="per_qkv"``) and the position embedding is an
  ``nn.Embedding`` weight ``(tokens, width)``: `every_2d_matrix_hf`.
* Subspace Boosting reference: the authors' fork of mergekit
  (``subspace_helpers``, function ``subspace_boosting``) has ``svd_thresh`` equal to
  `subboost.subspace_boost`'s default ``beta``
  and a separate ``attn_svd_thresh=0.10`` for the attention input projection
  (in the LLM variant read here its use is commented out). FusionBench's port
  (``subspace_boosting`` utilities on an unreleased branch; not in the 0.2.33
  release) boosts ``attn.in_proj_weight`` with ``attn_beta`` (per q/k/v by
  default, "recommended" there), ``attn.out_proj``, ``c_fc``, ``c_proj`` with
  ``beta``, and also ``model.visual.proj``; positional embeddings are not in its
  target keys: `boosted_matrix`. Hence ``attention="per_qkv"`` and
  ``attn_beta`` on q/k/v only (the output projection keeps ``beta``).

Other reference choices (hyper-parameters and selection, not keyword arguments
of one call; see `subboost.eval` and ``experiments/run_suite.py``):

* TIES (TALL-masks / Consensus code): the global top-k runs over the flattened
  *whole* CLIP checkpoint the task-vectors code keeps, i.e. the vision tower
  plus the text token embedding, positional embedding, ``ln_final``,
  ``text_projection`` and ``logit_scale`` (their task vector is zero). "20%"
  there keeps ``reference_ties_k(backbone)`` of the vision weights: 25.8%
  (ViT-B/32), 25.9% (ViT-B/16), 22.5% (ViT-L/14). subboost's ``k`` stays a
  fraction of the vision weights; pass ``k=reference_ties_k(backbone)`` to match.
* Consensus (TALL): per-task lambda in {0.2, ..., 0.6} chosen on that task's
  validation split at merging coefficient 1.0, then alpha tuned
  (`subboost.eval.tune_tall_lambdas` with ``alpha=1.0``); Consensus-TIES masks
  are built from the TIES vector and TIES uses a disjoint *sum*
  (``reference_settings("consensus_ties")``).
* Alpha chosen by the mean *normalized* validation accuracy.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from subboost.errors import SubboostError
from subboost.grids import DEFAULT_BETA
from subboost.merging.consensus import consensus
from subboost.merging.ties import ties
from subboost.tree import MatrixLayout, layout_from_name

REFERENCE_BETA = DEFAULT_BETA  # the authors' svd_thresh, subspace_boost's default
REFERENCE_ATTN_BETA = 0.10
FAMILIES = ("clip", "hf_clip")
METHODS = ("tsv", "iso_c", "iso_cts", "subspace_boost", "ties", "consensus", "consensus_ties")

# The text-tower tensors the task-vectors code keeps in its "image encoder"
# checkpoint (open_clip's text transformer is deleted, these stay), per backbone:
# (vocabulary, context length, text width).
_TEXT_LEFTOVERS = {"ViT-B/32": (49408, 77, 512), "ViT-B/16": (49408, 77, 512), "ViT-L/14": (49408, 77, 768)}


def _kernel_layout(path: str, leaf: Any) -> MatrixLayout | None:
    ndim = len(np.shape(leaf))
    layout = layout_from_name(path, ndim)
    return layout if ndim == layout.ndim else None


# Leaves that are 2-D tensors in the PyTorch state dict besides the weights of
# Linear layers (kernels here). Attention biases are 2-D here, (heads, head_dim),
# but 1-D in PyTorch: not matrices.
TORCH_2D_LEAVES = ("proj", "positional_embedding")


def every_2d_matrix(path: str, leaf: Any) -> MatrixLayout | None:
    """Every 2-D tensor of an open_clip tower's state dict, as the official TSV / Iso code.

    Kernels (Dense 2-D, attention 3-D) in their usual layout; ``proj`` and
    ``positional_embedding`` as stored, which is open_clip's own orientation.
    The 4-D patch convolution, biases and norms are not matrices.
    """
    name = path.split("/")[-1]
    if name == "kernel":
        return _kernel_layout(path, leaf)
    return MatrixLayout("matrix") if name in TORCH_2D_LEAVES and len(np.shape(leaf)) == 2 else None


def every_2d_matrix_hf(path: str, leaf: Any) -> MatrixLayout | None:
    """`every_2d_matrix` for a tower converted from Hugging Face ``CLIPVision*``.

    The converter stores ``proj = visual_projection.weight.T`` (or the identity
    for ``CLIPVisionModel``, which has no projection and whose task vector is
    then zero), so its PyTorch matrix is ``proj.T``: read like a Dense kernel.
    """
    if path.split("/")[-1] == "proj" and len(np.shape(leaf)) == 2:
        return MatrixLayout("dense")
    return every_2d_matrix(path, leaf)


def boosted_matrix(path: str, leaf: Any) -> MatrixLayout | None:
    """What the reference Subspace Boosting touches on an open_clip tower.

    Every kernel (attention and MLP) plus the vision projection ``proj``
    (FusionBench's port lists ``visual.proj`` among its targets); the
    positional embedding is not boosted.
    """
    if path.split("/")[-1] == "kernel":
        return _kernel_layout(path, leaf)
    if path.split("/")[-1] == "proj" and len(np.shape(leaf)) == 2:
        return MatrixLayout("matrix")
    return None


def boosted_matrix_hf(path: str, leaf: Any) -> MatrixLayout | None:
    """`boosted_matrix` for a Hugging Face-converted tower (``proj`` read as ``proj.T``)."""
    if path.split("/")[-1] == "proj" and len(np.shape(leaf)) == 2:
        return MatrixLayout("dense")
    return boosted_matrix(path, leaf)


def vision_parameter_count(backbone: str) -> int:
    """Parameters of a CLIP vision tower (open_clip layout, MLP width 4 * width)."""
    from subboost.models import clip_vit

    c = clip_vit.get_config(backbone)
    w, tokens = c.width, c.num_tokens
    block = 12 * w * w + 13 * w  # in_proj (3w^2 + 3w), out_proj (w^2 + w), MLP (8w^2 + 5w), 2 LayerNorms (4w)
    return (w * c.in_channels * c.patch_size ** 2 + w + tokens * w + 2 * w + c.layers * block + 2 * w
            + w * c.embed_dim)


def reference_ties_k(backbone: str, k: float = inspect.signature(ties).parameters["k"].default) -> float:
    """Fraction of the vision weights the reference TIES keeps when told ``k``.

    The reference ranks over the vision tower plus the text tensors its image
    encoder checkpoint keeps (zero task vector): it keeps ``k * N_total``
    entries, all from the vision tower, i.e. ``k * N_total / N_vision`` of it.
    """
    key = backbone.replace("-", "/").replace("ViT/", "ViT-") if backbone.startswith("ViT") else backbone
    if key not in _TEXT_LEFTOVERS:
        raise SubboostError(f"reference_ties_k: no reference checkpoint layout for {backbone!r}; "
                         f"known: {sorted(_TEXT_LEFTOVERS)}.")
    from subboost.models import clip_vit

    vocab, context, text_width = _TEXT_LEFTOVERS[key]
    embed = clip_vit.get_config(key).embed_dim
    text = vocab * text_width + context * text_width + 2 * text_width + text_width * embed + 1
    vision = vision_parameter_count(key)
    return min(1.0, k * (vision + text) / vision)


def reference_settings(method: str, family: str = "clip") -> dict[str, Any]:
    """Keyword arguments reproducing ``method``'s official code on a converted CLIP tower.

    Args:
      method: ``"tsv"``, ``"iso_c"``, ``"iso_cts"`` (for `subboost.merge`),
        ``"subspace_boost"`` (for `subboost.subspace_boost`), ``"ties"``,
        ``"consensus"`` or ``"consensus_ties"`` (for `subboost.merge` with
        method ``"ties"`` / ``"consensus"``).
      family: ``"clip"`` for towers converted from open_clip / OpenAI CLIP
        (``in_proj_weight``, as the official TSV, Iso-C and Subspace Boosting
        code), ``"hf_clip"`` for towers converted from Hugging Face
        ``CLIPVisionModel`` (separate q/k/v, as FusionBench).

    Returns:
      A new dict; see the module docstring for where each value comes from:

      * ``tsv`` / ``iso_c`` / ``iso_cts``: ``attention="full"`` (``clip``) or
        ``"per_qkv"`` (``hf_clip``) and ``is_matrix`` = every 2-D tensor.
      * ``subspace_boost``: ``beta`` its default, ``attn_beta=0.10``, ``mode="cumsum"``,
        ``attention="per_qkv"`` (in_proj split into q, k, v as FusionBench's
        port does by default) and ``is_matrix`` = kernels plus ``proj``.
        ``rank_rtol`` is left at ``None``, the reference's behaviour.
      * ``ties``: ``merge="mean"`` (TALL's "dis-mean"); ``k`` is the caller's
        (see `reference_ties_k`).
      * ``consensus``: ``min_tasks=2`` (Consensus-TA); ``consensus_ties``: adds
        ``base="ties"``, ``merge="sum"`` and ``mask_from="merged"`` (masks from
        the TIES vector). The lambdas are tuned per task (`subboost.eval`).
    """
    if family not in FAMILIES:
        raise SubboostError(f"reference_settings: family must be one of {FAMILIES}, got {family!r}.")
    hf = family == "hf_clip"
    if method in ("tsv", "iso_c", "iso_cts"):
        return {"attention": "per_qkv" if hf else "full", "is_matrix": every_2d_matrix_hf if hf else every_2d_matrix}
    if method in ("subspace_boost", "boost"):
        return {"beta": REFERENCE_BETA, "attn_beta": REFERENCE_ATTN_BETA, "mode": "cumsum", "attention": "per_qkv",
                "is_matrix": boosted_matrix_hf if hf else boosted_matrix}
    if method == "ties":
        return {"merge": "mean"}
    min_tasks = inspect.signature(consensus).parameters["min_tasks"].default  # Consensus-TA's own default
    if method == "consensus":
        return {"min_tasks": min_tasks}
    if method == "consensus_ties":
        return {"min_tasks": min_tasks, "base": "ties", "merge": "sum", "mask_from": "merged"}
    raise SubboostError(f"reference_settings: unknown method {method!r}; known: {METHODS}.")
