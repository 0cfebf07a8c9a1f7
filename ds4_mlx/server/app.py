"""The FastAPI app: routes, the API key, CORS, errors in the OpenAI or Anthropic shape (FastAPI's
422 becomes a 400 naming the field), and the way from a request to its worker job and back:
events through an asyncio queue, a response or SSE, and the job cancelled when the client goes."""

import asyncio
import contextlib
import logging
import re
import secrets
import time
import uuid
from typing import Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from . import anthropic_api, openai_api
from .request import APIError, Settings
from .stream import Done, Failed
from .worker import Job, Worker

log = logging.getLogger("ds4_mlx.server")
POLL = 0.5  # seconds between checks for a gone client while no event comes
UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|none)$|\[")  # pydantic's names of union members


def create_app(worker: Worker, settings: Settings, api_key: Optional[str] = None, cors: bool = False) -> FastAPI:
    """The app serving `worker`'s model; its shutdown closes the worker (which saves the session)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="ds4-mlx", lifespan=lifespan)
    app.state.worker, app.state.settings, app.state.api_key = worker, settings, api_key
    app.state.started = int(time.time())
    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"])
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.include_router(router)
    app.get("/health")(health)
    return app


def error(request: Request, status: int, message: str, param: Optional[str] = None,
          code: Optional[str] = None) -> JSONResponse:
    log.info(f"{request.method} {request.url.path}: {status} {message}")
    if request.url.path.startswith("/v1/messages"):
        return JSONResponse(anthropic_api.error_body(status, message), status)
    return JSONResponse(openai_api.error_body(status, message, param, code), status)


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return error(request, exc.status, exc.message, exc.param, exc.code)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(request, exc.status_code, str(exc.detail))


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return error(request, 400, f"invalid JSON: {errors[0].get('ctx', {}).get('error', 'cannot parse')}")
    param = field_name(max(errors, key=lambda e: len(e["loc"]))["loc"])  # the deepest is the most precise
    if param is None:
        return error(request, 400, "the body must be a JSON object sent as Content-Type: application/json")
    messages = dict.fromkeys(e["msg"] for e in errors if field_name(e["loc"]) == param)
    return error(request, 400, f"{param}: {' or '.join(messages)}", param)


def field_name(loc) -> Optional[str]:
    """`messages[0].content` for pydantic's ("body", "messages", 0, "content", "str")."""
    name = ""
    for part in loc[1:]:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not UNION_TAG.search(part):
            name += f".{part}" if name else part
    return name or None


async def authorize(request: Request):
    key = request.app.state.api_key
    if key is None:
        return
    bearer = request.headers.get("authorization", "")
    given = request.headers.get("x-api-key") or (bearer[7:] if bearer.lower().startswith("bearer ") else "")
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send Authorization: Bearer KEY or x-api-key: KEY")


router = APIRouter(dependencies=[Depends(authorize)])


async def health(request: Request) -> dict:
    worker: Worker = request.app.state.worker
    return {"status": "ok", "model": request.app.state.settings.model_id, "busy": worker.busy,
            "queued": worker.jobs.qsize(), "served": worker.served}


def model_card(request: Request) -> dict:
    settings: Settings = request.app.state.settings
    return {"id": settings.model_id, "object": "model", "created": request.app.state.started,
            "owned_by": "ds4-mlx", "context_length": settings.ctx}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(request)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    if model_id != request.app.state.settings.model_id:
        raise APIError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
    return model_card(request)


@router.post("/v1/chat/completions")
async def chat_completions(body: openai_api.ChatRequest, request: Request):
    meta = _meta(request, "chatcmpl-")
    return await respond(request, body.to_request(_endpoint(request), request.app.state.settings), body.stream,
                         openai_api.ChatStream(meta, body.include_usage),
                         lambda events: openai_api.chat_completion(meta, events))


@router.post("/v1/completions")
async def completions(body: openai_api.CompletionRequest, request: Request):
    meta = _meta(request, "cmpl-")
    return await respond(request, body.to_request(_endpoint(request), request.app.state.settings), body.stream,
                         openai_api.ChatStream(meta, body.include_usage, completions=True),
                         lambda events: openai_api.text_completion(meta, events))


@router.post("/v1/messages")
async def messages(body: anthropic_api.MessagesRequest, request: Request):
    meta = {"id": "msg_" + uuid.uuid4().hex[:24], "model": request.app.state.settings.model_id}
    return await respond(request, body.to_request(_endpoint(request), request.app.state.settings), body.stream,
                         anthropic_api.MessageStream(meta), lambda events: anthropic_api.message(meta, events))


def _meta(request: Request, prefix: str) -> dict:
    return {"id": prefix + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": request.app.state.settings.model_id}


def _endpoint(request: Request) -> str:
    return f"{request.method} {request.url.path}"


async def respond(request: Request, job_request, stream: Optional[bool], converter, body):
    """Queue the job; answer its errors before the first token as HTTP errors, then stream SSE lines
    (`converter.feed(event)`) or return `body(events)`."""
    events = job_events(request, job_request)
    first = await anext(events, None)
    if isinstance(first, Failed):
        raise APIError(first.status, first.message, first.param, first.code)
    if first is None:  # the client went away
        return Response(status_code=499)
    if stream:
        async def lines():
            for line in converter.feed(first):
                yield line
            async for event in events:
                for line in converter.feed(event):
                    yield line

        return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    collected = [first] + [event async for event in events]
    if isinstance(collected[-1], Failed):
        raise APIError(collected[-1].status, collected[-1].message)
    return body(collected) if isinstance(collected[-1], Done) else Response(status_code=499)


async def job_events(request: Request, job_request):
    """The events of a worker job, until Done or Failed; cancels the job if the client goes away
    (checked every POLL seconds) or this iteration stops early."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event):  # from the worker thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(job_request, emit)
    request.app.state.worker.submit(job)
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), POLL)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= POLL:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            if event is not None:
                yield event
                if isinstance(event, (Done, Failed)):
                    return
    finally:
        job.cancelled.set()
