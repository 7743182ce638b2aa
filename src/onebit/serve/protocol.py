"""The OpenAI request schemas `onebit serve` accepts (pydantic), and the error object it returns.

Fields as OpenAI defines them, plus llama.cpp / vLLM's ``top_k``, ``min_p``,
``repetition_penalty``. Unknown fields are ignored (clients send many); a known field with a bad
type or value is a 400 that names it."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatMessage", "ChatCompletionRequest", "CompletionRequest", "TokenizeRequest",
           "DetokenizeRequest", "error_body"]

MAX_LOGPROBS = 20


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Base):
    include_usage: bool = True


class _Sampling(_Base):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)            # 0 or -1: off (llama.cpp's convention)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=100)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: Union[str, list[Union[str, int]], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_off(cls, v):
        return None if v in (-1, 0) else v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported: send the request n times (with other seeds)")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_openai_penalties(cls, v):
        if v != 0:
            raise ValueError("is not supported: use repetition_penalty (e.g. 1.1) instead")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        if v is not None and any(isinstance(s, int) and s < 0 for s in v):
            raise ValueError("stop token ids must be >= 0")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and (len(v) == 0 or (isinstance(v[0], list) and any(len(p) == 0 for p in v))):
            raise ValueError("the prompt is empty")
        if isinstance(v, list) and len(v) > 64 and not isinstance(v[0], int):
            raise ValueError("at most 64 prompts in one request")
        return v


class TokenizeRequest(_Base):
    model: str | None = None
    prompt: str | None = None
    content: str | None = None          # llama-server's name
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[int]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
