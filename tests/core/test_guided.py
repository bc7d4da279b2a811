"""spheregen.guidance.guided evaluates a CPU batch without autograd in micro-batches of
at most CPU_MICRO_BATCH samples (the contract lets a batch be split), the same function."""

from __future__ import annotations

import pytest
import torch

from spheregen import guidance
from spheregen.guidance import CPU_MICRO_BATCH, guided


class Recorder:
    """fn(x, t, labels[, drop]) = x·t + label (0 for the null class), recording batch sizes."""

    def __init__(self):
        self.sizes: list[int] = []

    def plain(self, x, t, labels):
        self.sizes.append(x.shape[0])
        return x * t.reshape(-1, 1) + (0 if labels is None else labels[:, None].to(x.dtype))

    def masked(self, x, t, labels, drop=None):
        self.sizes.append(x.shape[0])
        kept = labels if drop is None else torch.where(drop, 0, labels)
        return x * t.reshape(-1, 1) + kept[:, None].to(x.dtype)


def _inputs(b: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, generator=g), torch.rand(b, generator=g), torch.arange(b) % 10


@pytest.mark.parametrize("kind", ["plain", "masked"])
@pytest.mark.parametrize("w", [1.0, 2.5])
def test_a_large_cpu_batch_is_evaluated_in_slices_with_the_same_result(kind, w):
    b = 2 * CPU_MICRO_BATCH + 22
    x, t, y = _inputs(b)
    rec = Recorder()
    with torch.no_grad():
        out = guided(getattr(rec, kind), x, (t,), y, w)
        whole = guidance._guided(getattr(Recorder(), kind), x, (t,), y, w)
    per_call = 2 if (w > 1 and kind == "masked") else 1  # the masked CFG pass is one batch of 2B
    calls = 2 if (w > 1 and kind == "plain") else 1
    expected = [n * per_call for n in (CPU_MICRO_BATCH, CPU_MICRO_BATCH, 22) for _ in range(calls)]
    assert rec.sizes == expected
    assert torch.equal(out, whole)


def test_inference_mode_null_labels_and_times_that_are_not_per_sample():
    b = CPU_MICRO_BATCH + 10
    x, t, _ = _inputs(b)
    rec = Recorder()
    with torch.inference_mode():
        out = guided(rec.plain, x, (t.new_tensor(0.5),), None, 1.0)  # a 0-d time goes to every slice
        stride0 = guided(rec.plain, x, (t[:1].expand(b),), None, 1.0)
    assert rec.sizes == [CPU_MICRO_BATCH, 10, CPU_MICRO_BATCH, 10]
    assert torch.equal(out, x * 0.5) and torch.equal(stride0, x * t[0])


def test_with_autograd_or_a_small_batch_it_is_one_call():
    rec = Recorder()
    x, t, y = _inputs(3 * CPU_MICRO_BATCH)
    x.requires_grad_(True)
    guided(rec.plain, x, (t,), y, 1.0).sum().backward()  # training keeps the whole batch
    assert rec.sizes == [3 * CPU_MICRO_BATCH] and x.grad is not None
    with torch.no_grad():  # a batch of exactly CPU_MICRO_BATCH: one call
        small = slice(0, CPU_MICRO_BATCH)
        guided(rec.plain, x[small], (t[small],), y[small], 1.0)
    assert rec.sizes == [3 * CPU_MICRO_BATCH, CPU_MICRO_BATCH]


def test_sphere_encoder_samples_do_not_depend_on_the_micro_batch(monkeypatch):
    from spheregen.interfaces import BuildContext, DataSpec
    from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig, SphereSamplerConfig
    from spheregen_plugins.sphere_encoder.method import build_method
    from spheregen_plugins.sphere_encoder.sampler import SphereSampler

    torch.manual_seed(0)
    cfg = SphereEncoderConfig(size="tiny", patch_size=4, mixer_depth=1)
    method = build_method(cfg, BuildContext(data=DataSpec(image_size=16, channels=1, num_classes=10),
                                            build=lambda kind, component: None)).eval()
    sampler = SphereSampler(SphereSamplerConfig(cfg_position="combo", cache_noise=True))
    labels = torch.arange(40) % 10

    sizes: list[int] = []
    for name in ("encode_raw", "decode"):
        def recorded(z, y=None, _f=getattr(method, name)):
            sizes.append(z.shape[0])
            return _f(z, y)
        monkeypatch.setattr(method, name, recorded)

    def draw():
        sizes.clear()
        with torch.no_grad():
            out = sampler.sample(method, labels, 2, 2.0, generator=torch.Generator().manual_seed(1))
        return out, max(sizes)

    monkeypatch.setattr(guidance, "CPU_MICRO_BATCH", 16)
    sliced, most = draw()
    assert most == 16
    monkeypatch.setattr(guidance, "CPU_MICRO_BATCH", 1000)
    whole, most = draw()
    assert most == 40
    # The same rows through BLAS in other blockings: bit-identical on the development
    # machine; another CPU's BLAS may round a row differently in a product of another
    # shape, hence a tolerance rather than torch.equal.
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "masked"])
def test_null_labels_under_guidance_are_one_null_call(kind):
    """uncond + w·(uncond − uncond) = uncond: without labels, guidance > 1 is one null
    call (the drop= path failed in torch.cat on labels=None before)."""
    x, t, _ = _inputs(5)
    rec = Recorder()
    fn = rec.plain if kind == "plain" else (lambda x, t, labels, drop=None: rec.plain(x, t, labels))
    with torch.no_grad():
        out = guided(fn, x, (t,), None, 3.0)
    assert rec.sizes == [5] and torch.equal(out, x * t[:, None])


def test_a_time_that_is_not_per_sample_goes_to_both_halves_of_a_drop_batch():
    x, t, y = _inputs(5)
    with torch.no_grad():
        out = guided(Recorder().masked, x, (t.new_tensor(0.5),), y, 2.0)
        full = guided(Recorder().masked, x, (t.new_full((5,), 0.5),), y, 2.0)
    assert torch.equal(out, full)
