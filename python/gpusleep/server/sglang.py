"""The SGLang dialect of the control plane: ``/release_memory_occupation`` and ``/resume_memory_occupation``.

RL frameworks (verl, slime, AReaL) drive SGLang servers with these two endpoints between rollout and
training, so a server that serves them on gpusleep is driven by those frameworks unchanged.

Note [The SGLang dialect]
    Shape. ``GET`` or ``POST``, JSON body ``{"tags": ["weights", "kv_cache", "cuda_graph"]}``; ``"tags"``
    missing or ``null`` means every tag (on resume: every tag asleep, which is every tag that was
    released). An empty or missing body is ``{}``. Keys other than ``tags`` (``reset_connector``, ...)
    are ignored, as SGLang ignores the fields its request type does not use. The answer is a JSON
    object ``{"success": bool, "message": str, ...}`` (slime calls ``.json()`` on it): 200 with
    ``success: true``, or the status of the equivalent vLLM-dialect failure with ``success: false``,
    the message, and the usual ``{"error": {...}}`` object beside them.

    Same gate. A release is :meth:`SleepGate.sleep` at level 1 and a resume is
    :meth:`SleepGate.wake_up`, so the drain, the 503 ``ModelSleepingError`` of the protected endpoints
    while anything is released, the one-transition-at-a-time rule, the bearer token and the error
    mapping are those of ``POST /sleep`` and ``POST /wake_up``.

    Tags. A release of named tags calls ``controller.sleep(1, tags=...)``; a controller whose ``sleep``
    takes no ``tags=`` can only release everything (400 otherwise). Tag names the controller does not
    hold (``known_tags``; SGLang's ``cuda_graph`` on a server whose graphs are not sleepable, say) are
    ignored and named in the message: an RL framework sends SGLang's full list whatever the server.

    Difference from SGLang, on purpose. Level 1 applies the tags' policies: ``weights`` (gpusleep's
    default ``"offload"`` policy) is copied to host memory and restored bit-exact on resume, where
    SGLang discards it unless started with ``--enable-weights-cpu-backup``. A framework that then
    writes new weights in place is unaffected; one that forgets to gets the old weights back rather
    than garbage. Set the tag's policy to ``"discard"`` to save the host copy.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .gate import SleepGate, known_tags
from .responses import controller_error_response, error_response
from .routes import token_refusal

__all__ = ["RELEASE_LEVEL", "SGLANG_TAGS", "sglang_routes"]

#: The tags SGLang's ``--enable-memory-saver`` regions use.
SGLANG_TAGS = ("weights", "kv_cache", "cuda_graph")
#: The gpusleep sleep level of a release: each tag's policy decides (Note [The SGLang dialect]).
RELEASE_LEVEL = 1


def sglang_routes(gate: SleepGate, *, control_token: str | None) -> list[Route]:
    """``GET``/``POST /release_memory_occupation`` and ``/resume_memory_occupation`` for ``gate``."""

    async def release(request: Request) -> Response:
        return await _transition(request, gate, control_token, "release")

    async def resume(request: Request) -> Response:
        return await _transition(request, gate, control_token, "resume")

    # One route per method, so that each has its own OpenAPI operation id.
    return [
        Route(path, endpoint, methods=[method], name=f"{name}_{method.lower()}")
        for path, endpoint, name in (
            ("/release_memory_occupation", release, "gpusleep_sglang_release"),
            ("/resume_memory_occupation", resume, "gpusleep_sglang_resume"),
        )
        for method in ("POST", "GET")
    ]


async def _transition(request: Request, gate: SleepGate, control_token: str | None, kind: str) -> Response:
    action = f"{request.method} {request.url.path}"
    denied = token_refusal(request, control_token)
    if denied is not None:
        return _failure(denied)
    tags, problem = await _read_tags(request, action)
    if problem is not None:
        return _failure(problem)
    ignored: tuple[str, ...] = ()
    if tags is not None:
        known = await gate.run_control(known_tags, gate.controller)
        if known is not None:
            ignored = tuple(t for t in tags if t not in known)
            tags = tuple(t for t in tags if t in known)
        if not tags:
            return JSONResponse(
                {
                    "success": True,
                    "message": f"{action}: nothing to do: this server holds none of the tags {list(ignored)}",
                    "is_sleeping": gate.is_sleeping,
                    "tags": [],
                    "ignored_tags": list(ignored),
                }
            )
    try:
        if kind == "release":
            slept = await gate.sleep(RELEASE_LEVEL, "wait", tags=tags)
            done, moved, is_sleeping = slept.tags, slept.bytes_freed, slept.is_sleeping
            verb = "released"
        else:
            woken = await gate.wake_up(tags)
            done, moved, is_sleeping = woken.tags_woken, woken.bytes_mapped, woken.is_sleeping
            verb = "resumed"
    except Exception as exc:
        return _failure(controller_error_response(exc, action))
    what = "every tag" if tags is None else f"tags {list(tags)}"
    message = f"{action}: {verb} {what}: {list(done)} ({moved} bytes)"
    if ignored:
        message += f"; ignored tags this server does not hold: {list(ignored)}"
    return JSONResponse(
        {
            "success": True,
            "message": message,
            "is_sleeping": is_sleeping,
            "tags": list(done),
            "ignored_tags": list(ignored),
        }
    )


async def _read_tags(request: Request, action: str) -> tuple[tuple[str, ...] | None, Response | None]:
    """The body's ``tags`` (``None``: every tag), or the 400 that says what is wrong with the body."""
    raw = await request.body()
    body: Any = {}
    if raw.strip():
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return None, error_response(400, "BadRequestError", f"{action}: the body is not JSON ({exc})")
    if not isinstance(body, dict):
        return None, error_response(
            400,
            "BadRequestError",
            f'{action}: the body must be a JSON object like {{"tags": ["kv_cache"]}}, got {type(body).__name__}',
            param="tags",
        )
    tags = body.get("tags")
    if tags is None:
        return None, None
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        return None, error_response(
            400,
            "BadRequestError",
            f"{action}: tags must be null (every tag) or a list of tag names such as {list(SGLANG_TAGS)}, got {tags!r}",
            param="tags",
        )
    return tuple(dict.fromkeys(t.strip() for t in tags)), None


def _failure(response: Response) -> Response:
    """An error answer of the control plane in the SGLang shape: same status and headers, and
    ``success: false`` with the message beside the ``error`` object."""
    assert isinstance(response, JSONResponse)
    error = json.loads(bytes(response.body))["error"]
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(
        {"success": False, "message": error["message"], "error": error},
        status_code=response.status_code,
        headers=headers,
    )
