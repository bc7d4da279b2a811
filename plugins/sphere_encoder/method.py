"""The ``sphere-encoder`` method: encoder, decoder, spherical noise and the three losses
(SPEC A4, A6)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from spheregen.api import BuildContext, DataSpec, to_floats
from spheregen_plugins.sphere_encoder import sphere
from spheregen_plugins.sphere_encoder.config import SIZES, SphereEncoderConfig, official_patch_size
from spheregen_plugins.sphere_encoder.losses import distance, latent_consistency, sphere_perceptual
from spheregen_plugins.sphere_encoder.networks import Decoder, Encoder


def latent_channels(channels: int, patch: int, ratio: float) -> int:
    """d = int(C·H² / (H/P)² / ratio) = int(C·P² / ratio).

    The official code hard-codes C = 3; we use the data's channels so that the ratio
    keeps its meaning (pixel dims / latent dims) on 1-channel data. With the core's
    default of replicating grayscale to 3 channels this is the official value."""
    d = int(channels * patch * patch / ratio)
    if d < 1:
        raise ValueError(
            f"compression_ratio {ratio} leaves no latent channel at patch {patch} and {channels} channels"
        )
    return d


class SphereEncoder(nn.Module):
    """Encoder E and decoder D of the pixel-space Sphere Encoder.

    Latents are B×d×h×w (h = w = image_size / patch); ``spherify`` puts them on the
    sphere of radius √L, L = d·h·w. Labels: int64 B, or None for the null class."""

    default_sampler = "sphere"

    def __init__(self, cfg: SphereEncoderConfig, data: DataSpec, losses: bool = True):
        super().__init__()
        patch = cfg.patch_size if cfg.patch_size is not None else official_patch_size(data.image_size)
        if data.image_size % patch:
            raise ValueError(f"image_size {data.image_size} is not divisible by patch_size {patch}")
        width, depth, heads = SIZES[cfg.size]
        self.cfg = cfg
        self.patch = patch
        self.num_classes = data.num_classes if cfg.conditional else 0
        d = latent_channels(data.channels, patch, cfg.compression_ratio)
        grid = data.image_size // patch
        self.latent_shape: tuple[int, int, int] = (d, grid, grid)
        self.sigma_max = sphere.sigma_max(cfg.noise_angle)
        common = dict(image_size=data.image_size, channels=data.channels, patch=patch, latent_dim=d,
                      width=width, depth=depth, heads=heads, mixer_depth=cfg.mixer_depth,
                      mixer_affine=cfg.mixer_affine, num_classes=self.num_classes,
                      label_dropout=cfg.label_dropout)
        self.encoder = Encoder(**common)
        self.decoder = Decoder(**common, head=cfg.head)
        needs_perceptual = cfg.perc_weight > 0 or (cfg.pixel_consistency and cfg.con_perc_weight > 0)
        # losses=False (an architecture built on meta to count FLOPs) needs no VGG weights
        self._perceptual = sphere_perceptual() if needs_perceptual and losses else None

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def latent_dim(self) -> int:
        """L, the number of latent dims; the sphere's radius is √L."""
        d, h, w = self.latent_shape
        return d * h * w

    def _labels(self, labels: Tensor | None) -> Tensor | None:
        return labels if self.conditional else None

    # ------------------------------------------------------------ networks

    def encode_raw(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """B×C×H×W in [-1, 1] -> raw (pre-f) latent B×d×h×w."""
        return self.encoder(images, self._labels(labels))

    @staticmethod
    def spherify(z: Tensor) -> Tensor:
        return sphere.spherify(z)

    def encode(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images -> latents on the sphere, f(E(x))."""
        return sphere.spherify(self.encode_raw(images, labels))

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """B×d×h×w latent (on the sphere) -> images in (-1, 1)."""
        return self.decoder(z, self._labels(labels))

    # ------------------------------------------------------------ training

    def noisy_latents(self, v: Tensor, draws: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(v_NOISY, v_noisy) from spherified latents v, with one shared noise draw e:
        σ = r·σmax with r stratified (one 0, one 1) and hard cases mixed in, and
        σ_sub = r·s·0.5·σmax with the pre-mixing r and a second stratified s. ``draws``:
        :meth:`loss_draws`'s r, s, r_big and e (drawn here when None)."""
        d = self._noise_draws(v.shape[0], v) if draws is None else draws
        e = d["e"].to(v.dtype)
        v_big = sphere.perturb(v, d["r_big"] * self.sigma_max, e)
        v_small = sphere.perturb(v, d["r"] * d["s"] * 0.5 * self.sigma_max, e)
        return v_big, v_small

    def _noise_draws(self, b: int, like: Tensor) -> dict[str, Tensor]:
        """r, s (stratified over the batch), r_big (r with hard cases mixed in) and the
        noise e = ``sphere.gaussian_like(like)`` (shape, dtype and memory order of ``like``)."""
        r = sphere.stratified_unit_radii(b, device=like.device)
        s = sphere.stratified_unit_radii(b, device=like.device)
        r_big = sphere.mix_hard_cases(r, self.cfg.hard_case_prob, self.cfg.noise_angle, self.cfg.hard_case_fix)
        return {"r": r, "s": s, "r_big": r_big, "e": sphere.gaussian_like(like)}

    def loss_draws(self, images: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
        """Every random number one :meth:`loss` call on this batch uses, drawn from the
        global RNG in the order the loss uses them (so ``loss(x, y)`` and ``loss(x, y,
        draws=loss_draws(x, y))`` are the same numbers), each with the batch as its
        leading dim: the label-dropout masks of the encoder, the decoder's two halves
        and the latent-consistency encoder pass (absent when nothing is dropped), the
        stratified radii (over the whole batch: one 0 and one 1) and the noise. Rows of
        these are what a shard of the batch uses (spheregen.interfaces.ShardableLoss)."""
        b, device = images.shape[0], images.device
        if b < 3:
            raise ValueError(f"the Sphere Encoder needs a batch of at least 3 per device (stratified noise), got {b}")
        cfg, labels = self.cfg, self._labels(labels)
        embed = lambda net, n: None if labels is None else net.label_embed.draw(n, device)  # noqa: E731
        draws: dict[str, Tensor | None] = {"drop_e": embed(self.encoder, b)}
        # The noise in the memory order of the encoder's latents (token-major: B×h×w×d),
        # drawn in fp32 (fp64 for fp64 images) and cast to the latents' dtype where it is
        # used: torch draws bf16 / fp16 normals as fp32 ones rounded, the same numbers.
        d, h, w = self.latent_shape
        dtype = torch.promote_types(images.dtype, torch.float32)
        draws.update(self._noise_draws(b, torch.empty(b, h, w, d, device=device, dtype=dtype).permute(0, 3, 1, 2)))
        if cfg.pixel_consistency:
            both = embed(self.decoder, 2 * b)
            draws["drop_big"], draws["drop_small"] = (None, None) if both is None else both.chunk(2)
        else:
            draws["drop_big"] = embed(self.decoder, b)
        if cfg.lat_con_weight > 0:
            draws["drop_e2"] = embed(self.encoder, b)
        return {k: v for k, v in draws.items() if v is not None}

    def _perc(self, pred: Tensor, target: Tensor) -> Tensor:
        assert self._perceptual is not None
        return self._perceptual(pred, target)

    def loss(self, images: Tensor, labels: Tensor | None,
             draws: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        """images B×C×H×W in [-1, 1], labels B -> (scalar loss, float logs). ``draws``:
        rows of :meth:`loss_draws` for these images (drawn here when None); every term
        is a mean over the batch's samples."""
        cfg = self.cfg
        d = self.loss_draws(images, labels) if draws is None else draws
        labels = self._labels(labels)
        z = self.encoder(images, labels, d.get("drop_e"))
        v_big, v_small = self.noisy_latents(sphere.spherify(z), d)
        terms: dict[str, Tensor] = {}
        if cfg.pixel_consistency:
            both = None if labels is None else torch.cat([labels, labels])
            drop = d.get("drop_big")
            drop = None if drop is None else torch.cat([drop, d["drop_small"]])
            x_big, x_small = self.decoder(torch.cat([v_big, v_small]), both, drop).chunk(2)
        else:
            x_big = x_small = self.decoder(v_big, labels, d.get("drop_big"))
        # Recon targets D(v_noisy) (or D(v_NOISY) without pixel consistency), not D(v).
        terms["recon_dist"] = cfg.dist_weight * distance(x_small, images)
        if cfg.perc_weight > 0:
            terms["recon_perc"] = cfg.perc_weight * self._perc(x_small, images)
        if cfg.pixel_consistency:
            target = x_small.detach()
            terms["con_dist"] = cfg.con_dist_weight * distance(x_big, target)
            if cfg.con_perc_weight > 0:
                terms["con_perc"] = cfg.con_perc_weight * self._perc(x_big, target)
        if cfg.lat_con_weight > 0:
            # Not detached: the gradient reaches D through x_big and E through both passes.
            z_again = self.encoder(x_big, labels, d.get("drop_e2"))
            terms["lat_con"] = cfg.lat_con_weight * latent_consistency(z_again, z.detach())
        total = torch.stack(list(terms.values())).sum()
        return total, to_floats({"loss": total, **terms})  # the terms are logged weighted

    edit_ops = ("reconstruct", "interpolate", "manipulate")

    @torch.no_grad()
    def reconstruct(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """D(f(E(x))) under the null class, B×C×H×W in [-1, 1]: the encoder-decoder as
        a tokenizer (rFID/PSNR in the report)."""
        from spheregen_plugins.sphere_encoder import editing

        return editing.reconstruct(self, images).clamp(-1, 1)

    @torch.no_grad()
    def edit(self, op: str, images: Tensor, labels: Tensor | None = None, num: int = 8,
             mode: str = "slerp") -> Tensor:
        """The paper's edits as image grids B×K×C×H×W (row b: one input image).

        ``reconstruct``: [input, D(f(E(x)))] under the null class (K = 2);
        ``interpolate``: image b to image (b+1) mod B in ``num`` points, ``mode`` slerp or
        lerp; ``manipulate``: the latent of x under the null class decoded as every class."""
        from spheregen_plugins.sphere_encoder import editing

        if op == "reconstruct":
            return torch.stack([images, editing.reconstruct(self, images)], dim=1)
        if op == "interpolate":
            return editing.interpolate(self, images, images.roll(-1, 0), num=num, mode=mode)
        if op == "manipulate":
            classes = torch.arange(max(1, self.num_classes), device=images.device)
            return editing.manipulate_class(self, images, classes)
        raise ValueError(f"unknown edit {op!r}; this method supports {list(self.edit_ops)}")

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The transformer blocks of encoder and decoder (``train.activation_checkpointing``)."""
        return [*self.encoder.checkpoint_blocks(), *self.decoder.checkpoint_blocks()]

    def param_groups(self) -> list[dict[str, Any]]:
        """Encoder at ``encoder_lr_scale`` (official 0.1), everything else at 1.0;
        frozen parameters (sin-cos positions) are left out."""
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        rest = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
        return [
            {"params": enc, "lr_scale": self.cfg.encoder_lr_scale, "name": "encoder"},
            {"params": rest, "lr_scale": 1.0, "name": "decoder"},
        ]


def build_method(cfg: SphereEncoderConfig, ctx: BuildContext) -> SphereEncoder:
    """Pixel-space Sphere Encoder (Yue et al.): ViT encoder/decoder on a spherical latent."""
    return SphereEncoder(cfg, ctx.data, losses=ctx.device.type != "meta").to(ctx.device)
