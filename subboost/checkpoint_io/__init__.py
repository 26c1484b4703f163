"""Checkpoint I/O shared by `subboost.checkpoints`, `subboost.streaming` and `subboost.convert`.

* `safetensors_format`: the safetensors file format (header, tensor-by-tensor writer);
* `orbax_io`: whole restores of orbax PyTree checkpoints, with clean errors for damaged ones;
* `metadata`: what a checkpoint records (content, architecture, checksums) and the one
  comparison of an expert with its base (`check_same_parameters`, `check_same_architecture`);
* `readers`: lazy readers of every format (`open_checkpoint`), one chunk of parameters at a time;
* `huggingface`: Hugging Face model directories of any architecture (sharded, ``.bin``,
  sentence-transformers), read by tensor name and written back loadable.

Atomic output (staging directory, then rename) and the rule for what may be overwritten
live in `subboost.outputs`.
"""

from subboost.checkpoint_io import metadata, orbax_io, readers, safetensors_format
from subboost.checkpoint_io import huggingface  # registers its reader with `readers.open_checkpoint`

__all__ = ["huggingface", "metadata", "orbax_io", "readers", "safetensors_format"]
