"""A byte-level tokenizer for the embedded demo model: token ``i < 256`` is the byte ``i``."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus ``bos_id`` and ``eos_id``. Stateless and thread-safe.

    Decoding drops the special tokens and replaces invalid UTF-8 with U+FFFD."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def validate(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as a list, or ``ValueError`` naming the first id outside the vocabulary."""
        out = [int(i) for i in ids]
        for i in out:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        return out
