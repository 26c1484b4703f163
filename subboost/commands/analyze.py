"""``subboost analyze``: HO-GSVD alignment and rank-collapse figures for a set of experts.

Examples::

  # experts as checkpoints (orbax directories or .safetensors) against their base
  subboost analyze expert_a expert_b expert_c --base base_ckpt --out analysis/

  # or stacked task vectors in one .npz ("a/b/kernel" keys, leading expert axis;
  # optional "__names__" string array), e.g. written by `save_task_vectors_npz`
  subboost analyze task_vectors.npz --out analysis/ --method ties --param k=0.2

Writes, each PNG with a JSON of the numbers drawn next to it:
  gsv_distributions.png   generalized singular values per expert + merged reference
  alignment.png           HO-GSVD alignment matrix (experts + merged reference)
  rank_collapse.png       stable / energy rank vs number of merged experts, per layer type
  spectra.png             merged spectra as experts are added (and spectra_boosted.png)
and summary.json (settings, expert names, the greedy expert ranking).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from subboost.commands.common import add_command, add_merge_method_arguments
from subboost.grids import DEFAULT_BETA
from subboost.task_vectors import SubboostError, num_experts
from subboost.tree import ATTENTION_MODES, PyTree, leaves_with_paths

NAMES_KEY = "__names__"
OUTPUT_FILES: tuple[str, ...] = (
    "gsv_distributions.png", "gsv_distributions.json", "alignment.png", "alignment.json",
    "rank_collapse.png", "rank_collapse.json", "spectra.png", "spectra.json",
    "spectra_boosted.png", "spectra_boosted.json", "summary.json",
)


def save_task_vectors_npz(path: str | os.PathLike, tvs: PyTree, names: Sequence[str] | None = None) -> None:
    """Writes stacked task vectors (nested dicts) to an ``.npz`` with ``"a/b/c"`` keys."""
    arrays = {p: np.asarray(x) for p, x in leaves_with_paths(tvs)}
    if NAMES_KEY in arrays:
        raise SubboostError(f"a parameter is named {NAMES_KEY!r}, which the .npz format reserves.")
    if names is not None:
        arrays[NAMES_KEY] = np.asarray(list(names), dtype=str)
    np.savez(path, **arrays)


def load_task_vectors_npz(path: str | os.PathLike) -> tuple[dict, list[str] | None]:
    """Reads `save_task_vectors_npz` output: (nested dict of arrays, names or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task-vector file {str(path)!r} does not exist.")
    tree: dict = {}
    names = None
    import zipfile
    import zlib

    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise SubboostError(f"{path}: not a readable .npz of task vectors ({type(err).__name__}: {err}).") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise SubboostError(f"{path}: holds a single array, not an .npz archive of named task vectors.")
    with data:
        for key in data.files:
            try:
                value = data[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                raise SubboostError(f"{path}: entry {key!r} is corrupt ({type(err).__name__}: {err}).") from err
            if key == NAMES_KEY:
                names = [str(n) for n in value]
                continue
            node = tree
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise SubboostError(f"{path}: key {key!r} nests under a parameter.")
            node[leaf] = np.asarray(value)
    if not tree:
        raise SubboostError(f"{path}: holds no task vectors.")
    return tree, names


def _check_output(out: Path, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """``--out`` is a directory (new, or existing); files of an earlier analysis are replaced only
    with ``overwrite``, and only where that analysis's ``summary.json`` shows subboost wrote them."""
    from subboost.outputs import check_not_an_input

    check_not_an_input(out, inputs, name="--out")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"--out {str(out)!r} exists and is not a directory.")
    if out.is_dir():
        clashing = [name for name in OUTPUT_FILES if (out / name).exists() or (out / name).is_symlink()]
        if clashing and not overwrite:
            raise FileExistsError(
                f"--out {str(out)!r} already holds {', '.join(clashing)}; pass --overwrite to replace them."
            )
        if clashing and not _earlier_analysis(out):
            raise FileExistsError(
                f"--out {str(out)!r} holds {', '.join(clashing)} but no summary.json of an earlier analysis; "
                "refusing to replace files subboost did not write, even with --overwrite."
            )


def _earlier_analysis(out: Path) -> bool:
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(summary, dict) and "figures" in summary and "experts" in summary


def _load(args: argparse.Namespace) -> tuple[PyTree, list[str]]:
    paths = [Path(p) for p in args.experts]
    if len(paths) == 1 and paths[0].suffix == ".npz":
        if args.base is not None:
            raise ValueError("--base is not used with an .npz of task vectors (they are differences already).")
        tvs, names = load_task_vectors_npz(paths[0])
        tvs = jax.tree_util.tree_map(np.asarray, tvs)
        default_names = names or [f"expert {t}" for t in range(num_experts(tvs))]
    else:
        if args.base is None:
            raise ValueError("--base BASE is required when the experts are checkpoints.")
        for p in paths:
            if p.suffix == ".npz":
                raise ValueError(f"{str(p)!r}: an .npz of task vectors must be the only EXPERTS argument.")
        from subboost.checkpoints import load_experts

        tvs = load_experts(args.base, paths)
        default_names = [p.name or str(p) for p in paths]
    num = num_experts(tvs)
    if num < 2:
        raise ValueError(f"analyze needs at least 2 experts, got {num}.")
    names = [n.strip() for n in args.names.split(",")] if args.names else default_names
    if len(names) != num:
        raise ValueError(f"--names gives {len(names)} names for {num} experts.")
    if len(set(names)) != len(names):
        raise ValueError(f"expert names must be distinct, got {names}.")
    return tvs, names


def analyze(
    tvs: PyTree,
    names: Sequence[str],
    out: str | os.PathLike,
    *,
    method: str = "task_arithmetic",
    merge_kwargs: Mapping | None = None,
    beta: float | None = DEFAULT_BETA,
    hogsvd_method: str = "robust",
    pi: float | None = None,
    attention: str = "per_qkv",
    fraction: float = 0.95,
    progress: bool = True,
) -> dict[str, str]:
    """Computes every analysis and writes the figures; returns ``{figure: path}``."""
    import subboost as sb
    from subboost import plots
    from subboost.alignment import generalized_singular_values, mean_alignment, select_experts
    from subboost.analysis import rank_collapse

    from subboost.validation import check_real

    out = Path(out)
    check_real("fraction", fraction, what="analyze", low=0.0, high=1.0, low_open=True)  # before any file
    if beta is not None:
        check_real("beta", beta, what="analyze", low=0.0, high=1.0)
    merge_kwargs = dict(merge_kwargs or {})
    names = list(names)
    merged = sb.merge(tvs, method, **merge_kwargs)
    reference = f"merged ({method})"
    sigmas = generalized_singular_values(tvs, merged, method=hogsvd_method, pi=pi, attention=attention)
    num = len(names)
    rows = names + [reference]
    written = {}
    pooled = plots.pool_generalized_singular_values(sigmas, rows, num_experts=num)
    plots.plot_gsv_distributions(pooled, out / "gsv_distributions.png")
    written["gsv_distributions"] = str(out / "gsv_distributions.png")
    alignment = np.asarray(mean_alignment(sigmas))
    plots.plot_alignment(alignment, rows, out / "alignment.png")
    written["alignment"] = str(out / "alignment.png")
    curves = rank_collapse(tvs, method, beta=beta, fraction=fraction, attention=attention, progress=progress,
                           **merge_kwargs)
    plots.plot_rank_collapse(curves, out / "rank_collapse.png")
    written["rank_collapse"] = str(out / "rank_collapse.png")
    plots.plot_spectra_evolution(curves, out / "spectra.png")
    written["spectra"] = str(out / "spectra.png")
    if beta is not None:
        plots.plot_spectra_evolution(curves, out / "spectra_boosted.png", boosted=True)
        written["spectra_boosted"] = str(out / "spectra_boosted.png")
    ranking = [select_experts(None, k=k, alignment=alignment[:num, :num]) for k in range(2, num + 1)]
    summary = {
        "experts": names,
        "merge_method": method,
        "merge_kwargs": {k: v for k, v in merge_kwargs.items() if k != "key"},
        "beta": beta,
        "hogsvd_method": hogsvd_method,
        "pi": pi if pi is not None else 1.0 / num,
        "attention": attention,
        "energy_fraction": fraction,
        "selected_experts": {str(len(sel)): [names[i] for i in sel] for sel in ranking},
        "figures": {name: Path(path).name for name, path in written.items()},
    }
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1, allow_nan=False, default=str)
    return written


def _check_arguments(args: argparse.Namespace) -> dict:
    """Every argument checked before anything is loaded, computed or written."""
    from subboost.commands.merge import parse_param
    from subboost.merging import METHODS
    from subboost.validation import check_real

    check_real("--fraction", args.fraction, what="analyze", low=0.0, high=1.0, low_open=True)
    if not args.no_boost:
        check_real("--beta", args.beta, what="analyze", low=0.0, high=1.0)
    if args.pi is not None:
        check_real("--pi", args.pi, what="analyze", low=0.0, low_open=True)
    if args.method not in METHODS:
        raise SubboostError(f"unknown merge method {args.method!r}; known methods: {', '.join(METHODS)}.")
    merge_kwargs = dict(parse_param(p) for p in args.param)
    if args.method == "dare" and "key" not in merge_kwargs:
        merge_kwargs["key"] = jax.random.key(args.seed)
    return merge_kwargs


def run_analyze(args: argparse.Namespace) -> int:
    from subboost.outputs import write_atomically
    from subboost.merging import check_arguments

    out = Path(args.out)
    merge_kwargs = _check_arguments(args)
    inputs = [*args.experts] + ([args.base] if args.base else [])
    _check_output(out, args.overwrite, inputs)  # before the (slow) loading; nothing is created before the end
    tvs, names = _load(args)
    check_arguments(args.method, merge_kwargs, len(names))
    # Built in a hidden staging folder: a failure part-way leaves --out as it was.
    staging_out: dict = {}

    def build(staging: Path) -> None:
        staging.mkdir()
        staging_out["written"] = analyze(
            tvs, names, staging, method=args.method, merge_kwargs=merge_kwargs,
            beta=None if args.no_boost else args.beta, hogsvd_method=args.hogsvd_method, pi=args.pi,
            attention=args.attention, fraction=args.fraction,
        )

    if out.is_dir():  # an existing folder: add (or, with --overwrite, replace) our files only
        staging_dir = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            build(staging_dir)
            _check_output(out, args.overwrite, inputs)
            for name in sorted(os.listdir(staging_dir)):
                os.replace(staging_dir / name, out / name)
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)
    else:
        write_atomically(out, build, inputs=inputs)
    for figure, path in staging_out["written"].items():
        path = out / Path(path).name
        print(f"wrote {path} (+ {path.with_suffix('.json').name})")
    print(f"wrote {out / 'summary.json'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    import subboost as sb

    parser = add_command(subparsers, "analyze", help="HO-GSVD alignment and rank-collapse figures (PNG + JSON)", doc=__doc__)
    parser.add_argument("experts", nargs="+", help="expert checkpoints, or one .npz of stacked task vectors")
    parser.add_argument("--base", default=None, help="pretrained checkpoint (required for checkpoints)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier analysis files in --out")
    parser.add_argument("--names", default=None, help="comma-separated expert names (default: file names)")
    add_merge_method_arguments(parser, methods=sb.available_methods())
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA,
                        help=f"Subspace Boosting cutoff of the boosted curves (default {DEFAULT_BETA:g})")
    parser.add_argument("--no-boost", action="store_true", help="skip the boosted curves")
    parser.add_argument("--hogsvd-method", choices=("robust", "classic"), default="robust",
                        help="HO-GSVD variant (default robust; classic needs full-column-rank matrices)")
    parser.add_argument("--pi", type=float, default=None, help="robust HO-GSVD regulariser (default 1/T)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="per_qkv",
                        help="how attention kernels form matrices (default per_qkv)")
    parser.add_argument("--fraction", type=float, default=0.95, help="energy fraction of the energy rank")
    parser.set_defaults(func=run_analyze)
