"""rm-serve's model side: one thread owns the model and forms batches across requests (Batcher), and the
counters behind GET /metrics (Metrics, Prometheus text format).

The event loop only parses and validates. Every request becomes a job on one queue; the model thread takes
the first job, then keeps taking jobs until max_wait_ms has passed since the first one arrived, the
pending sequences fill max_batch_tokens, or max_batch_requests jobs are in. It tokenizes them as training
did (data.tokenize.encode_item), scores them all in length-sorted token-budget batches
(model.score_sequences: the same code as score_texts and rm-score) and hands each request its own
results. Sequences that start with the same tokens share them (--share_prompt, data.segments: a request's
responses list, a GRPO group's full texts, queued requests with one prompt). A request alone in its batch gets
exactly score_texts' bits; batched with others, its scores agree to fp32 rounding (matmul blocking and
shared segments depend on the batch).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from rm_trainer.data.segments import ShareRule
from rm_trainer.data.tokenize import encode_item, special_prefix
from rm_trainer.model.scoring import score_with_attributes

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
        self.rows = self.forwards = self.batches = self.tokens = self.sequence_tokens = 0
        self.rows_per_forward = [0] * (len(BATCH_BUCKETS) + 1)
        self.forward_seconds = 0.0

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, code)] = self.requests.get((endpoint, code), 0) + 1
            self.latency.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)

    def forward(self, rows: int, seconds: float, tokens: int = 0, own: int | None = None) -> None:
        """A forward of `rows` sequences that computed `tokens` tokens (`own`: the sequences' own, where
        shared prompts made them differ)."""
        with self.lock:
            self.tokens += tokens
            self.sequence_tokens += tokens if own is None else own
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
                    ("rm_forward_tokens_total", "counter", "Tokens the forwards computed (each shared prompt "
                     "once).", self.tokens),
                    ("rm_sequence_tokens_total", "counter", "Tokens of the scored sequences.", self.sequence_tokens),
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
                 metrics: Metrics, share: ShareRule | None = None):
        self.model, self.max_batch_tokens, self.metrics, self.share = model, max_batch_tokens, metrics, share
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
        try:  # sequences that start with the same tokens share them, across the batch's requests
            rewards, attributes = score_with_attributes(self.model, seqs, self.max_batch_tokens,
                                                        on_forward=self.metrics.forward, share=self.share)
        except Exception as e:  # noqa: BLE001 - a bug: every waiting request gets a 500 with its traceback logged
            for j in jobs:
                _resolve(j, error=e)
            return
        with self.metrics.lock:
            self.metrics.batches += 1
        k = 0
        for j in jobs:  # (rewards, attributes or None) of the job's own texts
            n = len(j.seqs)
            _resolve(j, (rewards[k:k + n], attributes[k:k + n] if attributes is not None else None))
            k += n
