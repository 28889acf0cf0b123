"""Request bodies of the demo's OpenAI-compatible endpoints, and the check that refuses what the demo does not do.

Every value that reaches the engine is checked here, so that no input can make it fail: numbers are
finite and in range (a NaN temperature is refused with a clear 400, not fed to the sampler), seeds fit
the generator's 64 bits, and lists of prompts, inputs or messages are not empty.

Note [Nothing is ignored silently]
    The bodies accept the fields of the OpenAI API that the demo implements (sampling, ``stop``, ``seed``,
    ``stream`` with ``stream_options.include_usage``, text and token-id prompts, text content parts,
    ``encoding_format`` ``"float"``/``"base64"``). Any other field is kept (``extra="allow"``) only so that
    :func:`refuse_unsupported` can name it: a field the demo does not implement is refused with a 400 that
    says so, unless its value is the one that asks for nothing (``"logprobs": false``,
    ``"presence_penalty": 0``, ``"tools": []``, what some clients send by default). ``user`` (who asked) is
    accepted: it never changes an answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import GpusleepError

#: Seeds the sampler's generator accepts: any signed or unsigned 64-bit integer.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1

NonEmptyStrings = Annotated[list[str], Field(min_length=1)]
TokenIds = Annotated[list[int], Field(min_length=1)]
NonEmptyTokenIdLists = Annotated[list[TokenIds], Field(min_length=1)]
#: A prompt or an embedding input, as OpenAI takes them: text, texts, token ids, or lists of token ids.
TextOrTokens = Union[str, NonEmptyStrings, TokenIds, NonEmptyTokenIdLists]  # noqa: UP007 - a runtime alias, kept a typing.Union

__all__ = [
    "CompletionRequest",
    "ChatMessageIn",
    "ChatCompletionRequest",
    "ContentPart",
    "EmbeddingRequest",
    "StreamOptions",
    "TokenizeRequest",
    "DetokenizeRequest",
    "UnsupportedFieldError",
    "refuse_unsupported",
    "split_inputs",
]

#: Fields the demo does not implement, with the values that ask for nothing (accepted), and what to do instead.
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "logprobs": ((None, False, 0), "the demo returns no log probabilities"),
    "top_logprobs": ((None, 0), "the demo returns no log probabilities"),
    "echo": ((None, False), "the demo does not echo the prompt"),
    "best_of": ((None, 1), "the demo returns one choice per prompt"),
    "suffix": ((None, ""), "the demo does not insert text"),
    "logit_bias": ((None, {}), "the demo does not bias tokens"),
    "presence_penalty": ((None, 0), "the demo applies no penalties"),
    "frequency_penalty": ((None, 0), "the demo applies no penalties"),
    "tools": ((None, []), "the demo calls no tools"),
    "tool_choice": ((None, "none"), "the demo calls no tools"),
    "parallel_tool_calls": ((None,), "the demo calls no tools"),
    "functions": ((None, []), "the demo calls no functions"),
    "function_call": ((None, "none"), "the demo calls no functions"),
    "response_format": ((None, {"type": "text"}), "the demo answers plain text only"),
    "modalities": ((None, ["text"]), "the demo answers text only"),
    "audio": ((None,), "the demo answers text only"),
    "reasoning_effort": ((None,), "the demo model does not reason"),
    "prediction": ((None,), "the demo takes no predicted output"),
    "web_search_options": ((None,), "the demo does not search"),
    "store": ((None, False), "the demo stores nothing"),
    "metadata": ((None, {}), "the demo stores nothing"),
    "service_tier": ((None, "auto", "default"), "the demo has one tier"),
}
#: Fields accepted and not used because they never change an answer.
ACCEPTED_UNUSED = frozenset({"user"})


class UnsupportedFieldError(ValueError, GpusleepError):
    """A request field (``param``) that the demo does not implement (Note [Nothing is ignored silently])."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # Note [Nothing is ignored silently]: refuse_unsupported names them


class StreamOptions(_Body):
    include_usage: bool = Field(default=False, description="a last chunk with the usage and no choices")


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX, description="a 64-bit integer")
    stop: str | list[str] | None = None
    n: int | None = Field(default=1, ge=1, le=1, description="the demo returns one choice per prompt")
    stream: bool | None = Field(default=False, description="answer with server-sent events (SSE)")
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: TextOrTokens


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessageIn(_Body):
    role: str
    content: str | list[ContentPart]
    name: str | None = None  #: accepted, not used: it never changes the demo's answer

    def text(self) -> str:
        """The message's text: the content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class EmbeddingRequest(_Body):
    model: str | None = None
    input: TextOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="must be the model's own dimension")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def split_inputs(value: TextOrTokens) -> list[str | list[int]]:
    """A prompt or embedding input as a list of items, each a text or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [list(value)]  # one prompt given as token ids
    return list(value)


def refuse_unsupported(req: BaseModel, where: str = "") -> None:
    """Raise :class:`UnsupportedFieldError` for the first field of ``req`` (and of its messages and content
    parts) that the demo does not implement (Note [Nothing is ignored silently])."""
    for name, value in (req.model_extra or {}).items():
        path = f"{where}{name}"
        if name in ACCEPTED_UNUSED:
            continue
        if name in NOT_IMPLEMENTED:
            off, why = NOT_IMPLEMENTED[name]
            if any(_same(value, o) for o in off):
                continue
            raise UnsupportedFieldError(
                path,
                f"'{path}' is not supported: {why}. Leave it out (or send "
                f"{_shown(off)}); the demo never ignores a request field silently.",
            )
        raise UnsupportedFieldError(
            path,
            f"unknown field '{path}': the demo server does not implement it, and never "
            "ignores a request field silently. Leave it out.",
        )
    if isinstance(req, _Sampling):
        if req.stream_options is not None:
            if not req.stream:
                raise UnsupportedFieldError("stream_options", "'stream_options' is only allowed with \"stream\": true")
            refuse_unsupported(req.stream_options, "stream_options.")
    if isinstance(req, ChatCompletionRequest):
        for i, message in enumerate(req.messages):
            refuse_unsupported(message, f"messages.{i}.")
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    at = f"messages.{i}.content.{j}"
                    if part.type != "text" or part.text is None:
                        raise UnsupportedFieldError(
                            f"{at}.type",
                            f"'{at}' is a content part of type {part.type!r}: the demo model reads "
                            'text only; send {"type": "text", "text": ...} parts or a string.',
                        )
                    refuse_unsupported(part, f"{at}.")


def _same(value: Any, off: Any) -> bool:
    """``value`` is the value ``off`` (numbers compare as numbers; a bool is only itself)."""
    if off is None or isinstance(off, bool) or isinstance(value, bool):
        return value is off
    if isinstance(off, (int, float)) and isinstance(value, (int, float)):
        return value == off
    return type(value) is type(off) and value == off


def _shown(values: tuple[Any, ...]) -> str:
    import json

    return " or ".join(json.dumps(v) for v in values)
