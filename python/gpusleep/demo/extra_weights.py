"""Extra weights for the demo server (``gpusleep serve --extra-weights-gib N``): seeded random bytes
allocated with the model's weights, never read by the model, so that the embedded tiny model moves as
much memory on sleep and wake as a real one (an 8 GB model switch, say) while needing no download.

Their content is checked after every wake: the sum of every 2 MiB block, taken when they were written,
is compared with the sums of what is in GPU memory now, so a switch benchmark that loses bytes or puts
blocks back in the wrong place fails loudly instead of measuring a fast but wrong switch. Sums are taken
block by block, so a swap of two blocks shows (a sum over the whole would not see it); a block's 2^19
random 32-bit words summed in 64 bits cannot overflow, and a changed block that keeps its sum is unlikely.
The sums are computed a few blocks at a time, in PyTorch's own memory (outside the weights' tag), so the
check needs little memory; it reads the weights once (milliseconds per GiB on a current GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..errors import GpusleepError
from ..stats import format_bytes

__all__ = ["ExtraWeights", "ExtraWeightsCorruptedError"]

#: Bytes per checked block: a block that came back wrong is named by its index and offset.
PIECE_BYTES = 2 << 20
#: Bytes summed per step of the check (its scratch memory is twice this, for the 64-bit words).
_STEP_BYTES = 64 << 20


class ExtraWeightsCorruptedError(RuntimeError, GpusleepError):
    """The extra weights do not hold what was written: a wake brought back other bytes."""

    def __init__(self, bad_pieces: list[int], num_pieces: int, piece_bytes: int) -> None:
        shown = ", ".join(f"{i} (at {format_bytes(i * piece_bytes)})" for i in bad_pieces[:8])
        more = f" and {len(bad_pieces) - 8} more" if len(bad_pieces) > 8 else ""
        super().__init__(
            f"the extra weights changed across sleep and wake: {len(bad_pieces)} of {num_pieces} pieces of "
            f"{format_bytes(piece_bytes)} differ from what was written (pieces {shown}{more}). GPU memory came back "
            "with other bytes; the model is awake but its weights cannot be trusted. Report this with the "
            "server log."
        )
        self.bad_pieces = bad_pieces


ExtraWeightsCorrupted = ExtraWeightsCorruptedError  # the name before every exception ended in Error


class ExtraWeights:
    """``num_bytes`` (a multiple of 4) of seeded random 32-bit words on ``device``, allocated inside
    ``scope()`` (the demo passes the allocator's ``tag("weights")``), with their per-piece sums."""

    def __init__(
        self,
        num_bytes: int,
        seed: int,
        device: torch.device,
        scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        piece_bytes: int = PIECE_BYTES,
    ) -> None:
        if num_bytes <= 0 or num_bytes % 4 or piece_bytes <= 0 or piece_bytes % 4:
            raise ValueError(
                f"extra weights: num_bytes ({num_bytes}) and piece_bytes ({piece_bytes}) must be "
                "positive multiples of 4"
            )
        self.num_bytes = num_bytes
        self.seed = seed
        self.piece_bytes = piece_bytes
        with scope():
            self.words = torch.empty(num_bytes // 4, dtype=torch.int32, device=device)
        self.fill()

    @property
    def num_pieces(self) -> int:
        return -(-self.num_bytes // self.piece_bytes)

    def fill(self) -> None:
        """Write the seeded words (again, after a level-2 sleep discarded them) and take their sums."""
        generator = torch.Generator(device=self.words.device).manual_seed(self.seed)
        with torch.no_grad():
            self.words.random_(-(2**31), 2**31, generator=generator)
        self.expected_sums = self.piece_sums()

    def piece_sums(self) -> torch.Tensor:
        """The 64-bit sum of each piece's words, on the CPU."""
        words_per_piece = self.piece_bytes // 4
        pieces_per_step = max(1, _STEP_BYTES // self.piece_bytes)
        whole = self.words.numel() // words_per_piece * words_per_piece
        sums = [
            step.view(-1, words_per_piece).to(torch.int64).sum(dim=1)
            for step in torch.split(self.words[:whole], words_per_piece * pieces_per_step)
        ]
        if whole < self.words.numel():  # a last, shorter piece
            sums.append(self.words[whole:].to(torch.int64).sum().reshape(1))
        return torch.cat(sums).cpu()

    def verify(self) -> None:
        """Raise :class:`ExtraWeightsCorruptedError` if any piece's sum is not the one written."""
        bad = (self.piece_sums() != self.expected_sums).nonzero().flatten().tolist()
        if bad:
            raise ExtraWeightsCorruptedError(bad, self.num_pieces, self.piece_bytes)
