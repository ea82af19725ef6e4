"""The OpenAI-style `/v1/completions` request and response bodies."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4
# OpenAI types `seed` as int64; torch's manual_seed takes anything in [-2**63, 2**64), so the
# int64 range is what both accept.
SEED_RANGE = (-2**63, 2**63 - 1)


class CompletionRequest(BaseModel):
    """Fields outside the supported subset are rejected by name rather than ignored. Types are
    strict, as OpenAI's API has them: `"max_tokens": "4"` or `"stream": "yes"` is an error, not
    a value converted; a float field takes an integer (`"temperature": 0`), nothing else does.
    A null optional field means its default, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = 1

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, body):
        if not isinstance(body, dict):
            return body
        optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
        return {key: value for key, value in body.items()
                if value is not None or key not in optional}

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            raise ValueError("this server takes one prompt string, not a list of prompts or "
                             "of token ids")
        return prompt

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop):
        """OpenAI accepts one string or a list of them."""
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _check_stops(cls, stops: list[str]) -> list[str]:
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"this server returns one choice per request: n must be 1, got {n}")
        return n


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: FinishReason | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
