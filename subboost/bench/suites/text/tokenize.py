"""Tokenisation with the `tokenizers` package from a shipped ``tokenizer.json``.

`SentenceTokenizer` turns a batch of sentences into ``(input_ids, attention_mask)`` int32
arrays of shape ``(batch, length)``: ``[CLS] tokens [SEP]`` then ``[PAD]`` (id and mask 0)
up to ``length``, where ``length`` is the longest sentence of the batch (or a fixed
``pad_to``). Sentences longer than ``max_length`` tokens (special tokens included) are
truncated to ``max_length`` and still end in ``[SEP]``; `encode` reports how many were.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A tokenised batch.

    Attributes:
      input_ids: ``(batch, length)`` int32 token ids.
      attention_mask: ``(batch, length)`` int32, 1 on real tokens, 0 on padding.
      truncated: how many sentences lost tokens to ``max_length``.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: int


class SentenceTokenizer:
    """A ``tokenizers.Tokenizer`` with this project's batching, padding and truncation rules."""

    def __init__(self, tokenizer_json: str, *, source: str = "tokenizer.json"):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("the text suite needs `tokenizers`: pip install 'subboost[text]'") from err
        try:
            self._tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{source}: not a readable tokenizers JSON file ({err}).") from err
        self.source = source
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        pad = self._tokenizer.token_to_id("[PAD]")
        if pad is None:
            raise ValueError(f"{source}: the vocabulary has no [PAD] token.")
        self.pad_id = int(pad)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentenceTokenizer:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise FileNotFoundError(f"{path}: cannot read the tokenizer ({err}).") from err
        return cls(text, source=str(path))

    @classmethod
    def from_zip(cls, path: str | os.PathLike, member: str = "tokenizer.json") -> SentenceTokenizer:
        """The tokenizer stored in a model archive (the shallowest ``tokenizer.json``)."""
        path = Path(path)
        try:
            with zipfile.ZipFile(path) as archive:
                names = sorted((n for n in archive.namelist() if n == member or n.endswith("/" + member)),
                               key=lambda n: n.count("/"))
                if not names:
                    raise ValueError(f"{path}: the archive holds no {member}.")
                text = archive.read(names[0]).decode("utf-8")
        except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot read {member} from the archive ({type(err).__name__}: {err}).") from err
        return cls(text, source=f"{path}:{names[0]}")

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    def encode(self, sentences: Sequence[str], *, max_length: int, pad_to: int | None = None) -> Encoded:
        """Tokenises a batch; see the module docstring.

        Args:
          sentences: the batch (strings).
          max_length: most tokens per sentence, ``[CLS]`` and ``[SEP]`` included (>= 2).
          pad_to: fixed output length (>= the longest encoded sentence); default: the longest.
        """
        if isinstance(sentences, str):
            raise TypeError("encode takes a sequence of sentences, not one string.")
        if not sentences:
            raise ValueError("encode: the batch of sentences is empty.")
        bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
        if bad:
            raise TypeError(f"encode: sentences {bad[:5]} are not strings.")
        if max_length < 2:
            raise ValueError(f"encode: max_length must be at least 2 ([CLS] and [SEP]), got {max_length}.")
        full = self._tokenizer.encode_batch(list(sentences))
        lengths = np.array([len(e.ids) for e in full])
        truncated = int(np.sum(lengths > max_length))
        length = int(min(lengths.max(), max_length))
        if pad_to is not None:
            if pad_to < length:
                raise ValueError(f"encode: pad_to={pad_to} is shorter than the longest encoded sentence ({length}).")
            length = pad_to
        ids = np.full((len(full), length), self.pad_id, np.int32)
        mask = np.zeros((len(full), length), np.int32)
        for row, e in enumerate(full):
            tokens = e.ids
            if len(tokens) > max_length:  # keep [CLS] .. and the final [SEP]
                tokens = tokens[: max_length - 1] + tokens[-1:]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return Encoded(ids, mask, truncated)
