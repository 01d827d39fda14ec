"""An OpenAI-compatible chat server (FastAPI + uvicorn) over a ChatEngine (transformers or llama.cpp).

Every error leaves as the OpenAI error body with a 4xx/5xx status; no stack trace reaches a client.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ezoforge.config import ServeConfig, secret
from ezoforge.errors import ConfigError
from ezoforge.infer.batching import Batcher, Job, QueueFull, Shutdown, Timeout
from ezoforge.completion import Completion
from ezoforge.infer.generate import ChatEngine, Sampling

log = logging.getLogger(__name__)


_NO_SURROGATES = "lone UTF-16 surrogates are not text"


def _text(value: str) -> str:
    # JSON allows "\ud800"; a tokenizer cannot encode it, so it is refused here rather than failing later.
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        raise ValueError(_NO_SURROGATES)
    return value


Text = Annotated[str, AfterValidator(_text)]


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class JSONSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI structured outputs: `text`, `json_object` (any JSON object) or `json_schema` (that schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def schema(self) -> dict | None:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise APIError(400, "response_format.json_schema is required with type json_schema",
                               "response_format.json_schema")
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class ChatRequest(BaseModel):
    # allow_inf_nan=False: Python's JSON parser accepts NaN/Infinity, which must not reach sampling.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes (negatives wrap)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    response_format: ResponseFormat | None = None
    # vLLM's chat extensions: continue the final assistant message instead of opening a new turn; report the
    # prompt's token ids as rendered here and the reply's (`prompt_token_ids`, `choices[0].token_ids`).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_ids: bool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _job_error(e: BaseException, limits: ServeConfig) -> APIError:
    """What a request that ended without a completion tells its client."""
    if isinstance(e, Timeout):
        return APIError(504, f"{e} (serve.request_timeout is {limits.request_timeout:g} s)", None,
                        "request_timeout", "timeout_error")
    if isinstance(e, Shutdown):
        return APIError(503, str(e), None, "shutting_down", "server_error")
    return APIError(500, "generation failed", None, None, "server_error")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (declared or as it arrives) gets 413 before it is parsed.
    The body is read here, bounded, and handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        too_big = declared.isdigit() and int(declared) > self.max_bytes
        body, more = b"", not too_big
        while more and len(body) <= self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if too_big or len(body) > self.max_bytes:
            error = error_body(f"the request body is larger than {self.max_bytes} bytes (serve.max_body_bytes)",
                               "invalid_request_error", code="request_too_large")
            return await JSONResponse(error, status_code=413)(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: a disconnect, when it comes

        await self.app(scope, replay, send)


class KeyCheck:
    """ASGI middleware: /v1/* needs `Authorization: Bearer KEY`. Plain ASGI rather than `@app.middleware("http")`,
    whose wrapped `receive` hides a client's disconnect from `request.is_disconnected()`."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.key.encode()):
                error = error_body("invalid or missing API key", "authentication_error", code="invalid_api_key")
                return await JSONResponse(error, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(gen: ChatEngine, served_model_name: str, api_key: str | None = None, system_prompt: str | None = None,
               max_tokens: int = 256, limits: ServeConfig | None = None) -> FastAPI:
    """`system_prompt` goes in front of a conversation that has none; `max_tokens` is the default reply length."""
    limits = limits or ServeConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(gen, limits)
        try:
            yield
        finally:
            await run_in_threadpool(app.state.batcher.close)

    app = FastAPI(title="ezoforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if api_key is not None:
        app.add_middleware(KeyCheck, key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON body: {err.get('msg')}", "invalid_request_error"), 400)
        param = ".".join(loc) or None
        return JSONResponse(error_body(f"{param or 'body'}: {err.get('msg')}", "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception):
        log.exception("request failed")  # the trace stays in the server log, never in a response
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        batcher = getattr(app.state, "batcher", None)
        return {"status": "ok", "model": served_model_name, "running": batcher.running if batcher else 0,
                "waiting": batcher.queued() if batcher else 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "ezoforge"}]}

    def prepare(req: ChatRequest) -> tuple[list[int], Sampling]:
        if req.model is not None and req.model != served_model_name:
            raise APIError(404, f"model '{req.model}' is not served here (serving '{served_model_name}')",
                           "model", "model_not_found")
        messages = [m.plain() for m in req.messages]
        if req.continue_final_message and req.add_generation_prompt:
            raise APIError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           "continue_final_message")
        if req.continue_final_message and messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message needs the last message to be an assistant message",
                           "messages")
        if req.return_token_ids and req.stream:
            raise APIError(400, "return_token_ids is answered without stream only", "return_token_ids")
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompt = gen.encode(gen.prompt_text(messages, req.add_generation_prompt, req.continue_final_message))
        context = gen.context_length
        requested = req.max_completion_tokens or req.max_tokens
        if len(prompt) >= context:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {context}",
                           "messages", "context_length_exceeded")
        if requested is not None and len(prompt) + requested > context:
            raise APIError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({requested}) exceeds this "
                                f"model's context of {context} tokens", "max_tokens", "context_length_exceeded")
        max_new = requested or min(max_tokens, context - len(prompt))
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        schema = req.response_format.schema() if req.response_format else None
        if schema is not None:
            _check_schema(schema)
        return prompt, Sampling(max_new, req.temperature, req.top_p, req.seed, stop, schema)

    def submit(prompt: list[int], sampling: Sampling, events: asyncio.Queue) -> Job:
        loop = asyncio.get_running_loop()
        batcher: Batcher = app.state.batcher
        try:
            return batcher.submit(prompt, sampling, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                                  limits.request_timeout)
        except QueueFull as e:
            wait = 1 + batcher.queued() // limits.max_batch
            raise APIError(429, f"the server is busy: {e}; retry later", None, "queue_full", "rate_limit_error",
                           {"Retry-After": str(wait)}) from None
        except Shutdown as e:
            raise _job_error(e, limits) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        prompt, sampling = await run_in_threadpool(prepare, req)
        if sampling.json_schema is not None:
            await run_in_threadpool(lambda: gen.structured)  # built once per model, slow: not on the event loop
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events: asyncio.Queue = asyncio.Queue()
        job = submit(prompt, sampling, events)
        if req.stream:
            return StreamingResponse(_sse(job, events, cid, created), media_type="text/event-stream")
        try:
            checked = time.monotonic()
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    event = None
                if isinstance(event, Completion):
                    break
                if isinstance(event, BaseException):
                    raise _job_error(event, limits)
                # Text pieces arrive every step: look for a gone client once a second, whatever arrives.
                if time.monotonic() - checked >= 1.0:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it; the job is cancelled below
        finally:
            job.cancel()  # no-op once finished; otherwise a client gone stops its generation at the next step
        choice = {"index": 0, "message": {"role": "assistant", "content": event.text},
                  "finish_reason": event.finish_reason, "logprobs": None}
        ids = {}
        if req.return_token_ids:  # where vLLM puts them
            choice["token_ids"], ids["prompt_token_ids"] = job.out, prompt
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": served_model_name,
            "choices": [choice], **ids,
            "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                      "total_tokens": event.prompt_tokens + event.completion_tokens},
        }

    async def _sse(job: Job, events: asyncio.Queue, cid: str, created: int):
        """Server-sent events. Starlette cancels this generator when the client disconnects; `finally` then
        cancels the job, so its row leaves the batch at the next step."""
        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served_model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if isinstance(event, str):
                    yield chunk({"content": event})
                elif isinstance(event, Completion):
                    yield chunk({}, event.finish_reason)
                    yield "data: [DONE]\n\n"
                    return
                else:
                    e = _job_error(event, limits)
                    yield f"data: {json.dumps(error_body(e.message, e.kind, e.param, e.code))}\n\n"
                    return
        finally:
            job.cancel()

    return app


def _check_schema(schema: dict) -> None:
    from ezoforge.infer.structured import parser

    try:
        parser(schema)
    except Exception as e:  # the library raises assorted types for a schema it cannot enforce
        raise APIError(400, f"response_format.json_schema.schema is not usable: {e}",
                       "response_format.json_schema.schema") from None


def api_key_from_env(var: str | None) -> str | None:
    """An unset variable is an error, not an open server."""
    return None if var is None else secret(var, f"--api-key-env {var}")


def loopback_only(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (a name that does not resolve: False)."""
    import ipaddress
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, api_key_env: str | None, open_without_key: bool) -> None:
    """A server others can reach needs a key, unless the user says, by its own flag, that it is meant to be open."""
    if loopback_only(host) or api_key_env is not None:
        return
    if not open_without_key:
        raise ConfigError(f"--host {host}: listens beyond this machine without an API key, so anyone who reaches the "
                          "port can use the model. Give --api-key-env VAR (the key in that variable), or "
                          "--open-without-key if it is meant to be open.")
    log.warning("--open-without-key: the server on %s takes requests from anyone who can reach it, without a key", host)


def serve(gen: ChatEngine, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key_env: str | None = None, system_prompt: str | None = None, max_tokens: int = 256,
          limits: ServeConfig | None = None) -> None:
    app = create_app(gen, served_model_name, api_key_from_env(api_key_env), system_prompt, max_tokens, limits)
    _server(app, host, port, "info").run()


def _stop_generating(app: FastAPI) -> None:
    batcher = getattr(app.state, "batcher", None)
    if batcher is not None:
        batcher.close(wait=0)


def _server(app: FastAPI, host: str, port: int, log_level: str):
    """uvicorn, but its exit (SIGTERM, Ctrl-C) first ends every generation: open requests then finish at once
    instead of holding the shutdown until they reach max_tokens."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            _stop_generating(app)
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))


class BackgroundServer:
    """Serve an app on loopback from a thread (for a local judge/synthesizer and for tests): `with ... as url:`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.app = app
        self.server = _server(app, host, port, "warning")
        self.thread = None

    def __enter__(self) -> str:
        import threading

        import httpx

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"server on {self.url} did not start")

    def __exit__(self, *exc) -> None:
        _stop_generating(self.app)
        self.server.should_exit = True
        self.thread.join(timeout=10)
