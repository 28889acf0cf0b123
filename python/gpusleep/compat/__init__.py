"""Drop-in replacements for the sleep-mode APIs that model servers already call.

* :mod:`gpusleep.compat.vllm`: vLLM's ``CuMemAllocator`` (``vllm/device_allocator/cumem.py``).
* :mod:`gpusleep.compat.torch_memory_saver`: the ``torch_memory_saver`` module surface used by SGLang,
  verl and slime.

Each keeps the peer's class, function and argument names, defaults and return values, and runs on a
:class:`gpusleep.Allocator` in pool mode, so that switching is one import line. ``docs/migrating.md``
lists every call side by side and where the behaviour differs on purpose. Importing this package
imports neither torch nor the submodules.
"""

__all__ = ["torch_memory_saver", "vllm"]
