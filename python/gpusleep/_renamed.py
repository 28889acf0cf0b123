"""Former spellings of renamed keywords and attributes: still accepted, with a :class:`DeprecationWarning`.

Note [One spelling per unit]
    Durations are spelled ``_seconds`` everywhere (``drain_timeout_seconds``, ``idle_sleep_seconds``, ...), as
    sizes are spelled ``_bytes``. The former ``_s`` spellings keep working: a keyword argument is renamed on the
    way in and an attribute read goes to the new field, each with a ``DeprecationWarning`` that names the new
    spelling. Giving both spellings at once is a ``TypeError``. Switch configuration files accept both keys
    (switch/config.py). Environment variables that end in ``_S`` (``GPUSLEEP_WAIT_TIMEOUT_S``) keep their names.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["renamed_attributes", "renamed_keywords"]

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)


def renamed_keywords(renames: Mapping[str, str]) -> Callable[[F], F]:
    """Wrap a function so that each keyword ``old`` of ``renames`` (old -> new) is passed on as ``new``."""

    def decorate(func: F) -> F:
        name = getattr(func, "__qualname__", "the call").replace(".__init__", "")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old}= and {new}=; give only {new}=")
                    warnings.warn(
                        f"{name}({old}=...) is deprecated; use {new}= (Note [One spelling per unit])",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_attributes(renames: Mapping[str, str]) -> Callable[[C], C]:
    """Class decorator: the constructor takes each ``old`` keyword of ``renames`` (old -> new) as ``new``, and
    reading ``instance.old`` reads ``instance.new``; both with a ``DeprecationWarning``."""

    def decorate(cls: C) -> C:
        cls.__init__ = renamed_keywords(renames)(cls.__init__)  # type: ignore[misc]
        for old, new in renames.items():
            setattr(cls, old, _deprecated_alias(cls.__name__, old, new))
        return cls

    return decorate


def _deprecated_alias(owner: str, old: str, new: str) -> property:
    message = f"{owner}.{old} is deprecated; use {owner}.{new} (Note [One spelling per unit])"

    def read(self: Any) -> Any:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    def write(self: Any, value: Any) -> None:
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        setattr(self, new, value)

    return property(read, write, doc=f"Deprecated spelling of :attr:`{new}`.")
