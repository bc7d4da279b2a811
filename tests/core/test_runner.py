import json

import pytest
import torch

from spheregen.artifacts import read_final
from spheregen.errors import CheckpointError, ConfigError, TrainingError
from spheregen.experiment import load_experiment
from spheregen.runner import batch_indices, list_checkpoints, load_trained, lr_lambda, train
from spheregen.workspace import Workspace


def _ws(path, tmp_path):
    return Workspace(load_experiment(path), tmp_path / "runs", tmp_path / "reports")


def test_batches_are_a_pure_function_and_shard_exactly():
    one = batch_indices(5, 100, 8, 0, 1, seed=3)
    two = torch.cat([batch_indices(5, 100, 4, r, 2, seed=3) for r in range(2)])
    assert torch.equal(one, two) and len(set(one.tolist())) == 8
    assert torch.equal(batch_indices(5, 100, 8, 0, 1, seed=3), one)


def test_lr_schedule_warmup_then_cosine():
    from spheregen.experiment import TrainConfig

    f = lr_lambda(TrainConfig(steps=100, warmup_fraction=0.1, min_lr_ratio=0.01))
    assert f(0) == pytest.approx(1 / 11) and f(10) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.01) and f(55) < f(20)


def test_train_writes_final_checkpoints_and_log(toy_registries, tiny_experiment, tmp_path):
    ws = _ws(tiny_experiment(), tmp_path)
    entry = ws.exp.methods[0]
    final = train(ws, entry, progress=False)
    model, ema, meta = read_final(final.parent)
    assert meta["step"] == 6 and ema is None and meta["entry"]["name"] == "toy"
    assert meta["data"] == {"image_size": 8, "channels": 1, "num_classes": 10}
    assert model.keys() == load_trained(ws, entry).state_dict().keys()
    ckpts = list_checkpoints(ws.paths.checkpoints("toy"))
    assert [c.name for c in ckpts] == ["step-0000003", "step-0000006"]
    log = [json.loads(line) for line in (ws.paths.run("toy") / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all("mse" in r for r in log)
    method = load_trained(ws, entry)
    assert not method.training


def test_encoder_lr_scale_reaches_optimizer(toy_registries, tiny_experiment, tmp_path):
    from spheregen.runner import Trainer

    ws = _ws(tiny_experiment(), tmp_path)
    t = Trainer(ws, ws.exp.methods[0], progress=False)
    t._setup()
    lrs = sorted(g["initial_lr"] for g in t.opt.param_groups)
    assert lrs == pytest.approx([0.001, 0.01])


def test_resume_is_bit_identical(toy_registries, tiny_experiment, tmp_path, monkeypatch):
    import spheregen.runner as runner

    methods = '[[methods]]\nname = "toy"\nmethod = "toy-ae"\n[methods.train]\nema_decay = 0.9\n'
    ref = _ws(tiny_experiment("", methods), tmp_path / "a")
    train(ref, ref.exp.methods[0], progress=False)
    ws = _ws(tiny_experiment("", methods), tmp_path / "b")
    real_step = runner.Trainer._optimizer_step

    def crash_at_5(self):
        if self.step == 4:
            raise KeyboardInterrupt  # dies after step 4, past the checkpoint at 3
        return real_step(self)

    monkeypatch.setattr(runner.Trainer, "_optimizer_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(ws, ws.exp.methods[0], progress=False)
    monkeypatch.setattr(runner.Trainer, "_optimizer_step", real_step)
    train(ws, ws.exp.methods[0], resume=True, progress=False)
    a = read_final(ref.paths.final("toy").parent)
    b = read_final(ws.paths.final("toy").parent)
    for part in (0, 1):  # model, EMA
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_corrupt_checkpoint_is_detected_and_previous_kept(toy_registries, tiny_experiment, tmp_path):
    ws = _ws(tiny_experiment(), tmp_path)
    train(ws, ws.exp.methods[0], progress=False)
    latest = list_checkpoints(ws.paths.checkpoints("toy"))[-1]
    victim = next(p for p in latest.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pkl"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    final_before = ws.paths.final("toy").read_bytes()
    with pytest.raises(CheckpointError) as err:
        train(ws, ws.exp.methods[0], resume=True, progress=False)
    assert str(victim) in str(err.value) and "step-0000003" in str(err.value)
    assert ws.paths.final("toy").read_bytes() == final_before


def test_nan_loss_stops_without_results(toy_registries, tiny_experiment, tmp_path):
    methods = '[[methods]]\nname = "toy"\nmethod = { name = "toy-ae", nan_at_step = 5 }\n'
    ws = _ws(tiny_experiment("", methods), tmp_path)
    with pytest.raises(TrainingError) as err:
        train(ws, ws.exp.methods[0], progress=False)
    msg = str(err.value)
    assert "step 5" in msg and "mse=" in msg and "step-0000003" in msg
    assert not ws.paths.final("toy").exists()


def test_existing_checkpoints_need_resume_or_fresh(toy_registries, tiny_experiment, tmp_path):
    ws = _ws(tiny_experiment(), tmp_path)
    train(ws, ws.exp.methods[0], progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(ws, ws.exp.methods[0], progress=False)
    train(ws, ws.exp.methods[0], fresh=True, progress=False)


# ---------------------------------------------------------------- latent cache

LATENT = '[[methods]]\nname = "lat"\nmethod = "toy-latent"\n'


def _trainer(path, tmp_path, name):
    from spheregen.runner import Trainer

    exp = load_experiment(path)
    return Trainer(Workspace(exp, tmp_path / name, tmp_path / f"{name}-reports"), exp.methods[0], progress=False)


@pytest.mark.parametrize("flip", [False, True])
def test_frozen_tokenizer_latents_are_encoded_once(toy_registries, tiny_experiment, tmp_path, flip):
    from spheregen.data import collate
    from spheregen.runner import prepare_batch

    cached = tiny_experiment("", LATENT)
    if flip:
        cached.write_text(cached.read_text().replace('channels = 1\n', 'channels = 1\nflip = true\n'))
    trainer = _trainer(cached, tmp_path, "cached")
    trainer.train()
    n = len(trainer.examples)
    # the whole split once (twice with flip: both orientations), then never again
    assert trainer.method.tokenizer.encode_calls == n * (2 if flip else 1)
    # a cached micro-batch is exactly the encoding of the batch the uncached path draws
    idx = batch_indices(3, n, 16, 0, 1, 0)
    images, labels = collate([trainer.examples[i] for i in idx.tolist()])
    x, _ = prepare_batch(images, labels, flip, 0, 3, torch.device("cpu"))
    assert torch.equal(trainer.latents.batch(idx, flip, 0, 3, torch.device("cpu")), trainer.method.encode(x))
    # and training on it follows the per-step encoding run exactly
    off = tmp_path / "off.toml"
    off.write_text(cached.read_text().replace("[eval]", "cache_latents = \"off\"\n[eval]", 1))
    uncached = _trainer(off, tmp_path, "off")
    uncached.train()
    assert uncached.latents is None and uncached.method.tokenizer.encode_calls == 6 * 16
    losses = [[json.loads(line)["loss"] for line in (t.run_dir / "train_log.jsonl").read_text().splitlines()]
              for t in (trainer, uncached)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_latents_beyond_the_memory_cap_go_to_disk_and_train_identically(toy_registries, tiny_experiment,
                                                                        tmp_path, workers):
    """Disk latents are read ahead by ``workers`` loader processes (0: in the training
    process) and give the same losses as latents held in memory."""
    from spheregen.latent_cache import DiskLatents, MemoryLatents

    memory = tiny_experiment("", LATENT)
    memory.write_text(memory.read_text().replace("channels = 1\n", "channels = 1\nflip = true\n"))
    capped = tmp_path / "capped.toml"
    capped.write_text(memory.read_text().replace(
        "[eval]", f"cache_latents_max_gb = 1e-9\nnum_workers = {workers}\n[eval]", 1))
    a, b = _trainer(memory, tmp_path, "mem"), _trainer(capped, tmp_path, "disk")
    a.train()
    b.train()
    assert isinstance(a.latents, MemoryLatents) and isinstance(b.latents, DiskLatents)
    assert b.method.tokenizer.encode_calls == 2 * len(b.examples)  # both orientations, once
    losses = [[json.loads(line)["loss"] for line in (t.run_dir / "train_log.jsonl").read_text().splitlines()]
              for t in (a, b)]
    assert losses[0] == losses[1]
    # another method on the same tokenizer and data reuses the files: nothing is encoded
    other = tmp_path / "other.toml"
    other.write_text(capped.read_text().replace('name = "lat"', 'name = "lat2"'))
    c = _trainer(other, tmp_path, "disk")
    c.train()
    assert c.method.tokenizer.encode_calls == 0


def test_an_interrupted_latent_extraction_resumes(toy_registries, tiny_experiment, tmp_path):
    import numpy as np

    import spheregen.latent_cache as lat

    exp = load_experiment(tiny_experiment("", LATENT))
    ws = Workspace(exp, tmp_path / "runs", tmp_path / "reports")
    examples = ws.data.examples("train")
    method = ws.build_method(exp.methods[0])
    real = method.tokenizer.encode
    calls = []

    def dies_on_the_fourth_batch(x):
        calls.append(len(x))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(x)

    method.tokenizer.encode = dies_on_the_fourth_batch
    lat.BATCH, batch = 100, lat.BATCH
    try:
        with pytest.raises(KeyboardInterrupt):
            lat.DiskLatents.open(method, examples, True, torch.device("cpu"), tmp_path / "a", progress=False)
        assert not (tmp_path / "a" / "meta.json").exists()
        calls.clear()
        method.tokenizer.encode = real
        resumed = lat.DiskLatents.open(method, examples, True, torch.device("cpu"), tmp_path / "a", progress=False)
        whole = lat.DiskLatents.open(method, examples, True, torch.device("cpu"), tmp_path / "b", progress=False)
    finally:
        lat.BATCH = batch
    n_batches = -(-len(examples) // 100)
    done_before = json.loads(next((tmp_path / "a").glob("progress-*.json")).read_text())["done"]
    assert len(done_before) == n_batches
    for o in (0, 1):
        assert np.array_equal(resumed.arrays[o], whole.arrays[o])
    # a loader worker started by spawn re-maps the files instead of receiving the arrays
    import pickle

    state = pickle.dumps(whole)
    assert len(state) < 1000 < whole.arrays[0].nbytes
    assert np.array_equal(pickle.loads(state).arrays[1], whole.arrays[1])



def test_run_identity_covers_training_not_sampling(toy_registries, tiny_experiment):
    from spheregen.runner import run_hash

    base = tiny_experiment()
    exp = load_experiment(base)
    ws = Workspace(exp, "unused-runs", "unused-reports")
    h = run_hash(ws, exp.methods[0])
    for extra, same in (('guidance = 2.0\nsteps = [4]\nsampler = "toy-loop"\n', True),
                        ("[methods.train]\nlog_every = 7\ncheckpoint_every = 5\ncheckpoint_minutes = 1.0\n", True),
                        ("[methods.train]\nsteps = 7\n", False)):
        path = base.with_name("variant.toml")
        path.write_text(base.read_text() + extra)
        variant = load_experiment(path)
        assert (run_hash(Workspace(variant, "r", "p"), variant.methods[0]) == h) is same, extra


def test_a_run_of_another_identity_is_not_trained(toy_registries, tiny_experiment, tmp_path):
    from spheregen.runner import is_trained

    exp = load_experiment(tiny_experiment())
    ws = Workspace(exp, tmp_path / "runs", tmp_path / "reports")
    entry = exp.methods[0]
    train(ws, entry, progress=False)
    assert is_trained(ws, entry)
    meta = ws.paths.run(entry.name) / "run.json"
    record = json.loads(meta.read_text())
    record["config_hash"] = "somethingelse"
    meta.write_text(json.dumps(record))
    assert not is_trained(ws, entry)


def test_loader_workers_give_the_same_weights(toy_registries, tiny_experiment, tmp_path):
    """Decoding in 2 DataLoader worker processes trains on exactly the batches of the
    in-process path: the weights are bit-identical."""
    runs = []
    for workers in (0, 2):
        path = tiny_experiment("", '[[methods]]\nname = "toy"\nmethod = "toy-ae"\n[methods.train]\n'
                                   f'num_workers = {workers}\n')
        ws = _ws(path, tmp_path / f"w{workers}")
        train(ws, ws.exp.methods[0], progress=False)
        runs.append(read_final(ws.paths.final("toy").parent)[0])
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_checkpoints_and_ema_hold_only_trained_parameters(toy_registries, tiny_experiment, tmp_path):
    """A frozen tokenizer is rebuilt, not copied into every checkpoint and the EMA; a
    resume puts its parameters back and ends bit-identical (test_resume_is_bit_identical)."""
    from safetensors.torch import load_file

    path = tiny_experiment("", LATENT + "[methods.train]\nema_decay = 0.9\n")
    trainer = _trainer(path, tmp_path, "frozen")
    trainer.train()
    frozen = {n for n, p in trainer.method.named_parameters() if not p.requires_grad}
    trained = {n for n, p in trainer.method.named_parameters() if p.requires_grad}
    assert frozen and trained
    saved = load_file(str(list_checkpoints(trainer.run_dir / "checkpoints")[-1] / "model.safetensors"))
    assert {k.removeprefix("method.") for k in saved} & frozen == set()
    assert trained <= {k.removeprefix("method.") for k in saved}
    assert set(trainer.ema.state_dict()) == trained
    model, ema, _ = read_final(trainer.run_dir / "final")
    assert frozen <= set(model) and set(ema) == trained  # the final file is self-contained


def test_tensorboard_tracking_logs_every_loss(toy_registries, tiny_experiment, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws = _ws(tiny_experiment("", '[[methods]]\nname = "toy"\nmethod = "toy-ae"\n[methods.train]\n'
                                 'log_with = ["tensorboard"]\n'), tmp_path)
    train(ws, ws.exp.methods[0], progress=False)
    # tracking/<method>/ holds the scalars (a sub-folder the recipe as hyper-parameters)
    acc = EventAccumulator(str(ws.paths.run("toy") / "tracking" / "toy"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert "train/lr" in acc.Tags()["scalars"]


def test_a_missing_tracker_package_names_the_extra(toy_registries, tiny_experiment, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    ws = _ws(tiny_experiment("", '[[methods]]\nname = "toy"\nmethod = "toy-ae"\n[methods.train]\n'
                                 'log_with = ["wandb"]\n'), tmp_path)
    with pytest.raises(ConfigError, match="'wandb' is not installed: pip install wandb"):
        train(ws, ws.exp.methods[0], progress=False)
    assert not ws.paths.run("toy").exists()


def test_changing_only_the_log_cadence_keeps_the_run(toy_registries, tiny_experiment, tmp_path):
    path = tiny_experiment()
    ws = _ws(path, tmp_path)
    train(ws, ws.exp.methods[0], progress=False)
    path.write_text(path.read_text().replace("log_every = 1", "log_every = 2").replace("checkpoint_every = 3",
                                                                                        "checkpoint_every = 2"))
    again = _ws(path, tmp_path)
    train(again, again.exp.methods[0], resume=True, progress=False)  # no "different config" refusal
