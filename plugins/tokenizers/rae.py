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
* ``"trained"``: a small ViT that spheregen trains itself on the experiment's training
  split and then freezes. ``objective = "mae"`` (default): masked-autoencoder pre-training, the
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

Fitting is a stage (the FittableComponent capability, :meth:`RAETokenizer.fit_spec`):
the core's accelerate trainer runs the phases (``encoder-mae`` or
``encoder-supervised`` for a trained encoder, then a ``statistics`` pass for the latent
mean and variance, then ``decoder``) with checkpoints, ``--resume`` and a log per phase,
under ``<cache>/fit/rae/<data>-<key>/`` keyed by this config, the data's shape and key,
and the mixed precision (``spheregen fit EXPERIMENT.toml``; ``run`` and ``train`` fit
first); the factory only loads ``weights.safetensors`` from there. Both phases draw
epoch-permuted batches (batch_size global, drop-last) through the streaming data path;
the decoder re-encodes each batch with the frozen encoder. ``decode`` clamps to [-1, 1].
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Literal

import attrs
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from spheregen.api import (
    BuildContext,
    DataSpec,
    FitPhase,
    FitRecipe,
    FitSpec,
    FitStatistics,
    Perceptual,
    WeightsError,
    at_least_one,
    check_vgg16_weights,
    hub_checkpoints_dir,
    load_fitted,
    non_negative,
    positive,
    proper_fraction,
    sincos_pos_embed_2d,
)

NORM_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
            # in x's dtype: under bf16 autocast the embedding is bf16 and the parameter fp32
            full = self.mask_token.to(x.dtype).expand(x.shape[0], self.grid * self.grid, -1).clone()
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
    B×D×h×w -> B×C×H×W clamped to [-1, 1]. ``info`` holds what the fit measured.
    :meth:`fit_spec` declares what spheregen fits (the FittableComponent capability):
    the trained encoder's pre-training, the latent statistics, the decoder.
    """

    trainable = False

    def __init__(self, encoder: nn.Module, decoder: TokenDecoder, latent_dim: int, grid: int, cfg: RAEConfig,
                 spec: DataSpec):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.cfg, self.spec = cfg, spec
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

    # -- fitting (spheregen.api.FittableComponent)

    def fit_spec(self) -> FitSpec:
        return _fit_spec(self)

    def fitted_state(self) -> dict[str, Tensor]:
        # DINOv2 comes from its own weights file; only what spheregen trained is kept.
        skip = "encoder." if self.cfg.encoder == "dinov2" else None
        return {k: v for k, v in self.state_dict().items() if skip is None or not k.startswith(skip)}

    def load_fitted(self, state: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.load_state_dict(state, strict=self.cfg.encoder != "dinov2")
        self.info = dict(info)

    @torch.no_grad()
    def latent_sums(self, images: Tensor, _labels: Tensor) -> dict[str, Tensor]:
        """Count, sum and sum of squares (float64) of the raw latents of a batch."""
        self.to(images.device)
        z = self.raw_latents(images).double()
        return {"n": torch.tensor(float(len(z)), dtype=torch.float64, device=z.device), "sum": z.sum(0),
                "sq": z.pow(2).sum(0)}

    def set_statistics(self, totals: dict[str, Tensor]) -> None:
        """Per-element mean and (population) variance of the raw latents."""
        n = totals["n"]
        mean = totals["sum"] / n
        var = (totals["sq"] / n - mean.pow(2)).clamp_min(0.0)
        self.mean.copy_(mean.float())
        self.var.copy_(var.float())

    @torch.no_grad()
    def fit_report(self, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
        """PSNR (dB) of ``decode(encode(x))`` on held-out batches."""
        total, count = 0.0, 0
        for x, _ in batches:
            self.to(x.device)
            total += float(_psnr(self.decode(self.encode(x)), x).sum())
            count += len(x)
        return {"psnr": total / max(count, 1)}


@torch.no_grad()
def reconstruction_psnr(tok: RAETokenizer, images: Tensor, batch_size: int = 256) -> float:
    device = tok.mean.device
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = _as_float(images[start:start + batch_size]).to(device)
        total += float(_psnr(tok.decode(tok.encode(x)), x).sum())
        count += len(x)
    return total / max(count, 1)


def _psnr(rec: Tensor, x: Tensor) -> Tensor:
    """Per-image PSNR (dB) on [0, 1] pixels of images in [-1, 1]."""
    mse = ((rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


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


# ------------------------------------------------------------------ fitting
# What spheregen trains is declared as a fit (spheregen.api.FitSpec) and trained by the
# core's accelerate loop (`spheregen fit`; `run` and `train` fit first); the factory only
# loads the result.

FIT_VERSION = 2  # 1: trained inside the factory (rae.pt); 2: fitted by the trainer


def _recipe(cfg: RAEConfig, steps: int) -> FitRecipe:
    """AdamW (0.9, 0.95), no weight decay, warmup then cosine to 1% of ``lr``, gradient
    clipping at 1, for both phases."""
    return FitRecipe(batch_size=cfg.batch_size, lr=cfg.lr, steps=steps, warmup_fraction=cfg.warmup_fraction,
                     min_lr_ratio=0.01, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0, seed=cfg.seed)


class MAEObjective(nn.Module):
    """Masked-autoencoder pre-training of the encoder: the pixels of the hidden patches
    (every patch at ``mask_ratio = 0``) regressed through a pixel decoder of the RAE
    decoder's size, which then warm-starts the RAE decoder."""

    def __init__(self, encoder: ViTEncoder, decoder: TokenDecoder, mask_ratio: float, patch: int):
        super().__init__()
        self.encoder, self.decoder, self.patch = encoder, decoder, patch
        self.n = encoder.grid ** 2
        self.n_keep = max(1, round(self.n * (1 - mask_ratio)))

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        perm = torch.rand(images.shape[0], self.n, device=images.device).argsort(1)
        keep, hidden = perm[:, :self.n_keep], perm[:, self.n_keep:]
        pred = self.decoder(self.encoder(images, keep), keep)
        target = patchify(images, self.patch)
        # Plain pixel MSE on the hidden patches (MAE's per-patch-normalised target
        # amplifies noise in the many blank patches of digit-like data).
        idx = (hidden if self.n_keep < self.n else perm)[..., None].expand(-1, -1, target.shape[-1])
        return F.mse_loss(torch.gather(pred, 1, idx), torch.gather(target, 1, idx).to(pred.dtype)), {}


class SupervisedObjective(nn.Module):
    """The encoder trained as a classifier: mean-pooled tokens -> linear -> cross-entropy."""

    def __init__(self, encoder: ViTEncoder, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        return F.cross_entropy(self.head(self.encoder(images).mean(1)), labels), {}


class DecoderObjective(nn.Module):
    """Decoder training: L1 (+ LPIPS) between the decoded and the real image, on
    noise-augmented normalised latents ``z + τ·u·ε`` of the frozen encoder."""

    def __init__(self, tok: "RAETokenizer", cfg: RAEConfig):
        super().__init__()
        self.tok, self.cfg = tok, cfg
        # not a module: LPIPS stays out of the trained parameters and the checkpoints
        self.perceptual = Perceptual(LPIPS_NEEDED_FOR, LPIPS_ALTERNATIVE) if cfg.lpips_weight > 0 else None

    def train(self, mode: bool = True) -> "DecoderObjective":
        super().train(mode)
        self.tok.encoder.eval()  # frozen: only the decoder trains
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.tok.decoder.parameters())}]

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        z = self.tok.encode(images)
        if cfg.noise_tau > 0:
            u = torch.rand(z.shape[0], 1, 1, 1, device=z.device)
            z = z + cfg.noise_tau * u * torch.randn_like(z)
        rec = self.tok.decode_unclamped(z)
        l1 = F.l1_loss(rec, images.to(rec.dtype))
        loss = cfg.l1_weight * l1
        logs = {"l1": float(l1.detach())}
        if self.perceptual is not None:
            lp = self.perceptual(rec, images)
            loss = loss + cfg.lpips_weight * lp
            logs["lpips"] = float(lp.detach())
        return loss, logs


def _fit_spec(tok: "RAETokenizer") -> FitSpec:
    cfg, spec = tok.cfg, tok.spec
    supervised = cfg.encoder == "trained" and cfg.objective == "supervised"
    identity = {"rae": cfg, "image_size": spec.image_size, "channels": spec.channels,
                "num_classes": spec.num_classes if supervised else None, "version": FIT_VERSION}

    def phases() -> list[FitPhase | FitStatistics]:
        out: list[FitPhase | FitStatistics] = []
        if cfg.encoder == "trained":
            out.append(_encoder_phase(tok, cfg, spec.channels, spec.num_classes))
        out.append(FitStatistics(name="statistics", sums=tok.latent_sums, finish=tok.set_statistics))
        # the mask token serves MAE only: frozen here, as distributed training needs
        # every trained parameter to receive a gradient
        out.append(FitPhase(name="decoder", module=DecoderObjective(tok, cfg), recipe=_recipe(cfg, cfg.decoder_steps),
                            start=lambda: tok.decoder.mask_token.requires_grad_(False)))
        return out

    return FitSpec(name="rae", identity=identity, phases=phases, state=tok.fitted_state, load=tok.load_fitted,
                   report=tok.fit_report)


def _encoder_phase(tok: "RAETokenizer", cfg: RAEConfig, channels: int, num_classes: int) -> FitPhase:
    """MAE or supervised pre-training of the trained encoder, frozen when it ends (the
    MAE's pixel decoder then warm-starts the RAE decoder)."""
    encoder = tok.encoder
    with torch.random.fork_rng(devices=[]):  # the objective's own parts, seeded by the config
        torch.manual_seed(cfg.seed + 1)
        if cfg.objective == "supervised":
            module: nn.Module = SupervisedObjective(encoder, nn.Linear(cfg.latent_dim, num_classes))
        else:
            mae_dec = TokenDecoder(latent_dim=cfg.latent_dim, grid=encoder.grid, patch=cfg.patch, channels=channels,
                                   width=cfg.decoder_width, depth=cfg.decoder_depth, heads=cfg.decoder_heads)
            module = MAEObjective(encoder, mae_dec, cfg.mask_ratio, cfg.patch)
    module.to(tok.mean.device)

    def finish() -> None:
        encoder.eval().requires_grad_(False)
        if isinstance(module, MAEObjective):
            tok.decoder.load_state_dict(module.decoder.state_dict())

    return FitPhase(name=f"encoder-{cfg.objective}", module=module, recipe=_recipe(cfg, cfg.encoder_steps),
                    start=lambda: encoder.requires_grad_(True), finish=finish)


# ------------------------------------------------------------------ factory


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
    return RAETokenizer(encoder, decoder, latent_dim, grid, cfg, spec)


def build_rae(cfg: RAEConfig, ctx: BuildContext) -> RAETokenizer:
    """RAE: frozen representation encoder (DINOv2 or self-trained ViT) + trained ViT
    decoder, loaded from its fit (:func:`spheregen.api.load_fitted`)."""
    if ctx.device.type == "meta":
        # the architecture only, for counting FLOPs and parameters: no weights are
        # looked up, nothing is fitted or loaded
        with torch.device("meta"):
            return _new_tokenizer(cfg, ctx).eval()
    if cfg.lpips_weight > 0:
        check_vgg16_weights(LPIPS_NEEDED_FOR, LPIPS_ALTERNATIVE)  # before any fitting
    if cfg.encoder == "trained" and cfg.objective == "supervised" and ctx.data.num_classes < 2:
        raise ValueError("rae: objective = \"supervised\" needs labelled data (num_classes >= 2); "
                         "use objective = \"mae\"")
    # The initialisation draws from a private RNG seeded by the config (the same config
    # gives the same tokenizer) and leaves the caller's random state alone.
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        tok = _new_tokenizer(cfg, ctx)
    fitted = load_fitted(tok, ctx)
    tok.info = {**fitted.info, "cache": str(fitted.weights) if fitted.weights is not None else None,
                "loaded": not fitted.fitted_now}
    return tok.to(ctx.device).eval()
