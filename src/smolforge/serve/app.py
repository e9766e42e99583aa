"""The OpenAI-compatible HTTP server (FastAPI): chat and text completions, models, health.

Every request goes through one `ContinuousBatcher` (smolforge.engine): a new request joins the
running batch at the next decode step, so concurrent clients share each forward pass. Handlers
render and tokenize the prompt, check it against the context and submit it (bad requests get
400 and OpenAI's error body before anything is generated); the batcher's blocking stream is
read from worker threads, so the event loop stays free for other clients. A client that
disconnects cancels its request, which leaves the batch at the next step.

This module imports FastAPI at module level: it needs the `serve` extra
(`pip install 'smolforge[serve]'`); `smolforge.serve.cli` imports it only when serving.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from smolforge.chat.reasoning import prompt_opens_think
from smolforge.chat.render import end_of_turn_ids, render_messages
from smolforge.engine import (
    Completion,
    ContinuousBatcher,
    Engine,
    GenerationError,
    InvalidSamplingParam,
    RequestStream,
    SamplingParams,
    StreamDelta,
)
from smolforge.errors import SmolforgeError
from smolforge.model import Transformer
from smolforge.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    error_param,
)
from smolforge.serve.replies import (
    ChatStreamAssembler,
    chat_chunk,
    chat_completion,
    chat_reply,
    text_chunk,
    text_completion,
    usage_chunk,
)
from smolforge.serve.tools import tools_variable
from smolforge.tokenizer import Tokenizer

log = logging.getLogger("smolforge.serve")

# Names the API gives to SamplingParams fields in error messages.
_API_NAMES = {"max_new_tokens": "max_tokens"}
# Template variables a request may not set through chat_template_kwargs: the server sets them.
_RESERVED_KWARGS = {"messages", "add_generation_prompt", "tools", "xml_tools"}


@dataclass
class GenerationDefaults:
    """Sampling used where a request leaves a field out (`smolforge serve` flags)."""

    max_tokens: int = 1024  # capped by what the context leaves after the prompt
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@dataclass
class _Prepared:
    """A checked request, ready to submit."""

    prompt: list[int]
    params: SamplingParams
    in_think: bool = False  # the rendered prompt opened a <think> block
    tools: bool = False  # tool calls are parsed from the reply
    echo: str = ""  # /v1/completions with echo: the prompt text, sent before the completion


class _Server:
    """The model, its batcher and the request logic behind the routes."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, model_name: str,
                 max_batch_size: int, defaults: GenerationDefaults) -> None:
        self.engine = Engine(model, tokenizer)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.defaults = defaults
        self.context_length = model.config.max_seq_len
        self.created = int(time.time())
        # Chat replies end at the template's end-of-turn marker as well as EOS (the engine adds EOS).
        self.chat_stop_ids = end_of_turn_ids(tokenizer)
        self.batcher: ContinuousBatcher | None = None
        self.limiter: anyio.CapacityLimiter | None = None

    def start(self) -> None:
        self.batcher = ContinuousBatcher(self.engine, self.max_batch_size)
        # Threads that wait on streams: every running row plus the queued ones may hold one.
        self.limiter = anyio.CapacityLimiter(2 * self.max_batch_size + 32)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    # -- checking and preparing requests ------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist: this server serves "
                                f"{self.model_name!r} (see /v1/models)", "model",
                           code="model_not_found")

    def prepare_chat(self, request: ChatCompletionRequest) -> _Prepared:
        template = self.tokenizer.chat_template
        if not template:
            raise ApiError(400, "this model's tokenizer has no chat template, so chat messages "
                                "cannot be rendered: send a plain prompt to /v1/completions",
                           "messages")
        kwargs = dict(request.chat_template_kwargs or {})
        if reserved := sorted(set(kwargs) & _RESERVED_KWARGS):
            raise ApiError(400, f"chat_template_kwargs may not set {', '.join(reserved)}: the "
                                "server sets them from the request", "chat_template_kwargs")
        if request.uses_tools:
            variable = tools_variable(template)
            if variable is None:
                raise ApiError(400, "this model's chat template has no place for tools (it "
                                    "reads neither 'tools' nor 'xml_tools'): send the request "
                                    "without tools, or serve a model whose template renders them",
                               "tools")
            kwargs[variable] = [tool.model_dump(exclude_none=True) for tool in request.tools]
        # Special tokens are template variables, as in transformers' apply_chat_template.
        for name in ("bos", "eos", "pad"):
            token = getattr(self.tokenizer, f"{name}_token")
            if token:
                kwargs.setdefault(f"{name}_token", token)
        messages = [message.for_template() for message in request.messages]
        try:
            text = render_messages(template, messages, add_generation_prompt=True, **kwargs)
        except SmolforgeError as exc:
            raise ApiError(400, str(exc), "messages") from None
        prompt = self.tokenizer.encode(text)
        params = self._params(request, len(prompt), "messages", self.chat_stop_ids)
        return _Prepared(prompt, params, in_think=prompt_opens_think(text), tools=request.uses_tools)

    def prepare_completion(self, request: CompletionRequest) -> _Prepared:
        prompt = request.single_prompt()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            vocab = self.engine.model.config.vocab_size
            if bad := [t for t in prompt if not 0 <= t < vocab]:
                raise ApiError(400, f"prompt holds token ids outside the vocabulary [0, {vocab}): "
                                    f"{bad[:5]}", "prompt")
            text, ids = self.tokenizer.decode(prompt), list(prompt)
        params = self._params(request, len(ids), "prompt", [])
        return _Prepared(ids, params, echo=text if request.echo else "")

    def _params(self, request: ChatCompletionRequest | CompletionRequest, prompt_len: int,
                prompt_field: str, stop_ids: list[int]) -> SamplingParams:
        """The request's sampling, checked against the context and the engine's rules."""
        context, defaults = self.context_length, self.defaults
        room = context - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens but the model's context is "
                                f"{context} tokens, leaving no room to generate: shorten it",
                           prompt_field, code="context_length_exceeded")
        max_tokens = request.requested_max_tokens
        if max_tokens is None:
            max_tokens = min(defaults.max_tokens, room)
        elif max_tokens > room:
            raise ApiError(400, f"max_tokens ({max_tokens}) + the prompt ({prompt_len} tokens) = "
                                f"{max_tokens + prompt_len} tokens exceeds the model's context "
                                f"({context} tokens): ask for at most {room} tokens",
                           "max_tokens", code="context_length_exceeded")

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=pick(request.temperature, defaults.temperature),
            top_k=pick(request.top_k, defaults.top_k), top_p=pick(request.top_p, defaults.top_p),
            min_p=pick(request.min_p, defaults.min_p),
            repetition_penalty=pick(request.repetition_penalty, defaults.repetition_penalty),
            stop=request.stop_strings(), stop_token_ids=list(stop_ids),
            ignore_eos=request.ignore_eos, seed=request.seed)
        try:
            params.validate()
        except InvalidSamplingParam as exc:
            raise _sampling_error(exc) from None
        return params

    def submit(self, prepared: _Prepared) -> RequestStream:
        if self.batcher is None:
            raise ApiError(503, "the server is not running", type="server_error")
        try:
            return self.batcher.submit(prepared.prompt, prepared.params)
        except InvalidSamplingParam as exc:
            raise _sampling_error(exc) from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        except RuntimeError as exc:  # the batcher is closed: the server is shutting down
            raise ApiError(503, str(exc), type="server_error") from None

    # -- reading results ------------------------------------------------------------------------

    async def deltas(self, stream: RequestStream) -> AsyncIterator[StreamDelta]:
        """The stream's deltas, each read in a worker thread; leaving early (the client went
        away, an error) cancels the request so it leaves the batch."""
        try:
            while (delta := await anyio.to_thread.run_sync(
                    next, stream, None, abandon_on_cancel=True, limiter=self.limiter)) is not None:
                yield delta
        finally:
            stream.cancel()  # a no-op for a finished request

    async def result(self, stream: RequestStream, request: Request) -> Completion:
        """Wait for the whole completion; cancel it if the client disconnects first."""
        error: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_cancel_on_disconnect, request, stream)
            try:
                completion = await anyio.to_thread.run_sync(stream.result, abandon_on_cancel=True,
                                                            limiter=self.limiter)
            except GenerationError as exc:
                error = exc
            tasks.cancel_scope.cancel()
        if error is not None:
            log.error("generation failed", exc_info=error)
            raise ApiError(500, f"generation failed: {error.__cause__!r}", type="server_error")
        if completion.finish_reason == "abort":
            raise ApiError(503, "the request was aborted (the server is shutting down)",
                           type="server_error")
        return completion


def _sampling_error(exc: InvalidSamplingParam) -> ApiError:
    name = _API_NAMES.get(exc.field, exc.field)
    return ApiError(400, f"{name} {str(exc)[len(exc.field) + 1:]}", name)


async def _cancel_on_disconnect(request: Request, stream: RequestStream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


def _sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def _stream_failure(error: Exception | None) -> str:
    """The error event sent in place of the rest of a stream (the OpenAI client raises it)."""
    if error is not None:
        log.error("generation failed", exc_info=error)
        return _sse(error_body(f"generation failed: {error.__cause__!r}", type="server_error"))
    return _sse(error_body("the request was aborted (the server is shutting down)", type="server_error"))


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


# ---- the app ----------------------------------------------------------------------------------


def create_app(model: Transformer, tokenizer: Tokenizer, *, model_name: str,
               api_key: str | None = None, max_batch_size: int = 32,
               defaults: GenerationDefaults | None = None) -> FastAPI:
    """The server as an ASGI app; run it with uvicorn (`smolforge serve`) or `start_server`.

    The batcher's model thread starts and stops with the app (its lifespan).
    """
    server = _Server(model, tokenizer, model_name, max_batch_size, defaults or GenerationDefaults())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(server.close)

    app = FastAPI(title="smolforge", summary="OpenAI-compatible API of one smolforge model",
                  lifespan=lifespan)
    app.state.server = server
    _add_error_handlers(app)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        sent = request.headers.get("authorization", "")
        scheme, _, key = sent.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send the header 'Authorization: "
                                "Bearer <key>' with the key the server was started with",
                           code="invalid_api_key")

    auth = [Depends(check_key)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def model_info(name: str) -> dict[str, Any]:
        server.check_model(name)
        return _model_card(server)

    async def generate(body: Any, request: Request, prepare: Any, id_prefix: str, events: Any,
                       whole: Any) -> Any:
        """What both generation routes do: validate and render the request (in a worker thread:
        tokenising is CPU work), queue it on the batcher, then stream events or wait for the
        whole completion."""
        server.check_model(body.model)
        prepared = await run_in_threadpool(prepare, body)
        stream = server.submit(prepared)
        request_id, created = _new_id(id_prefix), int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(events(server, stream, prepared, request_id, created, usage),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        completion = await server.result(stream, request)
        return JSONResponse(whole(prepared, completion, request_id, created))

    def whole_chat(prepared: Any, completion: Any, request_id: str, created: int) -> dict[str, Any]:
        reply = chat_reply(completion.text, completion.finish_reason, in_think=prepared.in_think,
                           tools=prepared.tools)
        return chat_completion(request_id, created, model_name, reply, len(prepared.prompt),
                               len(completion.tokens))

    def whole_text(prepared: Any, completion: Any, request_id: str, created: int) -> dict[str, Any]:
        return text_completion(request_id, created, model_name, prepared.echo + completion.text,
                               completion.finish_reason, len(prepared.prompt), len(completion.tokens))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await generate(body, request, server.prepare_chat, "chatcmpl", _chat_events, whole_chat)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await generate(body, request, server.prepare_completion, "cmpl", _text_events, whole_text)

    @app.get("/", include_in_schema=False)
    async def web_chat() -> FileResponse:
        page = resources.files("smolforge.serve") / "static" / "index.html"
        if not page.is_file():
            raise ApiError(404, "this installation has no web chat page (serve/static/index.html)",
                           code="not_found")
        return FileResponse(str(page), media_type="text/html")

    return app


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _model_card(server: _Server) -> dict[str, Any]:
    return {"id": server.model_name, "object": "model", "created": server.created,
            "owned_by": "smolforge", "max_model_len": server.context_length}


async def _chat_events(server: _Server, stream: RequestStream, prepared: _Prepared,
                       request_id: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a streamed chat completion: a role chunk, content / reasoning /
    tool-call chunks, the finish chunk, optionally the usage chunk, then `[DONE]`."""
    model = server.model_name
    assembler = ChatStreamAssembler(in_think=prepared.in_think, tools=prepared.tools)
    yield _sse(chat_chunk(request_id, created, model, {"role": "assistant", "content": ""}))
    generated, reason = 0, "stop"
    try:
        async for delta in server.deltas(stream):
            generated += len(delta.tokens)
            if delta.finish_reason == "abort":
                yield _stream_failure(None)
                return
            if piece := assembler.feed(delta.text):
                yield _sse(chat_chunk(request_id, created, model, piece))
            reason = delta.finish_reason or reason
    except GenerationError as exc:
        yield _stream_failure(exc)
        return
    last, finish_reason = assembler.finish(reason)
    yield _sse(chat_chunk(request_id, created, model, last, finish_reason))
    if include_usage:
        yield _sse(usage_chunk(chat_chunk(request_id, created, model, None), len(prepared.prompt),
                               generated))
    yield _sse("[DONE]")


async def _text_events(server: _Server, stream: RequestStream, prepared: _Prepared,
                       request_id: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a streamed text completion."""
    model = server.model_name
    if prepared.echo:
        yield _sse(text_chunk(request_id, created, model, prepared.echo))
    generated = 0
    try:
        async for delta in server.deltas(stream):
            generated += len(delta.tokens)
            if delta.finish_reason == "abort":
                yield _stream_failure(None)
                return
            if delta.text or delta.finish_reason:
                yield _sse(text_chunk(request_id, created, model, delta.text, delta.finish_reason))
    except GenerationError as exc:
        yield _stream_failure(exc)
        return
    if include_usage:
        yield _sse(usage_chunk(text_chunk(request_id, created, model, ""), len(prepared.prompt),
                               generated))
    yield _sse("[DONE]")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered with OpenAI's error body; validation errors are 400, not 422."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return JSONResponse(error_body(message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(f"internal server error: {exc!r}", type="server_error"),
                            status_code=500)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic / FastAPI validation errors of a request body."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        return f"the request body is not valid JSON ({reason})", None
    if first["type"] == "missing" and tuple(first["loc"]) == ("body",):
        return "the request body is missing: send a JSON object", None
    parts = []
    for error in errors[:3]:
        param = error_param(tuple(error["loc"]))
        msg = error["msg"].removeprefix("Value error, ")
        parts.append(f"{param}: {msg}" if param else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, error_param(tuple(first["loc"]))


# ---- running ----------------------------------------------------------------------------------


class RunningServer:
    """A uvicorn server on a background thread (tests, benchmarks); `close()` stops it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        import uvicorn

        # Binding here, before the thread starts, gives a free port with no race (port 0).
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this. Without it, uvicorn serving a socket it did not open
        # leaves Nagle's algorithm on, and a response written in two pieces waits for the
        # client's delayed ACK: ~40 ms per keep-alive request.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="smolforge-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
        self._socket.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
