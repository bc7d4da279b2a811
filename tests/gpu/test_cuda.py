"""The CUDA path (``pytest -m gpu``; skipped without a CUDA device, never in the default run).

What the CPU suite cannot see: device placement of every buffer and generator, CUDA
numerics against the CPU reference, bf16 autocast training, and the whole runner
(accelerate on a GPU, CUDA peak memory, synchronised timings) on real data.
"""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from spheregen.cli import main
from spheregen.interfaces import DataSpec
from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig, SphereSamplerConfig
from spheregen_plugins.sphere_encoder.method import SphereEncoder
from spheregen_plugins.sphere_encoder.sampler import SphereSampler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DATA = DataSpec(image_size=32, channels=3, num_classes=10)
CUDA = torch.device("cuda")


@pytest.fixture
def exact_fp32():
    """Full fp32 matmuls (no TF32), so CUDA can be compared with the CPU reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_encoder(seed: int = 0) -> SphereEncoder:
    """SPEC D's tiny model at 32 px with its zero-initialised tensors given values."""
    torch.manual_seed(seed)
    model = SphereEncoder(SphereEncoderConfig.tiny(), DATA)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(std=0.02)
    return model


def smooth_images(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    freq = torch.rand(b, 3, 1, 1, generator=g) * 3 + 1
    phase = torch.rand(b, 3, 1, 1, generator=g) * 6
    return torch.sin(freq * xx + phase) * torch.cos(freq * yy - phase) * 0.8


def test_sphere_encoder_cuda_matches_cpu(exact_fp32):
    cpu = tiny_encoder().eval()
    gpu = tiny_encoder().eval().to(CUDA)
    x, y = smooth_images(16), torch.arange(16) % 10
    with torch.no_grad():
        z_cpu, z_gpu = cpu.encode_raw(x, y), gpu.encode_raw(x.to(CUDA), y.to(CUDA))
        torch.testing.assert_close(z_gpu.cpu(), z_cpu, atol=1e-4, rtol=1e-4)
        out_cpu, out_gpu = cpu.decode(z_cpu, y), gpu.decode(z_cpu.to(CUDA), y.to(CUDA))
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=1e-4)


def test_batches_converted_on_the_gpu_equal_the_cpu_ones():
    """The trainer converts and mirrors uint8 batches on the device (runner.prepare_batch):
    the same bits as on the CPU, so a CUDA run, its resume and its latent caches agree
    with what the CPU path gives."""
    from spheregen.runner import prepare_batch

    images = torch.arange(256, dtype=torch.uint8).repeat(8, 3, 1).view(8, 3, 16, 16)
    labels = torch.arange(8)
    cpu = prepare_batch(images, labels, True, 0, 3, torch.device("cpu"))
    gpu = prepare_batch(images.pin_memory(), labels, True, 0, 3, CUDA)
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


def test_sphere_encoder_trains_under_bf16_autocast():
    """bf16 autocast takes the real-valued RoPE (no complex bf16) and still learns."""
    model = tiny_encoder().to(CUDA).train()
    x, y = smooth_images(32).to(CUDA), (torch.arange(32) % 10).to(CUDA)
    opt = torch.optim.AdamW([{"params": g["params"], "lr": 1e-3 * g["lr_scale"]} for g in model.param_groups()],
                            betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _ in range(40):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])  # 0.70 measured on an H100


def test_sphere_sampler_on_cuda_is_seeded_and_in_range():
    model = tiny_encoder().eval().to(CUDA)
    sampler = SphereSampler(SphereSamplerConfig(cfg_position="combo"))
    labels = (torch.arange(24) % 10).to(CUDA)

    def draw() -> torch.Tensor:
        gen = torch.Generator(device=CUDA).manual_seed(5)
        with torch.no_grad():
            return sampler.sample(model, labels, 4, 1.2, generator=gen)

    a, b = draw(), draw()
    assert a.device.type == "cuda" and a.shape == (24, 3, 32, 32)
    assert torch.equal(a, b) and a.abs().max() <= 1


EXPERIMENT = """name = "gpu-smoke"
seed = 0
[data]
source = "mnist-5k"
image_size = 32
channels = 3
fit = "pad"
[train]
steps = 60
batch_size = 64
lr = 1e-3
mixed_precision = "bf16"
log_every = 20
[eval]
steps = [1, 2]
num_samples = 500
batch_size = 250
use_ema = false
metrics = [
    { name = "fid", features = "domain-classifier", classifier = { epochs = 1 } },
    { name = "class-accuracy", classifier = { epochs = 1 } },
]
[[methods]]
name = "fm-pixel"
method = { name = "flow-matching", tokenizer = { name = "patch", patch_size = 1 }, denoiser = { name = "dit", width = 64, depth = 2, heads = 2, patch_size = 4 } }
sampler = "euler"
[[methods]]
name = "sphere-encoder"
method = { name = "sphere-encoder", size = "tiny", patch_size = 4, compression_ratio = 1.5, noise_angle = 80.0, mixer_depth = 2, head = "conv" }
sampler = { name = "sphere", cfg_position = "combo" }
guidance = 1.2
[[methods]]
name = "sphere-latent"
method = { name = "sphere-latent", tokenizer = { name = "rae", encoder_steps = 40, decoder_steps = 20 }, denoiser = { name = "dit", width = 64, depth = 2, heads = 2, patch_size = 2 } }
guidance = 2.0
[[methods]]
name = "meanflow"
method = { name = "meanflow", tokenizer = { name = "rae", encoder_steps = 40, decoder_steps = 20 }, denoiser = { name = "dit", width = 64, depth = 2, heads = 2, patch_size = 2, time_inputs = 2 } }
steps = [1]
"""


def test_run_on_cuda_end_to_end(tmp_path):
    """train (bf16, accelerate on the GPU) -> sample -> evaluate -> report for a pixel
    flow, the Sphere Encoder and two methods on one cached RAE."""
    exp = tmp_path / "gpu.toml"
    exp.write_text(EXPERIMENT)
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]
    assert main(["run", str(exp), *dirs]) == 0
    df = pl.read_parquet(tmp_path / "reports" / "gpu-smoke" / "results.parquet")
    assert sorted(df["method"].unique().to_list()) == ["fm-pixel", "meanflow", "sphere-encoder", "sphere-latent"]
    assert df.height == 7
    assert all(d.startswith("cuda") for d in df["device"].to_list())
    assert (df["peak_memory_mb"] > 0).all() and (df["images_per_s"] > 0).all()
    fid = [c for c in df.columns if c.startswith("fid")]
    assert fid and all(math.isfinite(v) for v in df[fid[0]].to_list())
    log = (tmp_path / "runs" / "gpu-smoke" / "sphere-encoder" / "train_log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 60
    with np.load(tmp_path / "runs" / "gpu-smoke" / "samples" / "sphere-encoder" / "steps-2.npz") as z:
        # 60 steps draw near-black strokes (pixel std ~0.5 of 255): this checks the
        # files, not quality, which the CPU parity tier and the reports measure.
        assert z["images"].shape == (500, 3, 32, 32) and z["images"].dtype == np.uint8 and z["images"].std() > 0
        assert np.bincount(z["labels"]).tolist() == [50] * 10
