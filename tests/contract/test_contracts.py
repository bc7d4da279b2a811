"""Contract tests, parametrised over every registered component of each kind: a new
plugin is tested here with no new test code. A config class's ``tiny()`` classmethod,
when present, gives the configuration these tests build."""

from __future__ import annotations

import attrs
import pytest
import torch

from spheregen.interfaces import BuildContext, DataSpec, MetricContext
from spheregen.plugins import registries
from spheregen.registry import KINDS
from spheregen.workspace import build_component

SPEC = DataSpec(image_size=16, channels=3, num_classes=10)


def entries(kind):
    return [pytest.param(e, id=e.name) for e in registries()[kind]]


def tiny_config(entry):
    cls = entry.config_cls
    if hasattr(cls, "tiny"):
        return cls.tiny()
    try:
        return cls()
    except TypeError:
        return None  # needs user input (a dataset id, a path): nothing to build blind


def fake_train_data(n=64):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, SPEC.channels, SPEC.image_size, SPEC.image_size), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % SPEC.num_classes


def context(tmp_path):
    return BuildContext.create(build_component, data=SPEC, train_data=fake_train_data, cache_dir=str(tmp_path))


@pytest.mark.parametrize("kind", KINDS)
def test_every_entry_is_documented_and_frozen(kind):
    for e in registries()[kind]:
        assert e.doc, f"{kind} '{e.name}' needs a docstring on its factory or config class"
        assert attrs.has(e.config_cls)
        params = getattr(e.config_cls, "__attrs_attrs__")
        assert all(a.kw_only for a in params), f"{kind} '{e.name}': config must be kw_only"
        cfg = tiny_config(e)
        if cfg is not None and params:
            with pytest.raises(attrs.exceptions.FrozenInstanceError):
                setattr(cfg, params[0].name, getattr(cfg, params[0].name))


@pytest.mark.parametrize("entry", entries("tokenizer"))
def test_tokenizer_contract(entry, tmp_path):
    tok = entry.factory(tiny_config(entry), context(tmp_path))
    x = torch.rand(2, SPEC.channels, SPEC.image_size, SPEC.image_size) * 2 - 1
    with torch.no_grad():
        z = tok.encode(x)
        assert z.shape == (2, *tok.latent_shape) and len(tok.latent_shape) == 3
        y = tok.decode(z)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert isinstance(tok.trainable, bool)


@pytest.mark.parametrize("entry", entries("method"))
def test_method_contract(entry, tmp_path):
    torch.manual_seed(0)
    ctx = context(tmp_path)
    method = entry.factory(tiny_config(entry), ctx)
    assert isinstance(method, torch.nn.Module)
    assert method.default_sampler in registries().sampler
    images, labels = fake_train_data(8)
    x = images.float() / 127.5 - 1
    loss, logs = method.loss(x, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in logs.values())
    loss.backward()
    groups = method.param_groups()
    params = [p for g in groups for p in g["params"]]
    assert params and all("lr_scale" in g for g in groups)
    assert len({id(p) for p in params}) == len(params), "a parameter appears in two groups"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    sampler = build_component("sampler", method.default_sampler, ctx)
    method.eval()
    with torch.no_grad():
        for steps in (1, 2):
            out = sampler.sample(method, labels[:3], steps, 1.0, torch.Generator().manual_seed(1))
            assert out.shape == (3, SPEC.channels, SPEC.image_size, SPEC.image_size)
            assert out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()
            assert sampler.nfe(steps, 1.0) >= steps and sampler.nfe(steps, 2.0) >= sampler.nfe(steps, 1.0)
        a = sampler.sample(method, labels[:3], 2, 1.5, torch.Generator().manual_seed(1))
        b = sampler.sample(method, labels[:3], 2, 1.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b), "sampling must be deterministic for a fixed generator"
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            sampler.sample(method, labels[:3], bad, 1.0)
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            sampler.nfe(bad, 1.0)


@pytest.mark.parametrize("entry", entries("method"))
def test_checkpointed_blocks_give_the_same_loss_and_gradients(entry, tmp_path):
    """A method that lists blocks for ``train.activation_checkpointing`` (and does not
    refuse it with a ConfigError) trains the same with them checkpointed."""
    from spheregen import precision
    from spheregen.errors import ConfigError
    from spheregen.interfaces import CheckpointableBlocks, has

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(entry.factory(tiny_config(entry), context(tmp_path)))
    plain, ckpt = models
    if not has(ckpt, CheckpointableBlocks):
        pytest.skip(f"{entry.name} lists no blocks to checkpoint")
    try:
        precision.checkpoint_activations(precision.checkpoint_blocks(ckpt, entry.name))
    except ConfigError:
        pytest.skip(f"{entry.name} refuses activation checkpointing")
    with torch.no_grad():  # no zero-init block: every block's gradients count
        gen = torch.Generator().manual_seed(1)
        for a, b in zip(plain.parameters(), ckpt.parameters()):
            noise = 0.02 * torch.randn(a.shape, generator=gen)
            a.add_(noise)
            b.add_(noise)
    images, labels = fake_train_data(8)
    x = images.float() / 127.5 - 1
    out = []
    for model in (plain, ckpt):
        torch.manual_seed(2)
        loss, _ = model.loss(x, labels)
        loss.backward()
        out.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0])
    for ga, gb in zip(out[0][1], out[1][1]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(gb, ga)


@pytest.mark.parametrize("entry", entries("sampler"))
def test_sampler_nfe_is_monotone(entry, tmp_path):
    sampler = entry.factory(tiny_config(entry), context(tmp_path))
    nfes = [sampler.nfe(t, 1.0) for t in (1, 2, 4)]
    assert all(isinstance(n, int) and n >= 1 for n in nfes) and nfes == sorted(nfes)


@pytest.mark.parametrize("entry", entries("dataset"))
def test_dataset_contract(entry):
    cfg = tiny_config(entry)
    if cfg is None:
        pytest.skip(f"dataset '{entry.name}' needs a user-given id or path (tested in tests/core/test_data.py)")
    src = entry.factory(cfg, None)
    assert src.splits() and src.num_classes >= 0 and src.key
    rows = src.split(src.splits()[0])
    image, label = rows[0]
    assert len(rows) > 0 and isinstance(label, int)


@pytest.mark.parametrize("entry", entries("metric"))
def test_metric_contract(entry, tmp_path):
    images, labels = fake_train_data(64)
    ctx = MetricContext(data=SPEC, train_images=images, train_labels=labels, test_images=images[:32],
                        test_labels=labels[:32], cache_dir=str(tmp_path), device=torch.device("cpu"),
                        dataset_key="contract")
    metric = entry.factory(tiny_config(entry), ctx)
    extra = {"labels": labels[:32]} if getattr(metric, "needs_labels", False) else {}
    out = metric.compute(images[:32], images[32:], **extra)
    assert set(metric.keys) <= set(out) and all(isinstance(out[k], float) for k in metric.keys)


def compatible_pairs():
    """Every (method, sampler) pair of registered components that the sampler's declared
    ``requires`` accepts (spheregen.compat, on the meta device)."""
    from spheregen.compat import fit_table

    return [pytest.param(m, s, id=f"{m}+{s}") for s, methods in fit_table().items() for m in methods]


def networks(method):
    """The method's networks, whose forward passes NFE counts: its direct child modules
    with parameters, except a frozen tokenizer (decoding once is not a network evaluation)."""
    tokenizer = getattr(method, "tokenizer", None)
    frozen = tokenizer is not None and not getattr(tokenizer, "trainable", True)
    return [m for m in method.children() if any(True for _ in m.parameters()) and not (frozen and m is tokenizer)]


@pytest.mark.parametrize("method_name, sampler_name", compatible_pairs())
def test_compatible_pair_samples_in_nfe_passes(method_name, sampler_name, tmp_path):
    torch.manual_seed(0)
    ctx = context(tmp_path)
    method = registries().method.get(method_name)
    method = method.factory(tiny_config(method), ctx).eval()
    sampler = build_component("sampler", sampler_name, ctx)
    seen = []  # images per forward pass: a 2B classifier-free-guidance batch counts twice
    hooks = [n.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0]))) for n in networks(method)]
    labels = torch.tensor([1, 7])
    try:
        for steps in (1, 2):
            for guidance in (1.0, 2.0):
                seen.clear()
                with torch.no_grad():
                    out = sampler.sample(method, labels, steps, guidance, torch.Generator().manual_seed(0))
                assert out.shape == (2, SPEC.channels, SPEC.image_size, SPEC.image_size)
                assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
                assert sum(seen) == len(labels) * sampler.nfe(steps, guidance), (steps, guidance, seen)
    finally:
        for h in hooks:
            h.remove()
