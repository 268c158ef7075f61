"""The OpenAI chat-completions subset the server speaks: strict request models, response builders.

Requests are validated strictly: wrong JSON types are not coerced ("1" is not a number), unknown
fields are refused (a typo must not silently change nothing), and parameters OpenAI defines but
llavakit does not implement (tools, penalties, logit_bias, audio) are refused when set rather
than ignored. vLLM's sampling extensions `top_k`, `repetition_penalty` and `ignore_eos` are
accepted, and so are its `continue_final_message` and `add_generation_prompt` (an assistant
prefill: the answer continues the last message). Videos come as
`{"type": "video_url", "video_url": {"url": ..., "num_frames"?, "fps"?}}`.

Responses are plain dicts built here, in the shape the `openai` client parses.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BadRequest


MIN_TEMPERATURE = 0.01


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=False)


# ───────────────────────────── content parts ─────────────────────────────


class TextPart(_Strict):
    """A text part."""

    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    """Where an image comes from: a data:, http(s):// or file:// URL."""

    url: str = Field(min_length=1)
    # low: one tile (fewest tokens); high: any-res always; auto/None: --default-image-detail's choice
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    """An image part."""

    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    """Where a video comes from, and how many of its frames to sample."""

    url: str = Field(min_length=1)
    num_frames: int | None = Field(None, ge=1)  # frames sampled evenly; default: the server's
    fps: float | None = Field(None, gt=0)  # or frames per second of video

    @model_validator(mode="after")
    def _one_sampling(self):
        if self.num_frames is not None and self.fps is not None:
            raise ValueError("give num_frames or fps, not both")
        return self


class VideoPart(_Strict):
    """A video part (video checkpoints only)."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


# ───────────────────────────── messages ─────────────────────────────


class SystemMessage(_Strict):
    """Instructions for the model."""

    role: Literal["system", "developer"]  # OpenAI's newer name for the system role
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    """A user turn: text, images, videos."""

    role: Literal["user"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)]
    name: str | None = None


class AssistantMessage(_Strict):
    """An earlier answer of the model."""

    role: Literal["assistant"]
    content: str | list[TextPart]
    name: str | None = None


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage], Field(discriminator="role")]


# ───────────────────────────── the request ─────────────────────────────


class JSONSchemaFormat(_Strict):
    """A named JSON schema the answer must follow."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """Free text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and allowed only there")
        return self


class StreamOptions(_Strict):
    """What a stream carries besides the text."""

    include_usage: bool | None = None


class ChatCompletionRequest(_Strict):
    """POST /v1/chat/completions."""

    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Near 0 (say 1e-40) a temperature or penalty divides the logits into infinities: 0 is greedy,
    # below MIN_TEMPERATURE is refused instead.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM extension; -1 or 0 turn it off
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)  # vLLM extension
    ignore_eos: bool | None = None  # vLLM extension (benchmarks)
    # vLLM extensions: continue the last message (an assistant prefill) instead of opening a new turn.
    # add_generation_prompt None: on unless continue_final_message is.
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # Defined by OpenAI; only their neutral values are accepted.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Accepted and ignored: they do not change the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Defined by OpenAI, not implemented: refused when set.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is allowed only with stream=true")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; give one of them")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: continuing the "
                             "last message leaves no room for a new turn; set add_generation_prompt to false")
        return self


UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "modalities",
               "prediction", "reasoning_effort", "web_search_options")


def check_supported(req: ChatCompletionRequest) -> None:
    """Refuse OpenAI parameters that llavakit does not implement, naming the parameter."""
    for name in UNSUPPORTED:
        if getattr(req, name) is not None:
            raise BadRequest(f"{name} is not supported by this server; remove it from the request.",
                             param=name, code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported (only 0); use repetition_penalty instead.",
                             param=name, code="unsupported_parameter")
    if req.logit_bias:
        raise BadRequest("logit_bias is not supported by this server.", param="logit_bias",
                         code="unsupported_parameter")
    if req.store:
        raise BadRequest("store=true is not supported: this server keeps no completions.", param="store",
                         code="unsupported_parameter")


def _param(loc: tuple, data: Any) -> str | None:
    """Dotted path of a pydantic error location, keeping only steps that exist in the raw JSON.

    Pydantic puts union-member and tag names into locations (`content.list[...].0.image_url`);
    walking the client's own data drops them, leaving what the client wrote.
    """
    out = ""
    for step in loc:
        if isinstance(data, dict) and isinstance(step, str) and step in data:
            out += ("." if out else "") + step
            data = data[step]
        elif isinstance(data, list) and isinstance(step, int) and 0 <= step < len(data):
            out += f"[{step}]"
            data = data[step]
    return out or None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any, loc: tuple = ()) -> tuple | None:
    """The location of the first string (or key) holding an unpaired UTF-16 surrogate (JSON allows
    "\\ud800"; UTF-8 does not), as a key path for `_param`; None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return loc
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key) is not None:
            return loc
        found = _lone_surrogate(item, loc + (key,))
        if found is not None:
            return found
    return None


def _text_chars(messages: list) -> int:
    """Characters of text in raw (unvalidated) messages: content strings and text parts."""
    total = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"])
    return total


def check_size(data: dict, max_messages: int, max_text_chars: int) -> None:
    """The cheap limits, on the raw JSON before the request model is built: validating 450,000
    messages alone would hold the interpreter for seconds, tokenizing megabytes for longer."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        return  # validation names the problem
    if len(messages) > max_messages:
        raise BadRequest(f"the request holds {len(messages)} messages; this server accepts at most {max_messages} "
                         "(--max-messages).", param="messages", code="too_many_messages")
    chars = _text_chars(messages)
    if chars > max_text_chars:
        raise BadRequest(f"the messages hold {chars} characters of text; this server reads at most "
                         f"{max_text_chars} (--max-text-chars), more than the model's context can take. "
                         "Shorten the conversation.", param="messages", code="context_length_exceeded")


def parse_request(body: bytes, max_messages: int = 2048, max_text_chars: int = 1 << 20) -> ChatCompletionRequest:
    """Parse and validate a request body; every failure is a BadRequest naming the parameter.

    Size limits are checked first, on the bytes and then on the raw JSON, before any validation.
    """
    if not body.strip():
        raise BadRequest("the request body is empty; send a JSON object.", code="empty_body")
    # Each message has a "role" key, so counting the bytes costs milliseconds and bounds what json.loads
    # would build (a key spelled with escapes slips through, and is counted again below).
    if body.count(b'"role"') > max_messages:
        raise BadRequest(f"the request holds more than {max_messages} messages, the most this server accepts "
                         "(--max-messages).", param="messages", code="too_many_messages")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"the request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, got a JSON {type(data).__name__}.",
                         code="invalid_json")
    if _SURROGATE_ESCAPE.search(body):  # only then can a decoded string hold a lone surrogate
        loc = _lone_surrogate(data)
        if loc is not None:
            where = _param(loc, data) or "request"
            raise BadRequest(f"{where}: the text holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff "
                             "without its pair), which is not Unicode text; send valid UTF-8.", param=where,
                             code="invalid_unicode")
    check_size(data, max_messages, max_text_chars)
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        # The deepest location is the most specific one (unions report each member's failure).
        err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))
        param = _param(err["loc"], data)
        if err["type"] == "missing" and err["loc"]:  # the missing field is not in the data, so name it here
            param = (param + "." if param else "") + str(err["loc"][-1])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter; check its spelling or remove it"
        raise BadRequest(f"{param or 'request'}: {msg}.", param=param, code=err["type"]) from None
    check_supported(req)
    return req


# ───────────────────────────── responses ─────────────────────────────


def new_id() -> str:
    """A fresh completion id."""
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprob_entry(token: str, logprob: float, top: list[tuple[str, float]] | None) -> dict:
    """One token of a choice's `logprobs.content`."""
    entry = {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    entry["top_logprobs"] = [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in top or ()]
    return entry


def completion(cid: str, model: str, created: int, choices: list[dict], prompt_tokens: int) -> dict:
    """A whole `chat.completion` (choices: index, text, finish_reason, logprobs or None, completion_tokens)."""
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                     "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]} for c in choices],
        "usage": usage(prompt_tokens, sum(c["completion_tokens"] for c in choices)),
    }


def chunk(cid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None = None,
          logprobs: dict | None = None, with_usage: bool = False) -> dict:
    """One `chat.completion.chunk` of a stream."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        out["usage"] = None  # OpenAI sends null on every chunk but the last when usage is asked for
    return out


def usage_chunk(cid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream with `include_usage`: no choices, the usage of all of them."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: dict | str) -> bytes:
    """One server-sent event."""
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def now() -> int:
    """Unix time in seconds, for `created`."""
    return int(time.time())
