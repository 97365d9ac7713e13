"""``mocae serve``: an OpenAI-compatible chat server for a MoCaE, steerable per request.

    POST /v1/chat/completions   OpenAI chat completions (plain, or ``stream: true`` server-sent events)
                                plus ``axis_weights``, ``prior``, ``routing_mode``; every answer (and a
                                stream's first chunk) carries ``routing``
    GET  /v1/models             the one served model (with its axes)
    GET  /health                status, queue length, batching counters
    GET  /                      the playground: chat box, a slider per axis, routing bars per answer

Any model mocae can load is served: a MoCaE folder, a peft adapter folder (an exported mixture,
a single expert) or the base model, so the same server is the comparison.

    app = create_app(ServedModel(model, tokenizer, "mocae"), ServeConfig())
    run_server("runs/x/mocae", ServeConfig(port=8000))

Bad input gets a 4xx with a JSON body naming the field; the only 5xx are a timeout (504),
shutdown (503) and a bug (500, also JSON).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the handlers' (string) annotations here
from pydantic import BaseModel, ConfigDict, Field

from mocae.serve.batcher import Batcher, Row, ServedModel
from mocae.serve.schema import ApiError, ChatRequest, check_request, error_body, loc_to_param

PLAYGROUND = Path(__file__).with_name("playground.html")


class ServeConfig(BaseModel):
    """Limits and batching of the server."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch: int = Field(16, ge=1, description="rows decoded together")
    max_queue: int = Field(64, ge=0, description="requests waiting before 429")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long the first request waits for others to join")
    continuous: bool = Field(True, description="requests arriving mid-decode join the running batch")
    max_tokens_cap: int = Field(512, ge=1, description="largest max_tokens accepted")
    default_max_tokens: int = Field(256, ge=1, description="budget when the request gives none")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest chat-formatted prompt accepted")
    max_content_chars: int = Field(32_000, ge=1, description="longest message content accepted")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted (413 above)")
    request_timeout_s: float = Field(120.0, gt=0, description="per request, queueing included (504 after)")
    default_temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy, when the request gives none")


class _BodyLimit:
    """Pure ASGI middleware: 413 above the body limit, 411 for a chunked body (no length to check).

    (Starlette's ``BaseHTTPMiddleware`` would hide client disconnects from the handlers.)
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            from fastapi.responses import JSONResponse

            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            error = None
            if length is None and headers.get(b"transfer-encoding"):
                error = (411, "send the body with a Content-Length header")
            elif length is not None and (not length.isdigit() or int(length) > self.limit):
                error = (413, f"request body over {self.limit} bytes")
            if error:
                await JSONResponse(error_body(error[0], error[1], "body"), status_code=error[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _status(exc: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(served: ServedModel, cfg: ServeConfig | None = None):
    """The FastAPI app serving ``served``; its batcher runs for the app's lifetime."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServeConfig()
    batcher = Batcher(served, max_batch=cfg.max_batch, max_queue=cfg.max_queue, batch_wait_ms=cfg.batch_wait_ms,
                      continuous=cfg.continuous)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="mocae", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.served, app.state.config = batcher, served, cfg
    started = int(time.time())

    # errors: always the OpenAI JSON shape, never an HTML page or a bare 500 ------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _status(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return _status(ApiError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                                    "body"))
        param = loc_to_param(first.get("loc", ()))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return _status(ApiError(400, f"{param or 'body'}: {msg}{more}", param or "body"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(exc.status_code, str(exc.detail), type=kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                            status_code=500)

    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)

    # endpoints --------------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": served.model_id, "object": "model", "created": started, "owned_by": "mocae",
                "axes": served.axes, "routing": ("token" if served.per_token else "sequence") if served.axes else None}

    @app.get("/", include_in_schema=False)
    async def playground():
        from fastapi.responses import HTMLResponse

        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.model_id, "axes": served.axes, "queued": batcher.queued,
                "active": batcher.active, "stats": dict(batcher.stats)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != served.model_id:
            raise ApiError(404, f"model {model_id!r} is not served here", "model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        steering = check_request(req, model_id=served.model_id, axes=served.axes, per_token=served.per_token,
                                 max_tokens_cap=cfg.max_tokens_cap, default_max_tokens=cfg.default_max_tokens,
                                 max_content_chars=cfg.max_content_chars)
        served.check_routing_mode(req.routing_mode)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        try:
            prompt = served.encode(messages)
        except Exception as err:  # the chat template refused these messages (e.g. roles out of order)
            raise ApiError(400, f"messages: the model's chat template rejected them: {err}", "messages") from None
        if len(prompt) > cfg.max_prompt_tokens:
            raise ApiError(400, f"messages: the prompt has {len(prompt)} tokens; the limit is {cfg.max_prompt_tokens}",
                           "messages")
        if len(prompt) + steering["max_tokens"] > served.max_context:
            room = served.max_context - len(prompt)
            if room < 1:
                raise ApiError(400, f"messages: the prompt fills the model's context of {served.max_context}",
                               "messages")
            steering["max_tokens"] = room
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        def emit(ev):
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutdown): nobody to tell
                pass

        row = Row(prompt_ids=prompt, max_tokens=steering["max_tokens"], emit=emit,
                  axis_weights=steering["axis_weights"], prior=steering["prior"], routing_mode=req.routing_mode,
                  temperature=cfg.default_temperature if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=req.stop,
                  deadline=time.monotonic() + cfg.request_timeout_s, stream=req.stream, ignore_eos=req.ignore_eos)
        batcher.submit(row)  # 429 when the queue is full
        deadline = time.monotonic() + cfg.request_timeout_s + 5.0  # the worker enforces the real one

        async def next_event(poll_disconnect: bool):
            """The next event from the worker; None when the client disconnected (the row is cancelled).

            A stream needs no polling: Starlette cancels it when its client goes (the finally below).
            """
            while True:
                try:
                    return await asyncio.wait_for(events.get(), 0.25)
                except asyncio.TimeoutError:
                    if poll_disconnect and await request.is_disconnected():
                        row.cancel()
                        return None
                    if time.monotonic() > deadline:
                        row.cancel()
                        return ("error", ApiError(504, "request timed out", type="timeout"))

        created = int(time.time())
        base = {"id": row.id, "created": created, "model": served.model_id}
        if not req.stream:
            routing, text = None, []
            try:
                while True:
                    ev = await next_event(True)
                    if ev is None:
                        return JSONResponse({}, status_code=499)
                    if ev[0] == "routing":
                        routing = ev[1]
                    elif ev[0] == "delta":
                        text.append(ev[1])
                    elif ev[0] == "error":
                        return _status(ev[1])
                    else:
                        _, reason, usage = ev
                        break
            except asyncio.CancelledError:
                row.cancel()
                raise
            return {**base, "object": "chat.completion", "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": reason, "logprobs": None}],
                    "usage": usage, "routing": routing}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {**base, "object": "chat.completion.chunk", "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def stream():
            try:
                while True:
                    ev = await next_event(False)
                    if ev is None:
                        return
                    if ev[0] == "routing":
                        yield chunk({"role": "assistant", "content": ""}, routing=ev[1])
                    elif ev[0] == "delta":
                        yield chunk({"content": ev[1]})
                    elif ev[0] == "error":
                        yield f"data: {json.dumps(ev[1].body())}\n\n"
                        return
                    else:
                        _, reason, usage = ev
                        yield chunk({}, finish=reason)
                        if include_usage:
                            yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:  # finished, or the client went away mid-stream: either way this row is done
                row.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# Run systems whose models decode with a plain KV-cached forward, as the batcher does. X-LoRA and
# MoTE decode with loops of their own; H3Fusion and Arrow are not tested with the server yet.
SERVABLE_SYSTEMS = ("base", "multitask", "task_arithmetic", "ties", "dare", "mocae")


def load_served(model: str, backbone: str | None = None, model_id: str | None = None,
                system: str | None = None) -> ServedModel:
    """A ServedModel for ``mocae serve --model``: 'base' or a saved system folder (a MoCaE folder, a
    peft adapter folder); with ``system``, ``model`` is a ``mocae run`` directory and ``system`` one
    of its systems.

    Raises:
        FileNotFoundError: not a model folder / run directory. ValueError: a system the server cannot decode.
    """
    from mocae.systems import RunSystems, load_system

    if system is not None:
        if system not in SERVABLE_SYSTEMS and not system.startswith("expert_"):
            raise ValueError(f"system {system!r} cannot be served (it decodes with a loop of its own or is not "
                             f"tested with the server); servable: {', '.join(SERVABLE_SYSTEMS)}, expert_<axis>")
        m, tokenizer = load_system(system, RunSystems.load(model))
        return ServedModel(m, tokenizer, model_id or system)
    m, tokenizer = load_system(model, backbone=backbone)
    default_id = "base" if model == "base" else (Path(model).resolve().name or "system")
    return ServedModel(m, tokenizer, model_id or default_id)


def run_server(model: str, cfg: ServeConfig, backbone: str | None = None, model_id: str | None = None,
               system: str | None = None) -> None:
    """Load ``model`` (or ``system`` of run directory ``model``) and serve it with uvicorn until interrupted."""
    import uvicorn

    served = load_served(model, backbone, model_id, system)
    served.warmup()
    print(f"serving {served.model_id!r} ({'axes ' + ', '.join(served.axes) if served.axes else 'no axes'}) on "
          f"http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(create_app(served, cfg), host=cfg.host, port=cfg.port, log_level="warning")
