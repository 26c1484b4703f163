"""Shared pieces of the suite configs: the paper's grids and one entry per method.

A config names one checkpoint family and backbone and lists cells: every suite
(8 / 14 / 20 tasks) times every method entry. A method entry is::

    label    names the result file ("ties+boost")
    title    row name in the table ("TIES + Subspace Boosting")
    method   `subboost.merge` method name
    kwargs   its hyper-parameters
    alphas   validation grid of the scaling coefficient
    betas    Subspace Boosting grid; (None,) = no boosting
    tall_lambdas  Consensus only: per-task TALL-mask thresholds tuned on validation

``conventions`` (config argument, recorded in every result):

    reference  (default, the paper tables) the official codes' choices,
               `subboost.reference.reference_settings`: TSV-M / Iso on every 2-D
               tensor with in_proj as one matrix; boosting with attn_beta 0.10
               and the projection boosted; TIES k matched to the reference's
               effective density (`reference_ties_k`); Consensus lambdas per task
               at coefficient 1.0 (Consensus-TIES: disjoint sum, masks from TIES).
    subboost   the clean definitions of REFERENCE.md (``config.boost``; lambdas
               scored at Task Arithmetic's validation alpha).

``alpha_metric``: ``normalized`` (default, as the reference code) or
``absolute`` mean validation accuracy picks alpha (and beta).
"""

from __future__ import annotations

import ml_collections

from subboost.bench.report import method_label
from subboost.bench.settings import default_of
from subboost.eval import BETAS, TALL_LAMBDAS, alpha_grid
from subboost.merging.consensus import consensus
from subboost.merging.dare import dare
from subboost.merging.iso import iso_cts
from subboost.merging.ties import ties

# Base merges the paper boosts, and the SVD-based merges it compares with.
BOOSTABLE = ("task_arithmetic", "ties", "consensus", "dare")
ALL_METHODS = ("weight_averaging", "task_arithmetic", "ties", "consensus", "tsv", "iso_c", "iso_cts")
# The methods' own defaults, read from their signatures (their one home).
DEFAULT_KWARGS = {"ties": {"k": default_of(ties, "k")}, "consensus": {"min_tasks": default_of(consensus, "min_tasks")},
                  "dare": {"p": default_of(dare, "p")},
                  "iso_cts": {"common_space_fraction": default_of(iso_cts, "common_space_fraction")}}


def method(name: str, *, boost: bool = False, alphas=None, **kwargs) -> dict:
    """One method entry (see the module docstring)."""
    return dict(
        label=name + ("+boost" if boost else ""),
        title=method_label(name) + (" + Subspace Boosting" if boost else ""),
        method=name,
        kwargs={**DEFAULT_KWARGS.get(name, {}), **kwargs},
        alphas=tuple(alphas or alpha_grid(name)),
        betas=BETAS if boost else (None,),
        tall_lambdas=TALL_LAMBDAS if name == "consensus" else None,
    )


def methods(names=ALL_METHODS, boost: str = "both") -> list[dict]:
    """Entries for ``names``; ``boost``: "off", "on" (boostable ones only) or "both"."""
    if boost not in ("off", "on", "both"):
        raise ValueError(f"boost must be off, on or both, got {boost!r}.")
    entries = []
    for name in names:
        if boost in ("off", "both") or name not in BOOSTABLE:
            entries.append(method(name))
        if boost in ("on", "both") and name in BOOSTABLE:
            entries.append(method(name, boost=True))
    return entries


def parse_arg(arg: str | None, **defaults: str) -> ml_collections.ConfigDict:
    """big_vision-style ``"key=value,key=value"`` config argument (lists joined by "+")."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}.")
        values[key] = value
    return ml_collections.ConfigDict(values)


def suite_config(arg: str | None, *, backbone: str, family: str = "tall_tsv") -> ml_collections.ConfigDict:
    """The paper table for one backbone: suites x methods x boost off/on."""
    arg = parse_arg(arg, family=family, suites="8+14+20", methods="+".join(ALL_METHODS), boost="both",
                    conventions="reference", alpha_metric="normalized")
    if arg.conventions not in ("reference", "subboost"):
        raise ValueError(f"conventions must be reference or subboost, got {arg.conventions!r}.")
    if arg.alpha_metric not in ("normalized", "absolute"):
        raise ValueError(f"alpha_metric must be normalized or absolute, got {arg.alpha_metric!r}.")
    config = ml_collections.ConfigDict()
    config.family = arg.family               # checkpoint family: named in every result
    config.backbone = backbone               # subboost.models.get_config name
    # "8+14+20"; a custom suite lists task names joined by "/": "suites=MNIST/SVHN+8".
    config.suites = tuple(int(s) if s.isdigit() else s.replace("/", ",") for s in arg.suites.split("+"))
    config.methods = methods(arg.methods.split("+"), arg.boost)
    config.image_size = None                 # None: the backbone's input size (224)
    config.batch_size = 256
    config.max_validation_examples = 2000    # per task, first N of the split; None = all
    config.max_test_examples = None          # None = the whole test split
    config.cache_test = False                # keep test crops on the device (150 KB per 224 image)
    config.conventions = arg.conventions     # "reference" | "subboost" (see the module docstring)
    config.alpha_metric = arg.alpha_metric   # "normalized" | "absolute" validation score
    config.boost = dict(mode="cumsum", attention="per_qkv")  # subboost conventions only
    config.seed = 0                          # PRNG seed of DARE
    # Checkpoint files under --checkpoints ({task} = task name; ".safetensors" optional).
    config.checkpoints = dict(base="zeroshot", expert="finetuned/{task}", head="heads/{task}")
    return config
