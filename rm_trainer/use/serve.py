"""rm-serve: an HTTP reward server for RL loops (PPO, GRPO, best-of-n), with batching across requests.

    rm-serve --model OUT/reward.pt [--port 5000] [--max_wait_ms 5] [--api_key ... | RM_SERVE_API_KEY=...]
    # OpenRLHF: --remote_rm_url http://127.0.0.1:5000/get_reward

Endpoints:
  POST /get_reward  OpenRLHF's schema: {"query": [texts]} -> {"rewards": [...], "scores": [...]}. Extra keys
                    ("prompts", "labels") are accepted and ignored. A leading BOS and trailing EOS/pad written
                    out as text by the policy's decode are removed: the sequence gets them as training did.
  POST /score       {"rows": [...]}, each row as `rm-score` reads one: {"text"}, {"prompt", "response"},
                    {"prompt", "responses": [...]} (best-of-n) or {"messages": [...]} ->
                    {"results": [{"reward"} | {"rewards", "best_index"}]}
  An attribute head (--objective regression): the rewards are its combined reward, and each answer also
  has "attributes", {name: value} per text (a list of them for "responses").
  GET  /health      {"status": "ok", ...} (never needs the key)
  GET  /metrics     Prometheus text: requests by endpoint and code, rows, forwards, rows per forward,
                    latency quantiles, queue depth

aiohttp, not FastAPI + uvicorn: one dependency that is both the server and the client the tests and the
benchmark use; the body-size limit is a constructor argument (413 before the body is read); and the
request schema is small enough that pydantic models for it would add a layer, not safety.

Dynamic batching across requests: see batcher.py. This module is the HTTP side: parsing, limits, keys.

Safe by default: binds 127.0.0.1; with a key, every endpoint but /health needs `Authorization: Bearer`;
limits on texts per request, characters per text and body bytes give 4xx with a message; SIGTERM/SIGINT
stop accepting, let queued requests finish (--shutdown_timeout_s), then exit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rm_trainer.errors import DataError, UserError
from rm_trainer.use.rows import RowKeys, detect_row_format, row_items

if TYPE_CHECKING:  # the batcher loads torch and the model: only make_app needs it, so `--help` stays instant
    from rm_trainer.use.batcher import Batcher, Metrics

ENV_KEY = "RM_SERVE_API_KEY"
ROUTES = ("/get_reward", "/score", "/health", "/metrics")


@dataclass
class ServeOptions:
    """rm-serve's settings: where it listens, the key, how requests are batched, the limits."""

    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network
    port: int = 5000
    api_key: str | None = None  # or the RM_SERVE_API_KEY environment variable
    max_wait_ms: float = 5.0
    max_batch_tokens: int = 16384
    max_batch_requests: int = 1024
    max_texts: int = 1024
    max_chars: int = 200_000
    max_body_bytes: int = 64 << 20
    shutdown_timeout_s: float = 60.0
    share_prompt: str = "auto"  # responses to one prompt share it (model.sharing.scoring_rule); or on / off

    def key(self) -> str | None:
        return self.api_key or os.environ.get(ENV_KEY) or None


# ---------------------------------------------------------------- request parsing (4xx on bad input)
def _bad(status: int, message: str):
    from aiohttp import web

    cls = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 413: web.HTTPRequestEntityTooLarge,
           422: web.HTTPUnprocessableEntity}[status]
    kw = {"max_size": 0, "actual_size": 0} if status == 413 else {}
    if status == 401:
        kw["headers"] = {"WWW-Authenticate": "Bearer"}
    return cls(text=json.dumps({"error": message}), content_type="application/json", **kw)


def check_text(t, where: str, max_chars: int) -> str:
    if not isinstance(t, str):  # any text, the empty one included: a policy can emit it
        raise _bad(422, f"{where}: expected text, got {type(t).__name__}")
    if len(t) > max_chars:
        raise _bad(413, f"{where}: {len(t)} characters, over the limit of {max_chars} (--max_chars)")
    return t


def strip_special(text: str, tok) -> str:
    """Remove a leading BOS and trailing EOS/pad that a policy's decode wrote out as text."""
    bos = tok.bos_token if isinstance(tok.bos_token, str) else None
    ends = [t for t in (tok.eos_token, tok.pad_token) if isinstance(t, str) and t]
    if bos and text.startswith(bos):
        text = text[len(bos):]
    changed = True
    while changed:
        changed = False
        for t in ends:
            if text.endswith(t):
                text, changed = text[:-len(t)], True
    return text


def parse_rows(body, max_texts: int, max_chars: int) -> tuple[list, list[tuple[str, int]]]:
    """/score's rows -> (items, per row (format, n items)); 422 names rows[i].field."""
    rows = body.get("rows") if isinstance(body, dict) else None
    if not isinstance(rows, list) or not rows:
        raise _bad(422, 'body: expected {"rows": [...]} with at least one row')
    items, shape = [], []
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise _bad(422, f"{where}: expected an object")
        try:
            fmt = detect_row_format(list(row), RowKeys(), where)
            got = row_items(row, fmt, RowKeys(), where)
        except DataError as e:
            raise _bad(422, str(e)) from None
        for it in got:
            for part in ([it] if isinstance(it, str) else it if isinstance(it, tuple) else [m["content"] for m in it]):
                check_text(part, where, max_chars)
        items += got
        shape.append((fmt, len(got)))
        if len(items) > max_texts:
            raise _bad(413, f"{where}: more than {max_texts} sequences in one request (--max_texts)")
    return items, shape


# ---------------------------------------------------------------- the application
def _guard(metrics: Metrics, api_key: str | None):
    """Middleware: the bearer key (every endpoint but /health), and request counts and latency."""
    from aiohttp import web

    @web.middleware
    async def observe(request, handler):
        started, code = time.perf_counter(), 500
        try:
            if api_key and request.path != "/health":
                got = request.headers.get("Authorization", "")
                if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                    raise _bad(401, "missing or wrong key: send 'Authorization: Bearer <key>'")
            resp = await handler(request)
            code = resp.status
            return resp
        except web.HTTPException as e:
            code = e.status
            raise
        finally:
            metrics.request(request.path if request.path in ROUTES else "other", code, time.perf_counter() - started)

    return observe


async def _body(request, opts: ServeOptions):
    from aiohttp import web

    try:
        return await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise _bad(413, f"body: over the limit of {opts.max_body_bytes} bytes (--max_body_bytes)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(400, f"body: not valid JSON ({e})") from None


async def _answer(future):
    try:
        return await future
    except UserError as e:  # raised while tokenizing this request's items
        raise _bad(422, str(e)) from None


class _Handlers:
    """The four endpoints, over one model thread."""

    def __init__(self, model, batcher: Batcher, metrics: Metrics, opts: ServeOptions, name: str):
        self.model, self.batcher, self.metrics, self.opts, self.name = model, batcher, metrics, opts, name

    async def get_reward(self, request):
        from aiohttp import web

        body, opts = await _body(request, self.opts), self.opts
        texts = body.get("query") if isinstance(body, dict) else None
        if not isinstance(texts, list) or not texts:
            raise _bad(422, 'body: expected {"query": [text, ...]} with at least one text')
        if len(texts) > opts.max_texts:
            raise _bad(413, f"query: {len(texts)} texts, over the limit of {opts.max_texts} (--max_texts)")
        items = [strip_special(check_text(t, f"query[{i}]", opts.max_chars), self.model.tokenizer)
                 for i, t in enumerate(texts)]
        rewards, attributes = await _answer(self.batcher.submit(items))
        extra = {"attributes": attributes} if attributes is not None else {}  # an attribute head's, per text
        return web.json_response({"rewards": rewards, "scores": rewards} | extra)

    async def score(self, request):
        from aiohttp import web

        items, shape = parse_rows(await _body(request, self.opts), self.opts.max_texts, self.opts.max_chars)
        rewards, attributes = await _answer(self.batcher.submit(items))
        results, k = [], 0
        for fmt, n in shape:
            rs, attrs = rewards[k:k + n], attributes[k:k + n] if attributes is not None else None
            k += n
            results.append({"rewards": rs, "best_index": max(range(n), key=rs.__getitem__)}
                           if fmt == "responses" else {"reward": rs[0]})
            if attrs is not None:
                results[-1]["attributes"] = attrs if fmt == "responses" else attrs[0]
        return web.json_response({"results": results})

    async def health(self, _request):
        from aiohttp import web

        alive = self.batcher.thread.is_alive()
        return web.json_response({"status": "ok" if alive else "model thread stopped", "model": self.name,
                                  "queue_depth": self.batcher.queue.qsize()}, status=200 if alive else 503)

    async def prometheus(self, _request):
        from aiohttp import web

        return web.Response(text=self.metrics.render(self.batcher.queue.qsize()), content_type="text/plain",
                            charset="utf-8")


def make_app(model, opts: ServeOptions, name: str = ""):
    """The aiohttp application around a loaded model (name: what /health reports as the model)."""
    from aiohttp import web

    from rm_trainer.use.batcher import Batcher, Metrics

    metrics = Metrics()
    from rm_trainer.model.sharing import scoring_rule  # torch: not for rm-serve --help

    batcher = Batcher(model, opts.max_batch_tokens, opts.max_wait_ms, opts.max_batch_requests, metrics,
                      scoring_rule(model, opts.share_prompt))
    h = _Handlers(model, batcher, metrics, opts, name)

    async def drain(_app):  # on_cleanup: after aiohttp stopped accepting and let open requests finish
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop, opts.shutdown_timeout_s)

    app = web.Application(middlewares=[_guard(metrics, opts.key())], client_max_size=opts.max_body_bytes)
    app.add_routes([web.post("/get_reward", h.get_reward), web.post("/score", h.score), web.get("/health", h.health),
                    web.get("/metrics", h.prometheus)])
    app.on_cleanup.append(drain)
    app["metrics"], app["batcher"] = metrics, batcher
    return app


def serve(model, opts: ServeOptions, name: str = "") -> None:
    """Run the server until SIGTERM/SIGINT (then the queued requests are answered first)."""
    from aiohttp import web

    app = make_app(model, opts, name)
    print(json.dumps({"serving": name, "url": f"http://{opts.host}:{opts.port}", "auth": bool(opts.key())}),
          flush=True)
    web.run_app(app, host=opts.host, port=opts.port, shutdown_timeout=opts.shutdown_timeout_s, print=None,
                access_log=None)
