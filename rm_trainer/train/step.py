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

from rm_trainer.attributes import combine, fused_regression_loss, regression_loss, regression_sums
from rm_trainer.data.batching import token_slots
from rm_trainer.loss import N_SUMS, bradley_terry_loss, fused_bradley_terry, pair_sums
from rm_trainer.objectives import Objective, fused_ranking_loss, ranking_sums
from rm_trainer.train import engine

# after the pair sums in a step's stats: tokens, slots, router loss sum and count, Davidson theta (if any);
# a ranking or regression step's follow its own sums the same way (objectives.Objective.sums_width)
TOKENS, SLOTS = N_SUMS, N_SUMS + 1


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


def score_batch(eng, b: dict, device: torch.device) -> torch.Tensor:
    """Rewards (2B,) = [chosen; rejected] from ONE forward: both halves share every ZeRO-3 weight
    gather and kernel launch. Padded batches (data.batching.collate) or packed ones (data.batching.pack).
    A ranking batch (data.rankings.collate_rankings): (S,), each of its S responses once. A rating batch
    (data.ratings.collate_ratings): (N, K), each row's K attributes."""
    if "position_ids" in b:
        return eng(b["input_ids"].to(device), None, b["position_ids"].to(device), b["last"].to(device))
    if "lens" in b:
        return eng(b["input_ids"].to(device), b["lens"].to(device))
    ids = torch.cat([b["chosen_ids"], b["rejected_ids"]]).to(device)
    lens = torch.cat([b["chosen_len"], b["rejected_len"]]).to(device)
    return eng(ids, lens)


def loss_fn(rewards: torch.Tensor, fused: bool, margin: torch.Tensor | None = None,
            scale: float | None = None, center: float = 0.0, tie: torch.Tensor | None = None,
            log_nu: torch.Tensor | None = None) -> torch.Tensor:
    if fused:
        return fused_bradley_terry(rewards, margin, scale, center, tie, log_nu)[0]
    B = rewards.shape[0] // 2
    return bradley_terry_loss(rewards[:B], rewards[B:], margin, scale, center, tie, log_nu)


def batch_loss(b: dict, rewards: torch.Tensor, device: torch.device, fused: bool, scale: float | None,
               center: float, log_nu: torch.Tensor | None, objective: Objective
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, its statistics' sums on the device) of one micro-batch: the BT loss of its pairs, or (a
    ranking batch, --objective ranking) the ranking loss over each prompt's responses, or (a rating batch,
    --objective regression) the masked, weighted MSE of each row's attributes."""
    if "group" in b and "targets" in b:
        return mixed_loss(b, rewards, device, scale, objective)
    if "group" in b:
        group, scores, G = b["group"].to(device), b["scores"].to(device), int(b["prompts"])
        loss = fused_ranking_loss(rewards, group, scores, G, objective.ranking_loss, scale)
        return loss, ranking_sums(rewards, group, scores, G, objective.ranking_loss)
    if "targets" in b:
        targets, weights = b["targets"].to(device), objective.weights(device)
        loss = (fused_regression_loss if fused else regression_loss)(rewards, targets, None, weights, scale)
        return loss, regression_sums(rewards, targets, weights)
    margin = b["margin"].to(device) if "margin" in b else None
    tie = b["tie"].to(device) if "tie" in b else None  # --tie_key: tied pairs take the tie loss
    loss = loss_fn(rewards, fused=fused, margin=margin, scale=scale, center=center, tie=tie, log_nu=log_nu)
    B = b["chosen_len"].shape[0]
    return loss, pair_sums(rewards[:B], rewards[B:], tie=tie, log_nu=log_nu)


def mixed_loss(b: dict, preds: torch.Tensor, device: torch.device, scale: float | None, objective: Objective
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """--objective bt+regression: a batch of pair rows (two sequences, scores [1, 0]) and rated rows (one
    sequence, its K targets). Each row counts once: a pair adds bt_weight x BT of its combined rewards, a
    rated row its MSE, and the batch loss is their mean over the G rows (or their sum x scale)."""
    group, scores, G = b["group"].to(device), b["scores"].to(device), int(b["prompts"])
    targets, weights = b["targets"].to(device), objective.weights(device)
    rewards = combine(preds, torch.tensor(objective.combination, device=device))  # (S,): what BT compares
    row_scale = 1 / max(G, 1) if scale is None else scale
    loss = (objective.bt_weight * fused_ranking_loss(rewards, group, scores, G, "pairs", scale)
            + fused_regression_loss(preds, targets, None, weights, row_scale))
    return loss, torch.cat([ranking_sums(rewards, group, scores, G, "pairs"), regression_sums(preds, targets, weights)])


def batch_tokens(b: dict) -> int:
    """Real tokens of a batch (host tensors from collate)."""
    return int(b["lens"].sum()) if "lens" in b else int(b["chosen_len"].sum() + b["rejected_len"].sum())


@dataclass
class StepRecord:
    """What one optimizer step did. `stats` is on the device, already summed over ranks:
    [pair sums (see loss.SUM_FIELDS), real tokens, token slots computed]. `skipped` and `stop_votes` are
    host values: DeepSpeed's own skipped-step counter, and how many ranks were asked to stop."""

    step: int
    stats: torch.Tensor
    skipped: bool
    stop_votes: int
    lr: float
    started: float  # host clock when the step began (the logger times windows of steps from it)
    objective: Objective = Objective()  # which sums the stats begin with

    @property
    def stop(self) -> bool:
        return self.stop_votes > 0

    def metrics(self, seconds: float, values: list[float] | None = None) -> dict[str, float | None]:
        """Per-pair means and throughput (`seconds`: the step's wall time). Moves the statistics to the
        host (unless `values` already holds them): a CPU-GPU sync point, so only when a line is logged."""
        v = self.stats.tolist() if values is None else values
        n = self.objective.sums_width()  # where tokens, slots and aux follow the sums
        m = self.objective.metrics(torch.tensor(v[:n], dtype=torch.float64))
        finite = {k: (x if math.isfinite(x) else None) for k, x in m.items()
                  if k in ("acc", "margin", "reward_mean", "reward_std", "tie_gap", "top1", "bt_loss") or "/" in k}
        # MoE: the router loss, a mean over micro-batches and ranks (absent: a dense backbone)
        aux = {"router_aux_loss": v[n + 2] / v[n + 3]} if len(v) > n + 3 and v[n + 3] else {}
        if len(v) > n + 4:  # --tie_loss davidson: the learned nu this step used
            aux["tie_nu"] = math.exp(v[n + 4])
        # sequences: what the step's forwards ran (all ranks): 2 per pair, or each ranked response once
        kind = self.objective.kind
        seqs = ({"sequences": m["responses"], "prompts_per_s": m["prompts"] / seconds} if kind == "ranking" else
                {"sequences": m["rows"], "rows_per_s": m["rows"] / seconds} if kind == "regression" else
                {"sequences": m["responses"], "rows_per_s": m["rows"] / seconds} if kind == "bt+regression" else
                {"sequences": 2 * m["pairs"]})
        pairs = {"pairs_per_s": m["pairs"] / seconds} if "pairs" in m else {}
        return {"loss": m["loss"], **finite, **aux, "lr": self.lr, **pairs, **seqs,
                "tokens_per_s": v[n] / seconds, "padding_efficiency": v[n] / v[n + 1]}


def train_step(eng, step: int, micro_batches: list[dict], device: torch.device, fused: bool,
               stop_requested: bool, loss_scale: float | None = None, center: float = 0.0,
               counts: bool = True, objective: Objective = Objective()) -> StepRecord:
    """grad_accum micro-batches -> one optimizer update (DeepSpeed applies it at the last micro step).
    Nothing here waits for the GPU.

    loss_scale None: each micro-batch's loss is its mean pair loss (equal-sized micro-batches). With
    packing they differ in size, so each contributes its pair-loss *sum* x loss_scale = world x accum /
    global pairs: after DeepSpeed's 1/accum and its average over ranks, the update minimises the mean
    over the global batch's pairs, exactly as with equal micro-batches. `center` (reward centering) is a
    per-pair term, so the same weighting applies to it. The logged loss is the BT part alone. counts False
    (a sequence group's ranks after its first, which hold the same rewards): statistics left out of the sum.
    Ranking batches (--objective ranking) weigh prompts, and rating batches rows, as this weighs pairs."""
    started = time.perf_counter()
    lr = eng.lr()
    skipped_before = eng.skipped()
    sums = None
    aux_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (router aux loss, micro-batches with one)
    tokens = slots = 0
    for b in micro_batches:
        with eng.micro_step():  # --offload_activations: checkpointed layer inputs wait on the CPU
            rewards = score_batch(eng, b, device)
            log_nu = eng.tie_log_nu()  # --tie_loss davidson: its learned theta, else None (the soft tie loss)
            loss, s = batch_loss(b, rewards, device, fused, loss_scale, center, log_nu, objective)
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
        tokens += batch_tokens(b)
        slots += token_slots(b)
    stats = torch.cat([sums, torch.tensor([tokens, slots], dtype=torch.float64, device=device), aux_sum])
    if not counts:
        stats.zero_()
    engine.all_reduce_sum(stats)  # one collective per step, queued on the device; read only by a log line
    if log_nu is not None:  # the same on every rank: not summed
        stats = torch.cat([stats, log_nu.detach().double().reshape(1)])
    # Stop votes travel as host integers (gloo), so every rank agrees on stopping at this step without
    # waiting for the GPU; a signal seen by any rank stops them all here.
    stop_votes = engine.host_sum(int(stop_requested))
    return StepRecord(step, stats, eng.skipped() > skipped_before, stop_votes, lr, started, objective)


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
