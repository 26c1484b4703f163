"""``subboost eval``: accuracy of one image-encoder checkpoint on benchmark tasks.

Examples::

  # a merged ViT-B/32 on the 8-task suite's test splits
  subboost eval merged_ckpt --heads heads/ --tasks 8 --data_dir ~/tensorflow_datasets

  # two tasks, validation split, normalized by the experts' accuracies, results to JSON
  subboost eval merged_ckpt --backbone ViT-B/32 --heads heads/ --tasks MNIST,SVHN --split validation \\
      --experts results/tall_tsv/ViT-B-32/reference.json --out mnist_svhn.json

Heads are ``<heads>/<Task>`` (orbax directory) or ``<heads>/<Task>.safetensors``
holding ``{kernel (D, C), bias (C,)}``. Nothing is downloaded: datasets must be
prepared in ``--data_dir`` (see `subboost.data`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from subboost.commands.common import add_command
from subboost.errors import SubboostError


def read_expert_accuracies(path: str, split: str) -> dict[str, float]:
    """``{task: accuracy}`` from a JSON file: a flat mapping, or run_suite's ``reference.json``."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--experts file {path!r} does not exist.") from err
    except json.JSONDecodeError as err:
        raise SubboostError(f"--experts file {path!r} is not valid JSON ({err}).") from err
    if isinstance(record, dict) and "experts" in record:
        return {task: float(v[split]) for task, v in record["experts"].items()}
    if isinstance(record, dict) and all(isinstance(v, (int, float)) for v in record.values()):
        return {task: float(v) for task, v in record.items()}
    raise SubboostError(f"--experts file {path!r}: expected {{task: accuracy}} or run_suite's reference.json.")


def accuracy_table(summary: dict[str, Any]) -> str:
    normalized = summary.get("normalized")
    lines = ["| task | accuracy (%) |" + (" normalized (%) |" if normalized else ""),
             "|---|---:|" + ("---:|" if normalized else "")]
    for task, acc in summary["per_task"].items():
        lines.append(f"| {task} | {100 * acc:.2f} |" + (f" {100 * normalized[task]:.2f} |" if normalized else ""))
    lines.append(f"| average | {100 * summary['average_absolute']:.2f} |"
                 + (f" {100 * summary['average_normalized']:.2f} |" if normalized else ""))
    return "\n".join(lines)


def _check_out(out: Path, args: argparse.Namespace) -> None:
    """``--out`` is not an input; it replaces (with ``--overwrite``) only a result file ``subboost eval`` wrote."""
    from subboost.outputs import check_not_an_input

    check_not_an_input(out, [p for p in (args.checkpoint, args.heads, args.experts, args.data_dir) if p], name="--out")
    if not out.exists() and not out.is_symlink():
        return
    if not args.overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists; pass --overwrite to replace it.")
    try:
        record = json.loads(out.read_text()) if out.is_file() and not out.is_symlink() else None
    except (OSError, UnicodeDecodeError, ValueError):
        record = None
    if not (isinstance(record, dict) and {"checkpoint", "tasks", "code_version"} <= set(record)):
        raise FileExistsError(f"--out {str(out)!r} is not a result file of subboost eval; refusing to replace it "
                              "even with --overwrite. Remove it yourself or choose another path.")


def run_eval(args: argparse.Namespace) -> int:
    import jax

    from subboost import data as sbdata
    from subboost.evaluation import (Evaluator, code_version, encoder_config, find_checkpoint, load_checkpoint,
                                     load_heads, summarize)
    from subboost.models import param_shapes
    from subboost.task_vectors import check_same_structure

    from subboost.checkpoints import require_content

    out = Path(args.out) if args.out else None
    if out is not None:
        _check_out(out, args)
    for name in ("batch_size", "max_examples", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SubboostError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    tasks = [t.name for t in sbdata.suite_tasks(args.tasks)]
    checkpoint = find_checkpoint(Path(args.checkpoint).parent, Path(args.checkpoint).name)
    require_content(checkpoint, "params", what="the checkpoint")
    config = encoder_config(args.backbone, checkpoint)
    image_size = args.image_size or config.image_size
    if image_size != config.image_size:
        raise SubboostError(f"--image_size {image_size} does not match --backbone {args.backbone} "
                            f"(input {config.image_size}).")
    experts = read_expert_accuracies(args.experts, args.split) if args.experts else None
    if experts is not None and [t for t in tasks if t not in experts]:
        raise SubboostError(f"--experts {args.experts!r} has no {args.split} accuracy for task(s) "
                            f"{[t for t in tasks if t not in experts]}.")
    params = load_checkpoint(checkpoint)
    check_same_structure(param_shapes(config), params, what=f"checkpoint {args.checkpoint}",
                         reference_name=f"the {args.backbone or 'recorded'} architecture", check_dtype=False)
    heads = load_heads(args.heads, tasks)
    evaluator = Evaluator.for_clip(config, heads, batch_size=args.batch_size,
                                   num_classes={t: sbdata.get_task(t).num_classes for t in tasks})
    splits = {t: sbdata.numpy_batches(t, args.split, batch_size=args.batch_size, data_dir=args.data_dir,
                                      image_size=image_size, max_examples=args.max_examples) for t in tasks}
    summary = summarize(evaluator.accuracies(jax.device_put(params), splits),
                        None if experts is None else {t: experts[t] for t in tasks})
    print(accuracy_table(summary))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "checkpoint": str(args.checkpoint), "backbone": args.backbone, "split": args.split, "tasks": tasks,
            "data_dir": args.data_dir, "image_size": image_size, "max_examples": args.max_examples,
            **summary, "code_version": code_version()}, indent=2))
        print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "eval", help="accuracy of an image-encoder checkpoint on benchmark tasks", doc=__doc__)
    parser.add_argument("checkpoint", help="encoder checkpoint (orbax directory or .safetensors file)")
    parser.add_argument("--backbone", default=None,
                        help="ViT-B/32, ViT-B/16, ViT-L/14 or tiny (default: what the checkpoint records)")
    parser.add_argument("--heads", required=True, help="directory of per-task heads <Task>[.safetensors]")
    parser.add_argument("--tasks", required=True, help="8, 14, 20 or comma-separated task names")
    parser.add_argument("--data_dir", default=None, help="tfds data_dir (local tasks in subdirectories)")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"), help="the split to score")
    parser.add_argument("--batch_size", type=int, default=128, help="examples per compiled encoder call")
    parser.add_argument("--max_examples", type=int, default=None, help="first N examples per task")
    parser.add_argument("--image_size", type=int, default=None, help="default: the backbone's input size")
    parser.add_argument("--experts", default=None, help="JSON of expert accuracies, for normalized accuracy")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(func=run_eval)
