"""`onebit serve`: an OpenAI-compatible HTTP layer (FastAPI) over a BatchEngine.

Routes only translate: JSON/SSE in and out, the engine (one thread stepping every active
sequence) does the work. Each request's TokenEvents reach its handler through an asyncio queue
(``loop.call_soon_threadsafe`` from the engine thread); a client that disconnects cancels its
engine requests at once (the slot is free at the next step).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.batch import BatchEngine, EngineBusy, PromptTooLong, SamplingParams, TokenEvent
from ..streaming import TextStream
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       error_body)

__all__ = ["create_app", "ApiError"]

PAGE = Path(__file__).with_name("chat.html")


class ApiError(Exception):
    """An HTTP error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


@dataclass
class _Counters:
    http: dict = field(default_factory=dict)        # (route, status) -> count
    started: float = field(default_factory=time.time)


def _err(status: int, message: str, type_="invalid_request_error", param=None, code=None,
         headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: reads a request's body first (413 past ``limit`` bytes, declared or
    streamed), then replays it to the app; counts responses by route and status."""

    def __init__(self, app, limit: int, counts: dict):
        self.app, self.limit, self.counts = app, limit, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                key = (scope["path"] if scope["path"] in _ROUTES else "other", msg["status"])
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(msg)

        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(scope, receive, send_counted)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(scope, receive, send_counted)
            more = msg.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send_counted)

    async def _reject(self, scope, receive, send):
        await _err(413, f"the request body is over {self.limit} bytes: send a smaller one")(scope, receive, send)


def create_app(engine: BatchEngine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app over a started-or-not ``engine`` (started and closed with the app)."""
    model = engine.model
    counters = _Counters()

    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="onebit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), api_key.encode())):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")

    app.add_middleware(_Guard, limit=max_body_bytes, counts=counters.http)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _err(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, loc = "the request body is not valid JSON", None
        return _err(400, f"{loc}: {msg}" if loc else msg, param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _err(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                    headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):  # the server boundary: answer, never die
        return _err(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(400, f"model {name!r} is not served here: use {model_name!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    # -- routes --------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        if not engine.running:
            return _err(503, "the engine thread is not running", "server_error")
        return {"status": "ok", "slots": engine.slots, "active": engine.active,
                "queue_depth": engine.queue_depth}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": int(counters.started), "owned_by": "onebit",
                                            "max_model_len": engine.max_len}]}

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def metrics():
        from .metrics import render

        body, ctype = render(engine, counters.http)
        return Response(body, media_type=ctype)

    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        tok = _tokenizer(model)
        if req.messages is not None:
            ids = model.chat_ids([{"role": m.role, "content": m.text()} for m in req.messages])
        else:
            text = req.prompt if req.prompt is not None else req.content
            if text is None:
                raise ApiError(400, "send 'prompt' (or 'content', or 'messages') to tokenize", param="prompt")
            ids = model.encode(text, add_bos=req.add_special_tokens) if tok else []
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}

    @app.get("/tokenizer_info", dependencies=[Depends(auth)])
    async def tokenizer_info():
        """vLLM's endpoint: lm-eval's ``local-completions`` finds it (with /tokenize) and tokenizes
        through the server, so no local copy of the tokenizer is needed."""
        tok = _tokenizer(model)
        n = tok.get_vocab_size(with_added_tokens=True)
        name = lambda i: tok.id_to_token(i) if isinstance(i, int) and 0 <= i < n else None  # noqa: E731
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(model.bos_id),
                "eos_token": name(model.eos_id), "pad_token": None, "unk_token": None,
                "add_bos_token": model.bos_convention.add_bos, "model_max_length": engine.max_len,
                "vocab_size": engine.vocab_size, "chat_template": model.chat_template}

    @app.post("/detokenize", dependencies=[Depends(auth)])
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        _tokenizer(model)
        _check_ids(req.tokens, engine.vocab_size, "tokens")
        text = model.decode(req.tokens)
        return {"prompt": text, "content": text}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        _tokenizer(model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = model.chat_ids(messages)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        n_top = (req.top_logprobs or 0) if req.logprobs else None
        params, stops = _params(req, max_tokens, ids, engine, n_top, None)
        job = _Job(engine, model, [ids], [params], stops, request)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        await job.start()
        if req.stream:
            return _sse(_chat_stream(job, rid, created, model_name, req.logprobs))
        ch = await job.collect()
        c = ch[0]
        body = {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "logprobs": {"content": [_chat_lp(model, e) for e in c.lps]} if req.logprobs else None,
                             "finish_reason": c.finish}],
                "usage": job.usage()}
        return body

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if any(isinstance(p, str) for p in prompts):
            _tokenizer(model)
        ids_list = [model.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids in ids_list:
            _check_ids(ids, engine.vocab_size, "prompt")
        if model.tokenizer is None and req.stop and any(isinstance(s, str) for s in req.stop):
            raise ApiError(400, "this model has no tokenizer: stop strings cannot be matched; "
                                "send stop token ids", param="stop")
        params, stops = [], None
        for ids in ids_list:
            p, stops = _params(req, req.max_tokens, ids, engine, req.logprobs,
                               req.logprobs if req.echo else None)
            params.append(p)
        job = _Job(engine, model, ids_list, params, stops, request)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo_text = [p if isinstance(p, str) else (model.decode(p) if model.tokenizer else "")
                     for p in prompts] if req.echo else None
        await job.start()
        if req.stream:
            return _sse(_completion_stream(job, rid, created, model_name, req, echo_text))
        chs = await job.collect()
        choices = []
        for i, c in enumerate(chs):
            text = (echo_text[i] if req.echo else "") + c.text
            lp = _completion_lp(model, c, req.echo, echo_text[i] if req.echo else "") \
                if req.logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": job.usage()}

    return app


_ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
           "/tokenize", "/detokenize", "/tokenizer_info"}


def _tokenizer(model):
    if model.tokenizer is None:
        raise ApiError(400, f"the model '{model.runtime.folder}' has no tokenizer.json: send token "
                            f"ids to /v1/completions, or add the tokenizer to the folder")
    return model.tokenizer


def _check_ids(ids, vocab: int, param: str) -> None:
    if any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"token ids must be in [0, {vocab})", param=param)


def _params(req, max_tokens, ids, engine: BatchEngine, logprobs, prompt_logprobs):
    room = engine.max_len - len(ids)
    if max_tokens is None:
        max_tokens = max(room, 0)
    if room < (1 if max_tokens > 0 else 0):
        raise ApiError(400, f"the prompt has {len(ids)} tokens but the context holds {engine.max_len}: "
                            f"shorten it (or serve with a larger --ctx)", param="messages"
                       if isinstance(req, ChatCompletionRequest) else "prompt", code="context_length_exceeded")
    stop = req.stop or []
    try:
        p = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                           top_p=req.top_p, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                           seed=req.seed, stop_ids=frozenset(s for s in stop if isinstance(s, int)),
                           ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return p, [s for s in stop if isinstance(s, str)]


@dataclass
class _ChoiceState:
    stream: TextStream | None
    text: str = ""
    lps: list = field(default_factory=list)          # TokenEvents with logprobs
    tokens: int = 0
    finish: str | None = None
    prompt_lp: list | None = None


class _Job:
    """The engine requests of one HTTP request, their events on an asyncio queue."""

    def __init__(self, engine: BatchEngine, model, ids_list, params, stops, request: Request):
        self.engine, self.model, self.ids_list, self.params = engine, model, ids_list, params
        self.request = request
        self.q: asyncio.Queue = asyncio.Queue()
        self.reqs = []
        tok = model.tokenizer
        self.choices = [_ChoiceState(TextStream(tok, stops) if tok is not None else None) for _ in ids_list]
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for i, (ids, p) in enumerate(zip(self.ids_list, self.params)):
                sink = (lambda ev, i=i: loop.call_soon_threadsafe(self.q.put_nowait, (i, ev)))
                self.reqs.append(self.engine.submit(ids, p, sink=sink))
        except EngineBusy as e:
            self.cancel()
            raise ApiError(503, str(e), "server_error", code="overloaded", headers={"Retry-After": "1"}) from None
        except PromptTooLong as e:
            self.cancel()
            raise ApiError(400, str(e), code="context_length_exceeded") from None
        except ValueError as e:
            self.cancel()
            raise ApiError(400, str(e)) from None
        self._watch = asyncio.create_task(self._disconnect())

    async def _disconnect(self) -> None:
        while True:
            msg = await self.request.receive()
            if msg["type"] == "http.disconnect":
                self.cancel()
                self.q.put_nowait((-1, None))
                return

    def cancel(self) -> None:
        for r in self.reqs:
            if r.finish_reason is None:
                r.cancel()

    def close(self) -> None:
        self.cancel()
        if self._watch is not None:
            self._watch.cancel()

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | None, str]]:
        """(choice, event, new text) until every choice has finished; a stop string cancels its
        engine request and ends the choice with finish_reason "stop"."""
        open_ = len(self.choices)
        try:
            while open_:
                i, ev = await self.q.get()
                if i < 0:
                    return  # the client went away
                c = self.choices[i]
                if c.finish is not None:
                    continue
                if ev.prompt_logprobs is not None:
                    c.prompt_lp = ev.prompt_logprobs
                if ev.finish_reason is not None:
                    if ev.finish_reason == "error":
                        raise ApiError(500, f"the engine failed: {ev.error}", "server_error")
                    c.finish = "stop" if ev.finish_reason == "stop" else "length"
                    tail = c.stream.finish() if c.stream is not None else ""
                    c.text += tail
                    open_ -= 1
                    yield i, ev, tail
                    continue
                c.tokens += 1
                piece, stopped = c.stream.push(ev.token) if c.stream is not None else ("", False)
                c.text += piece
                if ev.logprob is not None:
                    c.lps.append(ev)
                if stopped:
                    self.reqs[i].cancel()
                    c.finish = "stop"
                    open_ -= 1
                    yield i, TokenEvent(ev.request_id, ev.token, ev.logprob, ev.top_logprobs,
                                        finish_reason="stop"), piece
                    continue
                yield i, ev, piece
        finally:
            self.close()

    async def collect(self) -> list[_ChoiceState]:
        async for _ in self.events():
            pass
        return self.choices

    def usage(self) -> dict:
        p = sum(len(ids) for ids in self.ids_list)
        c = sum(ch.tokens for ch in self.choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _piece(model, token: int) -> str:
    return model.decode([token]) if model.tokenizer is not None else str(token)


def _chat_lp(model, ev: TokenEvent) -> dict:
    s = _piece(model, ev.token)
    return {"token": s, "logprob": ev.logprob, "bytes": list(s.encode("utf-8")),
            "top_logprobs": [{"token": (t := _piece(model, i)), "logprob": lp, "bytes": list(t.encode("utf-8"))}
                             for i, lp in (ev.top_logprobs or ())]}


def _completion_lp(model, c: _ChoiceState, echo: bool, echo_text: str) -> dict:
    tokens, lps, tops, offs = [], [], [], []
    pos = 0
    entries = []
    if echo and c.prompt_lp is not None:
        entries += [(t, lp, top) for t, lp, top in c.prompt_lp]
    entries += [(e.token, e.logprob, e.top_logprobs) for e in c.lps]
    for j, (t, lp, top) in enumerate(entries):
        s = _piece(model, t)
        tokens.append(s)
        lps.append(lp)
        tops.append(None if lp is None else {_piece(model, i): v for i, v in top})
        offs.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


async def _chat_stream(job: _Job, rid: str, created: int, name: str, want_lp: bool):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
    yield _data({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}]})
    try:
        async for i, ev, piece in job.events():
            lp = {"content": [_chat_lp(job.model, ev)]} if want_lp and ev.token is not None and ev.logprob is not None else None
            if piece or lp:
                yield _data({**base, "choices": [{"index": i, "delta": {"content": piece},
                                                  "logprobs": lp, "finish_reason": None}]})
            if ev.finish_reason is not None:
                yield _data({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                  "finish_reason": job.choices[i].finish}]})
    except ApiError as e:
        yield _data(error_body(e.message, e.type, e.param, e.code))
    yield _data({**base, "choices": [], "usage": job.usage()})
    yield b"data: [DONE]\n\n"


async def _completion_stream(job: _Job, rid: str, created: int, name: str, req, echo_text):
    base = {"id": rid, "object": "text_completion", "created": created, "model": name}
    echoed = set()
    try:
        async for i, ev, piece in job.events():
            c = job.choices[i]
            lp = None
            if req.logprobs is not None:
                entries = []
                if req.echo and i not in echoed and c.prompt_lp is not None:
                    entries += c.prompt_lp
                if ev.token is not None and ev.logprob is not None:
                    entries.append((ev.token, ev.logprob, ev.top_logprobs))
                if entries:
                    lp = {"tokens": [_piece(job.model, t) for t, _, _ in entries],
                          "token_logprobs": [v for _, v, _ in entries],
                          "top_logprobs": [None if v is None else {_piece(job.model, k): x for k, x in top}
                                           for _, v, top in entries],
                          "text_offset": []}
            if req.echo and i not in echoed:
                piece = echo_text[i] + piece
                echoed.add(i)
            if piece or lp or ev.finish_reason is not None:
                yield _data({**base, "choices": [{"index": i, "text": piece, "logprobs": lp,
                                                  "finish_reason": c.finish if ev.finish_reason else None}]})
    except ApiError as e:
        yield _data(error_body(e.message, e.type, e.param, e.code))
    yield _data({**base, "choices": [], "usage": job.usage()})
    yield b"data: [DONE]\n\n"
