"""The checkpoint owner. It decides when to save (every save_every steps, at the end, and at the step the
ranks agreed to stop at), writes and commits (artifact/checkpoint_files.py's protocol), rotates in the
background, resumes, and refuses a resume that would not be exact.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import torch

from rm_trainer import disk, objectives
from rm_trainer.artifact import checkpoint_files as ckpt
from rm_trainer.config import RunConfig
from rm_trainer.data.cache import data_identity
from rm_trainer.errors import ConfigError
from rm_trainer.train import elastic, engine
from rm_trainer.train.best import BestCheckpoints
from rm_trainer.train.step import StepRecord

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly at a committed checkpoint; rerun to resume
PROBE_SEQUENCES = 8


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint is committed."""

    def __init__(self, step: int, tag: str):
        super().__init__(f"preempted: checkpoint {tag} committed at step {step}; rerun to resume")
        self.step, self.tag = step, tag


def resume_keys(cfg: RunConfig, world: int, zero_stage: int) -> dict:
    """What must match for a resume to continue exactly where the checkpoint left off. world_size and
    zero_stage may change (elastic.py converts the checkpoint); the global batch may not; the objective
    and what shapes its loss (Objective.checkpoint_key) may not."""
    t, objective = cfg.train, objectives.build(cfg)
    model_id = hashlib.sha256((Path(cfg.model.path) / "config.json").read_bytes()).hexdigest()[:16]
    keys = {"base_weights": base_fingerprint(cfg.model.path)} if cfg.model.lora_r and not cfg.model.random_init \
        else {}
    return keys | {"world_size": world, "zero_stage": zero_stage, "sequence_parallel": t.sequence_parallel,
                   "model_config_sha256": model_id + ("+random_init" if cfg.model.random_init else ""),
                   "global_batch": t.micro_batch_size * t.grad_accum * (world // t.sequence_parallel),
                   "batching": [t.batching, t.packing, cfg.pack_len, t.share_prompt],
                   "objective": objective.checkpoint_key()} | data_identity(cfg, objective)


def base_fingerprint(path: str) -> str:
    """Sizes and sampled checksums of the model's weight files: a LoRA checkpoint leaves the frozen base
    weights out, so a resume must run on the same ones (about 3 MB read per file, whatever its size)."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    text = ";".join(f"{p.name}:{p.stat().st_size}:{ckpt.file_checksum(p)}" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_resume(cfg: RunConfig, world: int, zero_stage: int) -> tuple[Path | None, RunConfig, dict | None]:
    """Rank 0, before the process group exists: (the checkpoint to resume, the config to resume it with,
    what changed and needs a universal conversion: {"world_size": [then, now], ...} or None). Damaged checkpoints
    are skipped or refused (checkpoint.resume_target). A different world size or ZeRO stage keeps the
    global batch (grad_accum recomputed, see elastic.keep_global_batch); any other difference is refused
    with every one named, unless --resume_force."""
    root = Path(cfg.output.output_dir) / "checkpoints"
    target = ckpt.resume_target(root, cfg.train.resume)
    if target is None:
        return None, cfg, None
    then = ckpt.CheckpointRecord.read(target / ckpt.META_FILE).resume_keys
    now = {"world_size": world, "zero_stage": zero_stage}
    moved = {k: [then[k], now[k]] for k in elastic.ELASTIC_KEYS if then.get(k) is not None and then[k] != now[k]}
    check_sequence_parallel(target, then.get("sequence_parallel", 1), cfg.train.sequence_parallel, moved)
    if moved:
        cfg = elastic.keep_global_batch(cfg, world, then, target)
    diffs = [d for d in ckpt.resume_differences(target, resume_keys(cfg, world, zero_stage))
             if d.split(":")[0] not in (*elastic.ELASTIC_KEYS, "sequence_parallel")]
    if diffs and not cfg.train.resume_force:
        raise ConfigError([f"cannot resume {target} exactly: " + "; ".join(diffs) +
                           ". Pass --resume_force to continue anyway (not bit-exact), or --resume never "
                           "to start over"])
    return target, cfg, moved or None


def check_sequence_parallel(target: Path, then: int, now: int, moved: dict) -> None:
    """A checkpoint resumes at its own train.sequence_parallel, and under sequence parallelism at its own
    world size and ZeRO stage: a change of the sequence groups on resume is not built (nor tested) yet."""
    if then != now:
        raise ConfigError([f"cannot resume {target}: it was written with train.sequence_parallel {then}, this run "
                           f"has {now}; resume with --sequence_parallel {then}, or --resume never to start over"])
    if now > 1 and moved:
        change = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in moved.items())
        raise ConfigError([f"cannot resume {target} with sequence parallelism across a change ({change}): resume "
                           "on the world size and ZeRO stage it was written with"])


def make_probe(ds, pad_id: int, objective) -> dict[str, torch.Tensor]:
    """The first rows' sequences (PROBE_SEQUENCES of them), in the order the objective's own batch runs them
    (a pair batch: its chosen ones, then its rejected ones), right-padded: every checkpoint scores them with
    the live engine, and consolidation must reproduce those rewards from the merged weights alone."""
    rows, n = [], 0
    while n < PROBE_SEQUENCES and len(rows) < len(ds):
        rows.append(ds[len(rows)])
        n += len(rows[-1]["ids"])
    seqs = objective.collate(rows, pad_id).seqs
    return {"input_ids": seqs.input_ids[:PROBE_SEQUENCES], "seq_lengths": seqs.lens[:PROBE_SEQUENCES]}


def run_record(cfg: RunConfig, backbone_config, tok, world: int, is_main: bool, zero_stage: int
               ) -> ckpt.CheckpointRecord:
    bc = backbone_config.to_diff_dict() | {"model_type": backbone_config.model_type}
    return ckpt.CheckpointRecord(
        run_config=cfg.model_dump(mode="json"), backbone_config=bc, dtype=cfg.train.dtype,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_len=cfg.data.max_len, world_size=world,
        resume_keys=resume_keys(cfg, world, zero_stage) if is_main else {})


class Checkpointer:
    """Built from the run config (train.save_every, keep_last, keep_best; output's preempt marker), the run's
    ranks and tokenizer, the backbone's config and the ZeRO stage (its run record) and the rows its probe
    reads (the held-out ones, else the training ones) as the objective batches them. reward_stats: the last
    evaluation's normalisation."""

    def __init__(self, cfg: RunConfig, rt: engine.Runtime, tok, *, objective, backbone, rows, zero_stage: int,
                 reward_stats):
        out = Path(cfg.output.output_dir)
        self.root = out / "checkpoints"
        self.every, self.keep_last = cfg.train.save_every, cfg.train.keep_last
        self.marker = Path(cfg.output.preempt_marker or out / "preempted.json")
        self.record = run_record(cfg, backbone, tok, rt.world_size, rt.is_main, zero_stage)
        self.probe = make_probe(rows, tok.pad_token_id, objective)
        self.rt, self.tok, self.reward_stats = rt, tok, reward_stats
        t = cfg.train
        self.best = BestCheckpoints(self.root, t.keep_best, t.best_metric, t.best_mode, 0) if t.keep_best else None
        self.saved: tuple[int, str] | None = None
        self.expected_bytes: int | None = None  # one checkpoint's size (check_space), for the disk-full message
        self._rotation: threading.Thread | None = None
        if rt.is_main:  # half-written folders of a killed run: moved aside now, deleted in the background
            ckpt.clean_partial(self.root)
            self._background(ckpt.purge_trash, self.root)

    def resume(self, eng, target: Path | None, moved: dict | None = None) -> int:
        """Weights, Adam state and LR schedule (DeepSpeed), then step and RNG states (ours). Returns the
        number of steps already done (0 for a fresh start). `moved` (world size or ZeRO stage changed):
        from target/universal/ (elastic.ensure_universal), and rank r takes the RNG states of the
        checkpoint's rank min(r, its world - 1) (dropout is off by default, so they rarely matter)."""
        if target is None:
            return 0
        rank = self.rt.rank
        if moved:
            eng.load(str(target), elastic.UNIVERSAL)
            rank = min(rank, ckpt.CheckpointRecord.read(target / ckpt.META_FILE).world_size - 1)
        else:
            eng.load(str(target.parent), target.name)
        step = ckpt.restore_rank_state(target / f"rm_state_rank{rank}.pt")
        if self.rt.is_main:  # e.g. the wandb run this run continues
            self.record.tracking = ckpt.CheckpointRecord.read(target / ckpt.META_FILE).tracking
        if self.best is not None:  # the ranking goes on, without the steps this run redoes
            self.best = BestCheckpoints(self.root, self.best.keep, self.best.metric, self.best.mode, step)
        if self.rt.is_main:
            how = f" (universal: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in moved.items())})" if moved else ""
            print(f"[rm_trainer] resumed from {target} at step {step}{how}", flush=True)
        return step

    def evaluated(self, step: int, result: dict) -> None:
        """An evaluation's numbers: with keep_best, rank 0 ranks this step once its checkpoint commits."""
        if self.best is not None and self.rt.is_main:
            self.best.note(step, result)

    def after_step(self, eng, rec: StepRecord, total: int, evaluated: bool = False) -> None:
        """Save every save_every steps, and after every evaluation with keep_best (the last step is saved by
        the end of the run). If the ranks agreed to stop, make sure this step is committed, write the
        marker and raise Preempted everywhere."""
        if rec.step == total:
            return
        if (self.every and rec.step % self.every == 0) or (evaluated and self.best is not None):
            self.save(eng, rec.step)
        if rec.stop:
            tag = self.saved[1] if self.saved and self.saved[0] == rec.step else self.save(eng, rec.step)
            if self.rt.is_main:
                self.marker.write_text(json.dumps({"step": rec.step, "tag": tag,
                                                   "ranks_signalled": rec.stop_votes}) + "\n")
            engine.barrier()  # no rank exits (and makes the launcher kill the others) before the marker
            raise Preempted(rec.step, tag)

    def save(self, eng, step: int) -> str:
        """Every rank writes and checksums its files into step_N.tmp/; rank 0 commits once all succeeded.
        A write the disk refuses (full, quota, read-only) on any rank: the ranks agree on it, the .tmp
        folder is removed, the committed checkpoints stay as they were, and every rank raises
        DiskFullError (one message, from rank 0; exit 2). `--resume auto` after freeing space is exact."""
        rt, tag, t0 = self.rt, ckpt.tag_for(step), time.perf_counter()
        eng.eval()
        with torch.no_grad():  # the probe the consolidated weights must reproduce (collective under ZeRO-3)
            rewards = eng(self.probe["input_ids"].to(rt.device), self.probe["seq_lengths"].to(rt.device)).cpu()
        eng.train()
        tmp = self.root / (tag + ".tmp")
        failed = eng.save(str(self.root), tmp.name)  # a refused write is returned, after DeepSpeed's collectives
        if failed is None:
            failed = self._write_own_files(tmp, step, rewards)
        # the ranks agree: one all-reduce of a flag (every rank reaches it, whatever failed where)
        flags = torch.tensor([float(failed is not None), float(failed is not None and rt.is_main)], device=rt.device)
        any_failed, main_failed = engine.all_reduce_sum(flags).tolist()
        if any_failed:
            self._abandon(tmp, step, failed, speak=failed is not None and (rt.is_main or not main_failed))
        failed = self._commit(step, tag, t0) if rt.is_main else None
        if engine.all_reduce_sum(torch.tensor([float(failed is not None)], device=rt.device)).item():
            self._abandon(tmp, step, failed, speak=rt.is_main)  # the manifest or `latest` did not fit
        self.saved = (step, tag)
        return tag

    def _commit(self, step: int, tag: str, t0: float) -> BaseException | None:
        """Rank 0: manifest, rename, `latest`, then rotation in the background. Returns a disk failure."""
        self.close()  # the previous rotation must be done before `latest` moves again
        try:
            ckpt.commit(self.root, step, self.rt.world_size)
        except (OSError, RuntimeError) as e:
            if not disk.is_disk_failure(e):
                raise
            return e
        self.expected_bytes = disk.tree_bytes(self.root / tag)  # measured: the next one's size
        print(f"[rm_trainer] committed {tag} in {time.perf_counter() - t0:.2f}s", flush=True)
        if self.best is not None:
            self.best.committed(step, tag)
        # deleting old checkpoints can take a while on a parallel file system: not behind a barrier
        self._background(self._rotate, self.best.tags() if self.best else set())
        return None

    def _write_own_files(self, tmp: Path, step: int, rewards: torch.Tensor) -> BaseException | None:
        """This rank's state file, rank 0's tokenizer and record, then this rank's checksums (in parallel,
        while the pages are hot). Returns the disk failure, if the disk refused a write."""
        rt = self.rt
        try:
            torch.save(ckpt.rank_state(step), tmp / f"rm_state_rank{rt.rank}.pt")
            if rt.is_main:
                self.tok.save_pretrained(tmp / ckpt.TOKENIZER_DIR)
                self.record.step, self.record.reward_stats = step, self.reward_stats()
                self.record.probe = {k: v.tolist() for k, v in self.probe.items()} | {"rewards": rewards.tolist()}
                self.record.write(tmp / ckpt.META_FILE)
            ckpt.write_rank_checksums(tmp, rt.rank, rt.world_size)
        except (OSError, RuntimeError) as e:
            if not disk.is_disk_failure(e):
                raise
            return e
        return None

    def _abandon(self, tmp: Path, step: int, failed: BaseException | None, speak: bool) -> None:
        """After a refused write: rank 0 removes the .tmp folder; every rank raises DiskFullError, printed
        by rank 0 if it failed, else by the ranks that did (speak)."""
        if self.rt.is_main:
            disk.remove(tmp)
        engine.barrier()
        found = ckpt.committed(self.root)
        kept = (f"the last committed checkpoint ({found[-1][1].name}) is intact" if found
                else "no checkpoint was committed yet")
        what = (disk.message(f"saving checkpoint step {step} to", self.root, failed, self.expected_bytes) if failed
                else f"saving checkpoint step {step} to {self.root} failed on another rank")
        raise disk.DiskFullError(f"{what}. The half-written {tmp.name} was removed and {kept}; free space and "
                                 "rerun with --resume auto to continue exactly", quiet=not speak)

    def check_space(self, eng, artifacts: int) -> None:
        """Rank 0, before the first save: warn if keep_last + 1 checkpoints (a new one is written before the
        oldest goes) and the final artifacts (`artifacts` copies of the weights: reward.pt, the HF export)
        cannot fit in the free space."""
        weights, self.expected_bytes = eng.sizes()
        if not self.rt.is_main:
            return
        final_bytes = artifacts * weights
        kept = self.keep_last + 1 + (self.best.keep if self.best else 0)
        final_bytes *= 2 if self.best else 1  # OUT/best/ beside the final artifacts
        need = self.expected_bytes * kept + final_bytes
        free = disk.free_bytes(self.root)
        if free is not None and free < need:
            print(f"[rm_trainer] warning: {disk.human(free)} free at {self.root}, and this run needs about "
                  f"{disk.human(need)}: {kept} checkpoints of ~{disk.human(self.expected_bytes)} "
                  f"(keep_last {self.keep_last} and keep_best, plus the one being written) and "
                  f"~{disk.human(final_bytes)} of reward.pt and HF export. A save that does not fit stops the run "
                  "(exit 2) with the last "
                  "committed checkpoint intact", flush=True)

    def _background(self, fn, *args) -> None:
        self._rotation = threading.Thread(target=fn, args=args, name="rm_trainer-rotation")
        self._rotation.start()

    def _rotate(self, keep: set[str]) -> None:
        try:
            removed = ckpt.rotate(self.root, self.keep_last, keep)
        except OSError as e:  # a failed deletion must not kill training: say so and keep going
            print(f"[rm_trainer] rotation failed: {e}", flush=True)
            return
        if removed:
            print(f"[rm_trainer] rotated out {', '.join(removed)}", flush=True)

    def close(self) -> None:
        if self._rotation is not None:
            self._rotation.join()
            self._rotation = None

