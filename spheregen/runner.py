"""Training on accelerate: one method of an experiment, or one phase of a fit, with
checkpoints and resume.

:class:`Loop` is the loop both share; :class:`Trainer` trains a method entry,
:class:`PhaseTrainer` one phase of what a component needs fitted (the RAE decoder, the
domain classifier; :mod:`spheregen.fit` drives it). Batches are drawn by a pure function
of the micro-step index (a seeded permutation per epoch, sharded by process), not by a
DataLoader's iterator state. That makes resume exact (no sampler state to restore) and
makes N processes see exactly the global batches of one process. ``train.batch_size`` is
the global batch (images per optimizer step over all processes and accumulation
micro-steps): each process draws batch_size / (processes × grad_accum) images per
micro-step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spheregen.artifacts import read_final, write_final
from spheregen.config import config_hash, to_dict
from spheregen import latent_cache, precision
from spheregen.data import Examples, collate, to_float
from spheregen.latent_cache import DiskLatents, MemoryLatents, flip_mask
from spheregen.errors import CheckpointError, ConfigError, Preempted, StaleError, TrainingError
from spheregen.experiment import MethodEntry, TrainConfig
from spheregen.interfaces import LatentMethod, has
from spheregen.paths import (DirLock, atomic_write, atomic_write_json, check_owned, ensure_free_space, mark_owned,
                             remove_owned, replace_dir)
from spheregen.preemption import StopRequest
from spheregen.shards import ThreadShards, sharded_backward, use_thread_shards
from spheregen.workspace import Workspace

MANIFEST = "manifest.json"


# ---------------------------------------------------------------- schedule, EMA


def lr_lambda(cfg: TrainConfig) -> Any:
    """Linear warmup (s+1)/(W+1) as the official code, then cosine to min_lr_ratio."""
    warmup = int(cfg.warmup_fraction * cfg.steps)
    decay = max(1, cfg.steps - warmup)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / decay)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class EMA:
    """Exponential moving average of a module's trained parameters (``requires_grad``),
    by name: a frozen tokenizer is not copied, so the EMA costs one copy of what
    training changes. Checkpointed through accelerate's ``register_for_checkpointing``;
    :meth:`full_state` is the module's state dict with the averages in place."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.keys() != self.shadow.keys():
            raise CheckpointError(f"the checkpoint's EMA holds {len(state)} tensors, this method trains "
                                  f"{len(self.shadow)}: it belongs to another architecture; pass --fresh")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    def full_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {**module.state_dict(), **self.shadow}


# ---------------------------------------------------------------- batches


def micro_batch(cfg: TrainConfig, world: int) -> int:
    """Images per process and micro-step for the global ``cfg.batch_size``."""
    parts = world * cfg.grad_accum
    if cfg.batch_size % parts:
        raise ConfigError(
            f"train.batch_size = {cfg.batch_size} is the global batch and must divide evenly over {world} "
            f"process(es) × train.grad_accum = {cfg.grad_accum}; use a multiple of {parts}"
        )
    return cfg.batch_size // parts


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's seeded permutation, drawn once per epoch rather than once per step
    (ImageNet's 1.28M indices took 19 ms to draw on one CPU thread; callers only slice
    it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(k: int, n: int, batch: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Indices of micro-batch ``k`` for process ``rank`` (``batch`` images per process):
    a shard of the k-th global micro-batch of a seeded per-epoch permutation (drop_last)."""
    global_batch = batch * world
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ConfigError(
            f"a global micro-batch of {global_batch} images exceeds the {n} training examples; lower train.batch_size"
        )
    epoch, j = divmod(k, per_epoch)
    perm = _epoch_permutation(n, seed, epoch)
    start = j * global_batch + rank * batch
    return perm[start:start + batch].clone()


def prepare_batch(images: torch.Tensor, labels: torch.Tensor, flip: bool, seed: int, k: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 B×C×H×W micro-batch k -> float in [-1, 1] on ``device``, mirrored where
    :func:`flip_mask` says (in the training process, so workers stay RNG-free)."""
    # uint8 crosses to the device (a quarter of float's bytes, asynchronously from the
    # loader's pinned memory), then converts there; the mirror is a select, not a masked
    # write, so a CUDA step has no host sync. On the CPU both are the same exact copies.
    x = to_float(images.to(device, non_blocking=True))
    if flip:
        mask = flip_mask(len(x), seed, k).to(device, non_blocking=True)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x, labels.to(device, non_blocking=True)


class StepSampler(torch.utils.data.Sampler):
    """The index lists of micro-batches ``start <= k < end`` of one process, for a
    ``DataLoader``'s ``batch_sampler``: batch k is :func:`batch_indices` of k, so the
    loader's workers decode exactly the images a resumed or single-process run would."""

    def __init__(self, n: int, micro: int, rank: int, world: int, seed: int, start: int, end: int):
        self.args, self.start, self.end = (n, micro, rank, world, seed), start, end

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        n, micro, rank, world, seed = self.args
        for k in range(self.start, self.end):
            yield batch_indices(k, n, micro, rank, world, seed).tolist()


class LatentBatches(torch.utils.data.Dataset):
    """Item k: the latents of micro-batch k read from a :class:`DiskLatents` cache
    (float32 B×latent_shape, mirrored where the image path would mirror) and their
    labels (int64 B), for a ``DataLoader`` over ``range(start, end)`` whose workers read
    the memory maps while the device trains. The same pure function of k as the image
    path, so resume and N processes stay exact."""

    def __init__(self, cache: DiskLatents, labels: torch.Tensor, n: int, micro: int, rank: int, world: int,
                 seed: int, flip: bool):
        self.cache, self.labels, self.flip, self.seed = cache, labels, flip, seed
        self.args = (n, micro, rank, world, seed)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = batch_indices(k, *self.args)
        return self.cache.batch(idx, self.flip, self.seed, k, torch.device("cpu")), self.labels[idx]


def device_prefetch(batches: Iterator[tuple[torch.Tensor, ...]], device: torch.device
                    ) -> Iterator[tuple[torch.Tensor, ...]]:
    """``batches`` moved to ``device``. On CUDA the copy of batch k+1 is issued on a side
    stream before batch k is handed out, so it overlaps the step on batch k instead of
    preceding the next one (with it, training on disk-cached DINOv2-B latents, 201 MB a
    batch, went from 0.915 to 0.964 of its in-memory speed: benchmarks/bench_gpu_stream.py)."""
    if device.type != "cuda":
        for batch in batches:
            yield tuple(t.to(device) for t in batch)
        return
    stream = torch.cuda.Stream(device)

    def load() -> tuple[torch.Tensor, ...] | None:
        batch = next(batches, None)
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return tuple(t.to(device, non_blocking=True) for t in batch)

    ahead = load()
    while ahead is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        for t in ahead:
            t.record_stream(current)  # allocated on the side stream, used on this one
        batch, ahead = ahead, load()
        yield batch


def train_batches(examples: Examples, cache: DiskLatents | None, micro: int, rank: int, world: int, seed: int,
                  flip: bool, start: int, end: int, workers: int, device: torch.device
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches ``start <= k < end`` of process ``rank`` as (inputs, int64 labels)
    on ``device``: images (float in [-1, 1], mirrored per :func:`flip_mask`) decoded by
    ``workers`` DataLoader processes, or, with a disk ``cache``, the latents they read
    from its memory maps; pinned and copied ahead on CUDA (:func:`device_prefetch`)."""
    # its own generator: a DataLoader draws its workers' base seed when iterated, and
    # from the global RNG that would shift every later noise draw of a resumed run
    common: dict[str, Any] = dict(num_workers=workers, pin_memory=device.type == "cuda", generator=torch.Generator())
    if cache is not None:
        # 2 batches ahead per worker: a latent batch is large (201 MB for 256 DINOv2-B
        # latents) and each one waiting sits in shared memory
        data = LatentBatches(cache, examples.labels, len(examples), micro, rank, world, seed, flip)
        loader = DataLoader(data, sampler=range(start, end), batch_size=None, prefetch_factor=2 if workers else None,
                            **common)
        yield from device_prefetch(iter(loader), device)
        return
    sampler = StepSampler(len(examples), micro, rank, world, seed, start, end)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=collate, prefetch_factor=4 if workers else None,
                        **common)
    for k, (images, labels) in enumerate(device_prefetch(iter(loader), device), start):
        yield prepare_batch(images, labels, flip, seed, k, device)


# ---------------------------------------------------------------- checkpoints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path, step: int, cfg_hash: str) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(ckpt.iterdir()) if p.is_file()}
    (ckpt / MANIFEST).write_text(json.dumps({"step": step, "config_hash": cfg_hash, "files": files}, indent=1))


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; returns the manifest."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {MANIFEST}: it was not completely written")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt: {exc}") from exc
    for name, info in manifest["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != info["size"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupt (size/sha256 differ from {MANIFEST})")
    return manifest


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), key=lambda p: p.name)


# ---------------------------------------------------------------- trainer


def run_hash(ws: Workspace, entry: MethodEntry, extended_from: tuple[int, ...] | None = None) -> str:
    """Identity of a training run: the data (its config and its content fingerprint,
    ``ws.data.key``), the method config, its train config, the seed. Sampler, guidance
    and step counts are left out: they only change evaluation, so changing them
    re-samples without retraining; so are checkpoint and log cadence.

    A run continued by ``spheregen train --extend-to`` also hashes ``extended_from``,
    the budgets it finished before (4 -> 6 steps: ``(4,)``), so its weights are neither
    the 4-step run's nor a fresh 6-step run's. ``None``: what the entry's run folder
    records (:func:`run_history`), so every stage given ``train.steps = 6`` finds the
    identity of the weights that folder holds; ``()``: a run trained in one go."""
    history = run_history(ws, entry) if extended_from is None else tuple(extended_from)
    training = {"name": entry.name, "method": entry.method, "train": entry.train}
    # a run in one go hashes as it always did: results scored before extensions stay current
    extension = {"extended_from": list(history)} if history else {}
    return config_hash({"data": ws.exp.data, "data_key": ws.data.key, "method": training, "seed": ws.exp.seed,
                        **extension})


def run_history(ws: Workspace, entry: MethodEntry) -> tuple[int, ...]:
    """The budgets the run folder of ``entry`` says its weights were extended from, when
    that record fits the entry's config (its run.json carries the extended run's
    identity); () for a run trained in one go, no run, or a run of another config."""
    meta = ws.paths.run(entry.name) / "run.json"
    if not meta.is_file():
        return ()
    record = _read_json(meta)
    history = tuple(int(s) for s in record.get("extended_from", ()))
    return history if history and record.get("config_hash") == run_hash(ws, entry, history) else ()


def run_differences(record: dict[str, Any], ws: Workspace, entry: MethodEntry) -> str:
    """What differs between a run's record (its run.json or final/config.json) and what
    the config gives now, in words: 'train.steps: run 4, config 6; ...', and the budgets
    the run was extended from."""
    then = _flat(record.get("method") or record.get("entry") or {})
    # what run_hash covers of the entry; cadence and other non-identity keys cannot differ
    now = {k: v for k, v in _flat(to_dict(entry, identity=True)).items()
           if k.split(".")[0] in ("name", "method", "train")}
    out = [f"{k}: run {then[k]!r}, config {v!r}" for k, v in now.items() if k in then and then[k] != v]
    data_then, data_now = _flat(record.get("data") or {}, "data"), _flat(to_dict(ws.exp.data, identity=True), "data")
    out += [f"{k}: run {data_then[k]!r}, config {v!r}" for k, v in data_now.items()
            if k in data_then and data_then[k] != v]
    if record.get("data_key") not in (None, ws.data.key):
        out.append(f"data content: run {record['data_key']}, now {ws.data.key}")
    if record.get("seed") not in (None, ws.exp.seed):
        out.append(f"seed: run {record['seed']}, config {ws.exp.seed}")
    if record.get("extended_from"):
        steps = _flat(record.get("method") or record.get("entry") or {}).get("train.steps")
        out.append(f"the run was extended from {record['extended_from']} to {steps} steps "
                   f"(spheregen train --extend-to): give it train.steps = {steps}")
    return "; ".join(out) or "the data config or the dataset differ"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train.steps': 4, ...} of nested dicts."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@dataclasses.dataclass(frozen=True)
class Extension:
    """A finished run continued to a larger budget (:mod:`spheregen.extension` plans it):
    ``entry`` at the new budget, the finished run's budget and identity, and the
    budgets the result is extended from (the finished run's own, then its budget)."""

    entry: MethodEntry
    from_steps: int
    base_hash: str
    history: tuple[int, ...]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable or corrupt ({exc}); delete the run with --fresh") from exc


def weights_digest(ws: Workspace, entry: MethodEntry) -> str | None:
    """sha256 of ``entry``'s final weights file (tensors only: the bytes are the same
    whenever the weights are), None without one."""
    path = ws.paths.final(entry.name)
    return _sha256(path) if path.is_file() else None


def is_trained(ws: Workspace, entry: MethodEntry) -> bool:
    """Final weights exist for exactly this run's config."""
    meta = ws.paths.run(entry.name) / "run.json"
    return ws.paths.final(entry.name).is_file() and meta.is_file() and \
        _read_json(meta).get("config_hash") == run_hash(ws, entry)


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    """The accelerator of one training run: processes from the launch, ``cfg``'s mixed
    precision and accumulation, its trackers writing under ``run_dir/tracking``."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=list(cfg.log_with) or None,
        project_dir=str(run_dir / "tracking"),
    )


class Loop:
    """The accelerate training loop shared by methods (:class:`Trainer`) and the phases
    of a fit (:class:`PhaseTrainer`, driven by :mod:`spheregen.fit`): micro-batches as a
    pure function of (seed, step), gradient accumulation, mixed precision, checkpoints
    sealed by a sha256 manifest and exact ``--resume``, SIGTERM preemption, a progress
    bar, the jsonl log and accelerate's trackers.

    A subclass sets ``name`` (messages, progress bar), ``cfg`` (a :class:`TrainConfig`),
    ``run_dir`` (log, checkpoints, trackers), ``hash`` (the identity every checkpoint
    carries), ``seed`` and ``flip`` (batch order and mirroring) and ``examples`` (a
    dataset of (uint8 C×H×W, label)), then calls :meth:`_prepare` with the module to
    train (``loss(images, labels)``, optional ``param_groups()``) and :meth:`_run`."""

    lr_hint = "train.lr"  # what a non-finite loss message tells the user to lower
    extended_from: tuple[int, ...] = ()  # budgets of the finished runs this one continues (Trainer)
    continue_with = "--resume"  # the option that continues a stopped run

    def __init__(self, name: str, cfg: TrainConfig, run_dir: Path, accelerator: Accelerator | None, progress: bool):
        self.name, self.cfg, self.run_dir = name, cfg, run_dir
        check_trackers(cfg.log_with)
        self.acc = accelerator or make_accelerator(cfg, run_dir)
        self.progress = progress
        self.lock: DirLock | None = None
        self.latents: MemoryLatents | DiskLatents | None = None
        self.ema: EMA | None = None
        self.shards: ThreadShards | None = None  # set by _prepare (spheregen.shards)
        self.step = 0
        # training time that made the weights, summed over resumes (checkpointed in
        # step.json): wall seconds in the loop, and device-seconds (wall × processes)
        self.wall_s, self.device_s = 0.0, 0.0
        self._segment: float | None = None  # perf_counter() when this launch's loop started

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    # -- setup

    def _check_batches(self) -> None:
        self.micro = micro_batch(self.cfg, self.acc.num_processes)
        batch_indices(0, len(self.examples), self.micro, 0, self.acc.num_processes, 0)  # fits the data?

    def _prepare(self, module: torch.nn.Module) -> None:
        """Optimizer, schedule and EMA of ``module``'s trained parameters, prepared by
        accelerate (DDP, device, mixed precision) and registered for checkpoints; the
        speed options of ``cfg`` (activation checkpointing, fused AdamW, compile) applied."""
        if self.cfg.activation_checkpointing:
            precision.checkpoint_activations(precision.checkpoint_blocks(
                module, f"method '{self.name}' with train.activation_checkpointing = true"))
        raw = module.param_groups() if hasattr(module, "param_groups") else [{"params": list(module.parameters())}]
        groups = [
            {"params": [p for p in g["params"] if p.requires_grad], "lr": self.cfg.lr * g.get("lr_scale", 1.0)}
            for g in raw
        ]
        opt = precision.adamw(groups, self.cfg.lr, self.cfg.betas, self.cfg.weight_decay, self.cfg.fused_adamw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg))
        self.method = module
        step = LossForward(module)
        if self.cfg.compile:  # in place: checkpoints keep LossForward's keys (no _orig_mod.)
            precision.compile_module(step)
        # the scheduler is stepped by hand once per optimizer step: accelerate's wrapper
        # would step it once per process, which changes the schedule with the world size
        self.wrapped, self.opt = self.acc.prepare(step, opt)
        self.sched = sched
        shards = use_thread_shards(self.cfg.thread_shards, module, self.acc.device, self.acc.num_processes,
                                   self.acc.mixed_precision, self.cfg.compile, self.micro)
        self.shards = ThreadShards(shards) if shards else None
        self.trained = [p for g in groups for p in g["params"]]
        self.acc.register_for_checkpointing(self.sched)
        self.ema = EMA(module, self.cfg.ema_decay) if self.cfg.ema_decay > 0 else None
        if self.ema is not None:
            self.acc.register_for_checkpointing(self.ema)
        self.step = 0

    # -- checkpoints

    def _state_bytes(self) -> int:
        """About what one checkpoint takes on disk: trained weights, AdamW's two
        moments, EMA (frozen parameters are not saved)."""
        trained = sum(p.numel() * p.element_size() for p in self.method.parameters() if p.requires_grad)
        return trained * (4 if self.ema is not None else 3)

    def save_checkpoint(self) -> Path:
        root = self.checkpoints
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-step-{self.step:07d}"
        self.acc.wait_for_everyone()
        # every process writes its own RNG state into the same folder; the main process
        # seals it with a manifest and moves it into place
        if self.acc.is_main_process:
            ensure_free_space(root, self._state_bytes(), f"the checkpoint of step {self.step}")
            if tmp.exists():
                shutil.rmtree(tmp)
        self.acc.wait_for_everyone()
        try:
            self.acc.save_state(str(tmp))
        except Exception as exc:  # a full disk surfaces as OSError or the writer's own error type
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write the checkpoint {tmp} ({type(exc).__name__}: {exc}); the "
                                  "partial folder was removed and earlier checkpoints are intact: free disk "
                                  "space and re-run with --resume") from exc
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / "step.json").write_text(json.dumps({"step": self.step, **self.state_record()}))
            write_manifest(tmp, self.step, self.hash)
            replace_dir(tmp, final)
            for old in list_checkpoints(root)[:-2]:  # keep the last two good checkpoints
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def load_latest(self) -> bool:
        ckpts = list_checkpoints(self.checkpoints)
        if not ckpts:
            return False
        latest = ckpts[-1]
        try:
            manifest = verify_checkpoint(latest)
        except CheckpointError as exc:
            prev = f"; the previous checkpoint {ckpts[-2]} is intact: delete {latest} to resume from it" if len(ckpts) > 1 else ""
            raise CheckpointError(f"{exc}{prev}") from exc
        self._check_manifest(latest, manifest)
        self.acc.load_state(str(latest))
        self.step = int(manifest["step"])
        record = _read_json(latest / "step.json") if (latest / "step.json").is_file() else {}
        self.wall_s, self.device_s = float(record.get("train_wall_s", 0.0)), float(record.get("train_device_s", 0.0))
        if self._continues(manifest):
            # the optimizer holds the rate of the schedule it was trained under (a finished
            # run ends at its minimum): set this run's rate at this step, as LambdaLR does
            self.sched.last_epoch = self.step - 1
            self.sched.step()
        return True

    def _continues(self, manifest: dict[str, Any]) -> bool:
        """Whether a checkpoint of another identity is one this run continues (the
        finished run an extension starts from, :class:`Trainer`); none here."""
        return False

    def _stale_hint(self) -> str:
        """What to add when a checkpoint of another config is refused."""
        return ""

    def _check_manifest(self, ckpt: Path, manifest: dict[str, Any]) -> None:
        """--resume continues only a checkpoint of this very run and budget."""
        if manifest.get("config_hash") != self.hash and not self._continues(manifest):
            raise StaleError(
                f"checkpoint {ckpt} was written by a run of another config (hash {manifest.get('config_hash')}, "
                f"now {self.hash}); resuming would mix two runs' weights: pass --fresh to retrain{self._stale_hint()}"
            )
        if int(manifest["step"]) > self.cfg.steps:
            raise StaleError(
                f"checkpoint {ckpt} is at step {manifest['step']}, beyond train.steps = {self.cfg.steps}; "
                "raise train.steps or pass --fresh"
            )

    # -- loop

    def _run(self, resume: bool) -> None:
        """From step 0 or the latest checkpoint (``resume``) to ``cfg.steps``, then the
        final checkpoint; a stop signal checkpoints and raises Preempted."""
        try:
            self._start(resume)
            self._init_trackers()
            with StopRequest() as stop:
                self._loop(stop)
            self.save_checkpoint()
        finally:
            if self.shards is not None:
                self.shards.close()
            if self.cfg.log_with:
                self.acc.end_training()

    def _tracker_run(self) -> tuple[str, dict[str, Any]]:
        """(tracker run name, extra config) of this run."""
        return self.name, {"run_hash": self.hash}

    def _init_trackers(self) -> None:
        """One tracker run per training run, with the recipe as its config."""
        if not self.cfg.log_with:
            return
        hp = {k: v for k, v in to_dict(self.cfg).items() if isinstance(v, (int, float, str, bool))}
        name, extra = self._tracker_run()
        self.acc.init_trackers(name, config={**hp, **extra})

    def _start(self, resume: bool) -> None:
        log_path = self.run_dir / "train_log.jsonl"
        if resume:
            if not self.load_latest() and self.acc.is_main_process:
                print(f"{self.name}: --resume found no checkpoint in {self.checkpoints}; starting from step 0",
                      file=sys.stderr)
            if self.acc.is_main_process:
                truncate_log(log_path, self.step)
        elif list_checkpoints(self.checkpoints):
            raise ConfigError(
                f"{self.run_dir} already has checkpoints; pass --resume to continue or --fresh to start over"
            )

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
        """The micro-batches from the current step on, on the device (None for latents
        held on the device: no I/O to hide)."""
        if isinstance(self.latents, MemoryLatents):
            return None
        accum = self.cfg.grad_accum
        return train_batches(self.examples, self.latents, self.micro, self.acc.process_index, self.acc.num_processes,
                             self.seed, self.flip, self.step * accum, self.cfg.steps * accum, self.cfg.num_workers,
                             self.acc.device)

    def _loop(self, stop: StopRequest) -> None:
        log_path = self.run_dir / "train_log.jsonl"
        self.batches = self._batches()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"train {self.name}",
                   disable=not (self.progress and self.acc.is_main_process), dynamic_ncols=True)
        t0, seen, last_ckpt = time.perf_counter(), 0, time.monotonic()
        self._segment = t0
        while self.step < self.cfg.steps:
            loss, logs = self._optimizer_step()
            self.step += 1
            seen += self.cfg.batch_size
            rate = seen / max(1e-9, time.perf_counter() - t0)
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
                self._log(log_path, loss, logs, rate)
            stopping, overdue = self._agree(stop, last_ckpt)
            if stopping:
                bar.close()
                self.save_checkpoint()
                raise Preempted(f"{self.name}: stopped by {stop.name} at step {self.step}/{self.cfg.steps}; "
                                f"checkpoint saved; continue with {self.continue_with}", stop.signum)
            every = self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0
            if (every or overdue) and self.step < self.cfg.steps:
                self.save_checkpoint()
                last_ckpt = time.monotonic()
        done = self.state_record()  # this launch's time joins the total
        self.wall_s, self.device_s, self._segment = done["train_wall_s"], done["train_device_s"], None
        bar.close()

    def state_record(self) -> dict[str, Any]:
        """What a checkpoint's step.json keeps beside the step: the training time so far
        (``train_wall_s``, ``train_device_s`` = wall × processes, summed over resumes; the
        steps a preemption loses after the last checkpoint are not counted, as they made
        no weight), this launch's processes and device type, and the budgets the run was
        extended from (:func:`run_hash`)."""
        running = time.perf_counter() - self._segment if self._segment is not None else 0.0
        record = {"train_wall_s": self.wall_s + running,
                  "train_device_s": self.device_s + running * self.acc.num_processes,
                  "processes": self.acc.num_processes, "device": self.acc.device.type}
        return {**record, "extended_from": list(self.extended_from)} if self.extended_from else record

    def _agree(self, stop: StopRequest, last_ckpt: float) -> tuple[bool, bool]:
        """(stop now?, time-based checkpoint due?) as one decision for every process: a
        signal may reach only some of them, and their clocks differ, while saving a
        checkpoint is a collective."""
        minutes = self.cfg.checkpoint_minutes
        flags = [stop.signum is not None, bool(minutes) and time.monotonic() - last_ckpt >= 60 * minutes]
        if self.acc.num_processes == 1:
            return flags[0], flags[1]
        t = self.acc.reduce(torch.tensor(flags, dtype=torch.float32, device=self.acc.device), reduction="sum")
        return bool(t[0] > 0), bool(t[1] > 0)

    def _optimizer_step(self) -> tuple[float, dict[str, float]]:
        total, logs = 0.0, {}
        for a in range(self.cfg.grad_accum):
            k = self.step * self.cfg.grad_accum + a
            if isinstance(self.latents, MemoryLatents):
                idx = batch_indices(k, len(self.examples), self.micro, self.acc.process_index,
                                    self.acc.num_processes, self.seed)
                x, y = self.latents.batch(idx, self.flip, self.seed, k, self.acc.device), self.labels[idx].to(self.acc.device)
            else:  # images, or latents read from a disk cache
                x, y = next(self.batches)
            with self.acc.accumulate(self.wrapped), self.acc.autocast():
                if self.shards is not None and self.latents is None:
                    # accelerate's backward divides by the accumulation steps; so does this
                    loss, logs = sharded_backward(self.method, self.trained, x, y, self.shards, 1 / self.cfg.grad_accum)
                    self._check_finite(loss, logs)
                else:
                    loss, logs = self.wrapped(x, y, self.latents is not None)
                    self._check_finite(loss, logs)
                    self.acc.backward(loss)
                if self.acc.sync_gradients and self.cfg.grad_clip > 0:
                    self.acc.clip_grad_norm_(self.wrapped.parameters(), self.cfg.grad_clip)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            total += float(loss.detach()) / self.cfg.grad_accum
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.method)
        return total, logs

    def _check_finite(self, loss: torch.Tensor, logs: dict[str, float]) -> None:
        if not torch.isfinite(loss.detach()).all():
            terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
            ckpts = list_checkpoints(self.checkpoints)
            kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
            raise TrainingError(
                f"{self.name}: non-finite loss {float(loss.detach())} at step {self.step + 1} "
                f"(terms: {terms or 'none logged'}); {kept}; no results were written from this state. "
                f"Lower {self.lr_hint} or check the data"
            )

    def _log(self, path: Path, loss: float, logs: dict[str, float], rate: float) -> None:
        if not self.acc.is_main_process:
            return
        row = {"step": self.step, "loss": loss, "lr": self.sched.get_last_lr()[0], "images_per_s": rate,
               **{k: float(v) for k, v in logs.items()}}
        if self.cfg.log_with:
            self.acc.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


class Trainer(Loop):
    """Trains one method entry of a workspace (run folder ``runs/<experiment>/<method>/``,
    identity :func:`run_hash`); what the method's components need fitted is fitted
    first (:func:`spheregen.fit.fit_session`: a tokenizer spheregen trains).

    ``extension`` (:func:`spheregen.extension.extend`): ``entry`` is the new budget, and
    training continues the finished run's last checkpoint under the identity that
    records the budgets it was extended from."""

    def __init__(self, ws: Workspace, entry: MethodEntry, accelerator: Accelerator | None = None, progress: bool = True,
                 extension: Extension | None = None):
        self.ws = ws
        self.entry = entry
        super().__init__(entry.name, entry.train, ws.paths.run(entry.name), accelerator, progress)
        self.extension = extension
        self.extended_from = extension.history if extension is not None else ()
        self.hash = run_hash(ws, entry, self.extended_from)  # train() reads the folder's history
        self.seed, self.flip = ws.exp.seed, ws.exp.data.flip
        self.resume = False
        if extension is not None:
            self.continue_with = f"--extend-to {entry.train.steps}"

    # -- setup

    def _setup(self) -> None:
        from spheregen.fit import fit_session

        set_seed(self.ws.exp.seed, device_specific=True)
        data = self.ws.data
        with self.acc.main_process_first():  # the main process prepares the source (an Arrow cache) first
            self.examples = data.examples("train")
        self.labels = self.examples.labels
        self._check_batches()
        # every process builds at once: a component spheregen fits (a tokenizer it
        # trains) is fitted here by all processes together through the same loop, or
        # loaded when an earlier `spheregen fit` (or run) fitted it; the fit leaves the
        # random state as it found it, so the method's initialisation does not depend on it
        with fit_session(self.ws, resume=self.resume, progress=self.progress):
            method = self.ws.build_method(self.entry, self.acc.device)
        self._prepare(method)
        self.latents = self._latent_cache(method)

    def _latent_cache(self, method: Any) -> MemoryLatents | DiskLatents | None:
        flip = self.ws.exp.data.flip
        where, why = latent_cache.plan(method, self.cfg, len(self.examples), flip)
        main = self.progress and self.acc.is_main_process
        if main and self.cfg.cache_latents == "auto" and has(method, LatentMethod):
            print(f"{self.entry.name}: {'not caching' if where == 'off' else 'caching'} tokenizer latents ({why})",
                  file=sys.stderr)
        if where == "off":
            return None
        if where == "memory":
            return MemoryLatents.encode(method, self.examples, flip, self.acc.device, main, self.cfg.num_workers)
        tokenizer = getattr(self.entry.method.config, "tokenizer", None)
        key = latent_cache.identity(method, tokenizer, self.ws.data.key, flip)
        return DiskLatents.open(method, self.examples, flip, self.acc.device,
                                self.ws.paths.cache / "latents" / key, main, self.cfg.num_workers)

    # -- run folder

    def _lock_run_dir(self) -> None:
        """The main process takes the run folder's lock (one writer per run) before it
        deletes or writes anything there; it is held until training returns or fails."""
        if self.acc.is_main_process:
            self.lock = DirLock(self.run_dir, f"run folder of method '{self.entry.name}'").acquire()

    def _check_run_dir(self, resume: bool, fresh: bool) -> None:
        meta = self.run_dir / "run.json"
        if self.acc.is_main_process:
            if fresh:
                self._remove_run()
            check_owned(self.run_dir)
        self.acc.wait_for_everyone()
        if meta.is_file():
            record = _read_json(meta)
            old = record.get("config_hash")
            if self.extension is not None and old == self.extension.base_hash:
                if self.acc.is_main_process:  # what names an interrupted extension (_stale_hint)
                    atomic_write_json(meta, {**record, "extending": {"to_steps": self.cfg.steps,
                                                                     "config_hash": self.hash}})
            elif old != self.hash:
                raise ConfigError(
                    f"{self.run_dir} holds a run of a different config (hash {old}, now {self.hash}; "
                    f"{run_differences(record, self.ws, self.entry)}); "
                    "pass --fresh to delete it and retrain, or rename the method"
                )
        elif self.acc.is_main_process:
            mark_owned(self.run_dir)
            atomic_write_json(meta, {"config_hash": self.hash, "method": to_dict(self.entry),
                                     "data": to_dict(self.ws.exp.data), "data_key": self.ws.data.key,
                                     "seed": self.ws.exp.seed})

    def _remove_run(self) -> None:
        """--fresh: delete what spheregen wrote in the run folder (only a folder it
        marked as its own), keeping the lock file that this process holds."""
        if not self.run_dir.exists():
            return
        remove_owned(self.run_dir, self.ws.paths.runs_root, keep=(self.lock.path,) if self.lock else ())

    def save_final(self) -> Path:
        """final/weights.safetensors (the whole method, and its EMA) with config.json."""
        path = self.ws.paths.final(self.entry.name)
        state = self.acc.get_state_dict(self.wrapped)  # gathered through accelerate (FSDP-safe)
        if self.acc.is_main_process:
            model = {k[len("method."):]: v for k, v in state.items() if k.startswith("method.")}
            model.update({k: v for k, v in self.method.state_dict().items() if k not in model})  # frozen parts
            spec = self.ws.data.spec
            meta = {"config_hash": self.hash, "step": self.step, "entry": to_dict(self.entry),
                    "data": {"image_size": spec.image_size, "channels": spec.channels, "num_classes": spec.num_classes},
                    "data_key": self.ws.data.key, "seed": self.ws.exp.seed, "experiment": self.ws.exp.name,
                    "extended_from": list(self.extended_from), "train_cost": self.state_record()}
            write_final(path.parent, model, self.ema.state_dict() if self.ema is not None else None, meta)
            if self.extension is not None:
                self._record_extension()
        self.acc.wait_for_everyone()
        return path

    def _record_extension(self) -> None:
        """run.json takes the extended run's identity once its final weights are written
        (until then the folder's final weights are the finished run's, and stay usable
        under its config), with the history of budgets."""
        meta = self.run_dir / "run.json"
        record = {k: v for k, v in _read_json(meta).items() if k != "extending"}
        ext = self.extension
        history = [*record.get("history", []),
                   {"from_steps": ext.from_steps, "from_hash": ext.base_hash, "to_steps": self.cfg.steps,
                    "config_hash": self.hash, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        atomic_write_json(meta, {**record, "config_hash": self.hash, "method": to_dict(self.entry),
                                 "extended_from": list(ext.history), "history": history})

    def _continues(self, manifest: dict[str, Any]) -> bool:
        ext = self.extension
        return ext is not None and manifest.get("config_hash") == ext.base_hash \
            and int(manifest["step"]) == ext.from_steps

    def _stale_hint(self) -> str:
        meta = self.run_dir / "run.json"
        extending = _read_json(meta).get("extending") if meta.is_file() else None
        if not extending:
            return ""
        to = extending["to_steps"]
        return (f", or continue the extension of this run to {to} steps that wrote it: "
                f"spheregen train {self.ws.exp.source} --method {self.entry.name} --extend-to {to}")

    # -- loop

    def train(self, resume: bool = False, fresh: bool = False) -> Path:
        self.resume = resume  # also continues an interrupted fit of the method's components
        if self.extension is None and not fresh:
            # weights this folder extended under this config keep their identity (e.g.
            # --resume after a preemption); --fresh trains in one go whatever it held
            self.extended_from = run_history(self.ws, self.entry)
            self.hash = run_hash(self.ws, self.entry, self.extended_from)
        self._setup()  # builds everything first: a config or weights error writes nothing
        self._lock_run_dir()
        try:
            self._check_run_dir(resume, fresh)
            # TF32 for the method's steps only: the fit stage and the latent cache (in
            # _setup) are shared with runs without it
            with precision.tf32(self.cfg.tf32):
                self._run(resume)
            return self.save_final()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _tracker_run(self) -> tuple[str, dict[str, Any]]:
        """One tracker run per method, named after it."""
        return self.entry.name, {"method": self.entry.method.name, "run_hash": self.hash,
                                 "experiment": self.ws.exp.name}


class PhaseTrainer(Loop):
    """Trains one :class:`spheregen.interfaces.FitPhase` of a fit (:mod:`spheregen.fit`
    drives the phases, their folder, lock and identity): ``examples`` in the phase's
    ``cfg`` (the component's recipe in the experiment's launch settings), seeded by the
    recipe, checkpoints under ``run_dir``."""

    lr_hint = "the component's lr"

    def __init__(self, name: str, module: torch.nn.Module, cfg: TrainConfig, examples: Any, seed: int,
                 run_dir: Path, run_hash: str, accelerator: Accelerator | None = None, progress: bool = True):
        super().__init__(name, cfg, run_dir, accelerator, progress)
        self.module, self.examples, self.seed, self.flip, self.hash = module, examples, seed, False, run_hash

    def train(self, resume: bool = False) -> None:
        set_seed(self.seed, device_specific=True)
        self._check_batches()
        self.module.train()
        self._prepare(self.module)
        self._run(resume)
        self.module.eval()


def truncate_log(path: Path, step: int) -> None:
    """Keep the log rows of steps <= ``step`` (the checkpoint resumed from): the steps
    after it are trained again and would otherwise be logged twice."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if _log_step(line) <= step]
    if len(kept) != len(rows):
        atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))


def _log_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut by the kill: drop it
        return math.inf


class LossForward(torch.nn.Module):
    """Routes ``forward`` to ``method.loss`` (or ``method.latent_loss`` on cached
    latents): under DDP the loss must run through the wrapper's forward for gradients to
    be all-reduced, and methods only promise ``loss``.

    Its state dict (what a checkpoint saves) holds the trained parameters and the
    buffers only: a frozen tokenizer is rebuilt from its own weights or cache when the
    run resumes, not copied into every checkpoint; loading puts the frozen parameters'
    current values back before the strict key check (both hooks work under DDP, whose
    recursive save and load call them with its ``module.`` prefix)."""

    def __init__(self, method: torch.nn.Module):
        super().__init__()
        self.method = method
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_restore_frozen)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, latent: bool = False
                ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.method.latent_loss(inputs, labels) if latent else self.method.loss(inputs, labels)


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim",
                    "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def check_trackers(names: tuple[str, ...]) -> None:
    """Every tracker of ``train.log_with`` importable, or a ConfigError naming the package
    and the extra that installs it (before any work)."""
    import importlib.util

    for name in names:
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            extra = "pip install 'spheregen[tracking]'" if name == "tensorboard" else f"pip install {package}"
            raise ConfigError(f"train.log_with names '{name}', but the package '{package}' is not installed: "
                              f"{extra}, or remove it from log_with")


def _frozen(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if not p.requires_grad]


def _drop_frozen(module: torch.nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for name, _ in _frozen(module):
        state.pop(prefix + name, None)


def _restore_frozen(module: torch.nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    for name, p in _frozen(module):
        state.setdefault(prefix + name, p.detach())


def train(ws: Workspace, entry: MethodEntry, resume: bool = False, fresh: bool = False,
          accelerator: Accelerator | None = None, progress: bool = True) -> Path:
    return Trainer(ws, entry, accelerator, progress).train(resume=resume, fresh=fresh)


def train_changed(ws: Workspace, entry: MethodEntry, resume: bool = False, fresh: bool = False) -> tuple[Path, bool]:
    """:func:`train`, and whether it changed the final weights file (:func:`weights_digest`
    before and after; a finished run's resume leaves it byte-identical). ``spheregen run``
    keeps a method's samples and result rows only when it did not: their identity is the
    run's config, which weights retrained under the same config share (an interrupted
    --fresh, a deleted run folder, a changed spheregen)."""
    before = weights_digest(ws, entry)
    path = train(ws, entry, resume=resume, fresh=fresh)
    return path, weights_digest(ws, entry) != before


def load_trained(ws: Workspace, entry: MethodEntry, use_ema: bool = True, device: torch.device | None = None) -> torch.nn.Module:
    """The trained method in eval mode (EMA weights when present and asked for)."""
    path = ws.paths.final(entry.name)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: train method '{entry.name}' first (spheregen train {ws.exp.source})")
    model, ema, meta = read_final(path.parent)
    expected = run_hash(ws, entry)
    if meta.get("config_hash") != expected:
        raise StaleError(
            f"{path} was trained with another config (hash {meta.get('config_hash')}, the experiment now gives "
            f"{expected}; {run_differences(meta, ws, entry)}): re-run "
            f"`spheregen train {ws.exp.source} --method {entry.name}` (add --fresh to replace it)"
        )
    method = ws.build_method(entry, device)
    method.load_state_dict({**model, **ema} if use_ema and ema is not None else model)
    return method.to(device or ws.device).eval()
