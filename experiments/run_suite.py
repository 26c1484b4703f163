"""Runs a paper table: suites x merge methods x boosting, alpha/beta chosen on validation.

    python -m experiments.run_suite --config experiments/configs/vit_b32.py[:suites=8+14,boost=on] \\
        --checkpoints CKPT_DIR --data_dir TFDS_DIR --out results/

``CKPT_DIR`` holds the family's checkpoints (converted with ``subboost convert``)::

    zeroshot[.safetensors]             the pretrained image encoder
    finetuned/<Task>[.safetensors]     one expert per task
    heads/<Task>[.safetensors]         one head per task {kernel (D, C), bias (C,)}

(patterns in ``config.checkpoints``). Per cell (suite, method entry) it merges
the suite's experts, searches (beta, alpha) on the validation splits (boosting
once per beta), scores the choice on the test splits and writes::

    OUT/<family>/<backbone>/reference.json              zero-shot and expert accuracy per task
    OUT/<family>/<backbone>/suite_<N>/<label>.json      one cell: choice, sweep, test, provenance
    OUT/<family>/<backbone>/results.md, results.json    the table: methods x suites, abs and normalized

Resumable: a cell whose JSON exists with the same settings is not recomputed;
one with different settings stops the run unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import subboost as sb
from subboost import data as sbdata
from subboost.evaluation import (Evaluator, code_version, encoder_config, find_checkpoint, load_checkpoint,
                                 load_heads, select_alpha_beta, selection_score, summarize, tune_tall_lambdas)
from subboost.merging.keys import takes_key, with_seed_key
from subboost.reference import reference_settings, reference_ties_k

PyTree = Any
RESULT_VERSION = 1


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------
def load_config(spec: str, overrides: Sequence[str] = ()) -> Any:
    """``path/to/config.py[:arg]`` -> ``get_config(arg)``, then ``key=value`` overrides."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"_subboost_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config(arg) function.")
    config = module.get_config(arg or None)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        if leaf not in target:
            raise ValueError(f"--set {key}: the config has no field {key!r}.")
        target[leaf] = value
    return config


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if callable(value):  # e.g. a matrix predicate: recorded by name
        return getattr(value, "__name__", repr(value))
    return value


def fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_jsonable(settings), sort_keys=True).encode()).hexdigest()[:16]


def slug(name: str) -> str:
    return name.replace("/", "-").replace(" ", "_")


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    """Atomic write: an interrupted run never leaves a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it or pass --overwrite.") from err


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------
class SuiteRun:
    """State shared by the cells of one config: checkpoints, data, evaluator, results."""

    def __init__(self, config: Any, *, checkpoints: str, data_dir: str | None, out: str,
                 overwrite: bool = False, progress: bool = True):
        from subboost.models import param_shapes

        self.config = config
        self.progress = progress
        self.overwrite = overwrite
        self.checkpoints = Path(checkpoints)
        if not self.checkpoints.is_dir():
            raise FileNotFoundError(f"--checkpoints {checkpoints!r} is not a directory.")
        self.data_dir = data_dir
        patterns = config.checkpoints
        base_path = find_checkpoint(self.checkpoints, patterns["base"])
        self.model_config = encoder_config(config.backbone, base_path)
        self.image_size = config.image_size or self.model_config.image_size
        if self.image_size != self.model_config.image_size:
            raise ValueError(f"image_size {self.image_size} does not match backbone {config.backbone} "
                             f"(input {self.model_config.image_size}).")
        # A suite is 8, 14, 20 or a comma-separated list of task names; its label keys files and columns.
        self.suites = {str(s).replace(" ", ""): tuple(t.name for t in sbdata.suite_tasks(s)) for s in config.suites}
        labels = [m["label"] for m in config.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"config.methods has repeated labels {labels}.")
        for entry in config.methods:
            if entry["method"] not in sb.available_methods():
                raise ValueError(f"method entry {entry['label']!r}: unknown merge method {entry['method']!r}; "
                                 f"known methods: {', '.join(sb.available_methods())}.")
        self.tasks = tuple(dict.fromkeys(t for names in self.suites.values() for t in names))
        self.root = Path(out) / slug(config.family) / slug(config.backbone)
        self.version = code_version()

        self.base = jax.device_put(load_checkpoint(base_path))
        from subboost.task_vectors import check_same_structure

        check_same_structure(param_shapes(self.model_config), self.base, what="base checkpoint",
                             reference_name=f"the {config.backbone} architecture", check_dtype=False)
        heads = load_heads(self.checkpoints, self.tasks, patterns["head"])
        self.evaluator = Evaluator.for_clip(
            self.model_config, heads, num_classes={t: sbdata.get_task(t).num_classes for t in self.tasks},
            batch_size=int(config.batch_size))
        self._experts: dict[str, PyTree] = {}
        self._validation: dict[str, Any] = {}
        self._test: dict[str, Any] = {}

    # -- data ----------------------------------------------------------------
    def data_settings(self, tasks: Sequence[str]) -> dict[str, Any]:
        """What defines the examples a result saw (only ``tasks``: adding suites keeps old results valid)."""
        return {
            "image_size": self.image_size,
            "max_validation_examples": self.config.max_validation_examples,
            "max_test_examples": self.config.max_test_examples,
            "splits": {t: {s: sbdata.split_spec(t, s) for s in ("validation", "test")} for t in tasks},
        }

    def validation(self, task: str) -> Any:
        if task not in self._validation:
            images, labels = sbdata.split_arrays(task, "validation", data_dir=self.data_dir,
                                                 image_size=self.image_size,
                                                 max_examples=self.config.max_validation_examples)
            self._validation[task] = self.evaluator.prepare(task, images, labels)
        return self._validation[task]

    def test_batches(self, task: str) -> Any:
        """Streamed from disk per evaluation, or held on the device with ``config.cache_test``."""
        if not self.config.get("cache_test", False):
            return sbdata.numpy_batches(task, "test", batch_size=int(self.config.batch_size), data_dir=self.data_dir,
                                        image_size=self.image_size, max_examples=self.config.max_test_examples)
        if task not in self._test:
            images, labels = sbdata.split_arrays(task, "test", data_dir=self.data_dir, image_size=self.image_size,
                                                 max_examples=self.config.max_test_examples)
            self._test[task] = self.evaluator.prepare(task, images, labels)
        return self._test[task]

    def check_data(self) -> None:
        """Fails early (before any compute) on a dataset that is not where it should be."""
        for task in self.tasks:
            for split in ("validation", "test"):
                sbdata.split_dataset(task, split, data_dir=self.data_dir, image_size=self.image_size)

    def val_accuracies(self, params: PyTree, tasks: Sequence[str]) -> dict[str, float]:
        return self.evaluator.accuracies(params, {t: self.validation(t) for t in tasks})

    def test_accuracies(self, params: PyTree, tasks: Sequence[str]) -> dict[str, float]:
        return self.evaluator.accuracies(params, {t: self.test_batches(t) for t in tasks})

    # -- checkpoints ---------------------------------------------------------
    def expert(self, task: str) -> PyTree:
        if task not in self._experts:
            path = find_checkpoint(self.checkpoints, self.config.checkpoints["expert"], task)
            self._experts[task] = load_checkpoint(path)
        return self._experts[task]

    def task_vectors(self, tasks: Sequence[str]) -> PyTree:
        return sb.task_vectors(self.base, [self.expert(t) for t in tasks])

    # -- reference accuracies (zero-shot, experts) ----------------------------
    def reference(self) -> dict[str, Any]:
        """Zero-shot and expert accuracy per task (validation and test), saved after each task."""
        from tqdm.auto import tqdm

        path = self.root / "reference.json"
        record: dict[str, Any] = {"zeroshot": {}, "experts": {}, "settings": {}}
        if path.exists():
            record = read_json(path)
        todo = []
        for task in self.tasks:
            settings = {"family": self.config.family, "backbone": self.config.backbone,
                        "checkpoints": dict(self.config.checkpoints), "data": self.data_settings([task])}
            old = record["settings"].get(task)
            if old is not None and old != fingerprint(settings) and not self.overwrite:
                raise FileExistsError(f"{path}: task {task} was evaluated with other settings; "
                                      "pass --overwrite or use another --out.")
            if old != fingerprint(settings) or task not in record["experts"] or task not in record["zeroshot"]:
                todo.append((task, fingerprint(settings)))
        for task, task_fingerprint in tqdm(todo, desc="reference (zero-shot, experts)", disable=not self.progress):
            record["zeroshot"][task] = {"validation": self.val_accuracies(self.base, [task])[task],
                                        "test": self.test_accuracies(self.base, [task])[task]}
            expert = jax.device_put(self.expert(task))
            record["experts"][task] = {"validation": self.val_accuracies(expert, [task])[task],
                                       "test": self.test_accuracies(expert, [task])[task]}
            record["settings"][task] = task_fingerprint
            record["code_version"] = self.version
            write_json(path, record)
        return record

    # -- one cell ------------------------------------------------------------
    # -- conventions ---------------------------------------------------------
    @property
    def conventions(self) -> str:
        return self.config.get("conventions", "subboost")

    @property
    def reference_family(self) -> str:
        """`reference_settings` family of the checkpoints (converted from open_clip unless named hf)."""
        return "hf_clip" if "hf" in str(self.config.family).lower() else "clip"

    def boost_kwargs(self) -> dict[str, Any]:
        """Arguments of `subboost.subspace_boost` besides beta."""
        if self.conventions == "reference":
            return {k: v for k, v in reference_settings("subspace_boost", self.reference_family).items() if k != "beta"}
        return dict(self.config.boost)

    def merge_kwargs(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """The merge method's hyper-parameters under the config's conventions."""
        kwargs = dict(entry["kwargs"])
        if self.conventions != "reference":
            return kwargs
        name = entry["method"]
        if name in ("tsv", "iso_c", "iso_cts", "ties"):
            kwargs = {**reference_settings(name, self.reference_family), **kwargs}
        if name == "consensus":
            which = "consensus_ties" if kwargs.get("base") == "ties" else "consensus"
            kwargs = {**reference_settings(which), **kwargs}
        try:  # TIES "k" is a fraction of the vision weights; match the reference's effective density.
            if name == "ties" or (name in ("dare", "consensus") and kwargs.get("base") == "ties"):
                kwargs["k"] = reference_ties_k(self.config.backbone, kwargs.get("k", 0.2))
        except ValueError:
            pass  # not a published CLIP backbone: k as given
        return kwargs

    def selection_score(self, tasks: Sequence[str], reference: Mapping[str, Any]):
        metric = self.config.get("alpha_metric", "absolute")
        experts = {t: reference["experts"][t]["validation"] for t in tasks} if metric == "normalized" else None
        return selection_score(metric, experts)

    def cell_settings(self, suite: str, entry: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "conventions": self.conventions,
            "alpha_metric": self.config.get("alpha_metric", "absolute"),
            "result_version": RESULT_VERSION,
            "family": self.config.family,
            "backbone": self.config.backbone,
            "suite": suite,
            "tasks": list(self.suites[suite]),
            "method": dict(entry),
            "boost": dict(self.config.boost),
            "seed": self.config.seed,
            "checkpoints": dict(self.config.checkpoints),
            "data": self.data_settings(self.suites[suite]),
        }

    def cell_path(self, suite: str, entry: Mapping[str, Any]) -> Path:
        return self.root / f"suite_{slug(suite)}" / f"{slug(entry['label'])}.json"

    def cached_cell(self, suite: str, entry: Mapping[str, Any]) -> dict[str, Any] | None:
        path = self.cell_path(suite, entry)
        if not path.exists():
            return None
        result = read_json(path)
        if result.get("fingerprint") == fingerprint(self.cell_settings(suite, entry)):
            return result
        if self.overwrite:
            return None
        raise FileExistsError(f"{path} was computed with other settings; pass --overwrite or use another --out.")

    def merge(self, tvs: PyTree, entry: Mapping[str, Any], tasks: Sequence[str],
              score: Any = None) -> tuple[PyTree, dict[str, Any]]:
        """The merged task vector and the hyper-parameters it was made with (as recorded)."""
        kwargs = self.merge_kwargs(entry)
        extra: dict[str, Any] = {}
        if takes_key(entry["method"], kwargs):
            kwargs = with_seed_key(entry["method"], kwargs, seed=int(self.config.seed))
            extra["seed"] = int(self.config.seed)
        if entry["method"] == "consensus" and entry.get("tall_lambdas"):
            evaluate_task = lambda p, t: self.val_accuracies(p, [tasks[t]])[tasks[t]]  # noqa: E731
            if self.conventions == "reference":
                # TALL: each task's lambda on its own validation split at coefficient 1.0, masks
                # against the base merge (TIES for Consensus-TIES, mask_from="merged").
                merged = None
                if kwargs.get("mask_from") == "merged" and kwargs.get("base", "task_arithmetic") == "ties":
                    ties_kwargs = {k: v for k, v in kwargs.items() if k in ("k", "merge", "scope")}
                    merged = sb.merge(tvs, "ties", **ties_kwargs)
                tall_alpha = 1.0
                lambdas = tune_tall_lambdas(self.base, tvs, evaluate_task, alpha=tall_alpha,
                                            lambdas=entry["tall_lambdas"], progress=self.progress, merged=merged)
            else:
                # TALL thresholds per task, scored at Task Arithmetic's validation alpha.
                ta = select_alpha_beta(self.base, sb.merge(tvs, "task_arithmetic"),
                                       lambda p: self.val_accuracies(p, tasks), alphas=entry["alphas"],
                                       score=score, progress=self.progress, description="consensus: TA alpha")
                tall_alpha = ta.alpha
                lambdas = tune_tall_lambdas(self.base, tvs, evaluate_task, alpha=tall_alpha,
                                            lambdas=entry["tall_lambdas"], progress=self.progress)
            kwargs["lambdas"] = lambdas
            extra = {"tall_alpha": tall_alpha, "tall_lambdas": dict(zip(tasks, lambdas))}
        recorded = {k: v for k, v in kwargs.items() if k != "key"} | extra
        return sb.merge(tvs, entry["method"], **kwargs), recorded

    def run_cell(self, suite: str, entry: Mapping[str, Any], tvs: PyTree, reference: Mapping[str, Any]) -> dict:
        start = time.time()
        tasks = self.suites[suite]
        score = self.selection_score(tasks, reference)
        tau, merge_kwargs = self.merge(tvs, entry, tasks, score)
        boost_kwargs = self.boost_kwargs()
        sweep = select_alpha_beta(self.base, tau, lambda p: self.val_accuracies(p, tasks), alphas=entry["alphas"],
                       betas=entry["betas"], boost_kwargs=boost_kwargs, score=score, progress=self.progress,
                       description=f"{suite_title(suite)}: {entry['label']}")
        chosen = tau if sweep.beta is None else sb.subspace_boost(tau, beta=sweep.beta, **boost_kwargs)
        test = self.test_accuracies(sb.apply_task_vector(self.base, chosen, alpha=sweep.alpha), tasks)
        experts = {t: reference["experts"][t]["test"] for t in tasks}
        settings = self.cell_settings(suite, entry)
        return {
            "family": self.config.family,
            "backbone": self.config.backbone,
            "suite": suite,
            "tasks": list(tasks),
            "method": entry["method"],
            "label": entry["label"],
            "conventions": self.conventions,
            "alpha_metric": self.config.get("alpha_metric", "absolute"),
            "hyper_parameters": {"merge": merge_kwargs, "alpha": sweep.alpha,
                                 "beta": sweep.beta, "boost": boost_kwargs if sweep.beta is not None else None},
            "alpha_on_grid_edge": sweep.alpha_on_edge,
            "validation": {"selected_average": sweep.score, "per_task": dict(sweep.best.accuracies)},
            "test": summarize(test, experts),
            "sweep": sweep.to_json(),
            "settings": settings,
            "fingerprint": fingerprint(settings),
            "code_version": self.version,
            "seconds": round(time.time() - start, 2),
        }

    # -- everything ----------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self.check_data()
        reference = self.reference()
        cells = [(s, e) for s in self.suites for e in self.config.methods]
        results: dict[tuple[str, str], dict] = {}
        tvs_suite, tvs = None, None
        for suite, entry in tqdm(cells, desc="cells", disable=not self.progress):
            cached = self.cached_cell(suite, entry)
            if cached is not None:
                results[suite, entry["label"]] = cached
                continue
            if tvs_suite != suite:
                tvs, tvs_suite = None, None  # free the previous suite's stack first
                tvs, tvs_suite = self.task_vectors(self.suites[suite]), suite
            result = self.run_cell(suite, entry, tvs, reference)
            write_json(self.cell_path(suite, entry), result)
            results[suite, entry["label"]] = result
        table = results_table(self.config, self.suites, results, reference)
        write_json(self.root / "results.json", {
            "family": self.config.family, "backbone": self.config.backbone,
            "conventions": self.conventions, "alpha_metric": self.config.get("alpha_metric", "absolute"),
            "cells": [results[s, e["label"]] for s, e in cells], "reference": reference,
            "code_version": self.version})
        (self.root / "results.md").write_text(table)
        return {"table": table, "cells": results, "reference": reference}


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def suite_title(suite: str) -> str:
    return f"{suite} tasks" if suite.isdigit() else suite


def results_table(config: Any, suites: Mapping[str, Sequence[str]], results: Mapping[tuple[str, str], dict],
                  reference: Mapping[str, Any]) -> str:
    """Markdown: rows = zero-shot, method entries, experts; columns = suites x (abs, normalized), in %."""
    header = "| Method | " + " | ".join(f"{suite_title(s)} abs | {suite_title(s)} norm" for s in suites) + " |"
    lines = [f"Checkpoint family `{config.family}`, backbone {config.backbone}: test accuracy (%), "
             "average absolute (abs) and normalized to the fine-tuned experts (norm).", "", header,
             "|---|" + "---:|---:|" * len(suites)]

    def reference_row(name: str, key: str) -> str:
        cells = []
        for tasks in suites.values():
            accs = {t: reference[key][t]["test"] for t in tasks}
            s = summarize(accs, {t: reference["experts"][t]["test"] for t in tasks})
            cells += [_percent(s["average_absolute"]), _percent(s["average_normalized"])]
        return f"| {name} | " + " | ".join(cells) + " |"

    lines.append(reference_row("Zero-shot", "zeroshot"))
    edge = False
    for entry in config.methods:
        cells = []
        for suite in suites:
            result = results.get((suite, entry["label"]))
            if result is None:
                cells += ["–", "–"]
                continue
            mark = "†" if result["alpha_on_grid_edge"] else ""
            edge |= bool(mark)
            cells += [_percent(result["test"]["average_absolute"]) + mark,
                      _percent(result["test"]["average_normalized"]) + mark]
        lines.append(f"| {entry.get('title') or entry['label']} | " + " | ".join(cells) + " |")
    lines.append(reference_row("Fine-tuned experts", "experts"))
    if edge:
        lines += ["", "† the chosen alpha lies on the edge of its grid: the optimum may be outside it."]
    return "\n".join(lines) + "\n"


def run(config: Any, *, checkpoints: str, data_dir: str | None, out: str, overwrite: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Runs every cell of ``config`` (see the module docstring); returns the table and results."""
    return SuiteRun(config, checkpoints=checkpoints, data_dir=data_dir, out=out, overwrite=overwrite,
                    progress=progress).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, optionally with an argument: path.py:key=value,...")
    parser.add_argument("--checkpoints", required=True, help="directory of the checkpoint family")
    parser.add_argument("--data_dir", default=None, help="tfds data_dir; local tasks in subdirectories")
    parser.add_argument("--out", required=True, help="output directory (results accumulate there)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--overwrite", action="store_true", help="recompute results made with other settings")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        result = run(config, checkpoints=args.checkpoints, data_dir=args.data_dir, out=args.out,
                     overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"run_suite: error: {err}", file=sys.stderr)
        return 2
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
