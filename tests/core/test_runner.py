import json

import pytest
import torch

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
    blob = torch.load(final, weights_only=True)
    assert blob["step"] == 6 and blob["ema"] is None
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
    a = torch.load(ref.paths.final("toy"), weights_only=True)
    b = torch.load(ws.paths.final("toy"), weights_only=True)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


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
    from spheregen.runner import make_batch

    cached = tiny_experiment("", LATENT)
    if flip:
        cached.write_text(cached.read_text().replace('channels = 1\n', 'channels = 1\nflip = true\n'))
    trainer = _trainer(cached, tmp_path, "cached")
    trainer.train()
    n = len(trainer.images)
    # the whole split once (twice with flip: both orientations), then never again
    assert trainer.method.tokenizer.encode_calls == n * (2 if flip else 1)
    # a cached micro-batch is exactly the encoding of the batch the uncached path draws
    idx = batch_indices(3, n, 16, 0, 1, 0)
    x, _ = make_batch(trainer.images, trainer.labels, idx, flip, 0, 3, torch.device("cpu"))
    assert torch.equal(trainer.latents.batch(idx, flip, 0, 3), trainer.method.encode(x))
    # and training on it follows the per-step encoding run exactly
    off = tmp_path / "off.toml"
    off.write_text(cached.read_text().replace("[eval]", "cache_latents = \"off\"\n[eval]", 1))
    uncached = _trainer(off, tmp_path, "off")
    uncached.train()
    assert uncached.latents is None and uncached.method.tokenizer.encode_calls == 6 * 16
    losses = [[json.loads(line)["loss"] for line in (t.run_dir / "train_log.jsonl").read_text().splitlines()]
              for t in (trainer, uncached)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_latent_cache_respects_the_memory_cap(toy_registries, tiny_experiment, tmp_path):
    path = tiny_experiment("", LATENT)
    path.write_text(path.read_text().replace("[eval]", "cache_latents_max_gb = 1e-9\n[eval]", 1))
    trainer = _trainer(path, tmp_path, "capped")
    trainer.train()
    assert trainer.latents is None and trainer.method.tokenizer.encode_calls == 6 * 16


def test_run_identity_covers_training_not_sampling(toy_registries, tiny_experiment):
    from spheregen.runner import run_hash

    base = tiny_experiment()
    exp = load_experiment(base)
    ws = Workspace(exp, "unused-runs", "unused-reports")
    h = run_hash(ws, exp.methods[0])
    for extra, same in (('guidance = 2.0\nsteps = [4]\nsampler = "toy-loop"\n', True),
                        ("[methods.train]\nsteps = 7\n", False)):
        path = base.with_name("variant.toml")
        path.write_text(base.read_text() + extra)
        variant = load_experiment(path)
        assert (run_hash(Workspace(variant, "r", "p"), variant.methods[0]) == h) is same, extra


def test_runs_recorded_with_the_legacy_identity_count_as_trained(toy_registries, tiny_experiment, tmp_path):
    from spheregen.config import config_hash
    from spheregen.runner import is_trained

    exp = load_experiment(tiny_experiment())
    ws = Workspace(exp, tmp_path / "runs", tmp_path / "reports")
    entry = exp.methods[0]
    train(ws, entry, progress=False)
    meta = ws.paths.run(entry.name) / "run.json"
    record = json.loads(meta.read_text())
    record["config_hash"] = config_hash({"data": exp.data, "method": entry, "seed": exp.seed})
    meta.write_text(json.dumps(record))
    assert is_trained(ws, entry)
    record["config_hash"] = "somethingelse"
    meta.write_text(json.dumps(record))
    assert not is_trained(ws, entry)
