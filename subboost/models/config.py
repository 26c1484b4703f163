"""What the model architecture configs share: field checks, ``head_dim`` and a dict round trip.

`subboost.models.clip_vit.CLIPVisionConfig` and `subboost.models.bert.BertConfig`
are frozen dataclasses deriving from `ArchitectureConfig`; their ``to_dict``
output is what checkpoints record as ``architecture``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from subboost.errors import SubboostError


class ArchitectureConfig:
    """Mixin for a frozen dataclass with ``width`` and ``heads`` fields."""

    def check_positive_ints(self, names: Iterable[str]) -> None:
        """Raises `SubboostError` naming the first of ``names`` that is not a positive int (bools refused)."""
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SubboostError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}.")

    def check_heads_divide_width(self) -> None:
        if self.width % self.heads:
            raise SubboostError(f"{type(self).__name__}: width {self.width} is not divisible by heads {self.heads}.")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """The config from `to_dict`'s output; unknown keys raise `SubboostError` naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise SubboostError(f"{cls.__name__}: unknown fields {unknown}; known: {sorted(fields)}.")
        return cls(**d)
