"""An in-process plugin with the smallest real components, for testing the core
(runner, evaluation, report) without depending on any built-in method."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

import spheregen
from spheregen.interfaces import Column


@attrs.frozen(kw_only=True)
class ToyConfig:
    """A one-conv denoising autoencoder."""

    channels: int = 8
    nan_at_step: int = 0  # > 0: the loss becomes NaN from this call on (fault tests)


class ToyMethod(torch.nn.Module):
    default_sampler = "toy-loop"

    def __init__(self, cfg: ToyConfig, ctx):
        super().__init__()
        c = ctx.data.channels
        self.cfg = cfg
        self.inp = torch.nn.Conv2d(c, cfg.channels, 3, padding=1)
        self.out = torch.nn.Conv2d(cfg.channels, c, 3, padding=1)
        self.emb = torch.nn.Embedding(max(1, ctx.data.num_classes), cfg.channels)
        self.calls = 0
        self.image_shape = (c, ctx.data.image_size, ctx.data.image_size)

    def denoise(self, x, labels):
        h = F.silu(self.inp(x) + self.emb(labels)[:, :, None, None])
        return torch.tanh(self.out(h))

    def reconstruct(self, images, labels=None):
        """Its own autoencoder's round trip (exercises the rFID/PSNR stage)."""
        labels = torch.zeros(len(images), dtype=torch.long, device=images.device) if labels is None else labels
        return self.denoise(images, labels)

    def loss(self, images, labels):
        self.calls += 1
        noisy = images + 0.5 * torch.randn_like(images)
        loss = F.mse_loss(self.denoise(noisy, labels), images)
        if self.cfg.nan_at_step and self.calls >= self.cfg.nan_at_step:
            loss = loss * float("nan")
        return loss, {"mse": float(loss.detach())}

    def param_groups(self):
        return [{"params": list(self.inp.parameters()) + list(self.emb.parameters()), "lr_scale": 0.1},
                {"params": list(self.out.parameters()), "lr_scale": 1.0}]


@attrs.frozen(kw_only=True)
class ToyLoopConfig:
    """Repeated denoising from noise."""


class ToyLoop:
    def sample(self, method, labels, steps, guidance=1.0, generator=None):
        x = torch.randn((len(labels), *method.image_shape), generator=generator, device=labels.device)
        for _ in range(steps):
            x = method.denoise(x, labels)
        return x

    def nfe(self, steps, guidance=1.0):
        return steps


class PoolTokenizer(torch.nn.Module):
    """A frozen, lossy tokenizer: 2×2 average pooling (decode: nearest upsampling)."""

    trainable = False

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.latent_shape = (channels, size // 2, size // 2)
        self.encode_calls = 0
        # a frozen weight (exactly 1): checkpoints must leave it out and restore it
        self.gain = torch.nn.Parameter(torch.ones(channels, 1, 1), requires_grad=False)

    def encode(self, images):
        self.encode_calls += len(images)
        return F.avg_pool2d(images, 2) * self.gain

    def decode(self, latents):
        return F.interpolate(latents, scale_factor=2, mode="nearest")


@attrs.frozen(kw_only=True)
class ToyLatentConfig:
    """A one-conv denoiser on average-pooled latents."""


class ToyLatentMethod(torch.nn.Module):
    default_sampler = "toy-loop"

    def __init__(self, cfg: ToyLatentConfig, ctx):
        super().__init__()
        c = ctx.data.channels
        self.tokenizer = PoolTokenizer(c, ctx.data.image_size)
        self.net = torch.nn.Conv2d(c, c, 3, padding=1)
        self.image_shape = (c, ctx.data.image_size, ctx.data.image_size)

    @torch.no_grad()
    def encode(self, images):
        return self.tokenizer.encode(images)

    def denoise(self, x, labels):
        return torch.tanh(self.tokenizer.decode(self.net(F.avg_pool2d(x, 2))))

    def latent_loss(self, latents, labels):
        noisy = latents + 0.5 * torch.randn_like(latents)
        loss = F.mse_loss(self.net(noisy), latents)
        return loss, {"mse": float(loss.detach())}

    def loss(self, images, labels):
        return self.latent_loss(self.encode(images), labels)

    def param_groups(self):
        return [{"params": list(self.net.parameters()), "lr_scale": 1.0}]


@spheregen.hookimpl
def spheregen_register_methods(register):
    register("toy-ae", ToyMethod, ToyConfig)
    register("toy-latent", ToyLatentMethod, ToyLatentConfig)


@spheregen.hookimpl
def spheregen_register_samplers(register):
    register("toy-loop", lambda cfg, ctx: ToyLoop(), ToyLoopConfig)


@attrs.frozen(kw_only=True)
class ToyMetricConfig:
    """A metric of mean brightness (report tests)."""


class ToyScore:
    """Mean brightness of the samples; declares how its one shown column looks."""

    keys = ("toy_score", "toy_hidden")
    features = None
    columns = (Column(key="toy_score", label="toy score ↑", format="{:.1f}", scale=1e3, better="higher"),)

    def __init__(self, cfg, ctx):
        self.cfg = cfg

    def compute(self, samples, reference):
        return {"toy_score": float(samples.float().mean() / 255), "toy_hidden": 1.0}


class ToyRaw:
    """Declares no columns: the report shows its keys as-is."""

    keys = ("toy_raw",)
    features = None

    def __init__(self, cfg, ctx):
        self.cfg = cfg

    def compute(self, samples, reference):
        return {"toy_raw": float(len(samples))}


@spheregen.hookimpl
def spheregen_register_metrics(register):
    register("toy-score", ToyScore, ToyMetricConfig)
    register("toy-raw", ToyRaw, ToyMetricConfig)
