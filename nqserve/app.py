"""The HTTP side: a Starlette app whose handlers check a request (key, size, JSON, fields, context), hand it to the
engine and return its result, whole or as server-sent events (sse-starlette, which also notices a client that goes
away, so its job is dropped). Every refusal is OpenAI's error object with a 4xx status; the server keeps serving."""
from __future__ import annotations

import asyncio
import hmac
import json
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response as HttpResponse
from starlette.routing import Route

from nqfmt.errors import NQError, one_line
from runtime import LanguageModel

from . import protocol as P
from .engine import Done, Engine, Event, Job, Piece

MAX_BODY_BYTES = 1 << 20  # a full 8 K-token context is ~40 KB of text


class Server:
    """The model, its engine and the request handlers."""

    def __init__(self, lm: LanguageModel, engine: Engine, api_key: str | None) -> None:
        self.lm, self.engine, self.api_key = lm, engine, api_key
        self.model_id = os.path.splitext(os.path.basename(lm.info.path))[0]
        self.created = int(os.path.getmtime(lm.info.path))

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.engine.start()
            yield
            self.engine.stop()

        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={P.ApiError: _api_error, HTTPException: _http_error,
                                             Exception: _server_error})

    # --- endpoints ---------------------------------------------------------------------------------------------
    async def health(self, request: HttpRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", **self.engine.load()})

    async def models(self, request: HttpRequest) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "nanoquant"}]})

    async def completions(self, request: HttpRequest) -> HttpResponse:
        self._authorize(request)
        req = P.parse_completion(await _json_body(request), self.model_id)
        ids = req.prompt if isinstance(req.prompt, list) else self.lm.tokenizer.encode(req.prompt)
        return await self._serve(request, req, ids, P.Response(False, self.model_id))

    async def chat_completions(self, request: HttpRequest) -> HttpResponse:
        self._authorize(request)
        req = P.parse_chat(await _json_body(request), self.model_id)
        try:
            ids = self.lm.chat_prompt(req.prompt)
        except NQError as e:
            raise P.ApiError(400, one_line(e), "invalid_value", "messages") from None
        return await self._serve(request, req, ids, P.Response(True, self.model_id))

    # --- shared ------------------------------------------------------------------------------------------------
    def _authorize(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            message = "Incorrect API key provided" if given else "You didn't provide an API key (Authorization: Bearer)"
            raise P.ApiError(401, message, "invalid_api_key")

    def _job(self, req: P.Request, ids: list[int], chat: bool) -> tuple[Job, asyncio.Queue[Event]]:
        """A job whose events arrive on an asyncio queue of this event loop."""
        n_ctx, vocab = self.engine.n_ctx, self.lm.info.vocab
        if not ids:
            raise P.ApiError(400, "the prompt is empty", "invalid_value", "prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise P.ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", "invalid_value", "prompt")
        if len(ids) >= n_ctx:
            raise P.ApiError(400, f"This model's maximum context length is {n_ctx} tokens, however you requested "
                                  f"{len(ids)} tokens in the prompt, leaving no room to generate",
                             "context_length_exceeded", "messages" if chat else "prompt")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        max_tokens = n_ctx if req.max_tokens is None else req.max_tokens
        return Job(ids, max_tokens, req.sampling, req.stop, emit), queue

    async def _serve(self, request: HttpRequest, req: P.Request, ids: list[int], response: P.Response) -> HttpResponse:
        job, queue = self._job(req, ids, response.chat)
        self.engine.submit(job)
        if req.stream:
            return EventSourceResponse(self._events(job, queue, req, response), ping=15)
        return await self._whole(request, job, queue, response)

    async def _whole(self, request: HttpRequest, job: Job, queue: asyncio.Queue[Event],
                     response: P.Response) -> HttpResponse:
        """Collect the whole text; a client that goes away meanwhile cancels the job."""
        text = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.engine.cancel(job)
                        return HttpResponse(status_code=499)  # nobody reads it: the client has gone
                    continue
                if isinstance(event, Piece):
                    text.append(event.text)
                elif isinstance(event, Done):
                    usage = P.usage(event.prompt_tokens, event.completion_tokens)
                    return JSONResponse(response.whole("".join(text), event.finish_reason, usage))
                else:
                    raise P.ApiError(500, event.message, None, None, "server_error")
        except asyncio.CancelledError:
            self.engine.cancel(job)
            raise

    async def _events(self, job: Job, queue: asyncio.Queue[Event], req: P.Request,
                      response: P.Response) -> AsyncIterator[str]:
        """The stream: chunks of text, the last with the finish reason, usage when asked, then [DONE]. When the
        client disconnects, sse-starlette cancels this generator and the job is dropped."""
        try:
            if response.chat:
                yield json.dumps(response.chunk(first=True))
            while True:
                event = await queue.get()
                if isinstance(event, Piece):
                    yield json.dumps(response.chunk(event.text))
                elif isinstance(event, Done):
                    yield json.dumps(response.chunk(None, event.finish_reason))
                    if req.include_usage:
                        yield json.dumps(response.usage_chunk(P.usage(event.prompt_tokens, event.completion_tokens)))
                    break
                else:
                    yield json.dumps(P.ApiError(500, event.message, None, None, "server_error").body())
                    break
            yield "[DONE]"
        finally:
            self.engine.cancel(job)  # no effect once the job is done; drops it when the client left early


async def _json_body(request: HttpRequest) -> dict[str, Any]:
    """The request's JSON object, read up to MAX_BODY_BYTES."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise P.ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise P.ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", "request_too_large")
    try:
        data = json.loads(body)
    except ValueError:
        raise P.ApiError(400, "We could not parse the JSON body of your request: it is not valid JSON",
                         "invalid_json") from None
    if not isinstance(data, dict):
        raise P.ApiError(400, "the request body must be a JSON object", "invalid_json")
    return data


async def _api_error(request: HttpRequest, exc: P.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(P.ApiError(exc.status_code, message, code).body(), status_code=exc.status_code,
                        headers=exc.headers)


async def _server_error(request: HttpRequest, exc: Exception) -> JSONResponse:
    return JSONResponse(P.ApiError(500, f"internal error ({type(exc).__name__})", None, None, "server_error").body(),
                        status_code=500)
