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
  GET  /health      {"status": "ok", ...} (never needs the key)
  GET  /metrics     Prometheus text: requests by endpoint and code, rows, forwards, rows per forward,
                    latency quantiles, queue depth

aiohttp, not FastAPI + uvicorn: one dependency that is both the server and the client the tests and the
benchmark use; the body-size limit is a constructor argument (413 before the body is read); and the
request schema is small enough that pydantic models for it would add a layer, not safety.

Dynamic batching: the event loop only parses and validates. Every request becomes a job on one queue; a
single model thread takes the first job, then keeps taking jobs until --max_wait_ms has passed since the
first one arrived, the pending sequences fill --max_batch_tokens, or --max_batch_requests jobs are in.
It tokenizes them as training did (data.encode_item), scores them all in length-sorted token-budget
batches (scoring.score_sequences: the same code as score_texts and rm-score) and hands each request its
own results. A request alone in its batch gets exactly score_texts' bits; batched with others, its
scores agree to fp32 rounding (matmul blocking depends on batch shape).

Safe by default: binds 127.0.0.1; with a key, every endpoint but /health needs `Authorization: Bearer`;
limits on texts per request, characters per text and body bytes give 4xx with a message; SIGTERM/SIGINT
stop accepting, let queued requests finish (--shutdown_timeout_s), then exit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from rm_trainer.errors import DataError, UserError
from rm_trainer.scoring import Keys, detect_format, row_items, score_sequences

ENV_KEY = "RM_SERVE_API_KEY"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
QUANTILES = (0.5, 0.9, 0.99)


# ---------------------------------------------------------------- metrics (Prometheus text format)
class Metrics:
    """Counters the model thread and the event loop both update (under one lock)."""

    def __init__(self, window: int = 4096):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, deque] = {}
        self.window = window
        self.rows = self.forwards = self.batches = 0
        self.rows_per_forward = [0] * (len(BATCH_BUCKETS) + 1)
        self.forward_seconds = 0.0

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, code)] = self.requests.get((endpoint, code), 0) + 1
            self.latency.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)

    def forward(self, rows: int, seconds: float) -> None:
        with self.lock:
            self.rows += rows
            self.forwards += 1
            self.forward_seconds += seconds
            self.rows_per_forward[next((i for i, b in enumerate(BATCH_BUCKETS) if rows <= b), -1)] += 1

    def render(self, queue_depth: int) -> str:
        with self.lock:
            out = ["# HELP rm_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE rm_requests_total counter"]
            out += [f'rm_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                    for (e, c), n in sorted(self.requests.items())]
            out += ["# HELP rm_request_latency_seconds Request latency over the last requests, by endpoint.",
                    "# TYPE rm_request_latency_seconds summary"]
            for e, window in sorted(self.latency.items()):
                xs = sorted(window)
                for q in QUANTILES:
                    out.append(f'rm_request_latency_seconds{{endpoint="{e}",quantile="{q}"}} '
                               f'{xs[min(len(xs) - 1, int(q * len(xs)))]:.6f}')
                out += [f'rm_request_latency_seconds_count{{endpoint="{e}"}} {len(xs)}',
                        f'rm_request_latency_seconds_sum{{endpoint="{e}"}} {sum(xs):.6f}']
            for name, kind, what, value in (
                    ("rm_rows_total", "counter", "Sequences scored.", self.rows),
                    ("rm_forwards_total", "counter", "Model forwards.", self.forwards),
                    ("rm_batches_total", "counter", "Batches formed from queued requests.", self.batches),
                    ("rm_forward_seconds_total", "counter", "Time in model forwards.", self.forward_seconds),
                    ("rm_queue_depth", "gauge", "Requests waiting for the model thread.", queue_depth)):
                out += [f"# HELP {name} {what}", f"# TYPE {name} {kind}", f"{name} {value}"]
            out += ["# HELP rm_rows_per_forward Sequences per model forward.", "# TYPE rm_rows_per_forward histogram"]
            cum = 0
            for b, n in zip(BATCH_BUCKETS + ("+Inf",), self.rows_per_forward, strict=True):
                cum += n
                out.append(f'rm_rows_per_forward_bucket{{le="{b}"}} {cum}')
            out += [f"rm_rows_per_forward_count {self.forwards}", f"rm_rows_per_forward_sum {self.rows}"]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the model thread
@dataclass
class Job:
    items: list
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    seqs: list[list[int]] = field(default_factory=list)


def _resolve(job: Job, result=None, error: BaseException | None = None) -> None:
    def done():
        if not job.future.done():  # the client may have gone away
            job.future.set_exception(error) if error is not None else job.future.set_result(result)
    job.loop.call_soon_threadsafe(done)


class Batcher:
    """One thread owns the model. It forms batches across requests and answers each job's future."""

    def __init__(self, model, max_batch_tokens: int, max_wait_ms: float, max_batch_requests: int,
                 metrics: Metrics):
        from rm_trainer.data import special_prefix

        self.model, self.max_batch_tokens, self.metrics = model, max_batch_tokens, metrics
        self.max_wait, self.max_batch_requests = max_wait_ms / 1000.0, max_batch_requests
        self.prefix = special_prefix(model.tokenizer)
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="rm-serve-model", daemon=True)
        self.thread.start()

    def submit(self, items: list) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = Job(items, loop, loop.create_future())
        self.queue.put(job)
        return job.future

    def stop(self, timeout: float) -> None:
        """After the jobs already queued (FIFO) are answered."""
        self.queue.put(None)
        self.thread.join(timeout)

    def _encode(self, job: Job) -> int:
        from rm_trainer.data import encode_item

        try:
            job.seqs = [encode_item(self.model.tokenizer, it, self.model.max_len, self.prefix) for it in job.items]
        except Exception as e:  # noqa: BLE001 - only this request fails: a UserError is its 422, a bug its 500
            _resolve(job, error=e)
            job.seqs = []
            return 0
        return sum(len(s) for s in job.seqs)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self.queue.get()
            if first is None:
                return
            jobs, tokens = [first], self._encode(first)
            deadline = first.arrived + self.max_wait
            while len(jobs) < self.max_batch_requests and tokens < self.max_batch_tokens:
                wait = deadline - time.monotonic()
                try:
                    nxt = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                jobs.append(nxt)
                tokens += self._encode(nxt)
            self._run([j for j in jobs if j.seqs])

    def _run(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        seqs = [s for j in jobs for s in j.seqs]
        try:
            rewards = score_sequences(self.model, seqs, self.max_batch_tokens, on_forward=self.metrics.forward)
        except Exception as e:  # noqa: BLE001 - a bug: every waiting request gets a 500 with its traceback logged
            for j in jobs:
                _resolve(j, error=e)
            return
        with self.metrics.lock:
            self.metrics.batches += 1
        out, k = rewards.tolist(), 0
        for j in jobs:
            _resolve(j, out[k:k + len(j.seqs)])
            k += len(j.seqs)


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
    if not isinstance(t, str) or not t.strip():
        raise _bad(422, f"{where}: expected non-empty text, got {type(t).__name__}")
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
            fmt = detect_format(list(row), Keys(), where)
            got = row_items(row, fmt, Keys(), where)
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
def make_app(model, args):
    from aiohttp import web

    metrics = Metrics()
    batcher = Batcher(model, args.max_batch_tokens, args.max_wait_ms, args.max_batch_requests, metrics)
    api_key = args.api_key or os.environ.get(ENV_KEY) or None

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

    async def body_of(request):
        try:
            return await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise _bad(413, f"body: over the limit of {args.max_body_bytes} bytes (--max_body_bytes)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(400, f"body: not valid JSON ({e})") from None

    async def answer(future):
        try:
            return await future
        except UserError as e:  # raised while tokenizing this request's items
            raise _bad(422, str(e)) from None

    async def get_reward(request):
        body = await body_of(request)
        texts = body.get("query") if isinstance(body, dict) else None
        if not isinstance(texts, list) or not texts:
            raise _bad(422, 'body: expected {"query": [text, ...]} with at least one text')
        if len(texts) > args.max_texts:
            raise _bad(413, f"query: {len(texts)} texts, over the limit of {args.max_texts} (--max_texts)")
        items = [strip_special(check_text(t, f"query[{i}]", args.max_chars), model.tokenizer)
                 for i, t in enumerate(texts)]
        rewards = await answer(batcher.submit(items))
        return web.json_response({"rewards": rewards, "scores": rewards})

    async def score(request):
        items, shape = parse_rows(await body_of(request), args.max_texts, args.max_chars)
        rewards = await answer(batcher.submit(items))
        results, k = [], 0
        for fmt, n in shape:
            rs = rewards[k:k + n]
            k += n
            results.append({"rewards": rs, "best_index": max(range(n), key=rs.__getitem__)}
                           if fmt == "responses" else {"reward": rs[0]})
        return web.json_response({"results": results})

    async def health(_request):
        return web.json_response({"status": "ok" if batcher.thread.is_alive() else "model thread stopped",
                                  "model": str(args.model), "queue_depth": batcher.queue.qsize()},
                                 status=200 if batcher.thread.is_alive() else 503)

    async def prometheus(_request):
        return web.Response(text=metrics.render(batcher.queue.qsize()), content_type="text/plain", charset="utf-8")

    async def drain(_app):  # on_cleanup: after aiohttp stopped accepting and let open requests finish
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop, args.shutdown_timeout_s)

    ROUTES = {"/get_reward", "/score", "/health", "/metrics"}
    app = web.Application(middlewares=[observe], client_max_size=args.max_body_bytes)
    app.add_routes([web.post("/get_reward", get_reward), web.post("/score", score), web.get("/health", health),
                    web.get("/metrics", prometheus)])
    app.on_cleanup.append(drain)
    app["metrics"], app["batcher"] = metrics, batcher
    return app


def parser():
    from rm_trainer.cli_surface import Parser

    p = Parser(prog="rm-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="reward.pt or the hf/ folder of a run")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=5000, help="TCP port")
    p.add_argument("--api_key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {ENV_KEY})")
    p.add_argument("--max_wait_ms", type=float, default=5.0,
                   help="how long the first queued request waits for others to share its batch (0: no wait)")
    p.add_argument("--max_batch_tokens", type=int, default=16384, help="padded tokens per forward")
    p.add_argument("--max_batch_requests", type=int, default=1024,
                   help="requests merged into one batch (1 turns batching across requests off)")
    p.add_argument("--max_texts", type=int, default=1024, help="sequences per request")
    p.add_argument("--max_chars", type=int, default=200_000, help="characters per text")
    p.add_argument("--max_body_bytes", type=int, default=64 << 20, help="request body size")
    p.add_argument("--normalize", action="store_true", help="(r - mean) / std with the held-out statistics")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--shutdown_timeout_s", type=float, default=60.0, help="time to finish queued requests on exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from aiohttp import web
    except ImportError:
        print("rm-serve: error: needs aiohttp: pip install 'rm_trainer[serve]'", file=sys.stderr)
        return 2
    from rm_trainer.artifact import load_reward_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_reward_model(args.model, device=device, normalize=args.normalize)
    except UserError as e:
        print(f"rm-serve: error: {e}", file=sys.stderr, flush=True)
        return 2
    app = make_app(model, args)
    print(json.dumps({"serving": args.model, "url": f"http://{args.host}:{args.port}",
                      "auth": bool(args.api_key or os.environ.get(ENV_KEY))}), flush=True)
    web.run_app(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout_s, print=None,
                access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
