"""Checkpoint I/O shared by `subboost.checkpoints`, `subboost.streaming` and `subboost.convert`.

* `safetensors_format`: the safetensors file format (header, tensor-by-tensor writer);
* `orbax_io`: whole restores of orbax PyTree checkpoints, with clean errors for damaged ones;
* `metadata`: what a checkpoint records (content, architecture, checksums) and the one
  comparison of an expert with its base (`check_same_parameters`, `check_same_architecture`);
* `readers`: lazy readers of every format (`open_checkpoint`), one chunk of parameters at a time.

Atomic output (staging directory, then rename) and the rule for what may be overwritten
live in `subboost.outputs`.
"""

from subboost.checkpoint_io.metadata import (
    COMPLETE_MARKER,
    CONTENTS,
    FORMAT_VERSION,
    INFO_FILE,
    METADATA_FILE,
    PARAMS_FILE,
    architecture,
    array_checksum,
    check_same_architecture,
    check_same_parameters,
    checkpoint_identity,
    checkpoint_info,
    default_content,
    is_checkpoint_dir,
    require_content,
    specs_of,
    verify_checksums,
)
from subboost.checkpoint_io.orbax_io import quiet_event_loop_noise, restore_orbax, short_error
from subboost.checkpoint_io.readers import (
    CheckpointReader,
    OrbaxReader,
    SafetensorsReader,
    TreeReader,
    open_checkpoint,
    read_params,
)
from subboost.checkpoint_io.safetensors_format import (
    SAFETENSORS_DTYPES,
    SafetensorsWriter,
    read_safetensors_header,
    save_safetensors,
)

__all__ = [
    "COMPLETE_MARKER",
    "CONTENTS",
    "CheckpointReader",
    "FORMAT_VERSION",
    "INFO_FILE",
    "METADATA_FILE",
    "OrbaxReader",
    "PARAMS_FILE",
    "SAFETENSORS_DTYPES",
    "SafetensorsReader",
    "SafetensorsWriter",
    "TreeReader",
    "architecture",
    "array_checksum",
    "check_same_architecture",
    "check_same_parameters",
    "checkpoint_identity",
    "checkpoint_info",
    "default_content",
    "is_checkpoint_dir",
    "open_checkpoint",
    "quiet_event_loop_noise",
    "read_params",
    "read_safetensors_header",
    "require_content",
    "restore_orbax",
    "save_safetensors",
    "short_error",
    "specs_of",
    "verify_checksums",
]
