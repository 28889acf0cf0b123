"""Drop-in replacements for the sleep-mode APIs that model servers already call.

* :mod:`gpusleep.compat.vllm`: vLLM's ``CuMemAllocator`` (``vllm/device_allocator/cumem.py``).
* :mod:`gpusleep.compat.torch_memory_saver`: the ``torch_memory_saver`` module surface used by SGLang,
  verl and slime.

Each keeps the peer's class, function and argument names, defaults and return values, and runs on a
:class:`gpusleep.Allocator` in pool mode, so that switching is one import line. For engines whose import
line the user does not own (vLLM's worker, SGLang's scheduler), :mod:`gpusleep.compat.launch` runs them
with those imports redirected to these modules in every process (:mod:`gpusleep.compat.redirect`). ``docs/migrating.md``
lists every call side by side and where the behaviour differs on purpose. Importing this package
imports neither torch nor the submodules.
"""

__all__ = ["launch", "redirect", "torch_memory_saver", "vllm"]
