"""FLOPs conventions, parameter counts and throughput (spheregen.flops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spheregen.flops import (
    ATTENTION,
    count_flops,
    count_params,
    count_sampling_flops,
    measure_throughput,
    sdpa_flops,
)

DEVICES = ("cpu", "meta")


class Block(nn.Module):
    """A pre-norm transformer block calling SDPA, as the project's ViTs do."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(x)


def block_flops(tokens: int, dim: int) -> tuple[int, int]:
    """Analytic (matmul, attention) FLOPs of one Block on one image: qkv 6ND², proj 2ND²,
    MLP 16ND²; attention QKᵀ and AV 2·N²·D each."""
    return 24 * tokens * dim * dim, 4 * tokens * tokens * dim


@pytest.mark.parametrize("device", DEVICES)
def test_linear_is_two_m_n_k(device):
    m, k, n = 7, 64, 48
    layer = nn.Linear(k, n, device=device)
    x = torch.randn(m, k, device=device)
    count = count_flops(lambda: layer(x))
    assert count.total == count.paper == 2 * m * n * k
    assert count.attention == 0 and count.by_op == {"aten.addmm": 2 * m * n * k}


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_is_attention_and_paper_excludes_it(device):
    q = torch.randn(1, 4, 16, 8, device=device)
    v = torch.randn(1, 4, 16, 12, device=device)
    count = count_flops(lambda: F.scaled_dot_product_attention(q, q, v))
    expected = 2 * 4 * 16 * 16 * 8 + 2 * 4 * 16 * 16 * 12
    assert sdpa_flops(q.shape, q.shape, v.shape) == expected
    assert count.total == count.attention == expected
    assert count.by_op == {ATTENTION: expected} and count.paper == 0


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_block_true_and_paper(device):
    tokens, dim = 16, 32
    with torch.device(device):
        block = Block(dim, heads=4).eval()
        x = torch.randn(1, tokens, dim)
    matmuls, attention = block_flops(tokens, dim)
    count = count_flops(lambda: block(x))
    assert count.attention == attention
    assert count.paper == matmuls
    assert count.total == matmuls + attention
    assert count.flops("paper") == count.paper and count.gflops("true") == count.total / 1e9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_counts_the_same_on_every_path(device, need_weights):
    with torch.device(device):
        mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
        x = torch.randn(1, 10, 32)
    count = count_flops(lambda: mha(x, x, x, need_weights=need_weights))
    assert count.attention == 4 * 10 * 10 * 32
    assert count.paper == 2 * 10 * 32 * 32 * 4  # q, k, v and out projections


def test_images_divides_a_batch():
    layer = nn.Linear(16, 16)
    x = torch.randn(4, 16)
    assert count_flops(lambda: layer(x), images=4).total == 2 * 16 * 16


class ToySampler:
    """Decoder every step, encoder between steps, each doubled under CFG (as A9)."""

    def sample(self, method, labels, steps, guidance=1.0, generator=None):
        passes = 2 if guidance > 1 else 1
        z = torch.randn(len(labels), 8, 32, generator=generator, device=labels.device)
        for t in range(steps):
            for _ in range(passes):
                x = method.decoder(z)
            if t < steps - 1:
                for _ in range(passes):
                    z = method.encoder(x)
        return x

    def nfe(self, steps, guidance=1.0):
        return (2 * steps - 1) * (2 if guidance > 1 else 1)


class ToyMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Block(32, 4)
        self.decoder = Block(32, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_flops_count_every_pass_including_cfg(device):
    with torch.device(device):
        method = ToyMethod().eval()
    matmuls, attention = block_flops(8, 32)
    sampler = ToySampler()
    for steps, guidance in [(1, 1.0), (3, 1.0), (3, 1.5)]:
        count = count_sampling_flops(sampler, method, steps, guidance)
        assert count.total == sampler.nfe(steps, guidance) * (matmuls + attention)
        assert count.paper == sampler.nfe(steps, guidance) * matmuls


def test_paper_scale_model_counts_on_meta_without_memory():
    dim, depth, tokens = 1536, 36, 256  # ≈1B parameters: nothing is allocated on meta
    with torch.device("meta"):
        model = nn.Sequential(*(Block(dim, heads=16) for _ in range(depth))).eval()
        x = torch.randn(1, tokens, dim)
    params = count_params(model)
    assert params.total > 1e9
    matmuls, attention = block_flops(tokens, dim)
    count = count_flops(lambda: model(x))
    assert count.paper == depth * matmuls and count.attention == depth * attention


def test_count_params_trainable_and_total():
    model = ToyMethod()
    model.encoder.requires_grad_(False)
    per_block = sum(p.numel() for p in Block(32, 4).parameters())
    assert count_params(model).total == 2 * per_block
    assert count_params(model).trainable == per_block


def test_measure_throughput():
    calls = []
    result = measure_throughput(lambda: calls.append(1), batch=8, warmup=2, repeats=3)
    assert len(calls) == 5 and len(result.times_s) == 3
    assert result.images_per_s == pytest.approx(8 / result.latency_s)
    with pytest.raises(ValueError):
        measure_throughput(lambda: None, batch=0)


def test_peak_memory_counts_weights_and_live_activations():
    from spheregen.flops import measure_peak_memory

    net = torch.nn.Sequential(torch.nn.Linear(100, 400), torch.nn.ReLU(), torch.nn.Linear(400, 100))
    x = torch.randn(64, 100)
    weights = sum(p.numel() * 4 for p in net.parameters())
    # peak inside the second call: weights, x, one 64×400 hidden kept alive by ReLU's
    # input, the 64×100 output of the first call
    one = measure_peak_memory(lambda: net(x), net)
    two = measure_peak_memory(lambda: net(net(x)), net)
    assert weights + 64 * 400 * 4 <= one <= weights + 3 * 64 * 400 * 4
    assert two >= one  # freed activations are not accumulated: two calls cost little more
    assert two < one + 2 * 64 * 400 * 4
    with torch.device("meta"):
        meta_net = torch.nn.Sequential(torch.nn.Linear(100, 400), torch.nn.ReLU(), torch.nn.Linear(400, 100))
        xm = torch.randn(64, 100)
    # meta tensors have storages of the same byte size: paper-scale peaks need no memory
    assert measure_peak_memory(lambda: meta_net(xm), meta_net, "meta") == one


def test_psnr():
    from spheregen.evaluation import psnr

    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[:, :, 0, 0] = 16  # MSE = 16 per image
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 16))


def test_training_flops_are_forward_plus_backward():
    """A flow-matching step (one denoiser pass, then its backward) costs 2-4× the
    denoiser's forward, i.e. 1-step Euler sampling without guidance; gradients are
    cleared afterwards (docs/scale.md uses the Sphere Encoder's ratio)."""
    from spheregen.config import make_component
    from spheregen.flops import count_sampling_flops, count_training_flops
    from spheregen.interfaces import BuildContext, DataSpec
    from spheregen.workspace import build_component

    ctx = BuildContext.create(build_component, data=DataSpec(image_size=8, channels=1, num_classes=10))
    method = build_component("method", make_component(
        "method", "flow-matching", tokenizer={"name": "patch", "patch_size": 1},
        denoiser={"name": "dit", "width": 32, "depth": 1, "heads": 2, "patch_size": 2}), ctx)
    sampler = build_component("sampler", "euler", ctx)
    train = count_training_flops(method, (1, 8, 8), 10).total
    forward = count_sampling_flops(sampler, method, 1, 1.0).total
    assert 2.0 <= train / forward <= 4.0
    assert all(p.grad is None for p in method.parameters())
