"""A text generation call as engines see it, and the rules every text server applies.

No torch here: servers that do not run a model themselves (the cloud-provider
adapter) validate exactly as the local engine does without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.errors import InvalidArgument, OutOfRange

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[tuple[str, str]]  # (role, content)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenerationChunk:
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "stop_sequence" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class EngineLimits:
    max_tokens: int = 2048
    default_max_tokens: int = 256
    max_prompt_tokens: int = 6144
    max_stop_sequences: int = 4


def validate_request(request: GenerationRequest, limits: EngineLimits) -> None:
    """Raises InvalidArgument / OutOfRange naming the first bad field."""
    if not request.messages:
        raise InvalidArgument("messages must hold at least one message", field="messages")
    for i, (role, content) in enumerate(request.messages):
        if role not in ROLES:
            raise InvalidArgument(
                f"messages[{i}].role must be one of {', '.join(ROLES)}", field=f"messages[{i}].role"
            )
        if not content.strip():
            raise InvalidArgument(f"messages[{i}].content is empty", field=f"messages[{i}].content")
    if not 1 <= request.max_tokens <= limits.max_tokens:
        raise OutOfRange(
            f"max_tokens must be between 1 and {limits.max_tokens}, got {request.max_tokens}",
            field="max_tokens",
        )
    if not 0.0 <= request.temperature <= 2.0:
        raise OutOfRange(
            f"temperature must be in [0, 2], got {request.temperature}", field="temperature"
        )
    if not 0.0 < request.top_p <= 1.0:
        raise OutOfRange(f"top_p must be in (0, 1], got {request.top_p}", field="top_p")
    if len(request.stop) > limits.max_stop_sequences or any(not s for s in request.stop):
        raise InvalidArgument(
            f"stop takes at most {limits.max_stop_sequences} non-empty sequences", field="stop"
        )


def longest_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
