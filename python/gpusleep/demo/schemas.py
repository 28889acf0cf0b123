"""Request bodies of the demo's OpenAI-compatible endpoints (the fields the demo uses; others are ignored).

Every value that reaches the engine is checked here, so that no input can make it fail: numbers are
finite and in range (a NaN temperature is refused with a clear 400, not fed to the sampler), seeds fit
the generator's 64 bits, and lists of prompts, inputs or messages are not empty.
"""

from __future__ import annotations

from typing import Annotated, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

#: Seeds the sampler's generator accepts: any signed or unsigned 64-bit integer.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1

NonEmptyStrings = Annotated[List[str], Field(min_length=1)]

__all__ = [
    "CompletionRequest",
    "ChatMessageIn",
    "ChatCompletionRequest",
    "EmbeddingRequest",
    "TokenizeRequest",
    "DetokenizeRequest",
]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: Optional[int] = Field(default=None, ge=SEED_MIN, le=SEED_MAX, description="a 64-bit integer")
    stop: Optional[Union[str, List[str]]] = None
    n: int = Field(default=1, ge=1, le=1, description="the demo returns one choice per prompt")
    stream: Literal[False] = Field(default=False, description="the demo does not stream")


class CompletionRequest(_Sampling):
    prompt: Union[str, NonEmptyStrings]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    input: Union[str, NonEmptyStrings]
    encoding_format: Literal["float"] = "float"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessageIn]] = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    tokens: List[int]
