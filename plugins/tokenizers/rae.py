"""``rae``: a representation autoencoder tokenizer (Zheng et al. 2025, SPEC F).

A *frozen* representation encoder maps images to a grid of tokens; a ViT decoder
(MAE-style: linear in, fixed 2-D sin-cos positions, pre-norm blocks, linear patch head)
is trained by spheregen to invert it. Latents are normalised per element with dataset
statistics, ``(z − mean) / sqrt(var + 1e-5)`` (mean and var of shape D×h×w, over the
training set), so every latent element has zero mean and unit variance and a method can
treat the latent like the unit-variance data diffusion models expect.

Encoders (config ``encoder``):

* ``"dinov2"``: a timm DINOv2 ViT (default ``vit_base_patch14_reg4_dinov2``). Images are
  resized to ``dinov2_image_size`` (224 → a 16×16 grid of 768-d tokens with patch 14),
  ImageNet-normalised; the CLS and register tokens are dropped and the final LayerNorm is
  applied *without* its affine (as RAE). Weights come only from local files:
  ``dinov2_weights``, the Hugging Face cache (``timm/<model>.lvd142m``) or
  ``$TORCH_HOME/hub/checkpoints/<url file>``; missing → :class:`WeightsError`.
* ``"trained"``: a small ViT that spheregen trains itself on ``ctx.train_data()`` and
  then freezes. ``objective = "mae"`` (default): masked-autoencoder pre-training, the
  pixels of the hidden patches regressed through a decoder of the RAE decoder's size,
  which then warm-starts the RAE decoder; ``mask_ratio`` (default 0: every patch is
  both seen and reconstructed, the autoencoding limit of MAE; 0.75 is MAE's
  representation-learning setting). ``"supervised"``: trained as a classifier on the
  labels (mean-pooled tokens -> linear). Both put a ``latent_dim`` bottleneck and an
  affine-free LayerNorm on every token, DINOv2's output layout in miniature.
  Why MAE with mask 0 by default, measured on MNIST 32×32 (test PSNR of
  decode(encode(x)); settings and times in plugins/sphere_latent/README.md): mask 0 →
  26.6-29.0 dB; mask 0.5 → 11.3 dB and mask 0.75 → 18.8 dB (masked pre-training does
  not leave the mean-image plateau in a few hundred CPU steps); supervised → 11.1 dB (a
  classifier discards the within-class detail a decoder needs); a *random* frozen ViT
  gives 24.5 dB. MAE is also label-free (Animal Faces is unconditional). With a GPU
  budget, mask 0.75 is the representation-learning choice. The default config trains
  in about 2 minutes on one CPU thread (27.4 dB).

Decoder training: L1 (+ ``lpips_weight``·LPIPS-VGG) between the decoded and the real
image, on noise-augmented latents ``z + τ·u·ε`` (u ~ U(0, 1) per sample, ε ~ N(0, I),
τ = ``noise_tau`` = 0.8), noise added to the *normalised* latent, so τ is in units of the
latent's standard deviation. LPIPS needs its VGG16 backbone
(``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``); without it any ``lpips_weight > 0``
raises :class:`WeightsError` (LPIPS on random VGG features is not LPIPS).

The decoder's output patch is ``image_size / h``: the token grid fixes it (the trained
encoder's ``patch``, or ``dinov2_image_size / 14`` tokens per side for DINOv2).

Training happens in the factory when ``ctx.cache_dir/rae-<config hash>-<data key>/rae.pt``
does not exist, and is saved atomically there, so an unchanged tokenizer config on the
same data is loaded, never retrained. ``decode`` clamps to [-1, 1].
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal

import attrs
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from tqdm.auto import tqdm

from spheregen.api import (
    BuildContext,
    Perceptual,
    WeightsError,
    at_least_one,
    atomic_write,
    check_vgg16_weights,
    config_hash,
    hub_checkpoints_dir,
    non_negative,
    positive,
    proper_fraction,
    sincos_pos_embed_2d,
    to_dict,
)

NORM_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 1
# Decoder training reuses the frozen encoder's latents when they fit in this much memory.
KEEP_LATENT_BYTES = 2 << 30


@attrs.frozen(kw_only=True)
class RAEConfig:
    """Frozen representation encoder (``dinov2`` from local weights, or a small ViT
    ``trained`` by spheregen with ``objective`` mae/supervised) + a ViT decoder trained
    with L1 (+ LPIPS) on noise-augmented, per-element-normalised latents."""

    encoder: Literal["trained", "dinov2"] = "trained"
    # dinov2
    dinov2_model: str = "vit_base_patch14_reg4_dinov2"
    dinov2_weights: str | None = None
    dinov2_image_size: int = attrs.field(default=224, validator=at_least_one)
    # trained encoder
    objective: Literal["mae", "supervised"] = "mae"
    patch: int = attrs.field(default=4, validator=at_least_one)
    latent_dim: int = attrs.field(default=32, validator=at_least_one)
    encoder_width: int = attrs.field(default=128, validator=at_least_one)
    encoder_depth: int = attrs.field(default=3, validator=at_least_one)
    encoder_heads: int = attrs.field(default=4, validator=at_least_one)
    mask_ratio: float = attrs.field(default=0.0, validator=proper_fraction)
    encoder_steps: int = attrs.field(default=200, validator=at_least_one)
    # decoder
    decoder_width: int = attrs.field(default=128, validator=at_least_one)
    decoder_depth: int = attrs.field(default=3, validator=at_least_one)
    decoder_heads: int = attrs.field(default=4, validator=at_least_one)
    decoder_steps: int = attrs.field(default=100, validator=at_least_one)
    noise_tau: float = attrs.field(default=0.8, validator=non_negative)
    l1_weight: float = attrs.field(default=1.0, validator=non_negative)
    lpips_weight: float = attrs.field(default=0.0, validator=non_negative)
    # optimisation (both phases)
    batch_size: int = attrs.field(default=64, validator=at_least_one)
    lr: float = attrs.field(default=1e-3, validator=positive)
    warmup_fraction: float = attrs.field(default=0.05, validator=proper_fraction)
    seed: int = 0

    @classmethod
    def tiny(cls) -> "RAEConfig":
        """A second-scale configuration for contract tests (a few optimiser steps)."""
        return cls(patch=4, latent_dim=8, encoder_width=32, encoder_depth=1, encoder_heads=2, encoder_steps=2,
                   decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_steps=2, batch_size=8)

    def __attrs_post_init__(self) -> None:
        for prefix in ("encoder", "decoder"):
            width, heads = getattr(self, f"{prefix}_width"), getattr(self, f"{prefix}_heads")
            if width % heads or width % 4:
                raise ValueError(f"'{prefix}_width' {width} must be divisible by '{prefix}_heads' ({heads}) and by 4")


# ------------------------------------------------------------------ building blocks


def _init_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Trunk(nn.Module):
    """Pre-norm ViT blocks (timm) + final LayerNorm on B×N×width tokens."""

    def __init__(self, width: int, depth: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def patchify(images: Tensor, p: int) -> Tensor:
    """B×C×H×W -> B×N×(p²·C), row-major patches, channel-last inside a patch."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, p: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    b, n, _ = tokens.shape
    g = math.isqrt(n)
    x = tokens.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


class ViTEncoder(nn.Module):
    """Small ViT: p×p patch embed + sin-cos positions + blocks, then a per-token
    ``latent_dim`` bottleneck and an affine-free LayerNorm (DINOv2's output layout).

    ``forward(images, keep)``: B×C×H×W -> B×N×D, or only the tokens indexed by ``keep``
    (B×K, MAE's visible patches) -> B×K×D.
    """

    def __init__(self, *, channels: int, image_size: int, patch: int, width: int, depth: int, heads: int,
                 latent_dim: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"rae: image_size {image_size} is not divisible by the encoder patch {patch}")
        self.patch, self.grid = patch, image_size // patch
        self.embed = nn.Linear(patch * patch * channels, width)
        self.register_buffer("pos", sincos_pos_embed_2d(width, self.grid)[None], persistent=False)
        self.trunk = Trunk(width, depth, heads)
        self.head = nn.Linear(width, latent_dim)
        self.out_norm = nn.LayerNorm(latent_dim, elementwise_affine=False, eps=1e-6)
        _init_linears(self)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        x = self.embed(patchify(images, self.patch)) + self.pos
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return self.out_norm(self.head(self.trunk(x)))


class TokenDecoder(nn.Module):
    """MAE-style decoder: D-dim tokens -> Linear -> (+mask tokens) + positions -> blocks
    -> Linear to p²·C pixels per token.

    ``forward(tokens, keep)``: B×N×D -> B×N×(p²·C). With ``keep`` (B×K), ``tokens`` are
    the K visible ones and every other position gets the learned mask token (MAE).
    """

    def __init__(self, *, latent_dim: int, grid: int, patch: int, channels: int, width: int, depth: int, heads: int):
        super().__init__()
        self.grid, self.patch, self.channels = grid, patch, channels
        self.embed = nn.Linear(latent_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos", sincos_pos_embed_2d(width, grid)[None], persistent=False)
        self.trunk = Trunk(width, depth, heads)
        self.head = nn.Linear(width, patch * patch * channels)
        _init_linears(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, keep: Tensor | None = None) -> Tensor:
        x = self.embed(tokens)
        if keep is not None:
            full = self.mask_token.expand(x.shape[0], self.grid * self.grid, -1).clone()
            x = full.scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), x)
        return self.head(self.trunk(x + self.pos))


class DinoEncoder(nn.Module):
    """A timm DINOv2 ViT as a frozen B×C×H×W -> B×N×768 token encoder (see module doc)."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.model = model
        self.image_size = image_size
        width = model.num_features
        # RAE uses DINOv2's last LayerNorm without its affine: unit-scale tokens.
        model.norm = nn.LayerNorm(width, elementwise_affine=False, eps=model.norm.eps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        patch = model.patch_embed.patch_size[0]
        self.grid = image_size // patch

    def forward(self, images: Tensor) -> Tensor:
        x = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.model.forward_features(x)[:, self.model.num_prefix_tokens:]


# ------------------------------------------------------------------ the tokenizer


class RAETokenizer(nn.Module):
    """Frozen encoder + trained decoder with per-element latent normalisation.

    ``encode``: B×C×H×W in [-1, 1] -> B×D×h×w (normalised); ``decode``: the inverse map,
    B×D×h×w -> B×C×H×W clamped to [-1, 1]. ``info`` holds what training measured.
    """

    trainable = False

    def __init__(self, encoder: nn.Module, decoder: TokenDecoder, latent_dim: int, grid: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_shape = (latent_dim, grid, grid)
        self.register_buffer("mean", torch.zeros(self.latent_shape))
        self.register_buffer("var", torch.ones(self.latent_shape))
        self.info: dict[str, Any] = {}
        self.encoder.requires_grad_(False)

    def raw_latents(self, images: Tensor) -> Tensor:
        """Unnormalised encoder tokens as B×D×h×w."""
        tokens = self.encoder(images)
        b, n, d = tokens.shape
        g = self.latent_shape[1]
        return tokens.transpose(1, 2).reshape(b, d, g, g)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return (self.raw_latents(images) - self.mean) / torch.sqrt(self.var + NORM_EPS)

    def decode_unclamped(self, latents: Tensor) -> Tensor:
        # The decoder reads raw-scale latents: the normalisation is undone here, so a
        # decoder pre-trained on raw encoder tokens (MAE) is a valid warm start.
        raw = latents * torch.sqrt(self.var + NORM_EPS) + self.mean
        tokens = raw.flatten(2).transpose(1, 2)
        return unpatchify(self.decoder(tokens), self.decoder.patch, self.decoder.channels)

    def decode(self, latents: Tensor) -> Tensor:
        return self.decode_unclamped(latents).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruction_report(self, images: Tensor, batch_size: int = 256) -> dict[str, float]:
        """PSNR (dB, on [0, 1] pixels, mean over images) of ``decode(encode(x))``.
        ``images``: float in [-1, 1] or uint8, B×C×H×W."""
        return {"psnr": reconstruction_psnr(self, images, batch_size)}

    def extra_repr(self) -> str:
        return f"latent_shape={self.latent_shape}"


@torch.no_grad()
def reconstruction_psnr(tok: RAETokenizer, images: Tensor, batch_size: int = 256) -> float:
    device = tok.mean.device
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = _as_float(images[start:start + batch_size]).to(device)
        rec = tok.decode(tok.encode(x))
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        total += float((10 * torch.log10(1.0 / mse)).sum())
        count += len(x)
    return total / max(count, 1)


def _as_float(images: Tensor) -> Tensor:
    return images.float().div(127.5).sub(1.0) if images.dtype == torch.uint8 else images.float()


# ------------------------------------------------------------------ DINOv2 weights


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"
    return Path(home) / "hub"


def find_dinov2_weights(cfg: RAEConfig) -> Path:
    """The local weights file of ``cfg.dinov2_model``, or a WeightsError saying where to
    put it (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    if cfg.dinov2_weights is not None:
        path = Path(cfg.dinov2_weights).expanduser()
        if path.is_file():
            return path
        raise WeightsError(
            f"rae: dinov2_weights = {cfg.dinov2_weights!r} does not exist. Point it at the {cfg.dinov2_model} "
            "weights file (.safetensors/.bin/.pth), or use the offline alternative encoder = \"trained\""
        )
    pcfg = get_pretrained_cfg(cfg.dinov2_model)
    if pcfg is None:
        raise WeightsError(f"rae: timm has no pretrained weights entry for {cfg.dinov2_model!r}; set dinov2_weights")
    candidates: list[Path] = []
    if pcfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(pcfg.hf_hub_id, filename, cache_dir=str(_hf_hub_cache()))
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
        repo_dir = f"models--{pcfg.hf_hub_id.replace('/', '--')}"
        candidates.append(_hf_hub_cache() / repo_dir / "snapshots/<revision>/model.safetensors")
    if pcfg.url:
        local = hub_checkpoints_dir() / pcfg.url.rsplit("/", 1)[-1]
        if local.is_file():
            return local
        candidates.append(local)
    where = " or ".join(str(c) for c in candidates)
    raise WeightsError(
        f"rae: the DINOv2 encoder weights for {cfg.dinov2_model!r} are not available offline. Put the file at "
        f"{where} (e.g. `huggingface-cli download {pcfg.hf_hub_id}` on a machine with network, or "
        f"{pcfg.url}), or set dinov2_weights = \"/path/to/file\" in the tokenizer config; "
        "offline alternative: encoder = \"trained\" (a ViT encoder spheregen trains on the experiment's data)"
    )


def build_dinov2(cfg: RAEConfig, load: bool = True) -> DinoEncoder:
    """A frozen DINOv2 encoder with weights from a local file (no download);
    ``load=False`` builds the architecture alone (meta-device FLOP counts)."""
    import timm
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(cfg.dinov2_model, pretrained=False, num_classes=0, img_size=cfg.dinov2_image_size)
    if not load:
        return DinoEncoder(model, cfg.dinov2_image_size).eval().requires_grad_(False)
    path = find_dinov2_weights(cfg)
    state = checkpoint_filter_fn(load_state_dict(str(path)), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    unexpected = [k for k in unexpected if not k.startswith("head")]
    if missing or unexpected:
        raise WeightsError(
            f"rae: {path} does not match {cfg.dinov2_model}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return DinoEncoder(model, cfg.dinov2_image_size).eval().requires_grad_(False)


LPIPS_NEEDED_FOR = "rae: lpips_weight > 0 (the LPIPS-VGG term of decoder training)"
LPIPS_ALTERNATIVE = "set lpips_weight = 0 (L1 only)"


# ------------------------------------------------------------------ training


def _lr_at(step: int, total: int, warmup: int, min_ratio: float = 0.01) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimise(params: list[nn.Parameter], loss_fn: Callable[[int], Tensor], steps: int, cfg: RAEConfig,
              desc: str) -> float:
    """AdamW (0.9, 0.95), warmup + cosine, grad clip 1; returns the mean loss of the
    last 10 % of steps."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = int(cfg.warmup_fraction * steps)
    tail: list[float] = []
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_at(step, steps, warmup)
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return sum(tail) / len(tail)


class _Batches:
    """Random training batches (float in [-1, 1] on ``device``) from uint8 tensors."""

    def __init__(self, images: Tensor, labels: Tensor, batch: int, seed: int, device: torch.device):
        self.images, self.labels, self.batch, self.device = images, labels, min(batch, len(images)), device
        self.gen = torch.Generator().manual_seed(seed)

    def indices(self) -> Tensor:
        return torch.randint(len(self.images), (self.batch,), generator=self.gen)

    def __call__(self) -> tuple[Tensor, Tensor]:
        idx = self.indices()
        return _as_float(self.images[idx]).to(self.device), self.labels[idx].to(self.device)


def pretrain_encoder(encoder: ViTEncoder, cfg: RAEConfig, batches: _Batches, channels: int,
                     num_classes: int) -> tuple[dict[str, float], TokenDecoder | None]:
    """Train ``encoder`` with the MAE or supervised objective, then freeze it. Returns
    final-loss logs and, for MAE, its pixel decoder (the RAE decoder's warm start)."""
    device = batches.device
    encoder.requires_grad_(True)
    if cfg.objective == "supervised":
        if num_classes < 2:
            raise ValueError("rae: objective = \"supervised\" needs labelled data (num_classes >= 2); "
                             "use objective = \"mae\"")
        head = nn.Linear(cfg.latent_dim, num_classes).to(device)

        def loss_fn(_step: int) -> Tensor:
            x, y = batches()
            return F.cross_entropy(head(encoder(x).mean(1)), y)

        params = list(encoder.parameters()) + list(head.parameters())
    else:
        grid, n = encoder.grid, encoder.grid ** 2
        n_keep = max(1, round(n * (1 - cfg.mask_ratio)))
        mae_dec = TokenDecoder(latent_dim=cfg.latent_dim, grid=grid, patch=cfg.patch, channels=channels,
                               width=cfg.decoder_width, depth=cfg.decoder_depth, heads=cfg.decoder_heads).to(device)

        def loss_fn(_step: int) -> Tensor:
            x, _ = batches()
            perm = torch.rand(x.shape[0], n, device=device).argsort(1)
            keep, hidden = perm[:, :n_keep], perm[:, n_keep:]
            pred = mae_dec(encoder(x, keep), keep)
            target = patchify(x, cfg.patch)
            # Plain pixel MSE on the hidden patches (MAE's per-patch-normalised target
            # amplifies noise in the many blank patches of digit-like data).
            idx = (hidden if n_keep < n else perm)[..., None].expand(-1, -1, target.shape[-1])
            return F.mse_loss(torch.gather(pred, 1, idx), torch.gather(target, 1, idx))

        params = list(encoder.parameters()) + list(mae_dec.parameters())
    encoder.train()
    final = _optimise(params, loss_fn, cfg.encoder_steps, cfg, f"rae: encoder ({cfg.objective})")
    encoder.eval().requires_grad_(False)
    return {f"encoder_{cfg.objective}_loss": final}, (mae_dec if cfg.objective == "mae" else None)


@torch.no_grad()
def latent_statistics(tok: RAETokenizer, images: Tensor, batch: int = 256,
                      keep_bytes: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-element mean and (population) variance of the raw latents over ``images``;
    also the raw latents themselves (CPU) when they fit in ``keep_bytes``."""
    device = tok.mean.device
    total = torch.zeros(tok.latent_shape, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    n = len(images)
    keep = n * math.prod(tok.latent_shape) * 4 <= keep_bytes
    kept = []
    for start in range(0, n, batch):
        z = tok.raw_latents(_as_float(images[start:start + batch]).to(device))
        if keep:
            kept.append(z.cpu())
        z = z.double()
        total += z.sum(0)
        total_sq += z.pow(2).sum(0)
    mean = total / n
    var = (total_sq / n - mean.pow(2)).clamp_min(0.0)
    return mean.float(), var.float(), (torch.cat(kept) if keep else None)


def train_decoder(tok: RAETokenizer, cfg: RAEConfig, batches: _Batches, raw: Tensor | None = None) -> dict[str, float]:
    """Train the decoder on noise-augmented normalised latents. ``raw`` (N×D×h×w, the
    frozen encoder's output for ``batches.images``) skips re-encoding every batch."""
    perceptual = None
    if cfg.lpips_weight > 0:
        perceptual = Perceptual(LPIPS_NEEDED_FOR, LPIPS_ALTERNATIVE)
    scale = torch.rsqrt(tok.var + NORM_EPS)

    def loss_fn(_step: int) -> Tensor:
        if raw is None:
            x, _ = batches()
            z = tok.encode(x)
        else:
            idx = batches.indices()
            x = _as_float(batches.images[idx]).to(batches.device)
            z = (raw[idx].to(batches.device) - tok.mean) * scale
        if cfg.noise_tau > 0:
            u = torch.rand(z.shape[0], 1, 1, 1, device=z.device)
            z = z + cfg.noise_tau * u * torch.randn_like(z)
        rec = tok.decode_unclamped(z)
        loss = cfg.l1_weight * F.l1_loss(rec, x)
        if perceptual is not None:
            loss = loss + cfg.lpips_weight * perceptual(rec, x)
        return loss

    tok.decoder.train()
    final = _optimise(list(tok.decoder.parameters()), loss_fn, cfg.decoder_steps, cfg, "rae: decoder")
    tok.decoder.eval()
    return {"decoder_loss": final}


# ------------------------------------------------------------------ factory


def data_fingerprint(images: Tensor, labels: Tensor) -> str:
    """A short hash identifying a training set (its shape and up to 512 evenly spaced
    images and all labels), used when the context carries no dataset key."""
    h = hashlib.sha256(str((tuple(images.shape), str(images.dtype))).encode())
    step = max(1, len(images) // 512)
    h.update(images[::step].contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _new_tokenizer(cfg: RAEConfig, ctx: BuildContext) -> RAETokenizer:
    spec = ctx.data
    if cfg.encoder == "dinov2":
        encoder: nn.Module = build_dinov2(cfg, load=ctx.device.type != "meta")
        grid, latent_dim = encoder.grid, encoder.model.num_features
    else:
        encoder = ViTEncoder(channels=spec.channels, image_size=spec.image_size, patch=cfg.patch,
                             width=cfg.encoder_width, depth=cfg.encoder_depth, heads=cfg.encoder_heads,
                             latent_dim=cfg.latent_dim)
        grid, latent_dim = encoder.grid, cfg.latent_dim
    if spec.image_size % grid:
        raise ValueError(f"rae: image_size {spec.image_size} is not a multiple of the latent grid {grid}; "
                         "change dinov2_image_size (DINOv2) or patch (trained)")
    decoder = TokenDecoder(latent_dim=latent_dim, grid=grid, patch=spec.image_size // grid, channels=spec.channels,
                           width=cfg.decoder_width, depth=cfg.decoder_depth, heads=cfg.decoder_heads)
    return RAETokenizer(encoder, decoder, latent_dim, grid)


def _cache_file(cfg: RAEConfig, ctx: BuildContext, data_key: str) -> Path | None:
    if ctx.cache_dir is None:
        return None
    spec = ctx.data
    key = config_hash({"rae": to_dict(cfg), "size": spec.image_size, "channels": spec.channels,
                       "version": CACHE_VERSION})
    return Path(ctx.cache_dir) / f"rae-{key}-{data_key}" / "rae.pt"


def _state_to_save(tok: RAETokenizer, cfg: RAEConfig) -> dict[str, Tensor]:
    # DINOv2 comes from its own weights file; only what spheregen trained is cached.
    skip = "encoder." if cfg.encoder == "dinov2" else None
    return {k: v for k, v in tok.state_dict().items() if skip is None or not k.startswith(skip)}


def fit_rae(tok: RAETokenizer, cfg: RAEConfig, images: Tensor, labels: Tensor, num_classes: int,
            device: torch.device) -> dict[str, Any]:
    """Train the encoder (``trained``), fit the latent statistics, train the decoder."""
    tok.to(device)
    batches = _Batches(images, labels, cfg.batch_size, cfg.seed, device)
    info: dict[str, Any] = {}
    start = time.perf_counter()
    if cfg.encoder == "trained":
        logs, warm = pretrain_encoder(tok.encoder, cfg, batches, images.shape[1], num_classes)
        info.update(logs)
        if warm is not None:
            tok.decoder.load_state_dict(warm.state_dict())
    info["encoder_seconds"] = time.perf_counter() - start
    mean, var, raw = latent_statistics(tok, images, keep_bytes=KEEP_LATENT_BYTES)
    tok.mean.copy_(mean)
    tok.var.copy_(var)
    info.update(train_decoder(tok, cfg, batches, raw))
    info["train_seconds"] = time.perf_counter() - start
    probe = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[:512]]
    info["train_psnr"] = reconstruction_psnr(tok, probe)
    return info


def build_rae(cfg: RAEConfig, ctx: BuildContext) -> RAETokenizer:
    """RAE: frozen representation encoder (DINOv2 or self-trained ViT) + trained ViT decoder."""
    if ctx.device.type == "meta":
        # the architecture only, for counting FLOPs and parameters: no weights are
        # looked up, nothing is trained or cached
        with torch.device("meta"):
            return _new_tokenizer(cfg, ctx).eval()
    if cfg.lpips_weight > 0:
        check_vgg16_weights(LPIPS_NEEDED_FOR, LPIPS_ALTERNATIVE)  # before any training
    # Initialisation and training draw from a private RNG seeded by the config: the same
    # config gives the same tokenizer, and the caller's random state is left alone.
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        return _build_rae(cfg, ctx)


def _build_rae(cfg: RAEConfig, ctx: BuildContext) -> RAETokenizer:
    tok = _new_tokenizer(cfg, ctx)
    # the training split is loaded only when it is needed: to fingerprint data that has
    # no key, or to train; a cache hit under a known data key never touches it
    data = None
    data_key = getattr(ctx, "data_key", None)
    if data_key is None and ctx.train_data is not None:
        data = ctx.train_data()
        data_key = data_fingerprint(*data)
    path = _cache_file(cfg, ctx, data_key) if data_key is not None else None
    if path is not None and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        tok.load_state_dict(blob["state"], strict=cfg.encoder != "dinov2")
        tok.info = {**blob["info"], "cache": str(path), "loaded": True}
        return tok.to(ctx.device).eval()
    if data is None and ctx.train_data is not None:
        data = ctx.train_data()
    if data is None:
        raise ValueError(
            "rae: no cached weights for this config and no training data to train on (ctx.train_data is None); "
            "build it inside an experiment, or give the BuildContext a train_data callable"
        )
    images, labels = data
    tok.info = fit_rae(tok, cfg, images, labels, ctx.data.num_classes, ctx.device)
    tok.info["loaded"] = False
    if path is not None:
        blob = {"state": _state_to_save(tok, cfg), "info": tok.info, "config": to_dict(cfg)}
        atomic_write(path, lambda p: torch.save(blob, p))
        tok.info["cache"] = str(path)
    return tok.eval()
