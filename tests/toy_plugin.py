"""An in-process plugin with the smallest real components, for testing the core
(runner, evaluation, report) without depending on any built-in method."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

import spheregen


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


@spheregen.hookimpl
def spheregen_register_methods(register):
    register("toy-ae", ToyMethod, ToyConfig)


@spheregen.hookimpl
def spheregen_register_samplers(register):
    register("toy-loop", lambda cfg, ctx: ToyLoop(), ToyLoopConfig)
