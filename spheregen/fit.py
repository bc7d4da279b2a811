"""The fit stage: what a component needs trained before it can be used (the RAE decoder
and its MAE encoder, the domain classifier), trained by the methods' accelerate loop.

A component declares :class:`~spheregen.interfaces.FittableComponent` (``fit_spec()``:
phases, each a module with ``loss(images, labels)`` and a recipe, or a gradient-free
statistics pass) and its factory calls :func:`load_fitted`, which only loads: the fitted
weights of the component's identity (its ``FitSpec.identity``, the data's key and the
mixed precision) from ``<cache>/fit/<name>/<data>-<key>/weights.safetensors``. Who
fits:

* ``spheregen fit EXPERIMENT.toml`` (:func:`fit_experiment`), and ``run`` before its
  other stages, and every method's :class:`~spheregen.runner.Trainer` before it builds:
  inside a :func:`fit_session`, every process of the launch fits together (distributed,
  mixed precision and accumulation of the experiment's ``[train]``, checkpoints with
  manifests in ``<fit folder>/<i>-<phase>/checkpoints``, ``--resume``, SIGTERM
  preemption, a progress bar and ``train_log.jsonl`` per phase, one lock per folder),
  reading the training split through the streaming ``Examples`` path;
* a build outside a session (Python use, unit tests, the contract tests) fits on demand,
  the same way, on the context's own data, in a single process;
* the other commands (``sample``, ``evaluate``, ``score``, ...) only load: missing
  weights are an error naming ``spheregen fit EXPERIMENT.toml`` (:func:`on_demand`).

Resume: each finished phase leaves the component's fitted state so far in
``<i>-<phase>/done.safetensors``; ``--resume`` loads the last one and continues the
running phase from its checkpoint, which holds the trained module, optimizer, schedule
and every RNG stream, so a killed and resumed fit ends bit-identical to an
uninterrupted one. A fit leaves the caller's random state as it found it.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from spheregen import distributed
from spheregen.config import config_hash, to_dict
from spheregen.data import collate, to_float
from spheregen.errors import CheckpointError, ConfigError, WeightsError
from spheregen.experiment import MethodEntry, TrainConfig
from spheregen.interfaces import BuildContext, FitPhase, FitRecipe, FitSpec, FitStatistics, FittableComponent, require
from spheregen.paths import DirLock, atomic_write, atomic_write_json, check_owned, mark_owned, remove_owned

WEIGHTS = "weights.safetensors"
META = "fit.json"
DONE = "done.safetensors"
DONE_INFO = "done.json"
REPORT_BATCH = 256
TRAIN_PROBE = 512  # images the report reads from the training split when there is no held-out one


@attrs.frozen(kw_only=True)
class FitResult:
    """A fitted component's files: ``key`` (its identity hash), ``folder`` and
    ``weights`` (None when fitted without a cache folder), ``info`` (what the fit
    measured: per-phase steps, losses and seconds, the report's scores) and whether it
    was ``fitted_now`` rather than loaded."""

    name: str
    key: str
    folder: Path | None
    weights: Path | None
    info: dict[str, Any]
    fitted_now: bool


class TensorPairs(Dataset):
    """(uint8 C×H×W image, int label) pairs of in-memory tensors: the dataset a fit reads
    when a context holds tensors rather than the experiment's streamed split (the same
    pixels, row for row)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"need equally many images and labels, got {len(images)} and {len(labels)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


# ---------------------------------------------------------------- who may fit


@attrs.define
class _Session:
    """A fit stage in progress: every process fits what the builds inside it need, on
    the experiment's streamed data, with its launch settings."""

    data_key: str
    train: Callable[[], Dataset]
    test: Callable[[], Dataset | None]
    launch: TrainConfig
    resume: bool
    fresh: bool
    progress: bool
    source: str
    results: dict[str, FitResult] = attrs.Factory(dict)


_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("spheregen_fit_session", default=None)
_ON_DEMAND: contextvars.ContextVar[bool] = contextvars.ContextVar("spheregen_fit_on_demand", default=True)


@contextlib.contextmanager
def on_demand(allowed: bool) -> Iterator[None]:
    """Whether a build outside a :func:`fit_session` may fit what is missing (True by
    default: Python use and tests); the CLI turns it off, so only ``fit``, ``run`` and
    ``train`` fit and every other command only loads."""
    token = _ON_DEMAND.set(allowed)
    try:
        yield
    finally:
        _ON_DEMAND.reset(token)


@contextlib.contextmanager
def fit_session(ws: Any, resume: bool = False, fresh: bool = False, progress: bool = True) -> Iterator[_Session]:
    """Builds inside fit what they need on ``ws``'s data (the training split streamed
    from the source, the test split for reports), as one stage of every process:
    ``resume`` continues interrupted fits, ``fresh`` refits each component once."""

    def opened(split: str) -> Callable[[], Dataset]:
        def get() -> Dataset:
            with distributed.state().main_process_first():  # the main process prepares an Arrow cache first
                return ws.data.examples(split)
        return get

    session = _Session(data_key=ws.data.key, train=opened("train"), test=opened("test"), launch=ws.exp.train,
                       resume=resume, fresh=fresh, progress=progress, source=str(ws.exp.source))
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


def fit_experiment(ws: Any, entries: list[MethodEntry] | None = None, metrics: bool = True, resume: bool = False,
                   fresh: bool = False, progress: bool = True) -> list[FitResult]:
    """Fit every component that the experiment's metrics (with ``metrics``) and methods
    (``entries``, default all) build and that declares a fit (feature extractors,
    tokenizers), skipping those already fitted for the same identity. Every process of a
    launch calls it (the fits are collective). Returns what was fitted or found."""
    entries = list(ws.exp.methods) if entries is None else entries
    if metrics and ws.exp.eval.metrics:
        with distributed.state().main_process_first():  # the metrics' in-memory splits: decoded once
            ws.data.splits()
    with fit_session(ws, resume=resume, fresh=fresh, progress=progress) as session:
        if metrics:  # first: an unusable feature space fails before a tokenizer's fit
            ws.build_metrics(ws.device)
        for entry in entries:
            ws.build_method(entry, ws.device)
    return list(session.results.values())


# ---------------------------------------------------------------- load (and fit)


def load_fitted(component: Any, ctx: Any) -> FitResult:
    """Load ``component``'s fitted weights (``FitSpec.load``) for the data of ``ctx`` (a
    BuildContext or MetricContext), fitting them first inside a fit stage or where
    on-demand fitting is allowed; otherwise a WeightsError naming ``spheregen fit``."""
    require(component, FittableComponent, "load_fitted", "give the component fit_spec() -> FitSpec")
    spec: FitSpec = component.fit_spec()
    source = _Source.of(ctx)
    session = _SESSION.get()
    if session is not None and session.data_key != source.key:
        session = None  # another dataset than the stage's: fitted as outside it
    launch = session.launch if session is not None else TrainConfig()
    precision = _live_precision(launch.mixed_precision)
    key = config_hash({"fit": spec.name, "identity": spec.identity, "data_key": source.key, "mixed_precision": precision})
    with _kept_rng(), contextlib.ExitStack() as stack:
        root = source.cache_dir if source.cache_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder = root / "fit" / spec.name / f"{slug(source.key)}-{key}"
        if session is not None and session.fresh and str(folder) not in session.results:
            _remove(folder, root / "fit")
        fitted_now = False
        if not _agreed(_is_fitted(folder, key)):
            _check_may_fit(spec, folder, source, session)
            train = session.train if session is not None else source.train
            test = session.test if session is not None else source.test
            resume = session.resume if session is not None else False
            progress = session.progress if session is not None else False
            _fit(spec, folder, key, source.key, train, test, attrs.evolve(launch, mixed_precision=precision),
                 resume, progress)
            fitted_now = True
        state, meta = _read(folder, key)
        spec.load(state, meta["info"])
        keep = source.cache_dir is not None
        result = FitResult(name=spec.name, key=key, folder=folder if keep else None,
                           weights=folder / WEIGHTS if keep else None, info=meta["info"], fitted_now=fitted_now)
    if session is not None:
        session.results.setdefault(str(folder), result)
    return result


@attrs.frozen(kw_only=True)
class _Source:
    """The data a context offers a fit: its key, cache folder and splits (opened lazily:
    a cache hit under a known key never reads the data)."""

    key: str
    cache_dir: Path | None
    train: Callable[[], Dataset | None]
    test: Callable[[], Dataset | None]

    @classmethod
    def of(cls, ctx: Any) -> "_Source":
        cache = Path(ctx.cache_dir) if ctx.cache_dir is not None else None
        if isinstance(ctx, BuildContext):
            if ctx.train_data is None:
                return cls(key=ctx.data_key or "no-data", cache_dir=cache, train=lambda: None, test=lambda: None)
            data: list[tuple[torch.Tensor, torch.Tensor]] = []

            def train() -> Dataset:
                if not data:
                    data.append(ctx.train_data())
                return TensorPairs(*data[0])

            key = ctx.data_key
            if key is None:  # no dataset identity: the content's
                pairs = train()
                key = data_fingerprint(pairs.images, pairs.labels)
            return cls(key=key, cache_dir=cache, train=train, test=lambda: None)
        return cls(key=ctx.dataset_key, cache_dir=cache,
                   train=lambda: TensorPairs(ctx.train_images, ctx.train_labels),
                   test=lambda: TensorPairs(ctx.test_images, ctx.test_labels) if len(ctx.test_images) else None)


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A short hash identifying a training set (its shape, up to 512 evenly spaced images
    and all labels), used when the context carries no dataset key."""
    h = hashlib.sha256(str((tuple(images.shape), str(images.dtype))).encode())
    step = max(1, len(images) // 512)
    h.update(images[::step].contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def slug(text: str) -> str:
    """A file-name-safe prefix of a data key (folder names stay readable)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")[:40] or "data"


def _check_may_fit(spec: FitSpec, folder: Path, source: _Source, session: _Session | None) -> None:
    if session is None and not _ON_DEMAND.get():
        raise WeightsError(
            f"{spec.name}: no fitted weights for this config and data (looked in {folder}); fit them first with "
            "`spheregen fit EXPERIMENT.toml` (`spheregen run` and `spheregen train` fit before they train)"
        )
    if session is None and distributed.state().num_processes > 1:
        raise WeightsError(
            f"{spec.name}: no fitted weights for this config and data (looked in {folder}), and a component is "
            "not fitted inside one process of a multi-process launch: run `spheregen fit EXPERIMENT.toml` "
            "(under the same launcher) first"
        )
    if session is None and source.train() is None:
        raise WeightsError(
            f"{spec.name}: no fitted weights for this config and no training data to fit them on "
            "(ctx.train_data is None); fit them with `spheregen fit EXPERIMENT.toml`, build the component "
            "inside an experiment, or give the BuildContext a train_data callable"
        )


def _live_precision(default: str) -> str:
    """The mixed precision of this process's accelerate state when one is live (it
    cannot change within a process), else ``default``."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    return str(state.get("_mixed_precision") or default) if state else default


@contextlib.contextmanager
def _kept_rng() -> Iterator[None]:
    """Every random stream a fit seeds (torch CPU and CUDA, numpy, Python) back as it was."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _agreed(flag: bool) -> bool:
    """The main process's answer on every process (a fit is collective)."""
    st = distributed.state()
    if st.num_processes == 1:
        return flag
    box = [flag]
    torch.distributed.broadcast_object_list(box, src=0)
    return bool(box[0])


def _is_fitted(folder: Path, key: str) -> bool:
    meta = folder / META
    if not (folder / WEIGHTS).is_file() or not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def _read(folder: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        meta = json.loads((folder / META).read_text())
        state = load_file(str(folder / WEIGHTS))
    except Exception as exc:
        raise CheckpointError(f"{folder} holds corrupt fitted weights ({type(exc).__name__}: {exc}); refit with "
                              "`spheregen fit EXPERIMENT.toml --fresh`") from exc
    if meta.get("key") != key:
        raise CheckpointError(f"{folder / META} belongs to another fit (key {meta.get('key')}, expected {key}); "
                              "refit with `spheregen fit EXPERIMENT.toml --fresh`")
    return state, meta


def _remove(folder: Path, root: Path) -> None:
    st = distributed.state()
    if st.is_main_process and folder.exists():
        with DirLock(folder, "fit folder"):
            remove_owned(folder, root, keep=(folder / ".spheregen-lock",))
    distributed.barrier()


# ---------------------------------------------------------------- the fit


def phase_config(recipe: FitRecipe, launch: TrainConfig, n: int) -> TrainConfig:
    """The TrainConfig of one phase: the component's recipe (a batch larger than the
    training split is the split) in the launch settings of ``launch``, without the
    method-training speed options (TF32, compile, fused AdamW, activation checkpointing):
    a fit's identity records the launch's mixed precision alone, and its phases' modules
    list no blocks to checkpoint."""
    batch = min(recipe.batch_size, n)
    steps = recipe.steps if recipe.steps is not None else recipe.epochs * max(1, n // batch)
    return attrs.evolve(launch, steps=steps, batch_size=batch, lr=recipe.lr, min_lr_ratio=recipe.min_lr_ratio,
                        warmup_fraction=recipe.warmup_fraction, weight_decay=recipe.weight_decay,
                        betas=tuple(recipe.betas), grad_clip=recipe.grad_clip, ema_decay=0.0, cache_latents="off",
                        tf32=False, compile=False, fused_adamw=False, activation_checkpointing=False)


def _fit(spec: FitSpec, folder: Path, key: str, data_key: str, train_split: Callable[[], Dataset],
         test_split: Callable[[], Dataset | None], launch: TrainConfig, resume: bool, progress: bool) -> None:
    from spheregen.runner import PhaseTrainer

    st = distributed.state()
    # another job of `run --jobs N` may be fitting the same component: wait for it, then
    # load what it fitted instead of fitting it twice
    lock = DirLock(folder, f"fit folder of {spec.name}").acquire(wait=True) if st.is_main_process else None
    try:
        if _agreed(_is_fitted(folder, key)):
            return
        if st.is_main_process:
            check_owned(folder)
            mark_owned(folder)
            atomic_write_json(folder / "identity.json", {"key": key, "name": spec.name, "data_key": data_key,
                                                         "identity": to_dict(spec.identity),
                                                         "mixed_precision": launch.mixed_precision})
        st.wait_for_everyone()
        train = train_split()
        phases = list(spec.phases())
        start = _resume_point(spec, phases, folder, resume)
        for i, phase in enumerate(phases[start:], start):
            pdir = folder / f"{i}-{phase.name}"
            label = f"{spec.name}:{phase.name}"
            t0 = time.perf_counter()
            if isinstance(phase, FitStatistics):
                _statistics(phase, train, launch.num_workers)
                done = {"seconds": time.perf_counter() - t0}
            else:
                cfg = _phase_config(spec, phase, launch, len(train))
                if phase.start is not None:
                    phase.start()
                PhaseTrainer(label, phase.module, cfg, train, phase.recipe.seed, pdir,
                             config_hash({"fit": key, "phase": i, "name": phase.name}), progress=progress
                             ).train(resume=resume)
                if phase.finish is not None:
                    phase.finish()
                done = {"steps": cfg.steps, "batch_size": cfg.batch_size, "loss": _tail_loss(pdir, cfg.steps),
                        "seconds": time.perf_counter() - t0}
            _save_done(spec, pdir, done)
        info = {"phases": {p.name: _done_info(folder / f"{i}-{p.name}") for i, p in enumerate(phases)}}
        info["seconds"] = sum(p.get("seconds", 0.0) for p in info["phases"].values())
        if spec.report is not None:
            test = test_split()  # on every process: opening a split may be a collective (the Arrow cache)
            if st.is_main_process:
                info.update(_report(spec, train, test))
        if st.is_main_process:
            _write_final(spec, folder, key, data_key, info)
        st.wait_for_everyone()
    finally:
        if lock is not None:
            lock.release()


def _phase_config(spec: FitSpec, phase: FitPhase, launch: TrainConfig, n: int) -> TrainConfig:
    cfg = phase_config(phase.recipe, launch, n)
    parts = distributed.state().num_processes * cfg.grad_accum
    if cfg.batch_size % parts:
        raise ConfigError(f"{spec.name}: the {phase.name} phase's global batch {cfg.batch_size} (the component's "
                          f"batch_size) must divide evenly over {parts} = processes × train.grad_accum; use a "
                          f"multiple of {parts}")
    return cfg


def _resume_point(spec: FitSpec, phases: list[FitPhase | FitStatistics], folder: Path, resume: bool) -> int:
    """The first phase to run: after the last finished one (its state loaded) when
    resuming; an interrupted fit without ``resume`` is refused (as a method's run)."""
    dirs = [folder / f"{i}-{p.name}" for i, p in enumerate(phases)]
    done = [i for i, d in enumerate(dirs) if (d / DONE).is_file() and (d / DONE_INFO).is_file()]
    started = done or [i for i, d in enumerate(dirs) if (d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir())]
    if started and not resume:
        raise ConfigError(f"{folder} holds an interrupted fit of {spec.name}; pass --resume to continue it or "
                          "--fresh to start over")
    if not done:
        return 0
    last = max(done)
    try:
        state = load_file(str(dirs[last] / DONE))
    except Exception as exc:
        raise CheckpointError(f"{dirs[last] / DONE} is corrupt ({type(exc).__name__}: {exc}); delete "
                              f"{dirs[last]} to redo that phase, or pass --fresh") from exc
    spec.load(state, {})
    return last + 1


def _save_done(spec: FitSpec, pdir: Path, done: dict[str, Any]) -> None:
    """The fitted state after a phase (resume restarts after it), its numbers, and the
    phase's checkpoints removed (the done state supersedes them)."""
    st = distributed.state()
    if st.is_main_process:
        state = _cpu(spec.state())
        atomic_write(pdir / DONE, lambda p: save_file(state, str(p)))
        atomic_write_json(pdir / DONE_INFO, done)
        shutil.rmtree(pdir / "checkpoints", ignore_errors=True)
    st.wait_for_everyone()


def _done_info(pdir: Path) -> dict[str, Any]:
    try:
        return json.loads((pdir / DONE_INFO).read_text())
    except (OSError, ValueError):
        return {}


def _tail_loss(pdir: Path, steps: int) -> float | None:
    """Mean logged loss over the last 10% of the phase's steps."""
    path = pdir / "train_log.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    tail = [r["loss"] for r in rows if r.get("step", 0) > steps - max(1, steps // 10)]
    return sum(tail) / len(tail) if tail else None


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clones: safetensors refuses tensors that share storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _write_final(spec: FitSpec, folder: Path, key: str, data_key: str, info: dict[str, Any]) -> None:
    import importlib.metadata

    state = _cpu(spec.state())
    atomic_write(folder / WEIGHTS, lambda p: save_file(state, str(p)))
    atomic_write_json(folder / META, {"key": key, "name": spec.name, "data_key": data_key,
                                      "identity": to_dict(spec.identity), "info": info,
                                      "spheregen": importlib.metadata.version("spheregen")})
    for pdir in folder.iterdir():  # the final weights supersede the phases' intermediate states
        if pdir.is_dir() and (pdir / DONE).is_file():
            (pdir / DONE).unlink()


def _loader(dataset: Dataset, batches: list[list[int]], workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator())


def _statistics(stat: FitStatistics, dataset: Dataset, workers: int) -> None:
    """``stat.sums`` over the whole split, batches spread over the processes (each
    process every P-th batch) and the sums all-reduced; then ``stat.finish``."""
    st = distributed.state()
    n, size = len(dataset), stat.batch_size
    batches = [list(range(s, min(n, s + size))) for s in range(0, n, size)]
    shard = st.num_processes > 1 and len(batches) >= st.num_processes
    mine = batches[st.process_index::st.num_processes] if shard else batches
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for images, labels in _loader(dataset, mine, workers):
            for name, value in stat.sums(to_float(images).to(st.device), labels.to(st.device)).items():
                totals[name] = totals[name] + value if name in totals else value.clone()
    if shard:
        for value in totals.values():
            torch.distributed.all_reduce(value)
    stat.finish(totals)


def _report(spec: FitSpec, train: Dataset, test: Dataset | None) -> dict[str, Any]:
    """``spec.report`` on the held-out split (or a seeded probe of the training split)."""
    device = distributed.state().device
    if test is not None and len(test):
        dataset, split, rows = test, "test", list(range(len(test)))
    else:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:TRAIN_PROBE]
        dataset, split, rows = train, "train", perm.tolist()
    batches = [rows[s:s + REPORT_BATCH] for s in range(0, len(rows), REPORT_BATCH)]

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in _loader(dataset, batches, 0):
            yield to_float(images).to(device), labels.to(device)

    with torch.no_grad():
        scores = spec.report(stream())
    return {**{k: float(v) for k, v in scores.items()}, "report_split": split}


def describe(result: FitResult) -> str:
    """One line for the CLI: what was fitted or found, and where."""
    verb = "fitted" if result.fitted_now else "already fitted"
    seconds = result.info.get("seconds")
    took = f" in {seconds:.0f} s" if result.fitted_now and seconds is not None else ""
    return f"{result.name}: {verb}{took} ({result.folder})"

