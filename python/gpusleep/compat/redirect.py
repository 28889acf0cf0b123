"""Run unmodified engines on gpusleep: make ``import torch_memory_saver`` and vLLM's
``vllm.device_allocator.cumem`` resolve to gpusleep's compat layers, in this process and, through
:mod:`gpusleep.compat.launch`, in every process it starts.

Note [Unmodified engines]
    Problem. The import line that selects the sleep allocator lives in code the user does not own:
    vLLM's worker (``vllm.device_allocator.cumem.CuMemAllocator``, for ``--enable-sleep-mode``) and
    SGLang's scheduler (``torch_memory_saver``, for ``--enable-memory-saver``), in processes the engine
    spawns itself (vLLM's engine core and workers, SGLang's scheduler per rank).

    Approach. A ``sys.meta_path`` finder placed first answers for two module names and leaves every
    other import alone: ``torch_memory_saver`` becomes :mod:`gpusleep.compat.torch_memory_saver` (the
    same module object under both names, so the engine's ``torch_memory_saver.torch_memory_saver`` is
    gpusleep's singleton), and ``vllm.device_allocator.cumem`` becomes a module whose ``CuMemAllocator``
    is :class:`gpusleep.compat.vllm.CuMemAllocator` (and ``cumem_available`` is True), so vLLM's CUDA
    extension for its own allocator is never loaded. The finder is installed from the environment
    variable :data:`ENV_VAR` (``GPUSLEEP_COMPAT=torch_memory_saver,vllm``) by a ``sitecustomize`` module
    that :mod:`gpusleep.compat.launch` puts on ``PYTHONPATH``; children inherit both variables, so every
    Python process of the engine (``spawn``, ``fork``+``exec``, ``subprocess``) redirects the same way.
    It is opt-in: without the variable nothing changes, and ``import gpusleep`` never installs it.

    Limitations. Only Python-level imports are redirected: torch_memory_saver's ``LD_PRELOAD`` mode
    (``hook_mode="preload"``) and its process-wide default region (``TMS_INIT_ENABLE``) do not exist on
    gpusleep (``docs/migrating.md``). A module imported before the finder is installed keeps its first
    meaning. Another ``sitecustomize`` on the path still runs (it is chained), but one that imports the
    peers first defeats the redirect.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Iterable, Sequence

__all__ = ["ENV_VAR", "PEERS", "RedirectFinder", "install", "install_from_env", "installed_peers"]

#: Comma-separated peers to redirect: ``torch_memory_saver``, ``vllm`` (or ``all``).
ENV_VAR = "GPUSLEEP_COMPAT"
#: Peer name -> the module name it redirects.
PEERS = {"torch_memory_saver": "torch_memory_saver", "vllm": "vllm.device_allocator.cumem"}


class _AliasLoader(importlib.abc.Loader):
    """Loads ``name`` as the module object gpusleep provides for it."""

    def __init__(self, build) -> None:
        self._build = build

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self._build()

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # built complete by create_module


def _torch_memory_saver() -> types.ModuleType:
    return importlib.import_module("gpusleep.compat.torch_memory_saver")


def _vllm_cumem() -> types.ModuleType:
    from . import vllm as compat_vllm

    module = types.ModuleType("vllm.device_allocator.cumem", "vLLM's cumem module, served by gpusleep.compat.vllm")
    module.CuMemAllocator = compat_vllm.CuMemAllocator
    module.cumem_available = True
    module.__gpusleep__ = True
    return module


_BUILDERS = {"torch_memory_saver": _torch_memory_saver, "vllm.device_allocator.cumem": _vllm_cumem}


class RedirectFinder(importlib.abc.MetaPathFinder):
    """Answers for the redirected module names only (Note [Unmodified engines])."""

    def __init__(self, module_names: Iterable[str]) -> None:
        self.module_names = frozenset(module_names)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target=None):
        if fullname not in self.module_names:
            return None
        # A module, not a package: the peers' submodules (torch_memory_saver.hooks...) are not served.
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(_BUILDERS[fullname]), origin="gpusleep")


def _parse(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"{ENV_VAR}: unknown peer(s) {unknown}; known: {sorted(PEERS)} or 'all'")
    return names


def install(peers: Iterable[str]) -> RedirectFinder:
    """Redirect the imports of ``peers`` (names of :data:`PEERS`) in this process from now on. A peer
    module already imported is left as it is (a warning says which). Idempotent per peer."""
    names = [PEERS[p] for p in peers]
    for name in names:
        module = sys.modules.get(name)
        if module is not None and not (
            getattr(module, "__gpusleep__", False) or module.__name__.startswith("gpusleep.")
        ):
            import warnings

            warnings.warn(
                f"gpusleep.compat.redirect: {name} was imported before the redirect; it stays the "
                "peer's own module in this process",
                RuntimeWarning,
                stacklevel=2,
            )
    for finder in sys.meta_path:
        if isinstance(finder, RedirectFinder):
            finder.module_names = finder.module_names | frozenset(names)
            return finder
    finder = RedirectFinder(names)
    sys.meta_path.insert(0, finder)
    return finder


def installed_peers() -> list[str]:
    """The peers redirected in this process."""
    names: set[str] = set()
    for finder in sys.meta_path:
        if isinstance(finder, RedirectFinder):
            names |= finder.module_names
    return sorted(p for p, m in PEERS.items() if m in names)


def install_from_env(environ: dict | None = None) -> RedirectFinder | None:
    """:func:`install` the peers named by :data:`ENV_VAR`; nothing when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    peers = _parse(value)
    return install(peers) if peers else None
