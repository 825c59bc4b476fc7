"""One optimizer step: its micro-batches go through forward, backward and step; its statistics stay on
the device, are all-reduced once, and reach the host only when a log line is written (no host sync on
the hot path).

Also here: the stop flag that preemption signals set, and the guard that counts (and, after too many in
a row, aborts on) non-finite steps.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch

from rm_trainer.objectives import Objective
from rm_trainer.train import engine

# A step's stats: the objective's sums (Objective.sums_width of them), then real tokens, token slots, the
# router loss sum and count, and the Davidson theta (if any).
LINE_KEYS = ("acc", "margin", "reward_mean", "reward_std", "tie_gap", "top1", "bt_loss")  # and every a/b


class StopFlag:
    """USR1/TERM only set a flag (saving inside a signal handler could interleave with a collective in
    flight). The flag rides on the step's all-reduce, so every rank sees any rank's signal at the same step."""

    def __init__(self) -> None:
        self.signals: list[str] = []

    def install(self) -> StopFlag:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: self.signals.append(signal.Signals(signum).name))
        return self

    def __bool__(self) -> bool:
        return bool(self.signals)


@dataclass
class StepOptions:
    """What every step of a run does the same way: the objective (its batches' loss), the device, the loss
    scale of packed micro-batches (None: each micro-batch's mean), whether this rank's statistics count
    (a sequence group's ranks after its first hold the same rewards), and the stop flag signals set."""

    objective: Objective
    device: torch.device
    loss_scale: float | None = None
    counts: bool = True
    stop: StopFlag | None = None


@dataclass
class StepRecord:
    """What one optimizer step did. `stats` is on the device, already summed over ranks: [the objective's
    sums, real tokens, token slots computed, router loss sum and count, Davidson theta]. `skipped` and
    `stop_votes` are host values: DeepSpeed's own skipped-step counter, and how many ranks were asked to
    stop."""

    step: int
    stats: torch.Tensor
    skipped: bool
    stop_votes: int
    lr: float
    started: float  # host clock when the step began (the logger times windows of steps from it)
    objective: Objective  # which sums the stats begin with

    @property
    def stop(self) -> bool:
        return self.stop_votes > 0

    def metrics(self, seconds: float, values: list[float] | None = None) -> dict[str, float | None]:
        """Per-pair means and throughput (`seconds`: the step's wall time). Moves the statistics to the
        host (unless `values` already holds them): a CPU-GPU sync point, so only when a line is logged."""
        v = self.stats.tolist() if values is None else values
        n = self.objective.sums_width  # where tokens, slots and aux follow the sums
        m = self.objective.metrics(torch.tensor(v[:n], dtype=torch.float64))
        finite = {k: (x if math.isfinite(x) else None) for k, x in m.items() if k in LINE_KEYS or "/" in k}
        # MoE: the router loss, a mean over micro-batches and ranks (absent: a dense backbone)
        aux = {"router_aux_loss": v[n + 2] / v[n + 3]} if len(v) > n + 3 and v[n + 3] else {}
        if len(v) > n + 4:  # --tie_loss davidson: the learned nu this step used
            aux["tie_nu"] = math.exp(v[n + 4])
        # sequences: what the step's forwards ran (all ranks), and rows (pairs, prompts) per second; tokens:
        # the real tokens the forwards computed (each shared prompt once)
        rates = self.objective.throughput(m, seconds)
        return {"loss": m["loss"], **finite, **aux, "lr": self.lr, **rates, "tokens": int(v[n]),
                "tokens_per_s": v[n] / seconds, "padding_efficiency": v[n] / v[n + 1]}


def train_step(eng, step: int, micro_batches: list, opts: StepOptions) -> StepRecord:
    """grad_accum micro-batches (the objective's typed batches) -> one optimizer update (DeepSpeed applies it
    at the last micro step). Nothing here waits for the GPU.

    opts.loss_scale None: each micro-batch's loss is its mean over its rows (equal-sized micro-batches).
    With packing they differ in size, so each contributes its loss *sum* x loss_scale = world x accum /
    global rows: after DeepSpeed's 1/accum and its average over ranks, the update minimises the mean over
    the global batch's rows, exactly as with equal micro-batches (reward centering, a per-pair term, is
    weighed the same way). opts.counts False: this rank's statistics are left out of the sum."""
    obj, device = opts.objective, opts.device
    started = time.perf_counter()
    lr = eng.lr()
    skipped_before = eng.skipped()
    sums = None
    aux_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (router aux loss, micro-batches with one)
    tokens = slots = 0
    for b in micro_batches:
        with eng.micro_step():  # --offload_activations: checkpointed layer inputs wait on the CPU
            out = b.seqs.run(eng, device)  # ONE forward: every sequence of the micro-batch (a pair's both sides)
            log_nu = eng.tie_log_nu()  # --tie_loss davidson: its learned theta, else None (the soft tie loss)
            loss, s = obj.loss(b, out, opts.loss_scale, log_nu)
            aux = eng.aux_loss()  # MoE: coef x the router's load-balancing loss of this forward
            if aux is not None:
                loss = loss + aux
                aux_sum += torch.stack([aux.detach().double(), aux_sum.new_ones(())])
            eng.backward(loss)  # scaled by 1/grad_accum and reduced across ranks
        # At the accumulation boundary this applies the update, unless the all-reduced gradient norm is
        # non-finite (a NaN loss anywhere makes it so): the engine then skips it on every rank together
        # (no weight or Adam change) and counts it (eng.skipped()).
        eng.step()
        sums = s if sums is None else sums + s  # on the device: no sync here
        tokens += b.seqs.tokens
        slots += b.seqs.slots
    stats = torch.cat([sums, torch.tensor([tokens, slots], dtype=torch.float64, device=device), aux_sum])
    if not opts.counts:
        stats.zero_()
    engine.all_reduce_sum(stats)  # one collective per step, queued on the device; read only by a log line
    if log_nu is not None:  # the same on every rank: not summed
        stats = torch.cat([stats, log_nu.detach().double().reshape(1)])
    # Stop votes travel as host integers (gloo), so every rank agrees on stopping at this step without
    # waiting for the GPU; a signal seen by any rank stops them all here.
    stop_votes = engine.host_sum(int(bool(opts.stop)))
    return StepRecord(step, stats, eng.skipped() > skipped_before, stop_votes, lr, started, obj)


class SkipGuard:
    """Counts steps whose loss or gradient norm was not finite (DeepSpeed already skipped their update
    on every rank) and aborts after max_consecutive of them in a row, naming the step and its pairs."""

    def __init__(self, max_consecutive: int, batch_indices) -> None:
        self.max_consecutive, self.batch_indices = max_consecutive, batch_indices
        self.total = self.in_a_row = 0

    def check(self, rec: StepRecord) -> None:
        self.total += rec.skipped
        self.in_a_row = self.in_a_row + 1 if rec.skipped else 0
        if self.in_a_row >= self.max_consecutive:
            raise RuntimeError(
                f"step {rec.step}: {self.in_a_row} consecutive steps with a non-finite loss or gradient norm; "
                f"the last global batch held training pairs {sorted(self.batch_indices(rec.step))}")
