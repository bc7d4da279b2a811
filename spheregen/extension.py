"""``spheregen train EXPERIMENT.toml --extend-to N``: continue a finished run to N steps.

The experiment gives the finished run's config (``train.steps = S``, S < N). Training
resumes from the run's last checkpoint (step S: weights, AdamW moments, EMA, random
state) and runs steps S+1..N on the N-step learning-rate schedule, drawing the batches a
fresh N-step run draws at those steps (batches are a pure function of seed and step).
The first S steps followed the S-step schedule, which ended at its minimum; at step S the
rate jumps to the N-step schedule's value there (after warmup: the cosine at (S - W) /
(N - W), W the N-step warmup) and decays to the minimum at N, a warm restart. So the
result is neither the S-step run nor a fresh N-step run, and its identity says so:
:func:`spheregen.runner.run_hash` of the N-step config with ``extended_from = (S,)``.

The run folder records it: checkpoints (``step.json``) and ``final/config.json`` carry
``extended_from``; ``run.json`` takes the new identity with a ``history`` once the final
weights are written (until then the folder's final weights are the S-step run's). Later
stages find the extended weights when the config gives ``train.steps = N`` (``--set
methods.NAME.train.steps=N`` or the edited file): the folder's history then fits the
config, and sample files and result rows carry the extended identity (rows: column
``extended_from``). A fresh N-step run (``--fresh``) has the identity of a run in one go.

A finished run keeps its last checkpoint (the final step always checkpoints, and the
last two are kept); without one (deleted by hand) the optimizer state is gone, and the
extension is refused rather than restarted with fresh AdamW moments, which would be a
third, unrecorded recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
from accelerate import Accelerator

from spheregen.errors import ConfigError, StaleError
from spheregen.experiment import MethodEntry
from spheregen.runner import (MANIFEST, Extension, Trainer, _read_json, list_checkpoints, run_differences, run_hash,
                              run_history)
from spheregen.workspace import Workspace


def extend(ws: Workspace, entry: MethodEntry, to_steps: int, accelerator: Accelerator | None = None,
           progress: bool = True) -> Path:
    """Continue the finished run of ``entry`` to ``to_steps``; returns the final weights
    path (at once when the run was already extended to exactly that)."""
    ext = plan_extension(ws, entry, to_steps)
    if ext is None:
        return ws.paths.final(entry.name)
    return Trainer(ws, ext.entry, accelerator, progress, extension=ext).train(resume=True)


def plan_extension(ws: Workspace, entry: MethodEntry, to_steps: int) -> Extension | None:
    """The extension of ``entry``'s finished run to ``to_steps`` (None: done already),
    after checking, before anything is built: N > S, the run folder holds a finished
    run of this config (or its interrupted extension to N), and the checkpoint to
    continue from exists. Each refusal names the file, what differs and the command."""
    steps = entry.train.steps
    sets = "".join(f" --set {o}" for o in ws.exp.overrides)  # the command as given, for the advice
    train_cmd = f"spheregen train {ws.exp.source}{sets} --method {entry.name}"
    if to_steps <= steps:
        raise ConfigError(f"--extend-to {to_steps}: method '{entry.name}' has train.steps = {steps} in "
                          f"{ws.exp.source}; give the finished run's config and more steps than its {steps}")
    run_dir, final = ws.paths.run(entry.name), ws.paths.final(entry.name)
    meta = run_dir / "run.json"
    if not meta.is_file():
        raise ConfigError(f"--extend-to: {meta} does not exist, there is no run of method '{entry.name}' to extend; "
                          f"train it first: {train_cmd}")
    history = run_history(ws, entry)
    base, record = run_hash(ws, entry, history), _read_json(meta)
    ext = Extension(entry=attrs.evolve(entry, train=attrs.evolve(entry.train, steps=to_steps)), from_steps=steps,
                    base_hash=base, history=(*history, steps))
    target = run_hash(ws, ext.entry, ext.history)
    done = tuple(record.get("extended_from", ()))  # this very extension, finished before?
    if done[-1:] == (steps,) and record.get("config_hash") == _final_hash(final) == run_hash(ws, ext.entry, done):
        return None
    if record.get("config_hash") != base:
        raise StaleError(f"--extend-to: {meta} holds a run of another config than {ws.exp.source} gives "
                         f"({run_differences(record, ws, entry)}); extend only the run of this config: {train_cmd} "
                         "trains it (add --fresh to replace that run)")
    if _final_hash(final) not in (base, target):
        ckpts = list_checkpoints(run_dir / "checkpoints")
        where = f" (its last checkpoint is {ckpts[-1].name})" if ckpts else ""
        raise ConfigError(f"--extend-to: the run of method '{entry.name}' is not finished: {final} does not exist or "
                          f"belongs to another run{where}; finish it first with {train_cmd} --resume")
    _check_checkpoint(run_dir, ext, target, record, train_cmd)
    return ext


def _final_hash(final: Path) -> str | None:
    config = final.parent / "config.json"
    if not (final.is_file() and config.is_file()):
        return None
    try:
        return json.loads(config.read_text()).get("config_hash")
    except (OSError, ValueError):
        return None


def _check_checkpoint(run_dir: Path, ext: Extension, target: str, record: dict[str, Any], train_cmd: str) -> None:
    """The latest checkpoint is the finished run's last one, or one of its interrupted
    extension to the same budget (continued as --resume would)."""
    ckpts = list_checkpoints(run_dir / "checkpoints")
    to = ext.entry.train.steps
    if not ckpts:
        raise ConfigError(
            f"--extend-to: {run_dir / 'checkpoints'} holds no checkpoint of the finished run (step {ext.from_steps}), "
            "so its optimizer state is gone and it cannot be continued; train the longer budget from step 0 "
            f"instead: {train_cmd} --fresh --set methods.{ext.entry.name}.train.steps={to}")
    manifest = _read_json(ckpts[-1] / MANIFEST) if (ckpts[-1] / MANIFEST).is_file() else {}
    step, owner = int(manifest.get("step", -1)), manifest.get("config_hash")
    if (owner == ext.base_hash and step == ext.from_steps) or (owner == target and ext.from_steps < step <= to):
        return
    extending = record.get("extending") or {}
    why = (f"an extension of this run to {extending['to_steps']} steps was interrupted there: finish it with "
           f"--extend-to {extending['to_steps']}, or delete the checkpoints after step {ext.from_steps} to extend "
           f"to {to} instead") if extending.get("to_steps") not in (None, to) else \
        f"it is not the finished run's last checkpoint (step {ext.from_steps}); retrain with {train_cmd} --fresh"
    raise StaleError(f"--extend-to: the latest checkpoint {ckpts[-1]} is at step {step} of run {owner}; {why}")
