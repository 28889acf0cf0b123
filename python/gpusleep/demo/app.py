"""The demo's OpenAI-compatible FastAPI app, with the sleep-mode control plane installed.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/embeddings`` (protected:
503 while asleep), ``POST /tokenize``, ``POST /detokenize``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET``/``HEAD /health``, ``GET /version`` (work while asleep), and the control plane (``/sleep``,
``/wake_up``, ``/is_sleeping``, ``/metrics``).

What the OpenAI SDK sends by default works: ``"stream": true`` answers server-sent events (with a last
usage chunk when ``stream_options.include_usage``), embeddings come as floats or as base64 (the SDK's
default), chat content may be a list of text parts, prompts and inputs may be token ids. A field the
demo does not implement is refused with a 400 that names it (Note [Nothing is ignored silently] in
schemas.py).

The model endpoints are plain ``def`` functions: FastAPI runs them in its thread pool, and the engine
runs one request at a time (a stream runs it in a worker thread: Note [A stream never outlives its
model work] in streaming.py). ``/health``, ``/version`` and ``/v1/models`` are ``async``: they never
wait for a thread behind model work. Every error, validation errors included, has the one
``{"error": {...}}`` shape.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..errors import GpusleepError
from ..server import SleepController, SleepModeOptions, install, install_error_handlers
from ..server.responses import error_response, model_sleeping_response
from .engine import Engine, GenerationAbortedError, SamplingParams
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    UnsupportedFieldError,
    refuse_unsupported,
    split_inputs,
)
from .streaming import Emit, EventStream

__all__ = ["create_app", "DEFAULT_MAX_TOKENS"]

DEFAULT_MAX_TOKENS = 16


#: The header every answer of a server on the simulated GPU carries (``gpusleep serve --simulate-gpu``).
SIMULATED_GPU_HEADER = ("x-gpusleep-gpu", "simulated")


class ModelNotFoundError(LookupError, GpusleepError):
    pass


ModelNotFound = ModelNotFoundError  # the name before every exception ended in Error


class _LabelEveryAnswer:
    """ASGI middleware: adds ``header`` to every HTTP answer (streamed ones included; no body buffering)."""

    def __init__(self, app: Any, header: tuple) -> None:
        self.app = app
        self.header = (header[0].encode("latin-1"), header[1].encode("latin-1"))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_labelled(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_labelled)


def create_app(
    engine: Engine,
    controller: SleepController,
    options: SleepModeOptions | None = None,
    simulated_gpu: Any | None = None,
) -> FastAPI:
    """The demo server for ``engine``, its sleep mode driven by ``controller``. ``options`` also sets
    the request body cap (``max_body_bytes``, 413 past it). ``simulated_gpu`` (a
    :class:`gpusleep.simulated_gpu.SimulatedGpu`): the weights live on the simulated GPU, and every answer says
    so (header ``x-gpusleep-gpu: simulated``; ``/version`` has ``"gpu": "simulated"``)."""
    options = options if options is not None else SleepModeOptions()
    app = FastAPI(title="gpusleep demo server", version=__version__)
    created = int(time.time())
    install_error_handlers(app)

    @app.exception_handler(UnsupportedFieldError)
    async def unsupported(request: Request, exc: UnsupportedFieldError) -> JSONResponse:
        return error_response(400, "BadRequestError", f"{request.method} {request.url.path}: {exc}", param=exc.param)

    @app.exception_handler(ValueError)
    async def bad_request(request: Request, exc: ValueError) -> JSONResponse:
        return error_response(400, "BadRequestError", f"{request.method} {request.url.path}: {exc}")

    @app.exception_handler(ModelNotFoundError)
    async def model_not_found(request: Request, exc: ModelNotFoundError) -> JSONResponse:
        return error_response(404, "NotFoundError", str(exc), param="model")

    @app.exception_handler(GenerationAbortedError)
    async def aborted(request: Request, exc: GenerationAbortedError) -> JSONResponse:
        return model_sleeping_response(options.retry_after_seconds)

    def should_abort() -> bool:
        """True while a ``POST /sleep?mode=abort`` cancels the requests in flight."""
        return app.state.gpusleep_gate.aborting

    def check_model(name: str | None) -> str:
        if name is not None and name != engine.model_name:
            raise ModelNotFoundError(
                f"model {name!r} does not exist; this server serves {engine.model_name!r} (GET /v1/models)"
            )
        return engine.model_name

    def sampling(req, max_tokens: int | None) -> SamplingParams:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=stop,
        )

    def token_ids(item: str | list[int]) -> list[int]:
        return engine.validate_ids(item) if isinstance(item, list) else engine.tokenize(item)

    def include_usage(req) -> bool:
        return bool(req.stream_options is not None and req.stream_options.include_usage)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> Any:
        model = check_model(req.model)
        refuse_unsupported(req)
        prompts = [token_ids(p) for p in split_inputs(req.prompt)]
        params = sampling(req, req.max_tokens)
        completion_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            for ids in prompts:
                engine.check_prompt(ids)  # refused with a 400 before the stream starts
            with_usage = include_usage(req)

            def chunk(index: int, text: str, finish: str | None = None) -> dict:
                return {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": now,
                    "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
                    **({"usage": None} if with_usage else {}),
                }

            def produce(emit: Emit, client_gone: Callable[[], bool]) -> None:
                prompt_tokens = completion_tokens = 0
                for index, ids in enumerate(prompts):
                    gen = engine.generate(
                        ids,
                        params,
                        lambda: client_gone() or should_abort(),
                        on_text=lambda text, i=index: emit(chunk(i, text)),
                    )
                    emit(chunk(index, "", gen.finish_reason))
                    prompt_tokens += gen.prompt_tokens
                    completion_tokens += len(gen.token_ids)
                if with_usage:
                    emit(
                        {
                            "id": completion_id,
                            "object": "text_completion",
                            "created": now,
                            "model": model,
                            "choices": [],
                            "usage": _usage(prompt_tokens, completion_tokens),
                        }
                    )

            return EventStream(produce, "POST /v1/completions")
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, ids in enumerate(prompts):
            gen = engine.generate(ids, params, should_abort)
            choices.append({"index": index, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": None})
            prompt_tokens += gen.prompt_tokens
            completion_tokens += len(gen.token_ids)
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": now,
            "model": model,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest) -> Any:
        model = check_model(req.model)
        refuse_unsupported(req)
        ids = engine.tokenize(engine.chat_prompt([(m.role, m.text()) for m in req.messages]))
        params = sampling(req, req.max_completion_tokens or req.max_tokens)
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            engine.check_prompt(ids)  # refused with a 400 before the stream starts
            with_usage = include_usage(req)

            def chunk(delta: dict, finish: str | None = None) -> dict:
                return {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": now,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    **({"usage": None} if with_usage else {}),
                }

            def produce(emit: Emit, client_gone: Callable[[], bool]) -> None:
                emit(chunk({"role": "assistant", "content": ""}))
                gen = engine.generate(
                    ids,
                    params,
                    lambda: client_gone() or should_abort(),
                    on_text=lambda text: emit(chunk({"content": text})),
                )
                emit(chunk({}, gen.finish_reason))
                if with_usage:
                    emit(
                        {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": now,
                            "model": model,
                            "choices": [],
                            "usage": _usage(gen.prompt_tokens, len(gen.token_ids)),
                        }
                    )

            return EventStream(produce, "POST /v1/chat/completions")
        gen = engine.generate(ids, params, should_abort)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": now,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(gen.prompt_tokens, len(gen.token_ids)),
        }

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest) -> dict:
        model = check_model(req.model)
        refuse_unsupported(req)
        data, tokens = [], 0
        for index, item in enumerate(split_inputs(req.input)):
            ids = token_ids(item)
            vector = engine.embed(ids)
            if req.dimensions is not None and req.dimensions != len(vector):
                raise UnsupportedFieldError(
                    "dimensions",
                    f"'dimensions' {req.dimensions} is not supported: this model's embeddings have "
                    f"{len(vector)} dimensions and the demo does not shorten them. Leave it out.",
                )
            embedding: list[float] | str = _base64(vector) if req.encoding_format == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
            tokens += len(ids)
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> dict:
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (a chat)")
        text = req.prompt if req.prompt is not None else engine.chat_prompt([(m.role, m.text()) for m in req.messages])
        tokens: list[int] = engine.tokenize(text)
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    def detokenize(req: DetokenizeRequest) -> dict:
        check_model(req.model)
        return {"prompt": engine.detokenize(req.tokens)}

    def model_card() -> dict:
        return {
            "id": engine.model_name,
            "object": "model",
            "created": created,
            "owned_by": "gpusleep",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        if simulated_gpu is not None:
            from .simulated import describe

            return {"version": __version__, **describe(simulated_gpu)}
        return {"version": __version__}

    install(app, controller, options)
    if simulated_gpu is not None:  # added last: the outermost layer, so the control plane's answers carry it too
        app.add_middleware(_LabelEveryAnswer, header=SIMULATED_GPU_HEADER)
    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _base64(vector: Sequence[float]) -> str:
    """An embedding as OpenAI's ``encoding_format="base64"`` gives it: little-endian float32, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
