"""The demo model on the SIMULATED GPU (``gpusleep serve --simulate-gpu``, :mod:`gpusleep.simulated_gpu`).

PyTorch cannot compute on the simulated GPU (it is gpusleep's host-memory driver double, not a CUDA device), so
the model computes on the CPU, but its weights live in simulated device memory: one :meth:`Allocator.allocate`
under ``tag("weights")`` at a fixed device address, written once. Before every request the engine copies them
from that address into the CPU model (``read_device``: the weights as the simulated GPU holds them now), and
after it fills the CPU copy with NaN, so nothing is ever computed from a host copy that a sleep did not see. A
level-1 sleep therefore really moves the weights to host memory and back (an answer after the wake is the same
as before), a level-2 sleep really discards them (the controller reloads them in place on the wake), and bytes
changed in device memory change the answers. The KV cache takes its memory under ``tag("kv_cache")`` on the
simulated device too (released by a sleep, zero-filled by a wake); attention works in a host scratch buffer.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from ..stats import format_bytes
from .engine import ChatMessage, Engine, SamplingParams
from .extra_weights import PIECE_BYTES, ExtraWeightsCorruptedError

__all__ = ["DeviceWeights", "SimulatedGpuEngine", "SimulatedExtraWeights"]

log = logging.getLogger("gpusleep.demo")

_ALIGN = 256  #: bytes between tensors in device memory, as cudaMalloc would align them
_STEP_BYTES = 64 << 20  #: bytes per read or write of the extra weights


def _unique_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers, each storage once (tied weights share one)."""
    seen, out = set(), []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen and t.numel():
            seen.add(key)
            out.append((name, t))
    return out


class DeviceWeights:
    """A model's tensors with their home in device memory of ``allocator``: one allocation under ``tag``, each
    tensor at a fixed offset. ``store()`` writes the host tensors there, ``load()`` reads them back into the
    host tensors, ``scrub()`` fills the floating-point host tensors with NaN."""

    def __init__(
        self, allocator: Any, tensors: Sequence[tuple[str, torch.Tensor]], tag: str = "weights", device: int = 0
    ) -> None:
        self.allocator = allocator
        self.tensors = [(name, t) for name, t in tensors]
        self.offsets: list[int] = []
        offset = 0
        for _, t in self.tensors:
            if not t.is_contiguous():
                raise ValueError("DeviceWeights: every tensor must be contiguous")
            self.offsets.append(offset)
            offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.num_bytes = offset
        self.address = allocator.allocate(self.num_bytes, tag=tag, device=device)
        self.store()

    def store(self) -> None:
        image = bytearray(self.num_bytes)
        for (_, t), offset in zip(self.tensors, self.offsets, strict=False):
            raw = t.detach().reshape(-1).view(torch.uint8).numpy().tobytes()
            image[offset : offset + len(raw)] = raw
        self.allocator.write_device(self.address, bytes(image))

    def load(self) -> None:
        image = bytearray(self.allocator.read_device(self.address, self.num_bytes))
        raw = torch.frombuffer(image, dtype=torch.uint8)
        with torch.no_grad():
            for (_, t), offset in zip(self.tensors, self.offsets, strict=False):
                n = t.numel() * t.element_size()
                t.view(-1).view(torch.uint8).copy_(raw[offset : offset + n])

    def scrub(self) -> None:
        with torch.no_grad():
            for _, t in self.tensors:
                if t.is_floating_point():
                    t.fill_(float("nan"))


class SimulatedGpuEngine(Engine):
    """An engine (the embedded tiny transformer, or a Hugging Face model) built on the CPU whose weights live in
    simulated device memory of ``allocator`` (:class:`DeviceWeights`): every request computes from what that
    memory holds when it starts. ``kv_cache_bytes`` more are allocated under ``tag("kv_cache")``."""

    def __init__(self, inner: Engine, allocator: Any, kv_cache_bytes: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.device = inner.device
        self.weights = DeviceWeights(allocator, _unique_tensors(inner.model), "weights")
        self.weights.scrub()
        self.kv_cache_address: int | None = (
            allocator.allocate(kv_cache_bytes, tag="kv_cache") if kv_cache_bytes else None
        )
        log.info(
            "weights (%s) at simulated device address %#x; KV cache %s",
            format_bytes(self.weights.num_bytes),
            self.weights.address,
            format_bytes(kv_cache_bytes),
        )

    # what does not need the weights goes to the inner engine
    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @model_name.setter
    def model_name(self, name: str) -> None:
        self.inner.model_name = name

    @property
    def max_model_len(self) -> int:  # type: ignore[override]
        return self.inner.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.inner.detokenize(ids)

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        return self.inner.chat_prompt(messages)

    def reload_weights(self) -> None:
        """After a level-2 sleep: the original weights, written again to the same device address."""
        with self._lock:
            self.inner.reload_weights()
            self.weights.store()
            self.weights.scrub()

    # the model steps run on weights read from device memory (called under the engine's lock)
    def _tokens(self, ids: list[int], budget: int, params: SamplingParams, generator: torch.Generator):
        self.weights.load()
        try:
            yield from self.inner._tokens(ids, budget, params, generator)
        finally:
            self.weights.scrub()

    def _hidden(self, ids: list[int]) -> torch.Tensor:
        self.weights.load()
        try:
            return self.inner._hidden(ids).clone()
        finally:
            self.weights.scrub()


class SimulatedExtraWeights:
    """``gpusleep serve --extra-weights-gib`` on the simulated GPU: ``num_bytes`` of seeded bytes in device memory
    under ``tag("weights")``, with a CRC-32 per piece, checked after every wake (the same promise as
    :class:`~gpusleep.demo.extra_weights.ExtraWeights`, which needs PyTorch on CUDA)."""

    def __init__(self, allocator: Any, num_bytes: int, seed: int, piece_bytes: int = PIECE_BYTES) -> None:
        if num_bytes <= 0 or piece_bytes <= 0 or _STEP_BYTES % piece_bytes:
            raise ValueError(
                f"extra weights: num_bytes ({num_bytes}) must be positive and piece_bytes "
                f"({piece_bytes}) divide {_STEP_BYTES}"
            )
        self.allocator, self.num_bytes, self.seed, self.piece_bytes = allocator, num_bytes, seed, piece_bytes
        self.address = allocator.allocate(num_bytes, tag="weights")
        self.expected: list[int] = []
        self.fill()

    @property
    def num_pieces(self) -> int:
        return -(-self.num_bytes // self.piece_bytes)

    def _crcs(self, data: bytes) -> list[int]:
        view = memoryview(data)
        return [zlib.crc32(view[i : i + self.piece_bytes]) for i in range(0, len(data), self.piece_bytes)]

    def fill(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.expected = []
        for start in range(0, self.num_bytes, _STEP_BYTES):
            n = min(_STEP_BYTES, self.num_bytes - start)
            data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator).numpy().tobytes()
            self.allocator.write_device(self.address + start, data)
            self.expected += self._crcs(data)

    def verify(self) -> None:
        bad: list[int] = []
        for start in range(0, self.num_bytes, _STEP_BYTES):
            n = min(_STEP_BYTES, self.num_bytes - start)
            first = start // self.piece_bytes
            for i, crc in enumerate(self._crcs(self.allocator.read_device(self.address + start, n))):
                if crc != self.expected[first + i]:
                    bad.append(first + i)
        if bad:
            raise ExtraWeightsCorruptedError(bad, self.num_pieces, self.piece_bytes)


def describe(simulated: Any) -> dict[str, Any]:
    """What /version says about a simulated GPU."""
    return {
        "gpu": "simulated",
        "simulated_devices": simulated.devices,
        "simulated_memory_bytes_per_device": simulated.memory_bytes,
    }
