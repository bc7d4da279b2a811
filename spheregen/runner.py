"""Training on accelerate: one method of an experiment, with checkpoints and resume.

Batches are drawn by a pure function of the micro-step index (a seeded permutation per
epoch, sharded by process), not by a DataLoader's iterator state. That makes resume
exact (no sampler state to restore) and makes N processes with per-process batch B/N
see exactly the global batches of one process with batch B.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from spheregen.config import config_hash, to_dict
from spheregen.data import to_float
from spheregen.errors import CheckpointError, ConfigError, TrainingError
from spheregen.experiment import MethodEntry, TrainConfig
from spheregen.paths import atomic_write, atomic_write_json, replace_dir
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
    """Exponential moving average of a module's floating-point parameters; buffers are
    copied. Checkpointed through accelerate's ``register_for_checkpointing``."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)


# ---------------------------------------------------------------- batches


def batch_indices(k: int, n: int, batch: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Indices of micro-batch ``k`` for process ``rank``: a shard of the k-th global
    batch of a seeded per-epoch permutation (drop_last)."""
    global_batch = batch * world
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ConfigError(
            f"train.batch_size × processes = {global_batch} exceeds the {n} training examples; lower train.batch_size"
        )
    epoch, j = divmod(k, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = j * global_batch + rank * batch
    return perm[start:start + batch]


def flip_mask(n: int, seed: int, k: int) -> torch.Tensor:
    """Which of micro-batch k's n images are mirrored (a pure function of seed and k)."""
    g = torch.Generator().manual_seed(seed * 7919 + k)
    return torch.rand(n, generator=g) < 0.5


def make_batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, flip: bool, seed: int, k: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = to_float(images[idx])
    if flip:
        mask = flip_mask(len(idx), seed, k)
        x[mask] = x[mask].flip(-1)
    return x.to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)


class LatentCache:
    """The training split through a frozen tokenizer, encoded once: ``latents[o]`` is
    N×latent_shape for orientation o (0: as stored, 1: mirrored, present with flip)."""

    def __init__(self, latents: list[torch.Tensor]):
        self.latents = latents

    @classmethod
    def usable(cls, method: Any, cfg: Any, n: int, flip: bool) -> tuple[bool, str]:
        """(cache?, why) for a method and train config on n examples."""
        tokenizer = getattr(method, "tokenizer", None)
        if cfg.cache_latents == "off":
            return False, "train.cache_latents = off"
        if not hasattr(method, "latent_loss") or tokenizer is None or getattr(tokenizer, "trainable", True):
            return False, "the method has no frozen tokenizer with latent_loss"
        if getattr(tokenizer, "lossless", False):
            return False, "the tokenizer is lossless (its latents are the pixels)"
        size = math.prod(tokenizer.latent_shape) * 4 * n * (2 if flip else 1) / 2**30
        if size > cfg.cache_latents_max_gb:
            return False, f"the latents take {size:.1f} GB > train.cache_latents_max_gb = {cfg.cache_latents_max_gb}"
        return True, f"{size * 1024:.1f} MB"

    @classmethod
    @torch.no_grad()
    def encode(cls, method: Any, images: torch.Tensor, flip: bool, device: torch.device, batch: int = 256,
               progress: bool = True) -> "LatentCache":
        orientations = (False, True) if flip else (False,)
        out = []
        for mirrored in orientations:
            parts = []
            desc = f"encode latents{' (mirrored)' if mirrored else ''}"
            for i in tqdm(range(0, len(images), batch), desc=desc, leave=False, disable=not progress):
                x = to_float(images[i:i + batch]).to(device)
                parts.append(method.encode(x.flip(-1) if mirrored else x))
            out.append(torch.cat(parts))
        return cls(out)

    def batch(self, idx: torch.Tensor, flip: bool, seed: int, k: int) -> torch.Tensor:
        """The latents of micro-batch k, mirrored where :func:`make_batch` would mirror."""
        z = self.latents[0][idx.to(self.latents[0].device)]
        if flip:
            mask = flip_mask(len(idx), seed, k).to(z.device)
            z[mask] = self.latents[1][idx.to(z.device)[mask]]
        return z


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


def run_hash(ws: Workspace, entry: MethodEntry) -> str:
    """Identity of a training run: data, the method config, its train config, the seed.
    Sampler, guidance and step counts are left out: they only change evaluation, so
    changing them re-samples without retraining."""
    training = {"name": entry.name, "method": entry.method, "train": entry.train}
    return config_hash({"data": ws.exp.data, "method": training, "seed": ws.exp.seed})


def same_run(recorded: str | None, ws: Workspace, entry: MethodEntry) -> bool:
    """Whether a run.json hash names this entry's training run. Runs recorded before
    the identity left out guidance/sampler/steps (spheregen 0.1, session 1) carry the
    old hash of the whole entry; it is accepted too, so they need no retraining."""
    legacy = config_hash({"data": ws.exp.data, "method": entry, "seed": ws.exp.seed})
    return recorded is not None and recorded in (run_hash(ws, entry), legacy)


def is_trained(ws: Workspace, entry: MethodEntry) -> bool:
    """Final weights exist for exactly this run's config."""
    meta = ws.paths.run(entry.name) / "run.json"
    return ws.paths.final(entry.name).is_file() and meta.is_file() and \
        same_run(json.loads(meta.read_text()).get("config_hash"), ws, entry)


class Trainer:
    """Trains one method entry of a workspace."""

    def __init__(self, ws: Workspace, entry: MethodEntry, accelerator: Accelerator | None = None, progress: bool = True):
        self.ws = ws
        self.entry = entry
        self.cfg = entry.train
        self.acc = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=self.cfg.mixed_precision,
            gradient_accumulation_steps=self.cfg.grad_accum,
        )
        self.progress = progress
        self.run_dir = ws.paths.run(entry.name)
        self.hash = run_hash(ws, entry)

    # -- setup

    def _setup(self) -> None:
        set_seed(self.ws.exp.seed, device_specific=True)
        data = self.ws.data
        if self.acc.is_main_process:
            _ = data.train  # materialise (and cache) the split once before the others read it
        self.acc.wait_for_everyone()
        self.images, self.labels = data.train.images, data.train.labels
        batch_indices(0, len(self.images), self.cfg.batch_size, 0, self.acc.num_processes, 0)  # fits the data?
        # the main process builds first: a component that fits something at build time
        # (a tokenizer trained by spheregen) trains once and the others load its cache
        with self.acc.main_process_first():
            method = self.ws.build_method(self.entry, self.acc.device)
        groups = [
            {"params": [p for p in g["params"] if p.requires_grad], "lr": self.cfg.lr * g.get("lr_scale", 1.0)}
            for g in method.param_groups()
        ]
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg))
        self.method = method
        # the scheduler is stepped by hand once per optimizer step: accelerate's wrapper
        # would step it once per process, which changes the schedule with the world size
        self.wrapped, self.opt = self.acc.prepare(LossForward(method), opt)
        self.sched = sched
        self.acc.register_for_checkpointing(self.sched)
        self.latents = self._latent_cache(method)
        self.ema = EMA(method, self.cfg.ema_decay) if self.cfg.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.module.to(self.acc.device)
            self.acc.register_for_checkpointing(self.ema)
        self.step = 0

    def _latent_cache(self, method: Any) -> LatentCache | None:
        flip = self.ws.exp.data.flip
        ok, why = LatentCache.usable(method, self.cfg, len(self.images), flip)
        if self.progress and self.acc.is_main_process and self.cfg.cache_latents == "auto" and \
                hasattr(method, "latent_loss"):
            print(f"{self.entry.name}: {'caching' if ok else 'not caching'} tokenizer latents ({why})", file=sys.stderr)
        if not ok:
            return None
        return LatentCache.encode(method, self.images, flip, self.acc.device,
                                  progress=self.progress and self.acc.is_main_process)

    # -- checkpoints

    def _check_run_dir(self, resume: bool, fresh: bool) -> None:
        meta = self.run_dir / "run.json"
        if fresh and self.acc.is_main_process and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.acc.wait_for_everyone()
        if meta.is_file():
            old = json.loads(meta.read_text()).get("config_hash")
            if not same_run(old, self.ws, self.entry):
                raise ConfigError(
                    f"{self.run_dir} holds a run of a different config (hash {old}, now {self.hash}); "
                    "pass --fresh to delete it and retrain, or rename the method"
                )
        elif self.acc.is_main_process:
            atomic_write_json(meta, {"config_hash": self.hash, "method": to_dict(self.entry),
                                     "data": to_dict(self.ws.exp.data), "seed": self.ws.exp.seed})

    def save_checkpoint(self) -> Path:
        root = self.ws.paths.checkpoints(self.entry.name)
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-step-{self.step:07d}"
        self.acc.wait_for_everyone()
        # every process writes its own RNG state into the same folder; the main process
        # seals it with a manifest and moves it into place
        if self.acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / "step.json").write_text(json.dumps({"step": self.step}))
            write_manifest(tmp, self.step, self.hash)
            replace_dir(tmp, final)
            for old in list_checkpoints(root)[:-2]:  # keep the last two good checkpoints
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def load_latest(self) -> bool:
        ckpts = list_checkpoints(self.ws.paths.checkpoints(self.entry.name))
        if not ckpts:
            return False
        latest = ckpts[-1]
        try:
            manifest = verify_checkpoint(latest)
        except CheckpointError as exc:
            prev = f"; the previous checkpoint {ckpts[-2]} is intact: delete {latest} to resume from it" if len(ckpts) > 1 else ""
            raise CheckpointError(f"{exc}{prev}") from exc
        self.acc.load_state(str(latest))
        self.step = int(manifest["step"])
        return True

    def save_final(self) -> Path:
        path = self.ws.paths.final(self.entry.name)
        if self.acc.is_main_process:
            blob = {
                "model": self.method.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step,
                "config_hash": self.hash,
            }
            atomic_write(path, lambda p: torch.save(blob, p))
        self.acc.wait_for_everyone()
        return path

    # -- loop

    def train(self, resume: bool = False, fresh: bool = False) -> Path:
        self._setup()  # builds everything first: a config or weights error writes nothing
        self._check_run_dir(resume, fresh)
        if resume:
            self.load_latest()
        elif list_checkpoints(self.ws.paths.checkpoints(self.entry.name)):
            raise ConfigError(
                f"{self.run_dir} already has checkpoints; pass --resume to continue or --fresh to start over"
            )
        log_path = self.run_dir / "train_log.jsonl"
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"train {self.entry.name}",
                   disable=not (self.progress and self.acc.is_main_process), dynamic_ncols=True)
        t0, seen = time.perf_counter(), 0
        while self.step < self.cfg.steps:
            loss, logs = self._optimizer_step()
            self.step += 1
            seen += self.cfg.batch_size * self.cfg.grad_accum * self.acc.num_processes
            rate = seen / max(1e-9, time.perf_counter() - t0)
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
                self._log(log_path, loss, logs, rate)
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.step < self.cfg.steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        return self.save_final()

    def _optimizer_step(self) -> tuple[float, dict[str, float]]:
        total, logs = 0.0, {}
        for a in range(self.cfg.grad_accum):
            k = self.step * self.cfg.grad_accum + a
            idx = batch_indices(k, len(self.images), self.cfg.batch_size, self.acc.process_index,
                                self.acc.num_processes, self.ws.exp.seed)
            flip, seed = self.ws.exp.data.flip, self.ws.exp.seed
            if self.latents is not None:
                x, y = self.latents.batch(idx, flip, seed, k), self.labels[idx].to(self.acc.device)
            else:
                x, y = make_batch(self.images, self.labels, idx, flip, seed, k, self.acc.device)
            with self.acc.accumulate(self.wrapped), self.acc.autocast():
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
            ckpts = list_checkpoints(self.ws.paths.checkpoints(self.entry.name))
            kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
            raise TrainingError(
                f"{self.entry.name}: non-finite loss {float(loss.detach())} at step {self.step + 1} "
                f"(terms: {terms or 'none logged'}); {kept}; no results were written from this state. "
                "Lower train.lr or check the data"
            )

    def _log(self, path: Path, loss: float, logs: dict[str, float], rate: float) -> None:
        if not self.acc.is_main_process:
            return
        row = {"step": self.step, "loss": loss, "lr": self.sched.get_last_lr()[0], "images_per_s": rate,
               **{k: float(v) for k, v in logs.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


class LossForward(torch.nn.Module):
    """Routes ``forward`` to ``method.loss`` (or ``method.latent_loss`` on cached
    latents): under DDP the loss must run through the wrapper's forward for gradients to
    be all-reduced, and methods only promise ``loss``."""

    def __init__(self, method: torch.nn.Module):
        super().__init__()
        self.method = method

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, latent: bool = False
                ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.method.latent_loss(inputs, labels) if latent else self.method.loss(inputs, labels)


def train(ws: Workspace, entry: MethodEntry, resume: bool = False, fresh: bool = False,
          accelerator: Accelerator | None = None, progress: bool = True) -> Path:
    return Trainer(ws, entry, accelerator, progress).train(resume=resume, fresh=fresh)


def load_trained(ws: Workspace, entry: MethodEntry, use_ema: bool = True, device: torch.device | None = None) -> torch.nn.Module:
    """The trained method in eval mode (EMA weights when present and asked for)."""
    path = ws.paths.final(entry.name)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: train method '{entry.name}' first (spheregen train {ws.exp.source})")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__}: {exc}); retrain with --fresh") from exc
    method = ws.build_method(entry, device)
    state = blob["ema"] if use_ema and blob.get("ema") is not None else blob["model"]
    method.load_state_dict(state)
    return method.to(device or ws.device).eval()
