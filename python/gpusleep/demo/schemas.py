"""Request bodies of the demo's OpenAI-compatible endpoints (the fields the demo uses; others are ignored)."""

from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

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
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    n: int = Field(default=1, ge=1, le=1, description="the demo returns one choice per prompt")
    stream: Literal[False] = Field(default=False, description="the demo does not stream")


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]


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
    input: Union[str, List[str]]
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
