"""Build the demo: pick the device, load the model under the allocator's tags, pick the controller."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .controller import AllocatorController, CpuOnlyController
from .engine import Engine, HuggingFaceEngine, TinyEngine
from .extra_weights import ExtraWeights
from .model import TinyTransformerConfig

if TYPE_CHECKING:
    from ..allocator import Allocator

__all__ = ["DemoRuntime", "build_runtime", "resolve_device", "sleep_mode_supported"]

log = logging.getLogger("gpusleep.demo")


@dataclass
class DemoRuntime:
    engine: Engine
    controller: Any  #: an AllocatorController on CUDA, a CpuOnlyController otherwise
    allocator: Any | None  #: the gpusleep.Allocator on CUDA or the simulated GPU, else None
    device: torch.device  #: where the model computes (the CPU on the simulated GPU)
    simulated_gpu: Any | None = None  #: the gpusleep.simulated_gpu.SimulatedGpu the weights live on, if any

    @property
    def sleep_mode_available(self) -> bool:
        return self.allocator is not None

    @property
    def where(self) -> str:
        """Where the weights live, for the log: the device, or the simulated GPU."""
        return f"{self.device}, weights on the SIMULATED GPU" if self.simulated_gpu is not None else str(self.device)


def resolve_device(device: str) -> torch.device:
    """``"auto"``: the current CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: the demo runs on 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: this machine has no usable CUDA device; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def sleep_mode_supported(dev: torch.device) -> bool:
    """Whether a model on ``dev`` has sleep mode (GPU memory to release): the one place that decides it,
    for ``build_runtime`` and for the options ``gpusleep serve`` refuses at start without it. On the CPU it
    does when this process runs on the simulated GPU (:func:`gpusleep.simulated_gpu.enable`): the weights then
    live in simulated device memory and the model computes on the CPU."""
    from .. import simulated_gpu

    return dev.type == "cuda" or (dev.type == "cpu" and simulated_gpu.is_enabled())


def build_runtime(
    model_dir: str | None = None,
    device: str = "auto",
    seed: int = 0,
    *,
    extra_weights_bytes: int = 0,
    keep_host_copy: bool = False,
    reserve_host_memory: bool = False,
    allocator_options: Mapping[str, Any] | None = None,
    host_tiers: Mapping[str, str] | None = None,
) -> DemoRuntime:
    """The engine and its sleep controller. On CUDA the weights are allocated under ``tag("weights")``
    and the KV cache under ``tag("kv_cache")`` of a :class:`gpusleep.Allocator` in pool mode.

    ``extra_weights_bytes``: that many seeded bytes more under ``tag("weights")``, checked after every wake
    (:class:`~gpusleep.demo.extra_weights.ExtraWeights`), so that a sleep and a wake move model-sized
    memory. ``keep_host_copy``: the weights' host copy is kept after a wake, so that the next level-1
    sleep of these unchanged weights only unmaps them (Note [Kept host copies]); a Hugging Face model also
    has sampled pieces compared first (``verify_kept_copy``), since its code may update buffers in place.
    ``reserve_host_memory``: pin the host memory of a level-1 sleep now, so that the first sleep does not
    pin. All three need sleep mode (CUDA, or the simulated GPU). ``allocator_options``: keywords of the
    :class:`gpusleep.Allocator` (the host tiers' ``pinned_budget_bytes``, ``file_dir``, ...); ``host_tiers``:
    tag -> the host tier its level-1 copy goes to first (the tag is then offloaded; docs/host-tiers.md).

    On the simulated GPU (enabled before, :func:`gpusleep.simulated_gpu.enable`) the model is built on the CPU
    and its weights and KV cache move to simulated device memory (:mod:`gpusleep.demo.simulated`)."""
    from .. import simulated_gpu

    dev = resolve_device(device)
    if simulated_gpu.is_enabled():
        if dev.type != "cpu":
            raise ValueError(
                f"--device {device}: on the simulated GPU the model computes on the CPU and its weights "
                "live on simulated device 0; leave --device out"
            )
        allocator = _new_allocator(model_dir, keep_host_copy, allocator_options, host_tiers)
        return _build_simulated_runtime(allocator, model_dir, seed, extra_weights_bytes, reserve_host_memory)
    if not sleep_mode_supported(dev) and (
        extra_weights_bytes or keep_host_copy or reserve_host_memory or allocator_options or host_tiers
    ):
        raise ValueError(
            f"--extra-weights-gib, --keep-host-copy and --reserve-host-memory are for sleep mode, "
            f"which needs a CUDA device; this server would run on {dev}. Start it with --device "
            "cuda, or leave them out."
        )
    allocator = None
    weights_scope = kv_cache_scope = contextlib.nullcontext
    if sleep_mode_supported(dev):
        torch.cuda.set_device(dev)
        allocator = _new_allocator(model_dir, keep_host_copy, allocator_options, host_tiers)
        allocator.use_mem_pools()
        weights_scope = lambda: allocator.tag("weights")  # noqa: E731
        kv_cache_scope = lambda: allocator.tag("kv_cache")  # noqa: E731
    if model_dir is None:
        engine: Engine = TinyEngine(
            TinyTransformerConfig(seed=seed), dev, weights_scope=weights_scope, kv_cache_scope=kv_cache_scope
        )
    else:
        engine = HuggingFaceEngine(model_dir, dev, weights_scope=weights_scope)
    extra_weights = None
    if extra_weights_bytes:
        started = time.perf_counter()
        extra_weights = ExtraWeights(extra_weights_bytes, seed, dev, weights_scope)
        log.info(
            "extra weights: %d bytes (%d checked pieces) under tag 'weights', written in %.2f s",
            extra_weights_bytes,
            extra_weights.num_pieces,
            time.perf_counter() - started,
        )
    if reserve_host_memory and allocator is not None:
        allocator.reserve_host_memory()  # logs what it pinned and how fast
    controller = (
        AllocatorController(allocator, engine, extra_weights) if allocator is not None else CpuOnlyController(str(dev))
    )
    return DemoRuntime(engine, controller, allocator, dev)


def _new_allocator(
    model_dir: str | None,
    keep_host_copy: bool,
    allocator_options: Mapping[str, Any] | None,
    host_tiers: Mapping[str, str] | None,
) -> Allocator:
    """The demo's allocator with its options and the policies of its tags."""
    from .. import Allocator

    allocator = Allocator(**dict(allocator_options or {}))
    tiers = dict(host_tiers or {})
    if keep_host_copy:
        allocator.set_policy(
            "weights",
            "offload",
            keep_host_copy=True,
            verify_kept_copy=model_dir is not None,
            host_tier=tiers.pop("weights", "pinned"),
        )
    for tag, tier in tiers.items():
        allocator.set_policy(tag, "offload", host_tier=tier)
    return allocator


def _build_simulated_runtime(
    allocator: Allocator, model_dir: str | None, seed: int, extra_weights_bytes: int, reserve_host_memory: bool
) -> DemoRuntime:
    from .. import simulated_gpu
    from .simulated import SimulatedExtraWeights, SimulatedGpuEngine

    dev = torch.device("cpu")
    if model_dir is None:
        inner: Engine = TinyEngine(TinyTransformerConfig(seed=seed), dev)
        kv_cache_bytes = inner.kv_cache.num_bytes
    else:
        inner = HuggingFaceEngine(model_dir, dev)
        kv_cache_bytes = 0  # a Hugging Face model's cache lives per request
    engine = SimulatedGpuEngine(inner, allocator, kv_cache_bytes)
    extra_weights = None
    if extra_weights_bytes:
        started = time.perf_counter()
        extra_weights = SimulatedExtraWeights(allocator, extra_weights_bytes, seed)
        log.info(
            "extra weights: %d bytes (%d checked pieces) under tag 'weights' on the SIMULATED GPU, written in %.2f s",
            extra_weights_bytes,
            extra_weights.num_pieces,
            time.perf_counter() - started,
        )
    if reserve_host_memory:
        allocator.reserve_host_memory()
    controller = AllocatorController(allocator, engine, extra_weights)
    return DemoRuntime(engine, controller, allocator, dev, simulated_gpu.current())
