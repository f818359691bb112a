"""The local web app: streaming chat with per-token SAE latents, steering, and latent search.

`POST /chat/completions` keeps nanochat's former chat_web contract: JSON {messages: [{role, content}],
temperature?, max_tokens?, top_k?, stream?: true}, streamed back as SSE lines `data: {"token": "...", "gpu": 0}`
and finally `data: {"done": true}`, with its input limits. Token events also carry "ids" and "latents" (one
[[latent, value], ...] list per id), and a request may add "steer" ([{latent, add | clamp | ablate}]),
"only_generated", "seed" and "top_n"; old clients ignore them. A field the server does not know is a 400 naming
it. A client that goes away frees its generation at once. Generations share one model and interleave token by
token: each step runs, in turn, under a lock with that request's own hooks, so steering never leaks between clients.
Also: `GET /` (the page), `/health`, `/stats`, `/api/info`, `/api/labels`, `/api/latents/{id}`,
`/api/search?q=` and `/dashboard/` (the `nanosae viz` output, when given).
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from .chat import TextStream
from .errors import NanosaeError
from .gpt import GPT
from .hooks import where
from .runtime import Steer, Tracker, generate_tracked, logit_effects, residual_directions
from .sae import SAE
from .tokenizer import Tokenizer

STATIC = Path(__file__).parent / "static"
# nanochat chat_web's limits
MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS = 500, 8000, 32000
MIN_TEMPERATURE, MAX_TEMPERATURE, MIN_TOP_K, MAX_TOP_K, MIN_MAX_TOKENS, MAX_MAX_TOKENS = 0.0, 2.0, 0, 200, 1, 4096
MAX_STEERS, MAX_TOP_N = 64, 64


# unknown fields are refused, not ignored: a typo ("max_token", "stear") would otherwise silently do nothing
class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class SteerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latent: int
    add: float | None = None
    clamp: float | None = None
    ablate: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message]
    temperature: float | None = None
    max_tokens: int | None = None
    top_k: int | None = None
    stream: bool | None = None  # chat_web's first page sent stream: true; it only ever streams
    seed: int | None = None
    steer: list[SteerIn] = []
    only_generated: bool = False
    top_n: int | None = None


def _field(loc: tuple) -> str:
    """('body', 'steer', 0, 'scale') -> 'steer[0].scale'."""
    out = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _unknown_fields(errors: list[dict]) -> str | None:
    """One line naming every unknown field and what its object may hold, or None when there is none."""
    unknown = [e["loc"] for e in errors if e.get("type") == "extra_forbidden"]
    if not unknown:
        return None
    names = ", ".join(_field(loc) for loc in unknown)
    parent = unknown[0][1] if len(unknown[0]) > 2 else None  # ('body', 'steer', 0, 'scale') -> 'steer'
    what, model = {"steer": ("a steer", SteerIn), "messages": ("a message", Message)}.get(
        parent, ("a request", ChatRequest)
    )
    return f"unknown field{'s' * (len(unknown) > 1)} {names}; {what} may hold {', '.join(model.model_fields)}"


def _bad(detail: str) -> HTTPException:
    return HTTPException(status_code=400, detail=detail)


def check_request(req: ChatRequest, d_sae: int) -> list[Steer]:
    """nanochat's chat_web checks, plus the steering's; returns the steers. Raises 400 with what to fix."""
    if req.stream is False:
        raise _bad("stream: this server only streams (server-sent events); leave stream out or set it true")
    if not req.messages:
        raise _bad("at least one message is required")
    if len(req.messages) > MAX_MESSAGES:
        raise _bad(f"too many messages: {len(req.messages)} (at most {MAX_MESSAGES})")
    total = 0
    for i, m in enumerate(req.messages):
        if m.role not in ("user", "assistant"):
            raise _bad(f"message {i}: role must be 'user' or 'assistant' (got {m.role!r})")
        if not m.content:
            raise _bad(f"message {i}: content is empty")
        if len(m.content) > MAX_MESSAGE_CHARS:
            raise _bad(f"message {i} is too long: {len(m.content)} characters (at most {MAX_MESSAGE_CHARS})")
        total += len(m.content)
    if total > MAX_TOTAL_CHARS:
        raise _bad(f"conversation too long: {total} characters (at most {MAX_TOTAL_CHARS} in all)")
    if req.temperature is not None and not MIN_TEMPERATURE <= req.temperature <= MAX_TEMPERATURE:
        raise _bad(f"temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE} (got {req.temperature})")
    if req.top_k is not None and not MIN_TOP_K <= req.top_k <= MAX_TOP_K:
        raise _bad(f"top_k must be between {MIN_TOP_K} and {MAX_TOP_K} (got {req.top_k})")
    if req.max_tokens is not None and not MIN_MAX_TOKENS <= req.max_tokens <= MAX_MAX_TOKENS:
        raise _bad(f"max_tokens must be between {MIN_MAX_TOKENS} and {MAX_MAX_TOKENS} (got {req.max_tokens})")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise _bad(f"seed must be between 0 and 2**63 - 1 (got {req.seed})")
    if req.top_n is not None and not 1 <= req.top_n <= MAX_TOP_N:
        raise _bad(f"top_n must be between 1 and {MAX_TOP_N} (got {req.top_n})")
    if len(req.steer) > MAX_STEERS:
        raise _bad(f"too many steers: {len(req.steer)} (at most {MAX_STEERS})")
    steers = []
    for s in req.steer:
        if not 0 <= s.latent < d_sae:
            raise _bad(f"steer: latent {s.latent} does not exist; this SAE has latents 0..{d_sae - 1}")
        given = [s.add is not None, s.clamp is not None, s.ablate]
        if sum(given) != 1:
            raise _bad(f"steer latent {s.latent}: give exactly one of add, clamp or ablate")
        value = s.add if s.add is not None else s.clamp
        if value is not None and (not math.isfinite(value) or abs(value) > 1e4):
            raise _bad(f"steer latent {s.latent}: the value must be a finite number within ±10000")
        steers.append(Steer.ablate(s.latent) if s.ablate else Steer(s.latent, add=s.add, clamp=s.clamp))
    return steers


def render_chat(tok: Tokenizer, messages: list[Message]) -> list[int]:
    """chat_web's rendering: <|bos|>, each message in its role's tokens, then <|assistant_start|>."""
    sp = tok.encode_special
    ids = [tok.bos_token_id]
    for m in messages:
        if m.role == "user":
            ids += [sp("<|user_start|>"), *tok.encode(m.content), sp("<|user_end|>")]
        else:
            ids += [sp("<|assistant_start|>"), *tok.encode(m.content), sp("<|assistant_end|>")]
    return ids + [sp("<|assistant_start|>")]


class TurnLock:
    """A lock granted in arrival order. threading.Lock lets the thread that just released it take it straight
    back, so one stream could run to its end while the others wait; taking turns makes them interleave."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = self._serving = 0  # the ticket handed out next, the ticket holding the lock

    def __enter__(self) -> TurnLock:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self._cond.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def locked(self) -> bool:
        with self._cond:
            return self._serving != self._next

    def waiting(self) -> int:
        """How many are queued behind the holder."""
        with self._cond:
            return max(0, self._next - self._serving - 1)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ServedModel:
    """The model, tokenizer and SAE the app serves, with the lock their steps share and the request counters."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        sae: SAE,
        units: torch.Tensor | None = None,
        labels: dict[int, str] | None = None,
        dashboard: str | Path | None = None,
        temperature: float = 0.8,
        top_k: int = 50,
        max_tokens: int = 512,
    ):
        self.site = where(model, sae)
        self.model, self.tok, self.sae = model, tokenizer, sae
        self.units, self.labels = units, labels or {}
        self.dashboard = Path(dashboard) if dashboard else None
        if self.dashboard and not self.dashboard.is_dir():
            raise NanosaeError(f"{self.dashboard}: no such dashboard folder; pass the --out folder of nanosae viz")
        self.defaults = {"temperature": temperature, "top_k": top_k, "max_tokens": max_tokens, "top_n": 8}
        self.lock = TurnLock()
        self.counts = {"requests": 0, "active": 0, "tokens": 0}
        self.count_lock = threading.Lock()
        self.vocab = [tokenizer.id_to_token(i) for i in range(model.config.vocab_size)]
        self.special = tokenizer.special_ids()
        with torch.no_grad():
            self.directions = residual_directions(model, sae)

    def info(self) -> dict:
        cfg = self.sae.cfg
        return {
            "model": getattr(getattr(self.model, "info", None), "name", "") or "model",
            "site": self.site,
            "architecture": cfg.architecture,
            "d_sae": cfg.d_sae,
            "k": cfg.k,
            "steer_unit": "max activation (feature statistics)" if self.units is not None else "activation norm",
            "dashboard": self.dashboard is not None,
            "labels": len(self.labels),
            "defaults": self.defaults,
        }

    def latent(self, i: int) -> dict:
        if not 0 <= i < self.sae.cfg.d_sae:
            raise HTTPException(404, f"latent {i} does not exist; this SAE has latents 0..{self.sae.cfg.d_sae - 1}")
        with torch.no_grad():
            effect = logit_effects(self.model, self.directions[i])
        top, bottom = effect.topk(10), effect.topk(10, largest=False)
        return {
            "id": i,
            "label": self.labels.get(i, ""),
            "unit": float(self.units[i]) if self.units is not None else None,
            "promoted": [[self.vocab[t], round(float(v), 4)] for v, t in zip(top.values, top.indices)],
            "suppressed": [[self.vocab[t], round(float(v), 4)] for v, t in zip(bottom.values, bottom.indices)],
            "dashboard": self.dashboard_link(i),
        }

    def dashboard_link(self, i: int) -> str | None:
        if self.dashboard is None:
            return None
        return f"/dashboard/index.html#/f/{i}"  # the viz page's route to latent i

    def search(self, q: str, n: int = 20) -> list[dict]:
        """Latents by id, by label (substring) and by token: those whose decoder direction most promotes a
        vocabulary token equal to the query (ignoring surrounding spaces)."""
        q = q.strip()
        out: dict[int, str] = {}
        if q.isdigit() and int(q) < self.sae.cfg.d_sae:
            out[int(q)] = "id"
        low = q.lower()
        for i, label in self.labels.items():
            if low and low in label.lower() and len(out) < n:
                out.setdefault(i, "label")
        tokens = [t for t, s in enumerate(self.vocab) if q and s.strip().lower() == low and t not in self.special]
        if tokens and len(out) < n:
            with torch.no_grad():
                W_U = self.model.lm_head.weight.detach()[tokens].to(self.directions.dtype)
                score = (self.directions @ W_U.T).max(dim=1).values
            for i in score.topk(min(n, len(score))).indices.tolist():
                if len(out) >= n:
                    break
                out.setdefault(i, f"promotes {self.vocab[tokens[0]]!r}")
        return [{"id": i, "label": self.labels.get(i, ""), "match": why} for i, why in out.items()]

    def prompt(self, req: ChatRequest) -> list[int]:
        tokens = render_chat(self.tok, req.messages)
        if len(tokens) >= self.model.cos.size(1):
            raise _bad(f"the conversation ({len(tokens)} tokens) does not fit the model's context; start a new one")
        return tokens

    def stream(self, tokens: list[int], req: ChatRequest, steers: list[Steer]) -> Iterator[str]:
        """SSE events for one request (run by the server's thread pool, one model step at a time)."""
        pick = self.defaults.get
        temperature = req.temperature if req.temperature is not None else pick("temperature")
        top_k = req.top_k if req.top_k is not None else pick("top_k")
        max_tokens = req.max_tokens if req.max_tokens is not None else pick("max_tokens")
        top_n = req.top_n or pick("top_n")
        seed = req.seed if req.seed is not None else random.randint(0, 2**31 - 1)
        room = self.model.cos.size(1) - len(tokens)
        tracker = Tracker(self.sae, top_n)
        gen = generate_tracked(
            self.model,
            self.sae,
            tokens,
            min(max_tokens, room),
            temperature,
            top_k or None,
            seed,
            self.tok.stop_token_ids(),
            steers,
            req.only_generated,
            self.units,
            tracker,
            self.lock,
        )
        with self.count_lock:
            self.counts["requests"] += 1
            self.counts["active"] += 1
        text, n = TextStream(self.tok), 0

        def event(piece: tuple[str, list]) -> str:
            recs = piece[1]
            return _sse(
                {
                    "token": piece[0],
                    "gpu": 0,
                    "ids": [t for t, _ in recs],
                    "latents": [[[i, round(v, 4)] for i, v in zip(r.ids, r.values)] for _, r in recs],
                }
            )

        try:
            for token, rec in gen:
                n += 1
                # assistant_end / bos end the reply and are not shown (chat_web)
                if token not in self.special and (piece := text.push(token, (token, rec))):
                    yield event(piece)
            if piece := text.flush():
                yield event(piece)
        except NanosaeError as e:
            yield _sse({"error": str(e)})
        finally:
            with self.count_lock:
                self.counts["active"] -= 1
                self.counts["tokens"] += n
        yield _sse({"done": True, "tokens": n, "seed": seed, "steer": [str(s) for s in steers]})


class EventStream(StreamingResponse):
    """Server-sent events from a generator that is closed the moment the response ends, also when the client
    went away mid-stream: its generation stops, its KV cache and hooks are freed and /stats stops counting it
    at once, rather than whenever the garbage collector reaches the abandoned generator."""

    def __init__(self, events: Generator[str, None, None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.events.close()  # not running: the thread pool's next() finishes before a cancel lands


def create_app(served: ServedModel) -> FastAPI:
    app = FastAPI(title="nanosae", docs_url=None, redoc_url=None)
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    started = time.time()

    @app.exception_handler(RequestValidationError)
    async def bad_json(request: Request, exc: RequestValidationError):
        # malformed bodies get one readable line, like the other 400s
        errors = list(exc.errors())
        if detail := _unknown_fields(errors):
            return JSONResponse(status_code=400, content={"detail": detail})
        first = errors[0] if errors else {}
        where = _field(tuple(first.get("loc", ())))
        return JSONResponse(status_code=400, content={"detail": f"bad request: {where or 'body'}: {first.get('msg')}"})

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.post("/chat/completions")
    def chat_completions(req: ChatRequest):
        steers = check_request(req, served.sae.cfg.d_sae)
        return EventStream(served.stream(served.prompt(req), req, steers))

    @app.get("/health")
    def health():
        return {"status": "ok", "ready": True, "num_gpus": 1, "available_workers": 1, **served.info()}

    @app.get("/stats")
    def stats():
        busy = 1 if served.lock.locked() else 0
        return {
            "total_workers": 1,
            "available_workers": 1 - busy,
            "busy_workers": busy,
            "workers": [{"gpu_id": 0, "device": str(served.model.device), "available": not busy}],
            "active_requests": served.counts["active"],
            "requests": served.counts["requests"],
            "tokens_generated": served.counts["tokens"],
            "uptime_s": round(time.time() - started, 1),
        }

    @app.get("/api/info")
    def info():
        return served.info()

    @app.get("/api/labels")
    def labels():
        return {str(i): label for i, label in served.labels.items()}

    @app.get("/api/latents/{i}")
    def latent(i: int):
        return served.latent(i)

    @app.get("/api/search")
    def search(q: str = ""):
        if len(q) > 200:
            raise _bad("search text too long (at most 200 characters)")
        return {"query": q, "results": served.search(q)}

    if served.dashboard is not None:
        from fastapi.staticfiles import StaticFiles

        app.mount("/dashboard", StaticFiles(directory=served.dashboard, html=True), name="dashboard")
    return app


def serve(served: ServedModel, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    print(f"nanosae serve: http://{host}:{port}/  ({served.info()['model']}, SAE at {served.site}); Ctrl-C to stop")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {host}, so other machines can reach this server; it has no authentication")
    uvicorn.run(create_app(served), host=host, port=port, log_level="warning")
