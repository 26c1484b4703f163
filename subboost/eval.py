"""Accuracy of merged image encoders on per-task heads, and the alpha / beta search.

Metrics, per task t of a suite of T tasks::

    acc_t       = (1/N_t) sum_i [argmax_c logits_t(x_i)_c == y_i]
    average     = (1/T) sum_t acc_t                         ("absolute")
    norm_t      = acc_t(merged) / acc_t(expert t)           (normalized accuracy)
    average_norm= (1/T) sum_t norm_t

Hyper-parameter search (validation split; the chosen setting is then scored
on test)::

    for beta in betas:                   # None = no boosting
        tau_b = subspace_boost(tau, beta=beta)          # every beta from one SVD (subspace_boost_sweep)
        for alpha in alphas:
            theta = theta_0 + alpha * tau_b          # boost(a tau) = a boost(tau)
            score = mean_t acc_t(theta, validation)
    pick the first (beta, alpha) with the highest score   # `subboost.selection`

Subspace Boosting commutes with positive scaling, so boosting once per beta
serves the whole alpha sweep; no SVD runs inside the alpha loop.

Evaluation is batched and jit-compiled: one compiled encoder call per batch
shape (shared by all tasks and all sweep points), one small compiled head per
class count, counts of correct predictions accumulated on the device and read
back once per evaluation. The last batch is padded to the batch size and masked,
so no shape changes cause recompilation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subboost import grids
from subboost.data.preprocessing import CLIP_MEAN, CLIP_STD, normalize_images
from subboost.models.heads import ClassificationHead
from subboost.selection import check_grid, choose
from subboost.tree import PyTree

__all__ = [
    "ALPHA_METRICS",
    "BETAS",
    "LINEAR_ALPHAS",
    "SVD_ALPHAS",
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

EncodeFn = Callable[[PyTree, jax.Array], jax.Array]

# Grids of the paper (validation sweep; `subboost.grids`): linear merges and SVD-based merges.
LINEAR_ALPHAS: tuple[float, ...] = grids.PAPER_LINEAR_ALPHAS
SVD_ALPHAS: tuple[float, ...] = grids.PAPER_SVD_ALPHAS
BETAS: tuple[float, ...] = grids.PAPER_BETAS
TALL_LAMBDAS: tuple[float, ...] = grids.TALL_LAMBDAS
SVD_METHODS: frozenset[str] = frozenset({"tsv", "iso_c", "iso_cts"})


def alpha_grid(method: str) -> tuple[float, ...]:
    """The paper's alpha grid: 0.1..3.0 for SVD methods (TSV-M, Iso-C, Iso-CTS), 0.1..1.0 otherwise.

    Weight averaging already divides by T: it has no alpha (``(1.0,)``).
    """
    if method == "weight_averaging":
        return (1.0,)
    return SVD_ALPHAS if method in SVD_METHODS else LINEAR_ALPHAS


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------
def _mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return float(sum(values) / len(values)) if values else float("nan")


def normalized_accuracies(merged: Mapping[str, float], experts: Mapping[str, float]) -> dict[str, float]:
    """``merged[t] / experts[t]`` per task.

    Raises:
      ValueError: a task without an expert accuracy, or an expert accuracy of 0.
    """
    missing = [t for t in merged if t not in experts]
    if missing:
        raise ValueError(f"normalized accuracy needs the expert accuracy of task(s) {missing}; "
                         f"got experts for {sorted(experts)}.")
    zero = [t for t in merged if not experts[t] > 0]
    if zero:
        raise ValueError(f"normalized accuracy: the expert accuracy of task(s) {zero} is 0, "
                         "so the ratio is undefined.")
    return {t: float(merged[t]) / float(experts[t]) for t in merged}


ALPHA_METRICS = ("normalized", "absolute")


def selection_score(metric: str, expert_accuracies: Mapping[str, float] | None = None
                    ) -> Callable[[Mapping[str, float]], float]:
    """The validation score an alpha (and beta) sweep maximises.

    ``"absolute"``: mean accuracy. ``"normalized"`` (the reference code's
    choice): mean of ``acc_t / acc_t(expert t)`` over the tasks, with the
    experts' *validation* accuracies.
    """
    if metric == "absolute":
        return lambda accs: _mean(accs.values())
    if metric == "normalized":
        if expert_accuracies is None:
            raise ValueError("selection_score: metric 'normalized' needs the experts' validation accuracies.")
        experts = dict(expert_accuracies)
        return lambda accs: _mean(normalized_accuracies(accs, experts).values())
    raise ValueError(f"selection_score: metric must be one of {ALPHA_METRICS}, got {metric!r}.")


def summarize(accuracies: Mapping[str, float], expert_accuracies: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Per-task accuracies, their mean, and (with experts) normalized accuracies and their mean."""
    summary: dict[str, Any] = {
        "per_task": {t: float(a) for t, a in accuracies.items()},
        "average_absolute": _mean(accuracies.values()),
    }
    if expert_accuracies is not None:
        normalized = normalized_accuracies(accuracies, expert_accuracies)
        summary["normalized"] = normalized
        summary["average_normalized"] = _mean(normalized.values())
    return summary


# ----------------------------------------------------------------------------
# Batched evaluation
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A split held on the device as fixed-size batches (the last one padded and masked)."""

    images: tuple[jax.Array, ...]
    labels: tuple[jax.Array, ...]
    mask: tuple[jax.Array, ...]
    num_examples: int


def head_num_classes(head: Mapping[str, Any], *, task: str = "head") -> int:
    """Class count of `ClassificationHead` parameters ``{"kernel": (D, C), "bias": (C,)}``."""
    if not isinstance(head, Mapping) or "kernel" not in head or "bias" not in head:
        keys = sorted(head) if isinstance(head, Mapping) else type(head).__name__
        raise ValueError(f"head of task {task!r} must be ClassificationHead parameters "
                         f"{{'kernel': (embed_dim, num_classes), 'bias': (num_classes,)}}; got {keys}.")
    kernel_shape, bias_shape = tuple(np.shape(head["kernel"])), tuple(np.shape(head["bias"]))
    if len(kernel_shape) != 2 or bias_shape != kernel_shape[1:]:
        raise ValueError(f"head of task {task!r}: kernel {kernel_shape} and bias {bias_shape} do not form "
                         "a (embed_dim, num_classes) / (num_classes,) head.")
    return kernel_shape[1]


def _count_correct(head: PyTree, features: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    logits = ClassificationHead(head["kernel"].shape[1]).apply({"params": head}, features)
    hits = (jnp.argmax(logits, axis=-1) == labels) & mask
    return jnp.sum(hits, dtype=jnp.int32)


_jitted_correct = jax.jit(_count_correct)


@functools.lru_cache(maxsize=None)
def _jitted_features(encode: EncodeFn, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    # Cached per encoder, so evaluators of one model share compiled programs.
    return jax.jit(lambda params, images: encode(params, normalize_images(images, mean, std)))


@functools.lru_cache(maxsize=None)
def _clip_encoder(config: Any) -> EncodeFn:
    from subboost.models.clip_vit import CLIPVisionTransformer

    model = CLIPVisionTransformer(config)
    return lambda params, images: model.apply({"params": params}, images)


class Evaluator:
    """Accuracy of an image encoder with one linear head per task.

    Args:
      encode: ``encode(params, images) -> features (B, D)`` for normalised images.
      heads: ``{task: {"kernel": (D, C), "bias": (C,)}}``.
      num_classes: ``{task: C}`` from the datasets; a head whose class count
        differs raises (the head and the dataset do not belong together).
      batch_size: examples per compiled call.
      mean, std: normalisation applied on the device to uint8 images (CLIP's by
        default); float images are taken as already normalised.

    Example:
      >>> ev = Evaluator.for_clip(get_config("tiny"), heads)          # doctest: +SKIP
      >>> ev.accuracies(params, {"MNIST": (images, labels)})          # doctest: +SKIP
      {'MNIST': 0.91}
    """

    def __init__(
        self,
        encode: EncodeFn,
        heads: Mapping[str, Mapping[str, Any]],
        *,
        num_classes: Mapping[str, int] | None = None,
        batch_size: int = 256,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        self.num_classes = {task: head_num_classes(h, task=task) for task, h in heads.items()}
        self.heads = {task: {"kernel": jnp.asarray(h["kernel"]), "bias": jnp.asarray(h["bias"])}
                      for task, h in heads.items()}
        for task, expected in (num_classes or {}).items():
            if task in self.num_classes and self.num_classes[task] != expected:
                raise ValueError(
                    f"head of task {task!r} has {self.num_classes[task]} classes (kernel shape "
                    f"{tuple(self.heads[task]['kernel'].shape)}), but the dataset has {expected} classes."
                )
        self._features = _jitted_features(encode, tuple(map(float, mean)), tuple(map(float, std)))
        self._correct = _jitted_correct

    @classmethod
    def for_clip(cls, config: Any, heads: Mapping[str, Mapping[str, Any]], **kwargs: Any) -> "Evaluator":
        """An evaluator for `subboost.models.CLIPVisionTransformer` parameters."""
        return cls(_clip_encoder(config), heads, **kwargs)

    def _head(self, task: str) -> PyTree:
        if task not in self.heads:
            raise ValueError(f"no head for task {task!r}; heads exist for {sorted(self.heads)}.")
        return self.heads[task]

    def _check_labels(self, task: str, labels: np.ndarray) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"task {task!r}: labels must be 1-D, got shape {labels.shape}.")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes[task]):
            raise ValueError(f"task {task!r}: labels span {int(labels.min())}..{int(labels.max())}, but the head "
                             f"has {self.num_classes[task]} classes (0..{self.num_classes[task] - 1}).")

    def _pad(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(labels)
        pad = (-n) % self.batch_size
        mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        return images, labels.astype(np.int32), mask

    def prepare(self, task: str, images: Any, labels: Any) -> DeviceSplit:
        """Moves a split to the device once, as padded fixed-size batches (reused by every sweep point)."""
        self._head(task)
        images, labels = np.asarray(images), np.asarray(labels)
        if len(images) != len(labels):
            raise ValueError(f"task {task!r}: {len(images)} images but {len(labels)} labels.")
        if len(labels) == 0:
            raise ValueError(f"task {task!r}: the split has no examples.")
        self._check_labels(task, labels)
        n = len(labels)
        images, labels, mask = self._pad(images, labels)
        b = self.batch_size
        chunks = range(0, len(labels), b)
        return DeviceSplit(
            images=tuple(jax.device_put(images[i : i + b]) for i in chunks),
            labels=tuple(jax.device_put(labels[i : i + b]) for i in chunks),
            mask=tuple(jax.device_put(mask[i : i + b]) for i in chunks),
            num_examples=n,
        )

    def _correct_count(self, params: PyTree, task: str, data: Any) -> tuple[jax.Array, int]:
        head = self._head(task)
        correct = jnp.zeros((), jnp.int32)
        if isinstance(data, DeviceSplit):
            for images, labels, mask in zip(data.images, data.labels, data.mask):
                correct = correct + self._correct(head, self._features(params, images), labels, mask)
            return correct, data.num_examples
        if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
            return self._correct_count(params, task, self.prepare(task, *data))
        total = 0
        for images, labels in data:  # a stream of host batches (e.g. `subboost.data.numpy_batches`)
            images, labels = np.asarray(images), np.asarray(labels)
            self._check_labels(task, labels)
            for start in range(0, len(labels), self.batch_size):
                chunk_images, chunk_labels, mask = self._pad(images[start : start + self.batch_size],
                                                             labels[start : start + self.batch_size])
                features = self._features(params, chunk_images)
                correct = correct + self._correct(head, features, chunk_labels, mask)
            total += len(labels)
        if total == 0:
            raise ValueError(f"task {task!r}: the split has no examples.")
        return correct, total

    def accuracies(self, params: PyTree, splits: Mapping[str, Any]) -> dict[str, float]:
        """``{task: accuracy}`` of ``params`` on each task's split.

        A split is a `DeviceSplit` (from `prepare`), an ``(images, labels)``
        pair of arrays, or an iterable of ``(images, labels)`` batches. Counts
        stay on the device until one transfer at the end.
        """
        counts = {task: self._correct_count(params, task, data) for task, data in splits.items()}
        correct = jax.device_get({task: c for task, (c, _) in counts.items()})
        return {task: int(correct[task]) / n for task, (_, n) in counts.items()}

    def accuracy(self, params: PyTree, task: str, data: Any) -> float:
        """Accuracy on one task (see `accuracies`)."""
        return self.accuracies(params, {task: data})[task]


# ----------------------------------------------------------------------------
# Hyper-parameter search
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """Validation accuracies of ``theta_0 + alpha * boost(tau, beta)`` (``beta=None``: no boost)."""

    alpha: float
    beta: float | None
    accuracies: Mapping[str, float]
    score: float


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """The chosen setting and every evaluated point.

    ``alpha_on_edge`` flags a chosen alpha at either end of a grid of more than
    one value: the optimum may lie outside the grid.
    """

    alpha: float
    beta: float | None
    score: float
    points: tuple[SweepPoint, ...]
    alphas: tuple[float, ...]
    betas: tuple[float | None, ...]

    @property
    def alpha_on_edge(self) -> bool:
        return len(self.alphas) > 1 and self.alpha in (min(self.alphas), max(self.alphas))

    @property
    def best(self) -> SweepPoint:
        return next(p for p in self.points if p.alpha == self.alpha and p.beta == self.beta)

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "score": self.score,
            "alpha_on_grid_edge": self.alpha_on_edge,
            "alphas": list(self.alphas),
            "betas": list(self.betas),
            "points": [dataclasses.asdict(p) | {"accuracies": dict(p.accuracies)} for p in self.points],
        }


def _check_grid(name: str, values: Sequence[Any], allow_none: bool = False) -> tuple:
    return check_grid(name, values, allow_none=allow_none, positive=name == "alpha")


def select_alpha_beta(
    pretrained: PyTree,
    tau: PyTree,
    evaluate: Callable[[PyTree], Mapping[str, float]],
    *,
    alphas: Sequence[float],
    betas: Sequence[float | None] = (None,),
    boost_kwargs: Mapping[str, Any] | None = None,
    score: Callable[[Mapping[str, float]], float] | None = None,
    progress: bool = True,
    description: str = "sweep",
) -> SweepResult:
    """Chooses ``(alpha, beta)`` maximising a validation score.

    Args:
      pretrained: ``theta_0``.
      tau: the merged task vector (before boosting and scaling).
      evaluate: ``params -> {task: validation accuracy}``.
      alphas: scaling coefficients to try (positive).
      betas: Subspace Boosting cutoffs to try; ``None`` means no boosting.
      boost_kwargs: extra arguments of `subboost.subspace_boost` (mode, attention, ...).
      score: ``accuracies -> float`` to maximise; default the mean accuracy.
      progress: show a tqdm bar.
      description: the bar's label.

    Returns:
      A `SweepResult`. The choice follows the library's one selection rule
      (`subboost.selection.choose`): ties go to the first point in (beta,
      alpha) grid order; the paper's grids are used as published, without
      refinement.
    """
    from tqdm.auto import tqdm

    from subboost.boosting import subspace_boost_sweep
    from subboost.task_vectors import apply_task_vector

    alphas = _check_grid("alpha", alphas)
    betas = _check_grid("beta", betas, allow_none=True)
    score = score or (lambda accs: _mean(accs.values()))
    points: list[SweepPoint] = []
    bar = tqdm(total=len(alphas) * len(betas), desc=description, disable=not progress, leave=False)

    boosted_at: dict[float, PyTree] = {}

    def score_candidate(beta: float | None, grid: np.ndarray) -> list[float]:
        # boost(alpha * tau) = alpha * boost(tau): one boost per beta serves every alpha, and every beta of
        # the grid is boosted from one SVD per matrix (on the first boosted candidate).
        if beta is not None and not boosted_at:
            grid_betas = tuple(float(b) for b in betas if b is not None)
            boosted_at.update(zip(grid_betas, subspace_boost_sweep(tau, betas=grid_betas, **dict(boost_kwargs or {}))))
        boosted = tau if beta is None else boosted_at[float(beta)]
        values = []
        for alpha in grid:
            accuracies = dict(evaluate(apply_task_vector(pretrained, boosted, alpha=float(alpha))))
            value = float(score(accuracies))
            if not math.isfinite(value):
                raise ValueError(f"{description}: the validation score at alpha={alpha}, beta={beta} is {value}.")
            points.append(SweepPoint(float(alpha), None if beta is None else float(beta), accuracies, value))
            values.append(value)
            bar.update()
            bar.set_postfix(best=f"{max(p.score for p in points):.4f}")
        return values

    choice = choose(score_candidate, betas, alphas=np.asarray(alphas, np.float64))
    bar.close()
    return SweepResult(choice.alpha, choice.key if choice.key is None else float(choice.key), choice.score,
                       tuple(points), tuple(map(float, alphas)),
                       tuple(None if b is None else float(b) for b in betas))


def tune_tall_lambdas(
    pretrained: PyTree,
    tvs: PyTree,
    evaluate_task: Callable[[PyTree, int], float],
    *,
    alpha: float,
    lambdas: Sequence[float] = TALL_LAMBDAS,
    progress: bool = True,
    merged: PyTree | None = None,
) -> tuple[float, ...]:
    """Per-task TALL-mask thresholds for Consensus merging, chosen on validation.

    For each task t and each ``lam``: ``m_t = |tau_t| > lam |tau_MTL - tau_t|``
    (``tau_MTL = sum_t tau_t``, or ``merged`` when given, e.g. the TIES vector);
    the task's model ``theta_0 + alpha (m_t * tau_MTL)`` is scored on task t's
    validation split by ``evaluate_task(params, t)``; the best ``lam`` (first on
    ties) is task t's threshold. The TALL code scores at ``alpha = 1.0``.

    Returns:
      One lambda per task, in the order of the expert axis.
    """
    from tqdm.auto import tqdm

    from subboost.merging.averaging import task_arithmetic
    from subboost.merging.consensus import tall_masks
    from subboost.task_vectors import apply_task_vector, num_experts

    lambdas = tuple(float(v) for v in _check_grid("lambda", lambdas))
    num_tasks = num_experts(tvs)
    tau_mtl = task_arithmetic(tvs) if merged is None else merged
    select = jax.jit(lambda masks, total, t: jax.tree_util.tree_map(lambda m, x: jnp.where(m[t], x, 0), masks, total))
    scores = np.zeros((num_tasks, len(lambdas)))
    bar = tqdm(total=num_tasks * len(lambdas), desc="TALL lambdas", disable=not progress, leave=False)
    # lambda traced: one program for the grid
    masks_at = jax.jit(lambda x, total, lam: tall_masks(x, lambdas=lam, merged=total))
    for j, lam in enumerate(lambdas):
        masks = masks_at(tvs, tau_mtl, jnp.float32(lam))
        for t in range(num_tasks):
            scores[t, j] = evaluate_task(apply_task_vector(pretrained, select(masks, tau_mtl, t), alpha=alpha), t)
            bar.update()
    bar.close()
    return tuple(lambdas[int(np.argmax(scores[t]))] for t in range(num_tasks))


# ----------------------------------------------------------------------------
# Checkpoint files (encoders and heads) by task name
# ----------------------------------------------------------------------------
def find_checkpoint(root: str | os.PathLike, pattern: str, task: str | None = None) -> Path:
    """``root / pattern.format(task=task)``, as a directory or with a ``.safetensors`` suffix.

    Raises:
      FileNotFoundError: naming both candidate paths.
    """
    path = Path(root) / pattern.format(task=task)
    for candidate in (path, path.with_name(path.name + ".safetensors")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"checkpoint {str(path)!r} (or {path.name}.safetensors) does not exist"
                            + (f" (task {task})" if task else "") + f" under {str(root)!r}.")


def load_checkpoint(path: str | os.PathLike) -> PyTree:
    """Parameters as host numpy arrays (orbax directory, safetensors file or merge output)."""
    from subboost.checkpoints import load_params

    return load_params(path, as_numpy=True)


def encoder_config(backbone: str | None, checkpoint: str | os.PathLike | None = None) -> Any:
    """The `CLIPVisionConfig` of an encoder checkpoint.

    A converted checkpoint records its architecture (``subboost.json``), including
    details a name does not fix (the activation of open_clip's LAION towers); it
    wins, after checking that it agrees with ``backbone`` when both are given.

    Raises:
      ValueError: neither source, or a checkpoint of another architecture.
    """
    from subboost.checkpoints import checkpoint_info
    from subboost.models.clip_vit import CLIPVisionConfig, get_config

    info = checkpoint_info(checkpoint) if checkpoint is not None and Path(checkpoint).is_dir() else None
    recorded = None
    if info and info.get("kind") == "clip_vision" and info.get("architecture"):
        recorded = CLIPVisionConfig.from_dict(info["architecture"])
    if backbone is None:
        if recorded is None:
            raise ValueError(f"checkpoint {str(checkpoint)!r} records no architecture: name the backbone "
                             "(ViT-B/32, ViT-B/16, ViT-L/14 or tiny).")
        return recorded
    named = get_config(backbone)
    if recorded is not None:
        if dataclasses.replace(named, act=recorded.act) != recorded:
            raise ValueError(f"checkpoint {str(checkpoint)!r} holds a {recorded} encoder, not {backbone} ({named}).")
        return recorded
    return named


def load_heads(root: str | os.PathLike, tasks: Sequence[str], pattern: str = "{task}") -> dict[str, PyTree]:
    """``{task: head params}`` from ``root / pattern``; a ``{"params": ...}`` wrapper is removed."""
    heads = {}
    for task in tasks:
        head = load_checkpoint(find_checkpoint(root, pattern, task))
        heads[task] = head["params"] if isinstance(head, Mapping) and set(head) == {"params"} else head
    return heads


# ----------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------
def code_version() -> dict[str, Any]:
    """What code produced a result: package version, git commit (if run from a checkout), library versions."""
    import subprocess

    import flax

    import subboost

    version: dict[str, Any] = {"subboost": subboost.__version__, "jax": jax.__version__, "flax": flax.__version__,
                               "git_sha": None, "git_dirty": None}
    repo = Path(subboost.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        version.update(git_sha=sha or None, git_dirty=bool(status.strip()))
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed package): the package version identifies it
    return version
