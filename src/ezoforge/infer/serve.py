"""An OpenAI-compatible chat server (FastAPI + uvicorn) over a Generator.

Every error leaves as the OpenAI error body with a 4xx/5xx status; no stack trace reaches a client.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ezoforge.errors import ConfigError
from ezoforge.infer.generate import Completion, Generator, Sampling

log = logging.getLogger(__name__)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

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
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    response_format: ResponseFormat | None = None
    # vLLM's chat extensions: continue the final assistant message instead of opening a new turn.
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(gen: Generator, served_model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="ezoforge", docs_url=None, redoc_url=None, openapi_url=None)
    default_max_tokens = 512

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

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

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served_model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "ezoforge"}]}

    def prepare(req: ChatRequest) -> tuple[str, Sampling, int]:
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
        prompt = gen.prompt_text(messages, req.add_generation_prompt, req.continue_final_message)
        prompt_tokens = gen.count_tokens(prompt)
        context = gen.loaded.context_length
        requested = req.max_completion_tokens or req.max_tokens
        if prompt_tokens >= context:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens; this model's context is {context}",
                           "messages", "context_length_exceeded")
        if requested is not None and prompt_tokens + requested > context:
            raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({requested}) exceeds this "
                                f"model's context of {context} tokens", "max_tokens", "context_length_exceeded")
        max_new = requested or min(default_max_tokens, context - prompt_tokens)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        schema = req.response_format.schema() if req.response_format else None
        if schema is not None:
            _check_schema(schema)
        return prompt, Sampling(max_new, req.temperature, req.top_p, req.seed, stop, schema), prompt_tokens

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        prompt, sampling, prompt_tokens = await run_in_threadpool(prepare, req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse(prompt, sampling, cid, created), media_type="text/event-stream")
        out = (await run_in_threadpool(gen.complete_text, [prompt], sampling))[0]
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": served_model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": out.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
        }

    def _sse(prompt, sampling, cid, created):
        """Server-sent events; a plain generator, so Starlette runs it in a worker thread."""
        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served_model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        try:
            for piece in gen.stream_text(prompt, sampling):
                if isinstance(piece, Completion):
                    yield chunk({}, piece.finish_reason)
                else:
                    yield chunk({"content": piece})
        except Exception:
            log.exception("stream failed")
            yield f"data: {json.dumps(error_body('generation failed', 'server_error'))}\n\n"
            return
        yield "data: [DONE]\n\n"

    return app


def _check_schema(schema: dict) -> None:
    from ezoforge.infer.structured import parser

    try:
        parser(schema)
    except Exception as e:  # the library raises assorted types for a schema it cannot enforce
        raise APIError(400, f"response_format.json_schema.schema is not usable: {e}",
                       "response_format.json_schema.schema") from None


def api_key_from_env(var: str | None) -> str | None:
    """The key comes only from the environment; an unset variable is an error, not an open server."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"--api-key-env {var}: environment variable {var} is not set or empty")
    return value


def serve(gen: Generator, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key_env: str | None = None) -> None:
    import uvicorn

    app = create_app(gen, served_model_name, api_key_from_env(api_key_env))
    uvicorn.run(app, host=host, port=port, log_level="info")


class BackgroundServer:
    """Serve an app on loopback from a thread (for a local judge/synthesizer and for tests): `with ... as url:`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
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
        self.server.should_exit = True
        self.thread.join(timeout=10)
