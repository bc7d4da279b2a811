"""Precision and speed options: ``[train] tf32 / compile / activation_checkpointing /
fused_adamw`` and ``[eval] mixed_precision`` (spheregen.precision). Tiny models on the
CPU; the real inductor compile is behind the slow marker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spheregen import precision
from spheregen.artifacts import read_final
from spheregen.config import config_hash, make_component, to_dict
from spheregen.errors import ConfigError
from spheregen.experiment import EvalConfig, TrainConfig, experiment_from_dict, load_experiment
from spheregen.interfaces import BuildContext, CheckpointableBlocks, DataSpec, has
from spheregen.plugins import registries
from spheregen.runner import LossForward, Trainer, list_checkpoints, load_trained, train
from spheregen.samples import identity_differences, load_samples, sample_identity
from spheregen.workspace import Workspace, build_component
from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig
from spheregen_plugins.sphere_encoder.method import SphereEncoder

pytestmark = pytest.mark.usefixtures("single_thread")

NEW_TRAIN = ("tf32", "compile", "activation_checkpointing", "fused_adamw")
SPEC = DataSpec(image_size=8, channels=1, num_classes=3)
DIT = {"name": "dit", "width": 32, "depth": 2, "heads": 2, "patch_size": 2}


def _ws(path: Path, tmp_path: Path, *overrides: str) -> Workspace:
    return Workspace(load_experiment(path, list(overrides)), tmp_path / "runs", tmp_path / "reports")


def _build(kind: str, name: str, **options):
    comp = make_component(kind, name, **options)
    ctx = BuildContext.create(build_component, data=SPEC)
    return registries()[kind].build(comp.name, comp.config, ctx)


def _randomize(module: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (zero-init heads would make the outputs trivially 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return module


# ---------------------------------------------------------------- config and identity


def test_new_options_default_off_and_leave_existing_identities_unchanged():
    base = TrainConfig()
    assert not any(getattr(base, k) for k in NEW_TRAIN) and EvalConfig().mixed_precision == "no"
    assert not set(NEW_TRAIN) & set(to_dict(base)) and "mixed_precision" not in to_dict(EvalConfig())
    # numerics of the trained weights change: part of the run's identity
    for key in ("tf32", "compile", "fused_adamw"):
        assert config_hash(TrainConfig(**{key: True})) != config_hash(base), key
    # the same loss and gradients: not part of it (may be turned on to resume a run)
    assert config_hash(TrainConfig(activation_checkpointing=True)) == config_hash(base)
    assert to_dict(TrainConfig(activation_checkpointing=True))["activation_checkpointing"] is True


def test_mixed_precision_is_part_of_the_sample_identity_only_when_set():
    plain = sample_identity("h", "euler", None, 4, 1.0, EvalConfig())
    bf16 = sample_identity("h", "euler", None, 4, 1.0, EvalConfig(mixed_precision="bf16"))
    assert "mixed_precision" not in plain and bf16 == {**plain, "mixed_precision": "bf16"}
    # a bf16 file is stale for an fp32 config and the other way round; an older file is current
    assert identity_differences(bf16, plain) == {"mixed_precision": ("bf16", None)}
    assert identity_differences(plain, bf16) == {"mixed_precision": (None, "bf16")}
    assert identity_differences({**plain, "method": "x"}, plain) == {}


@pytest.mark.parametrize("table, key, value, expected", [
    ("train", "tf32", '"yes"', "expected bool"),
    ("train", "compile", "1", "expected bool"),
    ("train", "fused_adamw", '"true"', "expected bool"),
    ("train", "activation_checkpointing", "0", "expected bool"),
    ("train", "tf_32", "true", "Did you mean 'tf32'"),
    ("eval", "mixed_precision", '"fp16"', "choose one of ['no', 'bf16']"),
    ("eval", "mixed_precision", "true", "choose one of ['no', 'bf16']"),
])
def test_new_keys_are_typed_and_unknown_ones_refused(toy_registries, tiny_experiment, table, key, value, expected):
    with pytest.raises(ConfigError) as err:
        load_experiment(tiny_experiment(), [f"{table}.{key}={value}"])
    assert expected in str(err.value) and f"{table}.{key}" in str(err.value)


def test_method_train_tables_take_the_new_keys(toy_registries, tiny_experiment):
    methods = '[[methods]]\nname = "toy"\nmethod = "toy-ae"\n[methods.train]\nfused_adamw = true\ntf32 = true\n'
    exp = load_experiment(tiny_experiment("", methods), ["eval.mixed_precision=\"bf16\""])
    assert exp.methods[0].train.fused_adamw and exp.methods[0].train.tf32 and exp.eval.mixed_precision == "bf16"


# ---------------------------------------------------------------- TF32


def test_tf32_sets_the_cuda_flags_and_restores_them_and_leaves_the_cpu_alone():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    cpu = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision
    with precision.tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision) == cpu
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with precision.tf32(False):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_tf32_changes_nothing_on_a_cpu(toy_registries, tiny_experiment, tmp_path):
    finals = []
    for i, flag in enumerate(("false", "true")):
        ws = _ws(tiny_experiment(), tmp_path / str(i), "train.steps=2", f"train.tf32={flag}")
        finals.append(read_final(train(ws, ws.exp.methods[0], progress=False).parent)[0])
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


# ---------------------------------------------------------------- fused AdamW


def test_fused_adamw_trains_two_steps(toy_registries, tiny_experiment, tmp_path):
    runs = {}
    for flag in ("false", "true"):
        ws = _ws(tiny_experiment(), tmp_path / flag, "train.steps=2", f"train.fused_adamw={flag}")
        trainer = Trainer(ws, ws.exp.methods[0], progress=False)
        trainer.train()
        assert all(bool(g["fused"]) is (flag == "true") for g in trainer.opt.optimizer.param_groups)
        runs[flag] = read_final(ws.paths.final("toy").parent)[0]
    for k, v in runs["true"].items():
        assert torch.isfinite(v).all()
        # one kernel instead of a loop: the same update up to float rounding
        torch.testing.assert_close(v, runs["false"][k], rtol=1e-5, atol=1e-6)


def test_fused_adamw_refuses_parameters_that_are_not_floating_point():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ConfigError, match="fused_adamw"):
        precision.adamw([{"params": [p]}], 1e-3, (0.9, 0.95), 0.0, fused=True)


# ---------------------------------------------------------------- compile


def test_compiled_run_keeps_checkpoint_keys_and_loads_uncompiled(toy_registries, tiny_experiment, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(precision, "COMPILE_BACKEND", "eager")  # the key handling, without a C compiler
    ws = _ws(tiny_experiment(), tmp_path, "train.steps=2", "train.compile=true", "train.checkpoint_every=1")
    trainer = Trainer(ws, ws.exp.methods[0], progress=False)
    trainer.train()
    assert trainer.wrapped._compiled_call_impl is not None  # the step ran compiled
    plain = LossForward(ws.build_method(ws.exp.methods[0])).state_dict()
    ckpt = list_checkpoints(ws.paths.checkpoints("toy"))[-1]
    saved = load_file(str(next(ckpt.glob("model*.safetensors"))))
    assert saved.keys() == plain.keys() and not any("_orig_mod" in k for k in saved)
    LossForward(ws.build_method(ws.exp.methods[0])).load_state_dict(saved)  # strict
    model, _, _ = read_final(ws.paths.final("toy").parent)
    method = load_trained(ws, ws.exp.methods[0])  # built uncompiled, loaded strictly
    assert model.keys() == method.state_dict().keys() and not any("_orig_mod" in k for k in model)


@pytest.mark.slow
def test_inductor_compiled_training_loads_uncompiled_and_matches_eager(toy_registries, tiny_experiment, tmp_path,
                                                                       monkeypatch):
    """torch.compile with its default backend (inductor: a C compiler, ~1 min on a CPU).
    Inductor draws random numbers with its own generator, so a compiled run trains on
    other noise than an eager one (one reason ``compile`` is part of the run identity);
    with ``fallback_random`` it draws torch's, and the weights agree up to rounding."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    finals = []
    for flag in ("false", "true"):
        ws = _ws(tiny_experiment(), tmp_path / flag, "train.steps=2", f"train.compile={flag}")
        finals.append(read_final(train(ws, ws.exp.methods[0], progress=False).parent)[0])
        assert load_trained(ws, ws.exp.methods[0]).state_dict().keys() == finals[-1].keys()
    for k, v in finals[1].items():
        torch.testing.assert_close(v, finals[0][k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- activation checkpointing


def _flow_matching():
    return _build("method", "flow-matching", tokenizer={"name": "patch", "patch_size": 1}, denoiser=DIT)


def _sphere_encoder():
    return SphereEncoder(SphereEncoderConfig.tiny(), DataSpec(image_size=16, channels=3, num_classes=10))


@pytest.mark.parametrize("make, shape", [(_flow_matching, (8, 1, 8, 8)), (_sphere_encoder, (8, 3, 16, 16))],
                         ids=["flow-matching-dit", "sphere-encoder"])
def test_checkpointing_gives_the_same_loss_and_gradients(make, shape):
    plain = _randomize(make(), 0.1)
    ckpt = make()
    ckpt.load_state_dict(plain.state_dict())
    blocks = precision.checkpoint_blocks(ckpt, "test")
    assert blocks and has(ckpt, CheckpointableBlocks)
    precision.checkpoint_activations(blocks)
    images = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(shape[0]) % 3
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(3)  # the loss draws noise: the same draws for both
        loss, _ = model.loss(images, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():  # without autograd a block runs as before
        torch.manual_seed(3)
        a = plain.loss(images, labels)[0]
        torch.manual_seed(3)
        torch.testing.assert_close(ckpt.loss(images, labels)[0], a)


def test_checkpointed_training_runs_and_equals_plain(tiny_experiment, tmp_path):
    methods = ('[[methods]]\nname = "fm"\nmethod = { name = "flow-matching", tokenizer = { name = "patch", '
               'patch_size = 1 }, denoiser = { name = "dit", width = 32, depth = 2, heads = 2, patch_size = 2 } }\n')
    finals = []
    for flag in ("false", "true"):
        ws = _ws(tiny_experiment("", methods), tmp_path / flag, "train.steps=2",
                 f"train.activation_checkpointing={flag}")
        ws.check_compatibility()
        finals.append(read_final(train(ws, ws.exp.methods[0], progress=False).parent)[0])
    for k, v in finals[1].items():
        torch.testing.assert_close(v, finals[0][k])


def test_a_method_without_blocks_is_refused_at_load_and_by_the_runner(toy_registries, tiny_experiment, tmp_path):
    ws = _ws(tiny_experiment(), tmp_path, "train.activation_checkpointing=true")
    for call in (ws.check_compatibility, lambda: train(ws, ws.exp.methods[0], progress=False)):
        with pytest.raises(ConfigError) as err:
            call()
        msg = str(err.value)
        assert "method 'toy'" in msg and "CheckpointableBlocks" in msg and "activation_checkpointing" in msg
    assert not ws.paths.final("toy").exists()


def test_a_denoiser_without_blocks_and_meanflow_are_refused(tiny_experiment, tmp_path):
    from spheregen_plugins.baselines.flow_matching import FlowMatching, FlowMatchingConfig

    class Plain(torch.nn.Module):
        def forward(self, x, noise_level, labels):
            return x

    tokenizer = _build("tokenizer", "patch", patch_size=1)
    method = FlowMatching(FlowMatchingConfig(), tokenizer, Plain())
    with pytest.raises(ConfigError, match="needs the CheckpointableBlocks capability.*Plain lacks checkpoint_blocks"):
        precision.checkpoint_blocks(method, "method 'x'")
    methods = ('[[methods]]\nname = "mf"\nmethod = { name = "meanflow", tokenizer = { name = "patch", '
               'patch_size = 1 }, denoiser = { name = "dit", width = 32, depth = 1, heads = 2, time_inputs = 2 } }\n')
    ws = _ws(tiny_experiment("", methods), tmp_path, "train.activation_checkpointing=true")
    with pytest.raises(ConfigError, match="method 'mf' .*forward mode"):
        ws.check_compatibility()


# ---------------------------------------------------------------- bf16 sampling and features


def test_bf16_sampling_yields_uint8_close_to_fp32(tmp_path):
    from spheregen import samples

    method = _randomize(_flow_matching(), 0.05).eval()
    sampler = _build("sampler", "euler")
    labels = torch.arange(24) % 3
    drawn = {}
    for mode in ("no", "bf16"):
        meta = sample_identity("h", "euler", None, 4, 1.0, EvalConfig(mixed_precision=mode))
        path = samples.generate(sampler, method, labels, 4, 1.0, 7, 12, torch.device("cpu"), tmp_path / f"{mode}.npz",
                                meta)
        drawn[mode], _ = load_samples(path, meta)
    a, b = drawn["no"].int(), drawn["bf16"].int()
    assert drawn["bf16"].dtype == torch.uint8 and a.shape == b.shape
    assert not torch.equal(a, b)  # autocast did run in bf16
    assert (a - b).abs().float().mean() < 1.0 and (a - b).abs().max() <= 8  # a few levels of 255 at most


def test_bf16_autocast_is_noop_at_no_and_bf16_otherwise():
    x = torch.randn(4, 4)
    with precision.autocast("cpu", "no"):
        assert (x @ x).dtype == torch.float32
    with precision.autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        precision.autocast("cpu", "fp8")


def test_bf16_features_are_keyed_apart_and_close_to_fp32(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attrs
    from metric_data import CLASSIFIER, digits_16px, make_ctx
    from spheregen_plugins.metrics.config import FidConfig
    from spheregen_plugins.metrics.fidelity import FID

    digits = digits_16px()
    ctx = make_ctx(digits, tmp_path)
    cfg = FidConfig(features="domain-classifier", classifier=CLASSIFIER)
    fp32, bf16 = FID(cfg, ctx), FID(cfg, attrs.evolve(ctx, mixed_precision="bf16"))
    assert fp32.feature_key != bf16.feature_key and bf16.space.cache_tag.endswith("-bf16")
    assert "bf16 autocast" in bf16.feature_info and "autocast" not in fp32.feature_info
    images = digits[2][:64]
    fa, fb = fp32.extract(images)[fp32.layer], bf16.extract(images)[bf16.layer]
    assert fb.dtype == torch.float32 and not torch.equal(fa, fb)
    torch.testing.assert_close(fb, fa, rtol=0.05, atol=0.05 * float(fa.abs().max()))
    scores = bf16.compute(images, digits[0][:128]), fp32.compute(images, digits[0][:128])
    assert scores[0]["fid"] == pytest.approx(scores[1]["fid"], rel=0.1, abs=0.05)


def test_run_with_bf16_eval_records_it_and_switching_back_resamples(toy_registries, tiny_experiment, tmp_path,
                                                                    capsys):
    import polars as pl

    from spheregen.cli import main
    from spheregen.samples import read_meta

    exp = tiny_experiment()
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]
    assert main(["run", str(exp), *dirs, "--set", 'eval.mixed_precision="bf16"']) == 0
    samples = tmp_path / "runs" / "tiny" / "samples" / "toy" / "steps-1.npz"
    assert read_meta(samples)["mixed_precision"] == "bf16"
    bf16 = pl.read_parquet(tmp_path / "reports" / "tiny" / "results.parquet")
    assert main(["run", str(exp), *dirs]) == 0
    assert "mixed_precision" not in read_meta(samples)  # drawn again, in fp32
    plain = pl.read_parquet(tmp_path / "reports" / "tiny" / "results.parquet")
    assert bf16["train_hash"].to_list() == plain["train_hash"].to_list()  # the same weights, not retrained
    assert set(bf16["eval_hash"]).isdisjoint(plain["eval_hash"]) and set(bf16["sample_hash"]).isdisjoint(
        plain["sample_hash"])
