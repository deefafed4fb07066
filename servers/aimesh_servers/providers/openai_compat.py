"""Text generation by an OpenAI-compatible HTTP API (OpenAI, Groq, Ollama, HF router,
vLLM, `transformers serve`), with no gRPC in sight.

`OpenAICompatEngine.stream` posts to `{base_url}/chat/completions` with `stream: true`
and yields the answer as it arrives over Server-Sent Events, in the same chunks the
local TextEngine yields. Closing the generator (the gRPC call was cancelled or its
deadline passed) closes the HTTP response, so the provider sees the connection go.

Provider answers are mapped to our errors: 400/422 -> INVALID_ARGUMENT, 401/403 ->
UNAVAILABLE (the adapter's key was refused: our configuration, not the caller's fault),
404 -> NOT_FOUND, 429 -> RESOURCE_EXHAUSTED with the provider's Retry-After, 5xx,
refused connections and timeouts -> UNAVAILABLE, so the mesh can fall back to the next
pool. The API key is sent only in the Authorization header: it is never logged and is
scrubbed from provider messages we pass on.

Token usage is the provider's own count (`stream_options.include_usage`); a provider
that sends none gets 0 reported, never an estimate, and one warning in the log.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx
from aimesh.common.v1 import common_pb2
from google.rpc import code_pb2
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..runtime.errors import AimeshError, ServerBusy, UpstreamFailure
from ..text.request import (
    EngineLimits,
    GenerationChunk,
    GenerationRequest,
    longest_stop_prefix,
    validate_request,
)

log = logging.getLogger(__name__)


class OpenAISettings(BaseSettings):
    """Where the provider is and how to talk to it (env AIMESH_OPENAI_*)."""

    model_config = SettingsConfigDict(env_prefix="AIMESH_OPENAI_", extra="ignore")

    base_url: str = Field(
        "https://api.openai.com/v1", description="API root; /chat/completions is appended"
    )
    api_key: SecretStr | None = Field(None, description="sent as a Bearer token; never logged")
    api_key_env: str | None = Field(
        None, description="else read the key from this variable, so that two provider pools "
        "(e.g. GROQ_API_KEY, OPENAI_API_KEY) never put their keys in the registry file",
    )
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(
        60.0, gt=0, description="longest silence between two pieces of an answer"
    )
    max_connections: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _key_from_named_variable(self) -> OpenAISettings:
        if self.api_key is None and self.api_key_env:
            if not (value := os.environ.get(self.api_key_env)):
                raise ValueError(f"AIMESH_OPENAI_API_KEY_ENV: {self.api_key_env} is not set")
            self.api_key = SecretStr(value)
        return self


class UpstreamRejected(AimeshError):
    """The provider refused the request itself (HTTP 400/422...)."""

    code_variant = code_pb2.INVALID_ARGUMENT
    reason = common_pb2.ERROR_REASON_UPSTREAM_FAILURE


class UpstreamModelNotFound(AimeshError):
    code_variant = code_pb2.NOT_FOUND
    reason = common_pb2.ERROR_REASON_UPSTREAM_FAILURE


class StreamInterrupted(AimeshError):
    """The provider's stream broke after part of the answer was sent on."""

    reason = common_pb2.ERROR_REASON_STREAM_INTERRUPTED


class OpenAICompatEngine:
    def __init__(self, settings: OpenAISettings, limits: EngineLimits | None = None) -> None:
        self.settings = settings
        self.limits = limits or EngineLimits()
        self.base_url = settings.base_url.rstrip("/")
        self._client: httpx.AsyncClient | None = None
        self._warned_no_usage = False

    def load(self) -> None:
        """Checks the configuration; the provider itself is only called per request, so a
        provider that is down makes calls UNAVAILABLE instead of keeping the server down."""
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"AIMESH_OPENAI_BASE_URL is not an http(s) URL: {self.base_url!r}")
        if self.settings.api_key is None:
            log.warning("AIMESH_OPENAI_API_KEY is not set: calling %s without a key", self.base_url)

    def validate(self, request: GenerationRequest) -> None:
        validate_request(request, self.limits)

    def client(self) -> httpx.AsyncClient:
        # Made on first use, on the event loop that serves the calls.
        if self._client is None:
            key = self.settings.api_key
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers={"Authorization": f"Bearer {key.get_secret_value()}"} if key else {},
                timeout=httpx.Timeout(
                    self.settings.read_timeout_s, connect=self.settings.connect_timeout_s
                ),
                limits=httpx.Limits(max_connections=self.settings.max_connections),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def body(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": role, "content": content} for role, content in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    async def stream(
        self, request: GenerationRequest, model: str
    ) -> AsyncIterator[GenerationChunk]:
        """Yields text as it arrives; the last chunk has finish_reason and the provider's counts."""
        self.validate(request)
        answer = _Answer(request.stop)
        try:
            async with self.client().stream(
                "POST", "/chat/completions", json=self.body(request, model)
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._status_error(response, model)
                async with aclosing(_sse_events(response)) as events:
                    async for event in events:
                        if "error" in event:
                            said = self._scrub(str(event["error"]))[:300]
                            raise self._broken(f"the provider sent an error: {said}", answer)
                        if piece := answer.take(event):
                            yield GenerationChunk(piece)
                        if answer.abandoned:
                            break  # closing the response stops the provider's generation
        except httpx.HTTPError as exc:
            log.warning("provider %s: %s", self.base_url, _describe(exc))
            raise self._broken(_describe(exc), answer) from exc
        finish = answer.finish_reason()
        if finish is None:
            raise self._broken("the provider's stream ended without a finish_reason", answer)
        if tail := answer.flush():
            yield GenerationChunk(tail)
        usage = answer.usage or {}
        if not usage and not self._warned_no_usage:
            self._warned_no_usage = True
            log.warning("%s sends no token usage (no stream_options.include_usage support?): "
                        "usage is reported as 0", self.base_url)
        yield GenerationChunk(
            "", finish,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    def _scrub(self, text: str) -> str:
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        return text.replace(key, "***") if key else text

    def _status_error(self, response: httpx.Response, model: str) -> AimeshError:
        status = response.status_code
        detail = self._scrub(_provider_message(response))
        # Where the provider is stays in our log: callers learn its answer, not its address.
        log.info("provider %s answered HTTP %s", self.base_url, status)
        meta = {"upstream_status": str(status)}
        said = f"(HTTP {status}: {detail})"
        if status == 429:
            return ServerBusy(f"the provider is rate limiting this adapter {said}", metadata=meta,
                              retry_after_s=_retry_after_s(response.headers))
        if status in (401, 403):
            return UpstreamFailure(
                f"the provider rejected this adapter's API key {said}; the adapter's "
                "AIMESH_OPENAI_API_KEY needs fixing, the request itself is fine", metadata=meta)
        if status == 404:
            return UpstreamModelNotFound(
                f"the provider has no model {model!r} {said}",
                metadata={**meta, "upstream_model": model})
        if 400 <= status < 500 and status != 408:
            return UpstreamRejected(f"the provider rejected the request {said}", metadata=meta)
        return UpstreamFailure(f"the provider failed {said}", metadata=meta)

    def _broken(self, what: str, answer: _Answer) -> AimeshError:
        if answer.sent:
            return StreamInterrupted(f"{what}; the answer was cut after it started")
        return UpstreamFailure(what)


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"the provider did not answer in time ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot reach the provider: {exc}"
    return f"the connection to the provider failed: {exc}"


class _Answer:
    """Assembles one streamed answer: text deltas, stop sequences, finish reason, usage.

    Stop sequences are sent to the provider and also enforced here, because providers
    differ: some cut before the stop sequence, others (transformers serve) include it.
    Text that could still grow into a stop sequence is held back until it cannot.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0  # characters of `text` handed on
        self.stopped = False  # a stop sequence appeared
        self.abandoned = False  # ...and the provider went on anyway: stop reading
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None

    def take(self, event: dict[str, Any]) -> str:
        """Reads one chat.completion.chunk; returns the text that can be handed on."""
        self.usage = event.get("usage") or self.usage
        piece = ""
        for choice in event.get("choices") or ():
            delta = (choice.get("delta") or {}).get("content") or ""
            if delta and self.stopped:
                self.abandoned = True
                break
            self.finish = choice.get("finish_reason") or self.finish
            if delta:
                piece += self._add(delta)
        return piece

    def _add(self, delta: str) -> str:
        self.text += delta
        hit = min((i for s in self.stops
                   if (i := self.text.find(s, max(0, self.sent - len(s)))) >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            self.text = self.text[:hit]
            safe = hit
        else:
            safe = len(self.text) - longest_stop_prefix(self.text, self.stops)
        piece = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return piece

    def finish_reason(self) -> str | None:
        if self.stopped:
            return "stop_sequence"
        if self.finish is None:
            return None
        # OpenAI's other reasons (content_filter, tool_calls) also end the answer.
        return "length" if self.finish == "length" else "stop"

    def flush(self) -> str:
        tail = self.text[self.sent:]
        self.sent = len(self.text)
        return tail


async def _sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a Server-Sent Events body (`data:` lines; `[DONE]` skipped)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
            continue
        if line or not data:  # comments (keep-alives), other fields, blank lines between events
            continue
        payload = "\n".join(data)
        data = []
        if payload.strip() == "[DONE]":
            continue  # read on to the end of the body, so the connection can be reused
        try:
            yield json.loads(payload)
        except json.JSONDecodeError as exc:
            raise httpx.DecodingError(f"an event is not JSON: {payload[:200]!r}") from exc


def _provider_message(response: httpx.Response) -> str:
    """The provider's own explanation: OpenAI's error.message, FastAPI's detail, or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        for key in ("error", "detail", "message"):
            if body.get(key):
                return str(body[key])[:300]
    return str(body)[:300]


def _retry_after_s(headers: httpx.Headers) -> float | None:
    """Retry-After (seconds or an HTTP date), or OpenAI's retry-after-ms; None if absent."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
