"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions: a request body is checked field
by field into a `Request` (or an `ApiError` that says which field is wrong), and responses and stream chunks are
built as OpenAI writes them.

Sampling fields the request leaves out take the runtime's defaults (temperature 0.8, top_k 40, top_p 0.95, min_p
0.05, as llama.cpp's server does), not OpenAI's pure sampling at temperature 1. Beside OpenAI's fields a request may
set top_k, min_p and repetition_penalty (llama.cpp's names). Fields OpenAI defines that this server does not
implement are accepted only at their neutral value (n = 1, echo false, penalties 0, ...); unknown fields are refused
as OpenAI refuses them.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from runtime.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
_COMMON = {"model", "max_tokens", "stop", "n", "stream", "stream_options", "user", *_SAMPLING}
# OpenAI fields accepted at their neutral value only: name -> test of "neutral"
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0, "logit_bias": lambda v: not v,
    "logprobs": lambda v: v in (None, False), "echo": lambda v: v is False, "best_of": lambda v: v == 1,
    "suffix": lambda v: not v, "top_logprobs": lambda v: v in (None, 0), "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"), "functions": lambda v: not v, "parallel_tool_calls": lambda v: True,
    "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "echo",
                               "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias",
                         "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "parallel_tool_calls",
                         "response_format"}


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Request:
    """A checked completion or chat request. `prompt` is text, token ids, or (chat) the messages."""

    prompt: str | list[int] | list[dict[str, str]]
    max_tokens: int | None  # None: until a stop or the context is full
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_completion(body: dict[str, Any], model_id: str) -> Request:
    _check_fields(body, COMPLETION_FIELDS)
    return _request(body, model_id, _prompt(body), _int(body, "max_tokens", 16, low=1))


def parse_chat(body: dict[str, Any], model_id: str) -> Request:
    _check_fields(body, CHAT_FIELDS)
    limit = _int(body, "max_completion_tokens", None, low=1)
    return _request(body, model_id, _messages(body), _int(body, "max_tokens", limit, low=1))


def _request(body: dict[str, Any], model_id: str, prompt, max_tokens: int | None) -> Request:
    model = _field(body, "model", str, None)
    if model is None:
        raise ApiError(400, "you must provide a model parameter", "missing_required_parameter", "model")
    if model != model_id:
        raise ApiError(404, f"The model '{model}' does not exist (this server serves '{model_id}')",
                       "model_not_found", "model")
    if _int(body, "n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "unsupported_value", "n")
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool) or set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options may only hold include_usage (true or false)", "invalid_value",
                       "stream_options")
    _field(body, "user", str, None)
    return Request(prompt, max_tokens, _sampling(body), _stop(body), stream, include_usage)


def _sampling(body: dict[str, Any]) -> SamplingParams:
    defaults = SamplingParams()
    temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be greater than 0", "invalid_value", "top_p")
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=_int(body, "top_k", defaults.top_k, low=0),
                          min_p=_number(body, "min_p", defaults.min_p, 0.0, 1.0),
                          repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
                          seed=_int(body, "seed", None))


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "stop must be a string or a list of strings", "invalid_type", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop holds at most {MAX_STOP_STRINGS} strings", "invalid_value", "stop")
    return tuple(s for s in stop if s)


def _prompt(body: dict[str, Any]) -> str | list[int]:
    """A string, a list of one string, token ids, or a list of one list of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "you must provide a prompt parameter", "missing_required_parameter", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "invalid_type",
                   "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """messages as {role, content} with content as text (a list of text parts is joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "invalid_type", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ApiError(400, f"{where} must be an object whose role is one of: {', '.join(CHAT_ROLES)}",
                           "invalid_value", where)
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", "invalid_type",
                           f"{where}.content")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise ApiError(400, f"{where} has unsupported fields: {', '.join(extra)}", "invalid_value", where)
        out.append({"role": CHAT_ROLES[m["role"]], "content": content})
    return out


# --- field checks ----------------------------------------------------------------------------------------------
def _check_fields(body: dict[str, Any], known: set[str]) -> None:
    for name in body:
        if name not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", "unknown_parameter", name)
        if name in _NEUTRAL and body[name] is not None and not _NEUTRAL[name](body[name]):
            raise ApiError(400, f"{name} = {body[name]!r} is not supported by this server", "unsupported_value", name)


def _field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"{name} must be {_KIND_NAMES[kind]}, not {_json_type(value)}", "invalid_type", name)
    return value


def _int(body: dict[str, Any], name: str, default: int | None, low: int | None = None) -> int | None:
    value = _field(body, name, int, default)
    if value is not None and low is not None and value < low:
        raise ApiError(400, f"{name} must be at least {low} (got {value})", "invalid_value", name)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = _field(body, name, (int, float), default)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low:g} and {high:g} (got {value})", "invalid_value", name)
    return float(value)


_KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", (int, float): "a number"}


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


# --- responses -------------------------------------------------------------------------------------------------
class Response:
    """The response objects of one request, completion or chat, whole or as stream chunks."""

    def __init__(self, chat: bool, model_id: str) -> None:
        self.chat, self.model_id = chat, model_id
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id}

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return {**self._base("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """A stream chunk: a piece of text, or (text None) the last one, with the finish reason."""
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
