"""Converters from PyTorch checkpoint formats to subboost (orbax) checkpoints.

Formats (``format=`` / ``--format``; ``"auto"`` detects them):

* ``open_clip``: an open_clip / OpenAI CLIP ``state_dict`` ``.pt`` file (visual tower alone,
  with or without the ``visual.`` prefix, or the full model, whose text tower is skipped);
* ``pickled_module``: a whole module saved with ``torch.save(model)`` (e.g. the
  task-vector codebases' ``ImageEncoder``), read without importing or running its code;
* ``hf``: a Hugging Face ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel``
  directory (``config.json`` + ``model.safetensors``);
* ``head``: a classification head ``head_{Task}.pt`` (``weight`` / ``bias``, state dict or
  pickled module);
* ``bert``: a Hugging Face BERT encoder (``config.json`` with ``"model_type": "bert"`` and
  ``model.safetensors`` / ``pytorch_model.bin``), as a directory or a ``.zip`` of one
  (`subboost.convert.bert`; detected from config.json, and every ``.zip`` is read this way).

`convert_checkpoint` converts in memory; `convert` also writes the orbax checkpoint (with
``subboost.json``: architecture, source format, source file sha256) atomically.

``sb.convert`` is this package, made callable: ``sb.convert(src, dst, ...)`` is
``sb.convert.convert(src, dst, ...)``, and ``import subboost.convert.hf`` still works.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

from subboost.convert import bert as _bert
from subboost.convert import heads as _heads
from subboost.convert import hf as _hf
from subboost.convert import open_clip as _open_clip
from subboost.convert.common import ConversionError, Converted, config_name, file_record, finalize
from subboost.convert.torch_pickle import UnsafePickleError
from subboost.errors import SubboostError
from subboost.models.clip_vit import CLIPVisionConfig

FORMATS: tuple[str, ...] = ("auto", "open_clip", "pickled_module", "hf", "head", "bert")
FORMAT_VERSION = 1


def _tensors_of(path: Path) -> tuple[dict, Any, str]:
    from subboost.convert.torch_pickle import load_torch_file, state_dict, to_numpy

    obj = load_torch_file(path)
    tensors, what = state_dict(obj, source=str(path))
    return {k: to_numpy(v) for k, v in tensors.items()}, obj, what


def convert_checkpoint(
    src: str | os.PathLike,
    *,
    format: str = "auto",
    config: CLIPVisionConfig | str | None = None,
    dtype: Any = None,
    **overrides: Any,
) -> Converted:
    """Reads a PyTorch / Hugging Face checkpoint and converts it to Flax parameters in memory.

    Args:
      src: a ``.pt`` / ``.bin`` file or a Hugging Face model directory.
      format: one of `FORMATS`.
      config: expected architecture (a `CLIPVisionConfig` or a name such as ``"ViT-B/32"``);
        the weights are checked against it. Without it the architecture is read off the
        weights (and ``config.json`` / the pickled module where they exist).
      dtype: cast every parameter to this dtype (default: keep the checkpoint's dtypes).
      **overrides: architecture fields the weights do not show: ``heads=``, ``act=``
        (``"quick_gelu"`` or ``"gelu"``).

    Returns:
      A `Converted` (params, kind, config, metadata).
    """
    from subboost.convert.pickled_module import architecture_hints, head_normalize
    from subboost.convert.torch_pickle import StandIn

    if format not in FORMATS:
        raise SubboostError(f"unknown format {format!r}; expected one of {FORMATS}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}  # None: "not given" (the CLI's defaults)
    path = Path(src)
    source = str(path)
    if not path.exists():
        raise FileNotFoundError(f"source {source!r} does not exist.")
    if not path.is_dir() and not path.is_file():
        raise ConversionError(f"{source}: not a regular file or directory (a FIFO, socket or device?).")
    if format == "bert" or (format == "auto" and _is_bert_source(path)):
        return _convert_bert(path, config=config, dtype=dtype, overrides=overrides)
    if path.is_dir():
        if format not in ("auto", "hf"):
            raise SubboostError(f"{source} is a directory; only --format hf (or auto) reads directories.")
        if not _hf.is_hf_dir(path):
            raise ConversionError(
                f"{source}: not a Hugging Face model directory (needs config.json and model.safetensors, "
                "model.safetensors.index.json or pytorch_model.bin)."
            )
        tensors, files = _hf.load_dir(path)
        params, cfg, info = _hf.convert_state_dict(
            tensors, source=source, hf_config=_hf.read_config(path), config=config, overrides=overrides
        )
        detected, obj, what = "hf", None, "Hugging Face directory"
    else:
        tensors, obj, what = _tensors_of(path)
        files = [file_record(path)]
        pickled = isinstance(obj, StandIn)
        names = list(tensors)
        if _heads.is_head(tensors):
            detected = "head"
        elif _open_clip.is_open_clip(names):
            detected = "pickled_module" if pickled else "open_clip"
        elif _hf.is_hf_state(names):
            detected = "hf"
        else:
            raise ConversionError(
                f"{source}: unrecognised {what}: neither an open_clip / OpenAI CLIP vision tower ('conv1.weight'), "
                f"a Hugging Face CLIP vision model ('embeddings.patch_embedding.weight') nor a head "
                f"('weight', 'bias'); first keys {sorted(names)[:6]}."
            )
        if format not in ("auto", detected) and not (format == "pickled_module" and pickled):
            if format == "pickled_module":
                hint = "use --format open_clip" if detected == "open_clip" else "use --format auto"
                raise ConversionError(f"{source}: holds a state_dict, not a pickled module; {hint}.")
            if detected == "pickled_module":
                raise ConversionError(
                    f"{source}: holds a {what}, not a state_dict; use --format pickled_module (or auto)."
                )
            raise ConversionError(f"{source}: --format {format} requested, but the file holds a {detected} checkpoint.")
        hints = architecture_hints(obj, source=source) if pickled else {}
        if detected == "head":
            if config is not None or overrides:
                raise SubboostError(f"{source}: a classification head takes no architecture arguments.")
            params, architecture = _heads.convert_head(
                tensors, source=source, normalize=head_normalize(obj) if pickled else None
            )
            params = finalize(params, source=source, dtype=dtype)
            metadata = _metadata("classification_head", architecture, detected, what, files, info={})
            task = _heads.task_name(path)
            if task:
                metadata["task"] = task
            return Converted(params=params, kind="classification_head", config=None, metadata=metadata)
        if detected == "hf":
            params, cfg, info = _hf.convert_state_dict(tensors, source=source, config=config, overrides=overrides)
        else:
            params, cfg, info = _open_clip.convert_state_dict(
                tensors, source=source, what=what, config=config, hints=hints, overrides=overrides
            )
    params = finalize(params, source=source, dtype=dtype)
    metadata = _metadata("clip_vision", cfg.to_dict(), detected, what, files, info=info)
    name = config_name(cfg)
    if name:
        metadata["config_name"] = name
    return Converted(params=params, kind="clip_vision", config=cfg, metadata=metadata)


def _is_bert_source(path: Path) -> bool:
    """A ``.zip`` (only BERT folders are read from archives) or a directory whose config.json says BERT."""
    if path.is_file():
        return path.suffix.lower() == ".zip"
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return _bert.is_bert_config(_bert.read_json(config))
    except ConversionError:
        return False  # the CLIP reader reports the unreadable file


def _convert_bert(path: Path, *, config, dtype, overrides) -> Converted:
    if config is not None or any(v is not None for v in overrides.values()):
        raise SubboostError(f"{path}: a BERT encoder's architecture comes from its config.json; "
                            "config= / heads= / act= do not apply.")
    params, cfg, info, files, what = _bert.convert_source(path)
    params = finalize(params, source=str(path), dtype=dtype)
    metadata = _metadata("bert", cfg.to_dict(), "bert", what, files, info=info)
    return Converted(params=params, kind="bert", config=cfg, metadata=metadata)


def _metadata(kind, architecture, detected, what, files, *, info) -> dict[str, Any]:
    import subboost

    return {
        "subboost_checkpoint": FORMAT_VERSION,
        "subboost_version": getattr(subboost, "__version__", "?"),
        "kind": kind,
        "architecture": architecture,
        "source": {"format": detected, "contents": what, "files": files, **{k: v for k, v in info.items() if k != "notes"}},
        "notes": list(info.get("notes", [])),
    }


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    format: str = "auto",
    overwrite: bool = False,
    config: CLIPVisionConfig | str | None = None,
    dtype: Any = None,
    **overrides: Any,
) -> Converted:
    """Converts ``src`` (see `convert_checkpoint`) and saves it as an orbax checkpoint at ``dst``.

    ``dst`` receives the parameters and ``subboost.json``; it must not exist unless
    ``overwrite``. The whole source is read and checked before anything is written, and the
    checkpoint is built in a hidden staging directory and renamed into place: on any error
    nothing is left at ``dst``. Restore with `subboost.load_params`.
    """
    from subboost.checkpoints import save_params
    from subboost.outputs import check_output

    # dst never is, contains or lies inside the source; an existing dst is replaced only if subboost wrote it.
    dst_path = check_output(dst, inputs=[src], overwrite=overwrite)  # fail fast, before the (slow) conversion
    converted = convert_checkpoint(src, format=format, config=config, dtype=dtype, **overrides)
    save_params(converted.params, dst_path, overwrite=overwrite, metadata=converted.metadata, inputs=[src],
                content="head" if converted.kind == "classification_head" else "params")
    return converted


__all__ = ["FORMATS", "ConversionError", "Converted", "UnsafePickleError", "convert", "convert_checkpoint"]


class _CallableModule(types.ModuleType):
    """This package, callable as `convert` (so ``sb.convert(...)`` and its submodules coexist)."""

    def __call__(self, src, dst, **kwargs) -> Converted:
        return convert(src, dst, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
