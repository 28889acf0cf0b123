"""The demo's OpenAI-compatible FastAPI app, with the sleep-mode control plane installed.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/embeddings`` (protected:
503 while asleep), ``POST /tokenize``, ``POST /detokenize``, ``GET /v1/models``, ``GET /health`` (work
while asleep), and the control plane (``/sleep``, ``/wake_up``, ``/is_sleeping``, ``/metrics``).
The model endpoints are plain ``def`` functions: FastAPI runs them in its thread pool, and the engine
runs one request at a time. ``/health`` and ``/v1/models`` are ``async``: they never wait for a thread
behind model work. Every error, validation errors included, has the one ``{"error": {...}}`` shape.
"""

from __future__ import annotations

import time
import uuid
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..server import SleepController, SleepModeOptions, install, install_error_handlers
from ..server.responses import error_response, model_sleeping_response
from .engine import Engine, GenerationAborted, SamplingParams
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)

__all__ = ["create_app", "DEFAULT_MAX_TOKENS"]

DEFAULT_MAX_TOKENS = 16


class ModelNotFound(LookupError):
    pass


def create_app(engine: Engine, controller: SleepController, options: Optional[SleepModeOptions] = None) -> FastAPI:
    """The demo server for ``engine``, its sleep mode driven by ``controller``. ``options`` also sets
    the request body cap (``max_body_bytes``, 413 past it)."""
    options = options if options is not None else SleepModeOptions()
    app = FastAPI(title="gpusleep demo server", version="0.1.0")
    created = int(time.time())
    install_error_handlers(app)

    @app.exception_handler(ValueError)
    async def bad_request(request: Request, exc: ValueError) -> JSONResponse:
        return error_response(400, "BadRequestError", f"{request.method} {request.url.path}: {exc}")

    @app.exception_handler(ModelNotFound)
    async def model_not_found(request: Request, exc: ModelNotFound) -> JSONResponse:
        return error_response(404, "NotFoundError", str(exc), param="model")

    @app.exception_handler(GenerationAborted)
    async def aborted(request: Request, exc: GenerationAborted) -> JSONResponse:
        return model_sleeping_response(options.retry_after_s)

    def should_abort() -> bool:
        """True while a ``POST /sleep?mode=abort`` cancels the requests in flight."""
        return app.state.gpusleep_gate.aborting

    def check_model(name: Optional[str]) -> str:
        if name is not None and name != engine.model_name:
            raise ModelNotFound(f"model {name!r} does not exist; this server serves {engine.model_name!r} (GET /v1/models)")
        return engine.model_name

    def sampling(req, max_tokens: Optional[int]) -> SamplingParams:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=stop,
        )

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict:
        model = check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        params = sampling(req, req.max_tokens)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(prompts):
            gen = engine.generate(engine.tokenize(prompt), params, should_abort)
            choices.append({"index": index, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": None})
            prompt_tokens += gen.prompt_tokens
            completion_tokens += len(gen.token_ids)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest) -> dict:
        model = check_model(req.model)
        prompt = engine.chat_prompt([(m.role, m.content) for m in req.messages])
        gen = engine.generate(
            engine.tokenize(prompt), sampling(req, req.max_completion_tokens or req.max_tokens), should_abort
        )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
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
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        data, tokens = [], 0
        for index, text in enumerate(inputs):
            ids = engine.tokenize(text)
            data.append({"object": "embedding", "index": index, "embedding": engine.embed(ids)})
            tokens += len(ids)
        return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> dict:
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (a chat)")
        text = req.prompt if req.prompt is not None else engine.chat_prompt([(m.role, m.content) for m in req.messages])
        tokens: List[int] = engine.tokenize(text)
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    def detokenize(req: DetokenizeRequest) -> dict:
        check_model(req.model)
        return {"prompt": engine.detokenize(req.tokens)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "gpusleep",
                    "max_model_len": engine.max_model_len,
                }
            ],
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    install(app, controller, options)
    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }

