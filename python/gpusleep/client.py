"""HTTP clients for a model server with sleep mode: they wake a sleeping model and retry once.

* :class:`Client` / :class:`AsyncClient`: ``httpx.Client`` / ``httpx.AsyncClient`` whose requests,
  on the spec's 503 ``ModelSleepingError``, call ``POST /wake_up`` and are sent again once; plus
  ``sleep()``, ``wake_up()`` and ``is_sleeping()`` for the control endpoints.
* :class:`WakeOnSleepTransport` / :class:`AsyncWakeOnSleepTransport`: the same behaviour as an httpx
  transport, to put under any httpx-based client. A wake-up that meets another client's wake-up (409
  ``TransitionInProgressError``) asks again, with a short backoff, for at most ``TRANSITION_WAIT_SECONDS``.
* :func:`wrap_openai`: an ``openai.OpenAI`` / ``openai.AsyncOpenAI`` client that does the same.

Importing this module never imports torch.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from .errors import GpusleepError

__all__ = [
    "AsyncClient",
    "AsyncWakeOnSleepTransport",
    "Client",
    "ControlPlaneError",
    "WakeOnSleepTransport",
    "is_model_sleeping",
    "wrap_openai",
]

log = logging.getLogger("gpusleep.client")

MODEL_SLEEPING_TYPE = "ModelSleepingError"
TRANSITION_IN_PROGRESS_TYPE = "TransitionInProgressError"
#: How long a wake-up that meets another sleep or wake-up under way keeps asking, seconds.
TRANSITION_WAIT_SECONDS = 30.0
TRANSITION_WAIT_S = TRANSITION_WAIT_SECONDS  #: the former spelling (Note [One spelling per unit] in _renamed.py)


class ControlPlaneError(RuntimeError, GpusleepError):
    """A control call (``/sleep``, ``/wake_up``, ``/is_sleeping``) was refused or failed.

    ``status_code`` is the HTTP status, ``error_type`` the server's error type (for example
    ``"InsufficientMemoryError"``), ``body`` the decoded JSON error (``{}`` when not JSON)."""

    def __init__(self, action: str, response: httpx.Response) -> None:
        body = _json_or_empty(response)
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        self.status_code = response.status_code
        self.error_type = str(error.get("type", ""))
        self.server_message = str(error.get("message", response.text[:500]))
        self.body = body
        super().__init__(f"{action} answered {response.status_code} {self.error_type}: {self.server_message}")


def is_model_sleeping(response: httpx.Response) -> bool:
    """True for the spec's answer of a sleeping model: 503 with error type ``ModelSleepingError``.
    The response body must have been read."""
    if response.status_code != 503:
        return False
    error = _json_or_empty(response).get("error")
    return isinstance(error, dict) and error.get("type") == MODEL_SLEEPING_TYPE


@dataclass(frozen=True)
class _WakePolicy:
    """Where and how to wake the model; shared by the sync and the async transport."""

    wake_url: str | None  #: absolute URL, or a path on the request's origin; None: "/wake_up"
    wake_tags: tuple | None
    control_token: str | None

    def wake_request(self, failed: httpx.Request) -> httpx.Request:
        url = self.wake_url or "/wake_up"
        if url.startswith("/"):
            target = failed.url.copy_with(path=url, query=None, fragment=None)
        else:
            target = httpx.URL(url)
        params = [("tags", t) for t in self.wake_tags] if self.wake_tags else None
        headers = {"Authorization": f"Bearer {self.control_token}"} if self.control_token else {}
        request = httpx.Request("POST", target, params=params, headers=headers)
        if "timeout" in failed.extensions:  # the caller's timeout applies to the wake-up too
            request.extensions["timeout"] = failed.extensions["timeout"]
        return request

    @staticmethod
    def check_wake(request: httpx.Request, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise ControlPlaneError(f"waking the model (POST {request.url})", response)

    @staticmethod
    def transition_in_progress(response: httpx.Response) -> bool:
        """True for the server's 409: another sleep or wake-up is under way, so this one was not started."""
        if response.status_code != 409:
            return False
        error = _json_or_empty(response).get("error")
        return isinstance(error, dict) and error.get("type") == TRANSITION_IN_PROGRESS_TYPE

    @staticmethod
    def backoff_seconds(attempt: int) -> float:
        return min(0.05 * (2**attempt), 1.0)

    @staticmethod
    def backoff_s(attempt: int) -> float:
        """The former spelling of :meth:`backoff_seconds`; deprecated."""
        warnings.warn("backoff_s() is deprecated; use backoff_seconds()", DeprecationWarning, stacklevel=2)
        return _WakePolicy.backoff_seconds(attempt)


class _WakeOnSleep:
    """The constructor shared by the sync and the async transport; each names the httpx transport it
    builds when none is given in ``_sending_transport_class``."""

    _sending_transport_class: type

    def __init__(
        self,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        *,
        wake_url: str | None = None,
        wake_tags: Sequence[str] | None = None,
        control_token: str | None = None,
    ) -> None:
        self._transport: Any = transport if transport is not None else self._sending_transport_class()
        self._policy = _WakePolicy(wake_url, tuple(wake_tags) if wake_tags else None, control_token)


class WakeOnSleepTransport(_WakeOnSleep, httpx.BaseTransport):
    """An httpx transport that, when a request gets 503 ``ModelSleepingError``, calls ``POST /wake_up``
    and sends the request once more, returning that second answer whatever it is.

    ``transport``: the transport that sends (default ``httpx.HTTPTransport()``). ``wake_url``: where to
    wake the model, absolute or a path on the request's origin (default ``"/wake_up"``).
    ``wake_tags``: tags to wake (default all). ``control_token``: bearer token of the control plane.
    A failed wake-up raises :class:`ControlPlaneError` with the server's reason.

    Thread safety: as the wrapped transport (``httpx.HTTPTransport`` is thread-safe). Request bodies
    are read into memory before sending, so that they can be sent again."""

    _sending_transport_class = httpx.HTTPTransport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response = self._transport.handle_request(request)
        if response.status_code != 503:
            return response
        response.read()
        if not is_model_sleeping(response):
            return response
        response.close()
        wake = self._policy.wake_request(request)
        log.info(
            "%s %s: model is asleep; waking it with POST %s and retrying once", request.method, request.url, wake.url
        )
        deadline = time.monotonic() + TRANSITION_WAIT_SECONDS
        for attempt in range(1_000_000):
            wake_response = self._transport.handle_request(wake)
            try:
                wake_response.read()
            finally:
                wake_response.close()
            if not (self._policy.transition_in_progress(wake_response) and time.monotonic() < deadline):
                break
            time.sleep(self._policy.backoff_seconds(attempt))  # another client's wake-up (or a sleep) runs: ask again
        self._policy.check_wake(wake, wake_response)
        return self._transport.handle_request(request)

    def close(self) -> None:
        self._transport.close()


class AsyncWakeOnSleepTransport(_WakeOnSleep, httpx.AsyncBaseTransport):
    """The asynchronous twin of :class:`WakeOnSleepTransport` (same arguments and behaviour)."""

    _sending_transport_class = httpx.AsyncHTTPTransport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self._transport.handle_async_request(request)
        if response.status_code != 503:
            return response
        await response.aread()
        if not is_model_sleeping(response):
            return response
        await response.aclose()
        wake = self._policy.wake_request(request)
        log.info(
            "%s %s: model is asleep; waking it with POST %s and retrying once", request.method, request.url, wake.url
        )
        deadline = time.monotonic() + TRANSITION_WAIT_SECONDS
        for attempt in range(1_000_000):
            wake_response = await self._transport.handle_async_request(wake)
            try:
                await wake_response.aread()
            finally:
                await wake_response.aclose()
            if not (self._policy.transition_in_progress(wake_response) and time.monotonic() < deadline):
                break
            await anyio.sleep(self._policy.backoff_seconds(attempt))
        self._policy.check_wake(wake, wake_response)
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._transport.aclose()


class _ControlCalls:
    """The constructor of the sync and async clients, and the control-plane calls they build and check.
    Each client names the httpx transport that sends (``_sending_transport_class``, built when no
    ``transport`` is given) and the transport that wakes the model around it (``_wake_transport_class``)."""

    _sending_transport_class: type
    _wake_transport_class: type

    def __init__(
        self,
        base_url: str = "",
        *,
        control_token: str | None = None,
        wake_tags: Sequence[str] | None = None,
        wake_url: str | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        **kwargs: Any,
    ) -> None:
        self._control_token = control_token
        if transport is None:
            transport = self._sending_transport_class(**_transport_options(kwargs))
        super().__init__(  # httpx.Client or httpx.AsyncClient: next in the MRO
            base_url=base_url,
            transport=self._wake_transport_class(
                transport, wake_url=wake_url, wake_tags=wake_tags, control_token=control_token
            ),
            **kwargs,
        )

    def _control_headers(self) -> dict:
        return {"Authorization": f"Bearer {self._control_token}"} if self._control_token else {}

    @staticmethod
    def _sleep_params(level: int, mode: str | None) -> dict:
        return {"level": str(level), **({"mode": mode} if mode is not None else {})}

    @staticmethod
    def _wake_params(tags: Sequence[str] | None) -> list | None:
        if isinstance(tags, str):
            tags = [tags]
        return [("tags", t) for t in tags] if tags else None

    @staticmethod
    def _checked(action: str, response: httpx.Response) -> Any:
        if response.status_code != 200:
            raise ControlPlaneError(action, response)
        return response.json()


class Client(_ControlCalls, httpx.Client):
    """An ``httpx.Client`` for a model server with sleep mode: a request refused with 503
    ``ModelSleepingError`` wakes the model (``POST /wake_up``) and is retried once.

    ``Client("http://127.0.0.1:8000").post("/v1/completions", json=...)`` works whether the model is
    awake or asleep. ``control_token`` is sent to the control endpoints only. Other keyword arguments
    go to ``httpx.Client`` (``verify``, ``cert``, ``http1``, ``http2``, ``limits`` go to the inner
    transport that sends; give ``transport`` to choose it yourself).
    Thread safety: as ``httpx.Client`` (safe to share between threads)."""

    _sending_transport_class = httpx.HTTPTransport
    _wake_transport_class = WakeOnSleepTransport

    def sleep(self, level: int = 1, mode: str | None = None) -> dict:
        """``POST /sleep?level=[&mode=wait|abort]``; returns the server's JSON answer (``level``,
        ``already_sleeping``, bytes and seconds); raises :class:`ControlPlaneError`."""
        r = self.post("/sleep", params=self._sleep_params(level, mode), headers=self._control_headers())
        return self._checked(f"POST /sleep?level={level}", r)

    def wake_up(self, tags: Sequence[str] | None = None) -> dict:
        """``POST /wake_up[?tags=...]``; returns the server's JSON answer; raises :class:`ControlPlaneError`."""
        r = self.post("/wake_up", params=self._wake_params(tags), headers=self._control_headers())
        return self._checked("POST /wake_up", r)

    def is_sleeping(self) -> bool:
        """``GET /is_sleeping``."""
        return bool(self._checked("GET /is_sleeping", self.get("/is_sleeping"))["is_sleeping"])


class AsyncClient(_ControlCalls, httpx.AsyncClient):
    """The asynchronous twin of :class:`Client` (an ``httpx.AsyncClient``; same arguments)."""

    _sending_transport_class = httpx.AsyncHTTPTransport
    _wake_transport_class = AsyncWakeOnSleepTransport

    async def sleep(self, level: int = 1, mode: str | None = None) -> dict:
        r = await self.post("/sleep", params=self._sleep_params(level, mode), headers=self._control_headers())
        return self._checked(f"POST /sleep?level={level}", r)

    async def wake_up(self, tags: Sequence[str] | None = None) -> dict:
        r = await self.post("/wake_up", params=self._wake_params(tags), headers=self._control_headers())
        return self._checked("POST /wake_up", r)

    async def is_sleeping(self) -> bool:
        return bool(self._checked("GET /is_sleeping", await self.get("/is_sleeping"))["is_sleeping"])


def wrap_openai(
    client: Any,
    *,
    control_token: str | None = None,
    wake_tags: Sequence[str] | None = None,
    wake_url: str | None = None,
) -> Any:
    """A copy of an ``openai.OpenAI`` (or ``openai.AsyncOpenAI``) client whose requests wake a sleeping
    model and retry once, like :class:`Client`.

    The wake-up goes to ``/wake_up`` on the server's origin (``base_url="http://h:8000/v1"`` wakes with
    ``POST http://h:8000/wake_up``); pass ``wake_url`` otherwise. The original client is unchanged."""
    try:
        import openai
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("wrap_openai needs the openai package: pip install openai") from exc
    if isinstance(client, openai.AsyncOpenAI):
        http_client: Any = httpx.AsyncClient(
            transport=AsyncWakeOnSleepTransport(wake_url=wake_url, wake_tags=wake_tags, control_token=control_token)
        )
    elif isinstance(client, openai.OpenAI):
        http_client = httpx.Client(
            transport=WakeOnSleepTransport(wake_url=wake_url, wake_tags=wake_tags, control_token=control_token)
        )
    else:
        raise TypeError(
            f"wrap_openai expects an openai.OpenAI or openai.AsyncOpenAI client, got {type(client).__name__}"
        )
    return client.with_options(http_client=http_client)


_TRANSPORT_OPTIONS = ("verify", "cert", "http1", "http2", "limits")


def _transport_options(client_kwargs: dict) -> dict:
    """Move the connection options out of ``client_kwargs``: httpx applies them to the transport it
    builds itself, and ignores them when it is given one."""
    options = {k: client_kwargs.pop(k) for k in _TRANSPORT_OPTIONS if k in client_kwargs}
    if "trust_env" in client_kwargs:
        options["trust_env"] = client_kwargs["trust_env"]
    return options


def _json_or_empty(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}
